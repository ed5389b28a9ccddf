"""``lstm_ref`` semantics (padding, reverse, state0) and gate inspection with ``lstm_trace``."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jax_lstm import LSTMState, lstm_cell, lstm_ref, lstm_trace
from jax_lstm.gradcheck import random_problem

D, H = 3, 4


def _run_one(p, x, s, reverse):
    """Step a single sequence (T, 1, D) by hand with lstm_cell."""
    order = range(x.shape[0] - 1, -1, -1) if reverse else range(x.shape[0])
    outs = {}
    for t in order:
        s, outs[t] = lstm_cell(p, s, x[t])
    return jnp.stack([outs[t] for t in range(x.shape[0])]), s


def test_padding_semantics_forward_and_reverse():
    T, B = 6, 4
    p, xs, s0 = random_problem(0, T, B, D, H)
    lengths = jnp.array([0, 1, 3, 6], jnp.int32)
    for reverse in (False, True):
        hs, (h, c) = lstm_ref(p, xs, s0, seq_lengths=lengths, reverse=reverse)
        for b, L in enumerate(np.asarray(lengths)):
            sb = LSTMState(s0.h[b : b + 1], s0.c[b : b + 1])
            assert np.all(np.asarray(hs[L:, b]) == 0)  # padding stays at the end, zero
            if L == 0:
                np.testing.assert_array_equal(h[b], s0.h[b])
                np.testing.assert_array_equal(c[b], s0.c[b])
                continue
            hs_b, (h_b, c_b) = _run_one(p, xs[:L, b : b + 1], sb, reverse)
            np.testing.assert_allclose(hs[:L, b], hs_b[:, 0], rtol=1e-14, atol=1e-15)
            np.testing.assert_allclose(h[b], h_b[0], rtol=1e-14)
            np.testing.assert_allclose(c[b], c_b[0], rtol=1e-14)


def test_reverse_equals_flipped_forward():
    p, xs, s0 = random_problem(1, 5, 2, D, H)
    hs_r, st_r = lstm_ref(p, xs, s0, reverse=True)
    hs_f, st_f = lstm_ref(p, xs[::-1], s0)
    np.testing.assert_allclose(hs_r, hs_f[::-1], rtol=1e-14)
    np.testing.assert_allclose(st_r.c, st_f.c, rtol=1e-14)


def test_unroll_changes_nothing():
    p, xs, s0 = random_problem(2, 9, 2, D, H)
    a = lstm_ref(p, xs, s0, unroll=1)
    b = lstm_ref(p, xs, s0, unroll=4)
    # the two compiled loops round differently (a few ulps of an element): compare normwise
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert np.max(np.abs(np.asarray(x) - np.asarray(y))) <= 1e-14 * np.max(np.abs(np.asarray(y)))


def test_lstm_trace_gates_reproduce_the_run():
    T, B = 5, 3
    p, xs, s0 = random_problem(3, T, B, D, H)
    lengths = jnp.array([5, 2, 0], jnp.int32)
    tr = lstm_trace(p, xs, s0, seq_lengths=lengths)
    hs, _ = lstm_ref(p, xs, s0, seq_lengths=lengths)
    assert all(a.shape == (T, B, H) for a in tr)
    np.testing.assert_allclose(tr.h, hs, rtol=1e-14)
    np.testing.assert_allclose(tr.h, np.tanh(tr.c) * tr.o, rtol=1e-14)
    assert np.all((np.asarray(tr.f) >= 0) & (np.asarray(tr.f) <= 1))
    assert np.all(np.asarray(tr.f)[2:, 1] == 0) and np.all(np.asarray(tr.g)[:, 2] == 0)
    # c_t = c_{t-1} * f + i * g on valid steps
    c_prev = jnp.concatenate([s0.c[None], tr.c[:-1]])
    np.testing.assert_allclose(tr.c[:2], (c_prev * tr.f + tr.i * tr.g)[:2], rtol=1e-14)
