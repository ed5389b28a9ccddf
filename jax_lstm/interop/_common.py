"""What every conversion shares: array intake, shape checks and gate re-ordering."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jax_lstm.cell import LSTMParams

_OURS = "figo"


def _np(a: Any, name: str) -> np.ndarray:
    """Any array-like (NumPy, JAX, PyTorch tensor, nnx variable) as a NumPy array."""
    if a is None:
        raise KeyError(f"{name} is missing (got None)")
    if hasattr(a, "detach") and hasattr(a, "cpu"):  # torch.Tensor, without importing torch
        a = a.detach().cpu()
        if str(a.dtype) == "torch.bfloat16":
            return np.asarray(jnp.asarray(a.float().numpy(), jnp.bfloat16))
        return a.numpy()
    if not isinstance(a, (np.ndarray, jax.Array)):  # flax nnx Variable
        if hasattr(a, "get_value"):
            a = a.get_value()
        elif hasattr(a, "value"):
            a = a.value
    return np.asarray(a)


def _out(a: np.ndarray, dtype) -> jax.Array:
    return jnp.asarray(a, dtype=dtype)


def _check_shape(a: np.ndarray, name: str, want: tuple, what: str = "") -> None:
    if a.shape != want:
        extra = f" {what}" if what else ""
        raise ValueError(f"{name} has shape {a.shape}, expected {want}{extra}")


def _to_ours(a: np.ndarray, order: str, axis: int) -> np.ndarray:
    """Gate blocks along ``axis`` in ``order`` (e.g. "ifgo") -> our order f, i, g, o."""
    blocks = np.split(a, 4, axis=axis)
    return np.concatenate([blocks[order.index(gate)] for gate in _OURS], axis=axis)


def _from_ours(a: np.ndarray, order: str, axis: int) -> np.ndarray:
    """Our gate blocks f, i, g, o along ``axis`` -> ``order``."""
    blocks = np.split(a, 4, axis=axis)
    return np.concatenate([blocks[_OURS.index(gate)] for gate in order], axis=axis)


def _params_np(
    params, name: str = "params", *, allow_proj: bool = False
) -> tuple[np.ndarray, np.ndarray, np.ndarray, int, int]:
    """Validate one ``LSTMParams`` and return (W, U, b, D, H) as NumPy arrays.

    The other libraries' cells have no peepholes or layer norm, and only
    PyTorch's (``allow_proj``) a projection: such params are refused.
    """
    if not (isinstance(params, tuple) and 3 <= len(params) <= 6):
        raise TypeError(f"{name} must be LSTMParams(W, U, b), got {type(params).__name__}")
    p = LSTMParams(*params)
    for field in ("peephole", "norm") + (() if allow_proj else ("W_proj",)):
        if getattr(p, field) is not None:
            raise ValueError(f"{name}.{field} is set: this library's LSTM has no {_VARIANT_NAMES[field]}")
    W, U, b = (_np(a, f"{name}.{f}") for a, f in zip(p[:3], "WUb", strict=True))
    if p.W_proj is not None:
        W_proj = _np(p.W_proj, f"{name}.W_proj")
        H = W_proj.shape[0] if W_proj.ndim == 2 else -1
        if W_proj.ndim != 2 or W.ndim != 2 or W.shape != (W_proj.shape[1], 4 * H):
            raise ValueError(f"{name}.W has shape {W.shape}, expected (P, 4H) to match {name}.W_proj {W_proj.shape}")
    elif W.ndim != 2 or W.shape[1] != 4 * W.shape[0]:
        raise ValueError(f"{name}.W has shape {W.shape}, expected (H, 4H)")
    H = W.shape[1] // 4
    if U.ndim != 2 or U.shape[1] != 4 * H:
        raise ValueError(f"{name}.U has shape {U.shape}, expected (D, {4 * H}) to match {name}.W {W.shape}")
    _check_shape(b, f"{name}.b", (4 * H,), f"to match {name}.W {W.shape}")
    return W, U, b, U.shape[0], H


_VARIANT_NAMES = {"W_proj": "projection (proj_size)", "peephole": "peephole connections", "norm": "layer norm"}
