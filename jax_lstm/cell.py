"""The LSTM cell: parameters, state, initialisation and one time step.

The forward equations live here and nowhere else (row-vector convention, gate
blocks side by side in the order f, i, g, o)::

    z_t = h_{t-1} @ W + x_t @ U + b                      # (B, 4H)
    f_t, i_t, o_t = sigmoid(z_f), sigmoid(z_i), sigmoid(z_o)
    g_t = tanh(z_g)
    c_t = c_{t-1} * f_t + i_t * g_t
    h_t = tanh(c_t) * o_t

``gate_fn`` (default sigmoid) and ``activation_fn`` (default tanh) may replace
the two activations with any element-wise functions, as in Flax's cells.

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
    "acc_dtype",
    "check_size",
    "split_gates",
    "is_default",
    "gate_derivatives",
    "activation_derivative",
    "gate_activations",
    "cell_update",
    "preactivations",
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


def check_size(name: str, n, minimum: int = 1) -> int:
    """A size argument: a Python or NumPy int (never a bool or a float) of at least ``minimum``."""
    if isinstance(n, (bool, np.bool_)) or not isinstance(n, (int, np.integer)) or n < minimum:
        kind = "positive" if minimum == 1 else "non-negative"
        raise ValueError(f"{name} must be a {kind} int, got {n!r}")
    return int(n)


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
    D, H = check_size("input_size", input_size), check_size("hidden_size", hidden_size)
    k_u, k_w = jax.random.split(key)
    U = jax.nn.initializers.glorot_uniform()(k_u, (D, 4 * H), jnp.float32)
    ortho = jax.nn.initializers.orthogonal()
    W = jnp.concatenate([ortho(k, (H, H), jnp.float32) for k in jax.random.split(k_w, 4)], axis=1)
    b = jnp.zeros((4 * H,), jnp.float32).at[:H].set(forget_bias)
    return LSTMParams(W.astype(dtype), U.astype(dtype), b.astype(dtype))


def zeros_state(batch_size: int, hidden_size: int, dtype=jnp.float32) -> LSTMState:
    """A zero ``LSTMState`` with h, c: (batch_size, hidden_size)."""
    shape = (check_size("batch_size", batch_size, minimum=0), check_size("hidden_size", hidden_size))
    return LSTMState(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))  # two buffers: a carry can be donated


def split_gates(z: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Split (..., 4H) into the four (..., H) blocks f, i, g, o."""
    return tuple(jnp.split(z, 4, axis=-1))  # type: ignore[return-value]


def is_default(gate_fn, activation_fn) -> bool:
    """Whether the activations are the standard ones, sigmoid gates and tanh (the fused path)."""
    return gate_fn is jax.nn.sigmoid and activation_fn is jnp.tanh


def gate_activations(z: jax.Array, gate_fn=jax.nn.sigmoid, activation_fn=jnp.tanh) -> jax.Array:
    """Pre-activations (..., 4H) -> activations (..., 4H): ``gate_fn`` on f, i, o, ``activation_fn`` on g.

    For the standard sigmoid and tanh all four blocks go through one ``tanh``:
    with a = 1/2 on the sigmoid blocks and a = 1 on g, ``a * tanh(a * z) + (1 - a)``
    is sigmoid(z) = 0.5 + 0.5 * tanh(z / 2) and tanh(z).
    """
    if not is_default(gate_fn, activation_fn):
        f, i, g, o = split_gates(z)
        return jnp.concatenate([gate_fn(f), gate_fn(i), activation_fn(g), gate_fn(o)], axis=-1)
    H = z.shape[-1] // 4
    a = jnp.concatenate([jnp.full((2 * H,), 0.5, z.dtype), jnp.ones((H,), z.dtype), jnp.full((H,), 0.5, z.dtype)])
    a = a.reshape((1,) * (z.ndim - 1) + a.shape)
    return a * jnp.tanh(a * z) + (1 - a)


def gate_derivatives(z: jax.Array, gate_fn=jax.nn.sigmoid, activation_fn=jnp.tanh) -> tuple[jax.Array, jax.Array]:
    """The activations (..., 4H) and their derivatives with respect to the pre-activations z.

    For sigmoid and tanh the derivatives come from the activations a themselves,
    a (1 - a) and 1 - a^2; any other element-wise function is differentiated at
    z by forward mode (its derivative along a tangent of ones).
    """
    if is_default(gate_fn, activation_fn):
        act = gate_activations(z)
        f, i, g, o = split_gates(act)
        return act, jnp.concatenate([f * (1 - f), i * (1 - i), 1 - g * g, o * (1 - o)], axis=-1)
    return jax.jvp(lambda v: gate_activations(v, gate_fn, activation_fn), (z,), (jnp.ones_like(z),))


def activation_derivative(c: jax.Array, activation_fn=jnp.tanh) -> tuple[jax.Array, jax.Array]:
    """``activation_fn(c)`` and its derivative at c (1 - tanh(c)^2 for tanh)."""
    if activation_fn is jnp.tanh:
        tc = jnp.tanh(c)
        return tc, 1 - tc * tc
    return jax.jvp(activation_fn, (c,), (jnp.ones_like(c),))


def cell_update(c_prev: jax.Array, act: jax.Array, activation_fn=jnp.tanh) -> tuple[jax.Array, jax.Array, jax.Array]:
    """From c_{t-1} and activations [f | i | g | o] to (c_t, activation_fn(c_t), h_t)."""
    f, i, g, o = split_gates(act)
    c = c_prev * f + i * g
    tc = activation_fn(c)
    return c, tc, tc * o


def _matmul(a: jax.Array, w: jax.Array, out_dtype) -> jax.Array:
    """a @ w in w's dtype, accumulated in ``out_dtype``."""
    return jnp.matmul(a.astype(w.dtype), w, preferred_element_type=out_dtype)


def preactivations(params: LSTMParams, h: jax.Array, x_t: jax.Array, acc) -> jax.Array:
    """z_t = h_{t-1} @ W + x_t @ U + b: (B, 4H) in dtype ``acc``."""
    return _matmul(h, params.W, acc) + _matmul(x_t, params.U, acc) + params.b.astype(acc)[None, :]


def lstm_cell(
    params: LSTMParams, state: LSTMState, x_t: jax.Array, *, gate_fn=jax.nn.sigmoid, activation_fn=jnp.tanh
) -> tuple[LSTMState, jax.Array]:
    """One LSTM step, with ``lax.scan``'s body signature.

    Args:
      params: ``LSTMParams`` with W: (H, 4H), U: (D, 4H), b: (4H,).
      state: ``LSTMState`` with h, c: (B, H).
      x_t: (B, D) input at this step.
      gate_fn: element-wise activation of the f, i and o gates.
      activation_fn: element-wise activation of the candidate g and of c_t in h_t.

    Returns:
      ``(new_state, h_t)``; the new state keeps the dtypes of ``state``.
    """
    acc = acc_dtype(jnp.result_type(params.W, x_t))
    z = preactivations(params, state.h, x_t, acc)
    c, _, h = cell_update(state.c.astype(acc), gate_activations(z, gate_fn, activation_fn), activation_fn)
    new = LSTMState(h.astype(state.h.dtype), c.astype(state.c.dtype))
    return new, new.h
