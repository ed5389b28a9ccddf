"""The LSTM family: projection, peepholes, layer norm, alone and combined.

Values of ``lstm`` and ``lstm_ref`` against the NumPy oracle (which shares no code with jax_lstm), the
hand-written gradient of every argument against ``lstm_ref``'s autodiff with random cotangents on every
output, over a covering grid of the options (each variant meets several option sets, each option set
several variants), and against finite differences of the oracle once per variant; stacks with a
projection per layer, vmap both ways, reverse over reverse, bfloat16, traces, checkpoints and errors.
"""

from __future__ import annotations

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from numpy_oracle import dropout_scale, lstm_np

from jax_lstm import (
    LayerNormParams,
    LayerNormTrace,
    LSTMParams,
    LSTMState,
    LSTMTrace,
    checkpoint,
    gate_trace_stack,
    init_params,
    init_stack,
    lstm,
    lstm_cell,
    lstm_ref,
    lstm_stack,
    lstm_trace,
    zeros_state,
)
from jax_lstm.cell import normalize
from jax_lstm.gradcheck import random_like, rel_err

T, B, D, H, P = 5, 3, 3, 6, 4


def _vid(v) -> str:
    return "+".join(n for n, on in zip(("proj", "peep", "norm"), v, strict=True) if on)


def _problem(variant, seed=0, dtype=jnp.float64):
    """Params moved away from their init (every gate, peephole and gain exercised), xs, state0, reset state."""
    proj, peep, norm = variant
    key = jax.random.PRNGKey(seed)
    p = init_params(key, D, H, proj_size=P if proj else 0, peephole=peep, layer_norm=norm, dtype=dtype)
    p = jax.tree.map(lambda a, r: a + 0.4 * r, p, random_like(seed + 1, p))
    N = P if proj else H
    ks = jax.random.split(jax.random.fold_in(key, 7), 5)
    xs = jax.random.normal(ks[0], (T, B, D), dtype)
    s0 = LSTMState(jax.random.normal(ks[1], (B, N), dtype), jax.random.normal(ks[2], (B, H), dtype))
    sr = LSTMState(jax.random.normal(ks[3], (B, N), dtype), jax.random.normal(ks[4], (B, H), dtype))
    return p, xs, s0, sr


_MASK = np.ones((T, B), bool)
_MASK[1, 0] = _MASK[3, 2] = False
_RESETS = np.zeros((T, B), bool)
_RESETS[2, 0] = _RESETS[3, 2] = _RESETS[0, 1] = True  # one at a skipped step (row 2)


def _hard_sigmoid_np(z):
    return np.clip(z + 3.0, 0.0, 6.0) / 6.0


def _soft_sign_np(z):
    return z / (1.0 + np.abs(z))


# The option sets, and a covering grid: every variant meets one or more of them (each single variant
# two, the three together three), every option set three or four variants.
OPTIONS = [
    dict(lengths=True, unroll=2),
    dict(mask=True, resets=True, reset_state=True, reverse=True),
    dict(dropout=0.3, time_major=False),
    dict(lengths=True, resets=True, dropout=0.25, reverse=True, custom=True),
]
_PROJ, _PEEP, _NORM = (True, False, False), (False, True, False), (False, False, True)
_ALL = (True, True, True)
GRID = [
    (_PROJ, 1),
    (_PROJ, 3),
    (_PEEP, 2),
    (_PEEP, 3),
    (_NORM, 0),
    (_NORM, 1),
    ((True, True, False), 0),
    ((True, False, True), 3),
    ((False, True, True), 2),
    (_ALL, 1),
    (_ALL, 2),
    (_ALL, 3),
]


def _options(opt, N):
    """Keyword arguments of lstm/lstm_ref for option set ``opt``, and the NumPy oracle's."""
    lay = (lambda a: a) if opt.get("time_major", True) else (lambda a: np.swapaxes(a, 0, 1))
    kw, np_kw = {"reverse": opt.get("reverse", False), "time_major": opt.get("time_major", True)}, {}
    if "unroll" in opt:
        kw["unroll"] = opt["unroll"]
    if opt.get("lengths"):
        kw["seq_lengths"] = jnp.array([T, 2, 0][:B])
        np_kw["seq_lengths"] = [T, 2, 0][:B]
    if opt.get("mask"):
        kw["mask"] = jnp.asarray(lay(_MASK))
        np_kw["mask"] = lay(_MASK)
    if opt.get("resets"):
        kw["resets"] = jnp.asarray(lay(_RESETS))
        np_kw["resets"] = lay(_RESETS)
    if opt.get("dropout"):
        key = jax.random.PRNGKey(3)
        kw.update(recurrent_dropout=opt["dropout"], key=key)
        np_kw["keep_scale"] = dropout_scale(jax.random.bernoulli(key, 1 - opt["dropout"], (B, N)), opt["dropout"])
    if opt.get("custom"):
        kw.update(gate_fn=jax.nn.hard_sigmoid, activation_fn=jax.nn.soft_sign)
        np_kw.update(gate_fn=_hard_sigmoid_np, activation_fn=_soft_sign_np)
    np_kw.update(time_major=kw["time_major"], reverse=kw["reverse"])
    return kw, np_kw, lay


def _oracle(p, xs, s0, sr, np_kw):
    norm = None if p.norm is None else tuple(np.asarray(a) for a in p.norm)
    as_np = lambda a: None if a is None else np.asarray(a)  # noqa: E731
    return lstm_np(
        *(np.asarray(a) for a in p[:3]),
        np.asarray(xs),
        np.asarray(s0.h),
        np.asarray(s0.c),
        hr=None if sr is None else np.asarray(sr.h),
        cr=None if sr is None else np.asarray(sr.c),
        W_proj=as_np(p.W_proj),
        peephole=as_np(p.peephole),
        norm=norm,
        **np_kw,
    )


def _vjp_fn(fn, kw):
    @jax.jit
    def run(p, xs, s0, sr, cts):
        out, vjp = jax.vjp(lambda *a: fn(*a[:3], reset_state=a[3], **kw), p, xs, s0, sr)
        return out, vjp(cts)

    return run


def _compare(variant, opt_index, dtype, tol, seed=0):
    p, xs, s0, sr = _problem(variant, seed, dtype)
    opt = OPTIONS[opt_index]
    kw, np_kw, lay = _options(opt, P if variant[0] else H)
    sr = sr if opt.get("reset_state") else None
    x_in = jnp.asarray(lay(np.asarray(xs)))
    results = {}
    for name, fn in (("manual", lstm), ("ref", lstm_ref)):
        out = jax.eval_shape(lambda fn=fn: fn(p, x_in, s0, reset_state=sr, **kw))
        cts = random_like(seed + 11, out)
        results[name] = _vjp_fn(fn, kw)(p, x_in, s0, sr, cts)
    (out_m, g_m), (out_r, g_r) = results["manual"], results["ref"]
    assert jax.tree.structure(g_m) == jax.tree.structure(g_r)
    assert rel_err(out_m, out_r) <= tol
    for name, a, b in zip(("params", "xs", "state0", "reset_state"), g_m, g_r, strict=True):
        assert rel_err(a, b) <= tol, (name, rel_err(a, b))
    return p, x_in, s0, sr, out_m, np_kw


@pytest.mark.parametrize("variant,opt", GRID, ids=[f"{_vid(v)}-opt{k}" for v, k in GRID])
def test_values_and_gradients_match_reference_and_oracle_float64(variant, opt):
    p, x_in, s0, sr, (hs, (h, c)), np_kw = _compare(variant, opt, jnp.float64, 1e-10)
    hs_o, h_o, c_o = _oracle(p, x_in, s0, sr, np_kw)
    np.testing.assert_allclose(hs, hs_o, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(h, h_o, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(c, c_o, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("variant,opt", [(_ALL, 1), (_NORM, 3)], ids=["all-opt1", "norm-opt3"])
def test_gradients_match_reference_float32(variant, opt):
    _compare(variant, opt, jnp.float32, 1e-5)


@pytest.mark.parametrize("variant", [_PROJ, _PEEP, _NORM, _ALL], ids=_vid)
def test_gradients_match_finite_differences_of_the_oracle(variant):
    p, xs, s0, sr = _problem(variant, seed=4)
    kw, np_kw, _ = _options(dict(mask=True, resets=True, reset_state=True), P if variant[0] else H)
    cts = random_like(5, jax.eval_shape(lambda: lstm(p, xs, s0, reset_state=sr, **kw)))
    cts_np = [np.asarray(a) for a in jax.tree.leaves(cts)]

    def loss_np(args):
        outs = _oracle(*args, np_kw)
        return sum(float(np.sum(o * w)) for o, w in zip(outs, cts_np, strict=True))

    args = (p, xs, s0, sr)
    _, vjp = jax.vjp(lambda *a: lstm(*a[:3], reset_state=a[3], **kw), *args)
    grads = vjp(cts)
    eps = 1e-6
    # one random direction per leaf: <grad, v> against a central difference of the oracle
    leaves, tree = jax.tree.flatten(args)
    g_leaves = jax.tree.leaves(grads)
    for k, (a, g) in enumerate(zip(leaves, g_leaves, strict=True)):
        v = np.asarray(jax.random.normal(jax.random.PRNGKey(100 + k), a.shape, a.dtype))
        shifted = lambda s, k=k, v=v: jax.tree.unflatten(  # noqa: E731
            tree, [np.asarray(b) + (s * v if j == k else 0) for j, b in enumerate(leaves)]
        )
        fd = (loss_np(shifted(eps)) - loss_np(shifted(-eps))) / (2 * eps)
        exact = float(np.sum(np.asarray(g) * v))
        assert abs(fd - exact) <= 1e-6 * max(1.0, abs(exact)), (k, fd, exact)


def _stack_loss(impl, kw):
    def loss(params, xs, cts):
        hs, states = lstm_stack(params, xs, impl=impl, **kw)
        return jnp.sum(hs * cts[0]) + sum(jnp.sum(a * w) for a, w in zip(jax.tree.leaves(states), cts[1:], strict=True))

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))


def test_stack_with_projection_per_layer_bidirectional():
    params = init_stack(
        jax.random.PRNGKey(0), D, [6, 4], bidirectional=True, proj_size=[3, 0], peephole=True, dtype=jnp.float64
    )
    assert [layer[0].W.shape for layer in params] == [(3, 24), (4, 16)]
    assert [layer[0].U.shape[0] for layer in params] == [D, 6]
    params = jax.tree.map(lambda a, r: a + 0.3 * r, params, random_like(1, params))
    xs = jax.random.normal(jax.random.PRNGKey(2), (T, B, D))
    kw = dict(seq_lengths=jnp.array([5, 3, 1]))
    out = jax.eval_shape(lambda: lstm_stack(params, xs, **kw))
    assert out[0].shape == (T, B, 8)
    assert [s.h.shape[-1] for layer in out[1] for s in layer] == [3, 3, 4, 4]
    cts = [jnp.asarray(np.random.default_rng(3).normal(size=a.shape)) for a in jax.tree.leaves(out)]
    (v_m, g_m), (v_r, g_r) = _stack_loss("manual", kw)(params, xs, cts), _stack_loss("autodiff", kw)(params, xs, cts)
    assert abs(float(v_m - v_r)) <= 1e-10 * abs(float(v_r))
    assert rel_err(g_m, g_r) <= 1e-10
    traces = gate_trace_stack(params, xs, **kw)
    np.testing.assert_allclose(jnp.concatenate([t.h for t in traces[-1]], -1), lstm_stack(params, xs, **kw)[0])
    one = init_stack(jax.random.PRNGKey(0), D, [6, 5], proj_size=2)  # one int for every layer
    assert [layer[0].W.shape for layer in one] == [(2, 24), (2, 20)] and one[1][0].U.shape == (2, 20)


def test_vmap_both_ways_and_grad_of_grad():
    variant = _ALL
    p, xs, s0, sr = _problem(variant, seed=6)
    xs_n = jnp.stack([xs, 0.5 * xs[::-1]])  # two examples, mapped over a leading axis
    resets = jnp.asarray(_RESETS)
    kw = dict(resets=resets, mask=jnp.asarray(_MASK))
    w = random_like(8, jax.eval_shape(lambda: lstm(p, xs, s0, **kw)))

    def loss(fn, p, x, s):
        hs, (h, c) = fn(p, x, s, **kw)
        return jnp.sum(hs * w[0]) + jnp.sum(h * w[1].h) + jnp.sum(c * w[1].c)

    per_ex = {}
    for name, fn in (("manual", lstm), ("ref", lstm_ref)):
        batch = lambda p, x, fn=fn: jax.vmap(lambda x_: loss(fn, p, x_, s0))(x).sum()  # noqa: E731
        g_sum = jax.jit(jax.grad(batch, argnums=(0, 1)))(p, xs_n)
        g_each = jax.jit(jax.vmap(jax.grad(lambda p, x, fn=fn: loss(fn, p, x, s0)), in_axes=(None, 0)))(p, xs_n)
        v = random_like(9, p)  # reverse over reverse: d/dp <grad_p loss, v>
        hvp = jax.jit(jax.grad(lambda p, fn=fn, v=v: jnp.vdot(
            jnp.concatenate([a.ravel() for a in jax.tree.leaves(jax.grad(lambda q: loss(fn, q, xs, s0))(p))]),
            jnp.concatenate([a.ravel() for a in jax.tree.leaves(v)]),
        )))(p)  # fmt: skip
        per_ex[name] = (g_sum, g_each, hvp)
    for a, b in zip(per_ex["manual"], per_ex["ref"], strict=True):
        assert rel_err(a, b) <= 1e-10
    assert per_ex["manual"][1].W_proj.shape == (2, H, P)


def test_bfloat16_runs_close_to_float32():
    p, xs, s0, _ = _problem(_ALL, seed=2, dtype=jnp.float32)
    cast = lambda t: jax.tree.map(lambda a: a.astype(jnp.bfloat16), t)  # noqa: E731

    def loss(p, x):
        hs, (h, c) = lstm(p, x, seq_lengths=jnp.array([5, 4, 2]))
        return jnp.sum(hs.astype(jnp.float32) ** 2) + jnp.sum(c.astype(jnp.float32))

    v32, g32 = jax.jit(jax.value_and_grad(loss))(p, xs)
    v16, g16 = jax.jit(jax.value_and_grad(loss))(cast(p), cast(xs))
    assert all(a.dtype == jnp.bfloat16 for a in jax.tree.leaves(g16))
    assert abs(float(v16) - float(v32)) <= 0.05 * abs(float(v32))
    assert rel_err(jax.tree.map(lambda a: a.astype(jnp.float32), g16), g32) <= 0.1


def test_trace_fields_of_the_normalised_values():
    p, xs, s0, _ = _problem(_ALL, seed=3)
    tr = lstm_trace(p, xs, s0)
    np.testing.assert_allclose(tr.h, lstm(p, xs, s0)[0], rtol=1e-12, atol=1e-14)
    assert tr.h.shape == (T, B, P) and tr.c.shape == (T, B, H) and tr.x_norm.shape == (T, B, 4 * H)
    n = p.norm
    row = lambda a: a[None, None]  # noqa: E731
    np.testing.assert_allclose(tr.c_norm, normalize(tr.c) * row(n.gamma_c) + row(n.beta_c), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(tr.x_norm, normalize(xs @ p.U) * row(n.gamma_x), rtol=1e-12, atol=1e-14)
    h_prev = jnp.concatenate([s0.h[None], tr.h[:-1]])
    np.testing.assert_allclose(tr.h_norm, normalize(h_prev @ p.W) * row(n.gamma_h), rtol=1e-12, atol=1e-14)
    assert isinstance(tr, LayerNormTrace)
    plain = lstm_trace(_problem((True, True, False))[0], xs, s0)
    assert type(plain) is LSTMTrace and len(plain) == 6  # without layer norm: the six fields as before


def test_init_params_and_plain_unpacking():
    p = init_params(jax.random.PRNGKey(0), D, H, proj_size=P, peephole=True, layer_norm=True)
    assert (p.W.shape, p.U.shape, p.b.shape, p.W_proj.shape, p.peephole.shape) == (
        (P, 4 * H), (D, 4 * H), (4 * H,), (H, P), (3, H),
    )  # fmt: skip
    assert isinstance(p.norm, LayerNormParams)
    np.testing.assert_array_equal(p.norm.gamma_x, np.ones(4 * H))
    np.testing.assert_array_equal(p.norm.gamma_c, np.ones(H))
    np.testing.assert_array_equal(p.norm.beta_c, np.zeros(H))
    np.testing.assert_array_equal(p.peephole, np.zeros((3, H)))
    plain = init_params(jax.random.PRNGKey(0), D, H)
    assert plain.W_proj is None and plain.peephole is None and plain.norm is None
    W, U, b = plain  # a plain LSTM's params unpack as before
    assert len(plain) == 3 and len(jax.tree.leaves(plain)) == 3 and len(p) == 6
    assert LSTMParams(*plain)._replace(peephole=p.peephole).peephole.shape == (3, H)
    with pytest.raises(ValueError, match="proj_size"):
        init_params(jax.random.PRNGKey(0), D, H, proj_size=H)


def test_checkpoint_round_trip(tmp_path):
    stack = init_stack(jax.random.PRNGKey(0), D, [H, 5], proj_size=[P, 0], peephole=True, layer_norm=True)
    path = checkpoint.save(tmp_path / "c.npz", {"lstm": stack})
    back, _ = checkpoint.restore(path, {"lstm": stack})
    assert jax.tree.structure(back) == jax.tree.structure({"lstm": stack})
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves({"lstm": stack}), strict=True):
        np.testing.assert_array_equal(a, b)
    plain = {"lstm": init_stack(jax.random.PRNGKey(1), D, [H])}  # a plain stack keeps its leaf names
    back, _ = checkpoint.restore(checkpoint.save(tmp_path / "p.npz", plain), plain)
    assert jax.tree.structure(back) == jax.tree.structure(plain)


@pytest.mark.parametrize(
    "change, pattern",
    [
        (lambda p: p._replace(W_proj=p.W_proj[:, :2]), r"params\.W_proj has shape \(6, 2\)"),
        (lambda p: p._replace(peephole=p.peephole[:2]), r"params\.peephole has shape \(2, 6\)"),
        (lambda p: p._replace(norm=p.norm._replace(gamma_c=p.norm.gamma_x)), r"params\.norm\.gamma_c has shape"),
    ],
)
def test_bad_variant_params_raise(change, pattern):
    p, xs, _, _ = _problem(_ALL)
    for fn in (lstm, lstm_ref):
        with pytest.raises(ValueError, match=pattern):
            fn(change(p), xs)


def test_projected_state_shapes_are_checked():
    p, xs, s0, _ = _problem((True, False, False))
    with pytest.raises(ValueError, match=r"state0\.h has shape \(3, 6\), expected \(B, P\) = \(3, 4\)"):
        lstm(p, xs, LSTMState(jnp.zeros((B, H)), s0.c))
    with pytest.raises(ValueError, match=r"state0\.c has shape \(3, 4\)"):
        lstm(p, xs, LSTMState(s0.h, jnp.zeros((B, P))))
    hs, (h, c) = lstm(p, xs[:0])  # no steps: the zero state passes through, h of size P
    assert hs.shape == (0, B, P) and h.shape == (B, P) and c.shape == (B, H)


_SHARD_MAP_SCRIPT = r"""
import jax, jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
jax.config.update("jax_enable_x64", True)
from jax_lstm import init_params, lstm, lstm_ref
from jax_lstm.gradcheck import random_like, rel_err
p = init_params(jax.random.PRNGKey(0), 3, 6, proj_size=4, peephole=True, layer_norm=True, dtype=jnp.float64)
p = jax.tree.map(lambda a, r: a + 0.4 * r, p, random_like(1, p))
xs = jax.random.normal(jax.random.PRNGKey(2), (5, 4, 3))
mask = jnp.ones((5, 4), bool).at[1, 2].set(False)
resets = jnp.zeros((5, 4), bool).at[2, 0].set(True)
w = random_like(3, jax.eval_shape(lambda: lstm(p, xs)))
mesh = jax.make_mesh((2,), ("b",))
specs = (P(), P(None, "b"), P(None, "b"), P(None, "b"), P(None, "b"), P("b"), P("b"))

def loss(fn, p_, x_, m_, r_, w0, wh, wc):
    hs, (h, c) = fn(p_, x_, mask=m_, resets=r_)
    return jnp.sum(hs * w0) + jnp.sum(h * wh) + jnp.sum(c * wc)

args = (p, xs, mask, resets, w[0], w[1].h, w[1].c)
placed = tuple(jax.tree.map(lambda a, s=s: jax.device_put(a, NamedSharding(mesh, s)), a) for a, s in zip(args, specs))
local = lambda *a: jax.grad(lambda q: loss(lstm, q, *a[1:]))(a[0])  # inside: grads of the replicated params
sharded = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=specs, out_specs=P()))(*placed)
whole = jax.grad(lambda q: loss(lstm_ref, q, *args[1:]))(p)
print(rel_err(sharded, whole))
"""


def test_shard_map_over_the_batch():
    """All three variants with a mask and resets, the batch split over 2 forced host devices (a fresh process)."""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")
    out = subprocess.run(
        [sys.executable, "-c", _SHARD_MAP_SCRIPT], env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert float(out.stdout.strip().splitlines()[-1]) <= 1e-10


def test_lstm_cell_steps_like_lstm_ref():
    p, xs, s0, _ = _problem(_ALL, seed=5)
    state, outs = s0, []
    for t in range(T):
        state, h = lstm_cell(p, state, xs[t])
        outs.append(h)
    hs, final = lstm_ref(p, xs, s0)
    np.testing.assert_allclose(jnp.stack(outs), hs, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(state.c, final.c, rtol=1e-12, atol=1e-14)
    assert zeros_state(B, H, proj_size=P).h.shape == (B, P)
