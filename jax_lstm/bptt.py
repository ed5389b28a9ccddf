"""``lstm``: the LSTM layer whose gradient is hand-written backpropagation through time.

Same contract and values as ``lstm_ref``; the gradient comes from ``_backward``,
registered with ``jax.custom_vjp``. It is organised the way fused RNN libraries
do it, and shaped by what is fast on XLA:CPU, where a step of a loop costs
far more than the same work done for all steps at once:

* forward: the input projection ``xs @ U`` for all steps is one matmul
  outside the loop; inside, one matmul ``h @ W`` for all four gates, the bias
  add fused with the gate math, and ``cell.cell_update`` for c_t and h_t. While
  the step has every operand at hand it also computes the local derivatives the
  backward needs (five (B, H) blocks and f), and writes the four gate
  coefficients over the row of ``xs @ U`` it has just consumed, so the
  residuals need no buffer of their own;
* backward: a loop whose body is one element-wise pass (the gate deltas
  ``dz_t`` from the carried dh, dc and the stored coefficients), one matmul
  ``dh_{t-1} = dz_t @ W^T`` with ``W^T`` transposed once, and the write of
  ``dz_t`` over the coefficients it was made from; ``dW``, ``dU``, ``db`` and
  ``dxs`` are then single matmuls/reductions over all steps at once.

What no fused LSTM offers costs one ``where`` or one multiply per step here:
a step ``mask`` (any pattern of skipped steps), ``resets`` of the state to
``state0``, and variational recurrent dropout on h_{t-1}. Their terms are
named where they enter the backward.

Under ``jax.vmap`` over examples the mapped axis is folded into the batch rows
(``_vmapped_core`` before the custom_vjp, ``_folded`` inside it when autodiff
runs within the vmap), so the same loops run once over all examples with the
matmuls ``N * B`` rows tall, instead of over an (N, ...) stack of small problems.

The comments name the rule of the seed document (``shared/seed/lstm_units.md``,
δ1…δ26) each line implements, and where the seed's rule is wrong.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec

from jax_lstm.cell import (
    LSTMState,
    cell_update,
    gate_activations,
    make_varying,
    on_explicit_mesh,
    split_gates,
    varying_axes,
)
from jax_lstm.reference import prepare

__all__ = ["lstm"]


def lstm(
    params,
    xs,
    state0=None,
    *,
    seq_lengths=None,
    mask=None,
    resets=None,
    recurrent_dropout=0.0,
    key=None,
    reverse=False,
    unroll=1,
    time_major=True,
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
        set to ``state0`` (zeros when None) just before step t is visited,
        whether or not step t is masked. No gradient crosses a reset; the
        gradient of ``state0`` sums over the start and every reset.
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

    Memory: the forward keeps, per time step, six (B, H) blocks in the
    accumulation dtype: the four gate coefficients (the derivative of each gate
    with respect to its pre-activation, times the factor that multiplies it in
    c_t or h_t), dc_t/dh_t = o (1 - tanh(c_t)^2) and f_t, plus hs, which is the
    output itself. The coefficients overwrite ``xs @ U``'s buffer row by row,
    and the backward overwrites them with the gate deltas, so forward and
    backward together hold 4 + 2 + 1 (T, B, H) arrays, plus h_{t-1} for
    ``dW``: 32*T*B*H bytes in float32, about 0.5x of what autodiff of
    ``lstm_ref`` compiles to. ``xs``, ``W`` and ``U`` are referenced, not copied.

    Raises:
      ValueError, TypeError: at trace time, naming the bad argument and the
        shapes involved.
    """
    a = prepare(
        params,
        xs,
        state0,
        seq_lengths=seq_lengths,
        mask=mask,
        resets=resets,
        recurrent_dropout=recurrent_dropout,
        key=key,
        unroll=unroll,
        time_major=time_major,
    )
    dtype, state0 = a.dtype, a.state0
    if a.xs.shape[0] == 0:  # no steps: the state passes through, as in lstm_ref
        hs = jnp.zeros((0, a.xs.shape[1], a.params.W.shape[0]), dtype)
        h, c = state0
    else:
        args = (*a.params, a.xs, state0.h, state0.c, a.mask, a.resets, a.keep)
        hs, h, c = _run_core(args, bool(reverse), int(unroll))
    hs = hs.astype(dtype)
    return (hs if time_major else jnp.swapaxes(hs, 0, 1)), LSTMState(h.astype(dtype), c.astype(dtype))


# --------------------------------------------------------------------------------------------------
# Under jax.vmap over examples (the innermost transformation) the mapped axis is folded into the
# batch rows before the custom_vjp sees it: the rows of every matmul, the weight gradients included,
# then cover all examples at once, and dW, dU, db come out summed over examples by the matmuls
# themselves. (A custom_vjp that is vmapped instead forms one weight gradient per example and sums
# them afterwards: N times the memory and a batched matmul per weight.)

# How each argument and output meets the batch rows: a weight (never folded) or a row array with its
# batch axis (xs: 1, h0: 0, ...).
_W, _R = "weight", "rows"
_CORE_ARGS = (_W, _W, _W, (_R, 1), (_R, 0), (_R, 0), (_R, 1), (_R, 1), (_R, 0))  # W, U, b, xs, h0, c0, mask, ...
_CORE_OUTS = ((_R, 1), (_R, 0), (_R, 0))  # hs, h_T, c_T


def _run_core(args, reverse, unroll):
    if _mapped_by_innermost_vmap(args):
        return _vmapped_core(reverse, unroll)(*args)
    return _lstm_core(*args, reverse, unroll)


def _mapped_by_innermost_vmap(args) -> bool:
    """Whether the innermost transformation tracing this call is a vmap that maps one of ``args``.

    Only then is a ``custom_vmap`` rule reached before any autodiff sees the
    call (grad of vmap, vmap alone); with autodiff innermost (vmap of grad)
    the custom_vjp's own batching applies.
    """
    try:
        from jax._src import core as jax_core
        from jax._src.interpreters import batching

        trace = jax_core.trace_ctx.trace
        if not isinstance(trace, batching.BatchTrace):
            return False
        return any(
            isinstance(a, batching.BatchTracer) and a._trace is trace and a.batch_dim is not None
            for a in jax.tree.leaves(args)
        )
    except (ImportError, AttributeError):  # pragma: no cover - other JAX internals: the custom_vjp path is always right
        return False


@functools.cache
def _vmapped_core(reverse, unroll):
    core = jax.custom_batching.custom_vmap(lambda *args: _lstm_core(*args, reverse, unroll))

    @core.def_vmap
    def rule(n, in_batched, *args):
        weights_mapped = any(in_batched[:3])
        if n == 0 or weights_mapped or any(on_explicit_mesh(a) for a in args if a is not None):
            axes = [0 if b else None for b in in_batched]
            return jax.vmap(lambda *a: _lstm_core(*a, reverse, unroll), in_axes=axes)(*args), (True, True, True)
        folded = [_fold(a, k, b, n) for a, k, b in zip(args, _CORE_ARGS, in_batched, strict=True)]
        out = _run_core(tuple(folded), reverse, unroll)
        return tuple(_unfold(a, k, n, 1) for a, k in zip(out, _CORE_OUTS, strict=True)), (True, True, True)

    return core


# --------------------------------------------------------------------------------------------------
# The custom_vjp. Arguments: W, U, b, xs, h0, c0, mask, resets, keep (the last three may be None).


@functools.partial(jax.custom_vjp, nondiff_argnums=(9, 10))
def _lstm_core(W, U, b, xs, h0, c0, mask, resets, keep, reverse, unroll):
    return _kernel("forward", reverse, unroll)(W, U, b, xs, h0, c0, mask, resets, keep)


def _lstm_fwd(W, U, b, xs, h0, c0, mask, resets, keep, reverse, unroll):
    (hs, h, c), (coef, dcdh_f) = _kernel("forward_saving", reverse, unroll)(W, U, b, xs, h0, c0, mask, resets, keep)
    return (hs, h, c), (W, U, b, xs, h0, c0, mask, resets, keep, hs, coef, dcdh_f)


@jax.named_scope("lstm_bptt_bwd")
def _lstm_bwd(reverse, unroll, res, cts):
    W, U, b, xs, h0, c0, mask, resets, keep, hs, coef, dcdh_f = res
    del res
    dhs, dh_T, dc_T = cts
    backward = _kernel("backward", reverse, unroll)
    grads = backward(W, U, b, xs, h0, c0, mask, resets, keep, hs, coef, dcdh_f, dhs, dh_T, dc_T)
    # Inside shard_map: the gradient of an input that is the same on every shard (a replicated W)
    # is the sum over shards of the per-shard gradients (the transpose of broadcasting it).
    primals = (W, U, b, xs, h0, c0)
    return (*(_sum_over_extra_axes(g, p) for g, p in zip(grads, primals, strict=True)), None, None, None)


_lstm_core.defvjp(_lstm_fwd, _lstm_bwd)


def _sum_over_extra_axes(grad, primal):
    extra = tuple(sorted(varying_axes(grad) - varying_axes(primal), key=str))
    return jax.lax.psum(grad, extra) if extra else grad


# --------------------------------------------------------------------------------------------------
# The kernels: plain functions of arrays, each wrapped by ``_folded`` for vmap.


def _forward(W, U, b, xs, h0, c0, mask, resets, keep, *, reverse, unroll, save):
    """The fused forward pass. Returns (hs, h_T, c_T) and, if ``save``, the residuals (coef, dcdh_f).

    ``coef``: (T, B, 4H), per gate block the factor that turns dc_t (f, i, g)
    or dh_t (o) into the gate's delta; ``dcdh_f``: (T, B, 2H), [dc_t/dh_t | f_t].
    At skipped steps coef and dc_t/dh_t are zero and f_t is one, so the
    backward passes the state's gradient through untouched.
    """
    acc = h0.dtype
    T = xs.shape[0]
    G = W.shape[1]
    H = G // 4
    # x_t @ U for every step at once: (T, B, 4H). The bias is added inside the step, where it
    # fuses with the gate math instead of costing a pass of its own over (T, B, 4H).
    xp = jnp.einsum("tbd,dg->tbg", xs, U, preferred_element_type=acc)
    bias = b.astype(acc)[None, :]
    axes = varying_axes(W, U, b, xs, h0, c0, mask, resets, keep)
    h0, c0 = make_varying(h0, axes), make_varying(c0, axes)

    def cell(h, c, xp_t, m_t, r_t):
        if r_t is not None:  # a reset: the step starts from state0
            r = r_t[:, None]
            h, c = jnp.where(r, h0, h), jnp.where(r, c0, c)
        h_in = h if keep is None else h * keep  # recurrent dropout on h_{t-1} in h @ W only
        act = gate_activations(xp_t + bias + jnp.matmul(h_in.astype(W.dtype), W, preferred_element_type=acc))
        c_new, tc, h_new = cell_update(c, act)
        out = h_new
        res = None
        if save:
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

    def row(a, t):
        return None if a is None else jax.lax.dynamic_index_in_dim(a, t, keepdims=False)

    if not save:

        def step(carry, inp):
            h, c, out, _ = cell(*carry, *inp)
            return (h, c), out

        (h, c), hs = jax.lax.scan(step, (h0, c0), (xp, mask, resets), reverse=reverse, unroll=unroll)
        return hs, h, c

    # With residuals: a loop over t that reads row t of xp and writes the coefficients
    # back into that same row, so they need no (T, B, 4H) buffer of their own.
    def body(k, carry):
        h, c, buf, dcdh_f, hs = carry
        t = (T - 1 - k if reverse else k).astype(jnp.uint32)  # unsigned: no wrap-around of negative indices
        h, c, out, (coef, df) = cell(h, c, row(buf, t), row(mask, t), row(resets, t))
        buf = jax.lax.dynamic_update_index_in_dim(buf, coef, t, 0)
        dcdh_f = jax.lax.dynamic_update_index_in_dim(dcdh_f, df, t, 0)
        hs = jax.lax.dynamic_update_index_in_dim(hs, out, t, 0)
        return h, c, buf, dcdh_f, hs

    # The buffers start as zeros shaped, sharded and (in shard_map) varying like xp.
    buffers = (xp, jnp.zeros_like(xp[..., : 2 * H]), jnp.zeros_like(xp[..., :H]))
    init = (h0, c0, *(make_varying(a, axes) for a in buffers))
    h, c, coef, dcdh_f, hs = jax.lax.fori_loop(0, T, body, init, unroll=unroll)
    return (hs, h, c), (coef, dcdh_f)


def _shift(a, first, reverse):
    """The value of ``a`` one step earlier in the direction of the run, ``first`` at the start."""
    if reverse:
        return jnp.concatenate([a[1:], first[None]], axis=0)
    return jnp.concatenate([first[None], a[:-1]], axis=0)


def _entering_h(hs, h0, mask, resets, reverse):
    """h_{t-1} as step t saw it: (T, B, H), after any reset, before recurrent dropout.

    Without a mask it is the previous output (or ``h0`` at the start and at a
    reset). With one, the previous output may be a skipped step's zero: the
    state entering step t is the output of the last step that ran before it,
    unless a reset came later (then ``h0``). Found for all t at once: a running
    maximum over the run order of an event code, 2k+1 for a step that ran at
    run position k and 2k for a reset at a skipped step, decodes to the step
    whose output is the carried state.
    """
    if mask is None:
        h_prev = _shift(hs, h0, reverse)
        return h_prev if resets is None else jnp.where(resets[..., None], h0[None], h_prev)
    T = hs.shape[0]
    k = jnp.arange(T, dtype=jnp.int32)[:, None]
    pos = T - 1 - k if reverse else k  # run position of step t
    event = jnp.where(mask, 2 * pos + 1, -1)
    if resets is not None:
        event = jnp.where(~mask & resets, 2 * pos, event)
    last = jax.lax.cummax(event, axis=0, reverse=reverse)  # the latest event at or before t in run order
    # the run position of the step whose output is carried
    src_pos = jnp.where((last >= 0) & (last % 2 == 1), last // 2, -1)
    src_after = jnp.where(src_pos >= 0, T - 1 - src_pos if reverse else src_pos, -1)  # its time index
    src_in = _shift(src_after, jnp.full_like(src_after[0], -1), reverse)  # entering t: carried after t-1
    if resets is not None:
        src_in = jnp.where(resets, -1, src_in)
    gathered = jnp.take_along_axis(hs, jnp.maximum(src_in, 0)[..., None], axis=0)
    return jnp.where((src_in >= 0)[..., None], gathered, h0[None])


def _backward(
    W, U, b, xs, h0, c0, mask, resets, keep, hs, coef, dcdh_f, dhs, dh_T, dc_T, *, reverse, unroll, groups=None
):
    """The hand-written BPTT. Returns (dW, dU, db, dxs, dh0, dc0).

    With ``groups`` (an int) the batch rows are ``groups`` independent problems
    stacked (examples under ``jax.vmap``), and dW, dU, db are returned per
    group: (groups, H, 4H), (groups, D, 4H), (groups, 4H).
    """
    del b  # only its batching decides how the kernel is folded under vmap
    acc = h0.dtype
    T, B, D = xs.shape
    G = W.shape[1]
    H = G // 4
    axes = varying_axes(W, U, xs, h0, c0, mask, resets, keep, hs, coef, dcdh_f, dhs, dh_T, dc_T)
    dhs = dhs.astype(acc)
    W_T = W.T  # (4H, H), transposed once: a plain matmul in the loop is faster than a transposed one

    def body(k, carry):
        dh_next, dc_next, dh0, dc0, buf = carry  # seed δ2 (future hidden state) and δ4 (future cell)
        t = (k if reverse else T - 1 - k).astype(jnp.uint32)
        row = lambda a: jax.lax.dynamic_index_in_dim(a, t, keepdims=False)  # noqa: E731
        dh_out, coef_t, df = row(dhs), row(buf), row(dcdh_f)
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
        if resets is not None:  # a reset: what reached the entering state belongs to state0, not to step t-1
            r = row(resets)[:, None]
            dh0 = dh0 + jnp.where(r, dh_prev, jnp.zeros_like(dh_prev))
            dc0 = dc0 + jnp.where(r, dc_prev, jnp.zeros_like(dc_prev))
            dh_prev = jnp.where(r, jnp.zeros_like(dh_prev), dh_prev)
            dc_prev = jnp.where(r, jnp.zeros_like(dc_prev), dc_prev)
        # dz_t replaces the coefficients it was made from: after the loop, buf holds every step's dz
        buf = jax.lax.dynamic_update_index_in_dim(buf, dz, t, 0)
        return dh_prev, dc_prev, dh0, dc0, buf

    zeros = jnp.zeros_like(dh_T, dtype=acc)
    carry0 = tuple(make_varying(a, axes) for a in (dh_T.astype(acc), dc_T.astype(acc), zeros, zeros, coef))
    dh_first, dc_first, dh0_resets, dc0_resets, dz = jax.lax.fori_loop(0, T, body, carry0, unroll=unroll)
    dh0 = dh_first + dh0_resets  # state0's gradient: from the start and from every reset
    dc0 = dc_first + dc0_resets

    h_in = _entering_h(hs, h0, mask, resets, reverse)  # the h_{t-1} each step multiplied by W
    if keep is not None:
        h_in = h_in * keep[None]
    # seed: δW = Σ_t h_{t-1}^T * δ13..16 and δU = Σ_t x_t^T * δ13..16; the seed has no bias, its
    # gradient is Σ_t dz_t. Per group when the rows are several problems stacked.
    if groups is None:
        dW = _contract(h_in.astype(W.dtype), dz.astype(W.dtype), W, acc)
        dU = _contract(xs.astype(U.dtype), dz.astype(U.dtype), U, acc)
        db = dz.sum(axis=(0, 1))
    else:
        split = lambda a, dtype: a.reshape(T, groups, B // groups, a.shape[-1]).astype(dtype)  # noqa: E731
        dW = jnp.einsum("tnbh,tnbg->nhg", split(h_in, W.dtype), split(dz, W.dtype), preferred_element_type=acc)
        dU = jnp.einsum("tnbd,tnbg->ndg", split(xs, U.dtype), split(dz, U.dtype), preferred_element_type=acc)
        db = split(dz, acc).sum(axis=(0, 2))
    # seed δ26 = δ17 + δ19 + δ21 + δ23 = dz @ U^T (the seed's δ23 uses W_f^T where U_f^T belongs)
    dxs = jnp.einsum("tbg,dg->tbd", dz.astype(U.dtype), U, preferred_element_type=acc)
    return (
        dW.astype(W.dtype),
        dU.astype(U.dtype),
        db.astype(W.dtype),
        dxs.astype(xs.dtype),
        dh0.astype(h0.dtype),
        dc0.astype(c0.dtype),
    )


def _contract(a, b_, like, acc):
    """A weight gradient, a^T b over every (t, b) row: (T, B, m), (T, B, n) -> (m, n), placed like ``like``.

    The rows are flattened first so that XLA contracts one leading axis of
    both operands in place (a two-axis contraction makes it copy one of them
    transposed). On a mesh with Explicit axes, where the batch axis is sharded
    and cannot be flattened, the result is placed as the weight is (replicated
    when the weight is on no mesh), which is what a data-parallel step sums into.
    """
    if not on_explicit_mesh(a):
        T, B = a.shape[:2]
        rows = lambda x: x.reshape(T * B, x.shape[-1])  # noqa: E731
        return jax.lax.dot_general(rows(a), rows(b_), (((0,), (0,)), ((), ())), preferred_element_type=acc)
    mine = jax.typeof(like).sharding
    out_sharding = mine if not mine.mesh.empty else NamedSharding(jax.typeof(a).sharding.mesh, PartitionSpec())
    return jnp.einsum("tbm,tbn->mn", a, b_, preferred_element_type=acc, out_sharding=out_sharding)


# --------------------------------------------------------------------------------------------------
# Folding a vmapped axis into the batch rows.
#
# These kernels are reached under vmap when autodiff runs inside it (``jax.vmap(jax.grad(f))``, per-example
# gradients) or when a function jitted inside the vmap was traced before it. Each argument and output is
# a weight (never folded) or a row array with its batch axis (xs: 1, h0: 0, ...). With the weights not
# mapped, the N examples become N * B rows of one problem: row arrays are moved into place and back (a
# transpose each; residuals too, so that differentiating the kernels again under vmap sees real arrays),
# and the weight gradients come out per example. With a weight mapped (an ensemble), an empty mapped
# axis or an Explicit-axis mesh, the kernel is vmapped as it is: correct, and as fast as XLA's batched
# loops.

_ARGS = {
    "forward": (_CORE_ARGS, _CORE_OUTS),
    "forward_saving": (_CORE_ARGS, (_CORE_OUTS, ((_R, 1), (_R, 1)))),  # + residuals coef, dcdh_f
    "backward": (  # + hs, coef, dcdh_f, dhs, dh_T, dc_T -> dW, dU, db, dxs, dh0, dc0
        _CORE_ARGS + ((_R, 1), (_R, 1), (_R, 1), (_R, 1), (_R, 0), (_R, 0)),
        (_W, _W, _W, (_R, 1), (_R, 0), (_R, 0)),
    ),
}


@functools.cache
def _kernel(kind, reverse, unroll, groups=None):
    """``kind`` of kernel as a function of arrays that folds ``jax.vmap`` into its rows."""
    if kind == "backward":
        raw = functools.partial(_backward, reverse=reverse, unroll=unroll, groups=groups)
    else:
        raw = functools.partial(_forward, reverse=reverse, unroll=unroll, save=kind == "forward_saving")
    in_kinds, out_kinds = _ARGS[kind]
    return _folded(raw, in_kinds, out_kinds, lambda n: _kernel(kind, reverse, unroll, (groups or 1) * n), groups)


def _folded(raw, in_kinds, out_kinds, with_groups, groups):
    fast = jax.custom_batching.custom_vmap(raw)

    @fast.def_vmap
    def rule(n, in_batched, *args):
        weights_mapped = any(b for b, k in zip(in_batched, in_kinds, strict=True) if k == _W)
        if n == 0 or weights_mapped or any(on_explicit_mesh(a) for a in args if a is not None):
            axes = [0 if b else None for b in in_batched]
            out = jax.vmap(raw, in_axes=axes)(*args)
            return out, jax.tree.map(lambda _: True, out)
        folded = [_fold(a, k, b, n) for a, k, b in zip(args, in_kinds, in_batched, strict=True)]
        out = with_groups(n)(*folded)
        flat, tree = jax.tree.flatten(out)
        kinds = jax.tree.leaves(out_kinds, is_leaf=lambda k: k == _W or isinstance(k, tuple) and k[0] == _R)
        flat = [_unfold(a, k, n, groups) for a, k in zip(flat, kinds, strict=True)]
        return jax.tree.unflatten(tree, flat), jax.tree.unflatten(tree, [True] * len(flat))

    # Differentiating a kernel (only grad of grad does) goes through plain autodiff of ``raw``.
    @jax.custom_vjp
    def kernel(*args):
        return fast(*args)

    def kernel_fwd(*args):
        return fast(*args), args

    def kernel_bwd(args, ct):
        _, vjp = jax.vjp(raw, *args)
        return vjp(ct)

    kernel.defvjp(kernel_fwd, kernel_bwd)
    return kernel


def _fold(a, kind, batched, n):
    """One argument of an (N-mapped) kernel call, as an argument of the N * B-row call."""
    if a is None or kind == _W:
        return a
    _, axis = kind
    if not batched:
        a = jnp.broadcast_to(a[None], (n, *a.shape))
    a = jnp.moveaxis(a, 0, axis)  # (..., N, B, ...)
    return a.reshape(*a.shape[:axis], n * a.shape[axis + 1], *a.shape[axis + 2 :])


def _unfold(a, kind, n, groups):
    """One output of the N * B-row call, as the output of the N-mapped kernel (batched at axis 0)."""
    if kind == _W:  # per-group weight gradients (n * groups, ...) -> (n, [groups,] ...)
        return a.reshape(n, *(() if groups is None else (groups,)), *a.shape[1:])
    _, axis = kind
    split = (*a.shape[:axis], n, a.shape[axis] // n, *a.shape[axis + 1 :])
    return jnp.moveaxis(a.reshape(split), axis, 0)
