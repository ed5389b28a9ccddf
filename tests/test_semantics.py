"""Masks, resets, recurrent dropout, time_major, lengths and dtypes, checked against a plain NumPy oracle.

Every value is compared with ``numpy_oracle.lstm_np``, which shares no code with
``jax_lstm``; every gradient of ``lstm`` with the autodiff of ``lstm_ref`` and, for a
few configurations, with finite differences of the oracle.

Each static configuration costs an XLA compile, so the option grid runs on
covering subsets of the full product of the 7 options (128 configurations):
values on one where every 3 options take every combination of their values,
values and gradients on one where every 2 do. ``JAX_LSTM_FULL_GRID=1`` runs all
128 configurations for both. The other tests reuse the compiled configurations
of the gradient grid wherever they can, feeding their own masks and resets.
"""

from __future__ import annotations

import functools
import itertools
import os
import re
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from numpy_oracle import dropout_scale, length_mask, lstm_np, lstm_np_scalar

from jax_lstm import (
    LSTMParams,
    LSTMState,
    gate_trace_stack,
    init_stack,
    lstm,
    lstm_ref,
    lstm_stack,
    lstm_trace,
)

T, B, D, H = 5, 4, 2, 3
P_DROP = 0.3
TOL = {np.dtype(np.float64): 1e-10, np.dtype(np.float32): 1e-5}
VALUE_TOL = 1e-12
FD_TOL = 1e-7  # central differences with step 1e-6 in float64


# ------------------------------------------------------------------------------------------- helpers


class Cfg(NamedTuple):
    """One static configuration of the options of ``lstm``."""

    mask: bool
    resets: bool
    lengths: bool
    reverse: bool
    dropout: float
    state0: bool
    time_major: bool

    def __str__(self) -> str:
        on = [n for n in ("mask", "resets", "lengths", "reverse", "state0") if getattr(self, n)]
        on += [f"p{self.dropout}"] if self.dropout else []
        on += [] if self.time_major else ["batch_major"]
        return "-".join(on) or "plain"


LEVELS = ((False, True), (False, True), (False, True), (False, True), (0.0, P_DROP), (False, True), (True, False))
ALL_CFGS = [Cfg(*c) for c in itertools.product(*LEVELS)]


def covering_subset(cfgs: list[Cfg], strength: int, seeds: tuple[Cfg, ...] = ()) -> list[Cfg]:
    """A greedy subset (starting with ``seeds``) where every ``strength`` options take every combination of values."""
    n = len(cfgs[0])
    groups = list(itertools.combinations(range(n), strength))
    todo = {(g, tuple(c[k] for k in g)) for c in cfgs for g in groups}
    chosen = list(seeds)
    for c in seeds:
        todo -= {(g, tuple(c[k] for k in g)) for g in groups}
    while todo:
        best = max(cfgs, key=lambda c: sum((g, tuple(c[k] for k in g)) in todo for g in groups))
        chosen.append(best)
        todo -= {(g, tuple(best[k] for k in g)) for g in groups}
    return chosen


ALL_ON = Cfg(True, True, True, False, P_DROP, True, True)  # every option, forward, time-major
ALL_ON_BM = ALL_ON._replace(time_major=False)
ALL_ON_REV_BM = ALL_ON._replace(reverse=True, time_major=False)
FULL_GRID = os.environ.get("JAX_LSTM_FULL_GRID") == "1"
GRAD_GRID = ALL_CFGS if FULL_GRID else covering_subset(ALL_CFGS, 2, seeds=(ALL_ON, ALL_ON_BM, ALL_ON_REV_BM))
# values of the gradient grid are checked with its gradients; these configurations complete it to strength 3
VALUE_GRID = ALL_CFGS if FULL_GRID else covering_subset(ALL_CFGS, 3, seeds=tuple(GRAD_GRID))[len(GRAD_GRID) :]


class Problem(NamedTuple):
    """Time-major NumPy data for one problem; ``lay`` puts arrays into a configuration's layout."""

    params: LSTMParams
    xs: np.ndarray  # (T, B, D)
    h0: np.ndarray
    c0: np.ndarray
    lengths: np.ndarray
    mask: np.ndarray  # (T, B)
    resets: np.ndarray  # (T, B)
    key: jax.Array
    keep: np.ndarray  # (B, H), the recurrent dropout mask the key gives at P_DROP


def problem(seed: int = 0, dtype=np.float64, t: int = T, b: int = B, d: int = D, h: int = H) -> Problem:
    """Random weights and inputs; the mask has an all-True row 0 and an all-False row 2, lengths include 0 and T."""
    rng = np.random.default_rng(seed)
    params = LSTMParams(
        jnp.asarray(rng.normal(scale=0.6, size=(h, 4 * h)), dtype),
        jnp.asarray(rng.normal(scale=0.6, size=(d, 4 * h)), dtype),
        jnp.asarray(rng.normal(scale=0.3, size=(4 * h,)), dtype),
    )
    xs = rng.normal(size=(t, b, d)).astype(dtype)
    h0 = rng.normal(scale=0.5, size=(b, h)).astype(dtype)
    c0 = rng.normal(scale=0.5, size=(b, h)).astype(dtype)
    mask = rng.random((t, b)) < 0.6
    resets = rng.random((t, b)) < 0.3
    if b >= 4 and t >= 4:
        mask[:, 0], mask[:, 2] = True, False
        mask[1, 1], mask[2, 1] = False, True
        resets[1, 1] = True  # a reset at a skipped step
        resets[2, 3] = True
        lengths = np.array([3, t, 4, 0][:b] + [t] * (b - 4), np.int32)
    else:
        lengths = np.minimum(np.arange(b), t).astype(np.int32)
    key = jax.random.PRNGKey(seed + 1000)
    keep = np.asarray(jax.random.bernoulli(key, 1.0 - P_DROP, (b, h)))
    return Problem(params, xs, h0, c0, lengths, mask, resets, key, keep)


def lay(time_major: bool, a):
    """Swap the two leading axes (time, batch) unless time-major."""
    if a is None or time_major:
        return a
    return jnp.swapaxes(a, 0, 1) if isinstance(a, jax.Array) else np.swapaxes(a, 0, 1)


def call(fn, cfg: Cfg, params, xs, h0, c0, lengths, mask, resets, key, **extra):
    """Call ``fn`` (lstm or lstm_ref) with the options that ``cfg`` turns on; inputs already in cfg's layout."""
    kw = dict(reverse=cfg.reverse, time_major=cfg.time_major, **extra)
    if cfg.mask:
        kw["mask"] = mask
    if cfg.resets:
        kw["resets"] = resets
    if cfg.lengths:
        kw["seq_lengths"] = lengths
    if cfg.dropout:
        kw.update(recurrent_dropout=cfg.dropout, key=key)
    return fn(params, xs, LSTMState(h0, c0) if cfg.state0 else None, **kw)


def args(cfg: Cfg, pb: Problem, mask=None):
    """The positional arguments of ``call`` after ``fn, cfg``, in cfg's layout."""
    tm = cfg.time_major
    mask = pb.mask if mask is None else mask
    return (pb.params, lay(tm, pb.xs), pb.h0, pb.c0, pb.lengths, lay(tm, mask), lay(tm, pb.resets), pb.key)


def oracle(cfg: Cfg, pb: Problem, mask=None, params=None, xs=None, h0=None, c0=None):
    """``lstm_np`` with the options of ``cfg``, in cfg's layout."""
    tm = cfg.time_major
    params = pb.params if params is None else params
    mask = pb.mask if mask is None else mask
    return lstm_np(
        *params,
        lay(tm, pb.xs if xs is None else xs),
        (pb.h0 if h0 is None else h0) if cfg.state0 else None,
        (pb.c0 if c0 is None else c0) if cfg.state0 else None,
        seq_lengths=pb.lengths if cfg.lengths else None,
        mask=lay(tm, mask) if cfg.mask else None,
        resets=lay(tm, pb.resets) if cfg.resets else None,
        keep_scale=dropout_scale(pb.keep, cfg.dropout) if cfg.dropout else None,
        reverse=cfg.reverse,
        time_major=tm,
    )


def rel_err(a, b) -> float:
    """max |a - b| / max |b| (absolute when b is all zero)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    if a.size == 0:
        return 0.0
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-8))


def np_stack(seed: int, sizes, bidirectional: bool, d: int = D):
    """Stack params in init_stack's layout, drawn with NumPy (no compile per layer)."""
    rng = np.random.default_rng(seed)
    n_dir = 2 if bidirectional else 1
    layers = []
    for h in sizes:
        shapes = ((h, 4 * h), (d, 4 * h), (4 * h,))
        layers.append(
            tuple(LSTMParams(*(jnp.asarray(rng.normal(scale=0.5, size=s)) for s in shapes)) for _ in range(n_dir))
        )
        d = n_dir * h
    return tuple(layers)


def test_np_stack_has_init_stack_layout():
    want = init_stack(jax.random.PRNGKey(0), D, [H, 2], bidirectional=True, dtype=jnp.float64)
    got = np_stack(0, [H, 2], True)
    assert jax.tree.structure(got) == jax.tree.structure(want)
    assert [a.shape for a in jax.tree.leaves(got)] == [a.shape for a in jax.tree.leaves(want)]


def cotangents(seed: int, outs):
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda a: jnp.asarray(rng.normal(size=a.shape), a.dtype), outs)


def scalar_loss(outs, cts):
    """sum(out * cotangent) over every output: a VJP with random cotangents as a scalar."""
    return sum(jnp.sum(o * c) for o, c in zip(jax.tree.leaves(outs), jax.tree.leaves(cts), strict=True))


@functools.cache
def vjp_both(cfg: Cfg):
    """jit: values and VJPs (W, U, b, xs, h0, c0) of lstm and lstm_ref for one configuration."""

    def run(params, xs, h0, c0, lengths, mask, resets, key, cts):
        res = []
        for fn in (lstm, lstm_ref):
            f = lambda p, x, h, c, fn=fn: call(fn, cfg, p, x, h, c, lengths, mask, resets, key)  # noqa: E731
            out, vjp = jax.vjp(f, params, xs, h0, c0)
            res.append((out, vjp(cts)))
        return res

    return jax.jit(run)


def flat_grads(g):
    (gp, gx, gh, gc) = g
    return {"W": gp.W, "U": gp.U, "b": gp.b, "xs": gx, "h0": gh, "c0": gc}


def zero_cts(cfg: Cfg, pb: Problem):
    hs = lay(cfg.time_major, np.zeros((pb.xs.shape[0], pb.xs.shape[1], pb.params.W.shape[0])))
    z = np.zeros(pb.h0.shape)
    return jax.tree.map(lambda a: jnp.asarray(a, pb.params.W.dtype), (hs, LSTMState(z, z)))


def random_cts(cfg: Cfg, pb: Problem, seed: int):
    return cotangents(seed, zero_cts(cfg, pb))


# ------------------------------------------------------------------------------------------- the option grid


def test_grids_cover_every_combination_of_their_strength():
    both = GRAD_GRID + [c for c in VALUE_GRID if c not in GRAD_GRID]
    for grid, strength in ((both, 3), (GRAD_GRID, 2)):
        assert len(grid) < len(ALL_CFGS) or FULL_GRID
        for g in itertools.combinations(range(len(LEVELS)), strength):
            assert len({tuple(c[k] for k in g) for c in grid}) == 2**strength, g


@functools.cache
def forward_both(cfg: Cfg):
    """jit: values of lstm and lstm_ref for one configuration."""
    return jax.jit(lambda *a: tuple(call(fn, cfg, *a) for fn in (lstm, lstm_ref)))


def check_values(cfg: Cfg, pb: Problem, outs, mask=None) -> None:
    hs_o, h_o, c_o = oracle(cfg, pb, mask)
    for name, (hs, (h, c)) in zip(("lstm", "lstm_ref"), outs, strict=True):
        assert hs.dtype == h.dtype == c.dtype == np.float64
        for field, a, want in (("hs", hs, hs_o), ("h", h, h_o), ("c", c, c_o)):
            np.testing.assert_allclose(a, want, rtol=VALUE_TOL, atol=VALUE_TOL, err_msg=f"{name} {field} {cfg}")


def skipped_steps(cfg: Cfg, pb: Problem) -> np.ndarray:
    """(T, B) or (B, T): the steps that do not run under cfg's mask and lengths."""
    skipped = np.zeros(pb.mask.shape, bool)
    if cfg.mask:
        skipped |= ~pb.mask
    if cfg.lengths:
        skipped |= ~length_mask(pb.lengths, pb.mask.shape[0])
    return lay(cfg.time_major, skipped)


@pytest.mark.parametrize("cfg", VALUE_GRID, ids=str)
def test_values_match_oracle(cfg):
    """Random mask pattern with an all-True and an all-False row, then an all-True mask; lengths 0..T."""
    pb = problem(seed=hash(cfg) % 1000)
    masks = [pb.mask, np.ones_like(pb.mask)] if cfg.mask else [pb.mask]
    for mask in masks:
        outs = forward_both(cfg)(*args(cfg, pb, mask))
        check_values(cfg, pb, outs, mask)
    for hs, _ in forward_both(cfg)(*args(cfg, pb)):
        assert np.all(np.asarray(hs)[skipped_steps(cfg, pb)] == 0)  # skipped steps: zero output


@pytest.mark.parametrize("cfg", GRAD_GRID, ids=str)
def test_gradients_match_ref(cfg):
    """VJPs of lstm == autodiff of lstm_ref (float64, rel 1e-10) for W, U, b, xs, h0, c0, random cotangents."""
    pb = problem(seed=hash(cfg) % 1000 + 1)
    cts = random_cts(cfg, pb, seed=1)
    (out, g), (out_r, g_r) = vjp_both(cfg)(*args(cfg, pb), cts)
    check_values(cfg, pb, (out, out_r))
    for name, a in flat_grads(g).items():
        want = flat_grads(g_r)[name]
        assert a.shape == want.shape and a.dtype == want.dtype, name
        assert rel_err(a, want) <= 1e-10, (name, rel_err(a, want))
    assert np.max(np.abs(flat_grads(g)["W"])) > 1e-3  # the comparison is not between zeros
    skipped = skipped_steps(cfg, pb)
    for gx in (flat_grads(g)["xs"], flat_grads(g_r)["xs"]):
        assert np.all(np.asarray(gx)[skipped] == 0)  # inputs of skipped steps get zero gradient


def test_float32_gradients_match_ref():
    cfg = ALL_ON_REV_BM
    pb = problem(5, dtype=np.float32)
    cts = random_cts(cfg, pb, seed=4)
    (out, g), (out_r, g_r) = vjp_both(cfg)(*args(cfg, pb), cts)
    for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(out_r), strict=True):
        assert a.dtype == np.float32
        assert rel_err(a, b) <= 1e-5
    for name, a in flat_grads(g).items():
        b = flat_grads(g_r)[name]
        assert a.dtype == b.dtype == np.float32, name
        assert rel_err(a, b) <= 1e-5, (name, rel_err(a, b))
    hs_o, h_o, c_o = oracle(cfg, pb)
    assert rel_err(out[0], hs_o) <= 1e-5 and rel_err(out[1].h, h_o) <= 1e-5 and rel_err(out[1].c, c_o) <= 1e-5


# ------------------------------------------------------------------------------------------- finite differences


def oracle_fd(cfg: Cfg, pb: Problem, cts, eps: float = 1e-6) -> dict:
    """Central differences of sum(oracle outputs * cotangents) w.r.t. W, U, b, xs, h0, c0."""
    hs_ct = np.asarray(cts[0], np.float64)
    h_ct, c_ct = np.asarray(cts[1].h, np.float64), np.asarray(cts[1].c, np.float64)
    base = {
        "W": np.asarray(pb.params.W, np.float64),
        "U": np.asarray(pb.params.U, np.float64),
        "b": np.asarray(pb.params.b, np.float64),
        "xs": np.asarray(pb.xs, np.float64),
        "h0": np.asarray(pb.h0, np.float64),
        "c0": np.asarray(pb.c0, np.float64),
    }

    def loss(v):
        hs, h, c = oracle(cfg, pb, params=(v["W"], v["U"], v["b"]), xs=v["xs"], h0=v["h0"], c0=v["c0"])
        return np.sum(hs * hs_ct) + np.sum(h * h_ct) + np.sum(c * c_ct)

    grads = {}
    for name, a in base.items():
        g = np.zeros_like(a)
        for idx in np.ndindex(a.shape):
            v = {k: x.copy() for k, x in base.items()}
            v[name][idx] += eps
            up = loss(v)
            v[name][idx] -= 2 * eps
            g[idx] = (up - loss(v)) / (2 * eps)
        grads[name] = g
    grads["xs"] = lay(cfg.time_major, grads["xs"])
    return grads


@pytest.mark.parametrize("cfg", [ALL_ON, ALL_ON_REV_BM], ids=str)
def test_gradients_match_finite_differences_of_the_oracle(cfg):
    pb = problem(11)
    cts = random_cts(cfg, pb, seed=12)
    (_, g), _ = vjp_both(cfg)(*args(cfg, pb), cts)
    fd = oracle_fd(cfg, pb, cts)
    for name, a in flat_grads(g).items():
        assert rel_err(a, fd[name]) <= FD_TOL, (name, rel_err(a, fd[name]))
    # the start feeds state0's gradient (resets restore zeros, not state0)
    assert np.max(np.abs(fd["h0"])) > 1e-3 and np.max(np.abs(fd["c0"])) > 1e-3


# ------------------------------------------------------------------------------------------- jit, vmap, grad of grad


def test_vmap_over_a_leading_axis():
    cfg = ALL_ON
    pb = problem(21)
    xs = np.stack([pb.xs, pb.xs[::-1] * 0.5, -pb.xs])  # (N, T, B, D)
    ct = np.random.default_rng(0).normal(size=(3, T, B, H))

    def loss(fn, params, x):
        hs, (h, c) = call(fn, cfg, params, x, pb.h0, pb.c0, pb.lengths, pb.mask, pb.resets, pb.key)
        return jnp.sum(hs * ct[0]) + jnp.sum(h * ct[1, 0]) + jnp.sum(c * ct[2, 0])

    run = jax.jit(jax.vmap(jax.value_and_grad(lambda p, x: loss(lstm, p, x), argnums=(0, 1)), in_axes=(None, 0)))
    vals, (gp, gx) = run(pb.params, xs)
    ref = jax.jit(jax.value_and_grad(lambda p, x: loss(lstm_ref, p, x), argnums=(0, 1)))
    for n in range(3):
        v_r, (gp_r, gx_r) = ref(pb.params, xs[n])
        assert rel_err(vals[n], v_r) <= 1e-12
        assert rel_err(gx[n], gx_r) <= 1e-10
        for a, b in zip(gp, gp_r, strict=True):
            assert rel_err(a[n], b) <= 1e-10


@pytest.mark.parametrize("cfg", [ALL_ON_REV_BM], ids=str)
def test_grad_of_grad_matches_ref(cfg):
    """Hessian-vector products (reverse over reverse) of a loss through lstm and through lstm_ref."""
    pb = problem(31)
    cts = random_cts(cfg, pb, 32)
    rng = np.random.default_rng(33)
    v = jax.tree.map(lambda a: jnp.asarray(rng.normal(size=a.shape)), (pb.params, lay(cfg.time_major, pb.xs)))

    def hvp(fn):
        def loss(p, x):
            out = call(fn, cfg, p, x, pb.h0, pb.c0, pb.lengths, *args(cfg, pb)[5:])
            return scalar_loss(out, cts)

        def gv(p, x):
            g = jax.grad(loss, argnums=(0, 1))(p, x)
            return sum(jnp.sum(a * b) for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(v), strict=True))

        return jax.jit(jax.grad(gv, argnums=(0, 1)))(pb.params, lay(cfg.time_major, pb.xs))

    got, want = hvp(lstm), hvp(lstm_ref)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert rel_err(a, b) <= 1e-10, rel_err(a, b)
    assert max(float(np.max(np.abs(a))) for a in jax.tree.leaves(want)) > 1e-3


# ------------------------------------------------------------------------------------------- resets


def neutral(pb: Problem, mask=None, resets=None) -> Problem:
    """The problem with an all-True mask, all lengths T and no resets, unless given."""
    t, b = pb.mask.shape
    return pb._replace(
        mask=np.ones((t, b), bool) if mask is None else mask,
        resets=np.zeros((t, b), bool) if resets is None else resets,
        lengths=np.full(b, t, np.int32),
    )


@pytest.mark.parametrize("cfg", [ALL_ON, ALL_ON_REV_BM], ids=str)
def test_no_gradient_crosses_a_reset(cfg):
    """With a reset of row 1 at step r, hs from r on (in visiting order) does not depend on inputs before it."""
    r = 2
    resets = np.zeros((T, B), bool)
    resets[r, 1] = True
    later = np.arange(T) <= r if cfg.reverse else np.arange(T) >= r  # visited from the reset on
    earlier = ~later
    rng = np.random.default_rng(0)
    hs_ct = np.zeros((T, B, H))
    hs_ct[later, 1] = rng.normal(size=(int(later.sum()), H))
    h_ct = np.zeros((B, H))
    h_ct[1] = rng.normal(size=H)
    cts = (jnp.asarray(lay(cfg.time_major, hs_ct)), LSTMState(jnp.asarray(h_ct), jnp.asarray(h_ct[::-1])))
    for res, crossing in ((resets, False), (np.zeros((T, B), bool), True)):
        pb = neutral(problem(41), resets=res)
        for name, (_, g) in zip(("lstm", "lstm_ref"), vjp_both(cfg)(*args(cfg, pb), cts), strict=True):
            gx = lay(cfg.time_major, np.asarray(flat_grads(g)["xs"]))
            assert np.max(np.abs(gx[later, 1])) > 1e-3
            if crossing:  # without the reset, the same outputs do depend on the earlier inputs
                assert np.max(np.abs(gx[earlier, 1])) > 1e-4, name
            else:
                assert np.all(gx[earlier, 1] == 0), (name, gx[earlier, 1])


def test_state0_gradient_comes_from_the_start_alone():
    """Row 0 restarts from zeros at steps 2 and 4: its state0 gradient == finite differences of the oracle."""
    resets = np.zeros((T, B), bool)
    resets[2, 0] = resets[4, 0] = True
    resets[1, 3] = True
    cfg = ALL_ON
    pb = neutral(problem(51), resets=resets)
    cts = random_cts(cfg, pb, 52)
    (_, g), (_, g_r) = vjp_both(cfg)(*args(cfg, pb), cts)
    fd = oracle_fd(cfg, pb, cts)
    for name in ("h0", "c0"):
        assert rel_err(flat_grads(g)[name], fd[name]) <= FD_TOL, name
        assert rel_err(flat_grads(g_r)[name], fd[name]) <= FD_TOL, name
    # a reset cuts row 0's state0 gradient short: it differs from the one without resets
    (_, g_plain), _ = vjp_both(cfg)(*args(cfg, neutral(problem(51))), cts)
    assert np.max(np.abs(np.asarray(flat_grads(g)["h0"][0]) - np.asarray(flat_grads(g_plain)["h0"][0]))) > 1e-4


def test_reset_at_a_masked_step_still_resets():
    """Row 0: step 2 masked and reset, so steps 3.. run from zeros; row 1: reset on its masked last step."""
    cfg = ALL_ON
    mask = np.ones((T, B), bool)
    resets = np.zeros((T, B), bool)
    mask[2, 0], resets[2, 0] = False, True
    mask[T - 1, 1], resets[T - 1, 1] = False, True
    pb = neutral(problem(61), mask=mask, resets=resets)
    zeros = zero_cts(cfg, pb)
    fresh, _, _ = lstm_np(*pb.params, pb.xs[3:, :1], keep_scale=dropout_scale(pb.keep[:1], P_DROP))
    carried = neutral(pb, mask=mask)  # the same mask, no resets
    runs = vjp_both(cfg)(*args(cfg, pb), zeros), vjp_both(cfg)(*args(cfg, carried), zeros)
    for (out, _), (out_c, _) in zip(*runs, strict=True):
        hs, (h, c) = out
        np.testing.assert_allclose(hs[3:, :1], fresh, rtol=VALUE_TOL, atol=VALUE_TOL)
        assert np.all(np.asarray(hs[2, 0]) == 0)
        assert np.max(np.abs(np.asarray(out_c[0][3:, 0]) - np.asarray(hs[3:, 0]))) > 1e-4
        np.testing.assert_array_equal(h[1], 0 * pb.h0[1])  # the final state of row 1 is the reset state, zeros
        np.testing.assert_array_equal(c[1], 0 * pb.c0[1])


def test_resets_without_state0_restore_zeros():
    cfg = next(c for c in GRAD_GRID if c.resets and not c.state0 and not c.reverse and c.time_major)
    resets = np.zeros((T, B), bool)
    resets[3, :] = True
    pb = neutral(problem(62), resets=resets)
    keep = dropout_scale(pb.keep, cfg.dropout) if cfg.dropout else None
    fresh, _, _ = lstm_np(*pb.params, pb.xs[3:], keep_scale=keep)
    for out, _ in vjp_both(cfg)(*args(cfg, pb), zero_cts(cfg, pb)):
        np.testing.assert_allclose(out[0][3:], fresh, rtol=VALUE_TOL, atol=VALUE_TOL)
        assert np.max(np.abs(np.asarray(out[0][:3]))) > 1e-3


# ------------------------------------------------------------------------------------------- recurrent dropout


@pytest.mark.parametrize("fn", [lstm, lstm_ref])
def test_recurrent_dropout_needs_a_key(fn):
    pb = problem(71)
    with pytest.raises(ValueError, match="key"):
        fn(pb.params, jnp.asarray(pb.xs), recurrent_dropout=0.3)


def test_stack_recurrent_dropout_needs_a_key():
    params = ((problem(0).params,),)
    with pytest.raises(ValueError, match="key"):
        lstm_stack(params, jnp.ones((T, B, D)), recurrent_dropout=0.3)


def test_recurrent_dropout_same_key_same_mask_and_keys_differ():
    pb = problem(72)
    xs = jnp.asarray(pb.xs)
    dropped = jax.jit(lambda p, x, k: lstm(p, x, recurrent_dropout=0.3, key=k))
    a = dropped(pb.params, xs, pb.key)
    b = lstm_ref(pb.params, xs, recurrent_dropout=0.3, key=pb.key)
    for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(u, v, rtol=1e-13, atol=1e-14)
    hs_o, _, _ = lstm_np(*pb.params, pb.xs, keep_scale=dropout_scale(pb.keep, 0.3))
    np.testing.assert_allclose(a[0], hs_o, rtol=VALUE_TOL, atol=VALUE_TOL)
    again = lstm(pb.params, xs, recurrent_dropout=0.3, key=pb.key)
    np.testing.assert_allclose(a[0], again[0], rtol=1e-13, atol=1e-14)
    other = dropped(pb.params, xs, jax.random.PRNGKey(12345))
    assert np.max(np.abs(np.asarray(other[0]) - np.asarray(a[0]))) > 1e-3
    plain = lstm(pb.params, xs)
    assert np.max(np.abs(np.asarray(plain[0]) - np.asarray(a[0]))) > 1e-3


@pytest.mark.parametrize("fn", [lstm, lstm_ref])
def test_zero_recurrent_dropout_is_the_plain_layer(fn):
    pb = problem(73)
    xs, s0 = jnp.asarray(pb.xs), LSTMState(jnp.asarray(pb.h0), jnp.asarray(pb.c0))
    ct = cotangents(1, (jnp.zeros((T, B, H)), s0))
    variants = ({}, dict(recurrent_dropout=0.0, key=pb.key), dict(recurrent_dropout=0.0))

    def vjps(p, x, s):
        res = []
        for kw in variants:
            out, f = jax.vjp(lambda p_, x_, s_, kw=kw: fn(p_, x_, s_, **kw), p, x, s)
            res.append((out, f(ct)))
        return res

    plain, *others = jax.jit(vjps)(pb.params, xs, s0)
    assert np.max(np.abs(np.asarray(plain[1][0].W))) > 1e-3
    for other in others:
        for u, v in zip(jax.tree.leaves(other), jax.tree.leaves(plain), strict=True):
            np.testing.assert_array_equal(u, v)


def test_recurrent_dropout_mask_is_fixed_over_time_and_only_in_h_W():
    """Zeroing W's rows where the keep mask is False for a row changes nothing for that row (so one mask)."""
    pb = problem(74, b=1)
    xs = jnp.asarray(pb.xs)
    keep = pb.keep[0]
    hs, _ = lstm(pb.params, xs, recurrent_dropout=P_DROP, key=pb.key)
    W = np.asarray(pb.params.W) * np.where(keep, 1.0 / (1.0 - P_DROP), 0.0)[:, None]
    hs_w, _ = lstm_ref(pb.params._replace(W=jnp.asarray(W)), xs)
    np.testing.assert_allclose(hs, hs_w, rtol=1e-12, atol=1e-13)
    assert 0 < keep.sum() < keep.size


# ------------------------------------------------------------------------------------------- integer lengths


INT_DTYPES = [np.int8, np.uint8, np.int16, np.uint16, np.int32, np.uint32, np.int64, np.uint64]
NARROW_T = [126, 127, 128, 129, 255, 256, 257, 300]


def _length_cases():
    cases = []
    for dt in (np.int8, np.uint8):
        cases += [(dt, t) for t in NARROW_T]
    for dt in (np.int32, np.uint32, np.int64, np.uint64):  # the limit of these is out of reach
        cases += [(dt, 300)]
    return cases


def _lengths_near_limit(dt, t: int) -> np.ndarray:
    top = min(int(np.iinfo(dt).max), t)
    vals = sorted({0, 1, top - 1, top, min(t // 2, top)})
    return np.array(vals, dtype=dt)


@functools.cache
def _both_fwd():
    return jax.jit(lambda p, x, n: (lstm(p, x, seq_lengths=n), lstm_ref(p, x, seq_lengths=n)))


@pytest.mark.parametrize("dt,t", _length_cases(), ids=lambda v: getattr(v, "__name__", str(v)))
def test_integer_lengths_are_exact_for_every_dtype_and_T(dt, t):
    lengths = _lengths_near_limit(dt, t)
    pb = problem(81, t=t, b=len(lengths), d=1, h=2)
    hs_o, h_o, c_o = lstm_np(*pb.params, pb.xs, seq_lengths=lengths)
    assert np.array_equal(length_mask(lengths, t).sum(0), [min(int(v), t) for v in lengths.tolist()])
    outs = _both_fwd()(pb.params, jnp.asarray(pb.xs), lengths)
    for name, (hs, (h, c)) in zip(("lstm", "lstm_ref"), outs, strict=True):
        np.testing.assert_allclose(hs, hs_o, rtol=VALUE_TOL, atol=VALUE_TOL, err_msg=f"{name} {dt.__name__} T={t}")
        np.testing.assert_allclose(h, h_o, rtol=VALUE_TOL, atol=VALUE_TOL, err_msg=name)
        np.testing.assert_allclose(c, c_o, rtol=VALUE_TOL, atol=VALUE_TOL, err_msg=name)


@pytest.mark.parametrize("dt", [np.uint8])
def test_narrow_lengths_padded_inputs_get_zero_gradient(dt):
    t = 300
    lengths = _lengths_near_limit(dt, t)
    pb = problem(82, t=t, b=len(lengths), d=1, h=2)
    ct = np.random.default_rng(0).normal(size=(t, len(lengths), 2))

    def grads(fn):
        return jax.jit(jax.grad(lambda x: jnp.sum(fn(pb.params, x, seq_lengths=lengths)[0] * ct)))(jnp.asarray(pb.xs))

    g, g_r = np.asarray(grads(lstm)), np.asarray(grads(lstm_ref))
    padded = ~length_mask(lengths, t)
    assert np.all(g[padded] == 0) and np.all(g_r[padded] == 0)
    assert rel_err(g, g_r) <= 1e-10


@pytest.mark.parametrize("dt,t", [(np.int16, 32770), (np.uint16, 65540)], ids=["int16-32770", "uint16-65540"])
def test_sixteen_bit_lengths_beyond_the_dtype_range(dt, t):
    """One unit, forward values of lstm only (a 65540-step scan), against the scalar oracle."""
    lengths = np.array([0, 1, int(np.iinfo(dt).max) - 1, int(np.iinfo(dt).max)], dtype=dt)
    rng = np.random.default_rng(83)
    params = LSTMParams(*(jnp.asarray(rng.normal(scale=0.5, size=s)) for s in ((1, 4), (1, 4), (4,))))
    xs = rng.normal(size=(t, len(lengths), 1))
    hs, (h, c) = jax.jit(lambda p, x, n: lstm(p, x, seq_lengths=n))(params, jnp.asarray(xs), lengths)
    hs = np.asarray(hs)
    for r, n in enumerate(lengths.tolist()):
        hs_o, h_o, c_o = lstm_np_scalar(params.W, params.U, params.b, xs[:, r, 0], int(n))
        assert np.all(hs[int(n) :, r] == 0), (r, n)
        np.testing.assert_allclose(hs[:, r, 0], hs_o, rtol=1e-11, atol=1e-12, err_msg=f"row {r} length {n}")
        np.testing.assert_allclose([h[r, 0], c[r, 0]], [h_o, c_o], rtol=1e-11, atol=1e-12)


# ------------------------------------------------------------------------------------------- out-of-range lengths


@pytest.mark.parametrize("bad", [T + 4, -3])
@pytest.mark.parametrize("which", ["lstm", "lstm_ref", "lstm_stack"])
def test_out_of_range_lengths_raise(which, bad):
    pb = problem(91)
    lengths = np.array([1, bad, 2, T], np.int32)
    xs = jnp.asarray(pb.xs)
    if which == "lstm_stack":
        params = np_stack(1, [H, H], True)
        run = lambda: lstm_stack(params, xs, seq_lengths=lengths)  # noqa: E731
    else:
        fn = {"lstm": lstm, "lstm_ref": lstm_ref}[which]
        run = lambda: fn(pb.params, xs, seq_lengths=lengths)  # noqa: E731
    with pytest.raises(ValueError) as err:
        run()
    msg = str(err.value)
    assert "seq_lengths" in msg, msg
    assert re.search(rf"(?<![\d-]){re.escape(str(bad))}(?!\d)", msg), msg
    assert re.search(rf"(?<![\d-]){T}(?!\d)", msg), msg


def test_out_of_range_lengths_are_clamped_under_jit():
    pb = problem(92)
    lengths = np.array([T + 4, -3, 2, T], np.int32)
    clamped = np.clip(lengths, 0, T)
    xs = jnp.asarray(pb.xs)
    hs_o, h_o, c_o = lstm_np(*pb.params, pb.xs, seq_lengths=clamped)
    for hs, (h, c) in jax.jit(lambda p, x, n: (lstm(p, x, seq_lengths=n), lstm_ref(p, x, seq_lengths=n)))(
        pb.params, xs, lengths
    ):
        np.testing.assert_allclose(hs, hs_o, rtol=VALUE_TOL, atol=VALUE_TOL)
        np.testing.assert_allclose(h, h_o, rtol=VALUE_TOL, atol=VALUE_TOL)
        np.testing.assert_allclose(c, c_o, rtol=VALUE_TOL, atol=VALUE_TOL)
    params = np_stack(1, [H], True)
    stack = jax.jit(lambda p, x, n: lstm_stack(p, x, seq_lengths=n))
    got, want = stack(params, xs, lengths), stack(params, xs, clamped)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-13, atol=1e-14)


# ------------------------------------------------------------------------------------------- empty batch / time


def _empty_cases():
    return [(t, b, opts) for t, b in ((T, 0), (0, B), (0, 0)) for opts in (False, True)]


@pytest.mark.parametrize("t,b,opts", _empty_cases(), ids=lambda v: str(v))
@pytest.mark.parametrize("which", ["lstm", "lstm_ref", "stack", "stack_bi"])
def test_empty_batch_and_empty_time(which, t, b, opts):
    rng = np.random.default_rng(101)
    xs = jnp.asarray(rng.normal(size=(t, b, D)))
    kw = {}
    if opts:
        kw = dict(mask=np.ones((t, b), bool), resets=np.ones((t, b), bool), seq_lengths=np.zeros(b, np.int32))
    if which in ("lstm", "lstm_ref"):
        fn = {"lstm": lstm, "lstm_ref": lstm_ref}[which]
        params = LSTMParams(*(jnp.asarray(rng.normal(size=s)) for s in ((H, 4 * H), (D, 4 * H), (4 * H,))))
        s0 = LSTMState(jnp.asarray(rng.normal(size=(b, H))), jnp.asarray(rng.normal(size=(b, H))))
        f = lambda p, x, s: fn(p, x, s, **kw)  # noqa: E731
        n_dir, h_out = 1, H
    else:
        bi = which == "stack_bi"
        params = np_stack(2, [H, 2], bi)
        n_dir = 2 if bi else 1
        s0 = tuple(
            tuple(LSTMState(jnp.asarray(rng.normal(size=(b, hh))), jnp.ones((b, hh))) for _ in range(n_dir))
            for hh in (H, 2)
        )
        f = lambda p, x, s: lstm_stack(p, x, s, **kw)  # noqa: E731
        h_out = 2 * n_dir
    ct = cotangents(5, jax.eval_shape(f, params, xs, s0))

    def forward_backward(p, x, s):
        out, vjp = jax.vjp(f, p, x, s)
        return out, vjp(ct)

    out, (g_params, g_xs, g_s0) = jax.jit(forward_backward)(params, xs, s0)
    hs, finals = out
    assert hs.shape == (t, b, h_out) and hs.dtype == np.float64
    for a, s in zip(jax.tree.leaves(finals), jax.tree.leaves(s0), strict=True):
        assert a.shape == s.shape and a.dtype == np.float64
        if t == 0:  # nothing ran: the final state is state0
            np.testing.assert_array_equal(a, s)
    for g, p in zip(jax.tree.leaves(g_params), jax.tree.leaves(params), strict=True):
        assert g.shape == p.shape and g.dtype == p.dtype
        np.testing.assert_array_equal(g, np.zeros(p.shape))
    assert g_xs.shape == xs.shape and g_xs.dtype == xs.dtype
    for g, s, c in zip(jax.tree.leaves(g_s0), jax.tree.leaves(s0), jax.tree.leaves(ct[1]), strict=True):
        assert g.shape == s.shape and g.dtype == s.dtype
        if t == 0:  # the final state is state0, so its cotangent passes through unchanged
            np.testing.assert_array_equal(g, c)


# ------------------------------------------------------------------------------------------- time_major=False


def test_batch_major_is_time_major_transposed_layer():
    """lstm and lstm_ref with time_major=False == time-major on transposed arrays: values and gradients."""
    pb = problem(111)
    cts_t = random_cts(ALL_ON, pb, 1)
    cts_b = (lay(False, cts_t[0]), cts_t[1])
    run_t = vjp_both(ALL_ON)(*args(ALL_ON, pb), cts_t)
    run_b = vjp_both(ALL_ON_BM)(*args(ALL_ON_BM, pb), cts_b)
    for (out_t, g_t), (out_b, g_b) in zip(run_t, run_b, strict=True):
        assert out_b[0].shape == (B, T, H) and g_b[1].shape == (B, T, D)
        np.testing.assert_allclose(lay(False, out_b[0]), out_t[0], rtol=1e-13, atol=1e-14)
        for a, b in zip(jax.tree.leaves(out_b[1]), jax.tree.leaves(out_t[1]), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-13, atol=1e-14)
        np.testing.assert_allclose(lay(False, g_b[1]), g_t[1], rtol=1e-12, atol=1e-13)
        for a, b in zip(jax.tree.leaves((g_b[0], g_b[2:])), jax.tree.leaves((g_t[0], g_t[2:])), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-13)


def test_batch_major_lstm_trace():
    pb = problem(112)
    kw = dict(reverse=True, recurrent_dropout=P_DROP, key=pb.key, seq_lengths=pb.lengths)
    s0 = LSTMState(jnp.asarray(pb.h0), jnp.asarray(pb.c0))
    rng = np.random.default_rng(3)
    cts = [rng.normal(size=(T, B, H)) for _ in range(6)]

    def run(time_major):
        def f(p, x):
            tr = lstm_trace(
                p, x, s0, mask=lay(time_major, pb.mask), resets=lay(time_major, pb.resets), time_major=time_major, **kw
            )
            return sum(jnp.sum(lay(time_major, a) * c) for a, c in zip(tr, cts, strict=True)), tr

        (_, tr), g = jax.value_and_grad(f, argnums=(0, 1), has_aux=True)(pb.params, lay(time_major, jnp.asarray(pb.xs)))
        return tr, g

    (tr_t, g_t), (tr_b, g_b) = jax.jit(lambda: (run(True), run(False)))()
    for a, b in zip(tr_b, tr_t, strict=True):
        assert a.shape == (B, T, H)
        np.testing.assert_allclose(lay(False, a), b, rtol=1e-13, atol=1e-14)
    np.testing.assert_allclose(lay(False, g_b[1]), g_t[1], rtol=1e-12, atol=1e-13)
    for a, b in zip(g_b[0], g_t[0], strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-13)
    hs_o, _, _ = oracle(ALL_ON._replace(reverse=True), pb)
    np.testing.assert_allclose(tr_t.h, hs_o, rtol=VALUE_TOL, atol=VALUE_TOL)
    skipped = skipped_steps(ALL_ON, pb)
    for name, a in zip(tr_t._fields, tr_t, strict=True):  # every field is zero at skipped steps
        assert np.all(np.asarray(a)[skipped] == 0), name
        assert np.max(np.abs(np.asarray(a)[~skipped])) > 1e-3, name


def _stack_problem(seed, bidirectional):
    params = np_stack(seed, [H, 2], bidirectional)
    rng = np.random.default_rng(seed)
    n_dir = 2 if bidirectional else 1
    rand = lambda hh: jnp.asarray(rng.normal(size=(B, hh)))  # noqa: E731
    states0 = tuple(tuple(LSTMState(rand(hh), rand(hh)) for _ in range(n_dir)) for hh in (H, 2))
    return params, states0


@pytest.mark.parametrize("bidirectional,dropout", [(True, 0.25)])
def test_batch_major_stack_and_gate_trace_stack(bidirectional, dropout):
    """lstm_stack and gate_trace_stack with time_major=False == time-major on transposed arrays.

    Dropout between layers included: its mask is documented per element of the (T, B, D) output.
    """
    pb = problem(113)
    params, states0 = _stack_problem(113, bidirectional)
    kw = dict(seq_lengths=pb.lengths, dropout=dropout, recurrent_dropout=P_DROP, key=pb.key)
    n_dir = 2 if bidirectional else 1
    ct_hs = jnp.asarray(np.random.default_rng(4).normal(size=(T, B, 2 * n_dir)))
    ct_fin = cotangents(5, states0)

    def run(time_major, p, xs, s0):
        m, r = lay(time_major, pb.mask), lay(time_major, pb.resets)
        x = lay(time_major, xs)

        def f(p_, x_, s_):
            hs, finals = lstm_stack(p_, x_, s_, mask=m, resets=r, time_major=time_major, **kw)
            return jnp.sum(lay(time_major, hs) * ct_hs) + scalar_loss(finals, ct_fin), (hs, finals)

        (_, out), g = jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True)(p, x, s0)
        traces = gate_trace_stack(p, x, s0, seq_lengths=pb.lengths, mask=m, resets=r, time_major=time_major)
        return out, g, traces

    both = jax.jit(lambda p, x, s: (run(True, p, x, s), run(False, p, x, s)))
    (o_t, g_t, tr_t), (o_b, g_b, tr_b) = both(params, jnp.asarray(pb.xs), states0)
    assert o_b[0].shape == (B, T, 2 * n_dir)
    np.testing.assert_allclose(lay(False, o_b[0]), o_t[0], rtol=1e-13, atol=1e-14)
    for a, b in zip(jax.tree.leaves(o_b[1]), jax.tree.leaves(o_t[1]), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-13, atol=1e-14)
    assert g_b[1].shape == (B, T, D)
    np.testing.assert_allclose(lay(False, g_b[1]), g_t[1], rtol=1e-12, atol=1e-13)
    for a, b in zip(jax.tree.leaves((g_b[0], g_b[2])), jax.tree.leaves((g_t[0], g_t[2])), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-13)
    for a, b in zip(jax.tree.leaves(tr_b), jax.tree.leaves(tr_t), strict=True):
        assert a.shape[:2] == (B, T)
        np.testing.assert_allclose(lay(False, a), b, rtol=1e-13, atol=1e-14)


# ------------------------------------------------------------------------------------------- stacks


def compose_stack(params, xs, states0, *, mask, resets, dropout, recurrent_dropout, key):
    """lstm_stack written out with lstm calls and the documented key rule."""
    n = len(params)
    drop_keys = jax.random.split(key, n - 1) if dropout > 0 and n > 1 else None
    x, finals = xs, []
    for l, layer in enumerate(params):
        outs, states = [], []
        for k, p in enumerate(layer):
            rkey = jax.random.fold_in(jax.random.fold_in(key, l), k)
            hs, fin = lstm(
                p,
                x,
                states0[l][k],
                mask=mask,
                resets=resets,
                recurrent_dropout=recurrent_dropout,
                key=rkey,
                reverse=k == 1,
            )
            outs.append(hs)
            states.append(fin)
        finals.append(tuple(states))
        x = jnp.concatenate(outs, axis=-1)
        if drop_keys is not None and l < n - 1:
            keep = jax.random.bernoulli(drop_keys[l], 1.0 - dropout, x.shape)
            x = jnp.where(keep, x / (1.0 - dropout), 0.0)
    return x, tuple(finals)


@pytest.mark.parametrize("bidirectional", [False, True])
def test_stack_with_mask_resets_recurrent_dropout(bidirectional):
    pb = problem(121)
    params, states0 = _stack_problem(121, bidirectional)
    opts = dict(mask=pb.mask, resets=pb.resets, dropout=0.2, recurrent_dropout=P_DROP, key=pb.key)
    xs = jnp.asarray(pb.xs)
    ct = cotangents(6, jax.eval_shape(lambda: lstm_stack(params, xs, states0, **opts)))

    def vjp(f):
        out, g = jax.vjp(f, params, xs, states0)
        return out, g(ct)

    if bidirectional:
        run = jax.jit(
            lambda: (
                vjp(lambda p, x, s: lstm_stack(p, x, s, **opts)),
                vjp(lambda p, x, s: lstm_stack(p, x, s, impl="autodiff", **opts)),
                compose_stack(params, xs, states0, **opts),  # values only: the gradients of lstm are checked above
            )
        )
        (out, g), (out_r, g_r), out_c = run()
    else:  # values only: the bidirectional case checks the gradients of both directions
        run = jax.jit(
            lambda: (
                lstm_stack(params, xs, states0, **opts),
                lstm_stack(params, xs, states0, impl="autodiff", **opts),
                compose_stack(params, xs, states0, **opts),
            )
        )
        (out, out_r, out_c), g, g_r = run(), (), ()
    for a, b, c in zip(jax.tree.leaves(out), jax.tree.leaves(out_r), jax.tree.leaves(out_c), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-13)
        np.testing.assert_allclose(a, c, rtol=1e-12, atol=1e-13)
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_r), strict=True):
        assert rel_err(a, b) <= 1e-10
    # the first layer, forward direction, equals the oracle with its documented recurrent key
    k0 = jax.random.fold_in(jax.random.fold_in(pb.key, 0), 0)
    keep0 = np.asarray(jax.random.bernoulli(k0, 1.0 - P_DROP, (B, H)))
    _, h_o, c_o = lstm_np(
        *params[0][0], pb.xs, *states0[0][0], mask=pb.mask, resets=pb.resets, keep_scale=dropout_scale(keep0, P_DROP)
    )
    np.testing.assert_allclose(out[1][0][0].h, h_o, rtol=VALUE_TOL, atol=VALUE_TOL)
    np.testing.assert_allclose(out[1][0][0].c, c_o, rtol=VALUE_TOL, atol=VALUE_TOL)


# ------------------------------------------------------------------------------------------- dtype rules


@pytest.mark.parametrize("fn", [lstm, lstm_ref])
def test_dtype_rules(fn):
    pb = problem(131)
    p32 = LSTMParams(*(a.astype(jnp.float32) for a in pb.params))
    xs64 = jnp.asarray(pb.xs, jnp.float64)
    hs, (h, c) = fn(p32, xs64)
    assert hs.dtype == h.dtype == c.dtype == np.float64
    hs_o, _, _ = lstm_np(*(np.asarray(a, np.float64) for a in p32), pb.xs)
    np.testing.assert_allclose(hs, hs_o, rtol=VALUE_TOL, atol=VALUE_TOL)  # float32 weights, exact float64 arithmetic

    s64 = LSTMState(jnp.asarray(pb.h0, jnp.float64), jnp.asarray(pb.c0, jnp.float64))
    hs, (h, c) = fn(p32, xs64.astype(jnp.float32), s64)
    assert hs.dtype == h.dtype == c.dtype == np.float32
    hs_o, h_o, _ = lstm_np(*(np.asarray(a, np.float64) for a in p32), pb.xs.astype(np.float32), pb.h0, pb.c0)
    assert rel_err(hs, hs_o) <= 1e-5 and rel_err(h, h_o) <= 1e-5
