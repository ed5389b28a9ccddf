"""The cell: parameter layout, initialisation and one step against the seed's equations."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_lstm import LSTMParams, LSTMState, init_params, lstm_cell, zeros_state
from jax_lstm.cell import gate_activations


def test_init_params_shapes_dtype_and_forget_bias():
    p = init_params(jax.random.PRNGKey(0), 3, 5, forget_bias=2.5, dtype=jnp.float64)
    assert isinstance(p, LSTMParams)
    assert p.W.shape == (5, 20) and p.U.shape == (3, 20) and p.b.shape == (20,)
    assert p.W.dtype == p.U.dtype == p.b.dtype == jnp.float64
    np.testing.assert_array_equal(p.b[:5], 2.5)  # forget block first
    np.testing.assert_array_equal(p.b[5:], 0.0)
    for k in range(4):  # each recurrent gate block is orthogonal
        blk = np.asarray(p.W[:, 5 * k : 5 * (k + 1)])
        np.testing.assert_allclose(blk.T @ blk, np.eye(5), atol=1e-6)
    assert not np.allclose(p.U, 0)


@pytest.mark.parametrize("bad", [0, -1, 2.0])
def test_init_params_rejects_bad_sizes(bad):
    with pytest.raises(ValueError, match="input_size"):
        init_params(jax.random.PRNGKey(0), bad, 4)


def test_zeros_state():
    s = zeros_state(3, 4, jnp.float32)
    assert isinstance(s, LSTMState) and s.h.shape == s.c.shape == (3, 4) and s.h.dtype == jnp.float32
    assert not np.any(s.h) and not np.any(s.c)


def test_gate_activations_sigmoid_and_tanh_blocks():
    z = jax.random.normal(jax.random.PRNGKey(1), (2, 12), jnp.float64) * 3
    a = gate_activations(z)
    sig = lambda x: 1 / (1 + np.exp(-x))  # noqa: E731
    zn = np.asarray(z)
    want = np.concatenate([sig(zn[:, :3]), sig(zn[:, 3:6]), np.tanh(zn[:, 6:9]), sig(zn[:, 9:])], axis=1)
    np.testing.assert_allclose(a, want, rtol=1e-14, atol=1e-15)


def test_lstm_cell_matches_the_seed_equations():
    """One step against the seed's forward equations written out in NumPy, gate order f, i, g, o."""
    D, H, B = 3, 4, 2
    ks = jax.random.split(jax.random.PRNGKey(2), 5)
    p = LSTMParams(
        *(jax.random.normal(k, s, jnp.float64) for k, s in zip(ks[:3], [(H, 4 * H), (D, 4 * H), (4 * H,)], strict=True))
    )
    h, c = (jax.random.normal(k, (B, H), jnp.float64) for k in ks[3:5])
    x = jax.random.normal(jax.random.PRNGKey(3), (B, D), jnp.float64)
    (h1, c1), out = lstm_cell(p, LSTMState(h, c), x)

    W, U, b, hn, cn, xn = (np.asarray(a) for a in (*p, h, c, x))
    sig = lambda v: 1 / (1 + np.exp(-v))  # noqa: E731
    blk = lambda M, k: M[..., k * H : (k + 1) * H]  # noqa: E731
    f = sig(hn @ blk(W, 0) + xn @ blk(U, 0) + blk(b, 0))
    i = sig(hn @ blk(W, 1) + xn @ blk(U, 1) + blk(b, 1))
    g = np.tanh(hn @ blk(W, 2) + xn @ blk(U, 2) + blk(b, 2))
    o = sig(hn @ blk(W, 3) + xn @ blk(U, 3) + blk(b, 3))
    c_want = cn * f + i * g
    h_want = np.tanh(c_want) * o
    np.testing.assert_allclose(c1, c_want, rtol=1e-13)
    np.testing.assert_allclose(h1, h_want, rtol=1e-13)
    np.testing.assert_array_equal(out, h1)


def test_lstm_cell_keeps_state_dtype_under_scan():
    p = init_params(jax.random.PRNGKey(0), 3, 4, dtype=jnp.bfloat16)
    s = zeros_state(2, 4, jnp.float32)
    xs = jnp.ones((5, 2, 3), jnp.bfloat16)
    final, hs = jax.lax.scan(lambda st, x: lstm_cell(p, st, x), s, xs)
    assert final.h.dtype == final.c.dtype == hs.dtype == jnp.float32
