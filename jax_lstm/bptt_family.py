"""The BPTT of the LSTM family: projection (LSTMP), peepholes and layer norm, with ``lstm``'s contract.

``jax_lstm.bptt.lstm`` comes here when ``params`` has a ``W_proj``, ``peephole``
or ``norm`` field; the equations are in ``jax_lstm.cell``. The family has its
own custom_vjp and kernels, so that the plain path of ``bptt.py`` carries none
of their terms; within them each variant is a static branch on whether its
parameters are present. The building blocks it shares with the plain LSTM
(the vmap fold's kinds, the kernels' container) come from ``bptt.py``; where
each step's entering state comes from, from ``_entering.py``.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jax_lstm import _vmap_fold as fold
from jax_lstm._entering import entering_rows as _entering_rows
from jax_lstm._sharding import make_varying, sum_over_extra_axes, varying_axes
from jax_lstm.bptt import (
    _CORE_IN,
    _CORE_OUT,
    _R0,
    _R1,
    _W,
    _contract,
    _Kernels,
    _row,
    _scan_outputs,
    _to_reset_state,
    _write_after_reads,
)
from jax_lstm.cell import LN_EPS, split_gates

__all__ = ["run_family"]


def run_family(a, reverse: bool, unroll: int, gate_fn, activation_fn):
    """(hs, h_T, c_T) of the prepared arguments ``a`` (``_inputs.Prepared``) whose params are a variant."""
    hr, cr = (None, None) if a.reset_state is None else a.reset_state
    W, U, b = a.params[:3]
    W_proj, peep, norm = a.params.W_proj, a.params.peephole, a.params.norm
    gains = (None,) * 4 if norm is None else tuple(norm)
    args = (W, U, b, W_proj, peep, *gains, a.xs, a.state0.h, a.state0.c, hr, cr, a.mask, a.resets, a.keep)
    static = _FamilyStatic(
        reverse, unroll, gate_fn, activation_fn, W_proj is not None, peep is not None, norm is not None
    )
    return _folded_family(static)(*args)


# --------------------------------------------------------------------------------------------------
# The LSTM family: projection, peepholes, layer norm (equations in ``jax_lstm.cell``). Its own
# custom_vjp and kernels, so that the plain path above carries none of their terms; within them each
# variant is a static branch on whether its parameters are present. Arguments: W, U, b, W_proj,
# peephole, gamma_x, gamma_h, gamma_c, beta_c (None where absent), then those of the plain core.


class _FamilyStatic(NamedTuple):
    reverse: bool
    unroll: int
    gate_fn: object
    activation_fn: object
    proj: bool  # W_proj present
    peep: bool  # peephole present
    norm: bool  # LayerNormParams present


_FAM_IN = (_W,) * 9 + _CORE_IN[3:]  # W, U, b, W_proj, peephole, gamma_x, gamma_h, gamma_c, beta_c, xs, h0, ...


def _family_residual_kinds(static: _FamilyStatic):
    """Kinds of the residuals (coef, dndm_f, m, cs); None for those a variant lacks."""
    return (_R1, _R1, _R1 if static.proj else None, _R1 if static.peep or static.norm else None)


@functools.cache
def _folded_family(static: _FamilyStatic):
    return fold.fold_before(lambda *args: _family_core(*args, static), _FAM_IN, _CORE_OUT)


@functools.partial(jax.custom_vjp, nondiff_argnums=(17,))
def _family_core(W, U, b, Wp, peep, gx, gh, gc, bc, xs, h0, c0, hr, cr, mask, resets, keep, static):
    return _family_kernels(static).forward(W, U, b, Wp, peep, gx, gh, gc, bc, xs, h0, c0, hr, cr, mask, resets, keep)


def _family_fwd(W, U, b, Wp, peep, gx, gh, gc, bc, xs, h0, c0, hr, cr, mask, resets, keep, static):
    args = (W, U, b, Wp, peep, gx, gh, gc, bc, xs, h0, c0, hr, cr, mask, resets, keep)
    (hs, h, c), saved = _family_kernels(static).forward_saving(*args)
    return (hs, h, c), (*args, hs, *saved)


@jax.named_scope("lstm_family_bptt_bwd")
def _family_bwd(static, res, cts):
    W, U, b, Wp, peep, gx, gh, gc, bc, xs, h0, c0, hr, cr, mask, resets, keep, hs, *saved = res
    del res
    dhs, dh_T, dc_T = cts
    grads = _family_kernels(static).backward(
        W, U, Wp, peep, gx, gh, gc, bc, xs, h0, c0, hr, cr, mask, resets, keep, hs, *saved, dhs, dh_T, dc_T
    )
    *grads, dhr, dcr = grads
    primals = (W, U, b, Wp, peep, gx, gh, gc, bc, xs, h0, c0)
    # inside shard_map a weight that is the same on every shard gets the sum of the shards' gradients
    grads = tuple(None if p is None else sum_over_extra_axes(g, p) for g, p in zip(grads, primals, strict=True))
    reset_grads = (None, None) if hr is None else (sum_over_extra_axes(dhr, hr), sum_over_extra_axes(dcr, cr))
    return (*grads, *reset_grads, None, None, None)


_family_core.defvjp(_family_fwd, _family_bwd)


@functools.cache
def _family_kernels(static: _FamilyStatic) -> _Kernels:
    """The family's three kernels for one set of static options, each folding ``jax.vmap`` into its rows."""
    opts = {"reverse": static.reverse, "unroll": static.unroll}
    fwd = functools.partial(_family_forward, gate_fn=static.gate_fn, activation_fn=static.activation_fn, **opts)
    res_kinds = _family_residual_kinds(static)
    # W, U, W_proj, peephole, 4 gains, xs, h0, c0, hr, cr, mask, resets, keep, hs, residuals, dhs, dh_T, dc_T
    bwd_in = (_W,) * 8 + (_R1, _R0, _R0, _R0, _R0, _R1, _R1, _R0, _R1, *res_kinds, _R1, _R0, _R0)
    grad_kinds = (
        _W,
        _W,
        _W,
        _W if static.proj else None,
        _W if static.peep else None,
        *((_W,) * 4 if static.norm else (None,) * 4),
        _R1,
        _R0,
        _R0,
        _R0,
        _R0,
    )
    return _Kernels(
        forward=fold.Foldable(lambda g: functools.partial(fwd, save=False), _FAM_IN, _CORE_OUT),
        forward_saving=fold.Foldable(lambda g: functools.partial(fwd, save=True), _FAM_IN, (_CORE_OUT, res_kinds)),
        backward=fold.Foldable(lambda g: functools.partial(_family_backward, groups=g, **opts), bwd_in, grad_kinds),
    )


def _with_slope(fn, z):
    """``fn(z)`` and its derivative at z: from the value for sigmoid and tanh, by forward mode otherwise."""
    if fn is jax.nn.sigmoid:
        s = fn(z)
        return s, s * (1 - s)
    if fn is jnp.tanh:
        t = fn(z)
        return t, 1 - t * t
    return jax.jvp(fn, (z,), (jnp.ones_like(z),))


def _normalized(a):
    """LN over the last axis without gain: (a - mean) * rstd, and rstd = 1 / sqrt(var + eps), (..., 1)."""
    d = a - jnp.mean(a, axis=-1, keepdims=True)
    rstd = jax.lax.rsqrt(jnp.mean(d * d, axis=-1, keepdims=True) + LN_EPS)
    return d * rstd, rstd


def _normalized_bwd(dy, y, rstd):
    """The gradient through y = LN(a) (no gain), given dy, y and rstd: rstd (dy - mean(dy) - y mean(dy y))."""
    mean = lambda v: jnp.mean(v, axis=-1, keepdims=True)  # noqa: E731
    return rstd * (dy - mean(dy) - y * mean(dy * y))


def _family_forward(
    W, U, b, Wp, peep, gx, gh, gc, bc, xs, h0, c0, hr, cr, mask, resets, keep, *, reverse, unroll, gate_fn,
    activation_fn, save,
):  # fmt: skip
    """The family's fused forward pass: (hs, h_T, c_T) and, if ``save``, the residuals.

    The residuals, each (T, B, ·) in acc dtype, beside ``hs`` (T, B, N), N = P
    projected, else H; ``coef`` reuses the buffer of ``xs @ U``:

    * always ``coef`` (4H): c_{t-1} σ'(z_f), g σ'(z_i), i φ'(z_g), φ(n_t) σ'(z_o),
      and ``dndm_f`` (2H): [o φ'(n_t) | f_t], with n_t the cell as it enters φ
      (c_t, or LN(c_t) γ_c + β_c); the plain LSTM's six blocks;
    * projection: ``m`` (H), m_t = o φ(n_t) before the projection, for dW_proj;
    * peepholes or layer norm: ``cs`` (H), c_t of the steps that ran (zero
      elsewhere), from which the backward reads c_{t-1}, c_t and LN(c_t).

    Layer norm stores nothing else: the backward loop forms x_t @ U and
    h_{t-1} @ W again (two more matmuls per step) for the backward of their
    layer norms, and writes d(x_t @ U) over the coefficients and d(h_{t-1} @ W)
    to a (T, B, 4H) buffer of its own. So per (t, b) row:
    6H + N plain, + H with a projection, + H with peepholes or layer norm,
    beside the (T, B, 4H) buffer the backward of layer norm writes
    d(h_{t-1} @ W) to. The backward needs nothing more that is T long: it
    writes each step's h_{t-1} over the ``dndm_f`` row it has read (dW's
    operand) and sums dW_proj step by step. At
    skipped steps every coefficient is zero and f_t one, as in ``_forward``.
    """
    acc = h0.dtype
    T = xs.shape[0]
    H = U.shape[1] // 4
    xp = jnp.einsum("tbd,dg->tbg", xs, U, preferred_element_type=acc)
    bias = b.astype(acc)[None, :]
    p = None if peep is None else peep.astype(acc)
    gains = None if gx is None else tuple(a.astype(acc)[None, :] for a in (gx, gh, gc, bc))
    axes = varying_axes(W, U, b, Wp, peep, gx, gh, gc, bc, xs, h0, c0, hr, cr, mask, resets, keep)
    h0, c0 = make_varying(h0, axes), make_varying(c0, axes)
    slope = _with_slope if save else (lambda fn, z: (fn(z), None))

    def cell(h, c, xp_t, m_t, r_t):
        if r_t is not None:  # a reset: the step starts from the reset state
            r = r_t[:, None]
            h, c = jnp.where(r, hr, h), jnp.where(r, cr, c)
        h_in = h if keep is None else h * keep  # recurrent dropout on h_{t-1} in h @ W only
        ah = jnp.matmul(h_in.astype(W.dtype), W, preferred_element_type=acc)
        if gains is None:
            z = xp_t + ah + bias
        else:  # layer norm of both projections, each with its own gain
            z = _normalized(xp_t)[0] * gains[0] + _normalized(ah)[0] * gains[1] + bias
        z_f, z_i, z_g, z_o = split_gates(z)
        if p is not None:  # peepholes of f and i look at c_{t-1}
            z_f, z_i = z_f + c * p[0][None, :], z_i + c * p[1][None, :]
        (f, df), (i, di), (g, dg) = slope(gate_fn, z_f), slope(gate_fn, z_i), slope(activation_fn, z_g)
        c_new = c * f + i * g
        if p is not None:  # the o gate's peephole looks at the new cell c_t
            z_o = z_o + c_new * p[2][None, :]
        o, do = slope(gate_fn, z_o)
        n = c_new if gains is None else _normalized(c_new)[0] * gains[2] + gains[3]
        phi, dphi = slope(activation_fn, n)
        m = o * phi
        out = m if Wp is None else jnp.matmul(m.astype(Wp.dtype), Wp, preferred_element_type=acc)
        h_new = out
        res = None
        if save:
            res = {
                "coef": jnp.concatenate([c * df, g * di, i * dg, phi * do], axis=-1),
                "dndm": o * dphi,
                "f": f,
                "m": m if Wp is not None else None,
                "cs": c_new if (p is not None or gains is not None) else None,
            }
        if m_t is not None:  # skipped step: state unchanged, zero output, zero local derivatives
            mk = m_t[:, None]
            c_new = jnp.where(mk, c_new, c)
            h_new = jnp.where(mk, h_new, h)
            out = jnp.where(mk, out, jnp.zeros_like(out))
            if save:
                res = {  # f = 1 passes dc through untouched
                    k: None if v is None else jnp.where(mk, v, jnp.ones_like(v) if k == "f" else jnp.zeros_like(v))
                    for k, v in res.items()
                }
        if save:
            res = (res["coef"], jnp.concatenate([res["dndm"], res["f"]], axis=-1), res["m"], res["cs"])
        return h_new, c_new, out, res

    if not save:
        return _scan_outputs(cell, h0, c0, xp, mask, resets, reverse, unroll)

    def put(buf, v, t):
        return None if buf is None else jax.lax.dynamic_update_index_in_dim(buf, v, t, 0)

    def body(k, carry):
        h, c, hs, buf, *others = carry
        t = (T - 1 - k if reverse else k).astype(jnp.uint32)
        h, c, out, (coef, *rest) = cell(h, c, _row(buf, t), _row(mask, t), _row(resets, t))
        # the coefficients are written over the row of xs @ U they were made from
        return h, c, put(hs, out, t), put(buf, coef, t), *(put(o, v, t) for o, v in zip(others, rest, strict=True))

    N = h0.shape[-1]
    like = lambda n: jnp.zeros_like(xp[..., :n])  # noqa: E731  (shaped, sharded and varying like xp)
    buffers = (
        like(N),  # hs
        xp,  # -> coef
        like(2 * H),  # dndm_f
        like(H) if Wp is not None else None,  # m
        like(H) if (p is not None or gains is not None) else None,  # cs
    )
    init = (h0, c0, *(None if a is None else make_varying(a, axes) for a in buffers))
    h, c, hs, *saved = jax.lax.fori_loop(0, T, body, init, unroll=unroll)
    return (hs, h, c), tuple(saved)


def _rows_sum(x, groups):
    """Sum of (B, k) over the rows: (k,), or per group of rows (groups, k)."""
    if groups is None:
        return x.sum(axis=0)
    return x.reshape(groups, x.shape[0] // groups, x.shape[-1]).sum(axis=1)


def _steps_sum(x, groups):
    """Sum of (T, B, k) over steps and rows: (k,), or per group of rows (groups, k)."""
    if groups is None:
        return x.sum(axis=(0, 1))
    T, B = x.shape[:2]
    return x.reshape(T, groups, B // groups, x.shape[-1]).sum(axis=(0, 2))


def _rows_outer(a, b_, dtype, acc, groups):
    """Σ_b a^T b_ of one step's rows, (B, m), (B, n) -> (m, n) in ``acc``, or per group of rows (groups, m, n)."""
    a, b_ = a.astype(dtype), b_.astype(dtype)
    if groups is None:
        return jax.lax.dot_general(a, b_, (((0,), (0,)), ((), ())), preferred_element_type=acc)
    split = lambda v: v.reshape(groups, v.shape[0] // groups, v.shape[-1])  # noqa: E731
    return jnp.einsum("nbm,nbk->nmk", split(a), split(b_), preferred_element_type=acc)


def _weight_grad(a, b_, like, acc, groups):
    """Σ_{t,b} a^T b in ``like``'s dtype, accumulated in ``acc``: (m, n), or per group (groups, m, n)."""
    a, b_ = a.astype(like.dtype), b_.astype(like.dtype)
    if groups is None:
        return _contract(a, b_, like, acc).astype(like.dtype)
    T, B = a.shape[:2]
    split = lambda v: v.reshape(T, groups, B // groups, v.shape[-1])  # noqa: E731
    return jnp.einsum("tnbm,tnbk->nmk", split(a), split(b_), preferred_element_type=acc).astype(like.dtype)


def _family_backward(
    W, U, Wp, peep, gx, gh, gc, bc, xs, h0, c0, hr, cr, mask, resets, keep, hs, coef, dndm_f, m, cs,
    dhs, dh_T, dc_T, *, reverse, unroll, groups,
):  # fmt: skip
    """The family's hand-written BPTT. Returns the gradients of W, U, b, W_proj, peephole, the four
    layer-norm arrays (None where absent), xs, h0, c0, hr, cr; ``groups``: weight gradients per group
    of rows (examples under ``jax.vmap``), each (groups, ...)."""
    acc = h0.dtype
    T = xs.shape[0]
    H = U.shape[1] // 4
    axes = varying_axes(W, U, Wp, peep, gx, xs, h0, c0, mask, resets, keep, coef, dndm_f, m, cs, dhs, dh_T)
    p = None if peep is None else peep.astype(acc)
    gains = None if gx is None else tuple(a.astype(acc)[None, :] for a in (gx, gh, gc, bc))
    W_T = W.T  # (4H, N), transposed once
    Wp_T = None if Wp is None else Wp.T  # (P, H)
    zero_sum = lambda n: jnp.zeros((n,) if groups is None else (groups, n), acc)  # noqa: E731
    entering = _entering_rows(T, mask, resets, reverse)  # where each step's entering state comes from

    N = hs.shape[-1]

    def body(k, carry):
        dh_next, dc_next, dhr, dcr, buf, hbuf, da_buf, sums = carry  # from the next step: seed δ2, δ4
        t = (k if reverse else T - 1 - k).astype(jnp.uint32)
        row = lambda a: jax.lax.dynamic_index_in_dim(a, t, keepdims=False)  # noqa: E731
        coef_t, df = row(buf), row(hbuf)
        cf, ci, cg, co = split_gates(coef_t)
        dndm, f = df[:, :H], df[:, H:]
        h_prev = entering(hs, h0, hr, t)  # h_{t-1} as step t saw it
        dh = dh_next + row(dhs)  # seed δ3 = δ1 + δ2, as in the plain backward
        if Wp is not None:  # projection: h_t = m_t @ W_proj, so dm_t = dh_t @ W_proj^T and dW_proj += m_t^T dh_t
            # (summed here, step by step: no (T, B, P) buffer of every dh_t)
            sums = {**sums, "Wp": sums["Wp"] + _rows_outer(row(m), dh, Wp.dtype, acc, groups)}
            dm = jnp.matmul(dh.astype(Wp.dtype), Wp_T, preferred_element_type=acc)
        else:
            dm = dh
        dn = dm * dndm  # through m = o φ(n): seed δ5, δ7 with n in place of c
        if gains is not None:  # through n = LN(c_t) γ_c + β_c: the cell's layer-norm backward
            chat, rstd_c = _normalized(row(cs))
            sums = {**sums, "gc": sums["gc"] + _rows_sum(dn * chat, groups), "bc": sums["bc"] + _rows_sum(dn, groups)}
            dn = _normalized_bwd(dn * gains[2], chat, rstd_c)
        dz_o = dm * co  # seed δ6, δ13 with dm in place of δ3
        dc = dc_next + dn  # seed δ8 (a sum)
        if p is not None:  # peephole: z_o = ... + c_t p_o, so c_t also feeds the o gate
            dc = dc + dz_o * p[2][None, :]
        dz_f, dz_i, dz_g = dc * cf, dc * ci, dc * cg  # seed δ16, δ15, δ14
        dz = jnp.concatenate([dz_f, dz_i, dz_g, dz_o], axis=-1)
        dc_prev = dc * f  # seed δ11
        if p is not None:  # peepholes: z_f, z_i = ... + c_{t-1} p_f, c_{t-1} p_i; dp sums the deltas times the
            # cell each gate looked at
            c_prev = entering(cs, c0, cr, t)
            dc_prev = dc_prev + dz_f * p[0][None, :] + dz_i * p[1][None, :]
            sums = {
                **sums,
                "pf": sums["pf"] + _rows_sum(dz_f * c_prev, groups),
                "pi": sums["pi"] + _rows_sum(dz_i * c_prev, groups),
                "po": sums["po"] + _rows_sum(dz_o * row(cs), groups),
            }
        if gains is not None:  # z = LN(x_t U) γ_x + LN(h_{t-1} W) γ_h + b: both products formed again here
            # (one matmul each), then LN's backward; d(x_t U) replaces dz in buf, d(h_{t-1} W) goes to da_buf
            x_t = row(xs) if mask is None else jnp.where(row(mask)[:, None], row(xs), jnp.zeros_like(row(xs)))
            xhat, rstd_x = _normalized(jnp.matmul(x_t.astype(U.dtype), U, preferred_element_type=acc))
            h_in = h_prev if keep is None else h_prev * keep
            hhat, rstd_h = _normalized(jnp.matmul(h_in.astype(W.dtype), W, preferred_element_type=acc))
            sums = {
                **sums,
                "gx": sums["gx"] + _rows_sum(dz * xhat, groups),
                "gh": sums["gh"] + _rows_sum(dz * hhat, groups),
                "b": sums["b"] + _rows_sum(dz, groups),
            }
            da = _normalized_bwd(dz * gains[1], hhat, rstd_h)
            da_buf = jax.lax.dynamic_update_index_in_dim(da_buf, da, t, 0)
            dz = _normalized_bwd(dz * gains[0], xhat, rstd_x)
        else:
            da = dz
        dh_prev = jnp.matmul(da.astype(W.dtype), W_T, preferred_element_type=acc)  # seed δ25 (corrected)
        if keep is not None:  # recurrent dropout: h_{t-1} entered h @ W as h_{t-1} * keep
            dh_prev = dh_prev * keep
        if mask is not None:  # skipped step: the hidden state passed through untouched
            dh_prev = jnp.where(row(mask)[:, None], dh_prev, dh_next)
        if resets is not None:  # a reset: what reached the entering state belongs to the reset state
            dh_prev, dc_prev, dhr, dcr = _to_reset_state(row(resets), dh_prev, dc_prev, dhr, dcr)
        buf = jax.lax.dynamic_update_index_in_dim(buf, dz, t, 0)  # dz_t (or d(x_t U)) replaces its coefficients
        # h_{t-1} over the row of [dn/dm | f] just read, as in the plain ``_deltas`` (dW's h_{t-1} then needs no
        # (T, B, N) buffer of its own), after every read of that row: each feeds dc_prev, dz_f, dz_i, dz_g or
        # (layer norm) the sums of the cell's gain and bias
        read = dc_prev + dz_f + dz_i + dz_g
        if gains is not None:  # (H,), or (groups, H) under vmap: one row per group, repeated over its rows
            cell_sums = (sums["gc"] + sums["bc"]).reshape(-1, H)
            read = read + jnp.repeat(cell_sums, read.shape[0] // cell_sums.shape[0], axis=0)
        hbuf = _write_after_reads(hbuf, h_prev, t, H, read)
        return dh_prev, dc_prev, dhr, dcr, buf, hbuf, da_buf, sums

    sums0 = {}
    if gains is not None:
        sums0.update(gx=zero_sum(4 * H), gh=zero_sum(4 * H), b=zero_sum(4 * H), gc=zero_sum(H), bc=zero_sum(H))
    if p is not None:
        sums0.update(pf=zero_sum(H), pi=zero_sum(H), po=zero_sum(H))
    if Wp is not None:
        sums0["Wp"] = jnp.zeros(Wp.shape if groups is None else (groups, *Wp.shape), acc)
    dhs = dhs.astype(acc)
    dh_T, dc_T = dh_T.astype(acc), dc_T.astype(acc)
    da0 = None if gains is None else jnp.zeros_like(coef)
    carry0 = (dh_T, dc_T, jnp.zeros_like(dh_T), jnp.zeros_like(dc_T), coef, dndm_f, da0, sums0)
    carry0 = jax.tree.map(lambda a: make_varying(a, axes), carry0)
    dh0, dc0, dhr, dcr, da_x, hbuf, da_h, sums = jax.lax.fori_loop(0, T, body, carry0, unroll=unroll)
    # without layer norm both products' gradients are dz itself: d(x_t U) = d(h_{t-1} W) = dz
    da_h = da_x if gains is None else da_h
    db = _steps_sum(da_x, groups) if gains is None else sums["b"]
    dgains = (None,) * 4 if gains is None else (sums["gx"], sums["gh"], sums["gc"], sums["bc"])
    x_in = xs if mask is None else jnp.where(mask[..., None], xs, jnp.zeros_like(xs))
    dxs = jnp.einsum("tbg,dg->tbd", da_x.astype(U.dtype), U, preferred_element_type=acc)  # seed δ26 (corrected)
    h_in = hbuf[..., H : H + N]  # every step's h_{t-1}, written by the loop
    h_in = h_in if keep is None else h_in * keep[None]
    dW = _weight_grad(h_in, da_h, W, acc, groups)  # seed δW = Σ_t h_{t-1}^T δ13..16
    dU = _weight_grad(x_in, da_x, U, acc, groups)  # seed δU = Σ_t x_t^T δ13..16
    db = db.astype(W.dtype)
    dWp = None if Wp is None else sums["Wp"].astype(Wp.dtype)  # h_t = m_t W_proj
    dpeep = None
    if p is not None:
        dpeep = jnp.stack([sums["pf"], sums["pi"], sums["po"]], axis=-2).astype(peep.dtype)
    dgains = tuple(None if g is None else g.astype(a.dtype) for g, a in zip(dgains, (gx, gh, gc, bc), strict=True))
    dtype = h0.dtype if hr is None else hr.dtype
    return (
        dW,
        dU,
        db,
        dWp,
        dpeep,
        *dgains,
        dxs.astype(xs.dtype),
        dh0.astype(h0.dtype),
        dc0.astype(c0.dtype),
        dhr.astype(dtype),
        dcr.astype(cr.dtype if cr is not None else c0.dtype),
    )

