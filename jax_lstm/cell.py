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

The LSTM family: three optional fields of ``LSTMParams`` change the step
(``family_step``); any combination of them may be present::

    projection (W_proj: (H, P), 0 < P < H):  h_t = (o_t * tanh(c_t)) @ W_proj, h: (B, P), W: (P, 4H)
    peepholes (peephole: (3, H), rows f, i, o):
        z_f += c_{t-1} * p_f;  z_i += c_{t-1} * p_i;  z_o += c_t * p_o   (o sees the new cell)
    layer norm (norm: LayerNormParams):
        z_t = LN(x_t @ U) * gamma_x + LN(h_{t-1} @ W) * gamma_h + b
        h_t = o_t * tanh(LN(c_t) * gamma_c + beta_c)                       (the carried c_t is not normalised)

LN normalises over the last axis (4H for the projections, H for the cell)
with eps 1e-5 and no affine terms of its own (``normalize``).

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
    "LayerNormParams",
    "LN_EPS",
    "normalize",
    "is_plain",
    "hidden_out_size",
    "family_step",
    "OptionalTail",
]

LN_EPS = 1e-5  # the variance offset of every layer norm


class LayerNormParams(NamedTuple):
    """Gains and offset of the layer-normalised LSTM.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> import jax_lstm as jl
      >>> p = jl.init_params(jax.random.PRNGKey(0), 3, 4, layer_norm=True)
      >>> p.norm.gamma_x.shape, p.norm.gamma_h.shape, p.norm.gamma_c.shape, p.norm.beta_c.shape
      ((16,), (16,), (4,), (4,))
    """

    gamma_x: jax.Array  # (4H,) gain of LN(x_t @ U)
    gamma_h: jax.Array  # (4H,) gain of LN(h_{t-1} @ W)
    gamma_c: jax.Array  # (H,)  gain of LN(c_t)
    beta_c: jax.Array  # (H,)  offset of LN(c_t)


class _LSTMFields(NamedTuple):
    W: jax.Array  # (H, 4H) recurrent weights, multiply h_{t-1}; (P, 4H) with a projection
    U: jax.Array  # (D, 4H) input weights, multiply x_t
    b: jax.Array  # (4H,)   bias
    W_proj: jax.Array | None = None  # (H, P) projection of the output, 0 < P < H
    peephole: jax.Array | None = None  # (3, H) peephole weights, rows f, i, o
    norm: LayerNormParams | None = None  # layer-norm gains and offset


class OptionalTail:
    """For a NamedTuple whose last fields are optional (None = absent): unpacking, ``len`` and
    ``_asdict`` stop after the last field present, so code written before those fields existed still
    sees the tuple as it did; indexing, attributes and pytree flattening see every field."""

    __slots__ = ()
    _required: int = 0  # the fields always present

    def __len__(self) -> int:
        n = tuple.__len__(self)
        while n > self._required and tuple.__getitem__(self, n - 1) is None:
            n -= 1
        return n

    def __iter__(self):
        return (tuple.__getitem__(self, k) for k in range(len(self)))

    @classmethod
    def _make(cls, iterable):
        return cls(*iterable)

    def _replace(self, **fields):
        every = {name: tuple.__getitem__(self, k) for k, name in enumerate(self._fields)}
        return type(self)(**{**every, **fields})

    def _asdict(self) -> dict:
        return {name: tuple.__getitem__(self, k) for k, name in enumerate(self._fields[: len(self)])}


class LSTMParams(OptionalTail, _LSTMFields):
    """Weights of one LSTM layer, gate blocks side by side as [f | i | g | o].

    ``W`` (H, 4H), ``U`` (D, 4H), ``b`` (4H,), and three optional fields (None
    = absent; a None field is a pytree node without leaves, so optimisers,
    ``jax.grad`` and checkpoints see only the arrays): ``W_proj`` (H, P),
    0 < P < H, with which h has size P and ``W`` is (P, 4H); ``peephole``
    (3, H), rows f, i, o; ``norm``, a ``LayerNormParams``.

    Unpacking, ``len`` and ``_asdict`` stop after the last field present, so a plain LSTM's
    params still unpack as ``W, U, b = params``; indexing, attributes and
    pytree flattening see all six fields.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> import jax_lstm as jl
      >>> W, U, b = jl.init_params(jax.random.PRNGKey(0), input_size=3, hidden_size=4)
      >>> W.shape, U.shape, b.shape
      ((4, 16), (3, 16), (16,))
      >>> p = jl.init_params(jax.random.PRNGKey(0), 3, 4, proj_size=2)
      >>> p.W.shape, p.W_proj.shape                                 # h has size P = 2
      ((2, 16), (4, 2))
    """

    __slots__ = ()
    _required = 3


class LSTMState(NamedTuple):
    """Recurrent state of one LSTM layer.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> import jax_lstm as jl
      >>> state = jl.LSTMState(h=jnp.zeros((2, 4)), c=jnp.ones((2, 4)))
      >>> h, c = state
      >>> state.c.shape
      (2, 4)
    """

    h: jax.Array  # (B, H) hidden state; (B, P) with a projection
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
    proj_size: int = 0,
    peephole: bool = False,
    layer_norm: bool = False,
    forget_bias: float = 1.0,
    dtype=jnp.float32,
) -> LSTMParams:
    """Initialise one layer.

    ``U`` is Glorot-uniform over (D, 4H), each gate block of ``W`` is
    orthogonal, ``b`` is zero except the forget block, which is ``forget_bias``
    (1.0 keeps the cell's memory open early in training). ``W_proj`` is
    Glorot-uniform, the peepholes start at zero (the plain LSTM), the layer-norm
    gains at one and ``beta_c`` at zero.

    Args:
      key: PRNG key.
      input_size: D, the size of x_t.
      hidden_size: H, the size of c_t (and of h_t without a projection).
      proj_size: P, 0 < P < H, projects the output to size P; 0: no projection.
      peephole: add peephole connections (``peephole``: (3, H)).
      layer_norm: layer-normalise the projections and the cell (``norm``).
      forget_bias: initial value of the forget-gate bias block.
      dtype: dtype of all arrays.

    Returns:
      ``LSTMParams`` with W: (H, 4H) ((P, 4H) projected), U: (D, 4H), b: (4H,)
      and the optional fields asked for (None otherwise).

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> import jax_lstm as jl
      >>> p = jl.init_params(jax.random.PRNGKey(0), input_size=3, hidden_size=4, peephole=True)
      >>> p.W.shape, p.U.shape, p.b.shape, p.peephole.shape
      ((4, 16), (3, 16), (16,), (3, 4))
    """
    D, H = check_size("input_size", input_size), check_size("hidden_size", hidden_size)
    P = check_size("proj_size", proj_size, minimum=0)
    if P >= H:
        raise ValueError(f"proj_size must be smaller than hidden_size = {H} (0 for no projection), got {P}")
    for name, flag in (("peephole", peephole), ("layer_norm", layer_norm)):
        if not isinstance(flag, (bool, np.bool_)):
            raise TypeError(f"{name} must be a Python bool, got {type(flag).__name__}")
    k_u, k_w, k_p = jax.random.split(key, 3)
    U = jax.nn.initializers.glorot_uniform()(k_u, (D, 4 * H), jnp.float32)
    ortho = jax.nn.initializers.orthogonal()
    rows = P if P else H
    W = jnp.concatenate([ortho(k, (rows, H), jnp.float32) for k in jax.random.split(k_w, 4)], axis=1)
    b = jnp.zeros((4 * H,), jnp.float32).at[:H].set(forget_bias)
    cast = lambda a: a.astype(dtype)  # noqa: E731
    W_proj = cast(jax.nn.initializers.glorot_uniform()(k_p, (H, P), jnp.float32)) if P else None
    peep = jnp.zeros((3, H), dtype) if peephole else None
    norm = None
    if layer_norm:
        ones4, ones = jnp.ones((4 * H,), dtype), jnp.ones((H,), dtype)
        norm = LayerNormParams(ones4, ones4 + 0, ones, jnp.zeros((H,), dtype))  # four buffers
    return LSTMParams(cast(W), cast(U), cast(b), W_proj, peep, norm)


def zeros_state(batch_size: int, hidden_size: int, dtype=jnp.float32, *, proj_size: int = 0) -> LSTMState:
    """A zero ``LSTMState`` with h, c: (batch_size, hidden_size); h: (batch_size, proj_size) if projected.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> import jax_lstm as jl
      >>> state = jl.zeros_state(batch_size=8, hidden_size=64)
      >>> state.h.shape, state.c.dtype
      ((8, 64), dtype('float32'))
    """
    shape = (check_size("batch_size", batch_size, minimum=0), check_size("hidden_size", hidden_size))
    P = check_size("proj_size", proj_size, minimum=0)
    h_shape = (shape[0], P) if P else shape
    return LSTMState(jnp.zeros(h_shape, dtype), jnp.zeros(shape, dtype))  # two buffers: a carry can be donated


def is_plain(params) -> bool:
    """Whether ``params`` is the plain LSTM (no projection, peepholes or layer norm)."""
    return all(getattr(params, f, None) is None for f in ("W_proj", "peephole", "norm"))


def hidden_out_size(params) -> int:
    """The size of h_t: P with a projection, else H."""
    W_proj = getattr(params, "W_proj", None)
    return params.W.shape[1] // 4 if W_proj is None else W_proj.shape[1]


def normalize(x: jax.Array) -> jax.Array:
    """(x - mean) / sqrt(var + eps) over the last axis (no gain or offset of its own)."""
    mu = jnp.mean(x, axis=-1, keepdims=True)
    d = x - mu
    return d * jax.lax.rsqrt(jnp.mean(d * d, axis=-1, keepdims=True) + LN_EPS)


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


class FamilyStep(NamedTuple):
    """One step of the family: the new state and the intermediates, each (B, H) unless noted."""

    c: jax.Array
    h: jax.Array  # (B, P) with a projection
    f: jax.Array
    i: jax.Array
    g: jax.Array
    o: jax.Array
    x_norm: jax.Array | None  # (B, 4H) LN(x_t @ U) * gamma_x, with layer norm
    h_norm: jax.Array | None  # (B, 4H) LN(h_{t-1} @ W) * gamma_h, with layer norm
    c_norm: jax.Array | None  # (B, H)  LN(c_t) * gamma_c + beta_c, with layer norm


def family_step(params: LSTMParams, h, c_prev, x_t, acc, gate_fn=jax.nn.sigmoid, activation_fn=jnp.tanh):
    """One step with the optional projection, peepholes and layer norm (module docstring), in dtype ``acc``.

    ``h`` is h_{t-1} as it enters ``h @ W`` (after any dropout), ``c_prev`` is c_{t-1}.
    """
    W_proj, peep, norm = params.W_proj, params.peephole, params.norm
    ax, ah = _matmul(x_t, params.U, acc), _matmul(h, params.W, acc)
    x_norm = h_norm = c_norm = None
    if norm is not None:
        x_norm = normalize(ax) * norm.gamma_x.astype(acc)[None, :]
        h_norm = normalize(ah) * norm.gamma_h.astype(acc)[None, :]
        ax, ah = x_norm, h_norm
    z_f, z_i, z_g, z_o = split_gates(ax + ah + params.b.astype(acc)[None, :])
    if peep is not None:
        p = peep.astype(acc)
        z_f, z_i = z_f + c_prev * p[0][None, :], z_i + c_prev * p[1][None, :]
    f, i, g = gate_fn(z_f), gate_fn(z_i), activation_fn(z_g)
    c = c_prev * f + i * g
    if peep is not None:
        z_o = z_o + c * p[2][None, :]
    o = gate_fn(z_o)
    n = c
    if norm is not None:
        n = c_norm = normalize(c) * norm.gamma_c.astype(acc)[None, :] + norm.beta_c.astype(acc)[None, :]
    h_new = o * activation_fn(n)
    if W_proj is not None:
        h_new = _matmul(h_new, W_proj, acc)
    return FamilyStep(c, h_new, f, i, g, o, x_norm, h_norm, c_norm)


def lstm_cell(
    params: LSTMParams, state: LSTMState, x_t: jax.Array, *, gate_fn=jax.nn.sigmoid, activation_fn=jnp.tanh
) -> tuple[LSTMState, jax.Array]:
    """One LSTM step, with ``lax.scan``'s body signature.

    Args:
      params: ``LSTMParams`` with W: (H, 4H), U: (D, 4H), b: (4H,) (and any optional fields).
      state: ``LSTMState`` with h, c: (B, H) (h: (B, P) with a projection).
      x_t: (B, D) input at this step.
      gate_fn: element-wise activation of the f, i and o gates.
      activation_fn: element-wise activation of the candidate g and of c_t in h_t.

    Returns:
      ``(new_state, h_t)``; the new state keeps the dtypes of ``state``.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> import jax_lstm as jl
      >>> p = jl.init_params(jax.random.PRNGKey(0), 3, 4)
      >>> state, h_t = jl.lstm_cell(p, jl.zeros_state(2, 4), jnp.ones((2, 3)))    # x_t: (B, D)
      >>> h_t.shape, state.c.shape
      ((2, 4), (2, 4))
      >>> final, hs = jax.lax.scan(lambda s, x: jl.lstm_cell(p, s, x), jl.zeros_state(2, 4), jnp.ones((5, 2, 3)))
      >>> hs.shape
      (5, 2, 4)
    """
    acc = acc_dtype(jnp.result_type(params.W, x_t))
    if not is_plain(params):
        step = family_step(LSTMParams(*params), state.h, state.c.astype(acc), x_t, acc, gate_fn, activation_fn)
        new = LSTMState(step.h.astype(state.h.dtype), step.c.astype(state.c.dtype))
        return new, new.h
    z = preactivations(params, state.h, x_t, acc)
    c, _, h = cell_update(state.c.astype(acc), gate_activations(z, gate_fn, activation_fn), activation_fn)
    new = LSTMState(h.astype(state.h.dtype), c.astype(state.c.dtype))
    return new, new.h
