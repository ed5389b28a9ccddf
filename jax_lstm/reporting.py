"""Reporting of a training run: the progress line on stderr, the end-of-run table and the curves plot.

Nothing here touches the loop's state: each function takes what it shows.
"""

from __future__ import annotations

import io
import math
import os
import sys
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, TextIO

from jax_lstm import checkpoint
from jax_lstm.tasks import Task
from jax_lstm.tasks.base import hidden_sizes

if TYPE_CHECKING:
    from jax_lstm.train import TrainResult

__all__ = [
    "Progress",
    "fmt",
    "fmt_time",
    "table",
    "show_value",
    "describe_model",
    "summary_table",
    "plot_curves",
]


def fmt_time(seconds: float) -> str:
    """``m:ss`` or ``h:mm:ss``; ``?`` for a negative or unknown duration."""
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def fmt(v: float | None) -> str:
    """A metric for a table: 4 decimals, or 3 significant digits in exponent form when very small or large."""
    if v is None or not isinstance(v, (int, float)):
        return "-"
    if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e5):
        return f"{v:.3e}"
    return f"{v:.4f}"


class Progress:
    """A one-line progress bar on stderr: step, loss, validation metric, steps/s, ETA.

    Modes: ``bar`` rewrites one line with a carriage return (at most 10 times a
    second), ``lines`` prints one line per log step (for logs and pipes),
    ``none`` prints nothing, ``auto`` is ``bar`` on a terminal and ``lines`` otherwise.
    """

    def __init__(self, total: int, start: int, metric: str, mode: str = "auto", stream: TextIO | None = None):
        self.stream = stream if stream is not None else sys.stderr
        if mode == "auto":
            mode = "bar" if getattr(self.stream, "isatty", lambda: False)() else "lines"
        self.mode, self.total, self.metric = mode, total, metric
        self.t0: float | None = None  # time of the first finished step (after compilation)
        self.s0 = start
        self.last_draw = 0.0
        self.width = 0

    def rate(self, step: int) -> float:
        if self.t0 is None or step <= self.s0:
            return float("nan")
        return (step - self.s0) / max(time.perf_counter() - self.t0, 1e-9)

    def line(self, step: int, loss: float | None, metric: float | None, limit_left: float | None = None) -> str:
        rate = self.rate(step)
        eta = (self.total - step) / rate if rate > 0 else float("nan")
        if limit_left is not None:
            eta = min(eta, limit_left) if math.isfinite(eta) else limit_left
        frac = step / self.total if self.total else 1.0
        bar = "#" * int(20 * frac) + "-" * (20 - int(20 * frac))
        return (
            f"{step:>{len(str(self.total))}}/{self.total} [{bar}] {100 * frac:3.0f}% | loss {fmt(loss)} | "
            f"{self.metric} {fmt(metric)} | {rate:.1f} steps/s | ETA {fmt_time(eta)}"
        )

    def update(self, step, loss, metric, *, logged: bool = False, limit_left: float | None = None) -> None:
        now = time.perf_counter()
        if self.t0 is None:
            self.t0, self.s0 = now, step
        if self.mode == "none":
            return
        if self.mode == "lines":
            if logged:
                print(self.line(step, loss, metric, limit_left), file=self.stream, flush=True)
            return
        if logged or step == self.total or now - self.last_draw >= 0.1:
            text = self.line(step, loss, metric, limit_left)
            pad = max(self.width - len(text), 0)
            self.stream.write("\r" + text + " " * pad)
            self.stream.flush()
            self.width, self.last_draw = len(text), now

    def close(self) -> None:
        if self.mode == "bar" and self.width:
            self.stream.write("\n")
            self.stream.flush()
            self.width = 0


def show_value(value) -> str:
    """A config value as it is written on the command line: ``256,256`` for a stack."""
    return ",".join(str(v) for v in value) if isinstance(value, (tuple, list)) else str(value)


def describe_model(config) -> str:
    """``LSTM 256,256 (bidirectional), projection 64, peepholes, layer norm, layer dropout 0.2, ...``."""
    parts = [f"LSTM {show_value(hidden_sizes(config))}" + (" (bidirectional)" if config.bidirectional else "")]
    if config.proj_size:
        parts.append(f"projection {config.proj_size}")
    parts += ["peepholes"] * bool(config.peephole) + ["layer norm"] * bool(config.layer_norm)
    for name, label in (("layer_dropout", "layer dropout"), ("recurrent_dropout", "recurrent dropout")):
        if getattr(config, name):
            parts.append(f"{label} {getattr(config, name):g}")
    if config.dropout:
        parts.append(f"output dropout {config.dropout:g}")
    return ", ".join(parts)


def table(rows: Sequence[tuple[str, str]]) -> str:
    """Two aligned columns between two rules."""
    w = max(len(k) for k, _ in rows)
    rule = "-" * (w + 2 + max(len(v) for _, v in rows))
    return "\n".join([rule, *(f"{k:<{w}}  {v}" for k, v in rows), rule])


def summary_table(result: TrainResult, task: Task, n_params: int) -> str:
    """The end-of-run table: run, steps, time, losses, metric against the baselines, files."""
    cfg, recs = result.config, result.records
    last = recs[-1] if recs else {}
    rows = [
        (
            "task",
            f"{cfg.task} ({task.metric}: {task.metric_label}, {'higher' if task.higher_is_better else 'lower'} "
            "is better)",
        ),
        (
            "model",
            describe_model(cfg)
            + (f", embedding {cfg.embed}" if cfg.task == "charlm" else "")
            + f", {n_params:,} parameters, {cfg.dtype}, grad {cfg.grad}",
        ),
        ("steps", f"{result.state.step} of {cfg.steps} (batch {cfg.batch_size} x {cfg.seq_len})"),
        ("stopped", f"{result.stop}: {result.message}"),
        ("time", f"{fmt_time(result.elapsed)} ({result.state.step / max(result.elapsed, 1e-9):.1f} steps/s overall)"),
    ]
    if last:
        rows.append(("train loss (last log)", fmt(last.get("loss"))))
        rows.append(("val loss", fmt(last.get("val_loss"))))
        rows.append((f"{task.metric} (step {last['step']})", fmt(last.get(task.metric))))
        pick = max if task.higher_is_better else min
        best = pick(recs, key=lambda r: r.get(task.metric, float("nan")))
        rows.append((f"best {task.metric}", f"{fmt(best.get(task.metric))} at step {best['step']}"))
    for name, v in result.baselines.items():
        rows.append((f"baseline: {name}", fmt(v)))
    if result.out_dir is not None:
        names = sorted(p.name for p in result.out_dir.iterdir() if not p.name.startswith("."))
        rows.append(("files", f"{result.out_dir}/ {', '.join(names)}"))
    return table(rows)


def plot_curves(records: list[dict], task: Task, baselines: dict[str, float], path: str | os.PathLike) -> None:
    """Write a PNG of the training and validation curves (matplotlib, Agg backend), atomically."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in records]
    records = [{k: (float("nan") if v is None else v) for k, v in r.items()} for r in records]
    same = getattr(task, "loss_is_metric", False)
    fig, axes = plt.subplots(1, 1 if same else 2, figsize=(6.4 if same else 11, 4.2), squeeze=False)
    ax = axes[0, 0]
    ax.plot(steps, [r["loss"] for r in records], label="train loss (mean since previous log)")
    ax.plot(steps, [r["val_loss"] for r in records], label="validation loss", marker="o", markersize=3)
    if same:
        for i, (name, v) in enumerate(baselines.items()):
            ax.axhline(v, ls="--", color=f"C{i + 2}", label=f"baseline: {name} ({v:.3g})")
    ax.set_xlabel("step")
    ax.set_ylabel(f"loss ({task.metric_label})" if same else "loss")
    values = [v for r in records for v in (r["loss"], r["val_loss"])] + (list(baselines.values()) if same else [])
    values = [v for v in values if math.isfinite(v)]
    if values and min(values) > 0 and max(values) / min(values) > 20:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if not same:
        ax2 = axes[0, 1]
        ax2.plot(steps, [r[task.metric] for r in records], marker="o", markersize=3, label=task.metric)
        for i, (name, v) in enumerate(baselines.items()):
            ax2.axhline(v, ls="--", color=f"C{i + 2}", label=f"baseline: {name} ({v:.3g})")
        ax2.set_xlabel("step")
        ax2.set_ylabel(f"{task.metric} ({task.metric_label})")
        ax2.grid(alpha=0.3)
        ax2.legend(fontsize=8)
    fig.suptitle(f"jax_lstm {task.name}")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    checkpoint.atomic_write(path, buf.getvalue())
