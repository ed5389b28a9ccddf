"""``lstm_ref``: a plain ``lax.scan`` over ``lstm_cell``, differentiated by autodiff.

This is the oracle every hand-written gradient is checked against; it is kept
deliberately simple. ``lstm_trace`` runs the same scan and returns every gate
at every step, for inspection.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from jax_lstm.cell import (
    LSTMParams,
    LSTMState,
    acc_dtype,
    cell_update,
    check_inputs,
    check_recurrent_dropout,
    check_step_flags,
    dropped_cell,
    gate_activations,
    make_varying,
    on_explicit_mesh,
    preactivations,
    split_gates,
    varying_axes,
)

__all__ = ["lstm_ref", "lstm_trace", "LSTMTrace", "Prepared", "prepare", "lengths_mask"]


class Prepared(NamedTuple):
    """Arguments of ``lstm``/``lstm_ref`` after validation, time-major, in their compute dtypes."""

    params: LSTMParams  # W, U, b in ``dtype``
    xs: jax.Array  # (T, B, D) in ``dtype``
    state0: LSTMState  # h, c: (B, H) in acc_dtype(dtype); zeros when None was given
    mask: jax.Array | None  # (T, B) bool: the steps that run (mask and seq_lengths together), or None
    resets: jax.Array | None  # (T, B) bool, or None
    keep: jax.Array | None  # (B, H) recurrent-dropout factor (0 or 1 / (1 - p)) in acc dtype, or None
    dtype: jnp.dtype


def lengths_mask(seq_lengths: jax.Array, T: int) -> jax.Array:
    """(T, B) bool, ``t < seq_lengths[b]``, exact for every integer dtype and every T.

    The comparison runs in the lengths' own dtype when every step index fits
    in it, and otherwise in int32, where every length does (a length is then
    at most the dtype's maximum, below T): never in a dtype that wraps.
    """
    if T - 1 <= jnp.iinfo(seq_lengths.dtype).max:
        t = jnp.arange(T, dtype=seq_lengths.dtype)
    else:
        t, seq_lengths = jnp.arange(T, dtype=jnp.int32), seq_lengths.astype(jnp.int32)
    return t[:, None] < seq_lengths[None, :]


def _check_length_values(seq_lengths, T: int) -> None:
    """Concrete lengths outside [0, T] are an error; traced ones (under jit) cannot be checked."""
    try:
        values = np.asarray(seq_lengths)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return
    if values.size == 0:
        return
    bad = (values < 0) | (values > T)
    if bad.any():
        b = int(np.argmax(bad))
        raise ValueError(
            f"seq_lengths[{b}] = {values[b]} is outside [0, T] = [0, {T}] for xs with T = {T} steps "
            f"(all out-of-range lengths: {values[bad].tolist()[:8]})"
        )


def _onto_mesh_of(xs, params, state0):
    """Weights and state placed for ``xs`` sharded on a mesh with Explicit axes (else unchanged).

    With batch-sharded inputs on such a mesh every contraction over the batch
    (a weight's gradient) must know where its result lives, and a loop carry
    must keep one sharding: weights on no mesh are taken as replicated (as a
    data-parallel step has them), and the state is split over the batch as
    ``xs`` is (a zero state made here, or under ``jax.set_mesh``, is replicated).
    """
    if not on_explicit_mesh(xs):
        return params, state0
    sharding = jax.typeof(xs).sharding
    mesh, spec = sharding.mesh, tuple(sharding.spec)
    batch_spec = spec[1] if len(spec) > 1 else None

    def place(a):
        on = getattr(jax.typeof(a).sharding, "mesh", None)
        return jax.sharding.reshard(a, NamedSharding(mesh, PartitionSpec())) if on is None or on.empty else a

    rows = NamedSharding(mesh, PartitionSpec(batch_spec, None))
    return jax.tree.map(place, params), jax.tree.map(lambda a: jax.sharding.reshard(a, rows), state0)


def prepare(
    params,
    xs,
    state0,
    *,
    seq_lengths=None,
    mask=None,
    resets=None,
    recurrent_dropout=0.0,
    key=None,
    unroll=1,
    time_major=True,
) -> Prepared:
    """Validate the arguments of ``lstm``/``lstm_ref`` and bring them to one layout and dtype.

    ``mask`` and ``seq_lengths`` are combined into one (T, B) mask of the steps
    that run; batch-major arrays are transposed to time-major.
    """
    if not isinstance(time_major, (bool, np.bool_)):
        raise TypeError(f"time_major must be a Python bool, got {type(time_major).__name__}")
    T, B, _, H = check_inputs(params, xs, state0, seq_lengths, unroll, time_major=bool(time_major))
    for name, a in (("mask", mask), ("resets", resets)):
        if a is not None:
            check_step_flags(name, a, T, B, bool(time_major))
    rate = check_recurrent_dropout(recurrent_dropout, key)
    params = LSTMParams(*params)
    dtype = jnp.result_type(*params, xs)
    acc = acc_dtype(dtype)
    params = LSTMParams(*(p.astype(dtype) for p in params))
    if state0 is None:
        z = jnp.zeros((B, H), acc)
        state0 = LSTMState(z, z)
    else:
        state0 = LSTMState(state0[0].astype(acc), state0[1].astype(acc))
    flip = (lambda a: a) if time_major else (lambda a: jnp.swapaxes(a, 0, 1))
    xs = flip(xs).astype(dtype)
    if mask is not None:
        mask = flip(mask)
    if seq_lengths is not None:
        _check_length_values(seq_lengths, T)
        by_length = lengths_mask(seq_lengths, T)
        mask = by_length if mask is None else mask & by_length
    if resets is not None:
        resets = flip(resets)
    keep = None
    if rate > 0.0:
        kept = jax.random.bernoulli(key, 1.0 - rate, (B, H))
        keep = jnp.where(kept, jnp.asarray(1.0 / (1.0 - rate), acc), jnp.zeros((), acc))
    params, state0 = _onto_mesh_of(xs, params, state0)
    # Inside shard_map the state is a loop carry: it must vary over every axis its updates vary over.
    axes = varying_axes(*params, xs, *state0, mask, resets, keep)
    state0 = LSTMState(*(make_varying(a, axes) for a in state0))
    return Prepared(params, xs, state0, mask, resets, keep, dtype)


def lstm_ref(
    params,
    xs,
    state0=None,
    *,
    seq_lengths=None,
    mask=None,
    resets=None,
    recurrent_dropout=0.0,
    key=None,
    reverse=False,
    unroll=1,
    time_major=True,
):
    """Run an LSTM layer over a sequence with ``lax.scan``; gradients by autodiff.

    Args:
      params: ``LSTMParams`` with W: (H, 4H), U: (D, 4H), b: (4H,).
      xs: (T, B, D) inputs, time-major; (B, T, D) with ``time_major=False``.
      state0: ``LSTMState`` with h, c: (B, H); None means zeros.
      seq_lengths: optional (B,) integer lengths; steps t >= seq_lengths[b] are
        padding (zero output, state unchanged). Concrete lengths outside [0, T]
        raise ``ValueError``; under ``jit`` they act as clamped to [0, T].
      mask: optional (T, B) bool ((B, T) batch-major); a False step is skipped.
      resets: optional (T, B) bool ((B, T) batch-major); where True the state is
        set to ``state0`` just before step t is visited.
      recurrent_dropout: rate of variational dropout on h_{t-1} (one (B, H)
        mask per sequence, drawn from ``key``).
      key: PRNG key, required when ``recurrent_dropout > 0``.
      reverse: visit steps from T-1 down to 0.
      unroll: passed to ``lax.scan``.
      time_major: False for batch-major xs, hs, mask and resets.

    Returns:
      ``(hs, final_state)`` with hs: (T, B, H) ((B, T, H) batch-major) and
      h, c: (B, H), all in the common dtype of params and xs.
    """
    a = prepare(
        params,
        xs,
        state0,
        seq_lengths=seq_lengths,
        mask=mask,
        resets=resets,
        recurrent_dropout=recurrent_dropout,
        key=key,
        unroll=unroll,
        time_major=time_major,
    )
    mask, resets = _step_flags(a)

    def step(state, inp):
        x_t, m_t, r_t = inp
        m = m_t[:, None]
        state = _reset(state, a.state0, r_t)
        new, h_t = dropped_cell(a.params, state, x_t, a.keep)
        new = LSTMState(jnp.where(m, new.h, state.h), jnp.where(m, new.c, state.c))
        return new, jnp.where(m, h_t, jnp.zeros_like(h_t))

    final, hs = jax.lax.scan(step, a.state0, (a.xs, mask, resets), reverse=reverse, unroll=unroll)
    hs = hs.astype(a.dtype)
    return (hs if time_major else jnp.swapaxes(hs, 0, 1)), LSTMState(final.h.astype(a.dtype), final.c.astype(a.dtype))


def _step_flags(a: Prepared) -> tuple[jax.Array, jax.Array]:
    """(T, B) bool arrays of the steps that run and of the resets (all True / all False when not given)."""
    ones = jnp.ones(a.xs.shape[:2], bool)
    return (ones if a.mask is None else a.mask), (~ones if a.resets is None else a.resets)


def _reset(state: LSTMState, state0: LSTMState, r_t: jax.Array) -> LSTMState:
    """The state entering a step: ``state0`` in the rows that reset there, else ``state``."""
    r = r_t[:, None]
    return LSTMState(jnp.where(r, state0.h, state.h), jnp.where(r, state0.c, state.c))


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


def lstm_trace(
    params,
    xs,
    state0=None,
    *,
    seq_lengths=None,
    mask=None,
    resets=None,
    recurrent_dropout=0.0,
    key=None,
    reverse=False,
    time_major=True,
) -> LSTMTrace:
    """Gate inspection: f, i, g, o, c and h at every step, each (T, B, H) ((B, T, H) batch-major).

    Same arguments and semantics as ``lstm_ref``; ``trace.h`` equals its ``hs``.
    All six are zero at skipped steps.
    """
    a = prepare(
        params,
        xs,
        state0,
        seq_lengths=seq_lengths,
        mask=mask,
        resets=resets,
        recurrent_dropout=recurrent_dropout,
        key=key,
        time_major=time_major,
    )
    acc = a.state0.h.dtype
    mask, resets = _step_flags(a)

    def step(state, inp):
        x_t, m_t, r_t = inp
        m = m_t[:, None]
        state = _reset(state, a.state0, r_t)
        h_in = state.h if a.keep is None else state.h * a.keep
        act = gate_activations(preactivations(a.params, h_in, x_t, acc))
        c, _, h = cell_update(state.c, act)
        new = LSTMState(jnp.where(m, h, state.h), jnp.where(m, c, state.c))
        zero = lambda v: jnp.where(m, v, jnp.zeros_like(v))  # noqa: E731
        return new, tuple(zero(v) for v in (*split_gates(act), c, h))

    _, out = jax.lax.scan(step, a.state0, (a.xs, mask, resets), reverse=reverse)
    return LSTMTrace(*(v if time_major else jnp.swapaxes(v, 0, 1) for v in out))
