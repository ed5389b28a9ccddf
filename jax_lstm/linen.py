"""``jax_lstm.linen.LSTM``: a Flax Linen module around ``lstm_stack`` (the hand-written BPTT).

It takes the place of ``nn.RNN(nn.OptimizedLSTMCell(...))`` (and of
``nn.Bidirectional`` and stacks of them)::

    # Flax
    rnn = nn.RNN(nn.OptimizedLSTMCell(hidden), return_carry=True)
    carry, ys = rnn.apply(variables, xs, seq_lengths=lengths)             # carry = (c, h)
    # jax_lstm
    rnn = jax_lstm.linen.LSTM(hidden)
    carry, ys = rnn.apply(variables, xs, seq_lengths=lengths, return_carry=True)   # carry = LSTMState(h, c)

Unlike Flax's ``RNN``, outputs at padded steps (``t >= seq_lengths[b]``) are zero.
The variables are ``{"params": {"stack": stack}}`` with ``stack`` in
``init_stack``'s nesting; ``to_variables`` and ``from_variables`` convert.
Needs flax (``pip install 'jax_lstm[flax]'``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

try:
    import flax.linen as nn
except ImportError as e:  # pragma: no cover - exercised in a subprocess by the tests
    raise ImportError("jax_lstm.linen needs flax: pip install 'jax_lstm[flax]'") from e

from jax_lstm._modules import as_stack, check_rate, hidden_sizes, raw_key, run_stack
from jax_lstm.layers import init_stack

__all__ = ["LSTM", "to_variables", "from_variables"]

PARAM_NAME = "stack"


class LSTM(nn.Module):
    """A stack of LSTM layers (optionally bidirectional) with the hand-written BPTT.

    Per layer and direction the cell is (gate blocks [f | i | g | o])::

        z_t = h_{t-1} @ W + x_t @ U + b
        c_t = sigmoid(z_f) * c_{t-1} + sigmoid(z_i) * tanh(z_g)
        h_t = sigmoid(z_o) * tanh(c_t)

    The same function as ``nn.OptimizedLSTMCell``; weights convert exactly with
    ``jax_lstm.interop.from_flax``.

    Parameters: one entry ``"stack"`` holding ``init_stack``'s nesting (a tuple of
    layers, each a tuple of one ``LSTMParams`` per direction), so
    ``from_variables(variables)`` is ready for ``lstm_stack`` and
    ``jax_lstm.interop``, and ``to_variables(stack)`` goes back.

    The carry is jax_lstm's ``LSTMState(h, c)`` (h, c: (B, H)) for one
    unidirectional layer, and otherwise the stack's nesting: per layer a tuple
    with one ``LSTMState`` per direction (forward, reverse). Flax's LSTM cells
    use ``(c, h)``: a plain tuple is refused.

    Attributes:
      features: H for every layer, or one size per layer.
      num_layers: number of layers when ``features`` is an int.
      bidirectional: every layer also runs in reverse; its output is
        ``[forward | reverse]``, 2 H wide.
      dropout: inverted dropout on each layer's output before the next layer
        (never on the last layer's output), a Python float in [0, 1).
      recurrent_dropout: inverted dropout on h_{t-1} where it enters the gates,
        one mask per sequence, layer and direction.
      forget_bias: initial value of the forget-gate bias.
      time_major: inputs (T, B, D) instead of (B, T, D) (also ``mask`` and
        ``resets``).
      dtype: the computation dtype (params and inputs are cast to it), or None
        for the common dtype of the params and the inputs.
      param_dtype: the dtype the weights are initialised in.
    """

    features: int | Sequence[int]
    num_layers: int = 1
    bidirectional: bool = False
    dropout: float = 0.0
    recurrent_dropout: float = 0.0
    forget_bias: float = 1.0
    time_major: bool = False
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(
        self,
        inputs: jax.Array,
        *,
        initial_carry=None,
        seq_lengths: jax.Array | None = None,
        mask: jax.Array | None = None,
        resets: jax.Array | None = None,
        return_carry: bool = False,
        deterministic: bool = True,
    ):
        """Run the stack over a batch of sequences.

        Args:
          inputs: (B, T, D), or (T, B, D) with ``time_major=True``.
          initial_carry: ``LSTMState(h, c)`` (one unidirectional layer) or the
            stack nesting of ``LSTMState``; h, c: (B, H_l). None means zeros.
          seq_lengths: optional (B,) integer lengths; steps t >= seq_lengths[b]
            are padding: zero output, state unchanged.
          mask: optional (B, T) bool ((T, B) time-major); False skips the step.
          resets: optional (B, T) bool ((T, B) time-major); True sets the state
            back to ``initial_carry`` (zeros if None) before the step.
          return_carry: also return the final carry.
          deterministic: True turns dropout off; with False the key comes from
            ``self.make_rng("dropout")`` (pass ``rngs={"dropout": key}`` to
            ``apply``).

        Returns:
          ``outputs`` (B, T, H_L), or (B, T, 2 H_L) bidirectional (time-major:
          (T, B, ...)); with ``return_carry``, ``(carry, outputs)``.
        """
        sizes = hidden_sizes(self.features, self.num_layers, "features")
        dropout = check_rate(self.dropout, "dropout")
        recurrent_dropout = check_rate(self.recurrent_dropout, "recurrent_dropout")
        if not hasattr(inputs, "ndim") or inputs.ndim != 3:
            axes = "(T, B, D)" if self.time_major else "(B, T, D)"
            raise ValueError(f"inputs has shape {getattr(inputs, 'shape', None)}, expected {axes}")
        stack = self.param(
            PARAM_NAME,
            lambda key: init_stack(
                raw_key(key),
                int(inputs.shape[-1]),
                sizes,
                bidirectional=self.bidirectional,
                forget_bias=self.forget_bias,
                dtype=self.param_dtype,
            ),
        )
        if deterministic or len(sizes) == 1:
            dropout = 0.0
        if deterministic:
            recurrent_dropout = 0.0
        key = self.make_rng("dropout") if dropout > 0.0 or recurrent_dropout > 0.0 else None
        carry, outputs = run_stack(
            stack,
            inputs,
            initial_carry,
            time_major=self.time_major,
            dtype=self.dtype,
            seq_lengths=seq_lengths,
            mask=mask,
            resets=resets,
            dropout=dropout,
            recurrent_dropout=recurrent_dropout,
            key=key,
        )
        return (carry, outputs) if return_carry else outputs


def to_variables(stack) -> dict[str, dict[str, Any]]:
    """``init_stack``'s nesting (e.g. from ``jax_lstm.interop``) as the variables of ``LSTM``.

    Returns:
      ``{"params": {"stack": stack}}``, ready for ``LSTM(...).apply``.
    """
    return {"params": {PARAM_NAME: as_stack(stack)}}


def from_variables(variables):
    """The ``StackParams`` of an ``LSTM`` from its variables.

    Args:
      variables: ``{"params": {"stack": ...}}`` as ``init`` returns, or the
        inner ``{"stack": ...}`` (e.g. the LSTM's entry in a parent's params).
    """
    if not isinstance(variables, Mapping):
        raise TypeError(f"variables must be a mapping, got {type(variables).__name__}")
    tree = variables["params"] if "params" in variables and isinstance(variables["params"], Mapping) else variables
    if PARAM_NAME not in tree:
        raise KeyError(f"no {PARAM_NAME!r} entry in the variables (keys: {sorted(tree)})")
    return as_stack(tree[PARAM_NAME])
