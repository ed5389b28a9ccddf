"""Deep and bidirectional LSTM stacks built from ``lstm`` (or ``lstm_ref``).

Containers (plain tuples, so they are pytrees that optax, ``jax.grad`` and
checkpointing handle as they are)::

    StackParams = tuple[LayerParams, ...]        # one entry per layer, bottom first
    LayerParams = tuple[LSTMParams, ...]         # (forward,) or (forward, reverse)
    StackState  = tuple[LayerState, ...]         # same nesting as StackParams
    LayerState  = tuple[LSTMState, ...]          # one LSTMState(h, c) per direction

``params[l][0]`` is the forward direction of layer ``l``; in a bidirectional
layer ``params[l][1]`` is the reverse direction. Layer ``l`` has input size
``D_l`` (``D_0`` is the size of ``xs``) and hidden size ``H_l``; its output is
``(T, B, H_l)``, or ``(T, B, 2 * H_l)`` when bidirectional (forward half
first), and that is ``D_{l+1}``. A layer with a projection (``proj_size``)
outputs ``P_l`` in place of ``H_l``.

Layer ``l`` computes (``dropout`` is inverted dropout with its own mask per layer)::

    x^0 = xs
    fwd_l = lstm(params[l][0], x^l, states0[l][0], seq_lengths=seq_lengths)
    rev_l = lstm(params[l][1], x^l, states0[l][1], seq_lengths=seq_lengths, reverse=True)
    y^l = concat([fwd_l.hs, rev_l.hs], axis=-1)        # or fwd_l.hs alone
    x^{l+1} = dropout(y^l)                               # not after the last layer

``gate_trace_stack`` returns the f, i, g, o, c, h of every layer and direction
(via ``lstm_trace``) for inspection.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jax_lstm._inputs import (
    check_lengths,
    check_params,
    check_rate,
    check_size,
    check_state,
    check_step_flags,
    shape_error,
)
from jax_lstm.bptt import lstm
from jax_lstm.cell import LSTMParams, LSTMState, init_params
from jax_lstm.reference import LSTMTrace, lstm_ref, lstm_trace

__all__ = [
    "LayerParams",
    "LayerState",
    "StackParams",
    "StackState",
    "init_stack",
    "lstm_stack",
    "gate_trace_stack",
    "stack_sizes",
    "stack_out_sizes",
]

LayerParams = tuple[LSTMParams, ...]
LayerState = tuple[LSTMState, ...]
StackParams = tuple[LayerParams, ...]
StackState = tuple[LayerState, ...]

IMPLS = {"manual": lstm, "autodiff": lstm_ref}  # the one table: gradients by hand or by autodiff
_DIRECTIONS = ("forward", "reverse")


def init_stack(
    key: jax.Array,
    input_size: int,
    hidden_sizes: Sequence[int],
    *,
    bidirectional: bool = False,
    proj_size: int | Sequence[int] = 0,
    peephole: bool = False,
    layer_norm: bool = False,
    forget_bias: float = 1.0,
    dtype=jnp.float32,
) -> StackParams:
    """Initialise a stack of LSTM layers with ``init_params``.

    Args:
      key: PRNG key; split into one key per layer and direction.
      input_size: D, the size of each input vector x_t.
      hidden_sizes: H_l for each layer, bottom first; sizes may differ.
      bidirectional: give every layer a reverse direction; the next layer's
        input size is then 2 * H_l (2 * P_l projected).
      proj_size: P_l, 0 < P_l < H_l, projects each layer's output (0: none);
        one int for every layer, or one per layer.
      peephole: peephole connections in every layer.
      layer_norm: layer normalisation in every layer.
      forget_bias: initial value of every forget-gate bias block.
      dtype: dtype of all weights.

    Returns:
      ``StackParams``: a tuple with one entry per layer, each a tuple of one
      ``LSTMParams`` (forward) or two (forward, reverse) with
      W: (H_l, 4 H_l) ((P_l, 4 H_l) projected), U: (D_l, 4 H_l), b: (4 H_l,).

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> import jax_lstm as jl
      >>> from jax_lstm.layers import gate_trace_stack, init_stack, lstm_stack
      >>> stack = init_stack(jax.random.PRNGKey(0), input_size=3, hidden_sizes=(4, 2), bidirectional=True)
      >>> len(stack), len(stack[0])                                 # two layers, two directions each
      (2, 2)
      >>> stack[1][0].U.shape                                       # layer 1 reads both halves of layer 0
      (8, 8)
    """
    if isinstance(hidden_sizes, (int, np.integer)) or not isinstance(hidden_sizes, Sequence):
        raise TypeError(f"hidden_sizes must be a sequence of ints, one per layer, got {hidden_sizes!r}")
    if len(hidden_sizes) == 0:
        raise ValueError("hidden_sizes must name at least one layer, got an empty sequence")
    hidden_sizes = [check_size(f"hidden_sizes[{l}]", h) for l, h in enumerate(hidden_sizes)]
    input_size = check_size("input_size", input_size)
    if isinstance(proj_size, Sequence):
        if len(proj_size) != len(hidden_sizes):
            raise ValueError(
                f"proj_size must be one int or one per layer ({len(hidden_sizes)}), got {len(proj_size)} sizes"
            )
        proj = [check_size(f"proj_size[{l}]", n, minimum=0) for l, n in enumerate(proj_size)]
    else:
        proj = [check_size("proj_size", proj_size, minimum=0)] * len(hidden_sizes)
    n_dir = 2 if bidirectional else 1
    keys = jax.random.split(key, len(hidden_sizes) * n_dir)  # raw uint32 keys or typed keys (nnx.Rngs) alike
    keys = keys.reshape(len(hidden_sizes), n_dir, *keys.shape[1:])
    layers, d = [], int(input_size)
    for l, h in enumerate(hidden_sizes):
        opts = {"proj_size": proj[l], "peephole": peephole, "layer_norm": layer_norm}
        try:
            layer = tuple(
                init_params(keys[l, k], d, int(h), **opts, forget_bias=forget_bias, dtype=dtype) for k in range(n_dir)
            )
        except (TypeError, ValueError) as e:
            raise type(e)(f"layer {l}: {e}") from e
        layers.append(layer)
        d = n_dir * (proj[l] or int(h))
    return tuple(layers)


def stack_sizes(params) -> tuple[int, list[tuple[int, int, int]]]:
    """Validate the structure of ``StackParams``.

    Returns:
      (D_0, [(D_l, H_l, directions_l) for each layer]). Raises ``TypeError`` /
      ``ValueError`` naming the offending entry, e.g. ``params[1][0].U``, and
      the shapes involved. ``stack_out_sizes`` gives each layer's output size.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> import jax_lstm as jl
      >>> from jax_lstm.layers import gate_trace_stack, init_stack, lstm_stack
      >>> from jax_lstm.layers import stack_sizes
      >>> stack_sizes(init_stack(jax.random.PRNGKey(0), 3, (4, 2), bidirectional=True))
      (3, [(3, 4, 2), (8, 2, 2)])
    """
    d0, layout = _stack_layout(params)
    return d0, [(D, H, n) for D, H, n, _ in layout]


def stack_out_sizes(params) -> list[int]:
    """The size of h_t in each layer: P_l with a projection, else H_l (one direction).

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> import jax_lstm as jl
      >>> from jax_lstm.layers import gate_trace_stack, init_stack, lstm_stack
      >>> from jax_lstm.layers import stack_out_sizes
      >>> stack_out_sizes(init_stack(jax.random.PRNGKey(0), 3, (4, 6), proj_size=[2, 0]))
      [2, 6]
    """
    return [H if P is None else P for _, H, _, P in _stack_layout(params)[1]]


def _stack_layout(params) -> tuple[int, list[tuple[int, int, int, int | None]]]:
    """(D_0, [(D_l, H_l, directions_l, P_l or None)]) after validating the stack."""
    if isinstance(params, LSTMParams) or not isinstance(params, (tuple, list)) or len(params) == 0:
        raise TypeError(
            "params must be a non-empty tuple of layers, each a tuple of one (forward) or two "
            f"(forward, reverse) LSTMParams, as init_stack returns; got {type(params).__name__}"
        )
    sizes, d_in = [], None
    for l, layer in enumerate(params):
        if isinstance(layer, LSTMParams) or not isinstance(layer, (tuple, list)) or len(layer) not in (1, 2):
            raise TypeError(
                f"params[{l}] must be a tuple of one (forward) or two (forward, reverse) LSTMParams, "
                f"got {type(layer).__name__}" + (f" of length {len(layer)}" if isinstance(layer, tuple) else "")
            )
        shapes = []
        for k, p in enumerate(layer):
            shapes.append(check_params(p, f"params[{l}][{k}]"))
        if len(shapes) == 2 and shapes[0] != shapes[1]:
            raise ValueError(
                f"params[{l}]: the two directions must have the same sizes; forward U {tuple(layer[0][1].shape)}, "
                f"W {tuple(layer[0][0].shape)}; reverse U {tuple(layer[1][1].shape)}, W {tuple(layer[1][0].shape)}"
            )
        D, H, P = shapes[0]
        if d_in is not None and D != d_in:
            prev = "2 * " if len(params[l - 1]) == 2 else ""
            raise ValueError(
                f"params[{l}][0].U has shape {tuple(layer[0][1].shape)}, expected ({d_in}, {4 * H}): layer {l} "
                f"takes the output of layer {l - 1}, of size {prev}{params[l - 1][0][0].shape[0]} = {d_in}"
            )
        sizes.append((D, H, len(layer), P))
        d_in = len(layer) * (H if P is None else P)
    return sizes[0][0], sizes


def _check_states0(states0, sizes, B, name: str = "states0") -> None:
    """``states0`` (or ``reset_states``, named ``name``): None or a ``StackState`` matching the stack."""
    if states0 is None:
        return
    if not isinstance(states0, (tuple, list)) or isinstance(states0, LSTMState) or len(states0) != len(sizes):
        raise TypeError(
            f"{name} must be None or a tuple with one entry per layer ({len(sizes)}), each None or a tuple of "
            f"one LSTMState per direction; got {type(states0).__name__}"
            + (f" of length {len(states0)}" if isinstance(states0, (tuple, list)) else "")
        )
    for l, (layer_state, (_, H, n_dir, P)) in enumerate(zip(states0, sizes, strict=True)):
        if layer_state is None:
            continue
        bad = isinstance(layer_state, LSTMState) or not isinstance(layer_state, (tuple, list))
        if bad or len(layer_state) != n_dir:
            raise TypeError(
                f"{name}[{l}] must be None or a tuple of {n_dir} LSTMState (one per direction of layer {l}), "
                f"got {type(layer_state).__name__}"
            )
        for k, s in enumerate(layer_state):
            where = f"from xs and params[{l}][{k}].W"
            check_state(f"{name}[{l}][{k}]", s, B, H, where, dims=f"(B, H_{l})", P=P)


def _check_xs(xs, D0, seq_lengths, mask=None, resets=None, time_major=True):
    layout = "(T, B, D)" if time_major else "(B, T, D)"
    if not hasattr(xs, "shape") or not hasattr(xs, "dtype"):
        raise TypeError(f"xs must be an array of shape {layout}, got {type(xs).__name__}")
    if xs.ndim != 3 or xs.shape[2] != D0:
        want, major = (f"(T, B, {D0})", "time-major") if time_major else (f"(B, T, {D0})", "batch-major")
        raise shape_error("xs", xs.shape, f"{want}: {major}, last axis matching params[0][0].U")
    T, B = xs.shape[:2] if time_major else xs.shape[1::-1]
    check_step_flags("mask", mask, T, B, time_major)
    check_step_flags("resets", resets, T, B, time_major)
    check_lengths(seq_lengths, B, xs.shape)
    return B


def _run(fn, where, *args, **kwargs):
    """Call ``lstm``/``lstm_ref``, prefixing any argument error with the layer and direction."""
    try:
        return fn(*args, **kwargs)
    except (TypeError, ValueError) as e:
        raise type(e)(f"{where}: {e}") from e


def lstm_stack(
    params,
    xs: jax.Array,
    states0=None,
    *,
    seq_lengths: jax.Array | None = None,
    mask: jax.Array | None = None,
    resets: jax.Array | None = None,
    reset_states=None,
    dropout: float = 0.0,
    recurrent_dropout: float = 0.0,
    key: jax.Array | None = None,
    unroll: int = 1,
    impl: str = "manual",
    time_major: bool = True,
    gate_fn=jax.nn.sigmoid,
    activation_fn=jnp.tanh,
) -> tuple[jax.Array, StackState]:
    """Run a stack of (optionally bidirectional) LSTM layers over a sequence.

    Every layer and direction is one call of ``lstm`` (hand-written BPTT), or
    of ``lstm_ref`` with ``impl="autodiff"``, so the two stacks have the same values
    and their gradients can be compared.

    Args:
      params: ``StackParams`` as ``init_stack`` returns: per layer a tuple of
        ``LSTMParams``, (forward,) or (forward, reverse).
      xs: (T, B, D_0) inputs, time-major; (B, T, D_0) with ``time_major=False``.
      states0: initial states, ``StackState`` with h, c: (B, H_l) per layer and
        direction; None (or None for a layer or a direction) means zeros.
      seq_lengths: optional (B,) integer lengths shared by every layer and
        direction. Steps t >= seq_lengths[b] are padding: zero output,
        unchanged state; reverse directions start at step seq_lengths[b] - 1.
      mask: optional (T, B) bool ((B, T) batch-major), shared by every layer and
        direction: a False step is skipped (see ``lstm``).
      resets: optional (T, B) bool ((B, T) batch-major), shared by every layer
        and direction: each resets to its own reset state just before
        visiting a step where it is True (see ``lstm``).
      reset_states: what the resets restore, with the nesting of ``states0``
        (None anywhere means zeros).
      dropout: probability of zeroing an element of a layer's output before it
        enters the next layer (inverted dropout: kept elements are scaled by
        1 / (1 - dropout)); never applied to the last layer's output. A Python
        float in [0, 1); pass 0.0 at evaluation.
      recurrent_dropout: rate of variational dropout on h_{t-1} in every layer
        and direction (see ``lstm``); a Python float in [0, 1).
      key: PRNG key for the dropout masks; required when either rate is > 0.
        The mask after layer l is ``bernoulli(split(key, L - 1)[l], 1 - dropout)``,
        one independent draw per element of the (T, B, D_{l+1}) output; layer
        l, direction k (0 forward, 1 reverse) draws its recurrent-dropout mask
        with ``key=fold_in(fold_in(key, l), k)``.
      unroll: passed to every ``lax.scan``.
      impl: "manual" (``lstm``, hand-written BPTT) or "autodiff" (``lstm_ref``,
        autodiff through ``lax.scan``).
      time_major: False for batch-major ``xs``, ``hs``, ``mask`` and ``resets``.
        The stack transposes once on the way in and once on the way out.
      gate_fn, activation_fn: element-wise activations of every layer (see ``lstm``).

    Returns:
      ``(hs, final_states)``: hs: (T, B, H_L) from the last layer, or
      (T, B, 2 H_L) if it is bidirectional (forward half first), batch-major
      with ``time_major=False``; final_states
      is a ``StackState``, h, c: (B, H_l) per layer and direction. The final
      state of a reverse direction is its state after step 0.

    Raises:
      ValueError, TypeError: bad structure or shapes, naming the argument
        (e.g. ``params[1][0].U``, ``states0[0][1].h``) and the shapes.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> import jax_lstm as jl
      >>> from jax_lstm.layers import gate_trace_stack, init_stack, lstm_stack
      >>> stack = init_stack(jax.random.PRNGKey(0), 3, (4, 2), bidirectional=True)
      >>> xs = jnp.ones((5, 2, 3))                                  # (T, B, D_0)
      >>> hs, finals = lstm_stack(stack, xs, seq_lengths=jnp.array([5, 3]))
      >>> hs.shape, finals[1][1].h.shape                            # forward | reverse; layer 1, reverse
      ((5, 2, 4), (2, 2))
      >>> hs, _ = lstm_stack(stack, xs, dropout=0.2, key=jax.random.PRNGKey(1))   # training
    """
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {sorted(IMPLS)}, got {impl!r}")
    fn = IMPLS[impl]
    D0, sizes = _stack_layout(params)
    B = _check_xs(xs, D0, seq_lengths, mask, resets, time_major)
    _check_states0(states0, sizes, B)
    _check_states0(reset_states, sizes, B, "reset_states")
    rec_rate = check_rate("recurrent_dropout", recurrent_dropout, key)
    dropout = check_rate("dropout", dropout, key)
    use_dropout = dropout > 0.0 and len(params) > 1
    keys = jax.random.split(key, len(params) - 1) if use_dropout else None
    x, mask, resets = _time_major(xs, mask, resets, time_major)

    finals = []
    for l, layer in enumerate(params):
        layer_state0 = _layer_states(states0, l, len(layer))
        layer_reset = _layer_states(reset_states, l, len(layer))
        outs, states = [], []
        for k, p in enumerate(layer):
            hs, final = _run(
                fn,
                f"layer {l} {_DIRECTIONS[k]} (params[{l}][{k}])",
                p,
                x,
                layer_state0[k],
                seq_lengths=seq_lengths,
                mask=mask,
                resets=resets,
                reset_state=layer_reset[k],
                recurrent_dropout=rec_rate,
                key=jax.random.fold_in(jax.random.fold_in(key, l), k) if rec_rate > 0.0 else None,
                reverse=k == 1,
                unroll=unroll,
                gate_fn=gate_fn,
                activation_fn=activation_fn,
            )
            outs.append(hs)
            states.append(final)
        finals.append(tuple(states))
        x = outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=-1)
        if use_dropout and l < len(params) - 1:
            keep = jax.random.bernoulli(keys[l], 1.0 - dropout, x.shape)
            x = jnp.where(keep, x / jnp.asarray(1.0 - dropout, x.dtype), jnp.zeros_like(x))
    return (x if time_major else jnp.swapaxes(x, 0, 1)), tuple(finals)


def _layer_states(states, l, n_dir):
    """Layer ``l``'s entry of a ``StackState``-shaped argument, one entry (or None) per direction."""
    return states[l] if states is not None and states[l] is not None else (None,) * n_dir


def _time_major(xs, mask, resets, time_major):
    """xs, mask and resets in time-major layout (one transpose each for batch-major input)."""
    if time_major:
        return xs, mask, resets
    flip = lambda a: None if a is None else jnp.swapaxes(a, 0, 1)  # noqa: E731
    return flip(xs), flip(mask), flip(resets)


def gate_trace_stack(
    params,
    xs: jax.Array,
    states0=None,
    *,
    seq_lengths=None,
    mask=None,
    resets=None,
    reset_states=None,
    time_major: bool = True,
    gate_fn=jax.nn.sigmoid,
    activation_fn=jnp.tanh,
) -> tuple[tuple[LSTMTrace, ...], ...]:
    """Gate inspection for a whole stack, without dropout (evaluation mode).

    Each layer and direction is traced with ``lstm_trace``; the next layer's
    input is the (concatenated) ``h`` of the layer below, cast to the dtype of
    the layer's weights, as in ``lstm_stack``.

    Args:
      params: ``StackParams``.
      xs: (T, B, D_0) inputs, time-major; (B, T, D_0) with ``time_major=False``.
      states0: ``StackState`` or None, as in ``lstm_stack``.
      seq_lengths: optional (B,) integer lengths.
      mask, resets: optional (T, B) bool, as in ``lstm_stack``.
      reset_states: what the resets restore, as in ``lstm_stack``.
      time_major: False for batch-major ``xs``, ``mask``, ``resets`` and traces.
      gate_fn, activation_fn: element-wise activations, as in ``lstm_stack``.

    Returns:
      Per layer a tuple with one ``LSTMTrace`` (``LayerNormTrace`` with layer norm) per direction; each of its
      fields f, i, g, o, c, h is (T, B, H_l) ((B, T, H_l) batch-major), zero at
      skipped steps. The last layer's ``h`` (concatenated over directions)
      equals ``lstm_stack``'s hs.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> import jax_lstm as jl
      >>> from jax_lstm.layers import gate_trace_stack, init_stack, lstm_stack
      >>> stack = init_stack(jax.random.PRNGKey(0), 3, (4, 2), bidirectional=True)
      >>> traces = gate_trace_stack(stack, jnp.ones((5, 2, 3)))
      >>> traces[1][1].f.shape                                      # layer 1, reverse direction: (T, B, H_1)
      (5, 2, 2)
    """
    D0, sizes = _stack_layout(params)
    B = _check_xs(xs, D0, seq_lengths, mask, resets, time_major)
    _check_states0(states0, sizes, B)
    _check_states0(reset_states, sizes, B, "reset_states")
    x, mask, resets = _time_major(xs, mask, resets, time_major)
    traces = []
    for l, layer in enumerate(params):
        layer_state0 = _layer_states(states0, l, len(layer))
        layer_reset = _layer_states(reset_states, l, len(layer))
        layer_traces = tuple(
            _run(
                lstm_trace,
                f"layer {l} {_DIRECTIONS[k]} (params[{l}][{k}])",
                p,
                x,
                layer_state0[k],
                seq_lengths=seq_lengths,
                mask=mask,
                resets=resets,
                reset_state=layer_reset[k],
                reverse=k == 1,
                gate_fn=gate_fn,
                activation_fn=activation_fn,
            )
            for k, p in enumerate(layer)
        )
        traces.append(layer_traces)
        dtype = jnp.result_type(*jax.tree.leaves(layer[0]), x)
        x = jnp.concatenate([t.h for t in layer_traces], axis=-1).astype(dtype)
    if not time_major:
        flip = lambda v: None if v is None else jnp.swapaxes(v, 0, 1)  # noqa: E731
        traces = [tuple(type(t)(*(flip(v) for v in t)) for t in layer) for layer in traces]
    return tuple(traces)
