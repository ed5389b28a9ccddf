"""``jax_lstm.nnx.LSTM``: a Flax NNX module around ``lstm_stack`` (the hand-written BPTT).

It takes the place of ``nnx.RNN(nnx.OptimizedLSTMCell(...))`` (and of
``nnx.Bidirectional`` and stacks of them), with the same arguments::

    # Flax
    rnn = nnx.RNN(nnx.OptimizedLSTMCell(in_features, hidden, rngs=rngs), return_carry=True)
    # jax_lstm
    rnn = jax_lstm.nnx.LSTM(in_features, hidden, return_carry=True, rngs=rngs)
    (c, h), ys = rnn(xs, seq_lengths=lengths)        # the carry unpacks as Flax's; also carry.h, carry.c

Unlike Flax's ``RNN``, outputs at padded steps (``t >= seq_lengths[b]``) are zero.
Needs flax (``pip install 'jax_lstm[flax]'``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp

try:
    from flax import nnx
except ImportError as e:  # pragma: no cover - exercised in a subprocess by the tests
    raise ImportError("jax_lstm.nnx needs flax: pip install 'jax_lstm[flax]'") from e

from jax_lstm._modules import (
    LSTMCarry,
    as_stack,
    check_rate,
    hidden_sizes,
    init_module_stack,
    layout,
    make_carry,
    out_sizes,
    raw_key,
    run_stack,
    step_inputs,
    variant_options,
    write_carry,
)
from jax_lstm.cell import check_size

__all__ = ["LSTM", "LSTMCarry"]


def _is_variable(x) -> bool:
    return isinstance(x, nnx.Variable)


def _key(rngs, stream: str):
    """A key from ``rngs`` (``nnx.Rngs``: its ``stream``, else its default; ``nnx.RngStream``; a key), or None."""
    if rngs is None:
        return None
    if isinstance(rngs, nnx.Rngs):
        try:
            return rngs[stream]()
        except (KeyError, AttributeError):
            return rngs()
    if isinstance(rngs, nnx.RngStream):
        return rngs()
    if isinstance(rngs, jax.Array):
        return rngs
    raise TypeError(f"rngs must be an nnx.Rngs, an nnx.RngStream or a key, got {type(rngs).__name__}")


class LSTM(nnx.Module):
    """A stack of LSTM layers (optionally bidirectional) with the hand-written BPTT.

    Per layer and direction the cell is (gate blocks [f | i | g | o]; by
    default ``gate_fn = sigmoid``, ``activation_fn = tanh``)::

        z_t = h_{t-1} @ W + x_t @ U + b
        c_t = gate_fn(z_f) * c_{t-1} + gate_fn(z_i) * activation_fn(z_g)
        h_t = gate_fn(z_o) * activation_fn(c_t)

    The same function as ``nnx.OptimizedLSTMCell``; weights convert exactly with
    ``jax_lstm.interop.from_flax``. The constructor and the call take the
    arguments of ``nnx.RNN`` (and ``nnx.Bidirectional``) around that cell, with
    the same meaning.

    Parameters: ``self.stack`` has exactly the nesting ``init_stack`` returns (a
    tuple of layers, each a tuple of one ``LSTMParams`` per direction), with
    every array an ``nnx.Param``. ``to_params()`` returns it as plain arrays,
    for ``lstm_stack``, ``jax_lstm.interop`` and checkpoints, and
    ``LSTM.from_params`` builds a module around such a stack.

    The carry is Flax's: ``LSTMCarry(c, h)`` (h, c: (*batch, H)) for one
    unidirectional layer, so ``c, h = carry`` works and so do ``carry.h`` and
    ``carry.c``; ``(forward, backward)`` for one bidirectional layer (as
    ``nnx.Bidirectional``); a tuple with one such entry per layer for a stack.
    Carries passed in are read the same way: a plain ``(c, h)`` pair in Flax's
    order, an ``LSTMState(h, c)`` or an ``LSTMCarry`` by their field names.

    Dropout follows ``nnx.Dropout``: it is on while ``self.deterministic`` is
    False (``model.train()``, the default) and off after ``model.eval()``. Its
    key comes from the ``dropout`` stream of the ``rngs`` given to the
    constructor, or of the ``rngs`` given to the call (which take precedence).

    Args:
      in_features: D, the size of each input vector.
      hidden_features: H for every layer, or one size per layer.
      num_layers: number of layers when ``hidden_features`` is an int.
      bidirectional: every layer also runs in reverse; its output is
        ``merge_fn(forward, backward)``, by default ``[forward | backward]``,
        2 H wide.
      dropout: inverted dropout on each layer's output before the next layer
        (never on the last layer's output), a Python float in [0, 1).
      recurrent_dropout: inverted dropout on h_{t-1} where it enters the gates,
        one mask per sequence, layer and direction, a Python float in [0, 1).
      forget_bias: initial value of the forget-gate bias (unless ``bias_init``).
      time_major: inputs (T, *batch, D) instead of (*batch, T, D) (also for
        ``mask`` and ``resets``); the call's ``time_major`` overrides it.
      return_carry: return ``(carry, outputs)``; the call's overrides it.
      reverse: run each sequence from its last valid step to its first
        (unidirectional); the outputs are in that processing order, as Flax's,
        unless ``keep_order``.
      keep_order: with ``reverse``, give the outputs in the order of the inputs.
      unroll: passed to ``lax.scan``; never changes values.
      gate_fn: element-wise activation of the f, i, o gates.
      activation_fn: element-wise activation of g and of c_t in h_t.
      kernel_init, recurrent_kernel_init, bias_init: Flax initializers
        ``init(key, shape, dtype)`` for U (D, 4H), W (H, 4H) and b (4H,), gate
        order i, f, g, o as in ``nnx.OptimizedLSTMCell``; None keeps
        ``init_params``' defaults.
      carry_init: initializer of the carry when the call gets no
        ``initial_carry`` (Flax's ``carry_init``; None: zeros).
      merge_fn: ``merge_fn(forward_outputs, backward_outputs)`` of the last
        bidirectional layer (None: concatenation); the layers below always
        concatenate.
      dtype: the computation dtype (params, inputs and carries are cast to
        it), or None for the result type of the params and the inputs.
      param_dtype: the dtype the weights are stored in.
      proj_size: P, 0 < P < H: each layer's output (and the carry's h) is
        projected to size P, as ``torch.nn.LSTM(proj_size=P)``; an int for
        every layer or one per layer; 0: none.
      peephole: the f, i, o gates also see the cell state (``(3, H)`` weights
        per layer and direction, starting at zero).
      layer_norm: layer-normalise the input and recurrent projections and the
        cell state before the output activation (gains at 1, bias at 0).
      rngs: ``nnx.Rngs``; the ``params`` stream initialises the weights, the
        ``dropout`` stream (if present) gives the dropout keys.

    Examples:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> from jax_lstm.nnx import LSTM
      >>> model = LSTM(3, 4, rngs=nnx.Rngs(0))
      >>> xs = jnp.ones((2, 5, 3))                                  # (B, T, D), batch-major as in Flax
      >>> model(xs, seq_lengths=jnp.array([5, 2])).shape            # (B, T, H)
      (2, 5, 4)
      >>> carry, ys = model(xs, return_carry=True)                  # carry = LSTMCarry(c, h)
      >>> carry, y = model.step(carry, xs[:, 0])                    # one step with the same weights
      >>> stack = model.to_params()                                 # the init_stack nesting, plain arrays
      >>> LSTM.from_params(stack)(xs).shape
      (2, 5, 4)
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
        return_carry: bool = False,
        reverse: bool = False,
        keep_order: bool = False,
        unroll: int = 1,
        gate_fn: Callable = jax.nn.sigmoid,
        activation_fn: Callable = jnp.tanh,
        kernel_init: Callable | None = None,
        recurrent_kernel_init: Callable | None = None,
        bias_init: Callable | None = None,
        carry_init: Callable | None = None,
        merge_fn: Callable | None = None,
        dtype=None,
        param_dtype=jnp.float32,
        proj_size: int | Sequence[int] = 0,
        peephole: bool = False,
        layer_norm: bool = False,
        rngs: nnx.Rngs,
    ):
        sizes = hidden_sizes(hidden_features, num_layers)
        self.in_features = check_size("in_features", in_features)
        self.hidden_features = sizes
        self.num_layers = len(sizes)
        self.bidirectional = bool(bidirectional)
        self.dropout = check_rate(dropout, "dropout")
        self.recurrent_dropout = check_rate(recurrent_dropout, "recurrent_dropout")
        self.time_major = bool(time_major)
        self.return_carry = bool(return_carry)
        if reverse and self.bidirectional:
            raise ValueError("reverse=True is for unidirectional modules; a bidirectional one runs both ways")
        self.reverse = bool(reverse)
        self.keep_order = bool(keep_order)
        self.unroll = unroll
        self.gate_fn = gate_fn
        self.activation_fn = activation_fn
        self.carry_init = carry_init
        self.merge_fn = merge_fn
        self.dtype = dtype
        self.param_dtype = param_dtype
        self.deterministic = False
        if not isinstance(rngs, nnx.Rngs):
            raise TypeError(f"rngs must be an nnx.Rngs, got {type(rngs).__name__}")
        stack = init_module_stack(
            raw_key(rngs.params()),
            self.in_features,
            sizes,
            bidirectional=self.bidirectional,
            forget_bias=forget_bias,
            dtype=param_dtype,
            kernel_init=kernel_init,
            recurrent_kernel_init=recurrent_kernel_init,
            bias_init=bias_init,
            proj_size=proj_size,
            peephole=peephole,
            layer_norm=layer_norm,
        )
        self.proj_size, self.peephole, self.layer_norm = variant_options(stack).values()
        self.stack = nnx.data(jax.tree.map(nnx.Param, stack))
        self.rngs = nnx.data(None)
        if self.dropout > 0.0 or self.recurrent_dropout > 0.0:
            try:
                self.rngs = rngs["dropout"].fork()
            except (KeyError, AttributeError):  # no dropout (or default) stream: rngs must come with each call
                pass

    @classmethod
    def from_params(cls, stack, *, param_dtype=None, rngs: nnx.Rngs | None = None, **options) -> LSTM:
        """A module holding ``stack`` (``init_stack``'s nesting, e.g. from ``jax_lstm.interop``).

        Sizes and directions are read from the stack; ``options`` are the
        constructor's other keyword arguments (``time_major``, ``reverse``,
        ``dropout``, ...). ``param_dtype`` defaults to the stack's dtype (else
        the stack is cast to it). ``rngs``, if given, provides the ``dropout``
        stream; without it, pass ``rngs`` to each call that needs dropout.
        """
        stack = as_stack(stack)
        d0, sizes, bidirectional = layout(stack)
        if param_dtype is None:
            param_dtype = stack[0][0].W.dtype
        model = cls(
            d0,
            sizes,
            bidirectional=bidirectional,
            param_dtype=param_dtype,
            rngs=rngs if rngs is not None else nnx.Rngs(0),
            **variant_options(stack),
            **options,
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

    def initialize_carry(
        self,
        input_shape: Sequence[int],
        rngs: nnx.Rngs | nnx.RngStream | None = None,
        carry_init: Callable | None = None,
    ):
        """The carry for inputs of one step of shape ``(*batch, D)``, from ``carry_init`` (zeros by default).

        As ``nnx.OptimizedLSTMCell.initialize_carry``: c: (*batch, H_l), h: (*batch, P_l) in
        ``param_dtype``; ``rngs`` (its ``carry`` stream) gives the keys of a
        random initializer; ``carry_init`` here overrides the constructor's.
        """
        key = _key(rngs, "carry")
        key = jax.random.key(0) if key is None else key
        states = make_carry(
            self.carry_init if carry_init is None else carry_init,
            key,
            tuple(input_shape)[:-1],
            self.hidden_features,
            2 if self.bidirectional else 1,
            self.param_dtype,
            out_sizes(self.to_params()),
        )
        return write_carry(states, "flax")

    def _dropout_key(self, rngs) -> jax.Array:
        src = rngs if rngs is not None else self.rngs
        if src is None:
            raise ValueError(
                "dropout is on (the module is in training mode) but there is no 'dropout' rng stream: pass "
                "rngs=nnx.Rngs(dropout=...) to the constructor or to the call, or call model.eval()"
            )
        return _key(src, "dropout")

    def __call__(
        self,
        inputs: jax.Array,
        *,
        initial_carry=None,
        seq_lengths: jax.Array | None = None,
        mask: jax.Array | None = None,
        resets: jax.Array | None = None,
        reset_carry=None,
        return_carry: bool | None = None,
        time_major: bool | None = None,
        reverse: bool | None = None,
        keep_order: bool | None = None,
        deterministic: bool | None = None,
        rngs: nnx.Rngs | nnx.RngStream | jax.Array | None = None,
    ):
        """Run the stack over sequences, as ``nnx.RNN`` (``nnx.Bidirectional``) does.

        Args:
          inputs: (*batch, T, D), or (T, *batch, D) time-major: any number of
            batch axes, none included; integer inputs are promoted.
          initial_carry: the carry (see the class docstring), c:
            (*batch, H_l), h: (*batch, P_l) (P_l = H_l without a projection);
            None: ``carry_init`` (zeros by default).
          seq_lengths: optional (*batch,) integer lengths; steps
            t >= seq_lengths[b] are padding: zero output, state unchanged.
          mask: optional (*batch, T) bool ((T, *batch) time-major); False skips
            the step.
          resets: optional (*batch, T) bool ((T, *batch) time-major); True sets
            the state to ``reset_carry`` just before the step.
          reset_carry: the carry resets restore (same form as
            ``initial_carry``); None: zeros.
          return_carry, time_major, reverse, keep_order: override the
            constructor's for this call.
          deterministic: overrides ``self.deterministic`` for this call.
          rngs: ``nnx.Rngs`` (its ``dropout`` stream, and its ``carry`` stream
            for a random ``carry_init``), an ``nnx.RngStream`` or a key, in
            place of the constructor's.

        Returns:
          ``outputs`` (*batch, T, P_L), or ``merge_fn``'s width bidirectional
          (by default 2 P_L; time-major: (T, *batch, ...)); with
          ``return_carry``, ``(carry, outputs)``.
        """
        return_carry = self.return_carry if return_carry is None else return_carry
        time_major = self.time_major if time_major is None else time_major
        reverse = self.reverse if reverse is None else reverse
        keep_order = self.keep_order if keep_order is None else keep_order
        det = self.deterministic if deterministic is None else deterministic
        dropout = 0.0 if det or self.num_layers == 1 else self.dropout
        recurrent_dropout = 0.0 if det else self.recurrent_dropout
        key = self._dropout_key(rngs) if dropout > 0.0 or recurrent_dropout > 0.0 else None
        carry_key = None
        if initial_carry is None and self.carry_init is not None:
            carry_key = _key(rngs, "carry")
            carry_key = jax.random.key(0) if carry_key is None else carry_key
        carry, outputs = run_stack(
            self.to_params(),
            inputs,
            initial_carry,
            style="flax",
            time_major=time_major,
            dtype=self.dtype,
            seq_lengths=seq_lengths,
            mask=mask,
            resets=resets,
            reset_carry=reset_carry,
            reverse=reverse,
            keep_order=keep_order,
            unroll=self.unroll,
            gate_fn=self.gate_fn,
            activation_fn=self.activation_fn,
            merge_fn=self.merge_fn,
            carry_init=self.carry_init,
            carry_key=carry_key,
            dropout=dropout,
            recurrent_dropout=recurrent_dropout,
            key=key,
        )
        return (carry, outputs) if return_carry else outputs

    def step(self, carry, x_t: jax.Array, *, deterministic: bool | None = None, rngs=None):
        """One time step, Flax's cell convention: ``(carry, x_t) -> (carry, y_t)``, unidirectional modules.

        The weights, dtype and activations of the sequence call; ``carry`` in
        the module's form (None: ``carry_init``, zeros by default); x_t:
        (*batch, D); y_t: (*batch, P_L), the last layer's h. For acting one
        step at a time with the model that trains on sequences.
        """
        carry, ys = self(
            step_inputs(self.bidirectional, x_t),
            initial_carry=carry,
            return_carry=True,
            time_major=True,
            reverse=False,
            deterministic=deterministic,
            rngs=rngs,
        )
        return carry, ys[0]
