"""Haiku: to and from our layout (see ``jax_lstm.interop``)."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from jax_lstm.cell import LSTMParams
from jax_lstm.interop._common import _check_shape, _from_ours, _np, _out, _params_np, _to_ours

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

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> import jax_lstm as jl
      >>> from jax_lstm import interop
      >>> p = jl.init_params(jax.random.PRNGKey(0), input_size=3, hidden_size=4)
      >>> hk_params = interop.to_haiku(p)                           # what hk.LSTM(4) holds
      >>> hk_params["lstm/linear"]["w"].shape                       # (D + H, 4H) over [x, h]
      (7, 16)
      >>> interop.from_haiku(hk_params).W.shape
      (4, 16)
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

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> import jax_lstm as jl
      >>> from jax_lstm import interop
      >>> p = jl.init_params(jax.random.PRNGKey(0), input_size=3, hidden_size=4)
      >>> hk_params = interop.to_haiku(p, module="lstm")
      >>> sorted(hk_params["lstm/linear"])
      ['b', 'w']
    """
    W, U, b, _, H = _params_np(params)
    b = b.copy()
    b[:H] -= np.asarray(1, b.dtype)
    w = _from_ours(np.concatenate([U, W], axis=0), _HAIKU_GATES, axis=1)
    return {f"{module}/linear": {"w": w, "b": _from_ours(b, _HAIKU_GATES, axis=0)}}
