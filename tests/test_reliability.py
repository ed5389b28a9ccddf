"""Classes of failure that numbers alone do not show: poisoned skipped inputs, aliased buffers,
derivatives of any order, shape-polymorphic export, and size arguments of the wrong type."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from numpy_oracle import lstm_np

from jax_lstm import LSTMState, init_params, init_stack, lstm, lstm_ref, lstm_stack, lstm_trace, zeros_state

T, B, D, H = 5, 3, 3, 4


def _problem(seed=0, dtype=jnp.float64):
    rng = np.random.default_rng(seed)
    p = init_params(jax.random.PRNGKey(seed), D, H, dtype=dtype)
    xs = jnp.asarray(rng.normal(size=(T, B, D)), dtype)
    s0 = LSTMState(*(jnp.asarray(rng.normal(scale=0.5, size=(B, H)), dtype) for _ in range(2)))
    return p, xs, s0


# ------------------------------------------------------------------------------------------- skipped inputs

LENGTHS = np.array([2, T, 0])
MASK = np.ones((T, B), bool)
MASK[1, 1] = MASK[3, 1] = False


def _poison(xs, skipped, value):
    """xs with ``value`` (NaN, +Inf or -Inf) at every skipped (t, b)."""
    return jnp.where(jnp.asarray(skipped)[..., None], jnp.asarray(value, xs.dtype), xs)


@pytest.mark.parametrize(
    "value,reverse,time_major,how",
    [(np.nan, False, True, "lengths"), (np.inf, True, False, "mask"), (-np.inf, True, True, "both")],
)
def test_skipped_inputs_reach_no_output_and_no_gradient(value, reverse, time_major, how):
    """Whatever a skipped step's input holds, lstm, lstm_ref, lstm_trace and a stack give the values
    and gradients of the same call with zeros there, and the oracle's values."""
    p, xs, s0 = _problem(1)
    runs = LENGTHS[None, :] > np.arange(T)[:, None] if how != "mask" else np.ones((T, B), bool)
    if how != "lengths":
        runs = runs & MASK
    kw = {"reverse": reverse, "time_major": time_major}
    if how != "mask":
        kw["seq_lengths"] = jnp.asarray(LENGTHS, jnp.int32)
    if how != "lengths":
        kw["mask"] = jnp.asarray(MASK if time_major else MASK.T)
    clean = _poison(xs, ~runs, 0.0)
    dirty = _poison(xs, ~runs, value)
    lay = (lambda a: a) if time_major else (lambda a: jnp.swapaxes(a, 0, 1))
    ct = jnp.asarray(np.random.default_rng(2).normal(size=(T, B, H)))

    def loss(fn, p, x, s):
        hs, (h, c) = fn(p, lay(x), s, **kw)
        return jnp.sum(lay(hs) * ct) + jnp.sum(h * ct[0]) + jnp.sum(c * ct[1])

    for fn in (lstm, lstm_ref):
        g_clean = jax.jit(jax.value_and_grad(lambda *a, fn=fn: loss(fn, *a), argnums=(0, 1, 2)))(p, clean, s0)
        g_dirty = jax.jit(jax.value_and_grad(lambda *a, fn=fn: loss(fn, *a), argnums=(0, 1, 2)))(p, dirty, s0)
        for a, b in zip(jax.tree.leaves(g_dirty), jax.tree.leaves(g_clean), strict=True):
            assert np.all(np.isfinite(np.asarray(a))), fn.__name__
            np.testing.assert_allclose(a, b, rtol=1e-13, atol=1e-15)
        gx = np.asarray(g_dirty[1][1])
        assert np.all(gx[~runs] == 0) and np.max(np.abs(gx[runs])) > 1e-3
    hs_o, h_o, c_o = lstm_np(*p, np.asarray(clean), *s0, mask=runs, reverse=reverse)
    hs, (h, c) = lstm(p, lay(dirty), s0, **kw)
    np.testing.assert_allclose(lay(hs), hs_o, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(h, h_o, rtol=1e-12, atol=1e-14)
    trace = lstm_trace(p, lay(dirty), s0, **kw)
    assert all(np.all(np.isfinite(np.asarray(v))) for v in trace)
    # a bidirectional two-layer stack: every layer and direction skips the same steps
    stack = init_stack(jax.random.PRNGKey(3), D, [H, 2], bidirectional=True, dtype=jnp.float64)
    skw = {k: v for k, v in kw.items() if k != "reverse"}

    def stack_loss(params, x, impl):
        hs, _ = lstm_stack(params, lay(x), impl=impl, **skw)
        return jnp.sum(hs**2)

    for impl in ("manual", "autodiff"):
        gd = jax.jit(jax.grad(stack_loss, argnums=(0, 1)), static_argnums=2)(stack, dirty, impl)
        gc = jax.jit(jax.grad(stack_loss, argnums=(0, 1)), static_argnums=2)(stack, clean, impl)
        for a, b in zip(jax.tree.leaves(gd), jax.tree.leaves(gc), strict=True):
            assert np.all(np.isfinite(np.asarray(a))), impl
            np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-15)


def test_skipped_inputs_under_vmap_and_in_bfloat16():
    p, xs, s0 = _problem(4)
    runs = LENGTHS[None, :] > np.arange(T)[:, None]
    lengths = jnp.asarray(LENGTHS, jnp.int32)
    xs2 = jnp.stack([_poison(xs, ~runs, np.nan), _poison(xs, ~runs, 0.0)])
    g = jax.jit(jax.grad(lambda p, x: jax.vmap(lambda x: lstm(p, x, seq_lengths=lengths)[0].sum())(x).sum()))(p, xs2)
    assert all(np.all(np.isfinite(np.asarray(a))) for a in jax.tree.leaves(g))
    g16 = jax.grad(
        lambda p: (
            lstm(p, _poison(xs, ~runs, np.inf).astype(jnp.bfloat16), seq_lengths=lengths)[0].astype(jnp.float32).sum()
        )
    )(jax.tree.map(lambda a: a.astype(jnp.bfloat16), p))
    assert all(np.all(np.isfinite(np.asarray(a, np.float32))) for a in jax.tree.leaves(g16))


# ------------------------------------------------------------------------------------------- aliasing


def test_public_constructors_never_alias_buffers():
    """A carried state can be donated: no constructor returns one buffer twice."""
    states = [zeros_state(B, H), zeros_state(B, H, jnp.float64)]
    p, xs, _ = _problem(5)
    states.append(lstm(p, xs[:0])[1])  # T = 0: the zero state passes through
    states.append(lstm_ref(p, xs[:0])[1])
    for s in states:
        assert s.h.unsafe_buffer_pointer() != s.c.unsafe_buffer_pointer()

    @jax.jit
    def step(state, x):
        return lstm(p, x[None], state)[1]

    donating = jax.jit(lambda s, x: step(s, x), donate_argnums=0)
    out = donating(zeros_state(B, H, jnp.float64), xs[0])
    assert out.h.shape == (B, H)


def test_zeros_state_sizes():
    assert zeros_state(0, H).h.shape == (0, H)
    for bad in (True, 2.0, -1, "3"):
        with pytest.raises(ValueError, match="batch_size"):
            zeros_state(bad, H)


# ------------------------------------------------------------------------------------------- derivatives


@pytest.mark.parametrize("options", ["all"])
def test_third_order_reverse_derivatives_equal_lstm_ref(options):
    p, xs, s0 = _problem(6)
    kw = {}
    if options == "all":
        rs = np.zeros((T, B), bool)
        rs[2, 1] = True
        kw = dict(
            seq_lengths=jnp.asarray(LENGTHS, jnp.int32),
            resets=jnp.asarray(rs),
            reverse=True,
            recurrent_dropout=0.25,
            key=jax.random.PRNGKey(0),
        )

    def f(fn):
        return lambda s: jnp.sum(fn(p._replace(b=p.b * s), xs * s, s0, **kw)[0] ** 3)

    for order in (2, 3):
        got, want = f(lstm), f(lstm_ref)
        for _ in range(order):
            got, want = jax.grad(got), jax.grad(want)
        a, b = float(jax.jit(got)(0.7)), float(jax.jit(want)(0.7))
        assert abs(a - b) <= 1e-10 * max(abs(b), 1e-8), (order, a, b)
    # under vmap too: per-example third derivatives
    g3 = jax.jit(jax.vmap(jax.grad(jax.grad(jax.grad(f(lstm))))))(jnp.array([0.5, 0.9]))
    r3 = jax.jit(jax.vmap(jax.grad(jax.grad(jax.grad(f(lstm_ref))))))(jnp.array([0.5, 0.9]))
    np.testing.assert_allclose(g3, r3, rtol=1e-10)


def test_forward_mode_fails_with_the_custom_vjp_message():
    """Forward mode (jvp, jacfwd, hessian) does not go through a custom_vjp: the README says so."""
    p, xs, _ = _problem(7)
    with pytest.raises(TypeError, match="custom_vjp"):
        jax.jvp(lambda x: lstm(p, x)[0], (xs,), (xs,))
    out, tangent = jax.jvp(lambda x: lstm_ref(p, x)[0], (xs,), (xs,))
    assert tangent.shape == out.shape


# ------------------------------------------------------------------------------------------- export


@pytest.mark.parametrize("dtype", [jnp.int8, jnp.uint16, jnp.int32, jnp.int64])
def test_shape_polymorphic_export_with_seq_lengths(dtype):
    from jax import export

    p, xs, s0 = _problem(8)
    lengths = jnp.asarray([2, T, 0], dtype)
    (T_sym,) = export.symbolic_shape("T")
    for fn in (lstm, lstm_ref):
        exp = export.export(jax.jit(lambda x, l, fn=fn: fn(p, x, s0, seq_lengths=l)))(
            jax.ShapeDtypeStruct((T_sym, B, D), xs.dtype), jax.ShapeDtypeStruct((B,), dtype)
        )
        for t in (1, T, 9):
            x = jnp.tile(xs, (2, 1, 1))[:t]
            l = jnp.minimum(lengths, t).astype(dtype)
            got, want = exp.call(x, l), fn(p, x, s0, seq_lengths=l)
            for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
                np.testing.assert_allclose(a, b, rtol=1e-13, atol=1e-15)
        grad_exp = export.export(jax.jit(jax.grad(lambda x, l, fn=fn: fn(p, x, s0, seq_lengths=l)[0].sum())))(
            jax.ShapeDtypeStruct((T_sym, B, D), xs.dtype), jax.ShapeDtypeStruct((B,), dtype)
        )
        assert grad_exp.call(xs, lengths).shape == xs.shape


# ------------------------------------------------------------------------------------------- size arguments


@pytest.mark.parametrize("bad", [True, False, 2.5, 2.0, 0, -3, "4", None, np.bool_(True)])
def test_size_arguments_refuse_non_ints(bad):
    key = jax.random.PRNGKey(0)
    with pytest.raises(ValueError, match="input_size"):
        init_params(key, bad, 4)
    with pytest.raises(ValueError, match="hidden_size"):
        init_params(key, 3, bad)
    with pytest.raises(ValueError, match="input_size"):
        init_stack(key, bad, [4])
    with pytest.raises(ValueError, match=r"hidden_sizes\[1\]"):
        init_stack(key, 3, [4, bad])
    with pytest.raises(ValueError, match="hidden_size"):
        zeros_state(2, bad)


@pytest.mark.parametrize("bad", [True, 2.5, 0])
def test_module_sizes_refuse_non_ints(bad):
    nnx = pytest.importorskip("flax.nnx")
    eqx = pytest.importorskip("equinox")
    import jax_lstm.eqx as jeqx
    import jax_lstm.nnx as jnnx

    del eqx
    with pytest.raises((ValueError, TypeError), match="in_features"):
        jnnx.LSTM(bad, 4, rngs=nnx.Rngs(0))
    with pytest.raises((ValueError, TypeError), match="hidden_features"):
        jnnx.LSTM(3, bad, rngs=nnx.Rngs(0))
    with pytest.raises((ValueError, TypeError), match="input_size"):
        jeqx.LSTM(bad, 4, key=jax.random.PRNGKey(0))


def test_modules_skip_poisoned_padding():
    """NaN and Inf in padded steps reach no gradient through the Flax NNX, Linen and Equinox modules."""
    nnx = pytest.importorskip("flax.nnx")
    pytest.importorskip("equinox")
    import jax_lstm.eqx as jeqx
    import jax_lstm.linen as jlinen
    import jax_lstm.nnx as jnnx

    rng = np.random.default_rng(9)
    xs = rng.normal(size=(B, T, D))  # batch-major, as the Flax modules take it
    lengths = np.array([2, T, 1])
    pad = np.arange(T)[None, :] >= lengths[:, None]
    xs[pad] = np.nan
    xs[0, -1] = np.inf
    xs = jnp.asarray(xs)
    lengths = jnp.asarray(lengths, jnp.int32)

    model = jnnx.LSTM(D, H, bidirectional=True, rngs=nnx.Rngs(0))
    g = nnx.grad(lambda m, x: jnp.sum(m(x, seq_lengths=lengths) ** 2), argnums=(0, 1))(model, xs)
    assert all(np.all(np.isfinite(np.asarray(a))) for a in jax.tree.leaves(nnx.state(g[0])))
    assert np.all(np.asarray(g[1])[pad] == 0) and np.all(np.isfinite(np.asarray(g[1])))

    lin = jlinen.LSTM(H)
    variables = lin.init(jax.random.PRNGKey(0), jnp.zeros((B, T, D)))
    gl = jax.grad(lambda v, x: jnp.sum(lin.apply(v, x, seq_lengths=lengths) ** 2), argnums=(0, 1))(variables, xs)
    assert all(np.all(np.isfinite(np.asarray(a))) for a in jax.tree.leaves(gl))

    em = jeqx.LSTM(D, H, key=jax.random.PRNGKey(1))

    def eloss(m, x):
        out = jax.vmap(lambda xi, li: m(xi, seq_length=li)[0])(x, lengths)
        return jnp.sum(out**2)

    ge = jax.grad(lambda x: eloss(em, x))(xs)
    assert np.all(np.isfinite(np.asarray(ge))) and np.all(np.asarray(ge)[pad] == 0)
