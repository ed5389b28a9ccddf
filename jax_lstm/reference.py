"""``lstm_ref``: a plain ``lax.scan`` over the cell's equations, differentiated by autodiff.

This is the oracle every hand-written gradient is checked against; it is kept
deliberately simple: one step function (``_step``: reset, dropout on h_{t-1},
the cell of ``jax_lstm.cell``, skip) scanned over time. ``lstm_trace`` runs
the same step and returns every gate at every step, for inspection.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from jax_lstm._inputs import Prepared, prepare
from jax_lstm.cell import (
    LSTMState,
    cell_update,
    family_step,
    gate_activations,
    is_plain,
    preactivations,
    split_gates,
)

__all__ = ["lstm_ref", "lstm_trace", "LSTMTrace", "LayerNormTrace"]


def lstm_ref(
    params,
    xs,
    state0=None,
    *,
    seq_lengths=None,
    mask=None,
    resets=None,
    reset_state=None,
    recurrent_dropout=0.0,
    key=None,
    reverse=False,
    unroll=1,
    time_major=True,
    gate_fn=jax.nn.sigmoid,
    activation_fn=jnp.tanh,
):
    """Run an LSTM layer over a sequence with ``lax.scan``; gradients by autodiff.

    Args:
      params: ``LSTMParams`` with W: (H, 4H), U: (D, 4H), b: (4H,), and
        optionally W_proj, peephole, norm (``jax_lstm.cell``); with a
        projection h (in states, hs, reset states, dropout) is (B, P).
      xs: (T, B, D) inputs, time-major; (B, T, D) with ``time_major=False``.
      state0: ``LSTMState`` with h, c: (B, H); None means zeros.
      seq_lengths: optional (B,) integer lengths; steps t >= seq_lengths[b] are
        padding (zero output, state unchanged). Concrete lengths outside [0, T]
        raise ``ValueError``; under ``jit`` they act as clamped to [0, T].
      mask: optional (T, B) bool ((B, T) batch-major); a False step is skipped.
      resets: optional (T, B) bool ((B, T) batch-major); where True the state is
        set to ``reset_state`` just before step t is visited.
      reset_state: ``LSTMState`` with h, c: (B, H) that a reset restores; None means zeros.
      recurrent_dropout: rate of variational dropout on h_{t-1} (one (B, H)
        mask per sequence, drawn from ``key``).
      key: PRNG key, required when ``recurrent_dropout > 0``.
      reverse: visit steps from T-1 down to 0.
      unroll: passed to ``lax.scan``.
      time_major: False for batch-major xs, hs, mask and resets.
      gate_fn: element-wise activation of the f, i, o gates (static).
      activation_fn: element-wise activation of g and of c_t in h_t (static).

    Returns:
      ``(hs, final_state)`` with hs: (T, B, H) ((B, T, H) batch-major) and
      h, c: (B, H), all in the common dtype of params and xs.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> import jax_lstm as jl
      >>> p = jl.init_params(jax.random.PRNGKey(0), 3, 4)
      >>> xs = jnp.ones((5, 2, 3))
      >>> hs, state = jl.lstm_ref(p, xs)                            # the same values as jl.lstm
      >>> loss = lambda layer: lambda p: jnp.sum(layer(p, xs)[0] ** 2)
      >>> g_ref, g = jax.grad(loss(jl.lstm_ref))(p), jax.grad(loss(jl.lstm))(p)
      >>> bool(jnp.allclose(g_ref.W, g.W, atol=1e-6))               # autodiff agrees with the hand-written BPTT
      True
    """
    a = prepare(
        params,
        xs,
        state0,
        seq_lengths=seq_lengths,
        mask=mask,
        resets=resets,
        reset_state=reset_state,
        recurrent_dropout=recurrent_dropout,
        key=key,
        unroll=unroll,
        time_major=time_major,
        gate_fn=gate_fn,
        activation_fn=activation_fn,
    )
    mask, resets = _step_flags(a)

    def step(state, inp):
        state, out = _step(a, gate_fn, activation_fn, state, *inp)
        return state, out[5]  # h_t

    final, hs = jax.lax.scan(step, a.state0, (a.xs, mask, resets), reverse=reverse, unroll=unroll)
    hs = hs.astype(a.dtype)
    return (hs if time_major else jnp.swapaxes(hs, 0, 1)), LSTMState(final.h.astype(a.dtype), final.c.astype(a.dtype))


def _step_flags(a: Prepared) -> tuple[jax.Array, jax.Array]:
    """(T, B) bool arrays of the steps that run and of the resets (all True / all False when not given)."""
    ones = jnp.ones(a.xs.shape[:2], bool)
    return (ones if a.mask is None else a.mask), (~ones if a.resets is None else a.resets)


def _step(a: Prepared, gate_fn, activation_fn, state: LSTMState, x_t, m_t, r_t):
    """One visited step: the new state and (f, i, g, o, c_t, h_t), all zero where the step is skipped.

    A skipped step's input is replaced by zero before the cell sees it, so a
    NaN or Inf stored there (a missing value, masked out) reaches neither the
    output nor any gradient (``where`` alone would pass 0 * NaN = NaN back).
    """
    m = m_t[:, None]
    if a.reset_state is not None:  # the state entering the step: reset_state in the rows that reset
        r = r_t[:, None]
        state = LSTMState(jnp.where(r, a.reset_state.h, state.h), jnp.where(r, a.reset_state.c, state.c))
    h_in = state.h if a.keep is None else state.h * a.keep
    if a.mask is not None:
        x_t = jnp.where(m, x_t, jnp.zeros_like(x_t))
    zero = lambda v: None if v is None else jnp.where(m, v, jnp.zeros_like(v))  # noqa: E731
    if not is_plain(a.params):  # projection, peepholes, layer norm: the family's step
        s = family_step(a.params, h_in, state.c, x_t, state.h.dtype, gate_fn, activation_fn)
        new = LSTMState(jnp.where(m, s.h, state.h), jnp.where(m, s.c, state.c))
        return new, tuple(zero(v) for v in (s.f, s.i, s.g, s.o, s.c, s.h, s.x_norm, s.h_norm, s.c_norm))
    act = gate_activations(preactivations(a.params, h_in, x_t, state.h.dtype), gate_fn, activation_fn)
    c, _, h = cell_update(state.c, act, activation_fn)
    new = LSTMState(jnp.where(m, h, state.h), jnp.where(m, c, state.c))
    return new, tuple(zero(v) for v in (*split_gates(act), c, h))


class LSTMTrace(NamedTuple):
    """Every intermediate of a sequence run, each (T, B, H), in acc dtype.

    At padded steps (t >= seq_lengths[b]) all six are zero. With a projection
    h is (T, B, P).

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> import jax_lstm as jl
      >>> trace = jl.lstm_trace(jl.init_params(jax.random.PRNGKey(0), 3, 4), jnp.ones((5, 2, 3)))
      >>> trace.f.shape, trace.c.shape, trace.h.shape               # each (T, B, H)
      ((5, 2, 4), (5, 2, 4), (5, 2, 4))
    """

    f: jax.Array
    i: jax.Array
    g: jax.Array
    o: jax.Array
    c: jax.Array
    h: jax.Array


class LayerNormTrace(NamedTuple):
    """``LSTMTrace``'s six fields and the normalised values of the layer-normalised LSTM.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> import jax_lstm as jl
      >>> p = jl.init_params(jax.random.PRNGKey(0), 3, 4, layer_norm=True)
      >>> trace = jl.lstm_trace(p, jnp.ones((5, 2, 3)))
      >>> trace.x_norm.shape, trace.c_norm.shape                    # (T, B, 4H), (T, B, H)
      ((5, 2, 16), (5, 2, 4))
    """

    f: jax.Array
    i: jax.Array
    g: jax.Array
    o: jax.Array
    c: jax.Array
    h: jax.Array
    x_norm: jax.Array  # (T, B, 4H) LN(x_t @ U) * gamma_x
    h_norm: jax.Array  # (T, B, 4H) LN(h_{t-1} @ W) * gamma_h
    c_norm: jax.Array  # (T, B, H)  LN(c_t) * gamma_c + beta_c


def lstm_trace(
    params,
    xs,
    state0=None,
    *,
    seq_lengths=None,
    mask=None,
    resets=None,
    reset_state=None,
    recurrent_dropout=0.0,
    key=None,
    reverse=False,
    time_major=True,
    gate_fn=jax.nn.sigmoid,
    activation_fn=jnp.tanh,
) -> LSTMTrace | LayerNormTrace:
    """Gate inspection: f, i, g, o, c and h at every step, each (T, B, H) ((B, T, H) batch-major).

    Same arguments and semantics as ``lstm_ref``; ``trace.h`` equals its ``hs``.
    All six are zero at skipped steps. With layer norm (``params.norm``) the
    result is a ``LayerNormTrace``, which adds x_norm, h_norm (T, B, 4H) and
    c_norm (T, B, H), the normalised values, also zero at skipped steps.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> import jax_lstm as jl
      >>> p = jl.init_params(jax.random.PRNGKey(0), 3, 4)
      >>> trace = jl.lstm_trace(p, jnp.ones((5, 2, 3)), seq_lengths=jnp.array([5, 2]))
      >>> trace.i.shape, float(jnp.abs(trace.h[4, 1]).sum())        # zero at a padded step
      ((5, 2, 4), 0.0)
    """
    a = prepare(
        params,
        xs,
        state0,
        seq_lengths=seq_lengths,
        mask=mask,
        resets=resets,
        reset_state=reset_state,
        recurrent_dropout=recurrent_dropout,
        key=key,
        time_major=time_major,
        gate_fn=gate_fn,
        activation_fn=activation_fn,
    )
    mask, resets = _step_flags(a)

    def step(state, inp):
        return _step(a, gate_fn, activation_fn, state, *inp)

    _, out = jax.lax.scan(step, a.state0, (a.xs, mask, resets), reverse=reverse)
    cls = LSTMTrace if a.params.norm is None else LayerNormTrace
    return cls(*(v if time_major else jnp.swapaxes(v, 0, 1) for v in out[: len(cls._fields)]))
