"""What the Flax NNX, Flax Linen and Equinox modules share: options, carries, one call of ``lstm_stack``.

Nothing here computes a step of the LSTM: every module ends in ``run_stack``,
which calls ``jax_lstm.layers.lstm_stack`` (the hand-written BPTT).

The carry of a module is jax_lstm's ``LSTMState(h, c)`` when the stack has one
unidirectional layer, and otherwise the stack's own nesting: per layer a tuple
with one ``LSTMState`` per direction (forward, reverse). Flax's cells order
their carry ``(c, h)``; a plain tuple is therefore refused where an
``LSTMState`` is expected, so that a Flax carry cannot be read the wrong way
round.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jax_lstm.cell import LSTMParams, LSTMState
from jax_lstm.layers import lstm_stack, stack_sizes

__all__ = [
    "hidden_sizes",
    "check_rate",
    "layout",
    "raw_key",
    "as_stack",
    "run_stack",
    "to_stack_states",
    "to_carry",
]


def hidden_sizes(hidden, num_layers, name: str = "hidden_features") -> tuple[int, ...]:
    """One hidden size per layer from an int (repeated ``num_layers`` times) or a sequence of ints.

    With a sequence, ``num_layers`` must be its length or left at its default of 1.
    """
    if isinstance(num_layers, bool) or not isinstance(num_layers, (int, np.integer)) or num_layers < 1:
        raise ValueError(f"num_layers must be a positive int, got {num_layers!r}")
    if isinstance(hidden, (int, np.integer)) and not isinstance(hidden, bool):
        sizes = (int(hidden),) * int(num_layers)
    elif isinstance(hidden, Sequence) and not isinstance(hidden, str):
        sizes = tuple(hidden)
        if len(sizes) == 0:
            raise ValueError(f"{name} must name at least one layer, got an empty sequence")
        if num_layers not in (1, len(sizes)):
            raise ValueError(
                f"{name} gives {len(sizes)} layer sizes {sizes} but num_layers={num_layers}: "
                "pass one size per layer and leave num_layers out, or one int"
            )
    else:
        raise TypeError(f"{name} must be an int or a sequence of ints (one per layer), got {hidden!r}")
    for l, h in enumerate(sizes):
        if isinstance(h, bool) or not isinstance(h, (int, np.integer)) or h < 1:
            raise ValueError(f"{name}[{l}] must be a positive int, got {h!r}")
    return tuple(int(h) for h in sizes)


def check_rate(value, name: str) -> float:
    """A dropout rate as a Python float in [0, 1)."""
    if isinstance(value, bool) or not isinstance(value, (float, int, np.floating, np.integer)):
        raise TypeError(f"{name} must be a Python float in [0, 1), got {type(value).__name__}")
    if not 0.0 <= float(value) < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {value!r}")
    return float(value)


def layout(stack) -> tuple[int, tuple[int, ...], bool]:
    """(input size, hidden size per layer, bidirectional) of a stack whose layers all have the same direction count."""
    d0, sizes = stack_sizes(stack)
    dirs = {n for _, _, n in sizes}
    if len(dirs) != 1:
        raise ValueError(
            "a module's layers must all be unidirectional or all bidirectional; directions per layer: "
            f"{[n for _, _, n in sizes]}"
        )
    return d0, tuple(h for _, h, _ in sizes), dirs == {2}


def raw_key(key: jax.Array) -> jax.Array:
    """A typed PRNG key (``jax.random.key``, what ``nnx.Rngs`` hands out) as a raw uint32 key."""
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        return jax.random.key_data(key)
    return key


def _is_single(stack) -> bool:
    return len(stack) == 1 and len(stack[0]) == 1


def _check_state(s, where: str) -> None:
    if s is not None and not isinstance(s, LSTMState):
        raise TypeError(
            f"{where} must be jax_lstm.LSTMState(h, c) or None, got {type(s).__name__}: jax_lstm's carry is "
            "LSTMState(h, c), while Flax's LSTM cells use (c, h); build LSTMState(h=..., c=...) explicitly"
        )


def to_stack_states(carry, stack, name: str = "initial_carry"):
    """A module carry (``LSTMState``, or the stack nesting) as ``lstm_stack``'s ``states0``."""
    if carry is None:
        return None
    if _is_single(stack) and isinstance(carry, LSTMState):
        return ((carry,),)
    if not isinstance(carry, LSTMState) and isinstance(carry, tuple) and len(carry) == 2:
        if all(hasattr(a, "shape") for a in carry):  # (h, c) or Flax's (c, h): ambiguous
            _check_state(carry, name)
    if isinstance(carry, LSTMState):
        raise TypeError(
            f"{name} is one LSTMState, but the stack has {len(stack)} layer(s) with {len(stack[0])} direction(s): "
            "pass a tuple with one entry per layer, each a tuple of one LSTMState per direction"
        )
    if not isinstance(carry, (tuple, list)) or len(carry) != len(stack):
        raise TypeError(
            f"{name} must be "
            + ("an LSTMState(h, c) or " if _is_single(stack) else "")
            + f"a tuple with one entry per layer ({len(stack)}), each None or a tuple of one LSTMState per "
            f"direction; got {type(carry).__name__}"
            + (f" of length {len(carry)}" if isinstance(carry, (tuple, list)) else "")
        )
    for l, layer in enumerate(carry):
        if layer is None:
            continue
        if isinstance(layer, LSTMState) or not isinstance(layer, (tuple, list)) or len(layer) != len(stack[l]):
            raise TypeError(
                f"{name}[{l}] must be None or a tuple of {len(stack[l])} LSTMState (one per direction), "
                f"got {type(layer).__name__}"
            )
        for k, s in enumerate(layer):
            _check_state(s, f"{name}[{l}][{k}]")
    return tuple(carry)


def to_carry(finals, stack):
    """``lstm_stack``'s final states as a module carry: one ``LSTMState`` for a single unidirectional layer."""
    return finals[0][0] if _is_single(stack) else finals


def run_stack(
    stack,
    inputs: jax.Array,
    carry=None,
    *,
    time_major: bool,
    dtype=None,
    seq_lengths=None,
    mask=None,
    resets=None,
    dropout: float = 0.0,
    recurrent_dropout: float = 0.0,
    key: jax.Array | None = None,
    name: str = "inputs",
    carry_name: str = "initial_carry",
):
    """Check the module inputs, cast to ``dtype`` (params and inputs) and call ``lstm_stack``.

    Args:
      stack: ``StackParams``.
      inputs: (B, T, D) if not ``time_major``, else (T, B, D).
      carry: the module carry (see the module docstring) or None for zeros.
      time_major: the layout of ``inputs``, ``mask`` and ``resets``.
      dtype: computation dtype, or None to compute in the common dtype of the
        params and the inputs.
      seq_lengths, mask, resets: as ``lstm_stack`` takes them.
      dropout: between-layer dropout rate (0 in evaluation).
      recurrent_dropout: recurrent dropout rate (0 in evaluation).
      key: PRNG key, needed when a rate is > 0.

    Returns:
      ``(carry, outputs)``: outputs in the layout of ``inputs``, last axis
      ``H_L`` (or ``2 H_L`` bidirectional); the final carry.
    """
    d0, _, _ = layout(stack)
    if not hasattr(inputs, "shape") or not hasattr(inputs, "dtype"):
        raise TypeError(f"{name} must be an array, got {type(inputs).__name__}")
    axes = "(T, B, D)" if time_major else "(B, T, D)"
    if inputs.ndim != 3 or inputs.shape[-1] != d0:
        raise ValueError(
            f"{name} has shape {tuple(inputs.shape)}, expected {axes} with D = {d0} "
            f"({'time-major' if time_major else 'batch-major'}; the module was built for {d0} input features)"
        )
    states0 = to_stack_states(carry, stack, carry_name)
    if dtype is not None:
        stack = jax.tree.map(lambda a: jnp.asarray(a, dtype), stack)
        inputs = jnp.asarray(inputs, dtype)
    dropout = dropout if len(stack) > 1 else 0.0  # between layers only
    hs, finals = lstm_stack(
        stack,
        inputs,
        states0,
        seq_lengths=seq_lengths,
        mask=mask,
        resets=resets,
        dropout=dropout,
        recurrent_dropout=recurrent_dropout,
        key=key if (dropout > 0.0 or recurrent_dropout > 0.0) else None,
        time_major=time_major,
    )
    return to_carry(finals, stack), hs


def as_stack(stack):
    """A stack with every array as a JAX array (NumPy arrays from ``jax_lstm.interop`` included)."""
    layout(stack)
    return tuple(tuple(LSTMParams(*(jnp.asarray(a) for a in p)) for p in layer) for layer in stack)
