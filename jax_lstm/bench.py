"""``jax-lstm bench``: the hand-written BPTT against autodiff, Flax and PyTorch.

For each shape (T, B, D, H) it times, in one interleaved run (every repetition
visits every implementation once, in shuffled order, each call preceded by an
untimed one; medians after warm-up):

* ``lstm`` (hand-written BPTT, "manual") and ``lstm_ref`` (``jax.grad`` of a
  ``lax.scan``, "autodiff"), each at every ``unroll`` asked for; the table
  reports each at its best unroll (the smallest unroll within 3% of the
  fastest: closer than that is noise on this machine);
* Flax ``nn.RNN(nn.OptimizedLSTMCell)`` if flax is importable;
* ``torch.nn.LSTM`` if torch is importable;

forward only and forward plus backward (a train step: gradients of
``sum(hs * w) + sum(h_T * w2) + sum(c_T * w3)``, fixed random ``w``s, with
respect to the parameters and ``xs``). For the JAX implementations it also
reports the compile time and the compiled temporary memory
(``memory_analysis().temp_size_in_bytes``) of the gradient function, and for
all of them the achieved GFLOP/s counting matmul flops only (forward
``2 T B (D + H) 4H``, backward twice that) and its fraction of this machine's
matmul peak, measured in the same run with a 4096^2 float32 ``jnp.dot`` before
and after the timings (the higher of the two is the peak; if they differ by
more than 15% the machine was busy and the run is flagged as noisy).

Output: a table on stdout with the ratios the performance targets are stated
in, ``--json FILE`` and ``--plot FILE`` (PNG).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jax_lstm.bptt import lstm
from jax_lstm.cell import LSTMParams, init_params
from jax_lstm.reference import lstm_ref

__all__ = [
    "DEFAULT_SHAPES",
    "MEMORY_SHAPE",
    "PEAK_SHAPE",
    "Variant",
    "mark_best",
    "jax_variant",
    "flax_variant",
    "torch_variant",
    "matmul_flops",
    "measure_peak",
    "temp_bytes",
    "bench_shape",
    "summarize",
    "plot",
    "ModelVariant",
    "model_variants",
    "bench_models",
    "render_models_table",
    "OPTIONS",
    "option_variant",
    "bench_options",
    "render_options_table",
    "main",
]

Shape = tuple[int, int, int, int]

DEFAULT_SHAPES: tuple[Shape, ...] = ((100, 32, 64, 128), (50, 64, 256, 512), (200, 16, 32, 64), (1000, 8, 16, 32))
MEMORY_SHAPE: Shape = (200, 32, 128, 256)  # temp-memory target: manual <= 0.75x autodiff
PEAK_SHAPE: Shape = (50, 64, 256, 512)  # matmul-peak target: manual >= 80% of peak
UNROLL_TOLERANCE = 0.03  # unrolls within 3% of the fastest count as equally fast; the smallest wins
QUICK_SHAPES: tuple[Shape, ...] = ((6, 3, 5, 8),)
QUICK_MEMORY_SHAPE: Shape = (8, 4, 6, 8)

TARGETS = {
    "speedup_vs_autodiff": 2.0,  # geo-mean of t_autodiff / t_manual, at least
    "time_ratio_vs_torch": 1.0,  # geo-mean of t_manual / t_torch, at most
    "peak_fraction": 0.80,  # manual train step at PEAK_SHAPE, at least
    "memory_ratio": 0.75,  # manual / autodiff temp bytes at MEMORY_SHAPE, at most
    "compile_ratio": 1.0,  # geo-mean of manual / autodiff compile seconds, at most
}


@dataclasses.dataclass
class Variant:
    """One implementation at one setting, ready to time.

    ``fwd`` and ``train`` run one forward / train step and block until done.
    """

    impl: str  # "manual", "autodiff", "flax", "torch" or a name of one's own
    unroll: int | None
    fwd: Callable[[], Any]
    train: Callable[[], Any]
    compile_s: float | None = None  # lower + compile of the train step
    temp_bytes: int | None = None  # compiled temporary memory of the train step

    @property
    def name(self) -> str:
        return self.impl if self.unroll is None else f"{self.impl}@u{self.unroll}"


def matmul_flops(shape: Shape) -> tuple[float, float]:
    """Matmul flops of (forward, forward + backward) of one layer over (T, B, D, H)."""
    T, B, D, H = shape
    fwd = 2.0 * T * B * (D + H) * 4 * H
    return fwd, 3.0 * fwd


def _problem(shape: Shape, seed: int = 0):
    """float32 params, xs and the three fixed loss weights, as numpy arrays."""
    T, B, D, H = shape
    rng = np.random.default_rng(seed)
    p = init_params(jax.random.PRNGKey(seed), D, H, dtype=jnp.float32)
    p = LSTMParams(*(np.asarray(a) for a in p))
    f32 = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    xs = f32(T, B, D)
    return p, xs, (f32(T, B, H), f32(B, H), f32(B, H))


def _block(x):
    return jax.block_until_ready(x)


def temp_bytes(compiled) -> int | None:
    """``temp_size_in_bytes`` of a compiled executable's memory analysis, or None."""
    try:
        return int(compiled.memory_analysis().temp_size_in_bytes)
    except Exception:  # noqa: BLE001 - backends without memory analysis
        return None


def jax_variant(fn: Callable, shape: Shape, unroll: int, impl: str, seed: int = 0) -> Variant:
    """A variant for any function with ``lstm``'s signature (``lstm``, ``lstm_ref``, ...).

    The train step is ``jax.jit(jax.grad(loss, argnums=(0, 1)))``: gradients
    for the params and xs.
    """
    p, xs, ws = _problem(shape, seed)
    p, xs, ws = jax.device_put((p, xs, ws))

    def loss(p_, xs_, w, w2, w3):
        hs, (h, c) = fn(p_, xs_, unroll=unroll)
        return jnp.sum(hs * w) + jnp.sum(h * w2) + jnp.sum(c * w3)

    return _compiled_variant(impl, unroll, loss, lambda p_, xs_: fn(p_, xs_, unroll=unroll), p, xs, ws)


def _compiled_variant(name: str, unroll: int | None, loss: Callable, forward: Callable, params, xs, ws) -> Variant:
    """Compile ``forward(params, xs)`` and the train step ``grad(loss)(params, xs, *ws)`` (timing the latter)."""
    t0 = time.perf_counter()
    train = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(params, xs, *ws).compile()
    compile_s = time.perf_counter() - t0
    fwd = jax.jit(forward).lower(params, xs).compile()
    return Variant(
        name,
        unroll,
        fwd=lambda: _block(fwd(params, xs)),
        train=lambda: _block(train(params, xs, *ws)),
        compile_s=compile_s,
        temp_bytes=temp_bytes(train),
    )


def flax_variant(shape: Shape, seed: int = 0) -> Variant | None:
    """``flax.linen.RNN(OptimizedLSTMCell)``, time-major, or None if flax is not importable."""
    try:
        import flax.linen as nn
    except Exception:  # noqa: BLE001 - optional
        return None
    T, B, D, H = shape
    _, xs, ws = _problem(shape, seed)
    model = nn.RNN(nn.OptimizedLSTMCell(H), time_major=True, return_carry=True)
    xs, ws = jax.device_put((xs, ws))
    variables = model.init(jax.random.PRNGKey(seed), xs)

    def loss(v, xs_, w, w2, w3):
        (c, h), hs = model.apply(v, xs_)
        return jnp.sum(hs * w) + jnp.sum(h * w2) + jnp.sum(c * w3)

    return _compiled_variant("flax", None, loss, model.apply, variables, xs, ws)


def torch_variant(shape: Shape, seed: int = 0) -> Variant | None:
    """``torch.nn.LSTM`` on the CPU (oneDNN), float32, or None if torch is not importable."""
    try:
        import torch
    except Exception:  # noqa: BLE001 - optional
        return None
    T, B, D, H = shape
    _, xs, ws = _problem(shape, seed)
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


def _time(f: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    f()
    return time.perf_counter() - t0


def measure_peak(n: int = 4096, reps: int = 5) -> float:
    """Median GFLOP/s of a jitted float32 ``jnp.dot`` of two (n, n) matrices."""
    k1, k2 = jax.random.split(jax.random.PRNGKey(0))
    a = jax.random.normal(k1, (n, n), jnp.float32)
    b = jax.random.normal(k2, (n, n), jnp.float32)
    dot = jax.jit(jnp.dot).lower(a, b).compile()
    _block(dot(a, b))
    times = [_time(lambda: _block(dot(a, b))) for _ in range(reps)]
    return 2.0 * n**3 / statistics.median(times) / 1e9


def bench_shape(
    shape: Shape,
    variants: Sequence[Variant],
    *,
    warmup: int = 2,
    reps: int | None = None,
    seconds: float = 40.0,
    min_reps: int = 5,
    max_reps: int = 50,
) -> list[dict]:
    """Time every variant, interleaved, and return one record per variant.

    Each repetition visits every variant once, in a freshly shuffled order
    (seeded), and runs its forward, then its train step, each first untimed
    and then timed: the untimed call absorbs what the previous variant left
    behind (torch's OpenMP threads spin for milliseconds after a call; caches
    hold the other variant's data), so no variant pays for its neighbour.
    ``reps`` (or, if None, as many as fit in ``seconds``, within
    [min_reps, max_reps]) repetitions follow ``warmup`` untimed ones.
    """
    fwd_t: dict[str, list[float]] = {v.name: [] for v in variants}
    train_t: dict[str, list[float]] = {v.name: [] for v in variants}
    t_round = 0.0
    for _ in range(max(warmup, 1)):
        t0 = time.perf_counter()
        for v in variants:
            v.fwd()
            v.fwd()
            v.train()
            v.train()
        t_round = time.perf_counter() - t0
    if reps is None:
        reps = int(min(max_reps, max(min_reps, seconds // max(t_round, 1e-9))))
    rng = random.Random(0)
    order = list(variants)
    for _ in range(reps):
        rng.shuffle(order)
        for v in order:
            v.fwd()
            fwd_t[v.name].append(_time(v.fwd))
            v.train()
            train_t[v.name].append(_time(v.train))
    f_fwd, f_train = matmul_flops(shape)
    out = []
    for v in variants:
        tf, tt = statistics.median(fwd_t[v.name]), statistics.median(train_t[v.name])
        out.append(
            dict(
                impl=v.impl,
                unroll=v.unroll,
                fwd_ms=1e3 * tf,
                train_ms=1e3 * tt,
                fwd_gflops=f_fwd / tf / 1e9,
                train_gflops=f_train / tt / 1e9,
                compile_s=v.compile_s,
                temp_bytes=v.temp_bytes,
                reps=reps,
            )
        )
    return out


def mark_best(records: list[dict], tol: float = UNROLL_TOLERANCE) -> None:
    """Flag each implementation's best unroll with ``best=True``.

    The best unroll is the smallest one whose median train step is within
    ``tol`` (relative) of the fastest: differences that small are within the
    run-to-run noise of this machine, and a smaller unroll compiles faster.
    """
    for impl in {r["impl"] for r in records}:
        rs = [r for r in records if r["impl"] == impl]
        fastest = min(r["train_ms"] for r in rs)
        near = [r for r in rs if r["train_ms"] <= fastest * (1 + tol)]
        pick = min(near, key=lambda r: (r["unroll"] or 0, r["train_ms"]))
        for r in rs:
            r["best"] = r is pick


def _best(records: list[dict], impl: str) -> dict | None:
    """The record of ``impl`` at its best unroll (see ``mark_best``)."""
    rs = [r for r in records if r["impl"] == impl]
    flagged = [r for r in rs if r.get("best")]
    return flagged[0] if flagged else (min(rs, key=lambda r: r["train_ms"]) if rs else None)


def _ratio_at_unroll(records: list[dict], key: str, unroll: int) -> float | None:
    """manual / autodiff of ``key`` at the same ``unroll``, if both were run at it."""
    m, a = ([r for r in records if r["impl"] == k and r["unroll"] == unroll] for k in ("manual", "autodiff"))
    return m[0][key] / a[0][key] if m and a and m[0][key] and a[0][key] else None


def _geomean(xs: Sequence[float]) -> float | None:
    xs = [x for x in xs if x is not None]
    return math.exp(sum(math.log(x) for x in xs) / len(xs)) if xs else None


def summarize(results: list[dict], peak_gflops: float, memory: dict | None) -> dict:
    """Per-shape ratios, their geometric means and the status of every target."""
    per_shape = []
    for res in results:
        m, a, t = (_best(res["records"], k) for k in ("manual", "autodiff", "torch"))
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
        return _geomean([r.get(key) for r in per_shape])

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
    values = dict(
        speedup_vs_autodiff=g["speedup_vs_autodiff"],
        time_ratio_vs_torch=g["time_ratio_vs_torch"],
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
    return summary


def memory_compare(shape: Shape, unroll: int = 1) -> dict:
    """Compiled temporary memory of the train step, manual vs autodiff, at ``shape``."""
    out: dict[str, Any] = dict(shape=list(shape), unroll=unroll)
    for impl, fn in (("manual", lstm), ("autodiff", lstm_ref)):
        v = jax_variant(fn, shape, unroll, impl)
        out[f"{impl}_bytes"] = v.temp_bytes
        out[f"{impl}_compile_s"] = v.compile_s
    T, B, _, H = shape
    out["gates_and_c_bytes"] = 5 * T * B * H * 4  # the strict need of a fused backward, float32
    if out["manual_bytes"] and out["autodiff_bytes"]:
        out["ratio"] = out["manual_bytes"] / out["autodiff_bytes"]
    return out


def _fmt(x, spec: str, none: str = "-") -> str:
    return none if x is None else format(x, spec)


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
    lines += [
        "",
        f"{'T,B,D,H':<18} {'impl':<10} {'unroll':>6} {'fwd ms':>9} {'train ms':>9} {'GFLOP/s':>8} "
        f"{'%peak':>6} {'compile s':>9} {'temp MiB':>9}",
    ]
    for res in report["results"]:
        shape = ",".join(map(str, res["shape"]))
        best = {r["impl"]: r for r in (_best(res["records"], k) for k in {x["impl"] for x in res["records"]}) if r}
        for r in res["records"]:
            mark = "*" if best.get(r["impl"]) is r and r["unroll"] is not None else " "
            lines.append(
                f"{shape:<18} {r['impl']:<10} {_fmt(r['unroll'], 'd'):>5}{mark} {r['fwd_ms']:9.2f} "
                f"{r['train_ms']:9.2f} {r['train_gflops']:8.1f} {100 * r['train_gflops'] / peak:5.1f}% "
                f"{_fmt(r['compile_s'], '9.2f'):>9} {_fmt(r['temp_bytes'] and r['temp_bytes'] / 2**20, '9.2f'):>9}"
            )
        lines.append("")
    lines.append(
        f"* = best unroll (the smallest within {100 * report.get('unroll_tol', UNROLL_TOLERANCE):.0f}% of the fastest "
        "train step), used in the ratios below"
    )
    lines.append("")
    s = report["summary"]
    lines.append(
        f"{'T,B,D,H':<18} {'train: autodiff/manual':>23} {'manual/torch':>13} {'fwd: autodiff/manual':>21} "
        f"{'manual/torch':>13} {'compile m/a':>12} {'temp m/a':>9}"
    )
    for r in s["per_shape"]:
        lines.append(
            f"{','.join(map(str, r['shape'])):<18} {_fmt(r.get('speedup_vs_autodiff'), '23.2f'):>23} "
            f"{_fmt(r.get('time_ratio_vs_torch'), '13.2f'):>13} {_fmt(r.get('fwd_speedup_vs_autodiff'), '21.2f'):>21} "
            f"{_fmt(r.get('fwd_time_ratio_vs_torch'), '13.2f'):>13} {_fmt(r.get('compile_ratio'), '12.2f'):>12} "
            f"{_fmt(r.get('memory_ratio'), '9.2f'):>9}"
        )
    g = s["geomean"]
    lines.append(
        f"{'geometric mean':<18} {_fmt(g['speedup_vs_autodiff'], '23.2f'):>23} "
        f"{_fmt(g['time_ratio_vs_torch'], '13.2f'):>13} {_fmt(g['fwd_speedup_vs_autodiff'], '21.2f'):>21} "
        f"{_fmt(g['fwd_time_ratio_vs_torch'], '13.2f'):>13} {_fmt(g['compile_ratio'], '12.2f'):>12}"
    )
    mem = report.get("memory")
    if mem:
        lines += [
            "",
            f"temp memory of the train step at {tuple(mem['shape'])}, unroll {mem['unroll']}: "
            f"manual {_fmt(mem['manual_bytes'] and mem['manual_bytes'] / 2**20, '.2f')} MiB, "
            f"autodiff {_fmt(mem['autodiff_bytes'] and mem['autodiff_bytes'] / 2**20, '.2f')} MiB, "
            f"ratio {_fmt(mem.get('ratio'), '.2f')} (gates + c, 5*T*B*H float32: "
            f"{mem['gates_and_c_bytes'] / 2**20:.2f} MiB)",
        ]
    lines += ["", "targets (float32 train step):"]
    names = {
        "speedup_vs_autodiff": "manual speed-up over best autodiff, geo-mean",
        "time_ratio_vs_torch": "manual / torch.nn.LSTM time, geo-mean",
        "peak_fraction": f"manual fraction of matmul peak at {PEAK_SHAPE}",
        "memory_ratio": f"manual / autodiff temp memory at {tuple(mem['shape']) if mem else MEMORY_SHAPE}",
        "compile_ratio": "manual / autodiff compile time at best unrolls, geo-mean",
    }
    for k, t in s["targets"].items():
        status = "n/a" if t["met"] is None else ("met" if t["met"] else "MISSED")
        lines.append(f"  {names[k]:<58} {_fmt(t['value'], '6.2f'):>6} {t['direction']} {t['target']:<5} {status}")
    if g.get("compile_ratio_unroll1") is not None:
        lines.append(f"  (compile time manual / autodiff both at unroll 1, geo-mean: {g['compile_ratio_unroll1']:.2f})")
    return "\n".join(lines)


def plot(report: dict, path: str) -> None:
    """A PNG: per shape, train-step and forward speed relative to autodiff, and temp memory.

    Speed is ``t_autodiff / t_impl`` at each one's best unroll (autodiff = 1,
    higher is faster), with each bar labelled by its median time in ms;
    memory is the compiled temp memory relative to autodiff's.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = report["results"]
    present = {r["impl"] for x in results for r in x["records"]}
    impls = [k for k in ("manual", "autodiff", "flax", "torch") if k in present] + sorted(
        present - {"manual", "autodiff", "flax", "torch"}
    )
    colors = {"manual": "tab:blue", "autodiff": "tab:orange", "flax": "tab:green", "torch": "tab:red"}
    labels = [",".join(map(str, x["shape"])) for x in results]
    fig, axes = plt.subplots(1, 3, figsize=(17, 5.2))
    xs = np.arange(len(results))

    def bars(ax, key, impl_list, relative_to_autodiff_time, floor=0.0):
        width = 0.8 / max(len(impl_list), 1)
        top = floor
        for j, impl in enumerate(impl_list):
            vals, texts = [], []
            for x in results:
                r, a = _best(x["records"], impl), _best(x["records"], "autodiff")
                v = r.get(key) if r else None
                base = a.get(key) if a else None
                if v and base:
                    vals.append(base / v if relative_to_autodiff_time else v / base)
                    texts.append(f"{v:.3g}" if relative_to_autodiff_time else f"{v / 2**20:.3g}")
                else:
                    vals.append(np.nan)
                    texts.append("")
            pos = xs + (j - (len(impl_list) - 1) / 2) * width
            ax.bar(pos, vals, width, label=impl, color=colors.get(impl))
            top = max([top] + [v for v in vals if np.isfinite(v)])
            for p_, v, t in zip(pos, vals, texts, strict=True):
                if np.isfinite(v):
                    ax.text(p_, v, t, ha="center", va="bottom", fontsize=7, rotation=90)
        ax.set_xticks(xs, labels, rotation=15)
        ax.set_xlabel("T,B,D,H")
        ax.set_ylim(0, 1.35 * top)
        ax.grid(axis="y", alpha=0.3)

    bars(axes[0], "train_ms", impls, True, floor=TARGETS["speedup_vs_autodiff"])
    axes[0].axhline(TARGETS["speedup_vs_autodiff"], color="tab:blue", ls="--", lw=1, label="target (manual)")
    axes[0].set_title("train step (fwd + bwd): speed vs autodiff, labels: ms")
    axes[0].set_ylabel("t_autodiff / t (higher is faster)")
    axes[0].legend(fontsize=8, ncol=3, loc="upper left")
    bars(axes[1], "fwd_ms", impls, True)
    axes[1].set_title("forward only: speed vs autodiff, labels: ms")
    axes[1].set_ylabel("t_autodiff / t (higher is faster)")
    bars(axes[2], "temp_bytes", [k for k in impls if k != "torch"], False)
    axes[2].axhline(TARGETS["memory_ratio"], color="tab:blue", ls="--", lw=1, label="target (manual)")
    axes[2].set_title("compiled temp memory of the train step, labels: MiB")
    axes[2].set_ylabel("relative to autodiff (lower is less)")
    axes[2].legend(fontsize=8, ncol=3, loc="upper left")
    g = report["summary"]["geomean"]
    fig.suptitle(
        f"jax_lstm, float32, {report['machine']['cpu_count']} CPU cores, matmul peak {report['peak_gflops']:.0f} "
        f"GFLOP/s; geo-mean train speed-up manual vs autodiff {_fmt(g['speedup_vs_autodiff'], '.2f')}x, "
        f"manual / torch.nn.LSTM time {_fmt(g['time_ratio_vs_torch'], '.2f')}"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------- model-level rows (--models)
#
# The train step of a small model, features -> LSTM -> dense, with an optax Adam update, built with each
# library's own LSTM and with jax_lstm's module for that library:
#   nnx:     nnx.RNN(nnx.OptimizedLSTMCell)        vs jax_lstm.nnx.LSTM
#   linen:   nn.RNN(nn.OptimizedLSTMCell)          vs jax_lstm.linen.LSTM
#   equinox: jax.vmap over a lax.scan of eqx.nn.LSTMCell  vs jax.vmap over jax_lstm.eqx.LSTM
# Inputs are batch-major (B, T, D), the libraries' default; float32.

MODEL_LIBRARIES = ("nnx", "linen", "equinox")
MODEL_TARGETS = {"speedup": 1.5, "memory_ratio": 0.6}  # geo-means: ours >= 1.5x faster, <= 0.6x temp memory


@dataclasses.dataclass
class ModelVariant:
    """One compiled model train step, ready to time."""

    library: str  # "nnx", "linen" or "equinox"
    impl: str  # "theirs" (the library's LSTM) or "ours" (jax_lstm's module)
    train: Callable[[], Any]
    compile_s: float
    temp_bytes: int | None


def _model_problem(shape: Shape, seed: int):
    T, B, D, H = shape
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((B, T, D)).astype(np.float32)
    y = rng.standard_normal((B, T, 1)).astype(np.float32)
    return jax.device_put((x, y))


def _compile_step(library: str, impl: str, loss: Callable, params, x, y, rest=None) -> ModelVariant:
    """Compile ``params, opt_state, rest, x, y -> (params, opt_state, loss)``: gradients and an Adam update.

    ``loss(params, rest, x, y) -> (value, grads)`` if it has ``value_and_grad`` set to True as an attribute,
    else the loss value (differentiated here with respect to ``params``); ``rest`` is state that is not
    differentiated (nnx rng counters).
    """
    import optax

    tx = optax.adam(1e-3)
    opt_state = tx.init(params)

    value_and_grad = loss if getattr(loss, "value_and_grad", False) else jax.value_and_grad(loss)

    def step(params, opt_state, rest, x, y):
        value, grads = value_and_grad(params, rest, x, y)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, value

    t0 = time.perf_counter()
    compiled = jax.jit(step).lower(params, opt_state, rest, x, y).compile()
    compile_s = time.perf_counter() - t0
    return ModelVariant(
        library, impl, lambda: _block(compiled(params, opt_state, rest, x, y)), compile_s, temp_bytes(compiled)
    )


def _nnx_variants(shape: Shape, seed: int) -> list[ModelVariant]:
    from flax import nnx

    from jax_lstm.nnx import LSTM

    T, B, D, H = shape
    x, y = _model_problem(shape, seed)

    class Model(nnx.Module):
        def __init__(self, ours: bool, rngs: nnx.Rngs):
            self.lstm = LSTM(D, H, rngs=rngs) if ours else nnx.RNN(nnx.OptimizedLSTMCell(D, H, rngs=rngs))
            self.head = nnx.Linear(H, 1, rngs=rngs)

        def __call__(self, x):
            return self.head(self.lstm(x))

    out = []
    for impl in ("theirs", "ours"):
        graphdef, params, rest = nnx.split(Model(impl == "ours", nnx.Rngs(seed)), nnx.Param, ...)

        def loss(p, rest, x, y, graphdef=graphdef):  # as nnx does it: merge, then nnx.value_and_grad
            model = nnx.merge(graphdef, p, rest)
            return nnx.value_and_grad(lambda m: jnp.mean((m(x) - y) ** 2))(model)

        loss.value_and_grad = True

        out.append(_compile_step("nnx", impl, loss, params, x, y, rest))
    return out


def _linen_variants(shape: Shape, seed: int) -> list[ModelVariant]:
    import flax.linen as nn

    from jax_lstm.linen import LSTM

    T, B, D, H = shape
    x, y = _model_problem(shape, seed)

    class Model(nn.Module):
        ours: bool

        @nn.compact
        def __call__(self, x):
            h = LSTM(H)(x) if self.ours else nn.RNN(nn.OptimizedLSTMCell(H))(x)
            return nn.Dense(1)(h)

    out = []
    for impl in ("theirs", "ours"):
        model = Model(impl == "ours")
        params = model.init(jax.random.PRNGKey(seed), x)

        def loss(p, _, x, y, model=model):
            return jnp.mean((model.apply(p, x) - y) ** 2)

        out.append(_compile_step("linen", impl, loss, params, x, y))
    return out


def _equinox_variants(shape: Shape, seed: int) -> list[ModelVariant]:
    import equinox as eqx

    from jax_lstm.eqx import LSTM

    T, B, D, H = shape
    x, y = _model_problem(shape, seed)
    k_lstm, k_head = jax.random.split(jax.random.PRNGKey(seed))

    class Scanned(eqx.Module):  # the Equinox idiom: a lax.scan over the cell, one example
        cell: eqx.nn.LSTMCell

        def __call__(self, xs):
            def step(state, x_t):
                state = self.cell(x_t, state)
                return state, state[0]

            zeros = jnp.zeros((H,), xs.dtype)
            return jax.lax.scan(step, (zeros, zeros), xs)[1]

    class Ours(eqx.Module):
        lstm: LSTM

        def __call__(self, xs):
            return self.lstm(xs)[0]

    class Model(eqx.Module):
        lstm: eqx.Module
        head: eqx.nn.Linear

        def __call__(self, xs):  # (T, D) -> (T, 1)
            return jax.vmap(self.head)(self.lstm(xs))

    head = eqx.nn.Linear(H, 1, key=k_head, dtype=jnp.float32)
    models = {
        "theirs": Model(Scanned(eqx.nn.LSTMCell(D, H, key=k_lstm, dtype=jnp.float32)), head),
        "ours": Model(Ours(LSTM(D, H, key=k_lstm, dtype=jnp.float32)), head),
    }
    out = []
    for impl, model in models.items():
        params, static = eqx.partition(model, eqx.is_inexact_array)

        def loss(p, _, x, y, static=static):
            return jnp.mean((jax.vmap(eqx.combine(p, static))(x) - y) ** 2)

        out.append(_compile_step("equinox", impl, loss, params, x, y))
    return out


_MODEL_BUILDERS = {"nnx": _nnx_variants, "linen": _linen_variants, "equinox": _equinox_variants}


def model_variants(shape: Shape, libraries: Sequence[str] = MODEL_LIBRARIES, seed: int = 0) -> list[ModelVariant]:
    """The compiled train steps (theirs and ours) of every library in ``libraries`` that is importable."""
    out = []
    for lib in libraries:
        try:
            out += _MODEL_BUILDERS[lib](shape, seed)
        except ImportError as e:
            print(f"models: {lib} left out ({e})", file=sys.stderr)
    return out


def bench_models_shape(
    variants: Sequence[ModelVariant], *, warmup: int = 2, reps: int | None = None, seconds: float = 30.0
) -> list[dict]:
    """Median train-step time of every variant, interleaved as in ``bench_shape`` (shuffled, each timed call
    preceded by an untimed one), plus compile time and temp memory; one record per library."""
    for _ in range(max(warmup, 1)):
        t0 = time.perf_counter()
        for v in variants:
            v.train()
        t_round = time.perf_counter() - t0
    if reps is None:
        reps = int(min(50, max(5, seconds // max(2 * t_round, 1e-9))))
    times: dict[tuple[str, str], list[float]] = {(v.library, v.impl): [] for v in variants}
    rng = random.Random(0)
    order = list(variants)
    for _ in range(reps):
        rng.shuffle(order)
        for v in order:
            v.train()
            times[(v.library, v.impl)].append(_time(v.train))
    records = []
    for lib in dict.fromkeys(v.library for v in variants):
        by_impl = {v.impl: v for v in variants if v.library == lib}
        if set(by_impl) != {"theirs", "ours"}:
            continue
        rec: dict[str, Any] = dict(library=lib, reps=reps)
        for impl, v in by_impl.items():
            rec[f"{impl}_ms"] = 1e3 * statistics.median(times[(lib, impl)])
            rec[f"{impl}_compile_s"] = v.compile_s
            rec[f"{impl}_temp_bytes"] = v.temp_bytes
        rec["speedup"] = rec["theirs_ms"] / rec["ours_ms"]
        t, o = rec["theirs_temp_bytes"], rec["ours_temp_bytes"]
        rec["memory_ratio"] = o / t if t and o else None
        records.append(rec)
    return records


def bench_models(
    shapes: Sequence[Shape],
    *,
    libraries: Sequence[str] = MODEL_LIBRARIES,
    warmup: int = 2,
    reps: int | None = None,
    seconds: float = 30.0,
) -> dict:
    """Model-level rows at every shape, their geometric means per library and the status of the targets."""
    results = []
    for shape in shapes:
        records = bench_models_shape(model_variants(shape, libraries), warmup=warmup, reps=reps, seconds=seconds)
        results.append(dict(shape=list(shape), records=records))
        line = ", ".join(f"{r['library']} {r['theirs_ms']:.1f} -> {r['ours_ms']:.1f} ms" for r in records)
        print(f"models {shape}: {line}", file=sys.stderr)
    geomean = {}
    for lib in libraries:
        recs = [r for res in results for r in res["records"] if r["library"] == lib]
        if recs:
            geomean[lib] = dict(
                speedup=_geomean([r["speedup"] for r in recs]),
                memory_ratio=_geomean([r["memory_ratio"] for r in recs]),
            )
    targets = {
        lib: dict(
            speedup_met=g["speedup"] >= MODEL_TARGETS["speedup"],
            memory_met=None if g["memory_ratio"] is None else g["memory_ratio"] <= MODEL_TARGETS["memory_ratio"],
        )
        for lib, g in geomean.items()
    }
    return dict(results=results, geomean=geomean, targets=targets, model_targets=dict(MODEL_TARGETS))


_THEIRS = {
    "nnx": "nnx.RNN(OptimizedLSTMCell)",
    "linen": "nn.RNN(OptimizedLSTMCell)",
    "equinox": "vmap(scan(eqx LSTMCell))",
}


def render_models_table(report: dict) -> str:
    """The stdout table of ``--models``."""
    mib = lambda b: _fmt(b and b / 2**20, ".2f")  # noqa: E731
    lines = [
        "model train step: features (B, T, D) -> LSTM(H) -> dense, optax Adam, float32; median ms",
        "",
        f"{'T,B,D,H':<18} {'library':<8} {'theirs':<27} {'theirs ms':>10} {'ours ms':>9} {'speed-up':>9} "
        f"{'temp MiB theirs / ours':>23} {'ratio':>6} {'compile s theirs / ours':>24}",
    ]
    for res in report["results"]:
        for r in res["records"]:
            lines.append(
                f"{','.join(map(str, res['shape'])):<18} {r['library']:<8} {_THEIRS[r['library']]:<27} "
                f"{r['theirs_ms']:10.2f} {r['ours_ms']:9.2f} {r['speedup']:9.2f} "
                f"{mib(r['theirs_temp_bytes']) + ' / ' + mib(r['ours_temp_bytes']):>23} "
                f"{_fmt(r['memory_ratio'], '6.2f'):>6} "
                f"{format(r['theirs_compile_s'], '.2f') + ' / ' + format(r['ours_compile_s'], '.2f'):>24}"
            )
    t = report["model_targets"]
    lines += ["", f"geometric means (targets: speed-up >= {t['speedup']}, temp memory ratio <= {t['memory_ratio']}):"]
    for lib, g in report["geomean"].items():
        met = report["targets"][lib]
        status = lambda m: "n/a" if m is None else ("met" if m else "MISSED")  # noqa: E731
        lines.append(
            f"  {lib:<8} speed-up {_fmt(g['speedup'], '.2f')} ({status(met['speedup_met'])}), "
            f"temp memory {_fmt(g['memory_ratio'], '.2f')} ({status(met['memory_met'])})"
        )
    return "\n".join(lines)


def _rows_main(args, argv, run: Callable[..., dict], render: Callable[[dict], str]) -> int:
    """``jax-lstm bench --models`` / ``--options``: only those rows, ``run(shapes, ...)`` rendered by ``render``."""
    if args.quick:
        shapes, reps, warmup = list(args.shape or QUICK_SHAPES), args.reps or 3, 1
    else:
        shapes = list(args.shape or []) if args.only_shapes else list(DEFAULT_SHAPES) + list(args.shape or [])
        reps, warmup = args.reps, args.warmup
    if not shapes:
        raise SystemExit("jax-lstm bench: error: no shapes: --only-shapes needs at least one --shape")
    t_start = time.perf_counter()
    report = run(shapes, warmup=warmup, reps=reps, seconds=args.seconds)
    report.update(
        machine=_machine(),
        command="jax-lstm bench " + " ".join(argv if argv is not None else sys.argv[1:]),
        wall_s=time.perf_counter() - t_start,
    )
    print(render(report))
    print(f"\n(total {report['wall_s']:.0f} s)")
    return _write(args.json, lambda path: _dump(report, path))


# --------------------------------------------------------------------------------------------------
# Option rows: what masks, resets, recurrent dropout, batch-major input and vmap cost.

OPTIONS = ("plain", "mask", "resets", "recurrent_dropout", "batch_major", "vmap")
OPTION_TARGETS = {
    "time_ratio": 1.10,  # geo-mean of t_manual(option) / t_manual(plain), at most
    "memory_ratio": 1.10,  # geo-mean of temp(option) / temp(plain), at most
}


def option_variant(fn: Callable, option: str, shape: Shape, impl: str, seed: int = 0) -> Variant:
    """The train step of ``fn`` (``lstm`` or ``lstm_ref``) with one option of the second round.

    ``mask``: a random 90% of the steps run; ``resets``: 5% of the steps reset;
    ``recurrent_dropout``: rate 0.25; ``batch_major``: (B, T, D) input,
    ``time_major=False``; ``vmap``: ``jax.vmap`` over the B examples of a call
    on (T, 1, D), as an equinox model is used.
    """
    if option not in OPTIONS:
        raise ValueError(f"option must be one of {OPTIONS}, got {option!r}")
    p, xs, ws = _problem(shape, seed)
    T, B = xs.shape[:2]
    rng = np.random.default_rng(seed + 1)
    kw: dict[str, Any] = {}
    if option == "mask":
        kw["mask"] = jnp.asarray(rng.random((T, B)) < 0.9)
    elif option == "resets":
        kw["resets"] = jnp.asarray(rng.random((T, B)) < 0.05)
    elif option == "recurrent_dropout":
        kw.update(recurrent_dropout=0.25, key=jax.random.PRNGKey(seed))
    if option == "batch_major":
        xs, ws = np.ascontiguousarray(xs.transpose(1, 0, 2)), (np.ascontiguousarray(ws[0].transpose(1, 0, 2)), *ws[1:])

        def forward(p_, xs_):
            return fn(p_, xs_, time_major=False)

    elif option == "vmap":
        xs, ws = (
            np.ascontiguousarray(xs.transpose(1, 0, 2)[:, :, None, :]),
            (
                np.ascontiguousarray(ws[0].transpose(1, 0, 2)[:, :, None, :]),
                ws[1][:, None, :],
                ws[2][:, None, :],
            ),
        )

        def forward(p_, xs_):
            return jax.vmap(lambda x: fn(p_, x))(xs_)

    else:

        def forward(p_, xs_):
            return fn(p_, xs_, **kw)

    p, xs, ws = jax.device_put((p, xs, ws))

    def loss(p_, xs_, w, w2, w3):
        hs, (h, c) = forward(p_, xs_)
        return jnp.sum(hs * w) + jnp.sum(h * w2) + jnp.sum(c * w3)

    return _compiled_variant(f"{impl}:{option}", None, loss, forward, p, xs, ws)


def bench_options(
    shapes: Sequence[Shape],
    options: Sequence[str] = OPTIONS,
    *,
    warmup: int = 2,
    reps: int | None = None,
    seconds: float = 40.0,
) -> dict:
    """Train-step time and temp memory of every option for ``lstm`` and ``lstm_ref``, interleaved per shape."""
    results = []
    for shape in shapes:
        variants = [
            option_variant(fn, opt, shape, impl)
            for opt in options
            for impl, fn in (("manual", lstm), ("autodiff", lstm_ref))
        ]
        records = bench_shape(shape, variants, warmup=warmup, reps=reps, seconds=seconds)
        by = {r["impl"]: r for r in records}
        plain = by["manual:plain"]
        rows = []
        for opt in options:
            m, a = by[f"manual:{opt}"], by[f"autodiff:{opt}"]
            rows.append(
                dict(
                    option=opt,
                    manual_ms=m["train_ms"],
                    autodiff_ms=a["train_ms"],
                    time_ratio=m["train_ms"] / plain["train_ms"],
                    memory_ratio=_ratio(m["temp_bytes"], plain["temp_bytes"]),
                    manual_temp_mib=None if m["temp_bytes"] is None else m["temp_bytes"] / 2**20,
                    speedup_vs_autodiff=a["train_ms"] / m["train_ms"],
                )
            )
        results.append(dict(shape=list(shape), rows=rows))
        print(f"timed {shape}: " + ", ".join(f"{r['option']} x{r['time_ratio']:.2f}" for r in rows), file=sys.stderr)
    summary = {}
    for opt in options:
        rows = [next(r for r in res["rows"] if r["option"] == opt) for res in results]
        summary[opt] = {
            key: _geomean([r[key] for r in rows if r[key] is not None])
            for key in ("time_ratio", "memory_ratio", "speedup_vs_autodiff")
        }
    return dict(results=results, summary=summary, targets=OPTION_TARGETS)


def _ratio(a, b):
    return a / b if a and b else None


def render_options_table(report: dict) -> str:
    """The option rows as a Markdown table, plus the geometric means and their targets."""
    lines = [
        "| shape (T, B, D, H) | option | manual ms | autodiff ms | x plain time | x plain temp "
        "| speed-up vs autodiff |",
        "|---|---|---|---|---|---|---|",
    ]
    for res in report["results"]:
        for r in res["rows"]:
            lines.append(
                f"| {tuple(res['shape'])} | {r['option']} | {r['manual_ms']:.1f} | {r['autodiff_ms']:.1f} | "
                f"{r['time_ratio']:.2f} | {_fmt(r['memory_ratio'], '.2f')} | {r['speedup_vs_autodiff']:.2f} |"
            )
    lines += ["", "geometric mean over shapes:", "", "| option | x plain time | x plain temp | speed-up vs autodiff |"]
    lines.append("|---|---|---|---|")
    plain_speedup = report["summary"].get("plain", {}).get("speedup_vs_autodiff")
    for opt, s in report["summary"].items():
        lines.append(
            f"| {opt} | {_fmt(s['time_ratio'], '.2f')} | {_fmt(s['memory_ratio'], '.2f')} | "
            f"{_fmt(s['speedup_vs_autodiff'], '.2f')} |"
        )
    t = report["targets"]
    lines.append(
        f"\ntargets: each option <= {t['time_ratio']:.2f}x the plain train step's time and <= {t['memory_ratio']:.2f}x "
        f"its temp memory; its speed-up over autodiff with the same option >= the plain layer's "
        f"({_fmt(plain_speedup, '.2f')})"
    )
    return "\n".join(lines)


def _shape(s: str) -> Shape:
    try:
        t = tuple(int(v) for v in s.split(","))
    except ValueError:
        t = ()
    if len(t) != 4 or min(t) < 1:
        raise argparse.ArgumentTypeError(f"expected T,B,D,H (four positive ints), got {s!r}")
    return t  # type: ignore[return-value]


def _ints(s: str) -> list[int]:
    try:
        v = [int(x) for x in s.split(",")]
    except ValueError:
        v = []
    if not v or min(v) < 1:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list of positive ints, got {s!r}")
    return v


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        return platform.processor()


def _machine() -> dict:
    return dict(
        platform=platform.platform(),
        processor=_cpu_model(),
        cpu_count=os.cpu_count(),
        jax=jax.__version__,
        backend=jax.default_backend(),
        devices=[str(d) for d in jax.devices()],
        python=platform.python_version(),
    )


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``jax-lstm bench``."""
    rest = list(sys.argv[1:] if argv is None else argv)
    if "--rl" in rest:  # its own flags: jax_lstm.bench_rl
        try:
            from jax_lstm import bench_rl
        except ImportError as e:
            raise SystemExit(f"jax-lstm bench: error: {e}") from e
        return bench_rl.main([a for a in rest if a != "--rl"])
    from jax_lstm.cli import nonneg_float, nonneg_int, positive_float, positive_int

    ap = argparse.ArgumentParser(prog="jax-lstm bench", description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--shape",
        type=_shape,
        action="append",
        metavar="T,B,D,H",
        help="an extra shape (repeatable); with --only-shapes, the only ones",
    )
    ap.add_argument("--only-shapes", action="store_true", help="time only the --shape shapes, not the default four")
    ap.add_argument("--quick", action="store_true", help="a tiny smoke run: one small shape, few repetitions")
    ap.add_argument("--unroll", type=_ints, default=None, help="unrolls to try for manual and autodiff (default 1,2,4)")
    ap.add_argument(
        "--unroll-tol",
        type=nonneg_float,
        default=UNROLL_TOLERANCE,
        help="best unroll: the smallest within this relative margin of the fastest (default 0.03)",
    )
    ap.add_argument(
        "--reps", type=positive_int, default=None, help="timed repetitions per shape (default: fit --seconds)"
    )
    ap.add_argument(
        "--seconds", type=positive_float, default=40.0, help="time budget per shape when --reps is not given"
    )
    ap.add_argument("--warmup", type=nonneg_int, default=2, help="untimed repetitions before timing")
    ap.add_argument("--peak", type=positive_float, default=None, help="matmul peak in GFLOP/s instead of measuring it")
    ap.add_argument("--no-flax", action="store_true", help="leave Flax out")
    ap.add_argument("--no-torch", action="store_true", help="leave PyTorch out")
    ap.add_argument("--no-memory", action="store_true", help=f"skip the temp-memory comparison at {MEMORY_SHAPE}")
    ap.add_argument("--json", metavar="FILE", help="write the full report as JSON")
    ap.add_argument("--plot", metavar="FILE", help="write a PNG chart")
    ap.add_argument(
        "--models",
        action="store_true",
        help="instead: the train step of features -> LSTM -> dense with the Flax NNX, Flax Linen and Equinox "
        "LSTMs against jax_lstm's modules for them",
    )
    ap.add_argument(
        "--options",
        action="store_true",
        help="instead: the train step of lstm and lstm_ref with a mask, resets, recurrent dropout, batch-major "
        "input and under vmap, against the plain layer",
    )
    ap.add_argument("--rl", action="store_true", help="instead: recurrent PPO, ours against Flax (--rl --help)")
    args = ap.parse_args(argv)
    if args.models:
        return _rows_main(args, argv, bench_models, render_models_table)
    if args.options:
        return _rows_main(args, argv, bench_options, render_options_table)

    if args.quick:
        shapes = list(args.shape or QUICK_SHAPES)
        unrolls = args.unroll or [1, 2]
        reps, warmup, mem_shape = args.reps or 3, 1, QUICK_MEMORY_SHAPE
    else:
        shapes = list(args.shape or []) if args.only_shapes else list(DEFAULT_SHAPES) + list(args.shape or [])
        unrolls = args.unroll or [1, 2, 4]
        reps, warmup, mem_shape = args.reps, args.warmup, MEMORY_SHAPE
    if not shapes:
        ap.error("no shapes: --only-shapes needs at least one --shape")

    t_start = time.perf_counter()
    peak_given = args.peak is not None
    peak_n = 1024 if args.quick else 4096
    peak_reps = 2 if args.quick else 5
    peaks = [] if peak_given else [measure_peak(peak_n, peak_reps)]
    if peaks:
        print(f"matmul peak: {peaks[0]:.1f} GFLOP/s", file=sys.stderr)

    results = []
    for shape in shapes:
        variants: list[Variant] = []
        for impl, fn in (("manual", lstm), ("autodiff", lstm_ref)):
            variants += [jax_variant(fn, shape, u, impl) for u in unrolls]
        if not args.no_flax:
            v = flax_variant(shape)
            variants += [v] if v else []
        if not args.no_torch:
            v = torch_variant(shape)
            variants += [v] if v else []
        records = bench_shape(shape, variants, warmup=warmup, reps=reps, seconds=args.seconds)
        mark_best(records, args.unroll_tol)
        results.append(dict(shape=list(shape), records=records))
        line = ", ".join(f"{r['impl']}@{r['unroll']} {r['train_ms']:.1f} ms" for r in records)
        print(f"timed {shape}: {line}", file=sys.stderr)

    memory = None if args.no_memory else memory_compare(mem_shape)
    if not peak_given:
        peaks.append(measure_peak(peak_n, peak_reps))
    peak = args.peak if peak_given else max(peaks)
    noisy = bool(peaks) and min(peaks) < 0.85 * max(peaks)
    report = dict(
        machine=_machine(),
        command="jax-lstm bench " + " ".join(argv if argv is not None else sys.argv[1:]),
        peak_gflops=peak,
        peak_given=peak_given,
        peak_runs_gflops=peaks,
        noisy=noisy,
        peak_n=peak_n,
        unrolls=unrolls,
        unroll_tol=args.unroll_tol,
        results=results,
        memory=memory,
    )
    report["summary"] = summarize(results, peak, memory)
    report["wall_s"] = time.perf_counter() - t_start
    print(render_table(report))
    print(f"\n(total {report['wall_s']:.0f} s)")
    return _write(args.json, lambda path: _dump(report, path)) or _write(args.plot, lambda path: plot(report, path))


def _dump(report: dict, path: str) -> None:
    with open(path, "w") as f:
        json.dump(report, f, indent=1)


def _write(path: str | None, write: Callable[[str], Any]) -> int:
    """``write(path)`` unless ``path`` is None: 0, or 1 after one line on stderr if the file cannot be written."""
    if path is None:
        return 0
    try:
        write(path)
    except OSError as e:
        print(f"jax-lstm bench: error: cannot write {path}: {e.strerror or e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
