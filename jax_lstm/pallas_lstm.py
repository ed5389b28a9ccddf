"""``lstm_pallas``: the LSTM layer as one fused Pallas (Triton) kernel per direction of the pass.

Same contract and values as ``lstm`` for the sizes one thread block holds: the
forward pass over all T steps is one kernel launch, and so is the hand-written
backward pass (a ``jax.custom_vjp``); the matmuls over all steps at once
(``xs @ U`` before, ``dW``, ``dU``, ``db`` and ``dxs`` after) stay XLA's.

* forward kernel: a grid over blocks of batch rows; each program keeps the four
  (H, H) gate blocks of ``W`` and its rows' ``h``, ``c`` on chip and loops over
  the steps: four ``h @ W_k`` products, the gate math, the cell update, any
  reset, recurrent-dropout mask or skipped step; with residuals it stores the
  gate activations, the ``c`` and the ``h @ W`` operand each step entered with;
* backward kernel: the same grid, the loop reversed: the gate deltas ``dz_t``
  from the activations, ``dh_{t-1} = Σ_k dz_k W_k^T``, ``dc_{t-1} = dc f``,
  the passing of a skipped step and the cut of a reset; it stores every ``dz_t``.

The equations are ``lstm``'s (``jax_lstm.bptt``, ``jax_lstm.cell``): see there.
Only the standard activations (sigmoid gates, tanh) are fused.

Sizes: ``W`` must fit one thread block's shared memory with room to spare:
``4 Hp² · itemsize(W) <= 128 KiB`` with Hp = H rounded up to a power of two (at
least 16), that is H <= 64 in float32 and H <= 128 in bfloat16; larger H is
refused at trace time (use ``lstm``). Batch rows are padded to a multiple of
``block_b`` and hidden units to Hp with zeros, which change no value.

On the CPU the kernels run only in Pallas's interpret mode (``interpret=True``),
which is how the tests check them; ``lstm`` never dispatches here by itself.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from jax_lstm._inputs import prepare
from jax_lstm.cell import LSTMState

__all__ = ["lstm_pallas", "fits", "MAX_W_BYTES"]

MAX_W_BYTES = 128 * 1024  # the four gate blocks of W held by one thread block


def _padded(H: int) -> int:
    return max(16, 1 << (int(H) - 1).bit_length())


def fits(hidden_size: int, dtype) -> bool:
    """Whether ``lstm_pallas`` takes hidden size ``hidden_size`` with weights of ``dtype``."""
    return 4 * _padded(hidden_size) ** 2 * jnp.dtype(dtype).itemsize <= MAX_W_BYTES


def lstm_pallas(
    params,
    xs,
    state0=None,
    *,
    seq_lengths=None,
    mask=None,
    resets=None,
    reset_state=None,
    recurrent_dropout=0.0,
    key=None,
    reverse=False,
    time_major=True,
    precision=None,
    block_b=16,
    num_warps=None,
    interpret=False,
):
    """Run an LSTM layer over a sequence as one fused kernel; gradients by a hand-written fused BPTT.

    Args:
      params, xs, state0, seq_lengths, mask, resets, reset_state,
      recurrent_dropout, key, reverse, time_major: as in ``jax_lstm.lstm``.
      precision: of the in-kernel matmuls (``jax.lax.Precision``); None is the
        platform's default (TF32 for float32 on a GPU). ``HIGHEST`` gives full
        float32 products.
      block_b: batch rows per program (a power of two, at least 16).
      num_warps: warps per program (Triton); None: 4 for Hp <= 32, else 8 (with 4, bfloat16 H = 128
        spills registers).
      interpret: run the kernels in Pallas's interpret mode (required on the CPU).

    Returns:
      ``(hs, LSTMState(h, c))`` as ``lstm`` returns them.

    Raises:
      ValueError: at trace time, for the arguments ``lstm`` refuses, and where
        H does not fit one thread block (see ``fits``) or ``block_b`` is not a
        power of two of at least 16.
    """
    a = prepare(
        params,
        xs,
        state0,
        seq_lengths=seq_lengths,
        mask=mask,
        resets=resets,
        reset_state=reset_state,
        recurrent_dropout=recurrent_dropout,
        key=key,
        time_major=time_major,
    )
    W = a.params.W
    H = W.shape[0]
    if not fits(H, W.dtype):
        need = 4 * _padded(H) ** 2 * W.dtype.itemsize
        raise ValueError(
            f"lstm_pallas keeps W in one thread block: hidden size H = {H} in {W.dtype} needs {need} bytes "
            f"(H padded to {_padded(H)}), over {MAX_W_BYTES}; it takes H <= 64 in float32 and H <= 128 in "
            "bfloat16. Use jax_lstm.lstm for larger H"
        )
    if block_b < 16 or block_b & (block_b - 1):
        raise ValueError(f"block_b must be a power of two of at least 16, got {block_b}")
    dtype = a.dtype
    if a.xs.shape[0] == 0:
        hs = jnp.zeros((0, a.xs.shape[1], H), dtype)
        h, c = a.state0
    else:
        warps = (4 if _padded(H) <= 32 else 8) if num_warps is None else int(num_warps)
        static = _Static(bool(reverse), precision, int(block_b), warps, bool(interpret))
        hr, cr = (None, None) if a.reset_state is None else a.reset_state
        hs, h, c = _core(*a.params, a.xs, *a.state0, hr, cr, a.mask, a.resets, a.keep, static)
    hs = hs.astype(dtype)
    return (hs if time_major else jnp.swapaxes(hs, 0, 1)), LSTMState(h.astype(dtype), c.astype(dtype))


class _Static(NamedTuple):
    reverse: bool
    precision: object
    block_b: int
    num_warps: int
    interpret: bool


# --------------------------------------------------------------------------------------------------
# The custom_vjp. Arguments: W, U, b, xs, h0, c0, the reset state hr, cr, mask, resets, keep (the
# last five may be None), and the static options.


@functools.partial(jax.custom_vjp, nondiff_argnums=(11,))
def _core(W, U, b, xs, h0, c0, hr, cr, mask, resets, keep, static):
    return _fwd(W, U, b, xs, h0, c0, hr, cr, mask, resets, keep, static, save=False)[0]


def _fwd(W, U, b, xs, h0, c0, hr, cr, mask, resets, keep, static, save=True):
    acc = h0.dtype
    T, B, _ = xs.shape
    H = W.shape[0]
    P = _Pad(B, H, static.block_b)
    # x_t @ U + b for every step at once, (T, B, 4H), then gate-major and padded: (T, 4, Bp, Hp)
    xp = jnp.einsum("tbd,dg->tbg", xs, U, preferred_element_type=acc) + b.astype(acc)[None, None, :]
    flags = _flags(P, mask, resets, acc)
    extra = (P.rows(hr), P.rows(cr)) if hr is not None else ()
    extra += flags + ((P.rows(keep),) if keep is not None else ())
    call = _forward_call(P, T, acc, static, hr is not None, mask is not None, keep is not None, save)
    hs, h, c, *saved = call(P.gates_w(W), P.gates(xp), P.rows(h0), P.rows(c0), *extra)
    out = (P.unpad_seq(hs), P.unpad(h), P.unpad(c))
    if not save:
        return out, None
    acts, c_in, h_in = saved
    return out, (W, U, xs, h0, c0, hr, mask, resets, keep, acts, c_in, P.unpad_seq(h_in))


def _bwd(static, res, cts):
    W, U, xs, h0, c0, hr, mask, resets, keep, acts, c_in, h_in = res
    del res
    dhs, dh_T, dc_T = cts
    acc = h0.dtype
    T, B, _ = xs.shape
    H = W.shape[0]
    P = _Pad(B, H, static.block_b)
    flags = _flags(P, mask, resets, acc)
    extra = flags + ((P.rows(keep),) if keep is not None else ())
    call = _backward_call(P, T, acc, static, resets is not None, mask is not None, keep is not None)
    dz, dh0, dc0, dhr, dcr = call(
        P.gates_w(W), acts, c_in, P.seq(dhs.astype(acc)), P.rows(dh_T.astype(acc)), P.rows(dc_T.astype(acc)), *extra
    )
    dz = P.ungates(dz)  # (T, B, 4H)
    x_in = xs if mask is None else jnp.where(mask[..., None], xs, jnp.zeros_like(xs))  # no NaN * 0 from skipped x_t
    rows = lambda a: a.reshape(T * B, a.shape[-1])  # noqa: E731
    contract = lambda p, q, like: jax.lax.dot_general(  # noqa: E731
        rows(p.astype(like.dtype)), rows(q.astype(like.dtype)), (((0,), (0,)), ((), ())), preferred_element_type=acc
    ).astype(like.dtype)
    dW, dU = contract(h_in, dz, W), contract(x_in, dz, U)
    db = dz.sum(axis=(0, 1)).astype(W.dtype)
    dxs = jnp.einsum("tbg,dg->tbd", dz.astype(U.dtype), U, preferred_element_type=acc).astype(xs.dtype)
    if hr is None:
        reset_grads = (None, None)
    else:
        reset_grads = (P.unpad(dhr).astype(hr.dtype), P.unpad(dcr).astype(hr.dtype))
    return (
        dW,
        dU,
        db,
        dxs,
        P.unpad(dh0).astype(h0.dtype),
        P.unpad(dc0).astype(c0.dtype),
        *reset_grads,
        None,
        None,
        None,
    )


_core.defvjp(_fwd, _bwd)


# --------------------------------------------------------------------------------------------------
# Padding: batch rows to a multiple of the block, hidden units to a power of two, gates gate-major.


class _Pad(NamedTuple):
    B: int
    H: int
    block_b: int

    @property
    def Bp(self) -> int:
        return math.ceil(self.B / self.block_b) * self.block_b

    @property
    def Hp(self) -> int:
        return _padded(self.H)

    def rows(self, a):  # (B, H) -> (Bp, Hp)
        return jnp.pad(a, ((0, self.Bp - self.B), (0, self.Hp - self.H)))

    def seq(self, a):  # (T, B, H) -> (T, Bp, Hp)
        return jnp.pad(a, ((0, 0), (0, self.Bp - self.B), (0, self.Hp - self.H)))

    def gates(self, a):  # (T, B, 4H) -> (T, 4, Bp, Hp)
        T = a.shape[0]
        a = a.reshape(T, self.B, 4, self.H)
        a = jnp.pad(a, ((0, 0), (0, self.Bp - self.B), (0, 0), (0, self.Hp - self.H)))
        return jnp.transpose(a, (0, 2, 1, 3))

    def gates_w(self, W):  # (H, 4H) -> (4, Hp, Hp): W_k = W[:, kH:(k+1)H]
        W = jnp.transpose(W.reshape(self.H, 4, self.H), (1, 0, 2))
        return jnp.pad(W, ((0, 0), (0, self.Hp - self.H), (0, self.Hp - self.H)))

    def unpad(self, a):  # (Bp, Hp) -> (B, H)
        return a[: self.B, : self.H]

    def unpad_seq(self, a):  # (T, Bp, Hp) -> (T, B, H)
        return a[:, : self.B, : self.H]

    def ungates(self, a):  # (T, 4, Bp, Hp) -> (T, B, 4H)
        a = jnp.transpose(a[:, :, : self.B, : self.H], (0, 2, 1, 3))
        return a.reshape(a.shape[0], self.B, 4 * self.H)


def _flags(P: _Pad, mask, resets, acc):
    """The step flags as 0/1 floats (T, Bp): padded rows are skipped, never reset."""
    out = ()
    for flag in (mask, resets):
        if flag is not None:
            out += (jnp.pad(flag.astype(acc), ((0, 0), (0, P.Bp - P.B))),)
    return out


# --------------------------------------------------------------------------------------------------
# The kernels. Each program owns block_b batch rows; every ref is indexed by a scalar step t and
# the gate k, so each load and store is one (block_b, Hp) tile.


def _specs(P: _Pad, T: int, kinds: str):
    """BlockSpecs by kind: w (4, Hp, Hp) whole, r rows (bb, Hp), s steps (T, bb, Hp), g gates
    (T, 4, bb, Hp), f flags (T, bb)."""
    bb, Hp = P.block_b, P.Hp
    table = {
        "w": pl.BlockSpec((4, Hp, Hp), lambda i: (0, 0, 0)),
        "r": pl.BlockSpec((bb, Hp), lambda i: (i, 0)),
        "s": pl.BlockSpec((T, bb, Hp), lambda i: (0, i, 0)),
        "g": pl.BlockSpec((T, 4, bb, Hp), lambda i: (0, 0, i, 0)),
        "f": pl.BlockSpec((T, bb), lambda i: (0, i)),
    }
    return [table[k] for k in kinds]


def _shapes(P: _Pad, T: int, kinds: str, dtype):
    table = {"r": (P.Bp, P.Hp), "s": (T, P.Bp, P.Hp), "g": (T, 4, P.Bp, P.Hp)}
    return [jax.ShapeDtypeStruct(table[k], dtype) for k in kinds]


def _launch(kernel, P, T, ins, outs, acc, name, static):
    """One ``pallas_call`` of ``kernel`` over the batch blocks, with the specs of ``ins`` and ``outs``."""
    return pl.pallas_call(
        kernel,
        grid=(P.Bp // P.block_b,),
        in_specs=_specs(P, T, ins),
        out_specs=_specs(P, T, outs),
        out_shape=_shapes(P, T, outs, acc),
        name=name,
        **_params(static),
    )


def _params(static: _Static):
    if static.interpret:
        return {"interpret": True}
    from jax.experimental.pallas import triton as plt

    return {"compiler_params": plt.CompilerParams(num_warps=static.num_warps, num_stages=1)}


def _dot(a, b, dims, precision, acc):
    """a @ b contracting a's axis dims[0] with b's axis dims[1], accumulated in ``acc``."""
    return jax.lax.dot_general(
        a, b, (((dims[0],), (dims[1],)), ((), ())), precision=precision, preferred_element_type=acc
    )


def _forward_call(P: _Pad, T: int, acc, static: _Static, has_reset: bool, has_mask: bool, has_keep: bool, save: bool):
    """The forward kernel as a function of (W4, xp, h0, c0[, hr, cr][, mask][, resets][, keep]) ->
    (hs, h_T, c_T) and, if ``save``, the residuals (acts, c_in, h_in)."""
    ins = (
        "wgrr"
        + ("rr" if has_reset else "")
        + ("f" if has_mask else "")
        + ("f" if has_reset else "")
        + ("r" if has_keep else "")
    )
    outs = "srrgss" if save else "srr"
    prec = static.precision

    def kernel(*refs):
        w_ref, xp_ref, h0_ref, c0_ref, *rest = refs[: len(ins)]
        hs_ref, hT_ref, cT_ref, *saved = refs[len(ins) :]
        hr = cr = m_ref = r_ref = keep = None
        if has_reset:
            hr, cr, *rest = rest
            hr, cr = hr[...], cr[...]
        if has_mask:
            m_ref, *rest = rest
        if has_reset:
            r_ref, *rest = rest
        if has_keep:
            keep = rest[0][...]
        Wk = [w_ref[k] for k in range(4)]

        def body(n, carry):
            h, c = carry
            t = T - 1 - n if static.reverse else n
            if has_reset:  # a reset: the step starts from the reset state
                r = r_ref[t][:, None] > 0
                h, c = jnp.where(r, hr, h), jnp.where(r, cr, c)
            h_in = h if keep is None else h * keep  # recurrent dropout on h_{t-1} in h @ W only
            h_mm = h_in.astype(Wk[0].dtype)
            z = [xp_ref[t, k] + _dot(h_mm, Wk[k], (1, 0), prec, acc) for k in range(4)]
            f, i, o = jax.nn.sigmoid(z[0]), jax.nn.sigmoid(z[1]), jax.nn.sigmoid(z[3])
            g = jnp.tanh(z[2])
            c_new = f * c + i * g
            h_new = o * jnp.tanh(c_new)
            out = h_new
            if has_mask:  # skipped step: state unchanged, zero output
                m = m_ref[t][:, None] > 0
                c_new, h_new = jnp.where(m, c_new, c), jnp.where(m, h_new, h)
                out = jnp.where(m, out, jnp.zeros_like(out))
            hs_ref[t] = out
            if save:  # the residuals: activations, and the c and h @ W operand the step entered with
                acts_ref, cin_ref, hin_ref = saved
                for k, act in enumerate((f, i, g, o)):
                    acts_ref[t, k] = act
                cin_ref[t] = c
                hin_ref[t] = h_in
            return h_new, c_new

        h, c = jax.lax.fori_loop(0, T, body, (h0_ref[...], c0_ref[...]))
        hT_ref[...] = h
        cT_ref[...] = c

    return _launch(kernel, P, T, ins, outs, acc, "lstm_pallas_fwd", static)


def _backward_call(P: _Pad, T: int, acc, static: _Static, has_reset: bool, has_mask: bool, has_keep: bool):
    """The backward kernel as a function of (W4, acts, c_in, dhs, dh_T, dc_T[, mask][, resets][, keep]) ->
    (dz, dh0, dc0, dhr, dcr)."""
    ins = "wgssrr" + ("f" if has_mask else "") + ("f" if has_reset else "") + ("r" if has_keep else "")
    outs = "grrrr"
    prec = static.precision

    def kernel(*refs):
        w_ref, acts_ref, cin_ref, dhs_ref, dhT_ref, dcT_ref, *rest = refs[: len(ins)]
        dz_ref, dh0_ref, dc0_ref, dhr_ref, dcr_ref = refs[len(ins) :]
        m_ref = r_ref = keep = None
        if has_mask:
            m_ref, *rest = rest
        if has_reset:
            r_ref, *rest = rest
        if has_keep:
            keep = rest[0][...]
        Wk = [w_ref[k] for k in range(4)]

        def body(n, carry):
            dh_next, dc_next, dhr, dcr = carry  # from the output and the next step
            t = n if static.reverse else T - 1 - n
            f, i, g, o = (acts_ref[t, k] for k in range(4))
            c = cin_ref[t]
            tc = jnp.tanh(f * c + i * g)  # tanh(c_t), recomputed
            dh = dh_next + dhs_ref[t]
            dc = dc_next + dh * o * (1 - tc * tc)  # through h = o * tanh(c)
            dz = [
                dc * c * f * (1 - f),  # forget
                dc * g * i * (1 - i),  # input
                dc * i * (1 - g * g),  # candidate
                dh * tc * o * (1 - o),  # output
            ]
            if has_mask:  # skipped step: no delta, and the state's gradient passes through untouched
                m = m_ref[t][:, None] > 0
                dz = [jnp.where(m, d, jnp.zeros_like(d)) for d in dz]
            dz_mm = [d.astype(Wk[0].dtype) for d in dz]
            dh_prev = sum(_dot(dz_mm[k], Wk[k], (1, 1), prec, acc) for k in range(4))  # dz_k W_k^T
            if keep is not None:  # h_{t-1} entered h @ W as h_{t-1} * keep
                dh_prev = dh_prev * keep
            dc_prev = dc * f
            if has_mask:
                dh_prev, dc_prev = jnp.where(m, dh_prev, dh_next), jnp.where(m, dc_prev, dc_next)
            if has_reset:  # a reset: what reached the entering state belongs to the reset state
                r = r_ref[t][:, None] > 0
                zero = jnp.zeros_like(dh_prev)
                dhr, dcr = dhr + jnp.where(r, dh_prev, zero), dcr + jnp.where(r, dc_prev, zero)
                dh_prev, dc_prev = jnp.where(r, zero, dh_prev), jnp.where(r, zero, dc_prev)
            for k in range(4):
                dz_ref[t, k] = dz[k]
            return dh_prev, dc_prev, dhr, dcr

        zeros = jnp.zeros(dhT_ref.shape, acc)
        dh0, dc0, dhr, dcr = jax.lax.fori_loop(0, T, body, (dhT_ref[...], dcT_ref[...], zeros, zeros))
        dh0_ref[...] = dh0
        dc0_ref[...] = dc0
        dhr_ref[...] = dhr
        dcr_ref[...] = dcr

    return _launch(kernel, P, T, ins, outs, acc, "lstm_pallas_bwd", static)
