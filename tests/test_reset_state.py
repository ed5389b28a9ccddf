"""Resets restore ``reset_state`` (zeros by default), not ``state0``; custom gate and cell activations.

Values against the NumPy oracle (which shares no code with jax_lstm), gradients of every argument,
``reset_state`` included, against ``lstm_ref`` under ``jax.grad`` with random cotangents and against
finite differences of the oracle.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from numpy_oracle import lstm_np

from jax_lstm import LSTMState, init_stack, lstm, lstm_ref, lstm_stack, lstm_trace

T, B, D, H = 6, 3, 3, 4
RESETS = np.zeros((T, B), bool)
RESETS[2, 0] = RESETS[4, 0] = RESETS[0, 1] = RESETS[3, 2] = True
MASK = np.ones((T, B), bool)
MASK[3, 2] = MASK[1, 0] = False  # a reset at a skipped step (row 2)


def _problem(seed=0):
    rng = np.random.default_rng(seed)
    n = lambda *s, scale=0.6: jnp.asarray(rng.normal(scale=scale, size=s))  # noqa: E731
    from jax_lstm import LSTMParams

    params = LSTMParams(n(H, 4 * H), n(D, 4 * H), n(4 * H, scale=0.3))
    return params, n(T, B, D, scale=1.0), LSTMState(n(B, H), n(B, H)), LSTMState(n(B, H), n(B, H))


def _cts(seed):
    rng = np.random.default_rng(seed)
    return jnp.asarray(rng.normal(size=(T, B, H))), LSTMState(*(jnp.asarray(rng.normal(size=(B, H))) for _ in "hc"))


CASES = [
    dict(reverse=False, time_major=True, mask=False),
    dict(reverse=True, time_major=False, mask=True),
    dict(reverse=False, time_major=False, mask=True),
]


def _kw(case):
    lay = (lambda a: a) if case["time_major"] else (lambda a: np.swapaxes(a, 0, 1))
    kw = dict(reverse=case["reverse"], time_major=case["time_major"], resets=jnp.asarray(lay(RESETS)))
    if case["mask"]:
        kw["mask"] = jnp.asarray(lay(MASK))
    return kw, lay


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(k for k, v in c.items() if v) or "plain")
def test_resets_restore_reset_state_values_and_gradients(case):
    p, xs, s0, sr = _problem(1)
    kw, lay = _kw(case)
    mask = MASK if case["mask"] else None
    for reset in (sr, None):
        hs_o, h_o, c_o = lstm_np(
            *p,
            np.asarray(xs),
            *s0,
            mask=mask,
            resets=RESETS,
            reverse=case["reverse"],
            hr=None if reset is None else reset.h,
            cr=None if reset is None else reset.c,
        )
        for fn in (lstm, lstm_ref):
            hs, (h, c) = fn(p, jnp.asarray(lay(np.asarray(xs))), s0, reset_state=reset, **kw)
            np.testing.assert_allclose(lay(np.asarray(hs)), hs_o, rtol=1e-12, atol=1e-14)
            np.testing.assert_allclose(h, h_o, rtol=1e-12, atol=1e-14)
            np.testing.assert_allclose(c, c_o, rtol=1e-12, atol=1e-14)
        trace = lstm_trace(p, jnp.asarray(lay(np.asarray(xs))), s0, reset_state=reset, **kw)
        np.testing.assert_allclose(lay(np.asarray(trace.h)), hs_o, rtol=1e-12, atol=1e-14)
    cts = _cts(2)

    def loss(fn, p, x, s, r):
        hs, st = fn(p, lay(x), s, reset_state=r, **kw)
        return jnp.sum(lay(hs) * cts[0]) + jnp.sum(st.h * cts[1].h) + jnp.sum(st.c * cts[1].c)

    grads = [
        jax.jit(jax.grad(lambda *a, fn=fn: loss(fn, *a), argnums=(0, 1, 2, 3)))(p, xs, s0, sr)
        for fn in (lstm, lstm_ref)
    ]
    for a, b in zip(*(jax.tree.leaves(g) for g in grads), strict=True):
        assert np.max(np.abs(a - b)) <= 1e-10 * np.max(np.abs(b)), (a, b)
    g_reset = grads[0][3]
    assert np.max(np.abs(np.asarray(g_reset.h))) > 1e-3  # resets feed reset_state's gradient


def test_reset_state_gradient_matches_finite_differences_of_the_oracle():
    p, xs, s0, sr = _problem(3)
    cts = _cts(4)
    kw, _ = _kw(CASES[1])

    def loss_np(h0, c0, hr, cr):
        hs, h, c = lstm_np(*p, np.asarray(xs), h0, c0, mask=MASK, resets=RESETS, hr=hr, cr=cr, reverse=True)
        return float(
            np.sum(hs * np.asarray(cts[0])) + np.sum(h * np.asarray(cts[1].h)) + np.sum(c * np.asarray(cts[1].c))
        )

    base = [np.asarray(a) for a in (*s0, *sr)]
    eps = 1e-6
    fd = []
    for k, a in enumerate(base):
        g = np.zeros_like(a)
        for idx in np.ndindex(a.shape):
            up = [b.copy() for b in base]
            dn = [b.copy() for b in base]
            up[k][idx] += eps
            dn[k][idx] -= eps
            g[idx] = (loss_np(*up) - loss_np(*dn)) / (2 * eps)
        fd.append(g)

    def loss(s, r):
        hs, st = lstm(p, jnp.swapaxes(xs, 0, 1), s, reset_state=r, **kw)
        return jnp.sum(jnp.swapaxes(hs, 0, 1) * cts[0]) + jnp.sum(st.h * cts[1].h) + jnp.sum(st.c * cts[1].c)

    gs, gr = jax.grad(loss, argnums=(0, 1))(s0, sr)
    for got, want in zip((*gs, *gr), fd, strict=True):
        assert np.max(np.abs(np.asarray(got) - want)) <= 1e-7 * max(np.max(np.abs(want)), 1.0)
    assert np.max(np.abs(fd[2])) > 1e-3  # the reset state matters
    # forward, row 1 resets before its first step: state0 reaches nothing there (only the start feeds it)
    g0 = jax.grad(lambda s: jnp.sum(lstm(p, xs, s, resets=jnp.asarray(RESETS), reset_state=sr)[0] ** 2))(s0)
    assert np.all(np.asarray(g0.h[1]) == 0) and np.all(np.asarray(g0.c[1]) == 0)
    assert np.max(np.abs(np.asarray(g0.h[0]))) > 1e-4


def test_reset_state_equal_to_state0_is_the_previous_behaviour():
    """``reset_state=state0`` restores the start at every reset, and state0's gradient sums both roles."""
    p, xs, s0, _ = _problem(5)
    hs_o, _, _ = lstm_np(*p, np.asarray(xs), *s0, resets=RESETS, hr=s0.h, cr=s0.c)
    rs = jnp.asarray(RESETS)
    for fn in (lstm, lstm_ref):
        hs, _ = fn(p, xs, s0, resets=rs, reset_state=s0)
        np.testing.assert_allclose(hs, hs_o, rtol=1e-12, atol=1e-14)
    g = [
        jax.grad(lambda s, fn=fn: jnp.sum(fn(p, xs, s, resets=rs, reset_state=s)[0] ** 2))(s0)
        for fn in (lstm, lstm_ref)
    ]
    for a, b in zip(*(jax.tree.leaves(x) for x in g), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-10)


def test_stack_reset_states_and_vmap():
    params = init_stack(jax.random.PRNGKey(0), D, [H, 2], bidirectional=True, dtype=jnp.float64)
    _, xs, _, _ = _problem(6)
    rng = np.random.default_rng(7)
    resets = ((LSTMState(*(jnp.asarray(rng.normal(size=(B, H))) for _ in "hc")), None), None)
    rs = jnp.asarray(RESETS)
    out = [lstm_stack(params, xs, resets=rs, reset_states=resets, impl=i)[0] for i in ("manual", "autodiff")]
    np.testing.assert_allclose(out[0], out[1], rtol=1e-12)
    # layer 0 forward by hand: the same call of lstm with that reset state
    h0_fwd, _ = lstm(params[0][0], xs, resets=rs, reset_state=resets[0][0])
    trace0 = lstm_stack(params[:1], xs, resets=rs, reset_states=resets[:1])[0][..., :H]
    np.testing.assert_allclose(trace0, h0_fwd, rtol=1e-13)
    with pytest.raises(ValueError, match=r"reset_states\[0\]\[0\]\.h"):
        lstm_stack(params, xs, resets=rs, reset_states=((LSTMState(jnp.zeros((B, 5)), jnp.zeros((B, 5))), None), None))
    # vmap over examples (the fold) with a per-example reset state
    p, xs, s0, sr = _problem(8)
    srs = jax.tree.map(lambda a: jnp.stack([a, -a]), sr)
    xss = jnp.stack([xs, xs[::-1]])

    def f(fn):
        return lambda p: jnp.sum(jax.vmap(lambda x, r: fn(p, x, s0, resets=rs, reset_state=r)[0])(xss, srs) ** 2)

    np.testing.assert_allclose(jax.grad(f(lstm))(p).W, jax.grad(f(lstm_ref))(p).W, rtol=1e-10)


def test_reset_state_shape_errors_name_the_argument():
    p, xs, s0, _ = _problem(9)
    with pytest.raises(ValueError, match=r"reset_state\.c has shape \(3, 5\)"):
        lstm(p, xs, resets=jnp.asarray(RESETS), reset_state=LSTMState(s0.h, jnp.zeros((B, 5))))


# ------------------------------------------------------------------------------------------- activations


def _hard_sigmoid_np(x):
    return np.clip(x / 6 + 0.5, 0, 1)


def _soft_sign_np(x):
    return x / (1 + np.abs(x))


ACTIVATIONS = [
    ("sigmoid-tanh", jax.nn.sigmoid, jnp.tanh, None, None),
    ("hard_sigmoid-soft_sign", jax.nn.hard_sigmoid, jax.nn.soft_sign, _hard_sigmoid_np, _soft_sign_np),
    (
        "lambda",
        lambda x: 0.5 * (1 + x / jnp.sqrt(1 + x * x)),
        lambda x: jnp.sin(x),
        lambda x: 0.5 * (1 + x / np.sqrt(1 + x * x)),
        np.sin,
    ),
]


@pytest.mark.parametrize("name,gate_fn,act_fn,gate_np,act_np", ACTIVATIONS, ids=[a[0] for a in ACTIVATIONS])
def test_custom_activations_values_and_gradients(name, gate_fn, act_fn, gate_np, act_np):
    p, xs, s0, sr = _problem(10)
    kw = dict(gate_fn=gate_fn, activation_fn=act_fn, mask=jnp.asarray(MASK), resets=jnp.asarray(RESETS))
    hs_o, h_o, c_o = lstm_np(*p, np.asarray(xs), *s0, mask=MASK, resets=RESETS, gate_fn=gate_np, activation_fn=act_np)
    for fn in (lstm, lstm_ref):
        hs, (h, c) = fn(p, xs, s0, **kw)
        np.testing.assert_allclose(hs, hs_o, rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(c, c_o, rtol=1e-12, atol=1e-14)
    cts = _cts(11)

    def loss(fn, p, x, s):
        hs, st = fn(p, x, s, **kw)
        return jnp.sum(hs * cts[0]) + jnp.sum(st.h * cts[1].h) + jnp.sum(st.c * cts[1].c)

    grads = [jax.grad(lambda *a, fn=fn: loss(fn, *a), argnums=(0, 1, 2))(p, xs, s0) for fn in (lstm, lstm_ref)]
    for a, b in zip(*(jax.tree.leaves(g) for g in grads), strict=True):
        assert np.max(np.abs(a - b)) <= 1e-10 * np.max(np.abs(b))
    # float32 at about 1e-5
    p32, xs32, s32 = jax.tree.map(lambda a: a.astype(jnp.float32), (p, xs, s0))
    g32 = jax.grad(lambda *a: loss(lstm, *a), argnums=(0, 1, 2))(p32, xs32, s32)
    for a, b in zip(jax.tree.leaves(g32), jax.tree.leaves(grads[1]), strict=True):
        assert np.max(np.abs(np.asarray(a, np.float64) - b)) <= 2e-5 * np.max(np.abs(b))
    # a stack passes them to every layer
    stack = init_stack(jax.random.PRNGKey(1), D, [H, 2], dtype=jnp.float64)
    out = [lstm_stack(stack, xs, gate_fn=gate_fn, activation_fn=act_fn, impl=i)[0] for i in ("manual", "autodiff")]
    np.testing.assert_allclose(out[0], out[1], rtol=1e-12)


def test_activations_must_be_callable():
    p, xs, _, _ = _problem(12)
    with pytest.raises(TypeError, match="gate_fn"):
        lstm(p, xs, gate_fn="sigmoid")
