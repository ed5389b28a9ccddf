"""Deep and bidirectional stacks: structure, values, dropout, gate traces and gradients against lstm_ref."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_lstm import LSTMParams, LSTMState, lstm, lstm_trace
from jax_lstm.gradcheck import rel_err
from jax_lstm.layers import gate_trace_stack, init_stack, lstm_stack

T, B, D = 5, 3, 4
SIZES = (3, 5)  # layers of different sizes on purpose


def _rand_like(seed, tree):
    """A random pytree shaped like ``tree`` (NumPy's generator: no per-shape compilation)."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda a: jnp.asarray(rng.standard_normal(a.shape), a.dtype), tree)


def _problem(seed, sizes=SIZES, bidirectional=False, dtype=jnp.float64, with_state=True):
    """Random stack weights (scale ~0.5, so every gate is exercised), xs (T, B, D) and states0."""
    rng = np.random.default_rng(seed)
    n_dir = 2 if bidirectional else 1
    normal = lambda *shape: jnp.asarray(0.5 * rng.standard_normal(shape), dtype)  # noqa: E731
    params, states0, d = [], [], D
    for h in sizes:
        params.append(tuple(LSTMParams(normal(h, 4 * h), normal(d, 4 * h), normal(4 * h)) for _ in range(n_dir)))
        states0.append(tuple(LSTMState(normal(B, h), normal(B, h)) for _ in range(n_dir)))
        d = n_dir * h
    xs = jnp.asarray(rng.standard_normal((T, B, D)), dtype)
    return tuple(params), xs, (tuple(states0) if with_state else None)


# jit once per structure instead of compiling every scan eagerly
stack = jax.jit(lstm_stack, static_argnames=("dropout", "unroll", "impl"))
LENGTHS = jnp.array([T, 2, 0], jnp.int32)  # a full row, a short row, an empty row


def test_init_stack_shapes_and_dtypes():
    params = init_stack(jax.random.PRNGKey(0), D, (3, 5), bidirectional=True, dtype=jnp.float32)
    assert len(params) == 2 and all(len(layer) == 2 for layer in params)
    want = [(D, 3), (6, 5)]  # next input size is 2 * H
    for layer, (d, h) in zip(params, want, strict=True):
        for p in layer:
            assert isinstance(p, LSTMParams)
            assert p.W.shape == (h, 4 * h) and p.U.shape == (d, 4 * h) and p.b.shape == (4 * h,)
            assert p.W.dtype == p.U.dtype == p.b.dtype == jnp.float32
            np.testing.assert_array_equal(p.b[:h], 1.0)  # forget bias
        assert not np.array_equal(layer[0].U, layer[1].U)  # directions get their own keys
    uni = init_stack(jax.random.PRNGKey(0), D, [4], forget_bias=0.0, dtype=jnp.float64)  # a list, eagerly
    assert len(uni) == 1 and len(uni[0]) == 1 and uni[0][0].W.dtype == jnp.float64
    np.testing.assert_array_equal(uni[0][0].b, 0.0)


@functools.partial(jax.jit, static_argnums=(4,))
def _compose(params, xs, states0, seq_lengths, dropout=0.0, key=None):
    """The documented definition of a stack, written out with ``lstm`` calls."""
    x, finals = xs, []
    keys = jax.random.split(key, len(params) - 1) if dropout > 0 else None
    for l, layer in enumerate(params):
        outs, states = [], []
        for k, p in enumerate(layer):
            s0 = None if states0 is None else states0[l][k]
            hs, fin = lstm(p, x, s0, seq_lengths=seq_lengths, reverse=k == 1)
            outs.append(hs)
            states.append(fin)
        finals.append(tuple(states))
        x = jnp.concatenate(outs, axis=-1)
        if dropout > 0 and l < len(params) - 1:
            keep = jax.random.bernoulli(keys[l], 1.0 - dropout, x.shape)
            x = jnp.where(keep, x / (1.0 - dropout), 0.0)
    return x, tuple(finals)


@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("with_lengths", [False, True])
def test_values_match_composition_and_ref(bidirectional, with_lengths):
    params, xs, s0 = _problem(1, bidirectional=bidirectional)
    lengths = LENGTHS if with_lengths else None
    hs, finals = stack(params, xs, s0, seq_lengths=lengths)
    n_dir = 2 if bidirectional else 1
    assert hs.shape == (T, B, n_dir * SIZES[-1])
    assert len(finals) == len(SIZES) and all(len(f) == n_dir for f in finals)
    for f, h in zip(finals, SIZES, strict=True):
        for s in f:
            assert isinstance(s, LSTMState) and s.h.shape == s.c.shape == (B, h)
    want = _compose(params, xs, s0, lengths)
    assert rel_err((hs, finals), want) < 1e-14
    ref = stack(params, xs, s0, seq_lengths=lengths, impl="autodiff")
    assert rel_err((hs, finals), ref) < 1e-13
    if with_lengths:  # padding stays zero through the stack; an empty row keeps its initial state
        np.testing.assert_array_equal(hs[2:, 1], 0.0)
        np.testing.assert_array_equal(hs[:, 2], 0.0)
        for l in range(len(SIZES)):
            for k in range(n_dir):
                np.testing.assert_array_equal(finals[l][k].h[2], s0[l][k].h[2])


def test_bidirectional_is_forward_then_reverse():
    """The reverse half of the output is the reverse lstm run; its final state is the one after step 0."""
    params, xs, _ = _problem(2, sizes=(4,), bidirectional=True, with_state=False)
    hs, ((fwd, rev),) = stack(params, xs, seq_lengths=LENGTHS)
    hs_f, fin_f = lstm(params[0][0], xs, seq_lengths=LENGTHS)
    hs_r, fin_r = lstm(params[0][1], xs, seq_lengths=LENGTHS, reverse=True)
    np.testing.assert_array_equal(hs[..., :4], hs_f)
    np.testing.assert_array_equal(hs[..., 4:], hs_r)
    np.testing.assert_array_equal(rev.h[:2], hs_r[0, :2])  # state after step 0
    np.testing.assert_array_equal(fwd.h[1], hs_f[1, 1])  # state after the last valid step (length 2)
    assert rel_err((fwd, rev), (fin_f, fin_r)) < 1e-14


def test_states0_none_per_layer_means_zeros():
    params, xs, s0 = _problem(3, bidirectional=True)
    zeros = jax.tree.map(jnp.zeros_like, s0)
    partial = (None, s0[1])
    want = stack(params, xs, (zeros[0], s0[1]))
    assert rel_err(stack(params, xs, partial), want) < 1e-14
    assert rel_err(stack(params, xs, None), stack(params, xs, zeros)) < 1e-14


def _vjp_pair(params, xs, s0, seed, **kw):
    """(outputs, VJP) of the manual and the ref stack for one random cotangent on every output."""

    def run(impl, p, x, s, ct):
        y, vjp = jax.vjp(lambda p_, x_, s_: lstm_stack(p_, x_, s_, impl=impl, **kw), p, x, s)
        return y, vjp(ct)

    ct = _rand_like(seed, jax.eval_shape(lambda: stack(params, xs, s0, **kw)))
    return [jax.jit(functools.partial(run, impl))(params, xs, s0, ct) for impl in ("manual", "autodiff")]


@pytest.mark.parametrize(
    "bidirectional,with_lengths,dropout",
    [(False, True, 0.3), (True, False, 0.0), (True, True, 0.3)],
)
def test_gradients_match_ref_stack(bidirectional, with_lengths, dropout):
    """VJP w.r.t. every weight, xs and every initial state, random cotangents on hs and all final states."""
    params, xs, s0 = _problem(4, bidirectional=bidirectional)
    kw = dict(seq_lengths=LENGTHS if with_lengths else None, dropout=dropout, key=jax.random.PRNGKey(7))
    (y, g), (y_ref, g_ref) = _vjp_pair(params, xs, s0, 11, **kw)
    assert rel_err(y, y_ref) < 1e-13
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref), strict=True):
        assert rel_err(a, b) < 1e-10
    # every input gets a non-trivial gradient
    assert all(float(jnp.max(jnp.abs(a))) > 0 for a in jax.tree.leaves(g[0]) + jax.tree.leaves(g[2]))


def test_gradients_float32_and_jit():
    params, xs, s0 = _problem(5, bidirectional=True, dtype=jnp.float32)

    def loss(impl):
        def f(p, x, s):
            hs, fin = lstm_stack(p, x, s, seq_lengths=LENGTHS, impl=impl)
            w = _rand_like(3, (hs, fin))
            return sum(jnp.vdot(a, b) for a, b in zip(jax.tree.leaves((hs, fin)), jax.tree.leaves(w), strict=True))

        return jax.jit(jax.grad(f, argnums=(0, 1, 2)))

    g, g_ref = loss("manual")(params, xs, s0), loss("autodiff")(params, xs, s0)
    assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(g))
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref), strict=True):
        assert rel_err(a, b) < 1e-5


def test_dropout_between_layers_only():
    params, xs, s0 = _problem(6)
    key = jax.random.PRNGKey(1)
    hs0, _ = stack(params, xs, s0)
    hs1, f1 = stack(params, xs, s0, dropout=0.5, key=key)
    # dropout changes what the second layer sees, hence its output, but not the first layer's state
    assert not np.allclose(hs0, hs1)
    np.testing.assert_array_equal(f1[0][0].h, stack(params, xs, s0)[1][0][0].h)
    # never on the last output: no exact zeros even at a high rate
    hs_high, _ = stack(params, xs, s0, dropout=0.9, key=key)
    assert np.all(np.asarray(hs_high) != 0.0)
    # the masks are those documented: one bernoulli(1 - p) per layer below the top, from split(key, L - 1)
    assert rel_err(stack(params, xs, s0, dropout=0.5, key=key), _compose(params, xs, s0, None, 0.5, key)) < 1e-14
    # a fixed key reproduces, another key differs; a single layer has nothing to drop
    np.testing.assert_array_equal(hs1, stack(params, xs, s0, dropout=0.5, key=key)[0])
    assert not np.allclose(hs1, stack(params, xs, s0, dropout=0.5, key=jax.random.PRNGKey(2))[0])
    one, x1, _ = _problem(6, sizes=(3,), with_state=False)
    np.testing.assert_array_equal(stack(one, x1, dropout=0.5, key=key)[0], stack(one, x1)[0])
    # evaluation: dropout=0 needs no key, and a key is then ignored
    np.testing.assert_array_equal(hs0, stack(params, xs, s0, dropout=0.0, key=key)[0])


def test_dropout_rate_and_scale():
    """The second layer sees the first layer's output with a fraction p zeroed and the rest scaled by 1/(1-p)."""
    params, xs, _ = _problem(8, sizes=(5, 2), with_state=False)
    key, p = jax.random.PRNGKey(3), 0.4
    y1, _ = stack(params[:1], xs)
    keep = jax.random.bernoulli(jax.random.split(key, 1)[0], 1.0 - p, y1.shape)
    dropped = jnp.where(keep, y1 / (1.0 - p), 0.0)
    frac = float(jnp.mean(dropped == 0.0))
    assert abs(frac - p) < 0.2  # 75 elements; excludes "no dropout" and "all dropped"
    kept = np.asarray(keep)
    np.testing.assert_allclose(np.asarray(dropped)[kept], np.asarray(y1)[kept] / (1 - p), rtol=1e-14)
    assert rel_err(stack(params, xs, dropout=p, key=key)[0], lstm(params[1][0], dropped)[0]) < 1e-14


def test_gate_trace_stack():
    params, xs, s0 = _problem(9, bidirectional=True)
    traces = gate_trace_stack(params, xs, s0, seq_lengths=LENGTHS)
    hs, _ = stack(params, xs, s0, seq_lengths=LENGTHS)
    assert len(traces) == len(SIZES) and all(len(t) == 2 for t in traces)
    for layer, h in zip(traces, SIZES, strict=True):
        for tr in layer:
            assert all(a.shape == (T, B, h) for a in tr)
            for gate in (tr.f, tr.i, tr.o):
                assert float(jnp.min(gate)) >= 0.0 and float(jnp.max(gate)) <= 1.0
    np.testing.assert_allclose(jnp.concatenate([t.h for t in traces[-1]], -1), hs, rtol=1e-13, atol=1e-14)
    first = lstm_trace(params[0][1], xs, s0[0][1], seq_lengths=LENGTHS, reverse=True)
    assert rel_err(traces[0][1], first) < 1e-14


def test_vmap_over_a_leading_axis():
    params, xs, s0 = _problem(10, bidirectional=True, with_state=False)
    xb = jnp.stack([xs, 2.0 * xs])
    hs_b, _ = jax.vmap(lambda x: stack(params, x, seq_lengths=LENGTHS))(xb)
    np.testing.assert_allclose(hs_b[1], stack(params, 2.0 * xs, seq_lengths=LENGTHS)[0], rtol=1e-13, atol=1e-14)


def test_bad_input_names_the_argument():
    params, xs, s0 = _problem(12, bidirectional=True)
    with pytest.raises(ValueError, match=r"params\[1\]\[0\]\.U has shape \(7, 20\).*\(6, 20\)"):
        bad = (params[0], tuple(LSTMParams(p.W, jnp.zeros((7, 20)), p.b) for p in params[1]))
        lstm_stack(bad, xs)
    with pytest.raises(ValueError, match=r"params\[0\]\[1\]\.b has shape \(5,\)"):
        lstm_stack(((params[0][0], params[0][1]._replace(b=jnp.zeros(5))), params[1]), xs)
    with pytest.raises(ValueError, match=r"params\[0\]: the two directions"):
        other = init_stack(jax.random.PRNGKey(0), D, (4,))[0][0]
        lstm_stack(((params[0][0], other), params[1]), xs)
    with pytest.raises(TypeError, match=r"params must be a non-empty tuple of layers"):
        lstm_stack(params[0][0], xs)
    with pytest.raises(TypeError, match=r"params\[0\] must be a tuple of one"):
        lstm_stack((params[0] * 2,), xs)
    with pytest.raises(ValueError, match=r"xs has shape \(5, 3, 2\), expected \(T, B, 4\)"):
        lstm_stack(params, xs[..., :2])
    with pytest.raises(ValueError, match=r"states0\[1\]\[1\]\.c has shape \(3, 4\), expected \(B, H_1\) = \(3, 5\)"):
        s_bad = (s0[0], (s0[1][0], s0[1][1]._replace(c=jnp.zeros((3, 4)))))
        lstm_stack(params, xs, s_bad)
    with pytest.raises(TypeError, match=r"states0 must be None or a tuple with one entry per layer \(2\)"):
        lstm_stack(params, xs, s0[:1])
    with pytest.raises(ValueError, match=r"seq_lengths has shape \(2,\), expected \(B,\) = \(3,\)"):
        lstm_stack(params, xs, seq_lengths=jnp.array([1, 2]))
    with pytest.raises(TypeError, match=r"seq_lengths must have an integer dtype"):
        lstm_stack(params, xs, seq_lengths=jnp.array([1.0, 2.0, 3.0]))
    with pytest.raises(ValueError, match=r"dropout=0.5 needs a PRNG key"):
        lstm_stack(params, xs, dropout=0.5)
    with pytest.raises(ValueError, match=r"dropout must be in \[0, 1\)"):
        lstm_stack(params, xs, dropout=1.0, key=jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match=r"impl must be one of \['autodiff', 'manual'\], got 'fast'"):
        lstm_stack(params, xs, impl="fast")
    with pytest.raises(ValueError, match=r"layer 0 forward \(params\[0\]\[0\]\): unroll must be a positive int"):
        lstm_stack(params, xs, unroll=0)
    with pytest.raises(ValueError, match=r"hidden_sizes\[1\] must be a positive int"):
        init_stack(jax.random.PRNGKey(0), D, (3, 0))
    with pytest.raises(TypeError, match=r"hidden_sizes must be a sequence"):
        init_stack(jax.random.PRNGKey(0), D, 3)
    # errors happen at trace time, under jit too
    with pytest.raises(ValueError, match=r"xs has shape"):
        jax.jit(lambda x: lstm_stack(params, x))(xs[..., :2])
