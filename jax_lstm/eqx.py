"""``jax_lstm.eqx.LSTM``: an Equinox module around ``lstm_stack`` (the hand-written BPTT).

Equinox modules work on one example and are batched with ``jax.vmap``; this
one replaces a ``lax.scan`` over ``eqx.nn.LSTMCell``::

    # Equinox
    cell = eqx.nn.LSTMCell(D, H, key=key)
    def run(xs):                                          # xs: (T, D)
        def step(state, x_t):
            state = cell(x_t, state)                      # (h, c)
            return state, state[0]
        return jax.lax.scan(step, (jnp.zeros(H), jnp.zeros(H)), xs)[::-1]
    hs, (h, c) = jax.vmap(run)(batch)
    # jax_lstm
    model = jax_lstm.eqx.LSTM(D, H, key=key)
    hs, state = jax.vmap(model)(batch)                    # state = LSTMState(h, c): h, c = state

One step at a time (acting): ``state = model.step(x_t, state)``, as
``state = cell(x_t, state)``.

Inside, each example runs ``lstm_stack`` on (T, 1, D), time-major, so under
``jax.vmap`` the mapped axis becomes the batch of one call of the fused BPTT.
Needs equinox (``pip install 'jax_lstm[equinox]'``).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

try:
    import equinox as eqx
except ImportError as e:  # pragma: no cover - exercised in a subprocess by the tests
    raise ImportError("jax_lstm.eqx needs equinox: pip install 'jax_lstm[equinox]'") from e

from jax_lstm._modules import as_stack, check_rate, hidden_sizes, layout, run_stack, variant_options
from jax_lstm.layers import init_stack

__all__ = ["LSTM"]


def _default_float():
    return jax.dtypes.canonicalize_dtype(jnp.float64)  # float64 with jax_enable_x64, else float32


class LSTM(eqx.Module):
    """A stack of LSTM layers (optionally bidirectional) over one sequence, with the hand-written BPTT.

    Per layer and direction the cell is (gate blocks [f | i | g | o])::

        z_t = h_{t-1} @ W + x_t @ U + b
        c_t = sigmoid(z_f) * c_{t-1} + sigmoid(z_i) * tanh(z_g)
        h_t = sigmoid(z_o) * tanh(c_t)

    The same function as ``eqx.nn.LSTMCell``; weights convert exactly with
    ``jax_lstm.interop.from_equinox`` / ``to_equinox``.

    ``self.stack`` is exactly ``init_stack``'s nesting (a tuple of layers, each
    a tuple of one ``LSTMParams`` per direction): ``lstm_stack``,
    ``jax_lstm.interop`` and checkpoints take it as it is.

    The state is jax_lstm's ``LSTMState(h, c)`` (h, c: (H,)) for one
    unidirectional layer, and otherwise the stack's nesting: per layer a tuple
    with one ``LSTMState`` per direction (forward, reverse). This is the order
    of ``eqx.nn.LSTMCell``'s ``(h, c)``, and a plain ``(h, c)`` tuple is read in
    that order (an ``LSTMState`` or a Flax-style ``LSTMCarry`` by field names).

    Dropout follows ``eqx.nn.Dropout``: on unless ``inference`` is True (see
    ``eqx.nn.inference_mode``), and then a ``key`` is required.

    Args:
      input_size: D, the size of each input vector.
      hidden_size: H for every layer, or one size per layer.
      num_layers: number of layers when ``hidden_size`` is an int.
      bidirectional: every layer also runs in reverse; its output is
        ``[forward | reverse]``, 2 H wide.
      dropout: inverted dropout on each layer's output before the next layer
        (never on the last layer's output), a Python float in [0, 1).
      recurrent_dropout: inverted dropout on h_{t-1} where it enters the gates,
        one mask per sequence, layer and direction.
      forget_bias: initial value of the forget-gate bias.
      inference: start with dropout off.
      dtype: dtype of the weights; default float32, or float64 when JAX runs
        with x64 (as Equinox's layers do).
      proj_size: P, 0 < P < H: each layer's output (and the state's h) is
        projected to size P; an int for every layer or one per layer; 0: none.
      peephole: the f, i, o gates also see the cell state.
      layer_norm: layer-normalise the projections and the cell state.
      key: PRNG key for the weights.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> import jax_lstm.eqx
      >>> lstm = jax_lstm.eqx.LSTM(3, 4, key=jax.random.PRNGKey(0))
      >>> hs, state = lstm(jnp.ones((5, 3)))                        # one example: (T, D) -> (T, H)
      >>> hs.shape, state.h.shape
      ((5, 4), (4,))
      >>> hs, state = jax.vmap(lstm)(jnp.ones((2, 5, 3)))           # a batch, as Equinox batches
      >>> hs.shape
      (2, 5, 4)
      >>> state = lstm.step(jnp.ones(3), (jnp.zeros(4), jnp.zeros(4)))   # one step; (h, c) is Equinox's order
      >>> jax_lstm.eqx.LSTM.from_params(lstm.to_params()).to_params()[0][0].W.shape
      (4, 16)
    """

    stack: tuple
    dropout: float = eqx.field(static=True)
    recurrent_dropout: float = eqx.field(static=True)
    inference: bool

    def __init__(
        self,
        input_size: int,
        hidden_size: int | Sequence[int],
        *,
        num_layers: int = 1,
        bidirectional: bool = False,
        dropout: float = 0.0,
        recurrent_dropout: float = 0.0,
        forget_bias: float = 1.0,
        inference: bool = False,
        dtype=None,
        proj_size: int | Sequence[int] = 0,
        peephole: bool = False,
        layer_norm: bool = False,
        key: jax.Array,
    ):
        sizes = hidden_sizes(hidden_size, num_layers, "hidden_size")
        self.dropout = check_rate(dropout, "dropout")
        self.recurrent_dropout = check_rate(recurrent_dropout, "recurrent_dropout")
        self.inference = bool(inference)
        self.stack = init_stack(
            key,
            input_size,
            sizes,
            bidirectional=bidirectional,
            forget_bias=forget_bias,
            dtype=_default_float() if dtype is None else dtype,
            proj_size=proj_size,
            peephole=peephole,
            layer_norm=layer_norm,
        )

    @classmethod
    def from_params(
        cls, stack, *, dropout: float = 0.0, recurrent_dropout: float = 0.0, inference: bool = False
    ) -> LSTM:
        """A module holding ``stack`` (``init_stack``'s nesting, e.g. from ``jax_lstm.interop``); sizes from it."""
        stack = as_stack(stack)
        d0, sizes, bidirectional = layout(stack)
        model = cls(
            d0,
            sizes,
            bidirectional=bidirectional,
            dropout=dropout,
            recurrent_dropout=recurrent_dropout,
            inference=inference,
            dtype=stack[0][0].W.dtype,
            key=jax.random.PRNGKey(0),
            **variant_options(stack),
        )
        return eqx.tree_at(lambda m: m.stack, model, stack)

    def to_params(self):
        """The weights, ``init_stack``'s nesting (``StackParams``)."""
        return self.stack

    @property
    def input_size(self) -> int:
        return layout(self.stack)[0]

    @property
    def hidden_sizes(self) -> tuple[int, ...]:
        return layout(self.stack)[1]

    @property
    def bidirectional(self) -> bool:
        return layout(self.stack)[2]

    def __call__(
        self,
        inputs: jax.Array,
        state=None,
        *,
        seq_length: jax.Array | int | None = None,
        mask: jax.Array | None = None,
        resets: jax.Array | None = None,
        reset_state=None,
        key: jax.Array | None = None,
        inference: bool | None = None,
    ):
        """Run the stack over one sequence.

        Args:
          inputs: (T, D), one example; ``jax.vmap(model)`` for a batch.
          state: ``LSTMState(h, c)`` or a plain ``(h, c)`` tuple (one
            unidirectional layer), or the stack nesting of them; c: (H_l,), h:
            (P_l,) (H_l without a projection).
            None means zeros.
          seq_length: optional integer scalar; steps t >= seq_length are
            padding: zero output, state unchanged.
          mask: optional (T,) bool; False skips the step.
          resets: optional (T,) bool; True sets the state to ``reset_state``
            just before the step.
          reset_state: the state resets restore, in the form of ``state``;
            None means zeros.
          key: PRNG key for dropout (required when a rate is > 0 and not in
            inference mode).
          inference: overrides ``self.inference`` for this call.

        Returns:
          ``(outputs, final_state)``: outputs (T, P_L), or (T, 2 P_L)
          bidirectional; final_state as ``LSTMState`` in the stack's nesting
          (one ``LSTMState`` for one unidirectional layer), c: (H_l,), h: (P_l,).
        """
        d0 = self.input_size
        if not hasattr(inputs, "ndim") or inputs.ndim != 2 or inputs.shape[1] != d0:
            raise ValueError(
                f"inputs has shape {getattr(inputs, 'shape', None)}, expected (T, D) = (T, {d0}): one example "
                "(use jax.vmap(model) for a batch)"
            )
        inference = self.inference if inference is None else inference
        dropout = 0.0 if inference else self.dropout
        recurrent_dropout = 0.0 if inference else self.recurrent_dropout
        if (dropout > 0.0 and len(self.stack) > 1 or recurrent_dropout > 0.0) and key is None:
            raise ValueError(
                "dropout is on (inference=False) and needs a key: call model(x, key=key), "
                "or turn it off with eqx.nn.inference_mode(model)"
            )
        if seq_length is not None:
            seq_length = jnp.asarray(seq_length)
            if seq_length.ndim != 0:
                raise ValueError(f"seq_length must be a scalar (one example), got shape {seq_length.shape}")
        for name, a in (("mask", mask), ("resets", resets)):
            if a is not None and getattr(a, "shape", None) != inputs.shape[:1]:
                raise ValueError(
                    f"{name} has shape {getattr(a, 'shape', None)}, expected (T,) = {inputs.shape[:1]} from inputs"
                )
        final, hs = run_stack(
            self.stack,
            inputs,
            state,
            style="eqx",
            time_major=True,
            seq_lengths=seq_length,
            mask=mask,
            resets=resets,
            reset_carry=reset_state,
            dropout=dropout,
            recurrent_dropout=recurrent_dropout,
            key=key,
            carry_name="state",
        )
        return hs, final

    def step(self, x_t: jax.Array, state=None, *, key: jax.Array | None = None, inference: bool | None = None):
        """Advance one example one step, as ``eqx.nn.LSTMCell``: ``state = model.step(x_t, state)``.

        x_t: (D,); ``state`` as in ``__call__`` (None: zeros). Returns the new
        state in the stack's nesting of ``LSTMState`` (one ``LSTMState`` for
        one unidirectional layer; ``state.h`` is the output). The weights of the
        sequence call; unidirectional modules only.
        """
        if self.bidirectional:
            raise ValueError("step is for unidirectional modules: a bidirectional layer needs the whole sequence")
        if not hasattr(x_t, "ndim") or x_t.ndim != 1:
            raise ValueError(f"x_t has shape {getattr(x_t, 'shape', None)}, expected (D,) = ({self.input_size},)")
        _, final = self(x_t[None], state, key=key, inference=inference)
        return final
