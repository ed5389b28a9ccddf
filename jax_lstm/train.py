"""Training: the optax loop, the jit-compiled train step, evaluation, callbacks, and the commands
``jax-lstm train``, ``jax-lstm sample`` and ``jax-lstm evaluate``.

The train step is a pure function ``(params, opt_state, batch) -> (params,
opt_state, metrics)`` (``make_train_step``): every array in ``batch`` has the
batch as its leading axis, and the step has no Python side effects, so
``jax_lstm.parallel.data_parallel`` can shard it as it is. For tasks that
carry the LSTM state across consecutive windows (truncated BPTT, ``charlm``)
the state goes in as ``batch["h0"]``, ``batch["c0"]`` and comes back as
``metrics["carry"]``.

``train`` runs the loop: it evaluates on the validation split, calls the
callbacks, appends to the metrics file and writes a checkpoint at every log
step. A checkpoint holds the params, the optimizer state, the PRNG key and
the carried LSTM state; the data position is the step index, so resuming
reproduces an uninterrupted run exactly. Ctrl-C finishes the current step,
writes a checkpoint and returns (a second Ctrl-C stops at once and keeps the
last checkpoint); a NaN or infinite loss, or validation loss, stops the run
and leaves the last checkpoint (written before the bad step) in place.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, TextIO

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jax_lstm import checkpoint, parallel
from jax_lstm.bptt import lstm
from jax_lstm.cell import LSTMState
from jax_lstm.reference import lstm_ref
from jax_lstm.tasks import DEFAULT_TASK, TASKS, Task, get_task

__all__ = [
    "TrainConfig",
    "TrainState",
    "TrainResult",
    "GRADS",
    "make_optimizer",
    "make_train_step",
    "init_state",
    "train",
    "load_run",
    "plot_curves",
    "main_train",
    "main_sample",
    "main_evaluate",
]

GRADS = {"manual": lstm, "autodiff": lstm_ref}
OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULES = ("constant", "cosine")
DTYPES = ("float32", "float64")
PROGRESS_MODES = ("auto", "bar", "lines", "none")

# Fields that fix the model, the data stream and the optimizer: a resumed run keeps them.
FIXED_FIELDS = (
    "task",
    "seed",
    "batch_size",
    "seq_len",
    "hidden",
    "embed",
    "optimizer",
    "lr",
    "schedule",
    "warmup",
    "decay_steps",
    "clip",
    "dropout",
    "dtype",
)

# Exit codes of the commands.
EXIT_OK, EXIT_FAIL, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


@dataclass
class TrainConfig:
    """Everything that defines a run. ``None`` means "the task's default" (see ``resolved``).

    Attributes:
      task: registry name (``charlm``, ``addition``, ``sine``).
      steps: total optimizer steps of the run (a resumed run continues up to this).
      seed: seeds the parameters and the PRNG key of the data stream.
      batch_size: B, sequences per step.
      seq_len: T, steps per window (charlm) or sequence length.
      hidden: H, LSTM hidden size.
      embed: embedding size (charlm); unused by tasks that feed features directly.
      optimizer: ``adam`` (default), ``adamw`` or ``sgd`` (momentum 0.9).
      lr: peak learning rate.
      schedule: ``constant`` (after an optional linear warm-up) or ``cosine``
        (warm-up, then cosine decay to lr/10 at ``decay_steps``).
      warmup: warm-up steps.
      decay_steps: length of the cosine schedule; defaults to ``steps`` of the
        first run and is kept when the run is resumed with more steps.
      clip: clip gradients to this global norm (0 disables).
      dropout: dropout rate on the LSTM outputs during training (charlm); 0 disables.
      dtype: ``float32`` or ``float64`` for params and activations.
      grad: ``manual`` (``lstm``, hand-written BPTT) or ``autodiff`` (``lstm_ref``).
      log_every: evaluate, log and checkpoint every this many steps (and at the end).
      time_limit: stop (and checkpoint) after this many seconds, counted from the start of this
        invocation (a resumed run gets the limit afresh); None or 0: no limit.
    """

    task: str | None = None
    steps: int | None = None
    seed: int | None = None
    batch_size: int | None = None
    seq_len: int | None = None
    hidden: int | None = None
    embed: int | None = None
    optimizer: str | None = None
    lr: float | None = None
    schedule: str | None = None
    warmup: int | None = None
    decay_steps: int | None = None
    clip: float | None = None
    dropout: float | None = None
    dtype: str | None = None
    grad: str | None = None
    log_every: int | None = None
    time_limit: float | None = None

    def resolved(self) -> TrainConfig:
        """A copy with every ``None`` replaced by the task's or the global default, checked."""
        values = dataclasses.asdict(self)
        values["task"] = values["task"] or DEFAULT_TASK
        task = get_task(values["task"])
        generic = {
            "seed": 0,
            "optimizer": "adam",
            "dtype": "float32",
            "grad": "manual",
            "warmup": 0,
            "clip": 1.0,
            "dropout": 0.0,
        }
        for k, v in {**generic, **task.defaults}.items():
            if values.get(k) is None:
                values[k] = v
        if values["decay_steps"] is None:
            values["decay_steps"] = values["steps"]
        if values["log_every"] is None:
            values["log_every"] = max(1, values["steps"] // 20)
        cfg = TrainConfig(**values)
        cfg.check()
        return cfg

    def check(self) -> None:
        """Raise ValueError naming the first bad field."""
        for name in ("steps", "batch_size", "seq_len", "hidden", "decay_steps", "log_every"):
            v = getattr(self, name)
            if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        for name in ("seed", "warmup", "embed"):
            v = getattr(self, name)
            if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 0:
                raise ValueError(f"{name} must be a non-negative integer, got {v!r}")
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a positive number, got {self.lr!r}")
        if not (isinstance(self.clip, (int, float)) and math.isfinite(self.clip) and self.clip >= 0):
            raise ValueError(f"clip must be a non-negative number, got {self.clip!r}")
        if not (isinstance(self.dropout, (int, float)) and 0 <= self.dropout < 1):
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if self.time_limit is not None and not self.time_limit >= 0:
            raise ValueError(f"time_limit must be a non-negative number of seconds, got {self.time_limit!r}")
        for name, allowed in (
            ("optimizer", OPTIMIZERS),
            ("schedule", SCHEDULES),
            ("dtype", DTYPES),
            ("grad", tuple(GRADS)),
            ("task", tuple(TASKS)),
        ):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        if self.task == "charlm" and self.embed < 1:
            raise ValueError(f"embed must be a positive integer for charlm, got {self.embed}")
        if self.dtype == "float64" and not jax.config.jax_enable_x64:
            raise ValueError("dtype float64 needs jax_enable_x64 (the command line turns it on for --dtype float64)")


class TrainState(NamedTuple):
    """What a checkpoint holds: the step (the data position) and the arrays."""

    step: int
    params: Any
    opt_state: Any
    key: jax.Array  # (2,) uint32, the PRNG key of the data stream
    carry: LSTMState | None  # h, c: (B, H) carried across windows, or None

    def arrays(self) -> dict[str, Any]:
        return {"params": self.params, "opt_state": self.opt_state, "key": self.key, "carry": self.carry}


@dataclass
class TrainResult:
    """What ``train`` returns.

    Attributes:
      state: the final ``TrainState`` (after a NaN: the state after the bad step).
      config: the resolved configuration.
      records: one dict per log step (this run's and, when resumed, the earlier ones).
      losses: the training loss of every step run by this call.
      stop: ``done``, ``interrupted``, ``time_limit``, ``callback`` or ``nan``.
      baselines: the task's baselines of the validation metric.
      elapsed: seconds of training, including earlier runs of a resumed run.
      out_dir: where the files went (None if nothing was written).
      message: one line about how the run ended.
      n_params: number of model parameters.
      data: the task's data (from ``Task.setup``).
    """

    state: TrainState
    config: TrainConfig
    records: list[dict]
    losses: list[float]
    stop: str
    baselines: dict[str, float]
    elapsed: float
    out_dir: Path | None
    message: str
    n_params: int = 0
    data: Any = None


# --------------------------------------------------------------------------- pieces


def make_optimizer(config: TrainConfig) -> tuple[optax.GradientTransformation, Callable[[int], float]]:
    """The optimizer of a resolved config and its learning-rate schedule ``step -> lr``."""
    lr, warmup = float(config.lr), int(config.warmup)
    if config.schedule == "cosine":
        schedule = optax.warmup_cosine_decay_schedule(
            0.0, lr, warmup, max(int(config.decay_steps), warmup + 1), end_value=lr / 10
        )
    elif warmup > 0:
        schedule = optax.linear_schedule(0.0, lr, warmup)
    else:
        schedule = optax.constant_schedule(lr)
    opt = {
        "adam": lambda: optax.adam(schedule),
        "adamw": lambda: optax.adamw(schedule, weight_decay=1e-4),
        "sgd": lambda: optax.sgd(schedule, momentum=0.9),
    }[config.optimizer]()
    if config.clip > 0:
        opt = optax.chain(optax.clip_by_global_norm(float(config.clip)), opt)
    return opt, lambda step: float(schedule(step))


def make_train_step(task: Task, optimizer: optax.GradientTransformation, lstm_fn=lstm) -> Callable:
    """The pure train step ``(params, opt_state, batch) -> (params, opt_state, metrics)``.

    Args:
      task: gives the loss.
      optimizer: an optax transformation.
      lstm_fn: ``lstm`` (hand-written BPTT) or ``lstm_ref`` (autodiff).

    Returns:
      A function to ``jax.jit`` (with ``donate_argnums=(0, 1)``) or to hand to
      ``jax_lstm.parallel.data_parallel``. ``metrics`` holds ``loss`` and
      ``grad_norm`` (scalars) and, for tasks that carry state, ``carry``.
    """

    def train_step(params, opt_state, batch):
        (loss, aux), grads = jax.value_and_grad(lambda p: task.loss(p, batch, lstm_fn), has_aux=True)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        return params, opt_state, {"loss": loss, "grad_norm": optax.tree.norm(grads), **aux}

    return train_step


def init_state(task: Task, config: TrainConfig, data, optimizer: optax.GradientTransformation) -> TrainState:
    """Step 0: fresh params from ``config.seed``, optimizer state, PRNG key and a zero carry."""
    k_params, k_data = jax.random.split(jax.random.PRNGKey(int(config.seed)))
    params = task.init_params(k_params, config, data)
    carry = None
    if task.carries_state:
        z = jnp.zeros((int(config.batch_size), int(config.hidden)), jnp.dtype(config.dtype))
        carry = LSTMState(z, z)
    return TrainState(0, params, optimizer.init(params), k_data, carry)


def count_params(params) -> int:
    return int(sum(np.size(a) for a in jax.tree.leaves(params)))


def _checkpoint_path(path: str | os.PathLike) -> Path:
    path = Path(path)
    return path / checkpoint.FILENAME if path.is_dir() or not path.suffix else path


def _config_from_header(header: dict) -> TrainConfig:
    saved = header.get("config", {})
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(saved) - fields)
    if unknown:
        raise checkpoint.CheckpointError(f"checkpoint config has unknown fields {unknown}")
    return TrainConfig(**saved)


class LoadedRun(NamedTuple):
    task: Task
    config: TrainConfig
    data: Any
    state: TrainState
    header: dict
    optimizer: optax.GradientTransformation


def _enable_x64_if(dtype: str | None) -> None:
    if dtype == "float64" and not jax.config.jax_enable_x64:
        jax.config.update("jax_enable_x64", True)


def load_run(path: str | os.PathLike, config: TrainConfig | None = None) -> LoadedRun:
    """Read a checkpoint and rebuild its task, data, optimizer and state.

    Args:
      path: a checkpoint file, or a run directory holding ``checkpoint.npz``.
      config: an already resolved config to check the checkpoint against;
        None uses the checkpoint's own.

    Raises:
      CheckpointError: missing, corrupted, or of another model.
    """
    path = _checkpoint_path(path)
    header = checkpoint.read_header(path)
    if config is None:
        config = _config_from_header(header)
        _enable_x64_if(config.dtype)
        try:
            config = config.resolved()
        except (ValueError, TypeError) as e:
            raise checkpoint.CheckpointError(f"checkpoint {path} has an invalid config: {e}") from None
    task = get_task(config.task)
    info = header.get("meta", {}).get("info") or None
    try:
        data = task.setup(config, info=info)
    except (ValueError, TypeError, KeyError) as e:
        raise checkpoint.CheckpointError(f"checkpoint {path} does not fit the {task.name} data: {e}") from None
    if info and task.info(data) != info:
        print(
            f"warning: the {task.name} data differ from those the checkpoint {path} was trained on "
            "(another Python version's pydoc_data?); results will not match the original run",
            file=sys.stderr,
        )
    optimizer, _ = make_optimizer(config)
    template = init_state(task, config, data, optimizer)
    arrays, header = checkpoint.restore(path, template.arrays())
    step = header.get("meta", {}).get("step")
    if not isinstance(step, int) or step < 0:
        raise checkpoint.CheckpointError(f"checkpoint {path} has no valid step in its metadata (got {step!r})")
    state = TrainState(step, arrays["params"], arrays["opt_state"], arrays["key"], arrays["carry"])
    return LoadedRun(task, config, data, state, header, optimizer)


# --------------------------------------------------------------------------- progress and reports


def _fmt_time(seconds: float) -> str:
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def _fmt(v: float | None) -> str:
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
            f"{step:>{len(str(self.total))}}/{self.total} [{bar}] {100 * frac:3.0f}% | loss {_fmt(loss)} | "
            f"{self.metric} {_fmt(metric)} | {rate:.1f} steps/s | ETA {_fmt_time(eta)}"
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


def _table(rows: Sequence[tuple[str, str]]) -> str:
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
            f"LSTM H={cfg.hidden}"
            + (f", embedding {cfg.embed}" if cfg.task == "charlm" else "")
            + (f", dropout {cfg.dropout:g}" if cfg.dropout else "")
            + f", {n_params:,} parameters, {cfg.dtype}, grad {cfg.grad}",
        ),
        ("steps", f"{result.state.step} of {cfg.steps} (batch {cfg.batch_size} x {cfg.seq_len})"),
        ("stopped", f"{result.stop}: {result.message}"),
        ("time", f"{_fmt_time(result.elapsed)} ({result.state.step / max(result.elapsed, 1e-9):.1f} steps/s overall)"),
    ]
    if last:
        rows.append(("train loss (last log)", _fmt(last.get("loss"))))
        rows.append(("val loss", _fmt(last.get("val_loss"))))
        rows.append((f"{task.metric} (step {last['step']})", _fmt(last.get(task.metric))))
        pick = max if task.higher_is_better else min
        best = pick(recs, key=lambda r: r.get(task.metric, float("nan")))
        rows.append((f"best {task.metric}", f"{_fmt(best.get(task.metric))} at step {best['step']}"))
    for name, v in result.baselines.items():
        rows.append((f"baseline: {name}", _fmt(v)))
    if result.out_dir is not None:
        names = sorted(p.name for p in result.out_dir.iterdir() if not p.name.startswith("."))
        rows.append(("files", f"{result.out_dir}/ {', '.join(names)}"))
    return _table(rows)


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


@contextlib.contextmanager
def _sigint_flag():
    """Within the block, the first Ctrl-C sets a flag (checked after each step); a second one aborts."""
    flag = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def handler(signum, frame):
        if flag.is_set():
            raise KeyboardInterrupt
        flag.set()

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield flag
    finally:
        signal.signal(signal.SIGINT, previous)


def _read_records(path: Path, upto: int) -> list[dict]:
    records = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                r = json.loads(line)
            except ValueError:
                continue
            if isinstance(r, dict) and isinstance(r.get("step"), int) and r["step"] <= upto:
                records.append(r)
    return records


def _jsonable(x):
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


# --------------------------------------------------------------------------- the loop

Callback = Callable[[dict, TrainState], Any]


def train(
    config: TrainConfig,
    *,
    out_dir: str | os.PathLike | None = None,
    resume: bool | str | os.PathLike = False,
    force: bool = False,
    callbacks: Iterable[Callback] = (),
    metrics_path: str | os.PathLike | None = None,
    progress: str = "auto",
    stream: TextIO | None = None,
    plot: bool = True,
    devices: int | None = None,
) -> TrainResult:
    """Train a task; see the module docstring.

    Args:
      config: the run; ``None`` fields take the task's defaults. When resuming,
        fields in ``FIXED_FIELDS`` that are set must equal the checkpoint's.
      out_dir: where the checkpoint, ``config.json``, ``metrics.jsonl`` and
        ``curves.png`` go; None writes nothing.
      resume: False for a new run; True to continue from ``out_dir``'s
        checkpoint; or a checkpoint file / run directory to continue from
        (``out_dir`` then defaults to its directory).
      force: start a new run even if ``out_dir`` holds a checkpoint (replacing it).
      callbacks: called as ``cb(record, state)`` at every log step, after the
        evaluation; a truthy return value stops the run (with a checkpoint).
      metrics_path: JSON-lines file of the log records; default
        ``out_dir/metrics.jsonl``.
      progress: ``auto``, ``bar``, ``lines`` or ``none`` (see ``Progress``).
      stream: where progress goes (default stderr).
      plot: write ``curves.png`` at the end.
      devices: data-parallel over the first ``devices`` devices (the batch axis
        split over a ``jax.sharding`` mesh, params and optimizer state
        replicated); None trains on one device, unless this is one process of
        a ``jax.distributed`` run, which always uses every device.

    Returns:
      A ``TrainResult``.

    Raises:
      ValueError: a bad configuration, or one that conflicts with the checkpoint.
      CheckpointError: the checkpoint to resume is missing, corrupted or of another model.
      FileExistsError: ``out_dir`` holds a checkpoint and neither ``resume`` nor ``force`` is set.
    Nothing is written before all of these checks pass.
    """
    stream = stream if stream is not None else sys.stderr
    # ---- check everything before writing anything
    loaded = None
    if resume:
        ckpt = _checkpoint_path(out_dir if resume is True else resume)
        if out_dir is None:
            out_dir = ckpt.parent
        header = checkpoint.read_header(ckpt)
        saved = _config_from_header(header)
        conflicts = [
            f"{name}={getattr(config, name)!r} (the checkpoint has {getattr(saved, name)!r})"
            for name in FIXED_FIELDS
            if getattr(config, name) is not None and getattr(config, name) != getattr(saved, name)
        ]
        if conflicts:
            raise ValueError(
                f"cannot resume {ckpt} with different settings: {'; '.join(conflicts)}. "
                "A resumed run keeps its model, data and optimizer settings; only steps, grad, log_every "
                "and time_limit may change"
            )
        _enable_x64_if(saved.dtype)
        try:
            saved.resolved()
        except (ValueError, TypeError) as e:
            raise checkpoint.CheckpointError(f"checkpoint {ckpt} has an invalid config: {e}") from None
        merged = dataclasses.asdict(saved)
        for name in ("steps", "grad", "log_every", "time_limit"):
            if getattr(config, name) is not None:
                merged[name] = getattr(config, name)
        _enable_x64_if(merged["dtype"])
        config = TrainConfig(**merged).resolved()
        loaded = load_run(ckpt, config)
    else:
        config = config.resolved()
    out_dir = Path(out_dir) if out_dir is not None else None
    if out_dir is not None:
        if out_dir.exists() and not out_dir.is_dir():
            raise ValueError(f"--out {out_dir} exists and is not a directory")
        existing = out_dir / checkpoint.FILENAME
        if not resume and not force and existing.exists():
            raise FileExistsError(
                f"{out_dir} already holds a checkpoint ({existing}); continue it with --resume, "
                "start over with --force, or choose another --out"
            )
    if metrics_path is None and out_dir is not None:
        metrics_path = out_dir / "metrics.jsonl"
    metrics_path = Path(metrics_path) if metrics_path is not None else None
    if metrics_path is not None and metrics_path.exists() and metrics_path.is_dir():
        raise ValueError(f"--metrics {metrics_path} is a directory")

    if loaded is not None:
        task, data, state, optimizer = loaded.task, loaded.data, loaded.state, loaded.optimizer
        meta = loaded.header.get("meta", {})
        elapsed0 = float(meta.get("elapsed", 0.0))
    else:
        task = get_task(config.task)
        data = task.setup(config)
        optimizer, _ = make_optimizer(config)
        state = init_state(task, config, data, optimizer)
        elapsed0 = 0.0
    _, lr_at = make_optimizer(config)
    lstm_fn = GRADS[config.grad]
    baselines = task.baselines(data)
    info = task.info(data)
    n_params = count_params(state.params)

    # ---- files
    records: list[dict] = []
    metrics_file = None
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        cfg_json = {
            "config": dataclasses.asdict(config),
            "task": {"name": task.name, "metric": task.metric, "metric_label": task.metric_label, **info},
            "parameters": n_params,
            "baselines": baselines,
            "versions": {"python": sys.version.split()[0], "jax": jax.__version__, "optax": optax.__version__},
        }
        checkpoint.atomic_write(out_dir / "config.json", (json.dumps(cfg_json, indent=1) + "\n").encode())
    if metrics_path is not None:
        metrics_path.parent.mkdir(parents=True, exist_ok=True)
        if loaded is not None:
            records = _read_records(metrics_path, state.step)
        text = "".join(json.dumps(r) + "\n" for r in records)
        checkpoint.atomic_write(metrics_path, text.encode())
        metrics_file = open(metrics_path, "a")  # noqa: SIM115 (closed in the finally below)

    train_step = make_train_step(task, optimizer, lstm_fn)
    place, to_host = (lambda batch: batch), (lambda tree: tree)
    if devices is None and jax.process_count() == 1:
        step_fn = jax.jit(train_step, donate_argnums=(0, 1))
    else:
        mesh = parallel.make_mesh(devices)
        print(parallel.describe(mesh, int(config.batch_size)), file=stream, flush=True)
        step_fn = parallel.data_parallel(train_step, mesh)
        place, to_host = (lambda batch: parallel.shard_batch(mesh, batch)), parallel.to_host
        state = state._replace(
            params=parallel.replicate(mesh, state.params), opt_state=parallel.replicate(mesh, state.opt_state)
        )
    evaluate = task.make_evaluator(data, config, lstm_fn)
    ckpt_path = out_dir / checkpoint.FILENAME if out_dir is not None else None
    ckpt_config = dataclasses.asdict(config)
    t_start = time.perf_counter()
    elapsed = lambda: elapsed0 + time.perf_counter() - t_start  # noqa: E731
    last_saved = state.step if loaded is not None else None

    def save(st: TrainState) -> None:
        nonlocal last_saved
        if ckpt_path is not None:
            meta = {"step": st.step, "elapsed": elapsed(), "info": info, "task": task.name, "baselines": baselines}
            checkpoint.save(ckpt_path, to_host(st.arrays()), config=ckpt_config, meta=meta)
            last_saved = st.step

    print(
        f"{task.name}: {n_params:,} parameters, LSTM H={config.hidden}, batch {config.batch_size} x "
        f"{config.seq_len}, {config.optimizer} lr {config.lr:g} ({config.schedule}), grad {config.grad}, "
        f"{config.dtype}; baselines: "
        + (", ".join(f"{k} {_fmt(v)}" for k, v in baselines.items()) or "none")
        + (f"; resuming at step {state.step}" if loaded is not None else ""),
        file=stream,
        flush=True,
    )
    bar = Progress(config.steps, state.step, task.metric, progress, stream)
    callbacks = list(callbacks)
    step, params, opt_state, key, carry = state
    losses: list[float] = []
    window: list[tuple[float, float]] = []
    last_metric = records[-1].get(task.metric) if records else None
    stop, message, hard = "done", "", False

    def current() -> TrainState:
        return TrainState(step, params, opt_state, key, carry)

    def nan_message(what: str, at: int) -> str:
        kept = f"the last good checkpoint (step {last_saved}) is kept in {ckpt_path}"
        if ckpt_path is None or last_saved is None:
            kept = "no checkpoint had been written yet"
        return f"stopped: {what} at step {at}; {kept}. Try a lower --lr or a smaller --clip."

    def log() -> str | None:
        """Evaluate, record, save, run callbacks. Returns "nan" (bad validation loss, nothing saved),
        "callback" (a callback asks to stop) or None."""
        nonlocal window, last_metric
        rec = {
            "step": step,
            "loss": float(np.mean([w[0] for w in window])) if window else None,
            "grad_norm": float(np.mean([w[1] for w in window])) if window else None,
            "lr": lr_at(max(step - 1, 0)),
        }
        rec.update(evaluate(to_host(params)))
        rec["elapsed"] = round(elapsed(), 3)
        bad = {k: v for k, v in rec.items() if isinstance(v, float) and not math.isfinite(v)}
        rec = {k: _jsonable(v) for k, v in rec.items()}
        records.append(rec)
        last_metric, window = rec.get(task.metric), []
        if metrics_file is not None:
            metrics_file.write(json.dumps(rec) + "\n")
            metrics_file.flush()
        if bad:
            return "nan: " + ", ".join(f"{k} became {v}" for k, v in bad.items())
        st = current()
        save(st)
        return "callback" if any([bool(cb(rec, st)) for cb in callbacks]) else None

    try:
        with _sigint_flag() as interrupted:
            try:
                while step < config.steps:
                    key, sub = jax.random.split(key)
                    batch = task.train_batch(data, config, step, sub)
                    if task.carries_state:
                        batch = {**batch, "h0": carry.h, "c0": carry.c}
                    params, opt_state, out = step_fn(params, opt_state, place(batch))
                    loss, gnorm = (float(v) for v in jax.device_get((out["loss"], out["grad_norm"])))
                    if not (math.isfinite(loss) and math.isfinite(gnorm)):
                        stop = "nan"
                        message = nan_message(f"the loss became {loss} (gradient norm {gnorm})", step + 1)
                        step += 1
                        break
                    carry = out.get("carry", carry)
                    step += 1
                    losses.append(loss)
                    window.append((loss, gnorm))
                    logged = step % config.log_every == 0 or step == config.steps
                    if logged:
                        why = log()
                        if why and why.startswith("nan"):
                            stop, message = "nan", nan_message(why[5:], step)
                            break
                        if why == "callback":
                            stop, message = "callback", f"stopped by a callback at step {step}"
                            break
                    left = config.time_limit - (time.perf_counter() - t_start) if config.time_limit else None
                    bar.update(step, loss, last_metric, logged=logged, limit_left=left)
                    if interrupted.is_set():
                        stop, message = "interrupted", f"interrupted at step {step}"
                        break
                    if left is not None and left <= 0:
                        stop, message = "time_limit", f"time limit of {config.time_limit:g} s reached at step {step}"
                        break
            except KeyboardInterrupt:  # a second Ctrl-C: the state may be half-updated, so it is not saved
                stop, message, hard = "interrupted", f"interrupted during step {step + 1}", True
        bar.close()
        if stop == "time_limit" and (not records or records[-1]["step"] != step):
            why = log()
            if why and why.startswith("nan"):
                stop, message = "nan", nan_message(why[5:], step)
        elif stop == "interrupted" and last_saved != step and not hard:
            save(current())
        if stop == "interrupted" and ckpt_path is not None and last_saved is not None:
            message += f"; checkpoint at step {last_saved} in {ckpt_path}, continue with --resume"
        if plot and out_dir is not None and records:
            plot_curves(records, task, baselines, out_dir / "curves.png")
    finally:
        bar.close()
        if metrics_file is not None:
            metrics_file.close()
    if stop == "done":
        message = f"finished {step} steps"
    return TrainResult(current(), config, records, losses, stop, baselines, elapsed(), out_dir, message, n_params, data)


# --------------------------------------------------------------------------- command line


def _number(convert: Callable, ok: Callable, what: str) -> Callable[[str], Any]:
    """An argparse ``type``: ``convert`` the text, accept it if ``ok``, else say it must be ``what``."""

    def parse(text: str):
        try:
            v = convert(text)
        except ValueError:
            v = None
        if v is None or not ok(v):
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}")
        return v

    return parse


_positive_int = _number(int, lambda v: v >= 1, "a positive integer")
_nonneg_int = _number(int, lambda v: v >= 0, "a non-negative integer")
_positive_float = _number(float, lambda v: math.isfinite(v) and v > 0, "a positive number")
_nonneg_float = _number(float, lambda v: math.isfinite(v) and v >= 0, "a non-negative number")


def _rate(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number in [0, 1), got {text!r}") from None
    if not 0 <= v < 1:
        raise argparse.ArgumentTypeError(f"must be a number in [0, 1), got {text!r}")
    return v


def _parse(parser: argparse.ArgumentParser, argv: Sequence[str]) -> argparse.Namespace | int:
    """Parse, turning argparse's exit into a return code (2 for errors, 0 for --help)."""
    try:
        return parser.parse_args(list(argv))
    except SystemExit as e:
        return int(e.code) if isinstance(e.code, int) else EXIT_USAGE


def _error(prog: str, message: str, code: int) -> int:
    print(f"{prog}: error: {message}", file=sys.stderr)
    return code


def train_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="jax-lstm train",
        description="Train an LSTM (hand-written BPTT by default) on an embedded task. With no arguments: "
        "charlm, the character-level language model on Python's pydoc_data text, about 5 minutes on 2 CPU cores.",
        epilog="Defaults per task: "
        + "; ".join(
            f"{name}: " + ", ".join(f"{k}={v}" for k, v in t.defaults.items() if k in ("steps", "hidden", "lr"))
            for name, t in TASKS.items()
        ),
    )
    p.add_argument("--task", choices=sorted(TASKS), help=f"the task (default {DEFAULT_TASK})")
    p.add_argument("--steps", type=_positive_int, help="total optimizer steps (default: the task's)")
    p.add_argument("--seed", type=_nonneg_int, help="seed of params and data (default 0)")
    p.add_argument("--out", metavar="DIR", help="run directory (default runs/TASK)")
    p.add_argument(
        "--resume",
        nargs="?",
        const=True,
        default=False,
        metavar="PATH",
        help="continue the run in --out, or the one in PATH (a run directory or checkpoint file)",
    )
    p.add_argument("--force", action="store_true", help="start over in a directory that holds a checkpoint")
    p.add_argument("--grad", choices=tuple(GRADS), help="manual: hand-written BPTT (default); autodiff: lstm_ref")
    p.add_argument("--metrics", metavar="FILE", help="JSON-lines log (default DIR/metrics.jsonl)")
    p.add_argument("--batch-size", type=_positive_int)
    p.add_argument("--seq-len", type=_positive_int, help="window length (charlm) or sequence length (sine)")
    p.add_argument("--hidden", type=_positive_int, help="LSTM hidden size H")
    p.add_argument("--embed", type=_positive_int, help="embedding size (charlm)")
    p.add_argument("--optimizer", choices=OPTIMIZERS, help="default adam")
    p.add_argument("--lr", type=_positive_float, help="peak learning rate")
    p.add_argument("--schedule", choices=SCHEDULES, help="constant or warm-up + cosine decay to lr/10")
    p.add_argument("--warmup", type=_nonneg_int, help="warm-up steps")
    p.add_argument("--clip", type=_nonneg_float, help="clip gradients to this global norm (0: off)")
    p.add_argument("--dropout", type=_rate, help="dropout rate on the LSTM outputs in training (charlm default 0.2)")
    p.add_argument("--dtype", choices=DTYPES, help="default float32")
    p.add_argument("--log-every", type=_positive_int, help="evaluate, log and checkpoint every N steps")
    p.add_argument(
        "--time-limit",
        type=_nonneg_float,
        metavar="SECONDS",
        help="stop (with a checkpoint) after this many seconds; 0: no limit (charlm default 480, a safety cap)",
    )
    p.add_argument("--progress", choices=PROGRESS_MODES, default="auto", help="progress display on stderr")
    p.add_argument(
        "--no-sample",
        action="store_true",
        help="do not print the text sample (charlm) or example sums (addition) at the end",
    )
    dp = p.add_argument_group("data parallel (jax.sharding; see README, Scale out)")
    dp.add_argument("--devices", type=_positive_int, help="split each batch over the first N devices")
    dp.add_argument("--coordinator", metavar="HOST:PORT", help="jax.distributed coordinator (process 0's address)")
    dp.add_argument("--num-processes", type=_positive_int, help="processes in a jax.distributed run")
    dp.add_argument("--process-id", type=_nonneg_int, help="this process's rank in a jax.distributed run")
    return p


def main_train(argv: Sequence[str]) -> int:
    """``jax-lstm train``: returns 0 on success, 1 on failure (NaN, bad checkpoint), 2 on bad
    arguments, 130 when interrupted (after writing a checkpoint)."""
    prog = "jax-lstm train"
    args = _parse(train_parser(), argv)
    if isinstance(args, int):
        return args
    config = TrainConfig(
        task=args.task,
        steps=args.steps,
        seed=args.seed,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        hidden=args.hidden,
        embed=args.embed,
        optimizer=args.optimizer,
        lr=args.lr,
        schedule=args.schedule,
        warmup=args.warmup,
        clip=args.clip,
        dropout=args.dropout,
        dtype=args.dtype,
        grad=args.grad,
        log_every=args.log_every,
        time_limit=args.time_limit,
    )
    out = args.out
    if out is None and not (args.resume and args.resume is not True):
        out = os.path.join("runs", args.task or DEFAULT_TASK)
    if args.resume and args.force:
        return _error(prog, "--resume and --force contradict each other", EXIT_USAGE)
    multi = (args.coordinator, args.num_processes, args.process_id)
    if any(v is not None for v in multi):
        if any(v is None for v in multi):
            return _error(prog, "--coordinator, --num-processes and --process-id go together", EXIT_USAGE)
        try:
            parallel.initialize(args.coordinator, args.num_processes, args.process_id)
        except (ValueError, RuntimeError) as e:
            return _error(prog, f"jax.distributed could not start: {e}", EXIT_FAIL)
        if args.process_id != 0:  # process 0 alone writes the run directory
            out, args.metrics = None, None
    _enable_x64_if(args.dtype)
    try:
        result = train(
            config,
            out_dir=out,
            resume=args.resume,
            force=args.force,
            metrics_path=args.metrics,
            progress=args.progress,
            devices=args.devices,
        )
    except checkpoint.CheckpointError as e:
        return _error(prog, str(e), EXIT_FAIL)
    except (ValueError, FileExistsError) as e:
        return _error(prog, str(e), EXIT_USAGE)
    task = get_task(result.config.task)
    print(summary_table(result, task, result.n_params))
    if result.stop != "nan" and not args.no_sample:
        demo = task.demo(result.state.params, result.data, GRADS[result.config.grad])
        if demo:
            print(demo)
    if result.stop == "nan":
        return _error(prog, result.message, EXIT_FAIL)
    print(f"{prog}: {result.message}", file=sys.stderr)
    return EXIT_INTERRUPTED if result.stop == "interrupted" else EXIT_OK


def sample_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="jax-lstm sample", description="Generate text from a charlm checkpoint.")
    p.add_argument(
        "--checkpoint",
        default=os.path.join("runs", "charlm"),
        metavar="PATH",
        help="run directory or checkpoint file (default runs/charlm)",
    )
    p.add_argument("--prompt", default="The ", help="text the model reads first (default 'The ')")
    p.add_argument("--length", type=_positive_int, default=500, help="characters to generate (default 500)")
    p.add_argument("--temperature", type=_positive_float, default=0.8, help="> 0; lower is more conservative")
    p.add_argument("--seed", type=_nonneg_int, default=0)
    return p


def main_sample(argv: Sequence[str]) -> int:
    """``jax-lstm sample``: print the prompt and the generated text."""
    from jax_lstm.tasks import charlm

    prog = "jax-lstm sample"
    args = _parse(sample_parser(), argv)
    if isinstance(args, int):
        return args
    if not args.prompt:
        return _error(prog, "--prompt must not be empty", EXIT_USAGE)
    try:
        run = load_run(args.checkpoint)
    except checkpoint.CheckpointError as e:
        return _error(prog, str(e), EXIT_FAIL)
    if run.task.name != "charlm":
        return _error(prog, f"{args.checkpoint} is a {run.task.name} checkpoint; sample needs a charlm one", EXIT_USAGE)
    try:
        text = charlm.sample(run.state.params, run.data.vocab, args.prompt, args.length, args.temperature, args.seed)
    except ValueError as e:
        return _error(prog, f"--prompt: {e}", EXIT_USAGE)
    print(args.prompt + text)
    return EXIT_OK


def evaluate_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="jax-lstm evaluate", description="Evaluate a checkpoint on its task's validation split."
    )
    p.add_argument(
        "--checkpoint",
        default=os.path.join("runs", "charlm"),
        metavar="PATH",
        help="run directory or checkpoint file (default runs/charlm)",
    )
    p.add_argument("--grad", choices=tuple(GRADS), default="manual", help="which LSTM runs the forward pass")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    return p


def main_evaluate(argv: Sequence[str]) -> int:
    """``jax-lstm evaluate``: the validation metric and loss of a checkpoint, beside the baselines."""
    prog = "jax-lstm evaluate"
    args = _parse(evaluate_parser(), argv)
    if isinstance(args, int):
        return args
    try:
        run = load_run(args.checkpoint)
    except checkpoint.CheckpointError as e:
        return _error(prog, str(e), EXIT_FAIL)
    values = run.task.make_evaluator(run.data, run.config, GRADS[args.grad])(run.state.params)
    baselines = run.task.baselines(run.data)
    if args.json:
        print(json.dumps({"task": run.task.name, "step": run.state.step, **values, "baselines": baselines}))
        return EXIT_OK
    rows = [("checkpoint", f"{_checkpoint_path(args.checkpoint)} (step {run.state.step})"), ("task", run.task.name)]
    rows += [(k, _fmt(v)) for k, v in values.items()]
    rows += [(f"baseline: {k}", _fmt(v)) for k, v in baselines.items()]
    print(_table(rows))
    return EXIT_OK
