"""Keras: to and from our layout (see ``jax_lstm.interop``)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from jax_lstm.cell import LSTMParams
from jax_lstm.interop._common import _check_shape, _from_ours, _np, _out, _params_np, _to_ours

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

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> import jax_lstm as jl
      >>> from jax_lstm import interop
      >>> p = jl.init_params(jax.random.PRNGKey(0), input_size=3, hidden_size=4)
      >>> weights = interop.to_keras(p)                             # as keras.layers.LSTM(4).get_weights()
      >>> bool((interop.from_keras(weights).b == p.b).all())
      True
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

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> import jax_lstm as jl
      >>> from jax_lstm import interop
      >>> p = jl.init_params(jax.random.PRNGKey(0), input_size=3, hidden_size=4)
      >>> [w.shape for w in interop.to_keras(p)]                    # kernel, recurrent_kernel, bias
      [(3, 16), (4, 16), (16,)]
    """
    W, U, b, _, _ = _params_np(params)
    return [_from_ours(U, "ifgo", axis=1), _from_ours(W, "ifgo", axis=1), _from_ours(b, "ifgo", axis=0)]
