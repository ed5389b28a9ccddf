"""Equinox: to and from our layout (see ``jax_lstm.interop``)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jax_lstm.cell import LSTMParams
from jax_lstm.interop._common import _check_shape, _from_ours, _np, _out, _params_np, _to_ours

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

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> import jax_lstm as jl
      >>> import equinox as eqx
      >>> from jax_lstm.interop import from_equinox
      >>> cell = eqx.nn.LSTMCell(3, 4, key=jax.random.PRNGKey(0))
      >>> p = from_equinox(cell)
      >>> p.W.shape, p.U.shape
      ((4, 16), (3, 16))
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

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> import jax_lstm as jl
      >>> from jax_lstm import interop
      >>> p = jl.init_params(jax.random.PRNGKey(0), input_size=3, hidden_size=4)
      >>> cell = interop.to_equinox(p)                              # an eqx.nn.LSTMCell
      >>> cell.weight_ih.shape                                      # (4H, D), gate rows i, f, g, o
      (16, 3)
      >>> bool((interop.from_equinox(cell).W == p.W).all())
      True
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
