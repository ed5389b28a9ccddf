"""PyTorch: to and from our layout (see ``jax_lstm.interop``)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from jax_lstm.cell import LSTMParams, LSTMState
from jax_lstm.interop._common import _check_shape, _from_ours, _np, _out, _params_np, _to_ours
from jax_lstm.layers import StackParams, StackState, stack_sizes

_TORCH_KEY = re.compile(r"^(weight_ih|weight_hh|bias_ih|bias_hh|weight_hr)_l(\d+)(_reverse)?$")


def _torch_dict(state_dict, prefix: str) -> dict[str, Any]:
    if hasattr(state_dict, "state_dict") and callable(state_dict.state_dict):  # an nn.LSTM module
        state_dict = state_dict.state_dict()
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"state_dict must be a mapping (torch.nn.LSTM.state_dict()), got {type(state_dict).__name__}")
    return {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}


def from_torch(state_dict, *, prefix: str = "", dtype=None) -> StackParams:
    """Convert a ``torch.nn.LSTM`` state dict to ``StackParams``.

    PyTorch computes, per layer k and direction (suffix ``""`` or ``"_reverse"``),
    with gate rows in the order i, f, g, o::

        gates = x_t @ weight_ih_l{k}.T + bias_ih_l{k} + h_{t-1} @ weight_hh_l{k}.T + bias_hh_l{k}

    so ``U = weight_ih.T`` and ``W = weight_hh.T`` with gate blocks re-ordered to
    f, i, g, o, and ``b = bias_ih + bias_hh`` (re-ordered). ``num_layers`` and
    ``bidirectional`` are read from the keys. A module built with ``bias=False``
    (no bias keys) gives ``b = 0``. ``batch_first`` does not change the weights;
    ``lstm_stack`` is time-major like PyTorch's default.

    Args:
      state_dict: ``module.state_dict()`` of a ``torch.nn.LSTM`` (or the module
        itself); values may be tensors or NumPy arrays.
      prefix: key prefix when the LSTM is a submodule, e.g. ``"encoder.rnn."``.
      dtype: dtype of the result; default: the source dtype.

    Returns:
      ``StackParams``: per layer ``(LSTMParams,)`` or ``(forward, reverse)``.

    Raises:
      KeyError: a required key (e.g. ``weight_hh_l1_reverse``) is missing.
      ValueError: a wrong shape, naming the key.

    A module built with ``proj_size=P`` (keys ``weight_hr_l{k}[_reverse]``,
    (P, H)) computes ``h_t = weight_hr @ (o_t * tanh(c_t))``: ``W_proj =
    weight_hr.T`` (H, P), and ``weight_hh`` is (4H, P), so ``W`` is (P, 4H).

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> import jax_lstm as jl
      >>> import torch
      >>> from jax_lstm import interop
      >>> m = torch.nn.LSTM(3, 4, num_layers=2, bidirectional=True)
      >>> stack = interop.from_torch(m.state_dict())                # or from_torch(m)
      >>> len(stack), len(stack[0]), stack[1][0].U.shape            # layer 1 reads 2H = 8 inputs
      (2, 2, (8, 16))
    """
    sd = _torch_dict(state_dict, prefix)
    found = {m.groups(): k for k in sd if (m := _TORCH_KEY.match(k))}
    layers = sorted({int(n) for _, n, _ in found})
    if not layers:
        raise KeyError(f"{prefix}weight_ih_l0 not found: not a torch.nn.LSTM state dict (keys: {sorted(sd)[:8]})")
    num_layers = layers[-1] + 1
    suffixes = ("", "_reverse") if any(r for _, _, r in found) else ("",)

    def get(kind: str, k: int, suffix: str):
        key = f"{kind}_l{k}{suffix}"
        if key not in sd:
            raise KeyError(f"{prefix}{key} is missing from the torch.nn.LSTM state dict")
        return _np(sd[key], prefix + key)

    out, d_in = [], None
    for k in range(num_layers):
        layer = []
        for suffix in suffixes:
            name = lambda kind, k=k, suffix=suffix: f"{prefix}{kind}_l{k}{suffix}"  # noqa: E731
            w_hh = get("weight_hh", k, suffix)
            w_hr = get("weight_hr", k, suffix) if f"weight_hr_l{k}{suffix}" in sd else None
            if w_hr is None:
                if w_hh.ndim != 2 or w_hh.shape[0] != 4 * w_hh.shape[1]:
                    raise ValueError(f"{name('weight_hh')} has shape {w_hh.shape}, expected (4H, H)")
                H = w_hh.shape[1]
            else:  # proj_size = P: h_t = weight_hr @ (o * tanh(c_t)), weight_hr (P, H), weight_hh (4H, P)
                if w_hr.ndim != 2 or not 0 < w_hr.shape[0] < w_hr.shape[1]:
                    raise ValueError(f"{name('weight_hr')} has shape {w_hr.shape}, expected (P, H) with 0 < P < H")
                H = w_hr.shape[1]
                _check_shape(w_hh, name("weight_hh"), (4 * H, w_hr.shape[0]), f"to match {name('weight_hr')}")
            w_ih = get("weight_ih", k, suffix)
            if w_ih.ndim != 2 or w_ih.shape[0] != 4 * H or (d_in is not None and w_ih.shape[1] != d_in):
                want = f"({4 * H}, {d_in})" if d_in is not None else f"({4 * H}, D)"
                raise ValueError(
                    f"{name('weight_ih')} has shape {w_ih.shape}, expected {want} "
                    f"to match {name('weight_hh')} {w_hh.shape}"
                    + (f" and the output size {d_in} of layer {k - 1}" if d_in is not None else "")
                )
            has = [f"{kind}_l{k}{suffix}" in sd for kind in ("bias_ih", "bias_hh")]
            if any(has):
                b_ih, b_hh = get("bias_ih", k, suffix), get("bias_hh", k, suffix)
                _check_shape(b_ih, name("bias_ih"), (4 * H,), f"to match {name('weight_hh')} {w_hh.shape}")
                _check_shape(b_hh, name("bias_hh"), (4 * H,), f"to match {name('weight_hh')} {w_hh.shape}")
                b = b_ih + b_hh
            else:
                b = np.zeros((4 * H,), w_hh.dtype)
            layer.append(
                LSTMParams(
                    _out(_to_ours(w_hh, "ifgo", axis=0).T, dtype),
                    _out(_to_ours(w_ih, "ifgo", axis=0).T, dtype),
                    _out(_to_ours(b, "ifgo", axis=0), dtype),
                    W_proj=None if w_hr is None else _out(w_hr.T, dtype),
                )
            )
        d_in = len(suffixes) * layer[0].W.shape[0]  # H, or P with a projection
        out.append(tuple(layer))
    return tuple(out)


def _torch_tensor(a: np.ndarray):
    import torch

    a = np.ascontiguousarray(a)
    if a.dtype.name == "bfloat16":
        return torch.from_numpy(a.astype(np.float32)).to(torch.bfloat16)
    return torch.from_numpy(a.copy())


def _torch_layout(params) -> tuple[int, int]:
    """Check that a stack fits one ``torch.nn.LSTM``; return (hidden_size, directions)."""
    _, sizes = stack_sizes(params)
    H, n_dir = sizes[0][1], sizes[0][2]
    projs = [getattr(layer[0], "W_proj", None) for layer in params]
    P = [None if w is None else w.shape[1] for w in projs]
    for l, (_, H_l, n_l) in enumerate(sizes):
        if H_l != H or n_l != n_dir or P[l] != P[0]:
            raise ValueError(
                "torch.nn.LSTM has one hidden_size, one proj_size and one direction count for all layers: "
                f"layer {l} has H={H_l}, P={P[l] or 0} and {n_l} direction(s), layer 0 has H={H}, P={P[0] or 0} "
                f"and {n_dir}"
            )
    return H, n_dir


def to_torch(params, *, prefix: str = "") -> dict[str, Any]:
    """Convert ``StackParams`` to a ``torch.nn.LSTM`` state dict (``load_state_dict`` ready).

    The whole bias goes into ``bias_ih_l{k}`` and ``bias_hh_l{k}`` is zero, so
    ``from_torch(to_torch(p)) == p`` exactly (see the module docstring for the
    other direction). Applied to a gradient (``jax.grad`` w.r.t. the params)
    it gives PyTorch's weight gradients; PyTorch's ``bias_ih`` and ``bias_hh``
    gradients are both equal to the returned ``bias_ih``, since b is their sum.

    Args:
      params: ``StackParams`` whose layers all have the same hidden size and
        direction count (as ``torch.nn.LSTM`` requires).
      prefix: prepended to every key.

    Returns:
      A dict of ``torch.Tensor`` in ``state_dict`` order: for each layer, for
      each direction, ``weight_ih`` (4H, D_l), ``weight_hh`` (4H, H),
      ``bias_ih`` (4H,), ``bias_hh`` (4H,), gate rows i, f, g, o, and
      ``weight_hr`` (P, H) for params with a projection (``proj_size=P``).

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> import jax_lstm as jl
      >>> import torch
      >>> from jax_lstm import interop
      >>> m = torch.nn.LSTM(3, 4, num_layers=2, bidirectional=True)
      >>> stack = interop.from_torch(m)
      >>> m.load_state_dict(interop.to_torch(stack))
      <All keys matched successfully>
    """
    _torch_layout(params)
    sd = {}
    for k, layer in enumerate(params):
        for p, suffix in zip(layer, ("", "_reverse"), strict=False):
            W, U, b, _, _ = _params_np(p, f"params[{k}][{len(suffix) > 0:d}]", allow_proj=True)
            sd[f"{prefix}weight_ih_l{k}{suffix}"] = _torch_tensor(_from_ours(U.T, "ifgo", axis=0))
            sd[f"{prefix}weight_hh_l{k}{suffix}"] = _torch_tensor(_from_ours(W.T, "ifgo", axis=0))
            sd[f"{prefix}bias_ih_l{k}{suffix}"] = _torch_tensor(_from_ours(b, "ifgo", axis=0))
            sd[f"{prefix}bias_hh_l{k}{suffix}"] = _torch_tensor(np.zeros_like(b))
            if p.W_proj is not None:  # proj_size: weight_hr (P, H)
                sd[f"{prefix}weight_hr_l{k}{suffix}"] = _torch_tensor(_np(p.W_proj, "W_proj").T)
    return sd


def states_from_torch(h, c, *, bidirectional: bool, dtype=None) -> StackState:
    """PyTorch's ``(h_0, c_0)`` or ``(h_n, c_n)``, each (num_layers * directions, B, H), to ``StackState``.

    PyTorch stacks layer by layer, forward before reverse: entry
    ``k * directions + d`` is layer k, direction d.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> import jax_lstm as jl
      >>> import torch
      >>> from jax_lstm import interop
      >>> m = torch.nn.LSTM(3, 4, num_layers=2, bidirectional=True)
      >>> h0 = c0 = torch.zeros(4, 2, 4)                            # (num_layers * 2, B, H)
      >>> states0 = interop.states_from_torch(h0, c0, bidirectional=True)
      >>> len(states0), len(states0[0]), states0[0][1].h.shape      # per layer and direction
      (2, 2, (2, 4))
    """
    h, c = _np(h, "h"), _np(c, "c")
    n_dir = 2 if bidirectional else 1
    if h.ndim != 3 or h.shape[0] % n_dir:
        raise ValueError(f"h has shape {h.shape}, expected (num_layers * {n_dir}, B, H)")
    if c.ndim != 3 or c.shape[:2] != h.shape[:2]:  # with proj_size, h is (L * dirs, B, P) and c (L * dirs, B, H)
        raise ValueError(f"c has shape {c.shape}, expected ({h.shape[0]}, {h.shape[1]}, H) to match h {h.shape}")
    return tuple(
        tuple(LSTMState(_out(h[k * n_dir + d], dtype), _out(c[k * n_dir + d], dtype)) for d in range(n_dir))
        for k in range(h.shape[0] // n_dir)
    )


def states_to_torch(states) -> tuple[Any, Any]:
    """``StackState`` to PyTorch's ``(h, c)``, each a tensor (num_layers * directions, B, H).

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> import jax_lstm as jl
      >>> import torch
      >>> from jax_lstm import interop
      >>> m = torch.nn.LSTM(3, 4, num_layers=2, bidirectional=True)
      >>> states0 = interop.states_from_torch(torch.zeros(4, 2, 4), torch.ones(4, 2, 4), bidirectional=True)
      >>> h_n, c_n = interop.states_to_torch(states0)
      >>> tuple(h_n.shape)
      (4, 2, 4)
    """
    flat = [s for layer in states for s in layer]
    h = np.stack([_np(s[0], "states.h") for s in flat])
    c = np.stack([_np(s[1], "states.c") for s in flat])
    return _torch_tensor(h), _torch_tensor(c)
