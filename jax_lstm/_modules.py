"""What the Flax NNX, Flax Linen and Equinox modules share: options, carries, one call of ``lstm_stack``.

Nothing here computes a step of the LSTM: every module ends in ``run_stack``,
which calls ``jax_lstm.layers.lstm_stack`` (the hand-written BPTT). A module's
``step`` is the same call with one time step.

Carries. One direction's state is read by field names when it is an
``LSTMState(h, c)`` or an ``LSTMCarry(c, h)``; a plain 2-tuple is read in the
order of the module's library (``order``): ``(c, h)`` for Flax, whose cells
unpack ``c, h = carry``, and ``(h, c)`` for Equinox, whose ``LSTMCell`` takes that.

* Flax modules (``style="flax"``) return ``LSTMCarry(c, h)`` per direction, in
  Flax's nesting: one unidirectional layer is one ``LSTMCarry`` (as
  ``nn.RNN(OptimizedLSTMCell)``), one bidirectional layer is
  ``(forward, backward)`` (as ``nn.Bidirectional``), and a stack is a tuple with
  one such entry per layer. The stack's own nesting (per layer a tuple of one
  state per direction) is read as well.
* The Equinox module (``style="eqx"``) returns ``LSTMState(h, c)`` per direction
  in the stack's nesting, one ``LSTMState`` for one unidirectional layer.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jax_lstm import _inputs
from jax_lstm.cell import LSTMState, check_size
from jax_lstm.layers import init_stack, lstm_stack, stack_out_sizes, stack_sizes

__all__ = [
    "LSTMCarry",
    "step_inputs",
    "hidden_sizes",
    "check_rate",
    "layout",
    "out_sizes",
    "projected_sizes",
    "variant_options",
    "raw_key",
    "as_stack",
    "init_module_stack",
    "read_carry",
    "write_carry",
    "make_carry",
    "flip_sequences",
    "run_stack",
]

_FLAX_GATES = "ifgo"  # Flax's gate order along the 4H axis; ours is f, i, g, o
_ORDER = {"flax": "ch", "eqx": "hc"}


class LSTMCarry(NamedTuple):
    """One direction's carry in Flax's order: ``c, h = carry`` unpacks it as Flax's LSTM cells do.

    ``carry.h`` and ``carry.c`` name the fields; ``carry.state`` is the same
    carry as jax_lstm's ``LSTMState(h, c)``.

    Examples:
      >>> import jax.numpy as jnp
      >>> from jax_lstm.nnx import LSTMCarry
      >>> carry = LSTMCarry(c=jnp.zeros((2, 4)), h=jnp.ones((2, 4)))
      >>> c, h = carry                                              # Flax's order
      >>> carry.state.h.shape                                       # the same carry as an LSTMState(h, c)
      (2, 4)
    """

    c: jax.Array  # (*batch, H) cell state
    h: jax.Array  # (*batch, H) hidden state

    @property
    def state(self) -> LSTMState:
        return LSTMState(self.h, self.c)


def hidden_sizes(hidden, num_layers, name: str = "hidden_features") -> tuple[int, ...]:
    """One hidden size per layer from an int (repeated ``num_layers`` times) or a sequence of ints.

    With a sequence, ``num_layers`` must be its length or left at its default of 1.
    """
    check_size("num_layers", num_layers)
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
    return tuple(check_size(f"{name}[{l}]", h) for l, h in enumerate(sizes))


def check_rate(value, name: str) -> float:
    """A dropout rate as a Python float in [0, 1) (its key comes with each call, not with the module)."""
    return _inputs.check_rate(name, value, key=True)


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


def out_sizes(stack) -> tuple[int, ...]:
    """The size of h (the output and the carry's h) per layer: P_l with a projection, else H_l."""
    return tuple(stack_out_sizes(stack))


def projected_sizes(sizes: Sequence[int], proj_size) -> tuple[int, ...]:
    """The size of h per layer for hidden ``sizes`` and ``proj_size`` (0, an int, or one per layer)."""
    proj = tuple(proj_size) if isinstance(proj_size, Sequence) else (proj_size,) * len(sizes)
    if len(proj) != len(sizes):
        raise ValueError(f"proj_size must be one int or one per layer ({len(sizes)}), got {len(proj)} sizes")
    return tuple(int(p) if p else int(h) for h, p in zip(sizes, proj, strict=True))


def variant_options(stack) -> dict:
    """The LSTM-family options a stack was built with: ``proj_size`` (0, or one per layer), ``peephole``,
    ``layer_norm``."""
    first = [layer[0] for layer in stack]
    proj = tuple(0 if p.W_proj is None else int(p.W_proj.shape[1]) for p in first)
    return {
        "proj_size": proj[0] if len(set(proj)) == 1 else proj,
        "peephole": first[0].peephole is not None,
        "layer_norm": first[0].norm is not None,
    }


def raw_key(key: jax.Array) -> jax.Array:
    """A typed PRNG key (``jax.random.key``, what ``nnx.Rngs`` hands out) as a raw uint32 key."""
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        return jax.random.key_data(key)
    return key


def as_stack(stack):
    """A stack with every array as a JAX array (NumPy arrays from ``jax_lstm.interop`` included)."""
    layout(stack)
    return jax.tree.map(jnp.asarray, tuple(tuple(layer) for layer in stack))


def _to_ours(a: jax.Array, axis: int) -> jax.Array:
    """Gate blocks along ``axis`` from Flax's order i, f, g, o to ours, f, i, g, o."""
    i, f, g, o = jnp.split(a, 4, axis=axis)
    return jnp.concatenate([f, i, g, o], axis=axis)


def init_module_stack(
    key: jax.Array,
    input_size: int,
    sizes: Sequence[int],
    *,
    bidirectional: bool,
    forget_bias: float,
    dtype,
    kernel_init: Callable | None = None,
    recurrent_kernel_init: Callable | None = None,
    bias_init: Callable | None = None,
    per_gate: bool = False,
    proj_size: int | Sequence[int] = 0,
    peephole: bool = False,
    layer_norm: bool = False,
):
    """``init_stack``, with Flax initializers (``init(key, shape, dtype)``) in place of its defaults where given.

    ``kernel_init`` makes U, ``recurrent_kernel_init`` W and ``bias_init`` b (then
    without ``forget_bias``), as Flax's ``OptimizedLSTMCell`` calls them: one
    call per gate with (D, H), (H, H), (H,) when ``per_gate`` (Linen), one call
    with (D, 4H), (H, 4H), (4H,) otherwise (NNX); gate order i, f, g, o. With a
    projection W's rows are P (``(P, H)`` per gate). ``proj_size``, ``peephole``
    and ``layer_norm`` are ``init_stack``'s; their weights keep its initializers.
    """
    key = raw_key(key)
    k_flax = jax.random.fold_in(key, 1)
    stack = init_stack(
        key,
        input_size,
        sizes,
        bidirectional=bidirectional,
        forget_bias=forget_bias,
        dtype=dtype,
        proj_size=proj_size,
        peephole=peephole,
        layer_norm=layer_norm,
    )
    if kernel_init is None and recurrent_kernel_init is None and bias_init is None:
        return stack

    def make(init, k, shape):
        if not per_gate:
            return _to_ours(jnp.asarray(init(k, shape[:-1] + (4 * shape[-1],), dtype), dtype), -1)
        parts = [jnp.asarray(init(kg, shape, dtype), dtype) for kg in jax.random.split(k, 4)]
        return _to_ours(jnp.concatenate(parts, axis=-1), -1)

    layers = []
    for l, layer in enumerate(stack):
        params = []
        for k, p in enumerate(layer):
            kU, kW, kb = jax.random.split(jax.random.fold_in(jax.random.fold_in(k_flax, l), k), 3)
            H, R, D = p.b.shape[0] // 4, p.W.shape[0], p.U.shape[0]  # R: the size of h_{t-1}, P or H
            params.append(
                p._replace(
                    W=p.W if recurrent_kernel_init is None else make(recurrent_kernel_init, kW, (R, H)),
                    U=p.U if kernel_init is None else make(kernel_init, kU, (D, H)),
                    b=p.b if bias_init is None else make(bias_init, kb, (H,)),
                )
            )
        layers.append(tuple(params))
    return tuple(layers)


# --------------------------------------------------------------------------- carries


def _is_array(a) -> bool:
    return hasattr(a, "shape") and hasattr(a, "dtype")


def _is_direction(s) -> bool:
    """One direction's carry: an LSTMState, an LSTMCarry or a plain pair of arrays."""
    return isinstance(s, (LSTMState, LSTMCarry)) or (
        isinstance(s, (tuple, list)) and len(s) == 2 and all(_is_array(a) for a in s)
    )


def _read_direction(s, order: str, name: str) -> LSTMState | None:
    if s is None:
        return None
    if isinstance(s, LSTMState):
        return s
    if isinstance(s, LSTMCarry):
        return s.state
    if hasattr(s, "_fields") and {"h", "c"} <= set(s._fields):
        return LSTMState(h=s.h, c=s.c)
    if _is_direction(s):
        return LSTMState(h=s[1], c=s[0]) if order == "ch" else LSTMState(h=s[0], c=s[1])
    want = "(c, h) as Flax's cells" if order == "ch" else "(h, c) as eqx.nn.LSTMCell"
    raise TypeError(
        f"{name} must be None, jax_lstm.LSTMState(h, c), LSTMCarry(c, h) or a plain pair of arrays read {want} "
        f"order it; got {type(s).__name__}" + (f" of length {len(s)}" if isinstance(s, (tuple, list)) else "")
    )


def _read_layer(entry, n_dir: int, order: str, name: str):
    """A layer's carry: one direction (unidirectional) or (forward, backward); also the stack's 1-tuples."""
    if entry is None:
        return (None,) * n_dir
    if n_dir == 1:
        if isinstance(entry, (tuple, list)) and len(entry) == 1 and not _is_array(entry[0]):
            entry, name = entry[0], f"{name}[0]"  # the stack's nesting: (state,)
        return (_read_direction(entry, order, name),)
    if _is_direction(entry) or not isinstance(entry, (tuple, list)) or len(entry) != 2:
        raise TypeError(
            f"{name} must be None or (forward, backward) for a bidirectional layer, each one direction's carry; "
            f"got {type(entry).__name__}" + (f" of length {len(entry)}" if isinstance(entry, (tuple, list)) else "")
        )
    return tuple(_read_direction(s, order, f"{name}[{k}]") for k, s in enumerate(entry))


def read_carry(carry, n_layers: int, n_dir: int, style: str, name: str = "initial_carry"):
    """A module carry (see the module docstring) as the stack's nesting of ``LSTMState`` (or None)."""
    if carry is None:
        return None
    order = _ORDER[style]
    if n_layers == 1:
        if isinstance(carry, (tuple, list)) and len(carry) == 1 and not _is_array(carry[0]):
            return (_read_layer(carry[0], n_dir, order, f"{name}[0]"),)  # the stack's nesting: (layer,)
        return (_read_layer(carry, n_dir, order, name),)
    if _is_direction(carry) or not isinstance(carry, (tuple, list)) or len(carry) != n_layers:
        raise TypeError(
            f"{name} must be a tuple with one entry per layer ({n_layers}), each None or "
            + ("one direction's carry" if n_dir == 1 else "(forward, backward)")
            + f"; got {type(carry).__name__}"
            + (f" of length {len(carry)}" if isinstance(carry, (tuple, list)) else "")
            + (" (one direction's carry)" if _is_direction(carry) else "")
        )
    return tuple(_read_layer(entry, n_dir, order, f"{name}[{l}]") for l, entry in enumerate(carry))


def write_carry(states, style: str):
    """The stack's final states as a module carry in the module's style (see the module docstring)."""
    if style == "eqx":
        return states[0][0] if len(states) == 1 and len(states[0]) == 1 else states
    layers = tuple(
        LSTMCarry(c=layer[0].c, h=layer[0].h) if len(layer) == 1 else tuple(LSTMCarry(c=s.c, h=s.h) for s in layer)
        for layer in states
    )
    return layers[0] if len(layers) == 1 else layers


def make_carry(carry_init: Callable | None, key, batch_shape, sizes, n_dir: int, dtype, h_sizes=None):
    """The stack's nesting of states from ``carry_init(key, (*batch, H), dtype)`` (None: zeros), c first as Flax.

    ``sizes`` are the cells' H_l (c); ``h_sizes`` the sizes of h, P_l with a
    projection (None: ``sizes``).
    """
    h_sizes = sizes if h_sizes is None else h_sizes
    out = []
    for l, (H, P) in enumerate(zip(sizes, h_sizes, strict=True)):
        layer = []
        for k in range(n_dir):
            shape_c, shape_h = tuple(batch_shape) + (H,), tuple(batch_shape) + (P,)
            if carry_init is None:
                c, h = jnp.zeros(shape_c, dtype), jnp.zeros(shape_h, dtype)
            else:
                kc, kh = jax.random.split(jax.random.fold_in(jax.random.fold_in(raw_key(key), l), k))
                c = jnp.asarray(carry_init(kc, shape_c, dtype), dtype)
                h = jnp.asarray(carry_init(kh, shape_h, dtype), dtype)
            layer.append(LSTMState(h=h, c=c))
        out.append(tuple(layer))
    return tuple(out)


# --------------------------------------------------------------------------- the call


def flip_sequences(a: jax.Array, seq_lengths: jax.Array | None) -> jax.Array:
    """Reverse each row's valid steps of a time-major ``a`` (T, B, ...), as Flax's ``flip_sequences``.

    Step t of row b is read from step ``(L_b - 1 - t) mod T``: the first
    ``L_b`` steps reversed, the padding after them reversed too and kept at the
    end. An involution, so the same call puts the steps back.
    """
    if seq_lengths is None:
        return a[::-1]
    T = a.shape[0]
    idx = (jnp.arange(T - 1, -1, -1)[:, None] + seq_lengths[None, :].astype(jnp.int32)) % T  # (T, B)
    idx = idx.reshape(idx.shape + (1,) * (a.ndim - 2))
    return jnp.take_along_axis(a, idx, axis=0)


def _states_map(fn, states):
    return (
        None
        if states is None
        else tuple(tuple(None if s is None else LSTMState(*(fn(x) for x in s)) for s in layer) for layer in states)
    )


def _check_flags(name, a, batch_shape, T, time_major):
    if a is None:
        return None
    want = (T, *batch_shape) if time_major else (*batch_shape, T)
    if getattr(a, "shape", None) is None or tuple(a.shape) != want:
        layout = "(T, *batch)" if time_major else "(*batch, T)"
        raise _inputs.shape_error(name, getattr(a, "shape", None), f"{layout} = {want} from inputs")
    a = jnp.asarray(a)
    return a.reshape(T, -1) if time_major else jnp.moveaxis(a, -1, 0).reshape(T, -1)


def _check_state_shapes(states, batch_shape, sizes, h_sizes, name):
    if states is None:
        return
    for l, layer in enumerate(states):
        for k, s in enumerate(layer):
            if s is None:
                continue
            for field, n in (("h", h_sizes[l]), ("c", sizes[l])):
                a = getattr(s, field)
                shape = getattr(a, "shape", None)
                want = (*batch_shape, n)
                if shape is None or tuple(shape) != want:
                    where = name if len(states) == 1 and len(layer) == 1 else f"{name} (layer {l}, direction {k})"
                    dims = "P" if field == "h" and n != sizes[l] else "H"
                    what = "projection" if dims == "P" else "hidden size"
                    why = f"(*batch, {dims}) = {want} from inputs and the layer's {what}"
                    raise _inputs.shape_error(f"{where}.{field}", shape, why)


def run_stack(
    stack,
    inputs: jax.Array,
    carry=None,
    *,
    style: str,
    time_major: bool,
    dtype=None,
    seq_lengths=None,
    mask=None,
    resets=None,
    reset_carry=None,
    reverse: bool = False,
    keep_order: bool = False,
    unroll: int = 1,
    gate_fn: Callable = jax.nn.sigmoid,
    activation_fn: Callable = jnp.tanh,
    merge_fn: Callable | None = None,
    carry_init: Callable | None = None,
    carry_key: jax.Array | None = None,
    dropout: float = 0.0,
    recurrent_dropout: float = 0.0,
    key: jax.Array | None = None,
    name: str = "inputs",
    carry_name: str = "initial_carry",
):
    """Check the module inputs, flatten the batch axes, cast to the computation dtype and call ``lstm_stack``.

    Args:
      stack: ``StackParams``.
      inputs: (*batch, T, D), or (T, *batch, D) with ``time_major``; any number
        of batch axes, none included. Integer inputs are promoted.
      carry, reset_carry: module carries (see the module docstring) with
        c: (*batch, H_l) and h: (*batch, P_l) (H_l without a projection), or None. ``carry`` None: ``carry_init`` (zeros
        when None) with ``carry_key``; ``reset_carry`` None: zeros.
      style: "flax" or "eqx", the carries' convention.
      time_major: the layout of ``inputs``, ``mask`` and ``resets``.
      dtype: computation dtype, or None for the result type of the params and
        the inputs (as Flax's ``promote_dtype``).
      seq_lengths: (*batch,) integer lengths; mask, resets: (*batch, T) bool
        ((T, *batch) time-major), as ``lstm_stack`` takes them.
      reverse: every layer visits the steps T - 1 down to 0 as ``lstm``'s
        ``reverse=True`` does (each sequence from its last valid step to its
        first; a reset at a padded step acts before the first valid one); the
        outputs are in processing order, padding at the end (as Flax's
        ``RNN``), unless ``keep_order``, which gives them in the inputs' order.
      unroll, gate_fn, activation_fn: passed to ``lstm_stack``.
      merge_fn: ``merge_fn(forward, backward)`` on the last bidirectional
        layer's two (T, B, H_L) outputs (None: concatenation); the layers
        below concatenate, as in ``lstm_stack``.
      dropout, recurrent_dropout, key: as ``lstm_stack`` takes them.

    Returns:
      ``(carry, outputs)``: outputs in the layout of ``inputs``; the final carry
      in the module's style, h, c: (*batch, H_l).
    """
    d0, sizes, bidirectional = layout(stack)
    h_sizes = out_sizes(stack)
    n_dir = 2 if bidirectional else 1
    if not _is_array(inputs):
        raise TypeError(f"{name} must be an array, got {type(inputs).__name__}")
    axes = "(T, *batch, D)" if time_major else "(*batch, T, D)"
    if inputs.ndim < 2 or inputs.shape[-1] != d0:
        major = "time-major" if time_major else "batch-major"
        why = f"{axes} with D = {d0} ({major}; the module was built for {d0} input features)"
        raise _inputs.shape_error(name, inputs.shape, why)
    if reverse and bidirectional:
        raise ValueError("reverse=True is for unidirectional modules; a bidirectional one runs both ways")
    inputs = jnp.asarray(inputs)
    t_axis = 0 if time_major else inputs.ndim - 2
    T = inputs.shape[t_axis]
    batch_shape = inputs.shape[1:-1] if time_major else inputs.shape[:-2]
    B = int(np.prod(batch_shape, dtype=np.int64))
    xs = jnp.moveaxis(inputs, t_axis, 0).reshape(T, B, d0)
    mask = _check_flags("mask", mask, batch_shape, T, time_major)
    resets = _check_flags("resets", resets, batch_shape, T, time_major)
    if seq_lengths is not None:
        shape = getattr(seq_lengths, "shape", None)
        if shape is None or tuple(shape) != tuple(batch_shape):
            why = f"(*batch,) = {tuple(batch_shape)} from {name} {tuple(inputs.shape)}"
            raise _inputs.shape_error("seq_lengths", shape, why)
        if not jnp.issubdtype(seq_lengths.dtype, jnp.integer):
            raise TypeError(f"seq_lengths must have an integer dtype, got {seq_lengths.dtype}")
        seq_lengths = jnp.asarray(seq_lengths).reshape(B)

    comp = jnp.dtype(dtype) if dtype is not None else jnp.result_type(stack[0][0].W, xs)
    if not jnp.issubdtype(comp, jnp.inexact):
        comp = jnp.result_type(comp, jnp.float32)
    states0 = read_carry(carry, len(sizes), n_dir, style, carry_name)
    if states0 is None and carry_init is not None:
        states0 = make_carry(carry_init, carry_key, batch_shape, sizes, n_dir, comp, h_sizes)
    reset_states = read_carry(reset_carry, len(sizes), n_dir, style, "reset_carry")
    _check_state_shapes(states0, batch_shape, sizes, h_sizes, carry_name)
    _check_state_shapes(reset_states, batch_shape, sizes, h_sizes, "reset_carry")
    flat = lambda a: jnp.asarray(a, comp).reshape(B, a.shape[-1])  # noqa: E731
    states0, reset_states = _states_map(flat, states0), _states_map(flat, reset_states)
    stack = jax.tree.map(lambda a: jnp.asarray(a, comp), stack)
    xs = xs.astype(comp)

    lengths = seq_lengths
    if reverse:  # visit T - 1 down to 0, as lstm's reverse=True: run forward over the time-flipped steps
        if lengths is not None:
            valid = jnp.arange(T)[:, None] < lengths[None, :]
            mask, lengths = (valid if mask is None else mask & valid), None
        xs, mask, resets = (None if a is None else a[::-1] for a in (xs, mask, resets))
    dropout = dropout if len(sizes) > 1 else 0.0  # between layers only
    hs, finals = lstm_stack(
        stack,
        xs,
        states0,
        seq_lengths=lengths,
        mask=mask,
        resets=resets,
        reset_states=reset_states,
        dropout=dropout,
        recurrent_dropout=recurrent_dropout,
        key=key if (dropout > 0.0 or recurrent_dropout > 0.0) else None,
        unroll=unroll,
        gate_fn=gate_fn,
        activation_fn=activation_fn,
    )
    if merge_fn is not None and bidirectional:
        hs = merge_fn(hs[..., : h_sizes[-1]], hs[..., h_sizes[-1] :])
    if reverse:
        hs = hs[::-1]  # the inputs' order
        if not keep_order:
            hs = flip_sequences(hs, seq_lengths)  # Flax's processing order: step t of row b is step L_b - 1 - t
    hs = jnp.moveaxis(hs.reshape(T, *batch_shape, hs.shape[-1]), 0, t_axis)
    finals = _states_map(lambda a: a.reshape(*batch_shape, a.shape[-1]), finals)
    return write_carry(finals, style), hs


def step_inputs(bidirectional: bool, x_t) -> jax.Array:
    """The input of a module's ``step``, x_t: (*batch, D), as a sequence of one step: (1, *batch, D)."""
    if bidirectional:
        raise ValueError("step is for unidirectional modules: a bidirectional layer needs the whole sequence")
    if not hasattr(x_t, "ndim") or x_t.ndim < 1:
        raise ValueError(f"x_t has shape {getattr(x_t, 'shape', None)}, expected (*batch, D)")
    return jnp.asarray(x_t)[None]
