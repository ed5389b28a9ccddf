"""Weights from other frameworks: PyTorch (values and autograd), Keras, Flax, Haiku; round trips and errors."""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_lstm import LSTMParams, LSTMState, lstm
from jax_lstm.gradcheck import rel_err
from jax_lstm.interop import (
    from_equinox,
    from_flax,
    from_haiku,
    from_keras,
    from_torch,
    states_from_torch,
    states_to_torch,
    to_equinox,
    to_flax,
    to_haiku,
    to_keras,
    to_torch,
)
from jax_lstm.layers import init_stack, lstm_stack

T, B, D, H = 6, 3, 4, 5
LENGTHS = [T, 4, 1]  # pack_padded_sequence needs lengths >= 1
TOL = {"float32": 1e-5, "float64": 1e-10}


@pytest.fixture(scope="module")
def torch():
    return pytest.importorskip("torch")


def _np(t):
    return t.detach().cpu().numpy()


def _random_params(seed, dtype, d=D, h=H, scale=0.5):
    rng = np.random.default_rng(seed)
    return LSTMParams(*(jnp.asarray(scale * rng.standard_normal(s), dtype) for s in ((h, 4 * h), (d, 4 * h), (4 * h,))))


# --------------------------------------------------------------------------- PyTorch


def _torch_lstm(torch, num_layers, bidirectional, dtype, seed=0, **kw):
    torch.manual_seed(seed)
    m = torch.nn.LSTM(D, H, num_layers=num_layers, bidirectional=bidirectional, **kw)
    m = m.to(getattr(torch, dtype))
    with torch.no_grad():  # PyTorch's init (±1/sqrt(H)) barely exercises the gates
        for p in m.parameters():
            p.uniform_(-0.8, 0.8)
    return m


@functools.partial(jax.jit, static_argnums=(0,))
def _ours_vjp(packed, params, xs, s0, seq_lengths, cts):
    def f(p, x, s):
        return lstm_stack(p, x, s, seq_lengths=seq_lengths if packed else None)

    y, vjp = jax.vjp(f, params, xs, s0)
    return y, vjp(cts)


TORCH_CASES = [(L, bi, dt, True, 0) for L in (1, 2) for bi in (False, True) for dt in ("float32", "float64")] + [
    (2, True, "float64", False, 0)
]
# PyTorch's projection LSTM (proj_size=P, weight_hr_l{k}): 1 to 3 layers, bidirectional, packed sequences
TORCH_PROJ_CASES = [
    (1, False, "float64", True, 3),
    (2, True, "float32", True, 2),
    (3, True, "float64", True, 3),
    (3, False, "float32", False, 4),
]


@pytest.mark.parametrize("num_layers,bidirectional,dtype,packed,proj_size", TORCH_CASES + TORCH_PROJ_CASES)
def test_torch_values_and_gradients(torch, num_layers, bidirectional, dtype, packed, proj_size):
    """Outputs, final states and the gradients w.r.t. inputs, initial states and every weight vs PyTorch autograd."""
    tdtype = getattr(torch, dtype)
    n_dir = 2 if bidirectional else 1
    N = proj_size or H  # the size of h
    m = _torch_lstm(torch, num_layers, bidirectional, dtype, proj_size=proj_size)
    rng = np.random.default_rng(num_layers * 10 + bidirectional)
    x = torch.tensor(rng.standard_normal((T, B, D)), dtype=tdtype, requires_grad=True)
    h0, c0 = (torch.tensor(rng.standard_normal((num_layers * n_dir, B, n)), dtype=tdtype, requires_grad=True)
              for n in (N, H))  # fmt: skip
    d_out = rng.standard_normal((T, B, n_dir * N))
    d_h, d_c = (rng.standard_normal((num_layers * n_dir, B, n)) for n in (N, H))

    # PyTorch, with the padded outputs of pad_packed_sequence (zeros at padding, like ours)
    if packed:
        lengths = torch.tensor(LENGTHS)
        inp = torch.nn.utils.rnn.pack_padded_sequence(x, lengths, enforce_sorted=False)
    else:
        inp = x
    out, (hn, cn) = m(inp, (h0, c0))
    if packed:
        out, _ = torch.nn.utils.rnn.pad_packed_sequence(out, total_length=T)
    cot = lambda a: torch.tensor(a, dtype=tdtype)  # noqa: E731
    ((out * cot(d_out)).sum() + (hn * cot(d_h)).sum() + (cn * cot(d_c)).sum()).backward()

    # ours, through the converted weights
    params = from_torch(m.state_dict())
    assert len(params) == num_layers and all(len(layer) == n_dir for layer in params)
    assert all((p.W_proj is None) == (proj_size == 0) for layer in params for p in layer)
    assert all(a.dtype == jnp.dtype(dtype) for a in jax.tree.leaves(params))
    s0 = states_from_torch(h0, c0, bidirectional=bidirectional)
    cts = (jnp.asarray(d_out, dtype), states_from_torch(d_h, d_c, bidirectional=bidirectional, dtype=dtype))
    seq_lengths = jnp.asarray(LENGTHS, jnp.int32)
    (hs, finals), (dp, dx, ds) = _ours_vjp(packed, params, jnp.asarray(_np(x)), s0, seq_lengths, cts)

    tol = TOL[dtype]
    assert hs.dtype == jnp.dtype(dtype)
    assert rel_err(hs, _np(out)) < tol
    h_n, c_n = states_to_torch(finals)
    assert rel_err(_np(h_n), _np(hn)) < tol and rel_err(_np(c_n), _np(cn)) < tol
    assert rel_err(dx, _np(x.grad)) < tol
    dh0, dc0 = states_to_torch(ds)
    assert rel_err(_np(dh0), _np(h0.grad)) < tol and rel_err(_np(dc0), _np(c0.grad)) < tol
    grads = to_torch(dp)  # the gradient mapped back to PyTorch's layout
    named = dict(m.named_parameters())
    assert set(grads) == set(named)
    for name, p in named.items():
        want = grads[name.replace("bias_hh", "bias_ih")]  # b = bias_ih + bias_hh: both get db
        assert rel_err(_np(want), _np(p.grad)) < tol, name


def test_torch_round_trips(torch):
    m = _torch_lstm(torch, 2, True, "float32", seed=1)
    sd = m.state_dict()
    params = from_torch(sd)
    # from_torch(to_torch(p)) == p bit for bit
    back = to_torch(params)
    assert list(back) == list(sd)  # same keys, state_dict order
    assert rel_err(from_torch(back), params) == 0.0
    # to_torch(from_torch(sd)): weights bit for bit, bias_hh zero, bias_ih the (rounded) sum of both biases
    for k, v in sd.items():
        if k.startswith("weight"):
            np.testing.assert_array_equal(_np(back[k]), _np(v))
        elif k.startswith("bias_hh"):
            np.testing.assert_array_equal(_np(back[k]), 0.0)
        else:
            np.testing.assert_array_equal(_np(back[k]), _np(v) + _np(sd[k.replace("bias_ih", "bias_hh")]))
        assert back[k].dtype == v.dtype and back[k].shape == v.shape
    # ... so it is exact when bias_hh is zero, and defines the same network up to that rounding
    assert all((_np(to_torch(from_torch(back))[k]) == _np(v)).all() for k, v in back.items())
    m2 = _torch_lstm(torch, 2, True, "float32", seed=2)
    m2.load_state_dict(back, strict=True)
    x = torch.randn(T, B, D)
    assert rel_err(_np(m2(x)[0]), _np(m(x)[0])) < 1e-6
    # from_torch(to_torch(p)) for weights made here, float64
    p64 = init_stack(jax.random.PRNGKey(0), D, (H, H), bidirectional=True, dtype=jnp.float64)
    sd64 = to_torch(p64)
    assert sd64["weight_ih_l1"].dtype == torch.float64 and tuple(sd64["weight_ih_l1"].shape) == (4 * H, 2 * H)
    assert rel_err(from_torch(sd64), p64) == 0.0
    assert all(a.dtype == jnp.float64 for a in jax.tree.leaves(from_torch(sd, dtype=jnp.float64)))
    # the module itself, a prefixed submodule, numpy values; states both ways
    assert rel_err(from_torch(m), params) == 0.0
    prefixed = {"encoder.rnn." + k: _np(v) for k, v in sd.items()} | {"head.weight": np.zeros(3)}
    assert rel_err(from_torch(prefixed, prefix="encoder.rnn."), params) == 0.0
    h = torch.randn(4, B, H, dtype=torch.float64)
    c = torch.randn(4, B, H, dtype=torch.float64)
    states = states_from_torch(h, c, bidirectional=True)
    assert len(states) == 2 and len(states[1]) == 2
    np.testing.assert_array_equal(states[1][0].h, _np(h[2]))  # layer 1 forward
    np.testing.assert_array_equal(states[0][1].c, _np(c[1]))  # layer 0 reverse
    assert all(torch.equal(a, b) for a, b in zip(states_to_torch(states), (h, c), strict=True))


def test_torch_projection_round_trips(torch):
    m = _torch_lstm(torch, 2, True, "float64", seed=3, proj_size=2)
    sd = m.state_dict()
    params = from_torch(sd)
    assert params[0][1].W.shape == (2, 4 * H) and params[1][0].U.shape == (4, 4 * H)
    assert params[1][1].W_proj.shape == (H, 2)
    back = to_torch(params)
    assert list(back) == list(sd)  # weight_hr_l{k}[_reverse] included, in state_dict order
    for k, v in sd.items():
        if k.startswith("weight"):
            np.testing.assert_array_equal(_np(back[k]), _np(v))  # bit for bit, weight_hr included
    assert rel_err(from_torch(back), params) == 0.0
    ours = init_stack(jax.random.PRNGKey(1), D, (H, H), bidirectional=True, proj_size=2, dtype=jnp.float64)
    assert rel_err(from_torch(to_torch(ours)), ours) == 0.0
    m.load_state_dict(to_torch(ours), strict=True)
    x = torch.randn(T, B, D, dtype=torch.float64)
    assert rel_err(lstm_stack(ours, jnp.asarray(_np(x)))[0], _np(m(x)[0])) < 1e-12
    h, c = torch.randn(4, B, 2, dtype=torch.float64), torch.randn(4, B, H, dtype=torch.float64)
    states = states_from_torch(h, c, bidirectional=True)
    assert states[1][0].h.shape == (B, 2) and states[1][0].c.shape == (B, H)
    assert all(torch.equal(a, b) for a, b in zip(states_to_torch(states), (h, c), strict=True))


def test_torch_without_bias_and_float64_default(torch):
    m = _torch_lstm(torch, 1, False, "float64", bias=False)
    (p,) = from_torch(m.state_dict())[0]
    assert p.W.dtype == jnp.float64
    np.testing.assert_array_equal(p.b, 0.0)
    x = torch.randn(T, B, D, dtype=torch.float64)
    hs, _ = lstm(p, jnp.asarray(_np(x)))
    assert rel_err(hs, _np(m(x)[0])) < 1e-12


def test_torch_errors(torch):
    sd = {k: _np(v) for k, v in _torch_lstm(torch, 2, True, "float32").state_dict().items()}
    with pytest.raises(KeyError, match="weight_hh_l1_reverse"):
        from_torch({k: v for k, v in sd.items() if k != "weight_hh_l1_reverse"})
    with pytest.raises(KeyError, match="bias_hh_l0"):
        from_torch({k: v for k, v in sd.items() if k != "bias_hh_l0"})
    with pytest.raises(KeyError, match="weight_ih_l1"):
        from_torch({k: v for k, v in sd.items() if not k.startswith("weight_ih_l1")})
    with pytest.raises(KeyError, match="weight_ih_l0 not found"):
        from_torch({"fc.weight": np.zeros((2, 2))})
    with pytest.raises(ValueError, match=r"bias_ih_l1 has shape \(19,\), expected \(20,\)"):
        from_torch(sd | {"bias_ih_l1": np.zeros(19, np.float32)})
    with pytest.raises(ValueError, match=r"weight_ih_l1 has shape \(20, 5\), expected \(20, 10\)"):
        from_torch(sd | {"weight_ih_l1": np.zeros((20, 5), np.float32)})
    with pytest.raises(ValueError, match=r"weight_hh_l0 has shape \(20, 4\), expected \(4H, H\)"):
        from_torch(sd | {"weight_hh_l0": np.zeros((20, 4), np.float32)})
    proj = {k: _np(v) for k, v in torch.nn.LSTM(D, H, proj_size=2).state_dict().items()}
    with pytest.raises(ValueError, match=r"weight_hr_l0 has shape \(5, 5\), expected \(P, H\) with 0 < P < H"):
        from_torch(proj | {"weight_hr_l0": np.zeros((5, 5), np.float32)})
    with pytest.raises(ValueError, match=r"weight_hh_l0 has shape \(20, 5\), expected \(20, 2\)"):
        from_torch(proj | {"weight_hh_l0": np.zeros((20, 5), np.float32)})
    mixed = init_stack(jax.random.PRNGKey(0), D, (H, H), proj_size=[2, 0])
    with pytest.raises(ValueError, match="one proj_size"):
        to_torch(mixed)
    with pytest.raises(ValueError, match=r"params\[0\]\[0\]\.peephole is set: this library's LSTM has no peephole"):
        to_torch(init_stack(jax.random.PRNGKey(0), D, (H,), peephole=True))
    uneven = init_stack(jax.random.PRNGKey(0), D, (H, H + 1))
    with pytest.raises(ValueError, match="one hidden_size"):
        to_torch(uneven)
    with pytest.raises(ValueError, match=r"h has shape \(3, 3, 5\), expected \(num_layers \* 2, B, H\)"):
        states_from_torch(np.zeros((3, B, H)), np.zeros((3, B, H)), bidirectional=True)


# --------------------------------------------------------------------------- Keras


def _keras_lstm_numpy(kernel, recurrent_kernel, bias, xs, h, c, lengths):
    """Keras's documented LSTM (activation tanh, recurrent_activation sigmoid), columns [i | f | c | o].

    With a mask, a masked step keeps the state and repeats the previous output.
    """
    sig = lambda z: 1.0 / (1.0 + np.exp(-z))  # noqa: E731
    n = recurrent_kernel.shape[0]
    out = []
    y = np.zeros_like(h)
    for t, x in enumerate(xs):
        z = x @ kernel + h @ recurrent_kernel + bias
        i, f, g, o = sig(z[:, :n]), sig(z[:, n : 2 * n]), np.tanh(z[:, 2 * n : 3 * n]), sig(z[:, 3 * n :])
        c_new = f * c + i * g
        h_new = o * np.tanh(c_new)
        valid = (t < lengths)[:, None]
        h, c, y = np.where(valid, h_new, h), np.where(valid, c_new, c), np.where(valid, h_new, y)
        out.append(y)
    return np.stack(out), h, c


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_keras_equations(dtype):
    rng = np.random.default_rng(3)
    kernel, rec, bias = (0.5 * rng.standard_normal(s).astype(dtype) for s in ((D, 4 * H), (H, 4 * H), (4 * H,)))
    xs, h0, c0 = (rng.standard_normal(s).astype(dtype) for s in ((T, B, D), (B, H), (B, H)))
    lengths = np.array(LENGTHS)
    want, h_w, c_w = _keras_lstm_numpy(kernel, rec, bias, xs, h0, c0, lengths)
    p = from_keras([kernel, rec, bias])
    assert p.U.dtype == jnp.dtype(dtype)
    hs, (h, c) = lstm(p, jnp.asarray(xs), LSTMState(jnp.asarray(h0), jnp.asarray(c0)), seq_lengths=jnp.asarray(lengths))
    valid = np.arange(T)[:, None] < lengths[None, :]  # Keras repeats the last output where ours is zero
    assert rel_err(np.asarray(hs)[valid], want[valid]) < TOL[dtype]
    assert rel_err((h, c), (h_w, c_w)) < TOL[dtype]


def test_keras_round_trips_and_errors():
    rng = np.random.default_rng(4)
    w = [rng.standard_normal(s).astype(np.float32) for s in ((D, 4 * H), (H, 4 * H), (4 * H,))]
    p = from_keras(w)
    assert all(np.array_equal(a, b) and a.dtype == b.dtype for a, b in zip(to_keras(p), w, strict=True))
    p64 = _random_params(5, jnp.float64)
    assert rel_err(from_keras(to_keras(p64)), p64) == 0.0
    named = {"lstm/lstm_cell/kernel": w[0], "lstm/lstm_cell/recurrent_kernel": w[1], "lstm/lstm_cell/bias": w[2]}
    assert rel_err(from_keras(named), p) == 0.0
    np.testing.assert_array_equal(from_keras(w[:2]).b, 0.0)  # use_bias=False
    # the forget block is the second in Keras, the first in ours
    np.testing.assert_array_equal(p.b[:H], w[2][H : 2 * H])
    np.testing.assert_array_equal(p.U[:, 2 * H : 3 * H], w[0][:, 2 * H : 3 * H])
    with pytest.raises(KeyError, match="'recurrent_kernel' is missing"):
        from_keras({"kernel": w[0], "bias": w[2]})
    with pytest.raises(ValueError, match=r"kernel has shape \(4, 16\), expected \(D, 20\)"):
        from_keras([w[0][:, :16], w[1], w[2]])
    with pytest.raises(ValueError, match=r"bias has shape \(19,\), expected \(20,\)"):
        from_keras([w[0], w[1], w[2][:19]])


@pytest.fixture(scope="module")
def keras():
    os.environ.setdefault("KERAS_BACKEND", "jax")  # Keras 3 on our own JAX; no TensorFlow needed
    keras = pytest.importorskip("keras")
    if keras.backend.backend() != "jax":
        pytest.skip(f"keras runs on the {keras.backend.backend()} backend, not jax")
    return keras


def test_keras_layer(keras):
    """float32 only: Keras 3.15's tanh computes in float32 even in a float64 layer (its result_type of
    float64 and a Python float is float32), so float64 is checked against Keras's equations above."""
    dtype = "float32"
    rng = np.random.default_rng(6)
    xs, h0, c0 = (rng.standard_normal(s).astype(dtype) for s in ((T, B, D), (B, H), (B, H)))
    lengths = np.array(LENGTHS)
    mask = np.arange(T)[None, :] < lengths[:, None]
    with jax.numpy_rank_promotion("allow"):  # Keras's own code broadcasts implicitly
        layer = keras.layers.LSTM(H, return_sequences=True, return_state=True, dtype=dtype)
        layer.build((B, T, D))
        layer.set_weights([a + 0.3 * rng.standard_normal(a.shape).astype(dtype) for a in layer.get_weights()])
        out, h_k, c_k = layer(np.swapaxes(xs, 0, 1), mask=mask, initial_state=[h0, c0])
    p = from_keras(layer.get_weights())
    hs, (h, c) = lstm(p, jnp.asarray(xs), LSTMState(jnp.asarray(h0), jnp.asarray(c0)), seq_lengths=jnp.asarray(lengths))
    out = np.swapaxes(np.asarray(out), 0, 1)
    assert rel_err(np.asarray(hs)[mask.T], out[mask.T]) < TOL[dtype]
    assert rel_err((h, c), (np.asarray(h_k), np.asarray(c_k))) < TOL[dtype]
    # and back: weights set from to_keras give the same layer
    assert all(np.array_equal(a, b) for a, b in zip(to_keras(p), layer.get_weights(), strict=True))


# --------------------------------------------------------------------------- Flax


def _flax_perturbed(variables, seed):
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda a: a + 0.5 * jnp.asarray(rng.standard_normal(a.shape), a.dtype), variables)


@pytest.mark.parametrize("cell_name", ["LSTMCell", "OptimizedLSTMCell"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_flax_linen(cell_name, dtype):
    nn = pytest.importorskip("flax.linen")
    cell = getattr(nn, cell_name)(H, param_dtype=dtype)
    rng = np.random.default_rng(7)
    xs, h0, c0 = (jnp.asarray(rng.standard_normal(s), dtype) for s in ((T, B, D), (B, H), (B, H)))
    variables = _flax_perturbed(cell.init(jax.random.PRNGKey(0), (c0, h0), xs[0]), 8)

    @jax.jit
    def run(variables, xs):  # Flax's carry is (c, h)
        return jax.lax.scan(lambda carry, x: cell.apply(variables, carry, x), (c0, h0), xs)

    (c_f, h_f), hs_f = run(variables, xs)
    p = from_flax(variables)
    hs, (h, c) = lstm(p, xs, LSTMState(h0, c0))
    assert rel_err((hs, h, c), (hs_f, h_f, c_f)) < TOL[dtype]
    # exact round trips
    assert rel_err(to_flax(p), jax.tree.map(np.asarray, variables)) == 0.0
    assert jax.tree.structure(to_flax(p)) == jax.tree.structure(jax.tree.map(np.asarray, variables))
    assert rel_err(from_flax(to_flax(p)), p) == 0.0
    assert rel_err(from_flax(variables["params"]), p) == 0.0


@pytest.mark.parametrize("cell_name", ["LSTMCell", "OptimizedLSTMCell"])
def test_flax_nnx(cell_name):
    nnx = pytest.importorskip("flax.nnx")
    cell = getattr(nnx, cell_name)(D, H, param_dtype=jnp.float64, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(9)
    for _, var in nnx.iter_graph(cell):
        if isinstance(var, nnx.Param):
            var[...] = var[...] + 0.5 * jnp.asarray(rng.standard_normal(var.shape))
    xs, h0, c0 = (jnp.asarray(rng.standard_normal(s)) for s in ((T, B, D), (B, H), (B, H)))
    carry, outs = (c0, h0), []
    for x in xs:
        carry, y = cell(carry, x)
        outs.append(y)
    p = from_flax(nnx.state(cell, nnx.Param))
    hs, (h, c) = lstm(p, xs, LSTMState(h0, c0))
    assert rel_err((hs, h, c), (jnp.stack(outs), carry[1], carry[0])) < 1e-10
    assert rel_err(from_flax(nnx.to_pure_dict(nnx.state(cell, nnx.Param))), p) == 0.0


def test_flax_errors():
    tree = to_flax(_random_params(10, jnp.float32))
    with pytest.raises(KeyError, match="'hg/bias' is missing"):
        broken = {k: dict(v) for k, v in tree["params"].items()}
        del broken["hg"]["bias"]
        from_flax(broken)
    with pytest.raises(ValueError, match=r"io/kernel has shape \(3, 5\), expected \(4, 5\)"):
        from_flax({**tree["params"], "io": {"kernel": np.zeros((3, H), np.float32)}})
    with pytest.raises(ValueError, match=r"dense_h/bias has shape \(4,\), expected \(20,\)"):
        from_flax(
            {"dense_i": {"kernel": np.zeros((D, 20))}, "dense_h": {"kernel": np.zeros((H, 20)), "bias": np.zeros(4)}}
        )


# --------------------------------------------------------------------------- Haiku


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_haiku(dtype):
    hk = pytest.importorskip("haiku")
    rng = np.random.default_rng(11)
    xs, h0, c0 = (jnp.asarray(rng.standard_normal(s), dtype) for s in ((T, B, D), (B, H), (B, H)))

    def unroll(xs, h0, c0):
        return hk.dynamic_unroll(hk.LSTM(H), xs, hk.LSTMState(hidden=h0, cell=c0))

    fn = hk.without_apply_rng(hk.transform(unroll))
    with jax.numpy_rank_promotion("allow"):  # haiku adds (4H,) biases to (B, 4H)
        params = fn.init(jax.random.PRNGKey(0), xs, h0, c0)
        params = jax.tree.map(lambda a: a + 0.5 * jnp.asarray(rng.standard_normal(a.shape), dtype), params)
        apply = jax.jit(fn.apply)
        hs_h, s_h = apply(params, xs, h0, c0)
        p = from_haiku(params)
        hs, (h, c) = lstm(p, xs, LSTMState(h0, c0))
        assert p.b.dtype == jnp.dtype(dtype)
        assert rel_err((hs, h, c), (hs_h, s_h.hidden, s_h.cell)) < TOL[dtype]
        # to_haiku: the same network back in haiku's layout
        hs_back, _ = apply(to_haiku(p), xs, h0, c0)
        assert rel_err(hs_back, hs_h) < TOL[dtype]
    np.testing.assert_allclose(p.b[:H], np.asarray(params["lstm/linear"]["b"])[2 * H : 3 * H] + 1.0, rtol=1e-6)
    # round trip: exact except the forget bias block, which is shifted by 1 and back
    back = from_haiku(to_haiku(p))
    assert rel_err((back.W, back.U, back.b[H:]), (p.W, p.U, p.b[H:])) == 0.0
    np.testing.assert_allclose(back.b[:H], p.b[:H], rtol=0, atol=4 * float(jnp.finfo(dtype).eps))


def test_haiku_layout_and_errors():
    p = _random_params(12, jnp.float64)
    hp = to_haiku(p, module="rnn/lstm_1")
    w = hp["rnn/lstm_1/linear"]["w"]
    assert w.shape == (D + H, 4 * H)
    np.testing.assert_array_equal(w[:D, H : 2 * H], p.U[:, 2 * H : 3 * H])  # g is haiku's second block
    np.testing.assert_array_equal(w[D:, 2 * H : 3 * H], p.W[:, :H])  # f is haiku's third block
    two = hp | to_haiku(p, module="lstm")
    assert rel_err(from_haiku(two, module="rnn/lstm_1"), from_haiku(hp)) == 0.0
    assert rel_err(from_haiku(hp["rnn/lstm_1/linear"]), from_haiku(hp)) == 0.0
    with pytest.raises(KeyError, match="pass module="):
        from_haiku(two)
    with pytest.raises(KeyError, match="'lstm_2/linear' is missing"):
        from_haiku(two, module="lstm_2")
    with pytest.raises(KeyError, match="lstm/linear/b is missing"):
        from_haiku({"lstm/linear": {"w": w}})
    with pytest.raises(ValueError, match=r"lstm/linear/b has shape \(4,\), expected \(20,\)"):
        from_haiku({"lstm/linear": {"w": w, "b": np.zeros(4)}})
    with pytest.raises(ValueError, match=r"lstm/linear/w has shape \(5, 20\), expected \(D \+ H, 4H\)"):
        from_haiku({"lstm/linear": {"w": np.zeros((5, 20)), "b": np.zeros(20)}})


# --------------------------------------------------------------------------- Equinox


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_equinox(dtype):
    eqx = pytest.importorskip("equinox")
    cell = eqx.nn.LSTMCell(D, H, dtype=dtype, key=jax.random.PRNGKey(3))
    rng = np.random.default_rng(13)
    xs, h0, c0 = (jnp.asarray(rng.standard_normal(s), dtype) for s in ((T, B, D), (B, H), (B, H)))

    @jax.jit
    def run(cell, xs):  # equinox's state is (h, c), one example at a time
        def step(state, x):
            state = jax.vmap(cell)(x, state)
            return state, state[0]

        return jax.lax.scan(step, (h0, c0), xs)

    (h_e, c_e), hs_e = run(cell, xs)
    p = from_equinox(cell)
    hs, (h, c) = lstm(p, xs, LSTMState(h0, c0))
    assert rel_err((hs, h, c), (hs_e, h_e, c_e)) < TOL[dtype]
    # exact round trips
    back = to_equinox(p, key=jax.random.PRNGKey(5))
    assert jax.tree.structure(back) == jax.tree.structure(cell)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(cell), strict=True):
        assert a.dtype == b.dtype and np.array_equal(a, b)
    assert rel_err(from_equinox(back), p) == 0.0
    q = _random_params(14, dtype)
    assert rel_err(from_equinox(to_equinox(q)), q) == 0.0
    # the layout: U = weight_ih.T with blocks re-ordered from i, f, g, o
    np.testing.assert_array_equal(p.U[:, :H], np.asarray(cell.weight_ih)[H : 2 * H].T)  # f
    np.testing.assert_array_equal(p.W[:, H : 2 * H], np.asarray(cell.weight_hh)[:H].T)  # i
    np.testing.assert_array_equal(p.b[3 * H :], np.asarray(cell.bias)[3 * H :])  # o


def test_equinox_without_bias_and_errors():
    eqx = pytest.importorskip("equinox")
    cell = eqx.nn.LSTMCell(D, H, use_bias=False, dtype=jnp.float64, key=jax.random.PRNGKey(0))
    p = from_equinox(cell)
    assert p.b.shape == (4 * H,) and not np.any(p.b) and p.b.dtype == jnp.float64
    assert from_equinox(cell, dtype=jnp.float32).U.dtype == jnp.float32
    bad = eqx.tree_at(lambda c: c.weight_ih, cell, jnp.zeros((4 * H + 1, D)))
    with pytest.raises(ValueError, match=r"weight_ih has shape \(21, 4\), expected \(20, D\)"):
        from_equinox(bad)
    bad = eqx.tree_at(lambda c: c.weight_hh, cell, jnp.zeros((4 * H, H + 1)))
    with pytest.raises(ValueError, match=r"weight_hh has shape \(20, 6\), expected \(4H, H\)"):
        from_equinox(bad)
    with pytest.raises(KeyError, match="'weight_ih' is missing"):
        from_equinox(object())
    with pytest.raises(ValueError, match=r"params.U has shape"):
        to_equinox(LSTMParams(p.W, p.U[:, :5], p.b))
