"""``lstm``: the LSTM layer whose gradient is hand-written backpropagation through time.

Same contract and values as ``lstm_ref``; the gradient comes from ``_lstm_bwd``,
registered with ``jax.custom_vjp``. It is organised the way fused RNN libraries
do it, and shaped by what is fast on XLA:CPU, where a step of a loop costs
far more than the same work done for all steps at once:

* forward: the input projection ``xs @ U`` for all steps is one matmul
  outside the loop; inside, one matmul ``h @ W`` for all four gates, the bias
  add fused with the gate math. While the step has every operand at hand it
  also computes the local derivatives the backward needs (five (B, H) blocks
  and f), and writes the four gate coefficients over the row of ``xs @ U`` it
  has just consumed, so the residuals need no buffer of their own;
* backward: a loop whose body is one element-wise pass (the gate deltas
  ``dz_t`` from the carried dh, dc and the stored coefficients), one matmul
  ``dh_{t-1} = dz_t @ W^T`` with ``W^T`` transposed once, and the write of
  ``dz_t`` over the coefficients it was made from; ``dW``, ``dU``, ``db`` and
  ``dxs`` are then single matmuls/reductions over all steps at once.

The comments name the rule of the seed document (``shared/seed/lstm_units.md``,
δ1…δ26) each line implements, and where the seed's rule is wrong.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jax_lstm.cell import LSTMState, gate_activations, split_gates
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
      unroll: unroll factor of the forward and backward loops; changes speed, not values.

    Returns:
      ``(hs, LSTMState(h, c))`` with hs: (T, B, H), h, c: (B, H).

    Dtypes: params and xs are brought to their common dtype. float32 and
    float64 compute everything in that dtype. For bfloat16 (or float16) the
    matmuls take bf16 operands and accumulate in float32, gate math, the cell
    state and the carried h stay float32, and the outputs are cast back to the
    input dtype; gradients are returned in each argument's own dtype.

    Memory: the forward keeps, per time step, six (B, H) blocks in the
    accumulation dtype: the four gate coefficients (the derivative of each gate
    with respect to its pre-activation, times the factor that multiplies it in
    c_t or h_t), dc_t/dh_t = o (1 - tanh(c_t)^2) and f_t, plus hs, which is the
    output itself. The coefficients overwrite ``xs @ U``'s buffer row by row,
    and the backward overwrites them with the gate deltas, so forward and
    backward together hold 4 + 2 + 1 (T, B, H) arrays, plus h_{t-1} for
    ``dW`` (hs shifted by one step): 32*T*B*H bytes in float32, about 0.5x
    of what autodiff of ``lstm_ref`` compiles to. ``xs``, ``W`` and ``U`` are
    referenced, not copied.

    Raises:
      ValueError, TypeError: at trace time, naming the bad argument and the
        shapes involved.
    """
    params, xs, state0, mask, dtype = prepare(params, xs, state0, seq_lengths, unroll)
    if xs.shape[0] == 0:  # no steps: the state passes through, as in lstm_ref
        hs = jnp.zeros((0, xs.shape[1], params.W.shape[0]), dtype)
        return hs, LSTMState(state0.h.astype(dtype), state0.c.astype(dtype))
    hs, h, c = _lstm_core(*params, xs, state0.h, state0.c, mask, bool(reverse), int(unroll))
    return hs.astype(dtype), LSTMState(h.astype(dtype), c.astype(dtype))


def _forward(W, U, b, xs, h0, c0, mask, reverse, unroll, save):
    """The fused forward pass. Returns (hs, h_T, c_T) and, if ``save``, the residuals (coef, dcdh_f).

    ``coef``: (T, B, 4H), per gate block the factor that turns dc_t (f, i, g)
    or dh_t (o) into the gate's delta; ``dcdh_f``: (T, B, 2H), [dc_t/dh_t | f_t].
    At padded steps coef and dc_t/dh_t are zero and f_t is one, so the
    backward passes the state's gradient through untouched.
    """
    acc = h0.dtype
    T, B, D = xs.shape
    G = W.shape[1]
    # x_t @ U for every step at once: (T, B, 4H). The bias is added inside the step, where it
    # fuses with the gate math instead of costing a pass of its own over (T, B, 4H).
    xp = jnp.matmul(xs.reshape(T * B, D), U, preferred_element_type=acc).reshape(T, B, G)
    bias = b.astype(acc)[None, :]

    def cell(h, c, xp_t, m_t):
        act = gate_activations(xp_t + bias + jnp.matmul(h.astype(W.dtype), W, preferred_element_type=acc))
        f, i, g, o = split_gates(act)
        c_new = c * f + i * g
        tc = jnp.tanh(c_new)
        h_new = tc * o
        out = h_new
        res = None
        if save:
            # The local derivatives of this step, while every operand is at hand. Each
            # is a derivative with respect to the pre-activation: the seed's δ13..δ16 apply
            # sigmoid'/tanh' to the activation, which is only right read as a(1 - a), 1 - a^2.
            coef = jnp.concatenate(
                [
                    c * f * (1 - f),  # forget: seed δ12 = δ8 · c_{t-1}, δ16 = δ12 · f(1 - f)
                    g * i * (1 - i),  # input: seed δ10 = δ8 · g, δ15 = δ10 · i(1 - i)
                    i * (1 - g * g),  # candidate: seed δ9 = δ8 · i, δ14 = δ9 · (1 - g^2)
                    tc * o * (1 - o),  # output: seed δ6 = δ3 · tanh(c), δ13 = δ6 · o(1 - o)
                ],
                axis=-1,
            )
            # seed δ5 = δ3 · o, δ7 = δ5 · (1 - tanh(c)^2): δ7 as written, tanh'(tanh(c)), is only
            # right if tanh' means 1 - y^2 of the output y
            dcdh = o * (1 - tc * tc)
            f_keep = f
        if m_t is not None:  # padded step: state unchanged, zero output, zero local derivatives
            m = m_t[:, None]
            c_new = jnp.where(m, c_new, c)
            h_new = jnp.where(m, h_new, h)
            out = jnp.where(m, out, jnp.zeros_like(out))
            if save:
                coef = jnp.where(m, coef, jnp.zeros_like(coef))
                dcdh = jnp.where(m, dcdh, jnp.zeros_like(dcdh))
                f_keep = jnp.where(m, f_keep, jnp.ones_like(f_keep))
        if save:
            res = (coef, jnp.concatenate([dcdh, f_keep], axis=-1))
        return h_new, c_new, out, res

    if not save:

        def step(carry, inp):
            xp_t, m_t = inp if mask is not None else (inp, None)
            h, c, out, _ = cell(*carry, xp_t, m_t)
            return (h, c), out

        (h, c), hs = jax.lax.scan(step, (h0, c0), xp if mask is None else (xp, mask), reverse=reverse, unroll=unroll)
        return (hs, h, c), None

    # With residuals: a loop over t that reads row t of xp and writes the coefficients
    # back into that same row, so they need no (T, B, 4H) buffer of their own.
    def body(k, carry):
        h, c, buf, dcdh_f, hs = carry
        t = (T - 1 - k if reverse else k).astype(jnp.uint32)  # unsigned: no wrap-around of negative indices
        m_t = None if mask is None else jax.lax.dynamic_index_in_dim(mask, t, keepdims=False)
        xp_t = jax.lax.dynamic_slice_in_dim(buf, t, 1)[0]
        h, c, out, (coef, df) = cell(h, c, xp_t, m_t)
        buf = jax.lax.dynamic_update_slice_in_dim(buf, coef[None], t, 0)
        dcdh_f = jax.lax.dynamic_update_slice_in_dim(dcdh_f, df[None], t, 0)
        hs = jax.lax.dynamic_update_slice_in_dim(hs, out[None], t, 0)
        return h, c, buf, dcdh_f, hs

    H = G // 4
    init = (h0, c0, xp, jnp.zeros((T, B, 2 * H), acc), jnp.zeros((T, B, H), acc))
    h, c, coef, dcdh_f, hs = jax.lax.fori_loop(0, T, body, init, unroll=unroll)
    return (hs, h, c), (coef, dcdh_f)


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
    (hs, h, c), (coef, dcdh_f) = _forward(W, U, b, xs, h0, c0, mask, reverse, unroll, save=True)
    return (hs, h, c), (W, U, xs, h0, c0, mask, hs, coef, dcdh_f)


@jax.named_scope("lstm_bptt_bwd")
def _lstm_bwd(reverse, unroll, res, cts):
    W, U, xs, h0, c0, mask, hs, coef, dcdh_f = res
    del res
    dhs, dh_T, dc_T = cts
    acc = h0.dtype
    T, B, D = xs.shape
    G = W.shape[1]
    H = G // 4
    dhs = dhs.astype(acc)
    if mask is not None:  # a padded output is the constant zero: its cotangent goes nowhere
        dhs = jnp.where(mask[..., None], dhs, jnp.zeros_like(dhs))
    W_T = W.T  # (4H, H), transposed once: a plain matmul in the loop is faster than a transposed one

    def body(k, carry):
        dh_next, dc_next, buf = carry  # seed δ2 (future hidden state) and δ4 (future cell)
        t = (k if reverse else T - 1 - k).astype(jnp.uint32)
        row = lambda a: jax.lax.dynamic_slice_in_dim(a, t, 1)[0]  # noqa: E731
        dh_out, coef_t, df = row(dhs), row(buf), row(dcdh_f)
        dcdh, f = df[:, :H], df[:, H:]
        dh = dh_next + dh_out  # seed δ3 = δ1 + δ2: from the output and the next step
        dc = dc_next + dh * dcdh  # seed δ5, δ7, δ8: δ8 is a sum, not the product δ7 · δ4
        # seed δ16, δ15, δ14 = δ8 times the forget, input, candidate coefficients; δ13 = δ3 times the output's
        dz = coef_t * jnp.concatenate([dc, dc, dc, dh], axis=-1)
        # seed δ25 = δ18 + δ20 + δ22 + δ24 = dz @ W^T (the seed's δ22 uses δ16, the
        # forget delta, where the input-gate delta δ15 belongs)
        dh_prev = jnp.matmul(dz.astype(W.dtype), W_T, preferred_element_type=acc)
        dc_prev = dc * f  # seed δ11 = δ8 · f
        if mask is not None:  # padded step: the hidden state passed through untouched
            dh_prev = jnp.where(row(mask)[:, None], dh_prev, dh)
        # dz_t replaces the coefficients it was made from: after the loop, buf holds every step's dz
        buf = jax.lax.dynamic_update_slice_in_dim(buf, dz[None], t, 0)
        return dh_prev, dc_prev, buf

    carry0 = (dh_T.astype(acc), dc_T.astype(acc), coef)
    dh0, dc0, dz = jax.lax.fori_loop(0, T, body, carry0, unroll=unroll)

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
