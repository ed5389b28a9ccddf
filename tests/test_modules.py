"""The Flax NNX, Flax Linen and Equinox modules against the libraries' own LSTMs, in training, and their errors.

Each module is compared with the library's LSTM after converting the library's
weights with ``jax_lstm.interop``: values and gradients (random cotangents on
the outputs and on the final carry) with respect to the inputs, the initial
carry and every weight, with sequence lengths. Flax does not zero the outputs
at padded steps, so only valid steps are compared there.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jax_lstm import LSTMState
from jax_lstm.gradcheck import rel_err
from jax_lstm.interop import from_equinox, from_flax, to_equinox
from jax_lstm.layers import init_stack

T, B, D = 6, 3, 4
LENGTHS = np.array([6, 4, 1])  # Flax picks the carry at step length - 1: lengths >= 1
TOL = {"float32": 1e-5, "float64": 1e-10}
# (hidden sizes per layer, bidirectional, dtype)
CONFIGS = [((5,), False, "float32"), ((5, 3), True, "float64")]
CONFIG_IDS = ["1-layer-f32", "2-layer-bi-f64"]


def _valid():
    return jnp.asarray(np.arange(T)[None, :] < LENGTHS[:, None])  # (B, T)


def _problem(sizes, bidirectional, dtype, seed=0):
    """Batch-major inputs, an initial carry (our nesting), cotangents on the valid outputs and the final carry."""
    rng = np.random.default_rng(seed)
    n_dir = 2 if bidirectional else 1
    arr = lambda *s: jnp.asarray(rng.standard_normal(s), dtype)  # noqa: E731
    xs = arr(B, T, D)
    carry = tuple(tuple(LSTMState(arr(B, h), arr(B, h)) for _ in range(n_dir)) for h in sizes)
    ct_y = arr(B, T, n_dir * sizes[-1]) * _valid()[..., None]
    ct_carry = tuple(tuple(LSTMState(arr(B, h), arr(B, h)) for _ in range(n_dir)) for h in sizes)
    return xs, carry, ct_y, ct_carry


def _single(carry, sizes, bidirectional):
    """Our module carry: one LSTMState for one unidirectional layer, else the nesting."""
    return carry[0][0] if len(sizes) == 1 and not bidirectional else carry


def _nested(carry):
    return ((carry,),) if isinstance(carry, LSTMState) else carry


def _flax_form(carry, sizes, bidirectional):
    """Our stack nesting as Flax writes carries: plain (c, h) per direction, (fwd, bwd) per bidirectional layer."""
    layers = tuple(tuple((s.c, s.h) for s in layer) if bidirectional else (layer[0].c, layer[0].h) for layer in carry)
    return layers[0] if len(sizes) == 1 else layers


def _from_flax_form(carry, sizes, bidirectional):
    """A Flax-module carry (LSTMCarry per direction) as our stack nesting of LSTMState, checking its form."""
    layers = (carry,) if len(sizes) == 1 else carry
    out = []
    for layer in layers:
        dirs = layer if bidirectional else (layer,)
        for d in dirs:
            c, h = d  # unpacks as Flax's (c, h)
            assert c is d.c and h is d.h
        out.append(tuple(LSTMState(h=d.h, c=d.c) for d in dirs))
    return tuple(out)


def _vjp(fn, *primals_and_cts):
    """jit(vjp) of fn(*primals) -> (outputs, carry); returns (outputs, carry, grads)."""

    @jax.jit
    def run(primals, cts):
        out, pull = jax.vjp(fn, *primals)
        return out, pull(cts)

    *primals, ct = primals_and_cts
    (y, carry), grads = run(tuple(primals), ct)
    return y, carry, grads


def _check_against(dtype, ours, theirs, ours_weights, theirs_weights):
    """Compare (y, carry, grads) of ours with theirs on the valid steps; weight grads converted to our stack."""
    (y, c, g), (y_r, c_r, g_r) = ours, theirs
    tol = TOL[dtype]
    valid = _valid()[..., None]
    assert y.dtype == jnp.dtype(dtype)
    assert rel_err(y, y_r * valid) < tol
    assert float(jnp.max(jnp.abs(jnp.where(valid, 0, y)))) == 0.0  # padding is zero in ours
    assert rel_err(c, c_r) < tol
    assert rel_err(g[1], g_r[1]) < tol  # inputs
    assert rel_err(g[2], g_r[2]) < tol  # initial carry
    assert jax.tree.structure(ours_weights) == jax.tree.structure(theirs_weights)
    assert rel_err(ours_weights, theirs_weights) < tol


# --------------------------------------------------------------------------- Flax NNX


@pytest.fixture(scope="module")
def nnx():
    return pytest.importorskip("flax.nnx")


def _nnx_reference(nnx, sizes, bidirectional, dtype, seed=1):
    """nnx.RNN(nnx.OptimizedLSTMCell) per layer (nnx.Bidirectional if bidirectional), random biases."""
    rngs, rng = nnx.Rngs(seed), np.random.default_rng(seed)

    def cell(d, h):
        c = nnx.OptimizedLSTMCell(d, h, param_dtype=dtype, rngs=rngs)
        c.dense_h.bias[...] = jnp.asarray(0.5 * rng.standard_normal(4 * h), dtype)  # Flax starts at zero
        return c

    layers, d = [], D
    for h in sizes:
        if bidirectional:
            layers.append(nnx.Bidirectional(nnx.RNN(cell(d, h)), nnx.RNN(cell(d, h))))
        else:
            layers.append(nnx.RNN(cell(d, h)))
        d = h * (2 if bidirectional else 1)

    class Stack(nnx.Module):
        def __init__(self, layers):
            self.layers = nnx.List(layers)

    return Stack(layers)


def _nnx_cells(state, bidirectional):
    """Per layer, the cell states (forward, reverse) of the reference's params (or their gradients)."""
    cells = []
    for l in range(len(state["layers"])):
        layer = state["layers"][l]
        cells.append(
            (layer["forward_rnn"]["cell"], layer["backward_rnn"]["cell"]) if bidirectional else (layer["cell"],)
        )
    return cells


@pytest.mark.parametrize("sizes, bidirectional, dtype", CONFIGS, ids=CONFIG_IDS)
def test_nnx_matches_flax(nnx, sizes, bidirectional, dtype):
    from jax_lstm.nnx import LSTM

    ref = _nnx_reference(nnx, sizes, bidirectional, dtype)
    gd_r, p_r, rest_r = nnx.split(ref, nnx.Param, ...)
    stack = tuple(tuple(from_flax(c) for c in layer) for layer in _nnx_cells(p_r, bidirectional))
    model = LSTM.from_params(stack)
    assert rel_err(model.to_params(), stack) == 0.0
    gd, p, rest = nnx.split(model, nnx.Param, ...)
    xs, carry, ct_y, ct_carry = _problem(sizes, bidirectional, dtype)
    lengths = jnp.asarray(LENGTHS)

    def ours(params, xs, carry):
        m = nnx.merge(gd, params, rest)
        c, y = m(xs, initial_carry=_flax_form(carry, sizes, bidirectional), seq_lengths=lengths, return_carry=True)
        return y, _from_flax_form(c, sizes, bidirectional)

    def theirs(params, xs, carry):
        m = nnx.merge(gd_r, params, rest_r)
        finals = []
        for l, layer in enumerate(m.layers):
            if bidirectional:  # Flax's carry is (c, h)
                init = tuple((s.c, s.h) for s in carry[l])
                c, xs = layer(xs, initial_carry=init, seq_lengths=lengths, return_carry=True)
                finals.append(tuple(LSTMState(h, c_) for c_, h in c))
            else:
                (c, h), xs = layer(
                    xs, initial_carry=(carry[l][0].c, carry[l][0].h), seq_lengths=lengths, return_carry=True
                )
                finals.append((LSTMState(h, c),))
        return xs * _valid()[..., None], tuple(finals)

    y, c, g = _vjp(ours, p, xs, carry, (ct_y, ct_carry))
    y_r, c_r, g_r = _vjp(theirs, p_r, xs, carry, (ct_y, ct_carry))
    g_stack = nnx.merge(gd, g[0], rest).to_params()
    g_stack_r = tuple(tuple(from_flax(c) for c in layer) for layer in _nnx_cells(g_r[0], bidirectional))
    _check_against(dtype, (y, c, g), (y_r, c_r, g_r), g_stack, g_stack_r)


def _nnx_model(nnx, seed=0, **kw):
    from jax_lstm.nnx import LSTM

    class Model(nnx.Module):  # features -> LSTM -> dense
        def __init__(self, rngs):
            self.lstm = LSTM(D, (5, 4), rngs=rngs, **kw)
            self.head = nnx.Linear(4, 2, rngs=rngs)

        def __call__(self, x):
            return self.head(self.lstm(x, seq_lengths=jnp.asarray(LENGTHS)))

    return Model(nnx.Rngs(params=seed, dropout=seed + 1))


def _regression(seed=3):
    rng = np.random.default_rng(seed)
    return tuple(jnp.asarray(rng.standard_normal((B, T, n)), jnp.float32) for n in (D, 2))


def test_nnx_train_step(nnx):
    model = _nnx_model(nnx, dropout=0.2, recurrent_dropout=0.2)
    x, y = _regression()
    opt = nnx.Optimizer(model, optax.adam(0.05), wrt=nnx.Param)
    loss = lambda m: jnp.mean((m(x) - y) ** 2)  # noqa: E731

    @nnx.jit
    def step(model, opt):
        value, grads = nnx.value_and_grad(loss)(model)
        opt.update(model, grads)
        return value

    eval_loss = nnx.jit(loss)
    model.eval()
    before = float(eval_loss(model))
    model.train()
    stack0 = model.lstm.to_params()
    train_losses = [float(step(model, opt)) for _ in range(6)]
    model.eval()
    after = float(eval_loss(model))
    assert np.all(np.isfinite(train_losses))
    assert after < 0.9 * before, (before, after, train_losses)
    assert rel_err(model.lstm.to_params(), stack0) > 0  # the LSTM's own weights moved
    assert jax.tree.structure(model.lstm.to_params()) == jax.tree.structure(stack0)


def test_nnx_dropout_modes_and_round_trip(nnx):
    from jax_lstm.nnx import LSTM

    model = LSTM(D, 5, num_layers=2, dropout=0.5, recurrent_dropout=0.3, rngs=nnx.Rngs(params=0, dropout=1))
    plain = LSTM.from_params(model.to_params())  # same weights, no dropout
    assert rel_err(plain.to_params(), model.to_params()) == 0.0
    x, _ = _regression()
    call = nnx.jit(lambda m: m(x))
    with_key = nnx.jit(lambda m, key: m(x, rngs=key))
    ref = call(plain)
    model.eval()
    assert model.deterministic is True
    assert np.array_equal(call(model), ref)  # dropout off in eval mode
    model.train()
    assert np.array_equal(call(nnx.view(model, deterministic=True)), ref)
    a = with_key(model, jax.random.key(5))
    assert np.array_equal(a, with_key(model, jax.random.key(5)))  # reproducible for a given rng
    assert not np.allclose(a, with_key(model, jax.random.key(6)))  # another rng, another mask
    assert not np.allclose(a, ref)
    # the constructor's stream: a fresh key each call, the same sequence for the same seeds
    twin = LSTM(D, 5, num_layers=2, dropout=0.5, recurrent_dropout=0.3, rngs=nnx.Rngs(params=0, dropout=1))
    first = call(model)
    assert not np.allclose(first, call(model))
    assert np.array_equal(first, call(twin))
    # time-major layout and computation dtype
    tm = LSTM.from_params(model.to_params(), time_major=True)
    assert rel_err(jnp.swapaxes(tm(jnp.swapaxes(x, 0, 1)), 0, 1), ref) < 1e-6
    half = LSTM.from_params(model.to_params(), dtype=jnp.bfloat16)
    assert nnx.eval_shape(lambda m: m(x), half).dtype == jnp.bfloat16
    assert model.to_params()[0][0].W.dtype == jnp.float32


def test_nnx_errors(nnx):
    from jax_lstm.nnx import LSTM

    model = LSTM(D, 5, rngs=nnx.Rngs(0))
    x, _ = _regression()
    with pytest.raises(ValueError, match=r"inputs has shape \(3, 6\), expected \(\*batch, T, D\) with D = 4"):
        model(x[..., 0])
    with pytest.raises(ValueError, match=r"expected \(\*batch, T, D\) with D = 4"):
        model(x[..., :3])
    h = jnp.zeros((B, 5))
    with pytest.raises(TypeError, match=r"plain pair of arrays read \(c, h\)"):
        model(x, initial_carry=(h, h, h))
    with pytest.raises(ValueError, match=r"initial_carry.h has shape \(3, 4\), expected \(\*batch, H\) = \(3, 5\)"):
        model(x, initial_carry=(h, h[:, :4]))
    with pytest.raises(ValueError, match=r"seq_lengths has shape \(2,\), expected \(\*batch,\) = \(3,\)"):
        model(x, seq_lengths=jnp.array([1, 2]))
    with pytest.raises(ValueError, match=r"resets has shape \(6, 3\), expected \(\*batch, T\) = \(3, 6\)"):
        model(x, resets=jnp.zeros((T, B), bool))
    with pytest.raises(ValueError, match="num_layers=3"):
        LSTM(D, (5, 4), num_layers=3, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"dropout must be in \[0, 1\)"):
        LSTM(D, 5, dropout=1.0, rngs=nnx.Rngs(0))
    two = LSTM.from_params(init_stack(jax.random.PRNGKey(0), D, (5, 5)), dropout=0.5)
    with pytest.raises(ValueError, match="'dropout' rng stream"):
        two(x)
    with pytest.raises(TypeError, match=r"one entry per layer \(2\).*\(one direction's carry\)"):
        two(x, initial_carry=LSTMState(h, h), rngs=nnx.Rngs(dropout=0))
    assert two(x, rngs=nnx.Rngs(dropout=0)).shape == (B, T, 5)
    mixed = init_stack(jax.random.PRNGKey(0), D, (5,)) + init_stack(jax.random.PRNGKey(1), 5, (5,), bidirectional=True)
    with pytest.raises(ValueError, match="must all be unidirectional or all bidirectional"):
        LSTM.from_params(mixed)


# --------------------------------------------------------------------------- Flax Linen


@pytest.fixture(scope="module")
def nn():
    return pytest.importorskip("flax.linen")


def _perturb(tree, seed):
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda a: a + 0.5 * jnp.asarray(rng.standard_normal(a.shape), a.dtype), tree)


@pytest.mark.parametrize("sizes, bidirectional, dtype", CONFIGS, ids=CONFIG_IDS)
def test_linen_matches_flax(nn, sizes, bidirectional, dtype):
    from jax_lstm.linen import LSTM, from_variables, to_variables

    layers, variables, d = [], [], D
    for l, h in enumerate(sizes):
        rnn = lambda h=h: nn.RNN(nn.OptimizedLSTMCell(h, param_dtype=dtype))  # noqa: E731
        layer = nn.Bidirectional(rnn(), rnn()) if bidirectional else rnn()
        layers.append(layer)
        variables.append(_perturb(layer.init(jax.random.PRNGKey(l), jnp.zeros((B, T, d), dtype)), l + 10))
        d = h * (2 if bidirectional else 1)

    def cells(v):
        p = v["params"]
        return (p["forward_rnn"]["cell"], p["backward_rnn"]["cell"]) if bidirectional else (p["cell"],)

    stack = tuple(tuple(from_flax(c) for c in cells(v)) for v in variables)
    model = LSTM(sizes, bidirectional=bidirectional)
    ours_vars = to_variables(stack)
    assert rel_err(from_variables(ours_vars), stack) == 0.0
    assert jax.tree.structure(jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((B, T, D), dtype))) == (
        jax.tree.structure(ours_vars)
    )
    xs, carry, ct_y, ct_carry = _problem(sizes, bidirectional, dtype)
    lengths = jnp.asarray(LENGTHS)

    def ours(v, xs, carry):
        c, y = model.apply(
            v, xs, initial_carry=_single(carry, sizes, bidirectional), seq_lengths=lengths, return_carry=True
        )
        return y, _from_flax_form(c, sizes, bidirectional)

    def theirs(vs, xs, carry):
        finals = []
        for l, (layer, v) in enumerate(zip(layers, vs, strict=True)):
            if bidirectional:  # Flax's carry is (c, h)
                init = tuple((s.c, s.h) for s in carry[l])
                c, xs = layer.apply(v, xs, initial_carry=init, seq_lengths=lengths, return_carry=True)
                finals.append(tuple(LSTMState(h, c_) for c_, h in c))
            else:
                init = (carry[l][0].c, carry[l][0].h)
                (c, h), xs = layer.apply(v, xs, initial_carry=init, seq_lengths=lengths, return_carry=True)
                finals.append((LSTMState(h, c),))
        return xs * _valid()[..., None], tuple(finals)

    y, c, g = _vjp(ours, ours_vars, xs, carry, (ct_y, ct_carry))
    y_r, c_r, g_r = _vjp(theirs, variables, xs, carry, (ct_y, ct_carry))
    g_stack_r = tuple(tuple(from_flax(c) for c in cells(v)) for v in g_r[0])
    _check_against(dtype, (y, c, g), (y_r, c_r, g_r), from_variables(g[0]), g_stack_r)


def test_linen_train_step_dropout_and_round_trip(nn):
    from jax_lstm.linen import LSTM, from_variables, to_variables

    class Model(nn.Module):  # features -> LSTM -> dense
        @nn.compact
        def __call__(self, x, deterministic=True):
            h = LSTM((5, 4), dropout=0.2, recurrent_dropout=0.2, name="lstm")(
                x, seq_lengths=jnp.asarray(LENGTHS), deterministic=deterministic
            )
            return nn.Dense(2)(h)

    model = Model()
    x, y = _regression()
    variables = model.init(jax.random.PRNGKey(0), x)
    stack0 = from_variables(variables["params"]["lstm"])
    assert rel_err(to_variables(stack0)["params"], variables["params"]["lstm"]) == 0.0
    tx = optax.adam(0.05)
    opt_state = tx.init(variables)

    @jax.jit
    def step(variables, opt_state, key):
        def loss(v):
            return jnp.mean((model.apply(v, x, deterministic=False, rngs={"dropout": key}) - y) ** 2)

        value, grads = jax.value_and_grad(loss)(variables)
        updates, opt_state = tx.update(grads, opt_state, variables)
        return optax.apply_updates(variables, updates), opt_state, value

    eval_loss = jax.jit(lambda v: jnp.mean((model.apply(v, x) - y) ** 2))
    before = float(eval_loss(variables))
    v = variables
    for i in range(6):
        v, opt_state, value = step(v, opt_state, jax.random.PRNGKey(i))
        assert np.isfinite(float(value))
    after = float(eval_loss(v))
    assert after < 0.9 * before, (before, after)
    assert rel_err(from_variables(v["params"]["lstm"]), stack0) > 0

    # dropout: off when deterministic (= a dropout-free model), reproducible for a key, different for another
    lstm = LSTM((5, 4), dropout=0.5, recurrent_dropout=0.3)
    lv = {"params": variables["params"]["lstm"]}
    ref = jax.jit(LSTM((5, 4)).apply)(lv, x)
    assert np.array_equal(jax.jit(lstm.apply)(lv, x), ref)
    run = jax.jit(lambda k: lstm.apply(lv, x, deterministic=False, rngs={"dropout": k}))
    assert np.array_equal(run(jax.random.PRNGKey(1)), run(jax.random.PRNGKey(1)))
    assert not np.allclose(run(jax.random.PRNGKey(1)), run(jax.random.PRNGKey(2)))
    assert not np.allclose(run(jax.random.PRNGKey(1)), ref)
    # time-major layout and computation dtype
    tm = LSTM((5, 4), time_major=True).apply(lv, jnp.swapaxes(x, 0, 1))
    assert rel_err(jnp.swapaxes(tm, 0, 1), ref) < 1e-6
    assert jax.eval_shape(LSTM((5, 4), dtype=jnp.bfloat16).apply, lv, x).dtype == jnp.bfloat16


def test_linen_errors(nn):
    from jax_lstm.linen import LSTM, from_variables

    x, _ = _regression()
    with pytest.raises(ValueError, match=r"expected \(\*batch, T, D\)"):
        LSTM(5).init(jax.random.PRNGKey(0), x[0, 0])
    with pytest.raises(ValueError, match="num_layers=3"):
        LSTM((5, 4), num_layers=3).init(jax.random.PRNGKey(0), x)
    v = LSTM(5).init(jax.random.PRNGKey(0), x)
    h = jnp.zeros((B, 5))
    with pytest.raises(TypeError, match=r"\(c, h\)"):
        LSTM(5).apply(v, x, initial_carry=[h])
    from flax.errors import ScopeParamShapeError

    with pytest.raises(ScopeParamShapeError, match=r"\(3, 20\).*\(4, 20\)"):  # Flax checks D
        LSTM(5).apply(v, x[..., :3])
    with pytest.raises(KeyError, match="'stack'"):
        from_variables({"params": {"other": 1}})


# --------------------------------------------------------------------------- Equinox


@pytest.fixture(scope="module")
def eqx():
    return pytest.importorskip("equinox")


def _eqx_reference(cells, x, length, state):
    """One example through a lax.scan over eqx.nn.LSTMCell per layer and direction, padding done here."""
    inp, finals = x, []
    for l, layer in enumerate(cells):
        outs, fin = [], []
        for k, cell in enumerate(layer):

            def step(s, tx, cell=cell):
                t, x_t = tx
                new = cell(x_t, s)  # equinox's state is (h, c)
                keep = t < length
                s = jax.tree.map(lambda n, o: jnp.where(keep, n, o), new, s)
                return s, jnp.where(keep, new[0], jnp.zeros_like(new[0]))

            s_T, hs = jax.lax.scan(step, (state[l][k].h, state[l][k].c), (jnp.arange(T), inp), reverse=k == 1)
            outs.append(hs)
            fin.append(LSTMState(*s_T))
        inp = jnp.concatenate(outs, axis=-1)
        finals.append(tuple(fin))
    return inp, tuple(finals)


@pytest.mark.parametrize("sizes, bidirectional, dtype", CONFIGS, ids=CONFIG_IDS)
def test_eqx_matches_scanned_cell(eqx, sizes, bidirectional, dtype):
    from jax_lstm.eqx import LSTM

    keys = iter(jax.random.split(jax.random.PRNGKey(4), 8))
    n_dir, cells, d = (2 if bidirectional else 1), [], D
    for h in sizes:
        cells.append(tuple(eqx.nn.LSTMCell(d, h, dtype=dtype, key=next(keys)) for _ in range(n_dir)))
        d = n_dir * h
    cells = tuple(cells)
    stack = tuple(tuple(from_equinox(c) for c in layer) for layer in cells)
    model = LSTM.from_params(stack)
    assert rel_err(model.to_params(), stack) == 0.0
    xs, carry, ct_y, ct_carry = _problem(sizes, bidirectional, dtype)
    lengths = jnp.asarray(LENGTHS)

    params, static = eqx.partition(model, eqx.is_inexact_array)  # `inference` is a Python bool leaf

    def ours(params, xs, state):
        model = eqx.combine(params, static)
        run = lambda x, n, s: model(x, _single(s, sizes, bidirectional), seq_length=n)  # noqa: E731
        y, s = jax.vmap(run)(xs, lengths, state)
        return y, _nested(s)

    def theirs(cells, xs, state):
        return jax.vmap(lambda x, n, s: _eqx_reference(cells, x, n, s))(xs, lengths, state)

    y, c, g = _vjp(ours, params, xs, carry, (ct_y, ct_carry))
    y_r, c_r, g_r = _vjp(theirs, cells, xs, carry, (ct_y, ct_carry))
    g_stack_r = tuple(tuple(from_equinox(c) for c in layer) for layer in g_r[0])
    _check_against(dtype, (y, c, g), (y_r, c_r, g_r), g[0].to_params(), g_stack_r)


def test_eqx_train_step_dropout_and_round_trip(eqx):
    from jax_lstm.eqx import LSTM

    k_lstm, k_head = jax.random.split(jax.random.PRNGKey(0))

    class Model(eqx.Module):  # features -> LSTM -> dense, one example
        lstm: LSTM
        head: eqx.nn.Linear

        def __call__(self, x, n, *, key=None):
            hs, _ = self.lstm(x, seq_length=n, key=key)
            return jax.vmap(self.head)(hs)

    lstm = LSTM(D, (5, 4), dropout=0.2, recurrent_dropout=0.2, dtype=jnp.float32, key=k_lstm)
    model = Model(lstm, eqx.nn.Linear(4, 2, key=k_head))
    x, y = _regression()
    lengths = jnp.asarray(LENGTHS)
    tx = optax.adam(0.05)
    opt_state = tx.init(eqx.filter(model, eqx.is_array))

    def loss(model, key):
        keys = None if key is None else jax.random.split(key, B)
        return jnp.mean((jax.vmap(model)(x, lengths, key=keys) - y) ** 2)

    @eqx.filter_jit
    def step(model, opt_state, key):
        value, grads = eqx.filter_value_and_grad(loss)(model, key)
        updates, opt_state = tx.update(grads, opt_state, eqx.filter(model, eqx.is_array))
        return eqx.apply_updates(model, updates), opt_state, value

    eval_loss = eqx.filter_jit(lambda m: loss(eqx.nn.inference_mode(m), None))
    before = float(eval_loss(model))
    m = model
    for i in range(6):
        m, opt_state, value = step(m, opt_state, jax.random.PRNGKey(i))
        assert np.isfinite(float(value))
    after = float(eval_loss(m))
    assert after < 0.9 * before, (before, after)
    assert rel_err(m.lstm.to_params(), lstm.to_params()) > 0

    # dropout: off in inference mode (= a dropout-free model), reproducible for a key, different for another
    x0 = x[0]
    fwd = eqx.filter_jit(lambda m, key=None, inference=None: m(x0, key=key, inference=inference)[0])
    ref = fwd(LSTM.from_params(lstm.to_params()))
    assert np.array_equal(fwd(eqx.nn.inference_mode(lstm)), ref)
    assert np.array_equal(fwd(lstm, inference=True), ref)
    run = lambda k: fwd(lstm, jax.random.PRNGKey(k))  # noqa: E731
    assert np.array_equal(run(1), run(1))
    assert not np.allclose(run(1), run(2))
    assert not np.allclose(run(1), ref)
    assert LSTM.from_params(lstm.to_params(), dropout=0.5).dropout == 0.5
    assert (lstm.input_size, lstm.hidden_sizes, lstm.bidirectional) == (D, (5, 4), False)


def test_eqx_errors(eqx):
    from jax_lstm.eqx import LSTM

    model = LSTM(D, 5, key=jax.random.PRNGKey(0))
    x, _ = _regression()
    with pytest.raises(ValueError, match=r"expected \(T, D\) = \(T, 4\): one example \(use jax.vmap"):
        model(x)
    with pytest.raises(ValueError, match="seq_length must be a scalar"):
        model(x[0], seq_length=jnp.array([3]))
    with pytest.raises(ValueError, match=r"mask has shape \(5,\), expected \(T,\)"):
        model(x[0], mask=jnp.ones((5,), bool))
    h = jnp.zeros((5,))
    with pytest.raises(TypeError, match=r"read \(h, c\) as eqx.nn.LSTMCell"):
        model(x[0], (h, h, h))
    with pytest.raises(ValueError, match="needs a key"):
        LSTM(D, 5, recurrent_dropout=0.3, key=jax.random.PRNGKey(0))(x[0])
    with pytest.raises(ValueError, match="num_layers=3"):
        LSTM(D, (5, 4), num_layers=3, key=jax.random.PRNGKey(0))


# --------------------------------------------------------------------------- Flax drop-in: carries, arguments, step


def _arr(seed, *shape, dtype="float64"):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), dtype)


def test_flax_carries_are_read_by_meaning(nnx):
    from jax_lstm.nnx import LSTM, LSTMCarry

    model = LSTM(D, 5, return_carry=True, rngs=nnx.Rngs(0))
    xs, h0, c0 = _arr(0, B, T, D), _arr(1, B, 5), _arr(2, B, 5)
    carry, ys = model(xs, initial_carry=(c0, h0))  # Flax's order
    assert isinstance(carry, LSTMCarry)
    c, h = carry  # unpacks as Flax's carry
    assert c is carry.c and h is carry.h and carry.state == LSTMState(h, c)
    assert rel_err(h, ys[:, -1]) == 0.0
    for same in (LSTMState(h=h0, c=c0), LSTMCarry(c=c0, h=h0), ((LSTMState(h0, c0),),), carry._replace(c=c0, h=h0)):
        carry_2, ys_2 = model(xs, initial_carry=same)
        assert rel_err(ys_2, ys) == 0.0 and rel_err(carry_2, carry) == 0.0
    assert rel_err(model(xs, initial_carry=(h0, c0))[1], ys) > 1e-3  # a plain pair is (c, h), never (h, c)

    # stacks: one Flax-style entry per layer; the stack's nesting of LSTMState reads the same
    states = [(LSTMState(_arr(3 + l, B, 5), _arr(5 + l, B, 5)),) for l in range(2)]
    two = LSTM(D, 5, num_layers=2, return_carry=True, rngs=nnx.Rngs(1))
    carry, ys = two(xs, initial_carry=tuple((s.c, s.h) for (s,) in states))
    assert len(carry) == 2 and all(isinstance(k, LSTMCarry) for k in carry)
    carry_2, ys_2 = two(xs, initial_carry=tuple(states))
    assert rel_err(ys_2, ys) == 0.0 and rel_err(carry_2, carry) == 0.0
    bi = LSTM(D, 5, bidirectional=True, return_carry=True, rngs=nnx.Rngs(2))
    fwd, bwd = states[0][0], states[1][0]
    carry, ys = bi(xs, initial_carry=((fwd.c, fwd.h), (bwd.c, bwd.h)))  # nnx.Bidirectional's (forward, backward)
    (c_f, h_f), (c_b, h_b) = carry
    assert rel_err(h_f, ys[:, -1, :5]) == 0.0 and rel_err(h_b, ys[:, 0, 5:]) == 0.0
    carry_2, ys_2 = bi(xs, initial_carry=((fwd, bwd),))
    assert rel_err(ys_2, ys) == 0.0 and rel_err(carry_2, carry) == 0.0


def test_flax_call_options_batch_axes_and_dtypes(nnx):
    from jax_lstm.nnx import LSTM

    model = LSTM(D, 5, time_major=True, return_carry=True, rngs=nnx.Rngs(0))
    xs = _arr(0, 2, 3, T, D)  # two batch axes
    lengths = jnp.asarray([[6, 4, 1], [0, 2, 5]])
    mask = jnp.asarray(np.random.default_rng(1).random((2, 3, T)) < 0.8)
    resets = jnp.asarray(np.random.default_rng(2).random((2, 3, T)) < 0.2)
    carry, ys = model(xs, seq_lengths=lengths, mask=mask, resets=resets, time_major=False)
    assert ys.shape == (2, 3, T, 5) and carry.h.shape == (2, 3, 5)
    flat = lambda a: a.reshape(6, *a.shape[2:])  # noqa: E731
    carry_f, ys_f = model(
        flat(xs), seq_lengths=lengths.reshape(6), mask=flat(mask), resets=flat(resets), time_major=False
    )
    assert rel_err(ys, ys_f.reshape(ys.shape)) == 0.0 and rel_err(carry.c.reshape(6, 5), carry_f.c) == 0.0
    ys_tm = model(
        jnp.moveaxis(xs, 2, 0),
        seq_lengths=lengths,
        mask=jnp.moveaxis(mask, 2, 0),
        resets=jnp.moveaxis(resets, 2, 0),
        return_carry=False,
    )  # the constructor's time_major
    assert rel_err(jnp.moveaxis(ys_tm, 0, 2), ys) == 0.0
    one = model(xs[0, 0], return_carry=False)  # (T, D) unbatched
    assert one.shape == (T, 5) and rel_err(one, model(xs[0, :1], time_major=False)[1][0]) == 0.0
    ints = jnp.asarray(np.random.default_rng(3).integers(-2, 3, (B, T, D)), jnp.int32)  # promoted, as in Flax
    y_int = model(ints, time_major=False, return_carry=False)
    assert y_int.dtype == jnp.float32
    assert rel_err(y_int, model(ints.astype(jnp.float32), time_major=False, return_carry=False)) == 0.0
    half = LSTM.from_params(model.to_params(), dtype=jnp.bfloat16)
    assert half(ints).dtype == jnp.bfloat16


def test_flax_initializers_follow_flax(nnx, nn):
    from jax_lstm import linen as jl
    from jax_lstm.nnx import LSTM

    def arange(key, shape, dtype):  # gate blocks are told apart by their values
        return jnp.arange(np.prod(shape), dtype=dtype).reshape(shape) / 100

    inits = dict(kernel_init=arange, recurrent_kernel_init=arange, bias_init=arange)
    ours = LSTM(D, 5, rngs=nnx.Rngs(0), **inits).to_params()[0][0]
    theirs = from_flax(nnx.state(nnx.OptimizedLSTMCell(D, 5, rngs=nnx.Rngs(0), **inits)))
    assert rel_err(ours, theirs) == 0.0  # (D, 4H) in Flax's gate order; bias_init replaces forget_bias
    xs = _arr(0, B, T, D, dtype="float32")
    v = jl.LSTM(5, **inits).init(jax.random.PRNGKey(0), xs)
    cell = nn.OptimizedLSTMCell(5, **inits)
    v_r = cell.init(jax.random.PRNGKey(0), cell.initialize_carry(jax.random.PRNGKey(0), xs[:, 0].shape), xs[:, 0])
    assert rel_err(jl.from_variables(v)[0][0], from_flax(v_r)) == 0.0  # per gate, as Linen's cell
    # carry_init: the carry when none is given, as Flax's initialize_carry
    ones = LSTM(D, 5, carry_init=nnx.initializers.ones, return_carry=True, rngs=nnx.Rngs(0))
    c, h = ones.initialize_carry((B, D))
    assert jnp.all(c == 1.0) and jnp.all(h == 1.0) and c.dtype == jnp.float32
    assert rel_err(ones(xs)[1], ones(xs, initial_carry=(c, h))[1]) == 0.0


def test_flax_step_matches_the_sequence_call(nnx, nn):
    from jax_lstm import linen as jl
    from jax_lstm.nnx import LSTM

    xs = _arr(0, B, T, D)
    model = LSTM(D, (5, 3), return_carry=True, rngs=nnx.Rngs(0))
    carry, ys = model(xs)
    step_carry = model.initialize_carry(xs[:, 0].shape)
    assert jax.tree.map(jnp.shape, step_carry) == (((B, 5), (B, 5)), ((B, 3), (B, 3)))
    step = nnx.jit(lambda m, c, x: m.step(c, x))
    for t in range(T):
        step_carry, y = step(model, step_carry, xs[:, t])
        assert rel_err(y, ys[:, t]) < 1e-12
    assert rel_err(step_carry, carry) < 1e-12
    module = jl.LSTM((5, 3), return_carry=True)
    variables = jl.to_variables(model.to_params())
    step_carry = module.initialize_carry(jax.random.PRNGKey(0), xs[:, 0].shape)
    linen_step = jax.jit(lambda v, c, x: module.apply(v, c, x, method="step"))
    for t in range(T):
        step_carry, y = linen_step(variables, step_carry, xs[:, t])
        assert rel_err(y, ys[:, t]) < 1e-12
    assert rel_err(step_carry, carry) < 1e-12
    with pytest.raises(ValueError, match="step is for unidirectional modules"):
        LSTM(D, 5, bidirectional=True, rngs=nnx.Rngs(0)).step(None, xs[:, 0])


def test_flax_merge_fn_and_reverse(nnx):
    from jax_lstm.layers import lstm_stack
    from jax_lstm.nnx import LSTM

    xs, lengths = _arr(0, B, T, D), jnp.asarray(LENGTHS)
    with pytest.raises(ValueError, match="reverse=True is for unidirectional"):
        LSTM(D, 5, bidirectional=True, reverse=True, rngs=nnx.Rngs(0))
    model = LSTM(D, (5, 3), bidirectional=True, merge_fn=lambda f, b: f + b, rngs=nnx.Rngs(0))
    uni = LSTM(D, 5, rngs=nnx.Rngs(0))
    from jax_lstm import lstm

    @nnx.jit
    def run(model, uni):
        ys = model(xs, seq_lengths=lengths)
        ys_r, _ = lstm_stack(model.to_params(), xs, seq_lengths=lengths, time_major=False)
        want, _ = lstm(uni.to_params()[0][0], xs, seq_lengths=lengths, reverse=True, time_major=False)
        kept = uni(xs, seq_lengths=lengths, reverse=True, keep_order=True)
        flags = dict(seq_lengths=lengths, mask=mask, resets=resets)  # flipped with the inputs
        want_m, _ = lstm(uni.to_params()[0][0], xs, **flags, reverse=True, time_major=False)
        kept_m = uni(xs, **flags, reverse=True, keep_order=True)
        return ys, ys_r, want, kept, uni(xs, seq_lengths=lengths, reverse=True), want_m, kept_m

    mask = jnp.asarray(np.random.default_rng(1).random((B, T)) < 0.7)
    resets = jnp.asarray(np.random.default_rng(2).random((B, T)) < 0.3)
    ys, ys_r, want, kept, processing, want_m, kept_m = run(model, uni)
    assert rel_err(kept_m, want_m) < 1e-12
    assert ys.shape == (B, T, 3) and rel_err(ys, ys_r[..., :3] + ys_r[..., 3:]) < 1e-12
    # reverse: processing order (Flax's), keep_order: the inputs' order (= lstm's reverse=True)
    assert rel_err(kept, want) < 1e-12
    for b, n in enumerate(LENGTHS):
        assert rel_err(processing[b, :n], want[b, :n][::-1]) < 1e-12
        assert np.all(np.asarray(processing[b, n:]) == 0.0)


def test_flax_resets_restore_reset_carry_against_the_oracle(nnx):
    """Resets go back to reset_carry (zeros when None), per row, with batch axes, reverse and a bidirectional layer."""
    from numpy_oracle import lstm_np

    from jax_lstm.nnx import LSTM

    rng = np.random.default_rng(0)
    xs = _arr(0, 2, 2, T, D)  # batch axes (2, 2)
    lengths = np.array([[6, 4], [1, 5]])
    resets = rng.random((2, 2, T)) < 0.3
    init, reset = [(_arr(1 + 2 * k, 2, 2, 5), _arr(2 + 2 * k, 2, 2, 5)) for k in range(2)]  # Flax's (c, h)
    flat = lambda a: np.asarray(a).reshape(4, *np.shape(a)[2:])  # noqa: E731
    kw = dict(seq_lengths=flat(lengths), resets=flat(resets), time_major=False)

    uni = LSTM(D, 5, reverse=True, keep_order=True, return_carry=True, rngs=nnx.Rngs(0))
    (p,) = uni.to_params()[0]
    for rc in (reset, None):
        carry, ys = uni(
            xs, initial_carry=init, seq_lengths=jnp.asarray(lengths), resets=jnp.asarray(resets), reset_carry=rc
        )
        hr, cr = (None, None) if rc is None else (flat(rc[1]), flat(rc[0]))
        hs, h, c = lstm_np(*p, flat(xs), flat(init[1]), flat(init[0]), hr=hr, cr=cr, reverse=True, **kw)
        assert rel_err(ys.reshape(4, T, 5), hs) < 1e-12
        assert rel_err(carry.h.reshape(4, 5), h) < 1e-12 and rel_err(carry.c.reshape(4, 5), c) < 1e-12

    bi = LSTM(D, 5, bidirectional=True, return_carry=True, rngs=nnx.Rngs(1))
    carry, ys = bi(
        xs,
        initial_carry=(init, init),
        seq_lengths=jnp.asarray(lengths),
        resets=jnp.asarray(resets),
        reset_carry=(reset, None),
    )  # forward resets to `reset`, backward to zeros
    for k, (p, rc) in enumerate(zip(bi.to_params()[0], (reset, None), strict=True)):
        hr, cr = (None, None) if rc is None else (flat(rc[1]), flat(rc[0]))
        hs, h, c = lstm_np(*p, flat(xs), flat(init[1]), flat(init[0]), hr=hr, cr=cr, reverse=k == 1, **kw)
        assert rel_err(ys.reshape(4, T, 10)[..., 5 * k : 5 * k + 5], hs) < 1e-12
        assert rel_err(carry[k].h.reshape(4, 5), h) < 1e-12 and rel_err(carry[k].c.reshape(4, 5), c) < 1e-12


def test_linen_reverse_gradients_match_flax(nn):
    """Values and gradients of reverse=True (both orders) against nn.RNN(reverse=True), converted weights."""
    from jax_lstm.linen import LSTM, to_variables

    xs, lengths = _arr(0, B, T, D), jnp.asarray(LENGTHS)
    valid = _valid()[..., None]
    cell = nn.OptimizedLSTMCell(5, param_dtype=jnp.float64)
    v_r = _perturb(cell.init(jax.random.PRNGKey(1), cell.initialize_carry(jax.random.PRNGKey(0), (B, D)), xs[:, 0]), 2)
    v = to_variables(((from_flax(v_r),),))
    ct = _arr(3, B, T, 5) * valid
    for keep_order in (False, True):
        ours = LSTM(5, reverse=True, keep_order=keep_order)
        theirs = nn.RNN(nn.OptimizedLSTMCell(5, param_dtype=jnp.float64), reverse=True, keep_order=keep_order)

        @jax.jit
        def grads(v, v_r, xs, ours=ours, theirs=theirs):
            y, pull = jax.vjp(lambda v, x: ours.apply(v, x, seq_lengths=lengths), v, xs)
            y_r, pull_r = jax.vjp(
                lambda v, x: theirs.apply({"params": {"cell": v["params"]}}, x, seq_lengths=lengths), v_r, xs
            )
            return y, y_r, pull(ct), pull_r(ct)

        y, y_r, (g_v, g_x), (g_vr, g_xr) = grads(v, v_r, xs)
        assert rel_err(y, y_r * valid) < 1e-10
        assert rel_err(g_x, g_xr) < 1e-10
        assert rel_err(g_v["params"]["stack"][0][0], from_flax(g_vr)) < 1e-10


# --------------------------------------------------------------------------- Equinox: (h, c) tuples, step, resets


def test_eqx_plain_tuples_step_and_resets(eqx):
    from jax_lstm.eqx import LSTM

    model = LSTM(D, 5, key=jax.random.PRNGKey(0))
    xs, h0, c0 = _arr(0, T, D), _arr(1, 5), _arr(2, 5)
    ys, state = model(xs, (h0, c0))  # Equinox's own (h, c)
    assert isinstance(state, LSTMState)
    ys_2, state_2 = model(xs, LSTMState(h=h0, c=c0))
    assert rel_err(ys, ys_2) == 0.0 and rel_err(state, state_2) == 0.0
    s = (h0, c0)
    for t in range(T):  # as state = cell(x_t, state)
        s = model.step(xs[t], s)
        assert rel_err(s.h, ys[t]) < 1e-12
    assert rel_err(s, state) < 1e-12
    cell = to_equinox(model.to_params()[0][0])
    assert rel_err(model.step(xs[0], (h0, c0)), LSTMState(*cell(xs[0], (h0, c0)))) < 1e-12
    two = LSTM(D, (5, 3), key=jax.random.PRNGKey(1))
    plain = (((_arr(3, 5), _arr(4, 5)),), ((_arr(5, 3), _arr(6, 3)),))
    named = tuple((LSTMState(*layer[0]),) for layer in plain)
    assert rel_err(two(xs, plain), two(xs, named)) == 0.0


def test_eqx_resets_to_reset_state_per_example(eqx):
    """Each example resets to its own reset_state (zeros by default), against the NumPy oracle."""
    from numpy_oracle import lstm_np

    from jax_lstm.eqx import LSTM

    model = LSTM(D, 5, key=jax.random.PRNGKey(0))
    xs, lengths = _arr(0, B, T, D), jnp.asarray(LENGTHS)
    init = (_arr(1, B, 5), _arr(2, B, 5))  # Equinox's (h, c)
    reset = LSTMState(_arr(3, B, 5), _arr(4, B, 5))
    resets = jnp.asarray(np.random.default_rng(5).random((B, T)) < 0.3)

    @jax.jit
    def run(xs, init, resets, reset):
        with_state = jax.vmap(lambda x, n, s, r, rs: model(x, s, seq_length=n, resets=r, reset_state=rs))
        zeros = jax.vmap(lambda x, n, s, r: model(x, s, seq_length=n, resets=r))
        return with_state(xs, lengths, init, resets, reset), zeros(xs, lengths, init, resets)

    (ys, final), (ys_z, final_z) = run(xs, init, resets, reset)
    p = model.to_params()[0][0]
    kw = dict(seq_lengths=LENGTHS, resets=np.asarray(resets), time_major=False)
    hs, h, c = lstm_np(*p, xs, *init, hr=reset.h, cr=reset.c, **kw)
    assert rel_err(ys, hs) < 1e-12 and rel_err(final, LSTMState(h, c)) < 1e-12
    hs, h, c = lstm_np(*p, xs, *init, **kw)
    assert rel_err(ys_z, hs) < 1e-12 and rel_err(final_z, LSTMState(h, c)) < 1e-12


# --------------------------------------------------------------------------- optional dependencies


def test_modules_name_their_extra_when_the_library_is_missing():
    code = textwrap.dedent(
        """
        import sys
        sys.modules["flax"] = None       # as if flax and equinox were not installed
        sys.modules["equinox"] = None
        import jax_lstm, jax_lstm.interop, jax_lstm.layers  # the core needs neither
        for name in ("jax_lstm.nnx", "jax_lstm.linen", "jax_lstm.eqx"):
            try:
                __import__(name)
                print(name, "| imported")
            except ImportError as e:
                print(name, "|", e)
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert lines == [
        "jax_lstm.nnx | jax_lstm.nnx needs flax: pip install 'jax_lstm[flax]'",
        "jax_lstm.linen | jax_lstm.linen needs flax: pip install 'jax_lstm[flax]'",
        "jax_lstm.eqx | jax_lstm.eqx needs equinox: pip install 'jax_lstm[equinox]'",
    ]


def test_model_benchmark_rows(nn):
    from jax_lstm import bench

    report = bench.bench_models([(4, 2, 3, 4)], libraries=("linen",), warmup=1, reps=2)
    (result,) = report["results"]
    (rec,) = result["records"]
    assert rec["library"] == "linen" and rec["reps"] == 2
    assert rec["theirs_ms"] > 0 and rec["ours_ms"] > 0
    assert rec["speedup"] == pytest.approx(rec["theirs_ms"] / rec["ours_ms"])
    assert rec["memory_ratio"] == pytest.approx(rec["ours_temp_bytes"] / rec["theirs_temp_bytes"])
    assert report["geomean"]["linen"]["speedup"] == pytest.approx(rec["speedup"])
    table = bench.render_models_table(report)
    assert "nn.RNN(OptimizedLSTMCell)" in table and "geometric means" in table
