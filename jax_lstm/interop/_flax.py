"""Flax: to and from our layout (see ``jax_lstm.interop``)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from jax_lstm.cell import LSTMParams
from jax_lstm.interop._common import _check_shape, _from_ours, _np, _out, _params_np, _to_ours

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

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> import jax_lstm as jl
      >>> import flax.linen as nn
      >>> from jax_lstm.interop import from_flax
      >>> cell = nn.OptimizedLSTMCell(4)
      >>> carry = cell.initialize_carry(jax.random.PRNGKey(1), (2, 3))
      >>> variables = cell.init(jax.random.PRNGKey(0), carry, jnp.ones((2, 3)))
      >>> p = from_flax(variables)
      >>> p.W.shape, p.U.shape
      ((4, 16), (3, 16))
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

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> import jax_lstm as jl
      >>> from jax_lstm import interop
      >>> p = jl.init_params(jax.random.PRNGKey(0), input_size=3, hidden_size=4)
      >>> variables = interop.to_flax(p)                            # Linen's LSTMCell / OptimizedLSTMCell layout
      >>> bool((interop.from_flax(variables).U == p.U).all())
      True
    """
    W, U, b, _, _ = _params_np(params)
    Uf, Wf, bf = (np.split(_from_ours(a, _FLAX_GATES, axis=-1), 4, axis=-1) for a in (U, W, b))
    out: dict[str, dict[str, np.ndarray]] = {}
    for n, g in enumerate(_FLAX_GATES):
        out[f"i{g}"] = {"kernel": Uf[n]}
        out[f"h{g}"] = {"kernel": Wf[n], "bias": bf[n]}
    return {"params": out}
