"""``jax_lstm.linen.LSTM``: a Flax Linen module around ``lstm_stack`` (the hand-written BPTT).

It takes the place of ``nn.RNN(nn.OptimizedLSTMCell(...))`` (and of
``nn.Bidirectional`` and stacks of them), with the same arguments::

    # Flax
    rnn = nn.RNN(nn.OptimizedLSTMCell(hidden), return_carry=True)
    # jax_lstm
    rnn = jax_lstm.linen.LSTM(hidden, return_carry=True)
    (c, h), ys = rnn.apply(variables, xs, seq_lengths=lengths)   # the carry unpacks as Flax's; also carry.h

Unlike Flax's ``RNN``, outputs at padded steps (``t >= seq_lengths[b]``) are zero.
The variables are ``{"params": {"stack": stack}}`` with ``stack`` in
``init_stack``'s nesting; ``to_variables`` and ``from_variables`` convert (and
``jax_lstm.interop.from_flax`` converts a Flax cell's variables).
Needs flax (``pip install 'jax_lstm[flax]'``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

try:
    import flax.linen as nn
except ImportError as e:  # pragma: no cover - exercised in a subprocess by the tests
    raise ImportError("jax_lstm.linen needs flax: pip install 'jax_lstm[flax]'") from e

from jax_lstm._modules import (
    LSTMCarry,
    as_stack,
    check_rate,
    hidden_sizes,
    init_module_stack,
    make_carry,
    projected_sizes,
    run_stack,
    step_inputs,
    write_carry,
)

__all__ = ["LSTM", "LSTMCarry", "to_variables", "from_variables"]

PARAM_NAME = "stack"


class LSTM(nn.Module):
    """A stack of LSTM layers (optionally bidirectional) with the hand-written BPTT.

    The Linen twin of ``jax_lstm.nnx.LSTM``: the same cell (the function of
    ``nn.OptimizedLSTMCell``; weights convert exactly with
    ``jax_lstm.interop.from_flax``), the same carries (Flax's ``LSTMCarry(c, h)``
    per direction, nested per layer), the same options. The attributes and
    the call take the arguments of ``nn.RNN`` (and ``nn.Bidirectional``) around
    that cell, with the same meaning.

    Parameters: one entry ``"stack"`` holding ``init_stack``'s nesting (a tuple of
    layers, each a tuple of one ``LSTMParams`` per direction), so
    ``from_variables(variables)`` is ready for ``lstm_stack`` and
    ``jax_lstm.interop``, and ``to_variables(stack)`` goes back.

    Attributes:
      features: H for every layer, or one size per layer (``hidden_features``
        of ``jax_lstm.nnx.LSTM``).
      kernel_init, recurrent_kernel_init, bias_init: Flax initializers
        ``init(key, shape, dtype)``, called per gate with (D, H), (H, H) and
        (H,) as ``nn.OptimizedLSTMCell`` calls them (W: (P, H) with a
        projection); None keeps ``init_params``' defaults.
      param_dtype: the dtype the weights are initialised in.

    The other attributes (``num_layers``, ``bidirectional``, ``dropout``,
    ``recurrent_dropout``, ``forget_bias``, ``time_major``, ``return_carry``,
    ``reverse``, ``keep_order``, ``unroll``, ``gate_fn``, ``activation_fn``,
    ``carry_init``, ``merge_fn``, ``dtype``, ``proj_size``, ``peephole``,
    ``layer_norm``) are the arguments of the same names of ``jax_lstm.nnx.LSTM``.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from jax_lstm.linen import LSTM
      >>> rnn = LSTM(4)
      >>> xs = jnp.ones((2, 5, 3))                                  # (B, T, D)
      >>> variables = rnn.init(jax.random.PRNGKey(0), xs)
      >>> rnn.apply(variables, xs, seq_lengths=jnp.array([5, 2])).shape
      (2, 5, 4)
      >>> carry, ys = rnn.apply(variables, xs, return_carry=True)   # carry = LSTMCarry(c, h)
      >>> carry, y = rnn.apply(variables, carry, xs[:, 0], method="step")
      >>> y.shape
      (2, 4)
    """

    features: int | Sequence[int]
    num_layers: int = 1
    bidirectional: bool = False
    dropout: float = 0.0
    recurrent_dropout: float = 0.0
    forget_bias: float = 1.0
    time_major: bool = False
    return_carry: bool = False
    reverse: bool = False
    keep_order: bool = False
    unroll: int = 1
    gate_fn: Callable = jax.nn.sigmoid
    activation_fn: Callable = jnp.tanh
    kernel_init: Callable | None = None
    recurrent_kernel_init: Callable | None = None
    bias_init: Callable | None = None
    carry_init: Callable | None = None
    merge_fn: Callable | None = None
    dtype: Any = None
    param_dtype: Any = jnp.float32
    proj_size: int | Sequence[int] = 0
    peephole: bool = False
    layer_norm: bool = False

    @nn.compact
    def __call__(
        self,
        inputs: jax.Array,
        *,
        initial_carry=None,
        init_key: jax.Array | None = None,
        seq_lengths: jax.Array | None = None,
        mask: jax.Array | None = None,
        resets: jax.Array | None = None,
        reset_carry=None,
        return_carry: bool | None = None,
        time_major: bool | None = None,
        reverse: bool | None = None,
        keep_order: bool | None = None,
        deterministic: bool = True,
    ):
        """Run the stack over sequences, as ``nn.RNN`` (``nn.Bidirectional``) does.

        Args:
          inputs: (*batch, T, D), or (T, *batch, D) time-major.
          initial_carry, reset_carry: carries with c: (*batch, H_l) and
            h: (*batch, P_l), as the call of ``jax_lstm.nnx.LSTM`` takes them.
          seq_lengths, mask, resets: as the call of ``jax_lstm.nnx.LSTM``.
          return_carry, time_major, reverse, keep_order: override the
            attributes for this call.
          init_key: the key of a random ``carry_init`` (default key 0, as Flax).
          deterministic: True turns dropout off; with False the key comes from
            ``self.make_rng("dropout")`` (pass ``rngs={"dropout": key}`` to
            ``apply``).

        Returns:
          ``outputs`` (*batch, T, P_L) (P_L = H_L without a projection; twice
          that, or ``merge_fn``'s width, bidirectional; time-major:
          (T, *batch, ...)); with ``return_carry``, ``(carry, outputs)``.
        """
        sizes = hidden_sizes(self.features, self.num_layers, "features")
        dropout = check_rate(self.dropout, "dropout")
        recurrent_dropout = check_rate(self.recurrent_dropout, "recurrent_dropout")
        return_carry = self.return_carry if return_carry is None else return_carry
        time_major = self.time_major if time_major is None else time_major
        reverse = self.reverse if reverse is None else reverse
        keep_order = self.keep_order if keep_order is None else keep_order
        if not hasattr(inputs, "ndim") or inputs.ndim < 2:
            axes = "(T, *batch, D)" if time_major else "(*batch, T, D)"
            raise ValueError(f"inputs has shape {getattr(inputs, 'shape', None)}, expected {axes}")
        stack = self.param(
            PARAM_NAME,
            lambda key: init_module_stack(
                key,
                int(inputs.shape[-1]),
                sizes,
                bidirectional=self.bidirectional,
                forget_bias=self.forget_bias,
                dtype=self.param_dtype,
                kernel_init=self.kernel_init,
                recurrent_kernel_init=self.recurrent_kernel_init,
                bias_init=self.bias_init,
                per_gate=True,
                proj_size=self.proj_size,
                peephole=self.peephole,
                layer_norm=self.layer_norm,
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
            carry_key=jax.random.key(0) if init_key is None else init_key,
            dropout=dropout,
            recurrent_dropout=recurrent_dropout,
            key=key,
        )
        return (carry, outputs) if return_carry else outputs

    def step(self, carry, x_t: jax.Array, *, deterministic: bool = True):
        """One time step, Flax's cell convention: ``(carry, x_t) -> (carry, y_t)``, unidirectional modules.

        ``module.apply(variables, carry, x_t, method="step")``: the variables,
        dtype and activations of the sequence call; ``carry`` in the module's
        form (None: ``carry_init``, zeros by default); x_t: (*batch, D); y_t:
        (*batch, P_L), the last layer's h (P_L = H_L without a projection).
        """
        carry, ys = self(
            step_inputs(self.bidirectional, x_t),
            initial_carry=carry,
            return_carry=True,
            time_major=True,
            reverse=False,
            deterministic=deterministic,
        )
        return carry, ys[0]

    @nn.nowrap
    def initialize_carry(self, rng: jax.Array, input_shape: Sequence[int]):
        """The carry for inputs of one step of shape ``(*batch, D)``, from ``carry_init`` (zeros by default).

        As ``nn.OptimizedLSTMCell.initialize_carry(rng, input_shape)``: c:
        (*batch, H_l), h: (*batch, P_l) in ``param_dtype``; works on an unbound
        module.
        """
        sizes = hidden_sizes(self.features, self.num_layers, "features")
        n_dir = 2 if self.bidirectional else 1
        h_sizes = projected_sizes(sizes, self.proj_size)
        states = make_carry(self.carry_init, rng, tuple(input_shape)[:-1], sizes, n_dir, self.param_dtype, h_sizes)
        return write_carry(states, "flax")


def to_variables(stack) -> dict[str, dict[str, Any]]:
    """``init_stack``'s nesting (e.g. from ``jax_lstm.interop``) as the variables of ``LSTM``.

    Returns:
      ``{"params": {"stack": stack}}``, ready for ``LSTM(...).apply``.

    Examples:
      >>> import jax
      >>> from jax_lstm.layers import init_stack
      >>> from jax_lstm.linen import LSTM, to_variables
      >>> variables = to_variables(init_stack(jax.random.PRNGKey(0), 3, (4,)))
      >>> LSTM(4).apply(variables, jax.numpy.ones((2, 5, 3))).shape
      (2, 5, 4)
    """
    return {"params": {PARAM_NAME: as_stack(stack)}}


def from_variables(variables):
    """The ``StackParams`` of an ``LSTM`` from its variables.

    Args:
      variables: ``{"params": {"stack": ...}}`` as ``init`` returns, or the
        inner ``{"stack": ...}`` (e.g. the LSTM's entry in a parent's params).

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from jax_lstm.linen import LSTM, from_variables
      >>> variables = LSTM(4).init(jax.random.PRNGKey(0), jnp.ones((2, 5, 3)))
      >>> stack = from_variables(variables)                         # for lstm_stack, interop, checkpoints
      >>> stack[0][0].W.shape
      (4, 16)
    """
    if not isinstance(variables, Mapping):
        raise TypeError(f"variables must be a mapping, got {type(variables).__name__}")
    tree = variables["params"] if "params" in variables and isinstance(variables["params"], Mapping) else variables
    if PARAM_NAME not in tree:
        raise KeyError(f"no {PARAM_NAME!r} entry in the variables (keys: {sorted(tree)})")
    return as_stack(tree[PARAM_NAME])
