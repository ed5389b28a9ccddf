"""``lstm_pallas``: interpret-mode values and gradients against ``lstm_ref`` on the CPU (options,
float64, float32, bfloat16, vmap), the size limit, and deviceless H100 compiles (one launch per
direction, fits in shared memory, no register spills by ``ptxas -v``)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from deviceless import compile_for, custom_calls, h100_mesh, loop_kernels

from jax_lstm import LSTMState, init_params, lstm, lstm_ref
from jax_lstm import pallas_lstm as pm
from jax_lstm.pallas_lstm import lstm_pallas

T, B, D, H = 6, 3, 5, 6  # H pads to 16 and B to one block of 16: the padding is exercised everywhere


def _problem(dtype, seed=0, time_major=True, H=H):
    rng = np.random.default_rng(seed)
    p = init_params(jax.random.PRNGKey(seed), D, H, dtype=dtype)
    shape = (T, B, D) if time_major else (B, T, D)
    xs = jnp.asarray(rng.normal(size=shape), dtype)
    s0 = LSTMState(*(jnp.asarray(rng.normal(scale=0.5, size=(B, H)), dtype) for _ in range(2)))
    w = jnp.asarray(rng.normal(size=(*shape[:2], H)), jnp.float32)
    return p, xs, s0, w


def _value_and_grad(fn, kw, w, reset_state=True):
    def loss(p, xs, s0, rs):
        extra = {"reset_state": rs} if "resets" in kw and reset_state else {}
        hs, (h, c) = fn(p, xs, s0, **kw, **extra)
        f32 = lambda a: a.astype(jnp.float32)  # noqa: E731
        return jnp.sum(f32(hs) * w) + jnp.sum(f32(h) * w[0, : h.shape[0]]) + jnp.sum(f32(c) * w[-1, : c.shape[0]])

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3)))


def _interpreted(*args, **kw):
    return lstm_pallas(*args, interpret=True, **kw)


def _rel(a, b):
    num = sum(
        float(jnp.sum((jnp.asarray(x, jnp.float64) - jnp.asarray(y, jnp.float64)) ** 2))
        for x, y in zip(a, b, strict=True)
    )
    return np.sqrt(num / max(sum(float(jnp.sum(jnp.asarray(y, jnp.float64) ** 2)) for y in b), 1e-300))


def _flags(time_major, seed=4):
    rng = np.random.default_rng(seed)
    shape = (T, B) if time_major else (B, T)
    return jnp.asarray(rng.random(shape) < 0.7), jnp.asarray(rng.random(shape) < 0.25)


_CASES = [
    ("plain", True, {}),
    ("lengths, resets to zeros, reverse, batch-major", False, {"seq_lengths": [T, 2, 0], "resets": 1, "reverse": True}),
    ("mask, resets to reset_state, recurrent dropout", True, {"mask": 0, "resets": 1, "recurrent_dropout": 0.3}),
]


@pytest.mark.parametrize("name,time_major,opts", _CASES, ids=[c[0] for c in _CASES])
def test_matches_lstm_ref_float64(name, time_major, opts):
    p, xs, s0, w = _problem(jnp.float64, time_major=time_major)
    flags = _flags(time_major)
    kw = {
        k: (flags[v] if k in ("mask", "resets") else jnp.asarray(v) if k == "seq_lengths" else v)
        for k, v in opts.items()
    }
    kw.update(time_major=time_major)
    if "recurrent_dropout" in kw:
        kw["key"] = jax.random.PRNGKey(7)
    rs = LSTMState(s0.c[::-1], s0.h[::-1])  # a reset state unlike state0
    with_rs = "seq_lengths" not in kw  # one case resets to zeros (no reset_state)
    got = _value_and_grad(_interpreted, kw, w, with_rs)(p, xs, s0, rs)
    want = _value_and_grad(lstm_ref, kw, w, with_rs)(p, xs, s0, rs)
    assert _rel(jax.tree.leaves(got), jax.tree.leaves(want)) < 1e-12


def test_matches_lstm_ref_float32_and_bfloat16():
    mask, resets = _flags(True)
    kw = {"mask": mask, "resets": resets}
    for dtype, tol in ((jnp.float32, 1e-5), (jnp.bfloat16, 3e-2)):
        p, xs, s0, w = _problem(dtype)
        got = _value_and_grad(_interpreted, kw, w)(p, xs, s0, s0)
        # the scan path has the same mixed-precision contract: 16-bit matmul operands, float32 state
        want = _value_and_grad(lstm if dtype == jnp.bfloat16 else lstm_ref, kw, w)(p, xs, s0, s0)
        assert _rel(jax.tree.leaves(got), jax.tree.leaves(want)) < tol, dtype
        hs, (h, c) = _interpreted(p, xs, s0, **kw)
        assert hs.dtype == h.dtype == c.dtype == dtype


def test_vmap_matches_lstm_ref():
    p, xs, s0, w = _problem(jnp.float64)
    xs2 = jnp.stack([xs, -xs])  # two problems sharing the weights
    lengths = jnp.array([[T, 2, 0], [1, T, 3]])

    def grads(fn):
        def loss(p, xs, l):
            hs, (h, c) = fn(p, xs, s0, seq_lengths=l)
            return jnp.sum(hs * w) + jnp.sum(c)

        return jax.jit(jax.vmap(jax.value_and_grad(loss, argnums=(0, 1)), in_axes=(None, 0, 0)))(p, xs2, lengths)

    assert _rel(jax.tree.leaves(grads(_interpreted)), jax.tree.leaves(grads(lstm_ref))) < 1e-12


def test_sizes_one_thread_block_cannot_hold_are_refused_at_trace_time():
    assert pm.fits(64, jnp.float32) and not pm.fits(65, jnp.float32)
    assert pm.fits(128, jnp.bfloat16) and not pm.fits(129, jnp.bfloat16)
    for dtype, h in ((jnp.float32, 128), (jnp.bfloat16, 256)):
        p = init_params(jax.random.PRNGKey(0), D, h, dtype=dtype)
        with pytest.raises(ValueError, match=r"hidden size H = \d+ .* Use jax_lstm.lstm"):
            jax.eval_shape(lambda p, x: lstm_pallas(p, x, interpret=True), p, jnp.ones((T, B, D), dtype))
    p, xs, _, _ = _problem(jnp.float32)
    with pytest.raises(ValueError, match="block_b"):
        lstm_pallas(p, xs, block_b=24, interpret=True)


def test_skipped_steps_holding_nan_reach_no_value_or_gradient():
    p, xs, s0, w = _problem(jnp.float64)
    mask, _ = _flags(True)
    poisoned = jnp.where(mask[..., None], xs, jnp.nan)
    got = jax.tree.leaves(_value_and_grad(_interpreted, {"mask": mask}, w)(p, poisoned, s0, s0))
    want = jax.tree.leaves(_value_and_grad(lstm_ref, {"mask": mask}, w)(p, xs, s0, s0))
    assert all(bool(jnp.all(jnp.isfinite(a))) for a in got)  # dxs is zero at the skipped steps
    assert _rel(got, want) < 1e-12


def test_no_steps_pass_the_state_through():
    p, xs, s0, _ = _problem(jnp.float64)
    hs, (h, c) = lstm_pallas(p, xs[:0], s0, interpret=True)
    assert hs.shape == (0, B, H) and jnp.array_equal(h, s0.h) and jnp.array_equal(c, s0.c)


# ------------------------------------------------------------------------------------------- H100

# the largest sizes the kernels take: float32 H = 64, bfloat16 H = 128 (T, B, D = 100, 32, 64)
_FITS = [(jnp.float32, 64), (jnp.bfloat16, 128)]


def _gpu_loss(T_, B_, with_options):
    def loss(p, xs):
        kw = {}
        if with_options:
            kw = dict(
                mask=jnp.ones((T_, B_), bool),
                resets=jnp.zeros((T_, B_), bool),
                recurrent_dropout=0.1,
                key=jax.random.PRNGKey(0),
            )
        hs, (h, c) = lstm_pallas(p, xs, **kw)
        return jnp.sum(hs.astype(jnp.float32)) + jnp.sum(h.astype(jnp.float32)) + jnp.sum(c.astype(jnp.float32))

    return loss


@pytest.mark.parametrize("dtype,h", _FITS, ids=["float32 H=64", "bfloat16 H=128"])
def test_h100_compile_is_one_launch_per_direction(dtype, h):
    mesh = h100_mesh()
    T_, B_ = 100, 32
    p = init_params(jax.random.PRNGKey(0), 64, h, dtype=dtype)
    xs = jnp.ones((T_, B_, 64), dtype)
    loss = _gpu_loss(T_, B_, with_options=dtype == jnp.float32)
    grad_hlo = compile_for(mesh, jax.grad(loss, argnums=(0, 1)), p, xs).as_text()
    fwd_hlo = compile_for(mesh, loss, p, xs).as_text()
    triton = "__gpu$xla.gpu.triton"
    assert custom_calls(grad_hlo)[triton] == 2 and custom_calls(fwd_hlo)[triton] == 1
    assert not [lp for lp in loop_kernels(grad_hlo) + loop_kernels(fwd_hlo) if lp["trip_count"] == T_]  # no time loop
    print(f"\nlstm_pallas {jnp.dtype(dtype).name} H={h}: forward 1 launch, gradient 2 launches for all {T_} steps")


def test_h100_compile_refuses_what_shared_memory_cannot_hold(monkeypatch):
    mesh = h100_mesh()
    monkeypatch.setattr(pm, "MAX_W_BYTES", 1 << 30)  # past the trace-time check: float32 H = 128
    p = init_params(jax.random.PRNGKey(0), 64, 128, dtype=jnp.float32)
    with pytest.raises(Exception, match="[Ss]hared memory"):
        compile_for(mesh, _gpu_loss(100, 32, False), p, jnp.ones((100, 32, 64), jnp.float32))


_PTX_WORKER = """
import sys
sys.path.insert(0, {tests!r})
import jax, jax.numpy as jnp
from deviceless import compile_for, h100_mesh
from jax_lstm import init_params
from test_pallas_lstm import _FITS, _gpu_loss
mesh = h100_mesh()
for dtype, h in _FITS:
    p = init_params(jax.random.PRNGKey(0), 64, h, dtype=dtype)
    compile_for(mesh, jax.grad(_gpu_loss(100, 32, True), argnums=(0, 1)), p, jnp.ones((100, 32, 64), dtype))
"""


def test_h100_kernels_do_not_spill_registers(tmp_path):
    h100_mesh()
    ptxas = shutil.which("ptxas")
    if ptxas is None:
        pytest.skip("no ptxas (the CUDA toolkit) on PATH")
    dump = tmp_path / "dump"
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_dump_to={dump} --xla_dump_hlo_module_re=loss")
    code = textwrap.dedent(_PTX_WORKER.format(tests=str(Path(__file__).parent)))
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    reports = []
    for ptx in sorted(dump.glob("*.ptx")):
        text = ptx.read_text()
        if ".entry lstm_pallas_" not in text:
            continue
        out = subprocess.run([ptxas, "-v", "-arch=sm_90a", str(ptx), "-o", os.devnull], capture_output=True, text=True)
        assert out.returncode == 0, out.stderr[-2000:]
        for entry, props in re.findall(
            r"Compiling entry function '(\w+)'.*?\n(.*?Used \d+ registers)", out.stderr, re.S
        ):
            spills = [int(n) for n in re.findall(r"(\d+) bytes (?:spill stores|spill loads|stack frame)", props)]
            regs = int(re.search(r"Used (\d+) registers", props)[1])
            reports.append((entry, regs, spills))
    print("\n" + "\n".join(f"{e}: {r} registers, stack/spill bytes {s}" for e, r, s in reports))
    assert sorted({e for e, _, _ in reports}) == ["lstm_pallas_bwd", "lstm_pallas_fwd"]
    assert len(reports) == 4  # two sizes, each a forward and a backward kernel
    assert all(s == [0, 0, 0] for _, _, s in reports), reports


# ------------------------------------------------------------------------------------------- lstm(impl=)


def test_lstm_impl_pallas_is_explicit_and_never_runs_on_the_cpu():
    p, xs, s0, _ = _problem(jnp.float32)
    with pytest.raises(ValueError, match="interpret"):  # Pallas's own refusal to lower for the CPU
        jax.jit(lambda p, xs: lstm(p, xs, s0, impl="pallas"))(p, xs)
    with pytest.raises(ValueError, match="impl must be"):
        lstm(p, xs, impl="cudnn")
    with pytest.raises(ValueError, match="default activations"):
        lstm(p, xs, impl="pallas", gate_fn=jax.nn.hard_sigmoid)


def test_lstm_impl_pallas_compiles_to_the_fused_kernels():
    mesh = h100_mesh()
    p = init_params(jax.random.PRNGKey(0), 64, 64, dtype=jnp.float32)

    def loss(p, xs):
        return jnp.sum(lstm(p, xs, impl="pallas", seq_lengths=jnp.full((32,), 50))[0])

    hlo = compile_for(mesh, jax.grad(loss), p, jnp.ones((100, 32, 64), jnp.float32)).as_text()
    assert custom_calls(hlo)["__gpu$xla.gpu.triton"] == 2 and not loop_kernels(hlo)
