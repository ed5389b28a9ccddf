"""The one input front end of ``lstm``, ``lstm_ref`` and ``lstm_trace``, and every argument check.

``prepare`` validates the arguments at trace time, brings them to one layout
(time-major) and their compute dtypes, and combines ``mask`` and
``seq_lengths`` into one (T, B) mask of the steps that run. Each check is
written once here, with one message template (``shape_error``), and the
stacks and modules call the same checks, prefixing the layer or module.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jax_lstm._sharding import make_varying, onto_mesh_of, varying_axes
from jax_lstm.cell import LayerNormParams, LSTMParams, LSTMState, acc_dtype, check_size

__all__ = [
    "Prepared",
    "prepare",
    "lengths_mask",
    "shape_error",
    "check_size",
    "check_rate",
    "check_inputs",
    "check_step_flags",
    "check_lengths",
    "check_state",
    "check_activations",
    "check_params",
]


def shape_error(name: str, got, want: str) -> ValueError:
    """The one message for a wrong shape: the argument, its shape and what was expected (and why)."""
    got = None if got is None else tuple(got)
    return ValueError(f"{name} has shape {got}, expected {want}")


def check_rate(name: str, rate, key) -> float:
    """A dropout rate (a static Python float in [0, 1)) and its key; returns the rate as a float."""
    if isinstance(rate, (bool, np.bool_)) or not isinstance(rate, (float, int, np.floating, np.integer)):
        raise TypeError(f"{name} must be a Python float in [0, 1), got {type(rate).__name__}")
    if not 0.0 <= float(rate) < 1.0:  # also refuses nan
        raise ValueError(f"{name} must be in [0, 1), got {rate!r}")
    if float(rate) > 0.0 and key is None:
        raise ValueError(f"{name}={float(rate)} needs a PRNG key: pass key=jax.random.PRNGKey(...) (or {name}=0.0)")
    return float(rate)


def check_activations(gate_fn, activation_fn) -> None:
    """``gate_fn`` and ``activation_fn``: element-wise functions (static: Python callables)."""
    for name, fn in (("gate_fn", gate_fn), ("activation_fn", activation_fn)):
        if not callable(fn):
            raise TypeError(f"{name} must be an element-wise function such as jax.nn.sigmoid, got {fn!r}")


def _floating(name: str, a) -> None:
    if not jnp.issubdtype(a.dtype, jnp.floating):
        raise TypeError(f"{name} must be floating point, got dtype {a.dtype}")


def check_state(name: str, state, B: int, H: int, where: str, dims: str = "(B, H)", P: int | None = None) -> None:
    """``state`` is None or an ``(h, c)`` pair of floating (B, H) arrays; ``where`` says where B, H come from.

    With a projection (``P`` given) h is (B, P) and c is (B, H).
    """
    if state is None:
        return
    if not (isinstance(state, tuple) and len(state) == 2):
        raise TypeError(f"{name} must be LSTMState(h, c) or None, got {type(state).__name__}")
    for field, a in zip("hc", state, strict=True):
        n, d = (P, dims.replace("H", "P", 1) if "H" in dims else dims) if field == "h" and P is not None else (H, dims)
        shape = getattr(a, "shape", None)
        if shape is None or tuple(shape) != (B, n):
            raise shape_error(f"{name}.{field}", shape if shape is not None else (), f"{d} = ({B}, {n}) {where}")
        _floating(f"{name}.{field}", a)


def check_lengths(seq_lengths, B: int, xs_shape) -> None:
    """``seq_lengths``: None or an integer (B,) array."""
    if seq_lengths is None:
        return
    shape = getattr(seq_lengths, "shape", None)
    if shape is None:
        raise TypeError(f"seq_lengths must be an integer array of shape ({B},), got {type(seq_lengths).__name__}")
    if tuple(shape) != (B,):
        raise shape_error("seq_lengths", shape, f"(B,) = ({B},) from xs {tuple(xs_shape)}")
    if not jnp.issubdtype(seq_lengths.dtype, jnp.integer):
        raise TypeError(f"seq_lengths must have an integer dtype, got {seq_lengths.dtype} with shape {tuple(shape)}")


def check_step_flags(name: str, a, T: int, B: int, time_major: bool) -> None:
    """A per-step boolean array (``mask`` or ``resets``): (T, B), or (B, T) when batch-major."""
    if a is None:
        return
    want = (T, B) if time_major else (B, T)
    layout = "(T, B)" if time_major else "(B, T) (time_major=False)"
    shape = getattr(a, "shape", None)
    if shape is None or not hasattr(a, "dtype"):
        raise TypeError(f"{name} must be a boolean array of shape {layout} = {want}, got {type(a).__name__}")
    if tuple(shape) != want:
        raise shape_error(name, shape, f"{layout} = {want} from xs")
    if a.dtype != jnp.bool_:
        raise TypeError(f"{name} must have dtype bool, got {a.dtype} with shape {tuple(shape)}")


def _as_array(a):
    return a if hasattr(a, "shape") else jnp.asarray(a)


def check_params(params, name: str = "params") -> tuple[int, int, int | None]:
    """Validate one layer's ``LSTMParams`` (plain or with optional fields); returns (D, H, P or None).

    Raises ``TypeError``/``ValueError`` naming the field and both shapes.
    """
    if not isinstance(params, tuple) or not 3 <= len(params) <= 6:
        raise TypeError(
            f"{name} must be LSTMParams(W, U, b) (optionally with W_proj, peephole, norm), got {type(params).__name__}"
        )
    p = LSTMParams(*params)
    W, U, b = (_as_array(a) for a in p[:3])
    W_proj = None if p.W_proj is None else _as_array(p.W_proj)
    if W_proj is None:
        if W.ndim != 2 or W.shape[1] != 4 * W.shape[0]:
            raise shape_error(f"{name}.W", W.shape, "(H, 4H)")
        H, P = W.shape[0], None
    else:
        if W.ndim != 2 or W.shape[1] % 4:
            raise shape_error(f"{name}.W", W.shape, "(P, 4H) with a projection")
        H = W.shape[1] // 4
        if W_proj.ndim != 2 or W_proj.shape[0] != H or W_proj.shape[1] != W.shape[0]:
            raise shape_error(
                f"{name}.W_proj", W_proj.shape, f"(H, P) = ({H}, {W.shape[0]}) to match {name}.W {tuple(W.shape)}"
            )
        P = W.shape[0]
        if not 0 < P < H:
            raise ValueError(f"{name}.W_proj has shape {tuple(W_proj.shape)}: the projection size P must be in (0, H)")
        _floating(f"{name}.W_proj", W_proj)
    if U.ndim != 2 or U.shape[1] != 4 * H:
        raise shape_error(f"{name}.U", U.shape, f"(D, {4 * H}) to match {name}.W {tuple(W.shape)}")
    if b.shape != (4 * H,):
        raise shape_error(f"{name}.b", b.shape, f"({4 * H},) to match {name}.W {tuple(W.shape)}")
    for field, a in ((f"{name}.W", W), (f"{name}.U", U), (f"{name}.b", b)):
        _floating(field, a)
    if p.peephole is not None:
        peep = _as_array(p.peephole)
        if peep.shape != (3, H):
            raise shape_error(f"{name}.peephole", peep.shape, f"(3, H) = (3, {H}), rows f, i, o")
        _floating(f"{name}.peephole", peep)
    if p.norm is not None:
        if not isinstance(p.norm, tuple) or len(p.norm) != 4:
            raise TypeError(
                f"{name}.norm must be LayerNormParams(gamma_x, gamma_h, gamma_c, beta_c), got {type(p.norm).__name__}"
            )
        for field, a, n in zip(LayerNormParams._fields, p.norm, (4 * H, 4 * H, H, H), strict=True):
            a = _as_array(a)
            if a.shape != (n,):
                raise shape_error(f"{name}.norm.{field}", a.shape, f"({n},) for H = {H}")
            _floating(f"{name}.norm.{field}", a)
    return U.shape[0], H, P


def check_inputs(params, xs, state0, seq_lengths, unroll, *, time_major=True) -> tuple[int, int, int, int]:
    """Validate the arguments of ``lstm``/``lstm_ref`` at trace time.

    Returns:
      (T, B, D, H). Raises ``TypeError``/``ValueError`` naming the argument and
      both shapes.
    """
    D, H, P = check_params(params)
    layout = "(T, B, D)" if time_major else "(B, T, D)"
    if not hasattr(xs, "shape") or not hasattr(xs, "dtype"):
        raise TypeError(f"xs must be an array of shape {layout}, got {type(xs).__name__}")
    if xs.ndim != 3:
        major = "time-major" if time_major else "batch-major (time_major=False)"
        raise shape_error("xs", xs.shape, f"{layout} with D={D}: xs is {major} and rank 3")
    T, B, Dx = xs.shape if time_major else (xs.shape[1], xs.shape[0], xs.shape[2])
    if Dx != D:
        want = f"(T, B, {D})" if time_major else f"(B, T, {D})"
        raise shape_error(
            "xs", xs.shape, f"{want}: its last axis must match params.U {tuple(_as_array(params[1]).shape)}"
        )
    _floating("xs", xs)
    W_shape = tuple(_as_array(params[0]).shape)
    check_state("state0", state0, B, H, f"from xs {tuple(xs.shape)} and params.W {W_shape}", P=P)
    check_lengths(seq_lengths, B, xs.shape)
    if not isinstance(unroll, (int, np.integer)) or isinstance(unroll, bool) or unroll < 1:
        raise ValueError(f"unroll must be a positive int, got {unroll!r}")
    return T, B, D, H


class Prepared(NamedTuple):
    """Arguments of ``lstm``/``lstm_ref`` after validation, time-major, in their compute dtypes."""

    params: LSTMParams  # W, U, b in ``dtype``
    xs: jax.Array  # (T, B, D) in ``dtype``
    state0: LSTMState  # h, c: (B, H) (h: (B, P) projected) in acc_dtype(dtype); zeros when None was given
    mask: jax.Array | None  # (T, B) bool: the steps that run (mask and seq_lengths together), or None
    resets: jax.Array | None  # (T, B) bool, or None
    reset_state: LSTMState | None  # h, c: (B, H) in acc dtype, what a reset restores (zeros); None without resets
    keep: (
        jax.Array | None
    )  # (B, H) ((B, P) projected) recurrent-dropout factor (0 or 1 / (1 - p)) in acc dtype, or None
    dtype: jnp.dtype


def lengths_mask(seq_lengths: jax.Array, T) -> jax.Array:
    """(T, B) bool, ``t < seq_lengths[b]``, exact for every integer dtype and every T.

    The comparison runs in the lengths' own dtype when every step index fits
    in it, and otherwise in int32, where every length does (a length is then
    at most the dtype's maximum, below T): never in a dtype that wraps. A
    symbolic T (shape-polymorphic export) is taken as fitting a 32- or 64-bit
    dtype; 8- and 16-bit lengths are then compared in int32.
    """
    dtype = jnp.dtype(seq_lengths.dtype)
    if isinstance(T, (int, np.integer)):
        fits = T - 1 <= jnp.iinfo(dtype).max
    else:
        fits = dtype.itemsize >= 4
    if not fits:
        dtype, seq_lengths = jnp.dtype(jnp.int32), seq_lengths.astype(jnp.int32)
    t = jax.lax.broadcasted_iota(dtype, (T, 1), 0)
    return t < seq_lengths[None, :]


def _check_length_values(seq_lengths, T: int) -> None:
    """Concrete lengths outside [0, T] are an error; traced ones (under jit) cannot be checked."""
    try:
        values = np.asarray(seq_lengths)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return
    if values.size == 0 or not isinstance(T, (int, np.integer)):
        return
    bad = (values < 0) | (values > T)
    if bad.any():
        b = int(np.argmax(bad))
        raise ValueError(
            f"seq_lengths[{b}] = {values[b]} is outside [0, T] = [0, {T}] for xs with T = {T} steps "
            f"(all out-of-range lengths: {values[bad].tolist()[:8]})"
        )


def prepare(
    params,
    xs,
    state0,
    *,
    seq_lengths=None,
    mask=None,
    resets=None,
    reset_state=None,
    recurrent_dropout=0.0,
    key=None,
    unroll=1,
    time_major=True,
    gate_fn=jax.nn.sigmoid,
    activation_fn=jnp.tanh,
) -> Prepared:
    """Validate the arguments of ``lstm``/``lstm_ref`` and bring them to one layout and dtype.

    ``mask`` and ``seq_lengths`` are combined into one (T, B) mask of the steps
    that run; batch-major arrays are transposed to time-major.
    """
    if not isinstance(time_major, (bool, np.bool_)):
        raise TypeError(f"time_major must be a Python bool, got {type(time_major).__name__}")
    time_major = bool(time_major)
    T, B, _, H = check_inputs(params, xs, state0, seq_lengths, unroll, time_major=time_major)
    check_step_flags("mask", mask, T, B, time_major)
    check_step_flags("resets", resets, T, B, time_major)
    params = LSTMParams(*params)
    if params.norm is not None:
        params = params._replace(norm=LayerNormParams(*params.norm))
    P = None if params.W_proj is None else params.W.shape[0]
    Hh = H if P is None else P  # the size of h
    where = f"from xs {tuple(xs.shape)} and params.W {tuple(_as_array(params.W).shape)}"
    check_state("reset_state", reset_state, B, H, where, P=P)
    check_activations(gate_fn, activation_fn)
    rate = check_rate("recurrent_dropout", recurrent_dropout, key)
    params = jax.tree.map(_as_array, params)
    dtype = jnp.result_type(*jax.tree.leaves(params), xs)
    acc = acc_dtype(dtype)
    params = jax.tree.map(lambda p: p.astype(dtype), params)
    if state0 is None:
        state0 = LSTMState(jnp.zeros((B, Hh), acc), jnp.zeros((B, H), acc))
    else:
        state0 = LSTMState(state0[0].astype(acc), state0[1].astype(acc))
    flip = (lambda a: a) if time_major else (lambda a: jnp.swapaxes(a, 0, 1))
    xs = flip(xs).astype(dtype)
    if mask is not None:
        mask = flip(mask)
    if seq_lengths is not None:
        _check_length_values(seq_lengths, T)
        by_length = lengths_mask(seq_lengths, T)
        mask = by_length if mask is None else mask & by_length
    if resets is not None:
        resets = flip(resets)
        if reset_state is None:
            reset_state = LSTMState(jnp.zeros((B, Hh), acc), jnp.zeros((B, H), acc))
        else:
            reset_state = LSTMState(reset_state[0].astype(acc), reset_state[1].astype(acc))
    else:
        reset_state = None  # nothing resets: the reset state is never read
    keep = None
    if rate > 0.0:
        kept = jax.random.bernoulli(key, 1.0 - rate, (B, Hh))
        keep = jnp.where(kept, jnp.asarray(1.0 / (1.0 - rate), acc), jnp.zeros((), acc))
    params, state0 = onto_mesh_of(xs, params, state0)
    if reset_state is not None:
        _, reset_state = onto_mesh_of(xs, params, reset_state)
    # Inside shard_map the states are loop carries: they must vary over every axis their updates vary over.
    axes = varying_axes(*jax.tree.leaves(params), xs, *state0, mask, resets, keep, *(reset_state or ()))
    state0 = LSTMState(*(make_varying(a, axes) for a in state0))
    if reset_state is not None:
        reset_state = LSTMState(*(make_varying(a, axes) for a in reset_state))
    return Prepared(params, xs, state0, mask, resets, reset_state, keep, dtype)
