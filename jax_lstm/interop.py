"""Weights from and to PyTorch, Keras, Flax, Haiku and Equinox LSTMs.

Our layout (``LSTMParams``, row-vector convention, gate blocks [f | i | g | o])::

    z_t = h_{t-1} @ W + x_t @ U + b      W: (H, 4H), U: (D, 4H), b: (4H,)

The other libraries compute the same cell with other layouts:

=========  ==========================================  ==============  =================================
library    weights                                     gate order      bias
=========  ==========================================  ==============  =================================
PyTorch    weight_ih (4H, D), weight_hh (4H, H)        i, f, g, o      bias_ih + bias_hh
Keras      kernel (D, 4H), recurrent_kernel (H, 4H)    i, f, c(=g), o  bias (4H,)
Flax       ii/if/ig/io kernel (D, H), hi/hf/hg/ho      i, f, g, o      hi/hf/hg/ho bias (H,)
           kernel (H, H)  (linen LSTMCell and
           OptimizedLSTMCell; nnx: ``if_`` for ``if``)
Haiku      linear w (D + H, 4H) over [x, h]            i, g, f, o      b (4H,), plus a constant +1 on f
Equinox    weight_ih (4H, D), weight_hh (4H, H)        i, f, g, o      bias (4H,) (None: no bias)
           (``eqx.nn.LSTMCell``)
=========  ==========================================  ==============  =================================

Every conversion is a re-ordering of gate blocks and a transpose, so it is
exact (bit for bit), except where a bias convention needs arithmetic:

* PyTorch has two biases; ``from_torch`` sums them (one rounding), and
  ``to_torch`` puts the whole bias in ``bias_ih`` and zeros in ``bias_hh``.
  Hence ``from_torch(to_torch(p)) == p`` exactly, while ``to_torch(from_torch(sd))``
  has the same weights bit for bit, ``bias_hh = 0`` and ``bias_ih = bias_ih + bias_hh``
  (the rounded sum): it defines the same function, it is exactly ``sd`` when ``sd``'s
  ``bias_hh`` is zero, and ``from_torch`` maps it back to exactly ``from_torch(sd)``.
* Haiku adds 1 to the forget pre-activation inside its cell; ``from_haiku`` folds
  it into ``b`` (``b_f = b_haiku_f + 1``) and ``to_haiku`` subtracts it, so the
  forget bias block round-trips up to the rounding of that shift.

Inputs may be NumPy arrays, JAX arrays, PyTorch tensors (any device, detached
here) or Flax nnx variables; PyTorch is imported only by ``to_torch`` and
``states_to_torch``, Equinox only by ``to_equinox``. The ``from_*`` functions return JAX arrays in the source
dtype, or in ``dtype`` when given; the ``to_*`` functions return NumPy arrays
(PyTorch tensors for ``to_torch``, an ``eqx.nn.LSTMCell`` of JAX arrays for
``to_equinox``).

Errors: a missing entry raises ``KeyError`` naming it; a wrong shape raises
``ValueError`` naming the entry, its shape and the expected one.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jax_lstm.cell import LSTMParams, LSTMState
from jax_lstm.layers import StackParams, StackState, stack_sizes

__all__ = [
    "from_torch",
    "to_torch",
    "states_from_torch",
    "states_to_torch",
    "from_keras",
    "to_keras",
    "from_flax",
    "to_flax",
    "from_haiku",
    "to_haiku",
    "from_equinox",
    "to_equinox",
]

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


# --------------------------------------------------------------------------- PyTorch

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
    """``StackState`` to PyTorch's ``(h, c)``, each a tensor (num_layers * directions, B, H)."""
    flat = [s for layer in states for s in layer]
    h = np.stack([_np(s[0], "states.h") for s in flat])
    c = np.stack([_np(s[1], "states.c") for s in flat])
    return _torch_tensor(h), _torch_tensor(c)


# --------------------------------------------------------------------------- Keras

_KERAS_NAMES = ("kernel", "recurrent_kernel", "bias")


def from_keras(weights, *, dtype=None) -> LSTMParams:
    """Convert the weights of a ``keras.layers.LSTM`` (Keras 2 or 3) to ``LSTMParams``.

    Keras computes, with gate columns in the order i, f, c, o (c is our g)::

        z_t = x_t @ kernel + h_{t-1} @ recurrent_kernel + bias

    so U = kernel, W = recurrent_kernel, b = bias, each with its column blocks
    re-ordered. Exact. Only the default activations (tanh, sigmoid) match our
    cell. Keras's ``go_backwards`` reverses the padded sequence as a whole,
    which differs from ``reverse=True`` when sequences are padded.

    Args:
      weights: ``layer.get_weights()``, a list ``[kernel (D, 4H),
        recurrent_kernel (H, 4H), bias (4H,)]`` (without bias when
        ``use_bias=False``: b = 0), or a mapping with those names as keys or as
        the last component of a path key (``"lstm/lstm_cell/kernel"``).
      dtype: dtype of the result; default: the source dtype.

    Returns:
      ``LSTMParams`` with W: (H, 4H), U: (D, 4H), b: (4H,).
    """
    if isinstance(weights, Mapping):
        by_name: dict[str, Any] = {}
        for key, value in weights.items():
            short = str(key).rsplit("/", 1)[-1].split(":")[0]
            if short in by_name:
                raise ValueError(f"keras weights: more than one entry named {short!r} (e.g. {key!r}); pass one layer")
            by_name[short] = value
        for name in _KERAS_NAMES[:2]:
            if name not in by_name:
                raise KeyError(f"keras weights: {name!r} is missing (got keys {sorted(map(str, weights))})")
        arrays = [by_name[n] for n in _KERAS_NAMES if n in by_name]
    elif isinstance(weights, Sequence) and len(weights) in (2, 3):
        arrays = list(weights)
    else:
        raise TypeError(
            "keras weights must be [kernel, recurrent_kernel, bias] (layer.get_weights()) or a mapping with "
            f"those names, got {type(weights).__name__}"
            + (f" of length {len(weights)}" if isinstance(weights, Sequence) else "")
        )
    kernel, rec = _np(arrays[0], "kernel"), _np(arrays[1], "recurrent_kernel")
    if rec.ndim != 2 or rec.shape[1] != 4 * rec.shape[0]:
        raise ValueError(f"recurrent_kernel has shape {rec.shape}, expected (H, 4H)")
    H = rec.shape[0]
    if kernel.ndim != 2 or kernel.shape[1] != 4 * H:
        raise ValueError(
            f"kernel has shape {kernel.shape}, expected (D, {4 * H}) to match recurrent_kernel {rec.shape}"
        )
    if len(arrays) == 3:
        bias = _np(arrays[2], "bias")
        _check_shape(bias, "bias", (4 * H,), f"to match recurrent_kernel {rec.shape}")
    else:
        bias = np.zeros((4 * H,), rec.dtype)
    return LSTMParams(
        _out(_to_ours(rec, "ifgo", axis=1), dtype),
        _out(_to_ours(kernel, "ifgo", axis=1), dtype),
        _out(_to_ours(bias, "ifgo", axis=0), dtype),
    )


def to_keras(params) -> list[np.ndarray]:
    """``LSTMParams`` to ``[kernel (D, 4H), recurrent_kernel (H, 4H), bias (4H,)]`` for ``layer.set_weights``.

    Exact in both directions: ``from_keras(to_keras(p)) == p`` and
    ``to_keras(from_keras(w)) == w`` bit for bit.
    """
    W, U, b, _, _ = _params_np(params)
    return [_from_ours(U, "ifgo", axis=1), _from_ours(W, "ifgo", axis=1), _from_ours(b, "ifgo", axis=0)]


# --------------------------------------------------------------------------- Flax

_FLAX_GATES = "ifgo"


def _flax_tree(variables) -> Mapping:
    if not isinstance(variables, Mapping):
        raise TypeError(f"flax variables must be a mapping, got {type(variables).__name__}")
    if "params" in variables and isinstance(variables["params"], Mapping):
        variables = variables["params"]
    return variables


def from_flax(variables, *, dtype=None) -> LSTMParams:
    """Convert the parameters of a Flax LSTM cell to ``LSTMParams``.

    Accepted layouts (gate order i, f, g, o everywhere):

    * ``flax.linen.LSTMCell`` and ``flax.linen.OptimizedLSTMCell`` (same tree):
      ``ii``, ``if``, ``ig``, ``io`` with ``kernel`` (D, H) acting on x, and
      ``hi``, ``hf``, ``hg``, ``ho`` with ``kernel`` (H, H) and ``bias`` (H,)
      acting on h; ``U = [if | ii | ig | io]``, ``W`` and ``b`` likewise from
      the ``h*`` entries. ``flax.nnx.LSTMCell`` is the same with ``if_``.
    * ``flax.nnx.OptimizedLSTMCell``: ``dense_i.kernel`` (D, 4H),
      ``dense_h.kernel`` (H, 4H), ``dense_h.bias`` (4H,).

    Flax's carry is ``(c, h)``; ours is ``LSTMState(h, c)``.

    Args:
      variables: ``cell.init(...)`` (with or without the ``"params"`` level),
        ``nnx.state(cell)`` or ``nnx.to_pure_dict(nnx.state(cell))``.
      dtype: dtype of the result; default: the source dtype.

    Returns:
      ``LSTMParams`` with W: (H, 4H), U: (D, 4H), b: (4H,).
    """
    tree = _flax_tree(variables)

    def entry(path: str):
        node: Any = tree
        for part in path.split("/"):
            if not isinstance(node, Mapping) or part not in node:
                raise KeyError(f"flax params: {path!r} is missing (top-level keys: {sorted(tree)})")
            node = node[part]
        return _np(node, path)

    if "dense_h" in tree or "dense_i" in tree:  # nnx.OptimizedLSTMCell
        rec, kernel, bias = entry("dense_h/kernel"), entry("dense_i/kernel"), entry("dense_h/bias")
        if rec.ndim != 2 or rec.shape[1] != 4 * rec.shape[0]:
            raise ValueError(f"dense_h/kernel has shape {rec.shape}, expected (H, 4H)")
        H = rec.shape[0]
        if kernel.ndim != 2 or kernel.shape[1] != 4 * H:
            raise ValueError(f"dense_i/kernel has shape {kernel.shape}, expected (D, {4 * H}) to match dense_h/kernel")
        _check_shape(bias, "dense_h/bias", (4 * H,), f"to match dense_h/kernel {rec.shape}")
        U, W, b = kernel, rec, bias
    else:
        in_f = "if_" if "if_" in tree and "if" not in tree else "if"
        names_i = {g: (in_f if g == "f" else f"i{g}") for g in _FLAX_GATES}
        hk = {g: entry(f"h{g}/kernel") for g in _FLAX_GATES}
        H = hk["i"].shape[-1]
        for g in _FLAX_GATES:
            _check_shape(hk[g], f"h{g}/kernel", (H, H), f"to match hi/kernel {hk['i'].shape}")
        hb = {g: entry(f"h{g}/bias") for g in _FLAX_GATES}
        for g in _FLAX_GATES:
            _check_shape(hb[g], f"h{g}/bias", (H,), f"to match hi/kernel {hk['i'].shape}")
        ik = {g: entry(f"{names_i[g]}/kernel") for g in _FLAX_GATES}
        D = ik["i"].shape[0] if ik["i"].ndim == 2 else -1
        for g in _FLAX_GATES:
            _check_shape(ik[g], f"{names_i[g]}/kernel", (D, H), f"to match hi/kernel {hk['i'].shape}")
        U = np.concatenate([ik[g] for g in _FLAX_GATES], axis=1)
        W = np.concatenate([hk[g] for g in _FLAX_GATES], axis=1)
        b = np.concatenate([hb[g] for g in _FLAX_GATES], axis=0)
    return LSTMParams(
        _out(_to_ours(W, _FLAX_GATES, axis=1), dtype),
        _out(_to_ours(U, _FLAX_GATES, axis=1), dtype),
        _out(_to_ours(b, _FLAX_GATES, axis=0), dtype),
    )


def to_flax(params) -> dict[str, dict[str, dict[str, np.ndarray]]]:
    """``LSTMParams`` to ``{"params": ...}`` for ``flax.linen.LSTMCell`` / ``OptimizedLSTMCell``.

    Exact in both directions with ``from_flax``.
    """
    W, U, b, _, _ = _params_np(params)
    Uf, Wf, bf = (np.split(_from_ours(a, _FLAX_GATES, axis=-1), 4, axis=-1) for a in (U, W, b))
    out: dict[str, dict[str, np.ndarray]] = {}
    for n, g in enumerate(_FLAX_GATES):
        out[f"i{g}"] = {"kernel": Uf[n]}
        out[f"h{g}"] = {"kernel": Wf[n], "bias": bf[n]}
    return {"params": out}


# --------------------------------------------------------------------------- Haiku

_HAIKU_GATES = "igfo"


def from_haiku(params, *, module: str | None = None, dtype=None) -> LSTMParams:
    """Convert the parameters of a ``haiku.LSTM`` to ``LSTMParams``.

    Haiku computes ``z = [x_t, h_{t-1}] @ w + b`` with gate columns i, g, f, o
    and then ``f = sigmoid(z_f + 1)``; so ``U = w[:D]``, ``W = w[D:]``, each
    re-ordered, and the constant 1 is added to the forget block of ``b``.

    Args:
      params: the params of ``hk.transform(...).init``, e.g.
        ``{"lstm/linear": {"w": (D + H, 4H), "b": (4H,)}}``, or the inner
        ``{"w": ..., "b": ...}``.
      module: the LSTM's module name (``"lstm"``, ``"lstm_1"``, or its full
        ``".../linear"`` key); needed only when ``params`` holds several linears.
      dtype: dtype of the result; default: the source dtype.

    Returns:
      ``LSTMParams`` with W: (H, 4H), U: (D, 4H), b: (4H,).
    """
    if not isinstance(params, Mapping):
        raise TypeError(f"haiku params must be a mapping, got {type(params).__name__}")
    if "w" in params:
        leaf, where = params, "linear"
    else:
        if module is not None:
            where = module if module.endswith("linear") else f"{module}/linear"
            if where not in params:
                raise KeyError(f"haiku params: {where!r} is missing (got {sorted(params)})")
        else:
            cands = [k for k, v in params.items() if isinstance(v, Mapping) and "w" in v]
            if len(cands) != 1:
                raise KeyError(
                    f"haiku params: expected exactly one linear with 'w' and 'b', found {sorted(cands)}; "
                    "pass module='...' to choose"
                )
            where = cands[0]
        leaf = params[where]
    for name in ("w", "b"):
        if name not in leaf:
            raise KeyError(f"haiku params: {where}/{name} is missing")
    w, b = _np(leaf["w"], f"{where}/w"), _np(leaf["b"], f"{where}/b")
    if w.ndim != 2 or w.shape[1] % 4 or w.shape[0] <= w.shape[1] // 4:
        raise ValueError(f"{where}/w has shape {w.shape}, expected (D + H, 4H) with D >= 1")
    H = w.shape[1] // 4
    D = w.shape[0] - H
    _check_shape(b, f"{where}/b", (4 * H,), f"to match {where}/w {w.shape}")
    b = _to_ours(b, _HAIKU_GATES, axis=0).copy()
    b[:H] += np.asarray(1, b.dtype)  # haiku's sigmoid(z_f + 1), folded into b_f
    return LSTMParams(
        _out(_to_ours(w[D:], _HAIKU_GATES, axis=1), dtype),
        _out(_to_ours(w[:D], _HAIKU_GATES, axis=1), dtype),
        _out(b, dtype),
    )


def to_haiku(params, *, module: str = "lstm") -> dict[str, dict[str, np.ndarray]]:
    """``LSTMParams`` to ``{f"{module}/linear": {"w": (D + H, 4H), "b": (4H,)}}`` for ``haiku.LSTM``.

    The forget block of ``b`` is lowered by 1 (haiku adds it back inside its
    cell), so ``from_haiku(to_haiku(p))`` equals ``p`` exactly except for that
    block, which is equal up to the rounding of the shift.
    """
    W, U, b, _, H = _params_np(params)
    b = b.copy()
    b[:H] -= np.asarray(1, b.dtype)
    w = _from_ours(np.concatenate([U, W], axis=0), _HAIKU_GATES, axis=1)
    return {f"{module}/linear": {"w": w, "b": _from_ours(b, _HAIKU_GATES, axis=0)}}


# --------------------------------------------------------------------------- Equinox

_EQX_GATES = "ifgo"


def from_equinox(cell, *, dtype=None) -> LSTMParams:
    """Convert an ``eqx.nn.LSTMCell`` to ``LSTMParams``.

    Equinox computes, with gate rows in the order i, f, g, o and the column-vector
    convention::

        lin = weight_ih @ x_t + weight_hh @ h_{t-1} + bias

    so ``U = weight_ih.T`` and ``W = weight_hh.T`` with gate blocks re-ordered to
    f, i, g, o, and ``b = bias`` re-ordered (zero when ``use_bias=False``). Exact.
    Equinox's state ``(h, c)`` is in the order of our ``LSTMState(h, c)``.

    Args:
      cell: an ``eqx.nn.LSTMCell`` (or anything with ``weight_ih`` (4H, D),
        ``weight_hh`` (4H, H) and ``bias`` (4H,) or None), e.g. its gradient.
      dtype: dtype of the result; default: the source dtype.

    Returns:
      ``LSTMParams`` with W: (H, 4H), U: (D, 4H), b: (4H,).
    """
    for name in ("weight_ih", "weight_hh"):
        if not hasattr(cell, name):
            raise KeyError(f"equinox LSTMCell: {name!r} is missing from {type(cell).__name__}")
    w_hh = _np(cell.weight_hh, "weight_hh")
    if w_hh.ndim != 2 or w_hh.shape[0] != 4 * w_hh.shape[1]:
        raise ValueError(f"weight_hh has shape {w_hh.shape}, expected (4H, H)")
    H = w_hh.shape[1]
    w_ih = _np(cell.weight_ih, "weight_ih")
    if w_ih.ndim != 2 or w_ih.shape[0] != 4 * H:
        raise ValueError(f"weight_ih has shape {w_ih.shape}, expected ({4 * H}, D) to match weight_hh {w_hh.shape}")
    bias = getattr(cell, "bias", None)
    if bias is None:
        b = np.zeros((4 * H,), w_hh.dtype)
    else:
        b = _np(bias, "bias")
        _check_shape(b, "bias", (4 * H,), f"to match weight_hh {w_hh.shape}")
    return LSTMParams(
        _out(_to_ours(w_hh, _EQX_GATES, axis=0).T, dtype),
        _out(_to_ours(w_ih, _EQX_GATES, axis=0).T, dtype),
        _out(_to_ours(b, _EQX_GATES, axis=0), dtype),
    )


def to_equinox(params, *, key=None):
    """``LSTMParams`` to an ``eqx.nn.LSTMCell`` (with a bias) holding exactly these weights.

    Exact in both directions with ``from_equinox``.

    Args:
      params: ``LSTMParams`` with W: (H, 4H), U: (D, 4H), b: (4H,).
      key: PRNG key for ``eqx.nn.LSTMCell``'s own initialisation, which is then
        overwritten; default ``jax.random.PRNGKey(0)``.

    Returns:
      ``eqx.nn.LSTMCell(D, H)`` with ``weight_ih`` (4H, D), ``weight_hh`` (4H, H)
      and ``bias`` (4H,) in the dtype of ``params``.
    """
    import equinox as eqx

    W, U, b, D, H = _params_np(params)
    cell = eqx.nn.LSTMCell(D, H, use_bias=True, dtype=W.dtype, key=jax.random.PRNGKey(0) if key is None else key)
    arrays = (
        jnp.asarray(_from_ours(U, _EQX_GATES, axis=1).T),
        jnp.asarray(_from_ours(W, _EQX_GATES, axis=1).T),
        jnp.asarray(_from_ours(b, _EQX_GATES, axis=0)),
    )
    return eqx.tree_at(lambda c: (c.weight_ih, c.weight_hh, c.bias), cell, arrays)
