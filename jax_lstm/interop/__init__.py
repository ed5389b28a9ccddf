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

from jax_lstm.interop._equinox import from_equinox, to_equinox
from jax_lstm.interop._flax import from_flax, to_flax
from jax_lstm.interop._haiku import from_haiku, to_haiku
from jax_lstm.interop._keras import from_keras, to_keras
from jax_lstm.interop._torch import from_torch, states_from_torch, states_to_torch, to_torch

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
