"""The GPU check: values and gradients against ``lstm_ref``, then train-step timings. One call, under 8 minutes.

    python bench/gpu_check.py --out DIR          # on a GPU machine; installs nothing
    python bench/gpu_check.py --dry-run --out DIR  # on the CPU, tiny shapes, Pallas in interpret mode

It uses the jax (and torch, if any) already installed, and the jax_lstm of this checkout.

1. Checks, in float32 with the highest matmul precision: the values and every gradient of
   ``lstm`` (the scan path) and, where it exists, ``lstm_pallas`` (the fused Pallas path)
   against ``lstm_ref`` (autodiff of a plain scan), plain and with lengths, a mask, resets
   and reverse, by relative error ``|a - ref| / |ref|`` over the whole pytree.
2. Times the train step (forward and backward of ``sum(hs * w)`` with respect to the weights
   and the inputs) of: ``scan`` (``lstm``), ``pallas`` (``lstm_pallas``, where H fits one
   CTA), ``autodiff`` (``jax.grad`` of ``lstm_ref``), ``cudnn`` (``jax.experimental.rnn``,
   float32 only) and ``torch`` (``torch.nn.LSTM``, cuDNN), at DeepBench-like shapes
   (T, B, H with D = H) in float32 and bfloat16. Each time is the median over repeats of
   the mean of a few back-to-back calls, waited on with ``block_until_ready``
   (``torch.cuda.synchronize``), after a warm-up call; compile time is reported apart.
   Shapes are visited smallest first and the timings stop at ``--budget`` seconds.

Writes ``gpu_check.json`` (every number, the versions and the device) and ``gpu_check.md``
(the tables) to ``--out``, and prints the tables last. Exit status 1 if a check fails.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's jax_lstm

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from jax_lstm import LSTMState, init_params, lstm, lstm_ref  # noqa: E402

try:
    from jax_lstm import pallas_lstm

    PALLAS_WHY = None
except Exception as e:  # noqa: BLE001 - a checkout without the Pallas path, or a jax whose Pallas differs
    pallas_lstm, PALLAS_WHY = None, f"{type(e).__name__}: {e}"[:300]

# (T, B, H), D = H: a subset of DeepBench's LSTM training shapes that fits the time budget
SHAPES = [
    (25, 32, 64),
    (100, 32, 64),
    (1000, 4, 64),
    (100, 128, 128),
    (1000, 32, 128),
    (25, 4, 256),
    (100, 32, 256),
    (100, 128, 512),
    (1000, 32, 512),
    (25, 128, 1024),
    (100, 32, 1024),
]
DRY_SHAPES = [(5, 3, 16)]
DTYPES = ("float32", "bfloat16")
IMPLS = ("scan", "pallas", "autodiff", "cudnn", "torch")
CHECK_TOL = 1e-4  # float32 with the highest matmul precision lands far under this


def rel_err(a, b) -> float:
    a = [np.asarray(x, np.float64) for x in jax.tree.leaves(a)]
    b = [np.asarray(x, np.float64) for x in jax.tree.leaves(b)]
    num = math.sqrt(sum(float(np.sum((x - y) ** 2)) for x, y in zip(a, b, strict=True)))
    den = math.sqrt(sum(float(np.sum(y**2)) for y in b))
    return num / max(den, 1e-30)


def _problem(T, B, D, H, dtype, seed=0):
    rng = np.random.default_rng(seed)
    p = init_params(jax.random.PRNGKey(seed), D, H, dtype=jnp.dtype(dtype))
    xs = jnp.asarray(rng.normal(size=(T, B, D)), dtype)
    s0 = LSTMState(*(jnp.asarray(rng.normal(scale=0.5, size=(B, H)), dtype) for _ in range(2)))
    w = jnp.asarray(rng.normal(size=(T, B, H)), jnp.float32)
    return p, xs, s0, w


def _loss(fn, **kw):
    def loss(p, xs, s0, w):
        hs, (h, c) = fn(p, xs, s0, **kw)
        f32 = lambda a: a.astype(jnp.float32)  # noqa: E731
        return jnp.sum(f32(hs) * w) + jnp.sum(f32(h) * w[-1]) + jnp.sum(f32(c) * w[0])

    return loss


def _pallas_fits(H, dtype) -> bool:
    return pallas_lstm is not None and pallas_lstm.fits(H, jnp.dtype(dtype))


# ------------------------------------------------------------------------------------------- checks


def check(dry: bool) -> list[dict]:
    """Values and gradients of the scan and Pallas paths against lstm_ref, float32, highest precision."""
    T, B, D, H = (7, 3, 5, 8) if dry else (50, 16, 48, 64)
    rng = np.random.default_rng(1)
    options = {
        "plain": {},
        "lengths, reverse": {"seq_lengths": jnp.asarray(rng.integers(0, T + 1, B), jnp.int32), "reverse": True},
        "mask, resets": {
            "mask": jnp.asarray(rng.random((T, B)) < 0.8),
            "resets": jnp.asarray(rng.random((T, B)) < 0.1),
        },
    }
    impls = {"scan": lstm}
    if pallas_lstm is not None and _pallas_fits(H, "float32"):
        highest = jax.lax.Precision.HIGHEST  # the in-kernel matmuls too
        impls["pallas"] = lambda *a, **k: pallas_lstm.lstm_pallas(*a, interpret=dry, precision=highest, **k)
    results = []
    p, xs, s0, w = _problem(T, B, D, H, "float32", seed=2)
    with jax.default_matmul_precision("highest"):
        for opt_name, kw in options.items():
            ref_val = jax.jit(_loss(lstm_ref, **kw))(p, xs, s0, w)
            ref_out = jax.jit(lambda p, xs, s0, kw=kw: lstm_ref(p, xs, s0, **kw))(p, xs, s0)
            ref_grad = jax.jit(jax.grad(_loss(lstm_ref, **kw), argnums=(0, 1, 2)))(p, xs, s0, w)
            for name, fn in impls.items():
                rec = {"impl": name, "options": opt_name, "shape": [T, B, D, H]}
                try:
                    out = jax.jit(lambda p, xs, s0, fn=fn, kw=kw: fn(p, xs, s0, **kw))(p, xs, s0)
                    grad = jax.jit(jax.grad(_loss(fn, **kw), argnums=(0, 1, 2)))(p, xs, s0, w)
                    val = jax.jit(_loss(fn, **kw))(p, xs, s0, w)
                    rec.update(
                        value_err=rel_err(out, ref_out),
                        loss_err=rel_err(val, ref_val),
                        grad_err=rel_err(grad, ref_grad),
                    )
                    rec["ok"] = bool(max(rec["value_err"], rec["grad_err"]) < CHECK_TOL)
                except Exception as e:  # noqa: BLE001 - recorded and reported, the run goes on
                    rec.update(ok=False, error=f"{type(e).__name__}: {e}"[:500])
                results.append(rec)
    return results


# ------------------------------------------------------------------------------------------- timing


def _median_ms(run, sync, reps: int, budget_s: float) -> tuple[float, float, int]:
    """(median ms per call, first call's seconds, calls per repeat). The first call compiles."""
    t0 = time.perf_counter()
    sync(run())
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    sync(run())
    once = max(time.perf_counter() - t0, 1e-6)
    per = max(1, min(50, int(0.02 / once)))  # calls per repeat: about 20 ms of work
    reps = max(2, min(reps, int(budget_s / (once * per)) or 2))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(per):
            out = run()
        sync(out)
        times.append((time.perf_counter() - t0) / per * 1e3)
    return statistics.median(times), first, per


def _jax_step(impl, T, B, H, dtype, dry):
    p, xs, s0, w = _problem(T, B, H, H, dtype)
    if impl == "cudnn":
        from jax.experimental import rnn

        wflat = rnn.init_lstm_weight(jax.random.PRNGKey(0), H, H, 1, False)
        lengths = jnp.full((B,), T, jnp.int32)
        xb = jnp.swapaxes(xs, 0, 1)
        wb = jnp.swapaxes(w, 0, 1)

        def loss(wflat, xb):
            y, _, _ = rnn.lstm(xb, s0.h[None], s0.c[None], wflat, lengths, H, H, 1, 0.0, False)
            return jnp.sum(y * wb)

        step = jax.jit(jax.grad(loss, argnums=(0, 1)))
        return lambda: step(wflat, xb)
    fn = {"scan": lstm, "autodiff": lstm_ref}.get(impl)
    if impl == "pallas":
        fn = lambda *a, **k: pallas_lstm.lstm_pallas(*a, interpret=dry, **k)  # noqa: E731
    step = jax.jit(jax.grad(_loss(fn), argnums=(0, 1)))
    return lambda: step(p, xs, s0, w)


def _torch_step(T, B, H, dtype, device):
    import torch

    tdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    torch.manual_seed(0)
    mod = torch.nn.LSTM(H, H).to(device=device, dtype=tdtype)
    x = torch.randn(T, B, H, device=device, dtype=tdtype, requires_grad=True)
    w = torch.randn(T, B, H, device=device, dtype=tdtype)

    def run():
        mod.zero_grad(set_to_none=True)
        x.grad = None
        out, _ = mod(x)
        (out.float() * w.float()).sum().backward()
        return x.grad

    return run


def _torch_device(dry):
    try:
        import torch
    except ImportError:
        return None, "torch not installed"
    if torch.cuda.is_available():
        return "cuda", None
    if not dry:
        return None, "torch sees no GPU"
    torch.set_num_threads(1)  # tiny shapes: threads only contend
    return "cpu", None


def time_all(shapes, dtypes, reps: int, budget_s: float, dry: bool, log) -> list[dict]:
    on_gpu = jax.default_backend() == "gpu"
    torch_device, torch_why = _torch_device(dry)
    start = time.perf_counter()
    results = []
    for T, B, H in sorted(shapes, key=lambda s: s[0] * s[1] * s[2] ** 2):
        for dtype in dtypes:
            for impl in IMPLS:
                rec = {"impl": impl, "dtype": dtype, "T": T, "B": B, "D": H, "H": H}
                left = budget_s - (time.perf_counter() - start)
                why = None
                if left <= 0:
                    why = "time budget spent"
                elif impl == "pallas" and pallas_lstm is None:
                    why = "no Pallas path in this checkout"
                elif impl == "pallas" and not _pallas_fits(H, dtype):
                    why = "H does not fit one CTA"
                elif impl == "cudnn" and not on_gpu:
                    why = "cuDNN only"
                elif impl == "cudnn" and dtype != "float32":
                    why = "no bfloat16 in jax.experimental.rnn"
                elif impl == "torch" and torch_device is None:
                    why = torch_why
                if why is not None:
                    results.append({**rec, "skipped": why})
                    continue
                try:
                    if impl == "torch":
                        import torch

                        run = _torch_step(T, B, H, dtype, torch_device)
                        sync = lambda _: torch.cuda.synchronize() if torch_device == "cuda" else None  # noqa: E731
                    else:
                        run, sync = _jax_step(impl, T, B, H, dtype, dry), jax.block_until_ready
                    ms, first_s, per = _median_ms(run, sync, reps, min(20.0, left))
                    rec.update(ms=ms, first_call_s=first_s, calls_per_repeat=per)
                    log(f"{impl:9s} {dtype:9s} T={T:5d} B={B:4d} H={H:5d}: {ms:9.3f} ms (first call {first_s:.1f} s)")
                except Exception as e:  # noqa: BLE001 - recorded, the run goes on
                    rec["error"] = f"{type(e).__name__}: {e}"[:500]
                    log(f"{impl:9s} {dtype:9s} T={T:5d} B={B:4d} H={H:5d}: error {rec['error'][:200]}")
                results.append(rec)
    return results


# ------------------------------------------------------------------------------------------- report


def markdown(report: dict) -> str:
    lines = [f"Device: {report['device']}; jax {report['versions']['jax']}; torch {report['versions']['torch']}.", ""]
    lines += ["Checks against lstm_ref (float32, highest precision), relative error:", ""]
    lines += ["| impl | options | value | gradient | ok |", "|---|---|---|---|---|"]
    for r in report["checks"]:
        if "error" in r:
            lines.append(f"| {r['impl']} | {r['options']} | error | {r['error'][:80]} | no |")
        else:
            ok = "yes" if r["ok"] else "**no**"
            lines.append(f"| {r['impl']} | {r['options']} | {r['value_err']:.1e} | {r['grad_err']:.1e} | {ok} |")
    lines += ["", "Train step (forward + backward), median ms:", ""]
    lines += ["| dtype | T, B, H (D = H) | " + " | ".join(IMPLS) + " | scan / best other |"]
    lines += ["|---" * (len(IMPLS) + 3) + "|"]
    cells = {}
    for r in report["timings"]:
        key = (r["dtype"], r["T"], r["B"], r["H"])
        cells.setdefault(key, {})[r["impl"]] = r
    for (dtype, T, B, H), row in cells.items():
        shown = []
        for impl in IMPLS:
            r = row.get(impl, {})
            shown.append(f"{r['ms']:.3f}" if "ms" in r else ("error" if "error" in r else "-"))
        others = [row[i]["ms"] for i in IMPLS if i != "scan" and "ms" in row.get(i, {})]
        ratio = f"{row['scan']['ms'] / min(others):.2f}" if "ms" in row.get("scan", {}) and others else ""
        lines.append(f"| {dtype} | {T}, {B}, {H} | " + " | ".join(shown) + f" | {ratio} |")
    lines.append("")
    return "\n".join(lines)


def _versions() -> dict:
    v = {"jax": jax.__version__, "python": platform.python_version(), "torch": None}
    try:
        import torch

        v["torch"] = torch.__version__
    except ImportError:
        pass
    return v


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="gpu_check_out", help="folder for gpu_check.json and gpu_check.md")
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, Pallas in interpret mode")
    ap.add_argument("--budget", type=float, default=None, help="seconds for the timings (default 330; dry run 60)")
    ap.add_argument("--reps", type=int, default=None, help="timed repeats per case (default 15; dry run 2)")
    args = ap.parse_args(argv)
    dry = args.dry_run
    if not dry and jax.default_backend() != "gpu":
        print(f"no GPU: jax's backend is {jax.default_backend()!r}; use --dry-run on the CPU", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    log = lambda s: print(s, flush=True)  # noqa: E731
    device = str(jax.devices()[0].device_kind)
    log(f"device {device}, jax {jax.__version__}, Pallas path: {PALLAS_WHY or 'yes'}")
    try:
        checks = check(dry)
    except Exception:  # noqa: BLE001 - the timings still run
        checks = [{"impl": "all", "options": "-", "ok": False, "error": traceback.format_exc()[-500:]}]
    for r in checks:
        log(f"check {r['impl']:7s} {r['options']:16s} " + ("ok" if r["ok"] else "FAILED ") + str(r.get("error", "")))
    shapes = DRY_SHAPES if dry else SHAPES
    budget = args.budget if args.budget is not None else (60.0 if dry else 330.0)
    reps = args.reps if args.reps is not None else (2 if dry else 15)
    timings = time_all(shapes, DTYPES, reps, budget, dry, log)
    report = {
        "device": device,
        "backend": jax.default_backend(),
        "dry_run": dry,
        "versions": _versions(),
        "pallas_import_error": PALLAS_WHY,
        "checks": checks,
        "timings": timings,
        "seconds": time.perf_counter() - t0,
    }
    (out / "gpu_check.json").write_text(json.dumps(report, indent=1))
    table = markdown(report)
    (out / "gpu_check.md").write_text(table)
    print(table)
    print(f"{report['seconds']:.0f} s; wrote {out / 'gpu_check.json'} and {out / 'gpu_check.md'}")
    return 0 if all(r["ok"] for r in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
