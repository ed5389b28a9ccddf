"""The layer rows of ``jax-lstm bench``: the hand-written BPTT against autodiff, Flax and PyTorch.

For each shape (T, B, D, H) it times, in one interleaved run (``timing.interleave``: every
repetition visits every implementation once, in shuffled order, each call preceded by an untimed
one; medians after warm-up):

* ``lstm`` (hand-written BPTT, "manual") and ``lstm_ref`` (``jax.grad`` of a ``lax.scan``,
  "autodiff"), each at every ``unroll`` asked for; the table reports each at its best unroll (the
  smallest unroll within 3% of the fastest: closer than that is noise on this machine);
* Flax ``nn.RNN(nn.OptimizedLSTMCell)`` if flax is importable;
* ``torch.nn.LSTM`` if torch is importable;

forward only and forward plus backward (a train step, see ``variant``). For the JAX
implementations it also reports the compile time and the compiled temporary memory
(``memory_analysis().temp_size_in_bytes``) of the gradient function, and for all of them the
achieved GFLOP/s counting matmul flops only (forward ``2 T B (D + H) 4H``, backward twice that) and
its fraction of this machine's matmul peak, measured in the same run with a 4096^2 float32
``jnp.dot`` before and after the timings (the higher of the two is the peak; if they differ by more
than 15% the machine was busy and the run is flagged as noisy).
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from jax_lstm.bench.render import columns, fmt, mib
from jax_lstm.bench.timing import UNROLL_TOLERANCE, best_unroll, block, geomean, interleave
from jax_lstm.bench.variant import Shape, Variant, bench_shape, compiled_variant, problem
from jax_lstm.layers import IMPLS

__all__ = [
    "DEFAULT_SHAPES",
    "MEMORY_SHAPE",
    "PEAK_SHAPE",
    "QUICK_SHAPES",
    "QUICK_MEMORY_SHAPE",
    "TARGETS",
    "jax_variant",
    "flax_variant",
    "torch_variant",
    "measure_peak",
    "mark_best",
    "best_record",
    "summarize",
    "memory_compare",
    "bench_layer",
    "render_table",
]

DEFAULT_SHAPES: tuple[Shape, ...] = ((100, 32, 64, 128), (50, 64, 256, 512), (200, 16, 32, 64), (1000, 8, 16, 32))
MEMORY_SHAPE: Shape = (200, 32, 128, 256)  # temp-memory target: manual <= 0.75x autodiff
PEAK_SHAPE: Shape = (50, 64, 256, 512)  # matmul-peak target: manual >= 80% of peak
QUICK_SHAPES: tuple[Shape, ...] = ((6, 3, 5, 8),)
QUICK_MEMORY_SHAPE: Shape = (8, 4, 6, 8)

TARGETS = {
    "speedup_vs_autodiff": 2.0,  # geo-mean of t_autodiff / t_manual, at least
    "time_ratio_vs_torch": 1.0,  # geo-mean of t_manual / t_torch, at most
    "time_ratio_vs_torch_max": 1.0,  # t_manual / t_torch of the train step at the slowest shape, at most
    "fwd_time_ratio_vs_torch_max": 1.0,  # t_manual / t_torch of the forward at the slowest shape, at most
    "peak_fraction": 0.80,  # manual train step at PEAK_SHAPE, at least
    "memory_ratio": 0.75,  # manual / autodiff temp bytes at MEMORY_SHAPE, at most
    "compile_ratio": 1.0,  # geo-mean of manual / autodiff compile seconds, at most
}


def jax_variant(fn: Callable, shape: Shape, unroll: int, impl: str, seed: int = 0) -> Variant:
    """A variant for any function with ``lstm``'s signature (``lstm``, ``lstm_ref``, ...).

    The train step is ``jax.jit(jax.grad(loss, argnums=(0, 1)))``: gradients
    for the params and xs.
    """
    p, xs, ws = problem(shape, seed)
    p, xs, ws = jax.device_put((p, xs, ws))

    def loss(p_, xs_, w, w2, w3):
        hs, (h, c) = fn(p_, xs_, unroll=unroll)
        return jnp.sum(hs * w) + jnp.sum(h * w2) + jnp.sum(c * w3)

    return compiled_variant(impl, unroll, loss, lambda p_, xs_: fn(p_, xs_, unroll=unroll), p, xs, ws)


def _optional(name: str):
    """The module ``name``, or None if it cannot be imported."""
    try:
        return importlib.import_module(name)
    except Exception:  # noqa: BLE001 - optional
        return None


def flax_variant(shape: Shape, seed: int = 0) -> Variant | None:
    """``flax.linen.RNN(OptimizedLSTMCell)``, time-major, or None if flax is not importable."""
    if (nn := _optional("flax.linen")) is None:
        return None
    _, xs, ws = problem(shape, seed)
    model = nn.RNN(nn.OptimizedLSTMCell(shape[3]), time_major=True, return_carry=True)
    xs, ws = jax.device_put((xs, ws))
    variables = model.init(jax.random.PRNGKey(seed), xs)

    def loss(v, xs_, w, w2, w3):
        (c, h), hs = model.apply(v, xs_)
        return jnp.sum(hs * w) + jnp.sum(h * w2) + jnp.sum(c * w3)

    return compiled_variant("flax", None, loss, model.apply, variables, xs, ws)


def torch_variant(shape: Shape, seed: int = 0) -> Variant | None:
    """``torch.nn.LSTM`` on the CPU (oneDNN), float32, or None if torch is not importable."""
    if (torch := _optional("torch")) is None:
        return None
    T, B, D, H = shape
    _, xs, ws = problem(shape, seed)
    torch.manual_seed(seed)
    model = torch.nn.LSTM(D, H)
    x = torch.from_numpy(xs).requires_grad_(True)
    w, w2, w3 = (torch.from_numpy(a) for a in ws)
    leaves = [x, *model.parameters()]

    def train():
        hs, (h, c) = model(x)
        loss = (hs * w).sum() + (h[0] * w2).sum() + (c[0] * w3).sum()
        return torch.autograd.grad(loss, leaves)

    def fwd():
        with torch.inference_mode():
            return model(x)

    return Variant("torch", None, fwd=fwd, train=train)


def measure_peak(n: int = 4096, reps: int = 5) -> float:
    """Median GFLOP/s of a jitted float32 ``jnp.dot`` of two (n, n) matrices."""
    k1, k2 = jax.random.split(jax.random.PRNGKey(0))
    a = jax.random.normal(k1, (n, n), jnp.float32)
    b = jax.random.normal(k2, (n, n), jnp.float32)
    dot = jax.jit(jnp.dot).lower(a, b).compile()
    (t,) = interleave({"dot": (lambda: block(dot(a, b)),)}, warmup=1, reps=reps, settle=False).seconds["dot"]
    return 2.0 * n**3 / t / 1e9


def mark_best(records: list[dict], tol: float = UNROLL_TOLERANCE) -> None:
    """Flag each implementation's best unroll (``timing.best_unroll`` of its train steps) with ``best=True``."""
    for impl in {r["impl"] for r in records}:
        rs = [r for r in records if r["impl"] == impl]
        pick = best_unroll({r["unroll"]: r["train_ms"] for r in rs}, tol)
        for r in rs:
            r["best"] = r["unroll"] == pick


def best_record(records: list[dict], impl: str) -> dict | None:
    """The record of ``impl`` at its best unroll (see ``mark_best``)."""
    rs = [r for r in records if r["impl"] == impl]
    flagged = [r for r in rs if r.get("best")]
    return flagged[0] if flagged else (min(rs, key=lambda r: r["train_ms"]) if rs else None)


def _ratio_at_unroll(records: list[dict], key: str, unroll: int) -> float | None:
    """manual / autodiff of ``key`` at the same ``unroll``, if both were run at it."""
    m, a = ([r for r in records if r["impl"] == k and r["unroll"] == unroll] for k in ("manual", "autodiff"))
    return m[0][key] / a[0][key] if m and a and m[0][key] and a[0][key] else None


_WORST_SHAPE = ("time_ratio_vs_torch", "fwd_time_ratio_vs_torch")  # per-shape ratios whose maximum is a target


def summarize(results: list[dict], peak_gflops: float, memory: dict | None) -> dict:
    """Per-shape ratios, their geometric means and the status of every target."""
    per_shape = []
    for res in results:
        m, a, t = (best_record(res["records"], k) for k in ("manual", "autodiff", "torch"))
        row: dict[str, Any] = dict(shape=res["shape"])
        if m is not None:
            row.update(manual_unroll=m["unroll"], peak_fraction=m["train_gflops"] / peak_gflops)
        if m is not None and a is not None:
            row.update(
                autodiff_unroll=a["unroll"],
                speedup_vs_autodiff=a["train_ms"] / m["train_ms"],
                fwd_speedup_vs_autodiff=a["fwd_ms"] / m["fwd_ms"],
                compile_ratio=m["compile_s"] / a["compile_s"],
                compile_ratio_unroll1=_ratio_at_unroll(res["records"], "compile_s", 1),
                memory_ratio=(m["temp_bytes"] / a["temp_bytes"]) if m["temp_bytes"] and a["temp_bytes"] else None,
            )
        if m is not None and t is not None:
            row.update(
                time_ratio_vs_torch=m["train_ms"] / t["train_ms"], fwd_time_ratio_vs_torch=m["fwd_ms"] / t["fwd_ms"]
            )
        per_shape.append(row)

    def gm(key):
        return geomean([r.get(key) for r in per_shape])

    summary: dict[str, Any] = dict(
        per_shape=per_shape,
        geomean=dict(
            speedup_vs_autodiff=gm("speedup_vs_autodiff"),
            fwd_speedup_vs_autodiff=gm("fwd_speedup_vs_autodiff"),
            time_ratio_vs_torch=gm("time_ratio_vs_torch"),
            fwd_time_ratio_vs_torch=gm("fwd_time_ratio_vs_torch"),
            compile_ratio=gm("compile_ratio"),
            compile_ratio_unroll1=gm("compile_ratio_unroll1"),
        ),
    )
    peak_row = next((r for r in per_shape if tuple(r["shape"]) == PEAK_SHAPE), None)
    g = summary["geomean"]
    worst = {k: [r[k] for r in per_shape if r.get(k) is not None] for k in _WORST_SHAPE}
    values = dict(
        speedup_vs_autodiff=g["speedup_vs_autodiff"],
        time_ratio_vs_torch=g["time_ratio_vs_torch"],
        **{f"{k}_max": max(v) if v else None for k, v in worst.items()},
        peak_fraction=peak_row.get("peak_fraction") if peak_row else None,
        memory_ratio=memory.get("ratio") if memory else None,
        compile_ratio=g["compile_ratio"],
    )
    at_least = {"speedup_vs_autodiff", "peak_fraction"}
    summary["targets"] = {
        k: dict(
            value=v,
            target=TARGETS[k],
            direction=">=" if k in at_least else "<=",
            met=None if v is None else (v >= TARGETS[k] if k in at_least else v <= TARGETS[k]),
        )
        for k, v in values.items()
    }
    for k, v in worst.items():  # the value of every shape, in the order of the shapes
        summary["targets"][f"{k}_max"]["per_shape"] = v
    return summary


def memory_compare(shape: Shape, unroll: int = 1) -> dict:
    """Compiled temporary memory of the train step, manual vs autodiff, at ``shape``."""
    out: dict[str, Any] = dict(shape=list(shape), unroll=unroll)
    for impl, fn in IMPLS.items():
        v = jax_variant(fn, shape, unroll, impl)
        out[f"{impl}_bytes"] = v.temp_bytes
        out[f"{impl}_compile_s"] = v.compile_s
    T, B, _, H = shape
    out["gates_and_c_bytes"] = 5 * T * B * H * 4  # the strict need of a fused backward, float32
    if out["manual_bytes"] and out["autodiff_bytes"]:
        out["ratio"] = out["manual_bytes"] / out["autodiff_bytes"]
    return out


def bench_layer(
    shapes: Sequence[Shape],
    *,
    unrolls: Sequence[int],
    unroll_tol: float = UNROLL_TOLERANCE,
    warmup: int = 2,
    reps: int | None = None,
    seconds: float = 40.0,
    peak: float | None = None,
    peak_n: int = 4096,
    peak_reps: int = 5,
    flax: bool = True,
    torch: bool = True,
    memory_shape: Shape | None = MEMORY_SHAPE,
) -> dict:
    """Every shape's records, the temp-memory comparison and the summary; the matmul peak measured
    before and after the timings unless ``peak`` is given."""
    peaks = [] if peak is not None else [measure_peak(peak_n, peak_reps)]
    if peaks:
        print(f"matmul peak: {peaks[0]:.1f} GFLOP/s", file=sys.stderr)

    results = []
    for shape in shapes:
        variants: list[Variant] = []
        for impl, fn in IMPLS.items():
            variants += [jax_variant(fn, shape, u, impl) for u in unrolls]
        for wanted, make in ((flax, flax_variant), (torch, torch_variant)):
            v = make(shape) if wanted else None
            variants += [v] if v else []
        records = bench_shape(shape, variants, warmup=warmup, reps=reps, seconds=seconds)
        mark_best(records, unroll_tol)
        results.append(dict(shape=list(shape), records=records))
        line = ", ".join(f"{r['impl']}@{r['unroll']} {r['train_ms']:.1f} ms" for r in records)
        print(f"timed {shape}: {line}", file=sys.stderr)

    memory = None if memory_shape is None else memory_compare(memory_shape)
    if peak is None:
        peaks.append(measure_peak(peak_n, peak_reps))
    report = dict(
        peak_gflops=peak if peak is not None else max(peaks),
        peak_given=peak is not None,
        peak_runs_gflops=peaks,
        noisy=bool(peaks) and min(peaks) < 0.85 * max(peaks),
        peak_n=peak_n,
        unrolls=list(unrolls),
        unroll_tol=unroll_tol,
        results=results,
        memory=memory,
    )
    report["summary"] = summarize(results, report["peak_gflops"], memory)
    return report


def render_table(report: dict) -> str:
    """The stdout table: one line per implementation and shape, then ratios and targets."""
    peak = report["peak_gflops"]
    runs = report.get("peak_runs_gflops") or []
    lines = [
        f"matmul peak (jnp.dot {report['peak_n']}^2 float32): {peak:.1f} GFLOP/s"
        + (" (given by --peak)" if report.get("peak_given") else "")
        + (f" (before / after the timings: {' / '.join(f'{p:.1f}' for p in runs)})" if runs else ""),
    ]
    if report.get("noisy"):
        lines.append("WARNING: the peak moved by more than 15% during the run: the machine was busy, re-run")
    layout = ("<18", "<10", ">6", ">9", ">9", ">8", ">6", ">9", ">9")
    header = ("T,B,D,H", "impl", "unroll", "fwd ms", "train ms", "GFLOP/s", "%peak", "compile s", "temp MiB")
    lines += ["", *columns(layout, [header])]
    for res in report["results"]:
        shape = ",".join(map(str, res["shape"]))
        best = {k: best_record(res["records"], k) for k in {x["impl"] for x in res["records"]}}
        rows = [
            (
                shape,
                r["impl"],
                f"{fmt(r['unroll'], 'd'):>5}" + ("*" if best.get(r["impl"]) is r and r["unroll"] is not None else " "),
                f"{r['fwd_ms']:.2f}",
                f"{r['train_ms']:.2f}",
                f"{r['train_gflops']:.1f}",
                f"{100 * r['train_gflops'] / peak:5.1f}%",
                fmt(r["compile_s"], ".2f"),
                mib(r["temp_bytes"]),
            )
            for r in res["records"]
        ]
        lines += [*columns(layout, rows), ""]
    lines.append(
        f"* = best unroll (the smallest within {100 * report.get('unroll_tol', UNROLL_TOLERANCE):.0f}% of the fastest "
        "train step), used in the ratios below"
    )
    lines.append("")
    s = report["summary"]
    layout = ("<18", ">23", ">13", ">21", ">13", ">12", ">9")
    header = ("T,B,D,H", "train: autodiff/manual", "manual/torch", "fwd: autodiff/manual", "manual/torch")
    keys = ("speedup_vs_autodiff", "time_ratio_vs_torch", "fwd_speedup_vs_autodiff", "fwd_time_ratio_vs_torch")
    rows = [(*header, "compile m/a", "temp m/a")]
    rows += [
        (",".join(map(str, r["shape"])), *(fmt(r.get(k), ".2f") for k in (*keys, "compile_ratio", "memory_ratio")))
        for r in s["per_shape"]
    ]
    g = s["geomean"]
    rows.append(("geometric mean", *(fmt(g[k], ".2f") for k in (*keys, "compile_ratio"))))
    lines += columns(layout, rows)
    mem = report.get("memory")
    if mem:
        lines += [
            "",
            f"temp memory of the train step at {tuple(mem['shape'])}, unroll {mem['unroll']}: "
            f"manual {mib(mem['manual_bytes'])} MiB, autodiff {mib(mem['autodiff_bytes'])} MiB, "
            f"ratio {fmt(mem.get('ratio'), '.2f')} (gates + c, 5*T*B*H float32: "
            f"{mem['gates_and_c_bytes'] / 2**20:.2f} MiB)",
        ]
    lines += ["", "targets (float32; the train step unless the line says forward):"]
    names = {
        "speedup_vs_autodiff": "manual speed-up over best autodiff, geo-mean",
        "time_ratio_vs_torch": "manual / torch.nn.LSTM time, geo-mean",
        "time_ratio_vs_torch_max": "manual / torch.nn.LSTM time, slowest shape",
        "fwd_time_ratio_vs_torch_max": "manual / torch.nn.LSTM forward time, slowest shape",
        "peak_fraction": f"manual fraction of matmul peak at {PEAK_SHAPE}",
        "memory_ratio": f"manual / autodiff temp memory at {tuple(mem['shape']) if mem else MEMORY_SHAPE}",
        "compile_ratio": "manual / autodiff compile time at best unrolls, geo-mean",
    }
    for k, t in s["targets"].items():
        status = "n/a" if t["met"] is None else ("met" if t["met"] else "MISSED")
        line = f"  {names[k]:<58} {fmt(t['value'], '6.2f'):>6} {t['direction']} {t['target']:<5} {status}"
        if t.get("per_shape"):
            line += f"  (per shape: {', '.join(f'{v:.2f}' for v in t['per_shape'])})"
        lines.append(line)
    if g.get("compile_ratio_unroll1") is not None:
        lines.append(f"  (compile time manual / autodiff both at unroll 1, geo-mean: {g['compile_ratio_unroll1']:.2f})")
    return "\n".join(lines)
