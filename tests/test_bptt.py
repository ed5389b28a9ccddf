"""The hand-written BPTT (``lstm``) against the autodiff oracle (``lstm_ref``)."""

from __future__ import annotations

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from jax_lstm import LSTMParams, LSTMState, lstm, lstm_ref
from jax_lstm.gradcheck import random_like, random_problem, rel_err

D, H = 3, 4  # D != H on purpose: a swapped W/U would not type-check silently


def _lengths(T: int, B: int):
    """Lengths 0, 1 and T in one batch (B = 3)."""
    return jnp.array([0, 1, T][:B], jnp.int32)


VALUE_CASES = [
    (T, B, with_state, with_lengths, reverse, 4 if (T + with_state + reverse) % 2 else 1)  # unroll 1 and 4 alternate
    for T, B, with_state, with_lengths, reverse in itertools.product(
        (1, 2, 17), (1, 3), (False, True), (False, True), (False, True)
    )
    if not (with_lengths and B == 1)
]


@pytest.mark.parametrize("T,B,with_state,with_lengths,reverse,unroll", VALUE_CASES)
def test_values_match_reference(T, B, with_state, with_lengths, reverse, unroll):
    p, xs, s0 = random_problem(T * 10 + B, T, B, D, H, with_state=with_state)
    kw = dict(seq_lengths=_lengths(T, B) if with_lengths else None, reverse=reverse, unroll=unroll)
    hs, (h, c) = lstm(p, xs, s0, **kw)
    hs_r, (h_r, c_r) = lstm_ref(p, xs, s0, **kw)
    assert hs.shape == (T, B, H) and h.shape == c.shape == (B, H)
    np.testing.assert_allclose(hs, hs_r, rtol=1e-13, atol=1e-14)
    np.testing.assert_allclose(h, h_r, rtol=1e-13, atol=1e-14)
    np.testing.assert_allclose(c, c_r, rtol=1e-13, atol=1e-14)


VJP_CASES = [
    (T, B, with_lengths, reverse, unroll)
    for T, B, with_lengths, reverse, unroll in itertools.product(
        (1, 2, 17), (1, 3), (False, True), (False, True), (1, 4)
    )
    if not (with_lengths and B == 1) and (unroll == 1 or T == 17)
]


def _vjps(p, xs, s0, seed, seq_lengths=None, **static):
    """Values and VJPs (one random cotangent on every output) of lstm and lstm_ref, in one jitted call."""
    ct = random_like(seed, jax.eval_shape(lambda: lstm_ref(p, xs, s0, seq_lengths=seq_lengths, **static)))
    return _jitted_vjps(tuple(sorted(static.items())))(p, xs, s0, seq_lengths, ct)


@functools.cache
def _jitted_vjps(static):
    def run(p, xs, s0, seq_lengths, ct):
        out = []
        for fn in (lstm, lstm_ref):
            y, vjp = jax.vjp(
                lambda p_, x_, s_, fn=fn: fn(p_, x_, s_, seq_lengths=seq_lengths, **dict(static)), p, xs, s0
            )
            out.append((y, vjp(ct)))
        return out

    return jax.jit(run)


@pytest.mark.parametrize("dtype,tol", [(jnp.float64, 1e-10), (jnp.float32, 1e-5)])
@pytest.mark.parametrize("T,B,with_lengths,reverse,unroll", VJP_CASES)
def test_vjp_matches_reference(T, B, with_lengths, reverse, unroll, dtype, tol):
    p, xs, s0 = random_problem(T + B, T, B, D, H, dtype=dtype)
    kw = dict(seq_lengths=_lengths(T, B) if with_lengths else None, reverse=reverse, unroll=unroll)
    (y, g), (y_r, g_r) = _vjps(p, xs, s0, seed=7, **kw)
    assert rel_err(y, y_r) <= tol
    (gp, gx, gs), (gp_r, gx_r, gs_r) = g, g_r
    for name, a, b in [
        ("W", gp.W, gp_r.W),
        ("U", gp.U, gp_r.U),
        ("b", gp.b, gp_r.b),
        ("xs", gx, gx_r),
        ("h0", gs.h, gs_r.h),
        ("c0", gs.c, gs_r.c),
    ]:
        assert a.dtype == b.dtype == dtype, name
        assert rel_err(a, b) <= tol, (name, rel_err(a, b))
    # every gradient is non-trivial, so the comparison above means something
    for leaf in jax.tree.leaves(g_r):
        assert float(jnp.max(jnp.abs(leaf))) > 0


def test_padded_inputs_get_zero_gradient():
    T, B = 6, 3
    p, xs, s0 = random_problem(1, T, B, D, H)
    lengths = jnp.array([2, 0, 6], jnp.int32)
    for reverse in (False, True):
        ((_, gx, _),) = [g for _, g in _vjps(p, xs, s0, seed=3, seq_lengths=lengths, reverse=reverse)[:1]]
        pad = np.arange(T)[:, None] >= np.asarray(lengths)[None, :]
        assert np.all(np.asarray(gx)[pad] == 0)
        assert np.all(np.abs(np.asarray(gx)[~pad]) > 0)


def test_check_grads_second_order_float64():
    p, xs, s0 = random_problem(2, 4, 2, D, H)
    lengths = jnp.array([4, 2], jnp.int32)
    for reverse in (False, True):
        f = lambda p_, x_, s_, r=reverse: lstm(p_, x_, s_, seq_lengths=lengths, reverse=r)  # noqa: E731
        check_grads(jax.jit(f), (p, xs, s0), order=2, modes=["rev"], eps=1e-6, atol=1e-7, rtol=1e-7)


def test_gradient_uses_the_custom_vjp():
    p, xs, s0 = random_problem(3, 5, 2, D, H)
    loss = lambda fn: lambda p_: jnp.sum(fn(p_, xs, s0)[0] ** 2)  # noqa: E731
    prims = [e.primitive.name for e in jax.make_jaxpr(loss(lstm))(p).eqns]
    assert "custom_vjp_call" in prims
    scopes = [str(e.source_info.name_stack) for e in jax.make_jaxpr(jax.grad(loss(lstm)))(p).eqns]
    assert any("lstm_bptt_bwd" in s for s in scopes)
    scopes_ref = [str(e.source_info.name_stack) for e in jax.make_jaxpr(jax.grad(loss(lstm_ref)))(p).eqns]
    assert not any("lstm_bptt_bwd" in s for s in scopes_ref)
    assert "lstm_bptt_bwd" in jax.jit(jax.grad(loss(lstm))).lower(p).as_text(debug_info=True)
    with pytest.raises(TypeError, match="custom_vjp"):
        jax.jvp(loss(lstm), (p,), (p,))


def _grad_pair(loss_of):
    return [jax.grad(loss_of(fn), argnums=(0, 1, 2)) for fn in (lstm, lstm_ref)]


def test_jit_and_grad_of_grad():
    p, xs, s0 = random_problem(4, 5, 2, D, H)
    v = random_like(9, p)

    def loss_of(fn):
        def loss(p_, x_, s_):
            hs, (h, c) = fn(p_, x_, s_)
            return jnp.sum(jnp.sin(hs)) + jnp.sum(h * c)

        return loss

    g, g_r = (jax.jit(f)(p, xs, s0) for f in _grad_pair(loss_of))
    assert rel_err(g, g_r) <= 1e-10

    def hvp_of(fn):  # d/dp <grad_p loss, v>: reverse over reverse
        inner = jax.grad(loss_of(fn))
        return jax.grad(lambda p_: sum(jnp.vdot(a, b) for a, b in zip(inner(p_, xs, s0), v, strict=True)))

    assert rel_err(jax.jit(hvp_of(lstm))(p), hvp_of(lstm_ref)(p)) <= 1e-10


def test_vmap_over_leading_axis():
    N, T, B = 3, 5, 2
    p, _, s0 = random_problem(5, T, B, D, H)
    xs = jax.random.normal(jax.random.PRNGKey(1), (N, T, B, D), jnp.float64)
    lengths = jnp.array([[5, 1], [0, 3], [2, 5]], jnp.int32)

    def loss_of(fn):
        return lambda p_, x_, l_: jnp.sum(jnp.cos(fn(p_, x_, s0, seq_lengths=l_)[0]))

    outs = []
    for fn in (lstm, lstm_ref):
        per_example = jax.vmap(jax.value_and_grad(loss_of(fn), argnums=(0, 1)), in_axes=(None, 0, 0))
        outs.append(jax.jit(per_example)(p, xs, lengths))
    assert rel_err(outs[0], outs[1]) <= 1e-10
    # vmapped == looped
    loop = [jax.grad(loss_of(lstm), argnums=1)(p, xs[n], lengths[n]) for n in range(N)]
    assert rel_err(outs[0][1][1], jnp.stack(loop)) <= 1e-12


def test_inside_outer_scan():
    """Consecutive windows with the state carried, as truncated BPTT does, under an outer lax.scan."""
    p, _, s0 = random_problem(6, 4, 2, D, H)
    windows = jax.random.normal(jax.random.PRNGKey(2), (3, 4, 2, D), jnp.float64)

    def loss_of(fn):
        def loss(p_, s_):
            def body(state, xw):
                hs, state = fn(p_, xw, state)
                return state, jnp.sum(hs**2)

            state, parts = jax.lax.scan(body, s_, windows)
            return jnp.sum(parts) + jnp.sum(state.c)

        return loss

    g = jax.jit(jax.grad(loss_of(lstm), argnums=(0, 1)))(p, s0)
    g_r = jax.grad(loss_of(lstm_ref), argnums=(0, 1))(p, s0)
    assert rel_err(g, g_r) <= 1e-10


def test_bfloat16_runs_and_is_close_to_float32():
    T, B = 8, 3
    p32, xs32, s32 = random_problem(7, T, B, D, H, dtype=jnp.float32)
    to16 = lambda t: jax.tree.map(lambda a: a.astype(jnp.bfloat16), t)  # noqa: E731
    p16, xs16, s16 = to16(p32), to16(xs32), to16(s32)
    lengths = jnp.array([8, 3, 0], jnp.int32)

    def loss_of(fn):
        def loss(p_, x_, s_):
            hs, (h, c) = fn(p_, x_, s_, seq_lengths=lengths)
            return jnp.sum(hs.astype(jnp.float32) ** 2) + jnp.sum(h.astype(jnp.float32) * c.astype(jnp.float32))

        return loss

    (hs16, (h16, c16)) = lstm(p16, xs16, s16, seq_lengths=lengths)
    assert hs16.dtype == h16.dtype == c16.dtype == jnp.bfloat16
    hs16_r, _ = lstm_ref(p16, xs16, s16, seq_lengths=lengths)
    assert rel_err(hs16, hs16_r) <= 2e-2
    # the same bf16-rounded inputs in float32: bf16 only loses precision in the matmuls and outputs
    up = lambda t: jax.tree.map(lambda a: a.astype(jnp.float32), t)  # noqa: E731
    g16 = jax.grad(loss_of(lstm), argnums=(0, 1, 2))(p16, xs16, s16)
    g32 = jax.grad(loss_of(lstm), argnums=(0, 1, 2))(up(p16), up(xs16), up(s16))
    for a, b in zip(jax.tree.leaves(g16), jax.tree.leaves(g32), strict=True):
        assert a.dtype == jnp.bfloat16
        assert rel_err(a, b) <= 5e-2
    g16_r = jax.grad(loss_of(lstm_ref), argnums=(0, 1, 2))(p16, xs16, s16)
    assert rel_err(g16, g16_r) <= 5e-2


def test_state0_none_means_zeros():
    p, xs, _ = random_problem(8, 5, 3, D, H)
    z = LSTMState(jnp.zeros((3, H), jnp.float64), jnp.zeros((3, H), jnp.float64))
    assert rel_err(lstm(p, xs), lstm(p, xs, z)) == 0.0


def test_mixed_dtypes_promote_and_gradients_keep_each_dtype():
    p, xs, s0 = random_problem(9, 3, 2, D, H, dtype=jnp.float32)
    xs64 = xs.astype(jnp.float64)
    hs, _ = lstm(p, xs64, s0)
    assert hs.dtype == jnp.float64
    gp, gx = jax.grad(lambda p_, x_: jnp.sum(lstm(p_, x_, s0)[0]), argnums=(0, 1))(p, xs64)
    assert gp.W.dtype == jnp.float32 and gx.dtype == jnp.float64


# ---- bad input: each raises the documented error, naming the argument and the shapes ----

P, XS, S0 = random_problem(0, 4, 2, D, H)


@pytest.mark.parametrize(
    "kwargs,exc,pattern",
    [
        (dict(xs=XS[0]), ValueError, r"xs has shape \(2, 3\).*\(T, B, D\)"),
        (dict(xs=XS[..., :2]), ValueError, r"xs has shape \(4, 2, 2\).*params.U \(3, 16\)"),
        (dict(params=P._replace(W=P.W[:, :8])), ValueError, r"params.W has shape \(4, 8\)"),
        (dict(params=P._replace(U=P.U[:, :8])), ValueError, r"params.U has shape \(3, 8\).*\(4, 16\)"),
        (dict(params=P._replace(b=P.b[:5])), ValueError, r"params.b has shape \(5,\).*\(16,\)"),
        (dict(params=P._replace(W=P.W[None])), ValueError, r"params.W has shape \(1, 4, 16\)"),
        (dict(state0=LSTMState(S0.h[:, :3], S0.c)), ValueError, r"state0.h has shape \(2, 3\).*\(2, 4\)"),
        (dict(state0=LSTMState(S0.h, S0.c[:1])), ValueError, r"state0.c has shape \(1, 4\).*\(2, 4\)"),
        (dict(state0=S0.h), TypeError, r"state0 must be LSTMState"),
        (dict(seq_lengths=jnp.array([1, 2, 3], jnp.int32)), ValueError, r"seq_lengths has shape \(3,\).*\(2,\)"),
        (dict(seq_lengths=jnp.array([[1, 2]], jnp.int32)), ValueError, r"seq_lengths has shape \(1, 2\)"),
        (dict(seq_lengths=jnp.array([1.0, 2.0])), TypeError, r"seq_lengths must have an integer dtype.*float"),
        (dict(xs=XS.astype(jnp.int32)), TypeError, r"xs must be floating point"),
        (dict(unroll=0), ValueError, r"unroll must be a positive int"),
        (dict(params=(P.W, P.U)), TypeError, r"params must be LSTMParams"),
    ],
)
@pytest.mark.parametrize("fn", [lstm, lstm_ref], ids=["lstm", "lstm_ref"])
def test_bad_input_raises_at_trace_time(fn, kwargs, exc, pattern):
    args = dict(params=P, xs=XS, state0=S0, seq_lengths=None, unroll=1)
    args.update(kwargs)
    call = lambda: fn(
        args["params"], args["xs"], args["state0"], seq_lengths=args["seq_lengths"], unroll=args["unroll"]
    )  # noqa: E731
    with pytest.raises(exc, match=pattern):
        call()
    with pytest.raises(exc, match=pattern):  # under jit too: raised while tracing, not by XLA
        jax.jit(lambda: call())()


def test_params_accept_plain_tuple():
    hs, _ = lstm(tuple(P), XS, S0)
    assert rel_err(hs, lstm(LSTMParams(*P), XS, S0)[0]) == 0.0
