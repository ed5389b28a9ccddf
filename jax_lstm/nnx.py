"""``jax_lstm.nnx.LSTM``: a Flax NNX module around ``lstm_stack`` (the hand-written BPTT).

It takes the place of ``nnx.RNN(nnx.OptimizedLSTMCell(...))`` (and of
``nnx.Bidirectional`` and stacks of them)::

    # Flax
    rnn = nnx.RNN(nnx.OptimizedLSTMCell(in_features, hidden, rngs=rngs))
    carry, ys = rnn(xs, seq_lengths=lengths, return_carry=True)        # carry = (c, h)
    # jax_lstm
    rnn = jax_lstm.nnx.LSTM(in_features, hidden, rngs=rngs)
    carry, ys = rnn(xs, seq_lengths=lengths, return_carry=True)        # carry = LSTMState(h, c)

Unlike Flax's ``RNN``, outputs at padded steps (``t >= seq_lengths[b]``) are zero.
Needs flax (``pip install 'jax_lstm[flax]'``).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

try:
    from flax import nnx
except ImportError as e:  # pragma: no cover - exercised in a subprocess by the tests
    raise ImportError("jax_lstm.nnx needs flax: pip install 'jax_lstm[flax]'") from e

from jax_lstm._modules import as_stack, check_rate, hidden_sizes, layout, raw_key, run_stack
from jax_lstm.layers import init_stack

__all__ = ["LSTM"]


def _is_variable(x) -> bool:
    return isinstance(x, nnx.Variable)


class LSTM(nnx.Module):
    """A stack of LSTM layers (optionally bidirectional) with the hand-written BPTT.

    Per layer and direction the cell is (gate blocks [f | i | g | o])::

        z_t = h_{t-1} @ W + x_t @ U + b
        c_t = sigmoid(z_f) * c_{t-1} + sigmoid(z_i) * tanh(z_g)
        h_t = sigmoid(z_o) * tanh(c_t)

    The same function as ``nnx.OptimizedLSTMCell``; weights convert exactly with
    ``jax_lstm.interop.from_flax``.

    Parameters: ``self.stack`` has exactly the nesting ``init_stack`` returns (a
    tuple of layers, each a tuple of one ``LSTMParams`` per direction), with
    every array an ``nnx.Param``. ``to_params()`` returns it as plain arrays,
    for ``lstm_stack``, ``jax_lstm.interop`` and checkpoints, and
    ``LSTM.from_params`` builds a module around such a stack.

    The carry is jax_lstm's ``LSTMState(h, c)`` (h, c: (B, H)) for one
    unidirectional layer, and otherwise the stack's nesting: per layer a tuple
    with one ``LSTMState`` per direction (forward, reverse). Flax's LSTM cells
    use ``(c, h)``: a plain tuple is refused.

    Dropout follows ``nnx.Dropout``: it is on while ``self.deterministic`` is
    False (``model.train()``, the default) and off after ``model.eval()``. Its
    key comes from the ``dropout`` stream of the ``rngs`` given to the
    constructor, or of the ``rngs`` given to the call (which take precedence).

    Args:
      in_features: D, the size of each input vector.
      hidden_features: H for every layer, or one size per layer.
      num_layers: number of layers when ``hidden_features`` is an int.
      bidirectional: every layer also runs in reverse; its output is
        ``[forward | reverse]``, 2 H wide.
      dropout: inverted dropout on each layer's output before the next layer
        (never on the last layer's output), a Python float in [0, 1).
      recurrent_dropout: inverted dropout on h_{t-1} where it enters the gates,
        one mask per sequence, layer and direction, a Python float in [0, 1).
      forget_bias: initial value of the forget-gate bias.
      time_major: inputs (T, B, D) instead of (B, T, D) (also for ``mask`` and
        ``resets``).
      dtype: the computation dtype (params and inputs are cast to it), or None
        for the common dtype of the params and the inputs.
      param_dtype: the dtype the weights are stored in.
      rngs: ``nnx.Rngs``; the ``params`` stream initialises the weights, the
        ``dropout`` stream (if present) gives the dropout keys.
    """

    def __init__(
        self,
        in_features: int,
        hidden_features: int | Sequence[int],
        *,
        num_layers: int = 1,
        bidirectional: bool = False,
        dropout: float = 0.0,
        recurrent_dropout: float = 0.0,
        forget_bias: float = 1.0,
        time_major: bool = False,
        dtype=None,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        sizes = hidden_sizes(hidden_features, num_layers)
        self.in_features = int(in_features)
        self.hidden_features = sizes
        self.num_layers = len(sizes)
        self.bidirectional = bool(bidirectional)
        self.dropout = check_rate(dropout, "dropout")
        self.recurrent_dropout = check_rate(recurrent_dropout, "recurrent_dropout")
        self.time_major = bool(time_major)
        self.dtype = dtype
        self.param_dtype = param_dtype
        self.deterministic = False
        if not isinstance(rngs, nnx.Rngs):
            raise TypeError(f"rngs must be an nnx.Rngs, got {type(rngs).__name__}")
        stack = init_stack(
            raw_key(rngs.params()),
            self.in_features,
            sizes,
            bidirectional=self.bidirectional,
            forget_bias=forget_bias,
            dtype=param_dtype,
        )
        self.stack = nnx.data(jax.tree.map(nnx.Param, stack))
        self.rngs = nnx.data(None)
        if self.dropout > 0.0 or self.recurrent_dropout > 0.0:
            try:
                self.rngs = rngs["dropout"].fork()
            except (KeyError, AttributeError):  # no dropout (or default) stream: rngs must come with each call
                pass

    @classmethod
    def from_params(
        cls,
        stack,
        *,
        dropout: float = 0.0,
        recurrent_dropout: float = 0.0,
        time_major: bool = False,
        dtype=None,
        param_dtype=None,
        rngs: nnx.Rngs | None = None,
    ) -> LSTM:
        """A module holding ``stack`` (``init_stack``'s nesting, e.g. from ``jax_lstm.interop``).

        Sizes and directions are read from the stack; ``param_dtype`` defaults to
        the stack's dtype (else the stack is cast to it). ``rngs``, if given,
        provides the ``dropout`` stream; without it, pass ``rngs`` to each call
        that needs dropout.
        """
        stack = as_stack(stack)
        d0, sizes, bidirectional = layout(stack)
        if param_dtype is None:
            param_dtype = stack[0][0].W.dtype
        model = cls(
            d0,
            sizes,
            bidirectional=bidirectional,
            dropout=dropout,
            recurrent_dropout=recurrent_dropout,
            time_major=time_major,
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=rngs if rngs is not None else nnx.Rngs(0),
        )
        model.stack = nnx.data(jax.tree.map(lambda a: nnx.Param(jnp.asarray(a, param_dtype)), stack))
        if rngs is None:
            model.rngs = nnx.data(None)
        return model

    def to_params(self):
        """The weights as ``init_stack``'s nesting of plain arrays (``StackParams``)."""
        return jax.tree.map(lambda v: v.get_value(), self.stack, is_leaf=_is_variable)

    def set_view(self, deterministic: bool | None = None):
        """Used by ``nnx.view``: ``deterministic=True`` turns dropout off."""
        if deterministic is not None:
            self.deterministic = deterministic

    def _dropout_key(self, rngs) -> jax.Array:
        src = rngs if rngs is not None else self.rngs
        if src is None:
            raise ValueError(
                "dropout is on (the module is in training mode) but there is no 'dropout' rng stream: pass "
                "rngs=nnx.Rngs(dropout=...) to the constructor or to the call, or call model.eval()"
            )
        if isinstance(src, nnx.Rngs):
            return src["dropout"]()
        if isinstance(src, nnx.RngStream):
            return src()
        if isinstance(src, jax.Array):
            return src
        raise TypeError(f"rngs must be an nnx.Rngs, an nnx.RngStream or a key, got {type(src).__name__}")

    def __call__(
        self,
        inputs: jax.Array,
        *,
        initial_carry=None,
        seq_lengths: jax.Array | None = None,
        mask: jax.Array | None = None,
        resets: jax.Array | None = None,
        return_carry: bool = False,
        deterministic: bool | None = None,
        rngs: nnx.Rngs | nnx.RngStream | jax.Array | None = None,
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
          deterministic: overrides ``self.deterministic`` for this call.
          rngs: ``nnx.Rngs`` (its ``dropout`` stream), an ``nnx.RngStream`` or a
            key for this call's dropout, in place of the constructor's.

        Returns:
          ``outputs`` (B, T, H_L), or (B, T, 2 H_L) bidirectional (time-major:
          (T, B, ...)); with ``return_carry``, ``(carry, outputs)``.
        """
        det = self.deterministic if deterministic is None else deterministic
        dropout = 0.0 if det or self.num_layers == 1 else self.dropout
        recurrent_dropout = 0.0 if det else self.recurrent_dropout
        key = self._dropout_key(rngs) if dropout > 0.0 or recurrent_dropout > 0.0 else None
        carry, outputs = run_stack(
            self.to_params(),
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
