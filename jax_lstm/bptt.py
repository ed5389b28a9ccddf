"""``lstm``: the LSTM layer whose gradient is hand-written backpropagation through time.

Same contract and values as ``lstm_ref``; the gradient comes from ``_lstm_bwd``,
registered with ``jax.custom_vjp``. It is organised the way fused RNN libraries
do it:

* forward: the input projection ``xs @ U + b`` for all steps is one matmul
  outside the scan; inside the scan, one matmul ``h @ W`` for all four gates;
* backward: a scan whose body holds only the element-wise gate deltas and
  ``dh_{t-1} = dz_t @ W^T``; ``dW``, ``dU``, ``db`` and ``dxs`` are single
  matmuls/reductions over all steps at once, after the scan.

The comments of ``_lstm_bwd`` name the rule of the seed document
(``shared/seed/lstm_units.md``, δ1…δ26) each line implements, and where the
seed's rule is wrong.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jax_lstm.cell import LSTMState, cell_update, gate_activations, split_gates
from jax_lstm.reference import prepare

__all__ = ["lstm"]


def lstm(params, xs, state0=None, *, seq_lengths=None, reverse=False, unroll=1):
    """Run an LSTM layer over a sequence; gradients by hand-written BPTT.

    Args:
      params: ``LSTMParams`` with W: (H, 4H), U: (D, 4H), b: (4H,), gate
        blocks [f | i | g | o].
      xs: (T, B, D) inputs, time-major.
      state0: ``LSTMState`` with h, c: (B, H); None means zeros.
      seq_lengths: optional (B,) integer array, 0 <= seq_lengths[b] <= T. Steps
        t >= seq_lengths[b] are padding: zero output, unchanged state, zero
        input gradient.
      reverse: run each sequence from its last valid step down to step 0;
        ``hs`` stays aligned with ``xs``.
      unroll: passed to both ``lax.scan`` loops; changes speed, not values.

    Returns:
      ``(hs, LSTMState(h, c))`` with hs: (T, B, H), h, c: (B, H).

    Dtypes: params and xs are brought to their common dtype. float32 and
    float64 compute everything in that dtype. For bfloat16 (or float16) the
    matmuls take bf16 operands and accumulate in float32, gate math, the cell
    state and the carried h stay float32, and the outputs are cast back to the
    input dtype; gradients are returned in each argument's own dtype.

    Memory: the forward keeps, per time step, the four gate activations and
    the cell state c_t, 5*B*H numbers in the accumulation dtype (20*B*H bytes
    in float32, 40*B*H in float64), plus hs, which is the output itself. That
    is the least a fused backward needs: the gates give every local
    derivative without recomputing a matmul, c_t gives tanh(c_t) and, shifted
    by one step, c_{t-1} for the forget-gate delta; h_{t-1} for ``dW`` is hs
    shifted by one step. ``xs``, ``W`` and ``U`` are referenced, not copied.

    Raises:
      ValueError, TypeError: at trace time, naming the bad argument and the
        shapes involved.
    """
    params, xs, state0, mask, dtype = prepare(params, xs, state0, seq_lengths, unroll)
    hs, h, c = _lstm_core(*params, xs, state0.h, state0.c, mask, bool(reverse), int(unroll))
    return hs.astype(dtype), LSTMState(h.astype(dtype), c.astype(dtype))


def _forward(W, U, b, xs, h0, c0, mask, reverse, unroll, save):
    """The fused forward pass. Returns (hs, h_T, c_T) and, if ``save``, (acts, cs)."""
    acc = h0.dtype
    T, B, D = xs.shape
    G = W.shape[1]
    # x_t @ U + b for every step at once: (T, B, 4H)
    xp = jnp.matmul(xs.reshape(T * B, D), U, preferred_element_type=acc).reshape(T, B, G)
    xp = xp + b.astype(acc)[None, None, :]

    def step(carry, inp):
        h, c = carry
        xp_t, m_t = inp if mask is not None else (inp, None)
        z = xp_t + jnp.matmul(h.astype(W.dtype), W, preferred_element_type=acc)
        act = gate_activations(z)
        c_new, _, h_new = cell_update(c, act)
        out = h_new
        if m_t is not None:
            m = m_t[:, None]
            c_new = jnp.where(m, c_new, c)
            h_new = jnp.where(m, h_new, h)
            out = jnp.where(m, out, jnp.zeros_like(out))
        return (h_new, c_new), ((out, act, c_new) if save else out)

    xs_in = xp if mask is None else (xp, mask)
    (h, c), ys = jax.lax.scan(step, (h0, c0), xs_in, reverse=reverse, unroll=unroll)
    if save:
        hs, acts, cs = ys
        return (hs, h, c), (acts, cs)
    return (ys, h, c), None


def _shift(a, first, reverse):
    """The value of ``a`` one step earlier in the direction of the run, ``first`` at the start."""
    if reverse:
        return jnp.concatenate([a[1:], first[None]], axis=0)
    return jnp.concatenate([first[None], a[:-1]], axis=0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8))
def _lstm_core(W, U, b, xs, h0, c0, mask, reverse, unroll):
    out, _ = _forward(W, U, b, xs, h0, c0, mask, reverse, unroll, save=False)
    return out


def _lstm_fwd(W, U, b, xs, h0, c0, mask, reverse, unroll):
    (hs, h, c), (acts, cs) = _forward(W, U, b, xs, h0, c0, mask, reverse, unroll, save=True)
    return (hs, h, c), (W, U, xs, h0, c0, mask, hs, acts, cs)


@jax.named_scope("lstm_bptt_bwd")
def _lstm_bwd(reverse, unroll, res, cts):
    W, U, xs, h0, c0, mask, hs, acts, cs = res
    del res
    dhs, dh_T, dc_T = cts
    acc = h0.dtype
    T, B, D = xs.shape
    G = W.shape[1]
    dhs = dhs.astype(acc)
    c_prev = _shift(cs, c0, reverse)  # c_{t-1} of each step t

    def step(carry, inp):
        dh_next, dc_next = carry  # seed δ2 (future hidden state) and δ4 (future cell)
        if mask is not None:
            dh_out, act, c, cp, m_t = inp
        else:
            (dh_out, act, c, cp), m_t = inp, None
        f, i, g, o = split_gates(act)
        tc = jnp.tanh(c)
        dh = dh_next + dh_out  # seed δ3 = δ1 + δ2: from the output and the next step
        do = dh * tc  # seed δ6: through h = o * tanh(c)
        dc = dc_next + dh * o * (1 - tc * tc)  # seed δ5, δ7, δ8. δ7 as written, tanh'(tanh(c)), is
        # only right if tanh' means 1 - y^2 of the output y; δ8 is a sum, not the product δ7 · δ4
        dz = jnp.concatenate(
            [
                dc * cp * f * (1 - f),  # seed δ12 = δ8 · c_{t-1}, δ16 = δ12 · f(1 - f): forget gate
                dc * g * i * (1 - i),  # seed δ10 = δ8 · g, δ15 = δ10 · i(1 - i): input gate
                dc * i * (1 - g * g),  # seed δ9 = δ8 · i, δ14 = δ9 · (1 - g^2): candidate
                do * o * (1 - o),  # seed δ13 = δ6 · o(1 - o): output gate. δ13..δ16 as
            ],  # written apply sigmoid'/tanh' to the activation, not to the pre-activation
            axis=-1,
        )
        # seed δ25 = δ18 + δ20 + δ22 + δ24 = dz @ W^T (the seed's δ22 uses δ16, the
        # forget delta, where the input-gate delta δ15 belongs)
        dh_prev = jnp.matmul(dz.astype(W.dtype), W.T, preferred_element_type=acc)
        dc_prev = dc * f  # seed δ11 = δ8 · f
        if m_t is not None:  # padded step: the state passes through untouched
            m = m_t[:, None]
            dz = jnp.where(m, dz, jnp.zeros_like(dz))
            dh_prev = jnp.where(m, dh_prev, dh_next)
            dc_prev = jnp.where(m, dc_prev, dc_next)
        return (dh_prev, dc_prev), dz

    inputs = (dhs, acts, cs, c_prev) if mask is None else (dhs, acts, cs, c_prev, mask)
    carry0 = (dh_T.astype(acc), dc_T.astype(acc))
    (dh0, dc0), dz = jax.lax.scan(step, carry0, inputs, reverse=not reverse, unroll=unroll)

    # h_{t-1} of each step t. With padding, a valid step whose predecessor is padding
    # (only possible with reverse=True) starts from h0.
    h_prev = _shift(hs, h0, reverse)
    if mask is not None:
        m_prev = _shift(mask, jnp.zeros_like(mask[0]), reverse)
        h_prev = jnp.where(m_prev[..., None], h_prev, h0[None])

    dz2 = dz.reshape(T * B, G)

    def mm_t(a, b_, dtype):  # a^T @ b over all steps: (TB, m)^T (TB, n) -> (m, n)
        return jnp.matmul(a.reshape(T * B, -1).T.astype(dtype), b_.astype(dtype), preferred_element_type=acc)

    dW = mm_t(h_prev, dz2, W.dtype)  # seed: δW = Σ_t h_{t-1}^T * δ13..16
    dU = mm_t(xs, dz2, U.dtype)  # seed: δU = Σ_t x_t^T * δ13..16
    db = dz2.sum(axis=0)  # the seed has no bias; its gradient is Σ_t dz_t
    # seed δ26 = δ17 + δ19 + δ21 + δ23 = dz @ U^T (the seed's δ23 uses W_f^T where U_f^T belongs)
    dxs = jnp.matmul(dz2.astype(U.dtype), U.T, preferred_element_type=acc).reshape(T, B, D)
    return (
        dW.astype(W.dtype),
        dU.astype(U.dtype),
        db.astype(W.dtype),
        dxs.astype(xs.dtype),
        dh0.astype(h0.dtype),
        dc0.astype(c0.dtype),
        None,
    )


_lstm_core.defvjp(_lstm_fwd, _lstm_bwd)
