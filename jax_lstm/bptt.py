"""``lstm``: the LSTM layer whose gradient is hand-written backpropagation through time.

Same contract and values as ``lstm_ref``; the gradient comes from ``_backward``,
registered with ``jax.custom_vjp``. Read top to bottom: ``lstm``, the
custom_vjp (``_lstm_core`` with ``_lstm_fwd`` and ``_lstm_bwd``), the forward
kernel ``_forward`` and the backward ``_backward`` with its helpers.

* forward: ``xs @ U`` for all steps is one matmul outside the loop; inside, one
  matmul ``h @ W`` for all four gates, the gate math and the cell update.
  While the step has every operand at hand it also computes the local
  derivatives the backward needs, and writes them over the row of ``xs @ U``
  it has just consumed;
* backward: a loop whose body is one element-wise pass (the gate deltas
  ``dz_t``), one matmul ``dh_{t-1} = dz_t @ W^T``, the write of ``dz_t``
  over the coefficients it was made from and of h_{t-1} (``dW``'s operand)
  over the ``[dc/dh | f]`` row it has read; ``dW``, ``dU``, ``db`` and ``dxs``
  are then single matmuls over all steps at once.

A step ``mask``, ``resets`` of the state and variational recurrent dropout on
h_{t-1} cost one ``where`` or one multiply per step; their terms are named
where they enter the backward. The comments name the rule of the seed document
(``shared/seed/lstm_units.md``, δ1…δ26) each line implements, and where the
seed's rule is wrong.

Under ``jax.vmap`` the mapped axis is folded into the batch rows
(``jax_lstm._vmap_fold``); the kernels below are plain functions of arrays
that know nothing of it.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jax_lstm import _vmap_fold as fold
from jax_lstm._entering import entering_rows as _entering_rows
from jax_lstm._inputs import prepare
from jax_lstm._sharding import make_varying, on_explicit_mesh, sum_over_extra_axes, varying_axes, weight_sharding
from jax_lstm.cell import (
    LSTMState,
    activation_derivative,
    cell_update,
    gate_activations,
    gate_derivatives,
    hidden_out_size,
    is_default,
    is_plain,
    split_gates,
)

__all__ = ["lstm"]


def lstm(
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
    unroll=1,
    time_major=True,
    gate_fn=jax.nn.sigmoid,
    activation_fn=jnp.tanh,
    impl="scan",
):
    """Run an LSTM layer over a sequence; gradients by hand-written BPTT.

    Args:
      params: ``LSTMParams`` with W: (H, 4H), U: (D, 4H), b: (4H,), gate
        blocks [f | i | g | o].
      xs: (T, B, D) inputs, time-major; (B, T, D) with ``time_major=False``.
      state0: ``LSTMState`` with h, c: (B, H); None means zeros.
      seq_lengths: optional (B,) integer array, 0 <= seq_lengths[b] <= T. Steps
        t >= seq_lengths[b] are padding: zero output, unchanged state, zero
        input gradient. Concrete lengths outside [0, T] raise ``ValueError``;
        under ``jit``, where their values are unknown, they act as clamped to
        [0, T]. Any integer dtype is exact for any T.
      mask: optional (T, B) bool ((B, T) with ``time_major=False``). A step
        where it is False is skipped: the state is unchanged, the output is
        zero and its input gets zero gradient. Any pattern; with
        ``seq_lengths`` too, a step runs only where both allow it.
      resets: optional (T, B) bool (same layout rule). Where True the state is
        set to ``reset_state`` just before step t is visited, whether or not
        step t is masked. No gradient crosses a reset.
      reset_state: ``LSTMState`` with h, c: (B, H) that a reset restores; None
        means zeros. ``state0`` is only the state before the first visited
        step: its gradient comes from the start alone, and ``reset_state``'s
        sums over every reset. ``reset_state=state0`` restores the start.
      recurrent_dropout: rate p of variational dropout (Gal & Ghahramani, 2016)
        on h_{t-1}: one (B, H) mask per sequence,
        ``keep = jax.random.bernoulli(key, 1 - p, (B, H))``, the same at every
        step and for all four gates, kept units scaled by 1 / (1 - p). It
        applies to h_{t-1} in ``h_{t-1} @ W`` only; the state carried to the
        next step and the output are not dropped. A Python float in [0, 1).
      key: PRNG key for the dropout mask; required when ``recurrent_dropout > 0``.
      reverse: visit the steps from T-1 down to 0 (skipping masked ones): with
        ``seq_lengths`` each sequence runs from its last valid step down to
        step 0; ``hs`` stays aligned with ``xs``.
      unroll: unroll factor of the forward and backward loops; changes speed, not values.
      time_major: False for batch-major ``xs`` (B, T, D), ``hs`` (B, T, H),
        ``mask`` and ``resets`` (B, T); states and lengths are the same either way.
      gate_fn: element-wise activation of the f, i and o gates (static; default
        sigmoid). The backward evaluates its derivative at the pre-activations.
      activation_fn: element-wise activation of the candidate g and of c_t in
        h_t = o * activation_fn(c_t) (static; default tanh).
      impl: ``"scan"`` (default: the loops below, on any platform) or ``"pallas"``:
        ``jax_lstm.pallas_lstm.lstm_pallas``, one fused kernel per direction, on a GPU only, for
        float32 H <= 64 and bfloat16 H <= 128 with the default activations (``unroll`` is
        ignored). Nothing picks ``"pallas"`` by itself; on the CPU it fails to lower.

    Returns:
      ``(hs, LSTMState(h, c))`` with hs: (T, B, H) ((B, T, H) batch-major), h, c: (B, H).

    Dtypes: params and xs are brought to their common dtype, which is the
    dtype of the outputs (float32 params with float64 xs give float64
    outputs); ``state0`` is cast to the compute dtype (a float64 state0 with
    float32 params and xs gives float32 outputs). float32 and float64 compute
    everything in that dtype. For bfloat16 (or float16) the matmuls take
    16-bit operands and accumulate in float32, gate math, the cell state and
    the carried h stay float32, and the outputs are cast back to the input
    dtype; gradients are returned in each argument's own dtype.

    Memory: the residuals are six (T, B, H) blocks (see ``_forward``) beside
    ``hs``; the documentation's Performance page has the measured figures.

    Raises:
      ValueError, TypeError: at trace time, naming the bad argument and the
        shapes involved.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> import jax_lstm as jl
      >>> params = jl.init_params(jax.random.PRNGKey(0), input_size=3, hidden_size=4)
      >>> xs = jnp.ones((5, 2, 3))                                  # (T, B, D)
      >>> hs, state = jl.lstm(params, xs, seq_lengths=jnp.array([5, 2]))
      >>> hs.shape, state.h.shape                                   # (T, B, H), (B, H)
      ((5, 2, 4), (2, 4))
      >>> grads = jax.grad(lambda p: jnp.sum(jl.lstm(p, xs)[0] ** 2))(params)   # the hand-written BPTT
      >>> grads.W.shape
      (4, 16)
    """
    if impl != "scan":
        return _other_impl(
            impl,
            params,
            xs,
            state0,
            gate_fn,
            activation_fn,
            seq_lengths=seq_lengths,
            mask=mask,
            resets=resets,
            reset_state=reset_state,
            recurrent_dropout=recurrent_dropout,
            key=key,
            reverse=reverse,
            time_major=time_major,
        )
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
        unroll=unroll,
        time_major=time_major,
        gate_fn=gate_fn,
        activation_fn=activation_fn,
    )
    dtype, state0 = a.dtype, a.state0
    if a.xs.shape[0] == 0:  # no steps: the state passes through, as in lstm_ref
        hs = jnp.zeros((0, a.xs.shape[1], hidden_out_size(a.params)), dtype)
        h, c = state0
    elif is_plain(a.params):
        hr, cr = (None, None) if a.reset_state is None else a.reset_state
        args = (*a.params[:3], a.xs, state0.h, state0.c, hr, cr, a.mask, a.resets, a.keep)
        hs, h, c = _folded_core(_Static(bool(reverse), int(unroll), gate_fn, activation_fn))(*args)
    else:  # projection, peepholes, layer norm: the family's own kernels (jax_lstm.bptt_family)
        from jax_lstm.bptt_family import run_family

        hs, h, c = run_family(a, bool(reverse), int(unroll), gate_fn, activation_fn)
    hs = hs.astype(dtype)
    return (hs if time_major else jnp.swapaxes(hs, 0, 1)), LSTMState(h.astype(dtype), c.astype(dtype))


def _other_impl(impl, params, xs, state0, gate_fn, activation_fn, **kw):
    """``lstm`` by another implementation of the same contract: ``"pallas"``, the fused kernels."""
    if impl != "pallas":
        raise ValueError(f"impl must be 'scan' or 'pallas', got {impl!r}")
    if not is_default(gate_fn, activation_fn):
        raise ValueError("impl='pallas' fuses the default activations only (sigmoid gates, tanh)")
    from jax_lstm.pallas_lstm import lstm_pallas

    return lstm_pallas(params, xs, state0, **kw)


# --------------------------------------------------------------------------------------------------
# The custom_vjp. Arguments: W, U, b, xs, the state h0, c0, the reset state hr, cr, mask, resets, keep
# (the last five may be None), and the static options.


class _Static(NamedTuple):
    reverse: bool
    unroll: int
    gate_fn: object  # element-wise, e.g. jax.nn.sigmoid
    activation_fn: object  # element-wise, e.g. jnp.tanh


_W, _R0, _R1 = fold.WEIGHT, fold.rows(0), fold.rows(1)  # a weight; a row array with its batch axis at 0 or 1
_CORE_IN = (_W, _W, _W, _R1, _R0, _R0, _R0, _R0, _R1, _R1, _R0)  # W, U, b, xs, h0, c0, hr, cr, mask, resets, keep
_CORE_OUT = (_R1, _R0, _R0)  # hs, h_T, c_T


@functools.cache
def _folded_core(static: _Static):
    return fold.fold_before(lambda *args: _lstm_core(*args, static), _CORE_IN, _CORE_OUT)


@functools.partial(jax.custom_vjp, nondiff_argnums=(11,))
def _lstm_core(W, U, b, xs, h0, c0, hr, cr, mask, resets, keep, static):
    return _kernels(static).forward(W, U, b, xs, h0, c0, hr, cr, mask, resets, keep)


def _lstm_fwd(W, U, b, xs, h0, c0, hr, cr, mask, resets, keep, static):
    (hs, h, c), (coef, dcdh_f) = _kernels(static).forward_saving(W, U, b, xs, h0, c0, hr, cr, mask, resets, keep)
    return (hs, h, c), (W, U, b, xs, h0, c0, hr, cr, mask, resets, keep, hs, coef, dcdh_f)


@jax.named_scope("lstm_bptt_bwd")
def _lstm_bwd(static, res, cts):
    W, U, b, xs, h0, c0, hr, cr, mask, resets, keep, hs, coef, dcdh_f = res
    del res
    dhs, dh_T, dc_T = cts
    dW, dU, db, dxs, dh0, dc0, dhr, dcr = _kernels(static).backward(
        W, U, xs, h0, c0, hr, cr, mask, resets, keep, hs, coef, dcdh_f, dhs, dh_T, dc_T
    )
    # inside shard_map a weight that is the same on every shard gets the sum of the shards' gradients
    grads = (dW, dU, db, dxs, dh0, dc0)
    primals = (W, U, b, xs, h0, c0)
    grads = tuple(sum_over_extra_axes(g, p) for g, p in zip(grads, primals, strict=True))
    reset_grads = (None, None) if hr is None else (sum_over_extra_axes(dhr, hr), sum_over_extra_axes(dcr, cr))
    return (*grads, *reset_grads, None, None, None)


_lstm_core.defvjp(_lstm_fwd, _lstm_bwd)


class _Kernels(NamedTuple):
    forward: fold.Foldable  # -> hs, h_T, c_T
    forward_saving: fold.Foldable  # -> (hs, h_T, c_T), (coef, dcdh_f)
    backward: fold.Foldable  # -> dW, dU, db, dxs, dh0, dc0, dhr, dcr


@functools.cache
def _kernels(static: _Static) -> _Kernels:
    """The three kernels for one set of static options, each folding ``jax.vmap`` into its rows."""
    fwd = functools.partial(_forward, **static._asdict())
    # W, U, xs, h0, c0, hr, cr, mask, resets, keep, hs, coef, dcdh_f, dhs, dh_T, dc_T
    bwd_in = (_W, _W, _R1, _R0, _R0, _R0, _R0, _R1, _R1, _R0, _R1, _R1, _R1, _R1, _R0, _R0)
    kw = {"reverse": static.reverse, "unroll": static.unroll}

    def backward(groups):
        if groups is None:
            return functools.partial(_backward, **kw)
        return functools.partial(_backward_per_group, groups=groups, **kw)

    return _Kernels(
        forward=fold.Foldable(lambda g: functools.partial(fwd, save=False), _CORE_IN, _CORE_OUT),
        forward_saving=fold.Foldable(lambda g: functools.partial(fwd, save=True), _CORE_IN, (_CORE_OUT, (_R1, _R1))),
        backward=fold.Foldable(backward, bwd_in, (_W, _W, _W, _R1, _R0, _R0, _R0, _R0)),
    )


# --------------------------------------------------------------------------------------------------
# The forward kernel.


def _forward(W, U, b, xs, h0, c0, hr, cr, mask, resets, keep, *, reverse, unroll, gate_fn, activation_fn, save):
    """The fused forward pass. Returns (hs, h_T, c_T) and, if ``save``, the residuals (coef, dcdh_f).

    ``coef``: (T, B, 4H), per gate block the factor that turns dc_t (f, i, g)
    or dh_t (o) into the gate's delta; ``dcdh_f``: (T, B, 2H), [dc_t/dh_t | f_t].
    At skipped steps coef and dc_t/dh_t are zero and f_t is one, so the
    backward passes the state's gradient through untouched. With σ = ``gate_fn``
    and φ = ``activation_fn`` the coefficients are c_{t-1} σ'(z_f), g σ'(z_i),
    i φ'(z_g), φ(c_t) σ'(z_o), and dc_t/dh_t = o φ'(c_t): derivatives at the
    pre-activations, evaluated here, so the residuals are the same six (T, B, H)
    blocks whatever the functions are.
    """
    acc = h0.dtype
    T = xs.shape[0]
    G = W.shape[1]
    H = G // 4
    # x_t @ U for every step at once: (T, B, 4H). The bias is added inside the step, where it
    # fuses with the gate math instead of costing a pass of its own over (T, B, 4H).
    xp = jnp.einsum("tbd,dg->tbg", xs, U, preferred_element_type=acc)
    bias = b.astype(acc)[None, :]
    axes = varying_axes(W, U, b, xs, h0, c0, hr, cr, mask, resets, keep)
    h0, c0 = make_varying(h0, axes), make_varying(c0, axes)
    standard = is_default(gate_fn, activation_fn)

    def cell(h, c, xp_t, m_t, r_t):
        if r_t is not None:  # a reset: the step starts from the reset state
            r = r_t[:, None]
            h, c = jnp.where(r, hr, h), jnp.where(r, cr, c)
        h_in = h if keep is None else h * keep  # recurrent dropout on h_{t-1} in h @ W only
        z = xp_t + bias + jnp.matmul(h_in.astype(W.dtype), W, preferred_element_type=acc)
        if save and not standard:
            act, dact = gate_derivatives(z, gate_fn, activation_fn)
        else:
            act = gate_activations(z, gate_fn, activation_fn)
        c_new, tc, h_new = cell_update(c, act, activation_fn)
        out = h_new
        res = None
        if save and not standard:  # the same coefficients as below, with σ', φ' by forward mode
            f, i, g, o = split_gates(act)
            df, di, dg, do = split_gates(dact)
            coef = jnp.concatenate([c * df, g * di, i * dg, tc * do], axis=-1)
            dcdh = o * activation_derivative(c_new, activation_fn)[1]
            f_keep = f
        elif save:
            f, i, g, o = split_gates(act)
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
        if m_t is not None:  # skipped step: state unchanged, zero output, zero local derivatives
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
        return _scan_outputs(cell, h0, c0, xp, mask, resets, reverse, unroll)

    # With residuals: a loop over t that reads row t of xp and writes the coefficients
    # back into that same row, so they need no (T, B, 4H) buffer of their own.
    def body(k, carry):
        h, c, buf, dcdh_f, hs = carry
        t = (T - 1 - k if reverse else k).astype(jnp.uint32)  # unsigned: no wrap-around of negative indices
        h, c, out, (coef, df) = cell(h, c, _row(buf, t), _row(mask, t), _row(resets, t))
        buf = jax.lax.dynamic_update_index_in_dim(buf, coef, t, 0)
        dcdh_f = jax.lax.dynamic_update_index_in_dim(dcdh_f, df, t, 0)
        hs = jax.lax.dynamic_update_index_in_dim(hs, out, t, 0)
        return h, c, buf, dcdh_f, hs

    # The buffers start as zeros shaped, sharded and (in shard_map) varying like xp.
    buffers = (xp, jnp.zeros_like(xp[..., : 2 * H]), jnp.zeros_like(xp[..., :H]))
    init = (h0, c0, *(make_varying(a, axes) for a in buffers))
    h, c, coef, dcdh_f, hs = jax.lax.fori_loop(0, T, body, init, unroll=unroll)
    return (hs, h, c), (coef, dcdh_f)


def _row(a, t):
    """Row t of a (T, ...) array, or None."""
    return None if a is None else jax.lax.dynamic_index_in_dim(a, t, keepdims=False)


def _scan_outputs(cell, h0, c0, xp, mask, resets, reverse, unroll):
    """The forward without residuals: ``cell(h, c, xp_t, m_t, r_t) -> (h, c, out, _)`` scanned over time."""

    def step(carry, inp):
        h, c, out, _ = cell(*carry, *inp)
        return (h, c), out

    (h, c), hs = jax.lax.scan(step, (h0, c0), (xp, mask, resets), reverse=reverse, unroll=unroll)
    return hs, h, c


# --------------------------------------------------------------------------------------------------
# The backward kernel.


def _backward(W, U, xs, h0, c0, hr, cr, mask, resets, keep, hs, coef, dcdh_f, dhs, dh_T, dc_T, *, reverse, unroll):
    """The hand-written BPTT. Returns (dW, dU, db, dxs, dh0, dc0, dhr, dcr)."""
    acc = h0.dtype
    dz, h_in, dxs, *dstates = _deltas(
        W, U, xs, h0, c0, hr, mask, resets, keep, hs, coef, dcdh_f, dhs, dh_T, dc_T, reverse, unroll
    )
    h_in, x_in = _step_inputs(h_in, xs, mask, keep)
    # seed: δW = Σ_t h_{t-1}^T * δ13..16 and δU = Σ_t x_t^T * δ13..16; the seed has no bias, its
    # gradient is Σ_t dz_t
    dW = _contract(h_in.astype(W.dtype), dz.astype(W.dtype), W, acc)
    dU = _contract(x_in.astype(U.dtype), dz.astype(U.dtype), U, acc)
    db = dz.sum(axis=(0, 1))
    return dW.astype(W.dtype), dU.astype(U.dtype), db.astype(W.dtype), dxs, *dstates


def _backward_per_group(
    W, U, xs, h0, c0, hr, cr, mask, resets, keep, hs, coef, dcdh_f, dhs, dh_T, dc_T, *, groups, **kw
):
    """``_backward`` for batch rows that are ``groups`` problems stacked (examples under ``jax.vmap``):
    dW, dU, db per group, (groups, H, 4H), (groups, D, 4H), (groups, 4H)."""
    acc = h0.dtype
    dz, h_in, dxs, *dstates = _deltas(
        W, U, xs, h0, c0, hr, mask, resets, keep, hs, coef, dcdh_f, dhs, dh_T, dc_T, **kw
    )
    h_in, x_in = _step_inputs(h_in, xs, mask, keep)
    T, B = xs.shape[:2]
    split = lambda a, dtype: a.reshape(T, groups, B // groups, a.shape[-1]).astype(dtype)  # noqa: E731
    dW = jnp.einsum("tnbh,tnbg->nhg", split(h_in, W.dtype), split(dz, W.dtype), preferred_element_type=acc)
    dU = jnp.einsum("tnbd,tnbg->ndg", split(x_in, U.dtype), split(dz, U.dtype), preferred_element_type=acc)
    db = split(dz, acc).sum(axis=(0, 2))
    return dW.astype(W.dtype), dU.astype(U.dtype), db.astype(W.dtype), dxs, *dstates


def _deltas(W, U, xs, h0, c0, hr, mask, resets, keep, hs, coef, dcdh_f, dhs, dh_T, dc_T, reverse, unroll):
    """The backward loop: every step's gate deltas dz (T, B, 4H) and the h_{t-1} each step saw
    (T, B, H), then dxs, the gradients of the initial state (dh0, dc0) and of the reset state
    (dhr, dcr: zero without resets).

    Once step t has read its row of ``dcdh_f``, that row is dead; the loop writes
    h_{t-1} (as the step saw it: after a reset, from the last step that ran) over
    its f half, so the h_{t-1} that ``dW`` contracts needs no (T, B, H) buffer of
    its own while the residuals are alive.
    """
    acc = h0.dtype
    T = xs.shape[0]
    H = W.shape[0]
    axes = varying_axes(W, U, xs, h0, c0, mask, resets, keep, hs, coef, dcdh_f, dhs, dh_T, dc_T)
    dhs = dhs.astype(acc)
    W_T = W.T  # (4H, H), transposed once: a plain matmul in the loop is faster than a transposed one
    entering = _entering_rows(T, mask, resets, reverse)

    def body(k, carry):
        dh_next, dc_next, dhr, dcr, buf, hbuf = carry  # seed δ2 (future hidden state) and δ4 (future cell)
        t = (k if reverse else T - 1 - k).astype(jnp.uint32)
        row = lambda a: jax.lax.dynamic_index_in_dim(a, t, keepdims=False)  # noqa: E731
        dh_out, coef_t, df = row(dhs), row(buf), row(hbuf)
        dcdh, f = df[:, :H], df[:, H:]

        dh = dh_next + dh_out  # seed δ3 = δ1 + δ2: from the output and the next step
        dc = dc_next + dh * dcdh  # seed δ5, δ7, δ8: δ8 is a sum, not the product δ7 · δ4
        # seed δ16, δ15, δ14 = δ8 times the forget, input, candidate coefficients; δ13 = δ3 times the output's
        dz = coef_t * jnp.concatenate([dc, dc, dc, dh], axis=-1)
        # seed δ25 = δ18 + δ20 + δ22 + δ24 = dz @ W^T (the seed's δ22 uses δ16, the
        # forget delta, where the input-gate delta δ15 belongs)
        dh_prev = jnp.matmul(dz.astype(W.dtype), W_T, preferred_element_type=acc)
        if keep is not None:  # recurrent dropout: h_{t-1} entered h @ W as h_{t-1} * keep
            dh_prev = dh_prev * keep
        dc_prev = dc * f  # seed δ11 = δ8 · f
        if mask is not None:  # skipped step: the hidden state passed through untouched, and the step's
            # output is the constant zero, so its cotangent dh_out goes nowhere (dz is zero there too)
            dh_prev = jnp.where(row(mask)[:, None], dh_prev, dh_next)
        if resets is not None:
            dh_prev, dc_prev, dhr, dcr = _to_reset_state(row(resets), dh_prev, dc_prev, dhr, dcr)
        # dz_t replaces the coefficients it was made from: after the loop, buf holds every step's dz
        buf = jax.lax.dynamic_update_index_in_dim(buf, dz, t, 0)
        # h_{t-1} as step t saw it, over the [dc/dh | f] row this step has read
        hbuf = _write_after_reads(hbuf, entering(hs, h0, hr, t), t, H, dc_prev)
        return dh_prev, dc_prev, dhr, dcr, buf, hbuf

    zeros = jnp.zeros_like(dh_T, dtype=acc)
    carry0 = (dh_T.astype(acc), dc_T.astype(acc), zeros, zeros, coef, dcdh_f)
    carry0 = tuple(make_varying(a, axes) for a in carry0)
    # what is left at the start is state0's gradient; the reset state's sums over every reset
    dh0, dc0, dhr, dcr, dz, hbuf = jax.lax.fori_loop(0, T, body, carry0, unroll=unroll)
    # seed δ26 = δ17 + δ19 + δ21 + δ23 = dz @ U^T (the seed's δ23 uses W_f^T where U_f^T belongs)
    dxs = jnp.einsum("tbg,dg->tbd", dz.astype(U.dtype), U, preferred_element_type=acc)
    dtype = h0.dtype if hr is None else hr.dtype
    h_in = hbuf[..., H:]
    dstates = dh0.astype(h0.dtype), dc0.astype(c0.dtype), dhr.astype(dtype), dcr.astype(dtype)
    return dz, h_in, dxs.astype(xs.dtype), *dstates


def _to_reset_state(r, dh_prev, dc_prev, dhr, dcr):
    """At a reset (``r``: (B,) bool) what reached the entering state belongs to the reset state, not to the step
    before: it is added to (dhr, dcr) and the gradients passed on to step t - 1 are zero there."""
    r = r[:, None]
    zero_h, zero_c = jnp.zeros_like(dh_prev), jnp.zeros_like(dc_prev)
    dhr, dcr = dhr + jnp.where(r, dh_prev, zero_h), dcr + jnp.where(r, dc_prev, zero_c)
    return jnp.where(r, zero_h, dh_prev), jnp.where(r, zero_c, dc_prev), dhr, dcr


def _write_after_reads(buf, v, t, col, read):
    """``buf`` with row t, columns ``col`` on, overwritten by ``v`` (B, N), once ``read`` has been computed.

    ``read`` (B, >= N) is computed from everything the step read from row t of
    ``buf``. ``v + 0 * read`` is ``v`` (``read`` is finite wherever the
    gradients are) but depends on it, so XLA orders every read of the row before
    the write and updates ``buf`` in place; written as a plain ``v``, the write
    could run before the reads, and XLA copies all of ``buf`` at each step to
    keep the rows the reads need.
    """
    v = (v + 0 * read[:, : v.shape[-1]]).astype(buf.dtype)
    zero = jnp.zeros((), jnp.int32)
    return jax.lax.dynamic_update_slice(buf, v[None], (t.astype(jnp.int32), zero, zero + col))


def _step_inputs(h_in, xs, mask, keep):
    """What each step multiplied by W and by U: h_{t-1} (after any reset, from ``_deltas``) times the
    recurrent-dropout mask, and x_t.

    At a skipped step dz is zero; its x_t is replaced by zero as well, so that
    a NaN or Inf stored there (a missing value, masked out) cannot turn
    ``x_t^T dz_t = NaN * 0`` into a NaN weight gradient.
    """
    if keep is not None:
        h_in = h_in * keep[None]
    x_in = xs if mask is None else jnp.where(mask[..., None], xs, jnp.zeros_like(xs))
    return h_in, x_in


def _contract(a, b_, like, acc):
    """A weight gradient, a^T b over every (t, b) row: (T, B, m), (T, B, n) -> (m, n), placed like ``like``.

    The rows are flattened first so that XLA contracts one leading axis of
    both operands in place (a two-axis contraction makes it copy one of them
    transposed). On a mesh with Explicit axes, where the batch axis is sharded
    and cannot be flattened, the result is placed as the weight is.
    """
    if not on_explicit_mesh(a):
        T, B = a.shape[:2]
        rows = lambda x: x.reshape(T * B, x.shape[-1])  # noqa: E731
        return jax.lax.dot_general(rows(a), rows(b_), (((0,), (0,)), ((), ())), preferred_element_type=acc)
    return jnp.einsum("tbm,tbn->mn", a, b_, preferred_element_type=acc, out_sharding=weight_sharding(like, a))
