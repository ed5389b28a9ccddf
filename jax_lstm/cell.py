"""The LSTM cell: parameters, state, initialisation and one time step.

The forward equations live here and nowhere else (row-vector convention, gate
blocks side by side in the order f, i, g, o)::

    z_t = h_{t-1} @ W + x_t @ U + b                      # (B, 4H)
    f_t, i_t, o_t = sigmoid(z_f), sigmoid(z_i), sigmoid(z_o)
    g_t = tanh(z_g)
    c_t = c_{t-1} * f_t + i_t * g_t
    h_t = tanh(c_t) * o_t

Dtype policy (shared by ``lstm_cell``, ``lstm_ref`` and ``lstm``): matmuls run in
the dtype of the parameters and inputs and accumulate in ``acc_dtype`` (float32
for 16-bit floats, the dtype itself otherwise); gate math and the cell state are
computed in ``acc_dtype``.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "LSTMParams",
    "LSTMState",
    "init_params",
    "zeros_state",
    "lstm_cell",
    "dropped_cell",
    "acc_dtype",
    "split_gates",
    "gate_activations",
    "cell_update",
    "preactivations",
    "check_inputs",
    "check_step_flags",
    "check_recurrent_dropout",
    "varying_axes",
    "make_varying",
    "on_explicit_mesh",
]


class LSTMParams(NamedTuple):
    """Weights of one LSTM layer, gate blocks side by side as [f | i | g | o]."""

    W: jax.Array  # (H, 4H) recurrent weights, multiply h_{t-1}
    U: jax.Array  # (D, 4H) input weights, multiply x_t
    b: jax.Array  # (4H,)   bias


class LSTMState(NamedTuple):
    """Recurrent state of one LSTM layer."""

    h: jax.Array  # (B, H) hidden state
    c: jax.Array  # (B, H) cell state


def acc_dtype(dtype) -> jnp.dtype:
    """Dtype in which gate math and the cell state run for inputs of ``dtype``."""
    dtype = jnp.dtype(dtype)
    return jnp.dtype(jnp.float32) if dtype.itemsize < 4 else dtype


def init_params(
    key: jax.Array,
    input_size: int,
    hidden_size: int,
    *,
    forget_bias: float = 1.0,
    dtype=jnp.float32,
) -> LSTMParams:
    """Initialise one layer.

    ``U`` is Glorot-uniform over (D, 4H), each (H, H) gate block of ``W`` is
    orthogonal, ``b`` is zero except the forget block, which is ``forget_bias``
    (1.0 keeps the cell's memory open early in training).

    Args:
      key: PRNG key.
      input_size: D, the size of x_t.
      hidden_size: H, the size of h_t and c_t.
      forget_bias: initial value of the forget-gate bias block.
      dtype: dtype of all three arrays.

    Returns:
      ``LSTMParams`` with W: (H, 4H), U: (D, 4H), b: (4H,).
    """
    for name, n in (("input_size", input_size), ("hidden_size", hidden_size)):
        if not isinstance(n, (int, np.integer)) or n < 1:
            raise ValueError(f"{name} must be a positive int, got {n!r}")
    D, H = int(input_size), int(hidden_size)
    k_u, k_w = jax.random.split(key)
    U = jax.nn.initializers.glorot_uniform()(k_u, (D, 4 * H), jnp.float32)
    ortho = jax.nn.initializers.orthogonal()
    W = jnp.concatenate([ortho(k, (H, H), jnp.float32) for k in jax.random.split(k_w, 4)], axis=1)
    b = jnp.zeros((4 * H,), jnp.float32).at[:H].set(forget_bias)
    return LSTMParams(W.astype(dtype), U.astype(dtype), b.astype(dtype))


def zeros_state(batch_size: int, hidden_size: int, dtype=jnp.float32) -> LSTMState:
    """A zero ``LSTMState`` with h, c: (batch_size, hidden_size)."""
    z = jnp.zeros((batch_size, hidden_size), dtype)
    return LSTMState(z, z)


def split_gates(z: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Split (..., 4H) into the four (..., H) blocks f, i, g, o."""
    return tuple(jnp.split(z, 4, axis=-1))  # type: ignore[return-value]


def gate_activations(z: jax.Array) -> jax.Array:
    """Pre-activations (..., 4H) -> activations (..., 4H): sigmoid on f, i, o, tanh on g.

    All four blocks go through one ``tanh``: sigmoid(x) = 0.5 + 0.5 * tanh(x / 2).
    """
    H = z.shape[-1] // 4
    # on a mesh with Explicit axes the selector must be sharded as z is
    placed = {"out_sharding": jax.typeof(z).sharding} if on_explicit_mesh(z) else {}
    is_g = jax.lax.broadcasted_iota(jnp.int32, z.shape, z.ndim - 1, **placed) // H == 2
    t = jnp.tanh(jnp.where(is_g, z, 0.5 * z))
    return jnp.where(is_g, t, 0.5 + 0.5 * t)


def cell_update(c_prev: jax.Array, act: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """From c_{t-1} and activations [f | i | g | o] to (c_t, tanh(c_t), h_t)."""
    f, i, g, o = split_gates(act)
    c = c_prev * f + i * g
    tc = jnp.tanh(c)
    return c, tc, tc * o


def _matmul(a: jax.Array, w: jax.Array, out_dtype) -> jax.Array:
    """a @ w in w's dtype, accumulated in ``out_dtype``."""
    return jnp.matmul(a.astype(w.dtype), w, preferred_element_type=out_dtype)


def preactivations(params: LSTMParams, h: jax.Array, x_t: jax.Array, acc) -> jax.Array:
    """z_t = h_{t-1} @ W + x_t @ U + b: (B, 4H) in dtype ``acc``."""
    return _matmul(h, params.W, acc) + _matmul(x_t, params.U, acc) + params.b.astype(acc)[None, :]


def lstm_cell(params: LSTMParams, state: LSTMState, x_t: jax.Array) -> tuple[LSTMState, jax.Array]:
    """One LSTM step, with ``lax.scan``'s body signature.

    Args:
      params: ``LSTMParams`` with W: (H, 4H), U: (D, 4H), b: (4H,).
      state: ``LSTMState`` with h, c: (B, H).
      x_t: (B, D) input at this step.

    Returns:
      ``(new_state, h_t)``; the new state keeps the dtypes of ``state``.
    """
    return dropped_cell(params, state, x_t, None)


def dropped_cell(params: LSTMParams, state: LSTMState, x_t: jax.Array, keep) -> tuple[LSTMState, jax.Array]:
    """``lstm_cell`` with variational recurrent dropout: ``keep`` (B, H) scales h_{t-1} in ``h @ W`` only.

    ``keep`` is the inverted-dropout factor (0 or 1 / (1 - p)), or None for no dropout.
    """
    acc = acc_dtype(jnp.result_type(params.W, x_t))
    h_in = state.h if keep is None else state.h * keep
    z = preactivations(params, h_in, x_t, acc)
    c, _, h = cell_update(state.c.astype(acc), gate_activations(z))
    new = LSTMState(h.astype(state.h.dtype), c.astype(state.c.dtype))
    return new, new.h


def _shape_msg(name: str, got, want: str) -> str:
    return f"{name} has shape {tuple(got)}, expected {want}"


def check_inputs(params, xs, state0, seq_lengths, unroll, *, time_major=True) -> tuple[int, int, int, int]:
    """Validate the arguments of ``lstm``/``lstm_ref`` at trace time.

    Returns:
      (T, B, D, H). Raises ``TypeError``/``ValueError`` naming the argument and
      both shapes.
    """
    if not isinstance(params, LSTMParams):
        if isinstance(params, tuple) and len(params) == 3:
            params = LSTMParams(*params)
        else:
            raise TypeError(f"params must be LSTMParams(W, U, b), got {type(params).__name__}")
    W, U, b = (jnp.asarray(a) if not hasattr(a, "shape") else a for a in params)
    if W.ndim != 2 or W.shape[1] != 4 * W.shape[0]:
        raise ValueError(_shape_msg("params.W", W.shape, "(H, 4H)"))
    H = W.shape[0]
    if U.ndim != 2 or U.shape[1] != 4 * H:
        raise ValueError(_shape_msg("params.U", U.shape, f"(D, {4 * H}) to match params.W {tuple(W.shape)}"))
    D = U.shape[0]
    if b.shape != (4 * H,):
        raise ValueError(_shape_msg("params.b", b.shape, f"({4 * H},) to match params.W {tuple(W.shape)}"))
    layout = "(T, B, D)" if time_major else "(B, T, D)"
    if not hasattr(xs, "shape") or not hasattr(xs, "dtype"):
        raise TypeError(f"xs must be an array of shape {layout}, got {type(xs).__name__}")
    if xs.ndim != 3:
        major = "time-major" if time_major else "batch-major (time_major=False)"
        raise ValueError(_shape_msg("xs", xs.shape, f"{layout} with D={D}: xs is {major} and rank 3"))
    T, B, Dx = xs.shape if time_major else (xs.shape[1], xs.shape[0], xs.shape[2])
    if Dx != D:
        want = f"(T, B, {D})" if time_major else f"(B, T, {D})"
        raise ValueError(_shape_msg("xs", xs.shape, f"{want}: its last axis must match params.U {tuple(U.shape)}"))
    for name, a in (("params.W", W), ("params.U", U), ("params.b", b), ("xs", xs)):
        if not jnp.issubdtype(a.dtype, jnp.floating):
            raise TypeError(f"{name} must be floating point, got dtype {a.dtype}")
    if state0 is not None:
        if not (isinstance(state0, tuple) and len(state0) == 2):
            raise TypeError(f"state0 must be LSTMState(h, c) or None, got {type(state0).__name__}")
        for name, a in (("state0.h", state0[0]), ("state0.c", state0[1])):
            shape = getattr(a, "shape", None)
            if shape is None or tuple(shape) != (B, H):
                raise ValueError(
                    _shape_msg(
                        name,
                        shape if shape is not None else (),
                        f"(B, H) = ({B}, {H}) from xs {tuple(xs.shape)} and params.W {tuple(W.shape)}",
                    )
                )
            if not jnp.issubdtype(a.dtype, jnp.floating):
                raise TypeError(f"{name} must be floating point, got dtype {a.dtype}")
    if seq_lengths is not None:
        shape = getattr(seq_lengths, "shape", None)
        if shape is None:
            raise TypeError(f"seq_lengths must be an integer array of shape ({B},), got {type(seq_lengths).__name__}")
        if tuple(shape) != (B,):
            raise ValueError(_shape_msg("seq_lengths", shape, f"(B,) = ({B},) from xs {tuple(xs.shape)}"))
        if not jnp.issubdtype(seq_lengths.dtype, jnp.integer):
            raise TypeError(
                f"seq_lengths must have an integer dtype, got {seq_lengths.dtype} with shape {tuple(shape)}"
            )
    if not isinstance(unroll, (int, np.integer)) or isinstance(unroll, bool) or unroll < 1:
        raise ValueError(f"unroll must be a positive int, got {unroll!r}")
    return T, B, D, H


def check_step_flags(name: str, a, T: int, B: int, time_major: bool) -> None:
    """Validate a per-step boolean array (``mask`` or ``resets``): (T, B), or (B, T) when batch-major."""
    want = (T, B) if time_major else (B, T)
    layout = "(T, B)" if time_major else "(B, T) (time_major=False)"
    shape = getattr(a, "shape", None)
    if shape is None or not hasattr(a, "dtype"):
        raise TypeError(f"{name} must be a boolean array of shape {layout} = {want}, got {type(a).__name__}")
    if tuple(shape) != want:
        raise ValueError(_shape_msg(name, shape, f"{layout} = {want} from xs"))
    if a.dtype != jnp.bool_:
        raise TypeError(f"{name} must have dtype bool, got {a.dtype} with shape {tuple(shape)}")


def check_recurrent_dropout(rate, key) -> float:
    """Validate ``recurrent_dropout`` (a static Python float in [0, 1)) and its key; returns the rate."""
    if isinstance(rate, bool) or not isinstance(rate, (float, int, np.floating, np.integer)):
        raise TypeError(f"recurrent_dropout must be a Python float in [0, 1), got {type(rate).__name__}")
    if not 0.0 <= float(rate) < 1.0:
        raise ValueError(f"recurrent_dropout must be in [0, 1), got {rate!r}")
    if float(rate) > 0.0 and key is None:
        raise ValueError(
            f"recurrent_dropout={float(rate)} needs a PRNG key: pass key=jax.random.PRNGKey(...) "
            "(or recurrent_dropout=0.0)"
        )
    return float(rate)


def varying_axes(*arrays) -> frozenset:
    """The manual mesh axes (inside ``jax.shard_map``) over which any of ``arrays`` varies."""
    axes: frozenset = frozenset()
    for a in arrays:
        if a is None:
            continue
        aval = jax.typeof(a)
        vma = getattr(aval, "vma", None)
        if vma is None:
            vma = getattr(getattr(aval, "mat", None), "varying", frozenset())
        axes = axes | frozenset(vma)
    return axes


def make_varying(a, axes: frozenset):
    """``a`` marked as varying over ``axes`` (a no-op outside ``shard_map``).

    A loop carry must have the same type on entry and exit: a carry that starts
    from zeros (unvarying) and is updated with per-shard data (varying) has to
    be declared varying before the loop.
    """
    missing = tuple(sorted(axes - varying_axes(a), key=str))
    return jax.lax.pcast(a, missing, to="varying") if missing else a


def on_explicit_mesh(a) -> bool:
    """Whether ``a`` is typed as sharded on a mesh with Explicit axes (``jax.make_mesh``'s default)."""
    mesh = getattr(jax.typeof(a).sharding, "mesh", None)
    return mesh is not None and not mesh.empty and jax.sharding.AxisType.Explicit in tuple(mesh.axis_types)
