"""``lstm_ref``: a plain ``lax.scan`` over ``lstm_cell``, differentiated by autodiff.

This is the oracle every hand-written gradient is checked against; it is kept
deliberately simple. ``lstm_trace`` runs the same scan and returns every gate
at every step, for inspection.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from jax_lstm.cell import (
    LSTMParams,
    LSTMState,
    acc_dtype,
    cell_update,
    check_inputs,
    gate_activations,
    lstm_cell,
    preactivations,
    split_gates,
)

__all__ = ["lstm_ref", "lstm_trace", "LSTMTrace", "prepare"]


def prepare(params, xs, state0, seq_lengths, unroll):
    """Validate and bring arguments to one dtype.

    Returns:
      (params, xs, state0, mask, dtype) where params and xs share ``dtype``,
      state0 is in ``acc_dtype(dtype)`` (zeros when None), and mask is a (T, B)
      bool array of valid steps or None.
    """
    T, B, _, H = check_inputs(params, xs, state0, seq_lengths, unroll)
    params = LSTMParams(*params)
    dtype = jnp.result_type(*params, xs)
    acc = acc_dtype(dtype)
    params = LSTMParams(*(p.astype(dtype) for p in params))
    xs = xs.astype(dtype)
    if state0 is None:
        z = jnp.zeros((B, H), acc)
        state0 = LSTMState(z, z)
    else:
        state0 = LSTMState(state0[0].astype(acc), state0[1].astype(acc))
    mask = None
    if seq_lengths is not None:
        mask = jnp.arange(T, dtype=seq_lengths.dtype)[:, None] < seq_lengths[None, :]
    return params, xs, state0, mask, dtype


def lstm_ref(params, xs, state0=None, *, seq_lengths=None, reverse=False, unroll=1):
    """Run an LSTM layer over a sequence with ``lax.scan``; gradients by autodiff.

    Args:
      params: ``LSTMParams`` with W: (H, 4H), U: (D, 4H), b: (4H,).
      xs: (T, B, D) inputs, time-major.
      state0: ``LSTMState`` with h, c: (B, H); None means zeros.
      seq_lengths: optional (B,) integer lengths; steps t >= seq_lengths[b] are
        padding (zero output, state unchanged).
      reverse: run each sequence from its last valid step down to step 0.
      unroll: passed to ``lax.scan``.

    Returns:
      ``(hs, final_state)`` with hs: (T, B, H) and h, c: (B, H), all in the
      common dtype of params and xs.
    """
    params, xs, state0, mask, dtype = prepare(params, xs, state0, seq_lengths, unroll)
    step = lambda state, x_t: lstm_cell(params, state, x_t)  # noqa: E731

    if mask is None:
        final, hs = jax.lax.scan(step, state0, xs, reverse=reverse, unroll=unroll)
    else:

        def masked_step(state, inp):
            x_t, m_t = inp
            new, h_t = step(state, x_t)
            m = m_t[:, None]
            new = LSTMState(jnp.where(m, new.h, state.h), jnp.where(m, new.c, state.c))
            return new, jnp.where(m, h_t, jnp.zeros_like(h_t))

        final, hs = jax.lax.scan(masked_step, state0, (xs, mask), reverse=reverse, unroll=unroll)
    return hs.astype(dtype), LSTMState(final.h.astype(dtype), final.c.astype(dtype))


class LSTMTrace(NamedTuple):
    """Every intermediate of a sequence run, each (T, B, H), in acc dtype.

    At padded steps (t >= seq_lengths[b]) all six are zero.
    """

    f: jax.Array
    i: jax.Array
    g: jax.Array
    o: jax.Array
    c: jax.Array
    h: jax.Array


def lstm_trace(params, xs, state0=None, *, seq_lengths=None, reverse=False) -> LSTMTrace:
    """Gate inspection: f, i, g, o, c and h at every step, each (T, B, H).

    Same arguments and semantics as ``lstm_ref``; ``trace.h`` equals its ``hs``.
    """
    params, xs, state0, mask, _ = prepare(params, xs, state0, seq_lengths, 1)
    acc = state0.h.dtype
    T, B = xs.shape[:2]
    if mask is None:
        mask = jnp.ones((T, B), bool)

    def step(state, inp):
        x_t, m_t = inp
        act = gate_activations(preactivations(params, state.h, x_t, acc))
        c, _, h = cell_update(state.c, act)
        m = m_t[:, None]
        new = LSTMState(jnp.where(m, h, state.h), jnp.where(m, c, state.c))
        zero = lambda a: jnp.where(m, a, jnp.zeros_like(a))  # noqa: E731
        return new, tuple(zero(a) for a in (*split_gates(act), c, h))

    _, out = jax.lax.scan(step, state0, (xs, mask), reverse=reverse)
    return LSTMTrace(*out)
