"""Where the state entering each step comes from: the previous step, the last step that ran, h0 or the reset state.

The backward kernels (``bptt``, ``bptt_family``) read, at step t, the h_{t-1}
(and the family's c_{t-1}) that step t saw in the forward pass.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["entering_rows", "entering_src"]


def entering_rows(T, mask, resets, reverse):
    """``entering(a, first, reset, t)``: the state entering step t, (B, ·), read from ``a`` (T, B, ·),
    the values of the steps that ran (``hs``, or the family's ``cs``); ``first`` at the start (h0, c0),
    ``reset`` at a reset (the reset state).

    Without a mask it is the previous step's row. With one, the previous output
    may be a skipped step's zero: the state entering step t is the output of the
    last step that ran before it, unless the start or a reset came after that
    step. ``entering_src`` finds that for all t at once: each step gets an event
    code in run order k (k = t forward, T - 1 - t reversed): 2k + 1 where the
    step ran, 2k where it was skipped but reset, -1 otherwise. A running maximum
    of the codes gives, at every t, the latest event: an odd one names the step
    whose output is carried, an even one a reset, -1 the start. For one row,
    forward, with steps 1 and 3 skipped and a reset at 3::

        t           0    1    2    3    4
        ran         y    n    y    n    y
        reset       n    n    n    y    n
        event       1   -1    5    6    9
        cummax      1    1    5    6    9
        carried     0    0    2   hr    4     (after step t: odd code 2k + 1 -> step k's output)
        entering   h0  hs0  hs0   hr   hr     (the carried value after step t - 1; a reset at t: hr)
    """
    if mask is None:

        def entering(a, first, reset, t):
            t = t.astype(jnp.int32)
            prev = jnp.clip(t + (1 if reverse else -1), 0, T - 1)
            v = jnp.where(t == (T - 1 if reverse else 0), first, jax.lax.dynamic_index_in_dim(a, prev, keepdims=False))
            if resets is None:
                return v
            return jnp.where(jax.lax.dynamic_index_in_dim(resets, t, keepdims=False)[:, None], reset, v)

        return entering
    src = entering_src(mask, resets, reverse)  # (T, B): a step index, -1 the start, -2 the reset state

    def entering(a, first, reset, t):
        s = jax.lax.dynamic_index_in_dim(src, t, keepdims=False)
        got = jnp.take_along_axis(a, jnp.maximum(s, 0)[None, :, None], axis=0)[0]
        start = first if reset is None else jnp.where((s == -2)[:, None], reset, first)
        return jnp.where((s >= 0)[:, None], got, start)

    return entering


def entering_src(mask, resets, reverse):
    """(T, B) int32: where the state entering step t comes from (``entering_rows``): the time index of the
    step whose output it is, -1 the initial state, -2 the reset state."""
    T = mask.shape[0]
    k = jnp.arange(T, dtype=jnp.int32)[:, None]
    pos = T - 1 - k if reverse else k  # run position of step t
    event = jnp.where(mask, 2 * pos + 1, -1)
    if resets is not None:
        event = jnp.where(~mask & resets, 2 * pos, event)
    last = jax.lax.cummax(event, axis=0, reverse=reverse)  # the latest event at or before t in run order
    # what is carried after step t: the time index of the step whose output it is, -2 the reset state, -1 h0
    ran = last // 2 if not reverse else T - 1 - last // 2
    src_after = jnp.where(last < 0, -1, jnp.where(last % 2 == 1, ran, -2))
    start = jnp.full_like(src_after[:1], -1)  # entering t: what is carried after t - 1 in run order
    src_in = jnp.concatenate([src_after[1:], start] if reverse else [start, src_after[:-1]], axis=0)
    if resets is not None:
        src_in = jnp.where(resets, -2, src_in)
    return src_in
