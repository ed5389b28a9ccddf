"""Training: the optax loop, the jit-compiled train step, evaluation at log steps, callbacks and checkpoints.

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

The command line (``jax-lstm train``, ``sample``, ``evaluate``) is in
``jax_lstm.cli``; the progress line, the summary table and the plots in
``jax_lstm.reporting``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, TextIO

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jax_lstm import checkpoint, parallel
from jax_lstm.bptt import lstm
from jax_lstm.reference import lstm_ref
from jax_lstm.reporting import Progress, describe_model, fmt, plot_curves, show_value
from jax_lstm.tasks import DEFAULT_TASK, TASKS, Task, get_task
from jax_lstm.tasks.base import zero_carry

__all__ = [
    "TrainConfig",
    "TrainState",
    "TrainResult",
    "LoadedRun",
    "GRADS",
    "make_optimizer",
    "make_train_step",
    "init_state",
    "train",
    "load_run",
    "checkpoint_path",
    "enable_x64_if",
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
    "bidirectional",
    "layer_dropout",
    "recurrent_dropout",
)
# Fields a resumed run may change.
RESUMABLE_FIELDS = ("steps", "grad", "log_every", "time_limit")

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
      hidden: the LSTM stack's hidden sizes: an int H is one layer, a tuple (H_0, H_1, ...) one layer
        per entry, bottom first.
      bidirectional: give every layer a reverse direction (refused for next-step prediction tasks,
        whose targets a reverse direction would read).
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
      layer_dropout: dropout rate between stacked layers during training; 0 disables.
      recurrent_dropout: variational dropout rate on every layer's h_{t-1} during training (one mask
        per sequence, the same at every step); 0 disables.
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
    hidden: int | tuple[int, ...] | None = None
    bidirectional: bool | None = None
    embed: int | None = None
    optimizer: str | None = None
    lr: float | None = None
    schedule: str | None = None
    warmup: int | None = None
    decay_steps: int | None = None
    clip: float | None = None
    dropout: float | None = None
    layer_dropout: float | None = None
    recurrent_dropout: float | None = None
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
            "bidirectional": False,
            "layer_dropout": 0.0,
            "recurrent_dropout": 0.0,
        }
        for k, v in {**generic, **task.defaults}.items():
            if values.get(k) is None:
                values[k] = v
        if isinstance(values["hidden"], (list, tuple)):  # one size per layer; a single layer is an int
            values["hidden"] = tuple(values["hidden"]) if len(values["hidden"]) != 1 else values["hidden"][0]
        if values["decay_steps"] is None:
            values["decay_steps"] = values["steps"]
        if values["log_every"] is None:
            values["log_every"] = max(1, values["steps"] // 20)
        cfg = TrainConfig(**values)
        cfg.check()
        return cfg

    def check(self) -> None:
        """Raise ValueError naming the first bad field."""
        for name in ("steps", "batch_size", "seq_len", "decay_steps", "log_every"):
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
        sizes = self.hidden if isinstance(self.hidden, tuple) else (self.hidden,)
        if not sizes or not all(isinstance(h, (int, np.integer)) and not isinstance(h, bool) and h >= 1 for h in sizes):
            raise ValueError(
                f"hidden must be a positive integer or a tuple of them, one per layer, got {self.hidden!r}"
            )
        for name in ("dropout", "layer_dropout", "recurrent_dropout"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v < 1):
                raise ValueError(f"{name} must be in [0, 1), got {v!r}")
        if not isinstance(self.bidirectional, bool):
            raise ValueError(f"bidirectional must be True or False, got {self.bidirectional!r}")
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
        if self.bidirectional and get_task(self.task).causal:
            raise ValueError(
                f"--bidirectional is refused for {self.task}: it predicts the next step, and a reverse "
                "direction would read the targets it is asked to predict"
            )
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
    carry: Any  # the stack's state carried across windows (h, c: (B, H_l) per layer and direction), or None

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


def make_train_step(
    task: Task, optimizer: optax.GradientTransformation, lstm_fn=lstm, config: TrainConfig | None = None
) -> Callable:
    """The pure train step ``(params, opt_state, batch[, healthy]) -> (params, opt_state, metrics)``.

    The step checks its own loss: when the loss or the gradient norm is not
    finite, or ``healthy`` is False, it returns the params, the optimizer state
    and the carried state it was given, unchanged, and ``metrics["ok"]`` False.
    Feeding each step's ``ok`` to the next as ``healthy`` therefore freezes a run
    at its last good state, and the host needs to read the flags only now and
    then (``train`` reads them at log steps), never waiting on a step.

    Args:
      task: gives the loss.
      optimizer: an optax transformation.
      lstm_fn: ``lstm`` (hand-written BPTT) or ``lstm_ref`` (autodiff).
      config: gives the dropout rates inside the LSTM stack (``layer_dropout``,
        ``recurrent_dropout``); None trains without them.

    Returns:
      A function to ``jax.jit`` (with ``donate_argnums=(0, 1)``) or to hand to
      ``jax_lstm.parallel.data_parallel``. ``metrics`` holds ``loss``,
      ``grad_norm`` and ``ok`` (scalars) and, for tasks that carry state, ``carry``.
    """

    def train_step(params, opt_state, batch, healthy=True):
        (loss, aux), grads = jax.value_and_grad(lambda p: task.loss(p, batch, lstm_fn, config), has_aux=True)(params)
        updates, new_opt_state = optimizer.update(grads, opt_state, params)
        new_params = optax.apply_updates(params, updates)
        grad_norm = optax.tree.norm(grads)
        ok = jnp.logical_and(healthy, jnp.isfinite(loss) & jnp.isfinite(grad_norm))
        keep = lambda new, old: jnp.where(ok, new, old)  # noqa: E731
        params, opt_state = jax.tree.map(keep, (new_params, new_opt_state), (params, opt_state))
        if "carry" in aux and "carry" in batch:
            aux = {**aux, "carry": jax.tree.map(keep, aux["carry"], batch["carry"])}
        return params, opt_state, {"loss": loss, "grad_norm": grad_norm, "ok": ok, **aux}

    return train_step


def init_state(task: Task, config: TrainConfig, data, optimizer: optax.GradientTransformation) -> TrainState:
    """Step 0: fresh params from ``config.seed``, optimizer state, PRNG key and a zero carry."""
    k_params, k_data = jax.random.split(jax.random.PRNGKey(int(config.seed)))
    params = task.init_params(k_params, config, data)
    carry = zero_carry(config, int(config.batch_size)) if task.carries_state else None
    return TrainState(0, params, optimizer.init(params), k_data, carry)


def count_params(params) -> int:
    return int(sum(np.size(a) for a in jax.tree.leaves(params)))


def checkpoint_path(path: str | os.PathLike) -> Path:
    """The checkpoint file of ``path``: the file itself, or ``checkpoint.npz`` in a run directory."""
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
    """A checkpoint read back with everything needed to continue or evaluate it."""

    task: Task
    config: TrainConfig
    data: Any
    state: TrainState
    header: dict
    optimizer: optax.GradientTransformation


def _single_layer_path(path: str) -> str:
    """A leaf path of a checkpoint written when the model was one ``LSTMParams`` (and the carry one
    ``LSTMState``) as the path of the same leaf in a one-layer stack."""
    return path.replace("['lstm'].", "['lstm'][0][0].").replace("['carry'].", "['carry'][0][0].")


def enable_x64_if(dtype: str | None) -> None:
    """Turn on ``jax_enable_x64`` for a float64 run (the command line's way to honour ``--dtype float64``)."""
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
    path = checkpoint_path(path)
    header = checkpoint.read_header(path)
    if config is None:
        config = _config_from_header(header)
        enable_x64_if(config.dtype)
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
    one_layer = len(template.params["lstm"]) == 1 and len(template.params["lstm"][0]) == 1
    arrays, header = checkpoint.restore(path, template.arrays(), rename=_single_layer_path if one_layer else None)
    step = header.get("meta", {}).get("step")
    if not isinstance(step, int) or step < 0:
        raise checkpoint.CheckpointError(f"checkpoint {path} has no valid step in its metadata (got {step!r})")
    state = TrainState(step, arrays["params"], arrays["opt_state"], arrays["key"], arrays["carry"])
    return LoadedRun(task, config, data, state, header, optimizer)


# --------------------------------------------------------------------------- the loop's parts


class _Plan(NamedTuple):
    """A run checked and ready to start: nothing has been written yet."""

    config: TrainConfig
    task: Task
    data: Any
    optimizer: optax.GradientTransformation
    state: TrainState
    out_dir: Path | None
    metrics_path: Path | None
    resumed: bool
    elapsed0: float  # seconds spent by the earlier runs of a resumed run


def _resume_config(config: TrainConfig, ckpt: Path) -> TrainConfig:
    """The checkpoint's config with this call's ``RESUMABLE_FIELDS``; ValueError if a fixed field differs."""
    saved = _config_from_header(checkpoint.read_header(ckpt))
    enable_x64_if(saved.dtype)
    try:
        saved = saved.resolved()  # an older checkpoint's missing fields take their defaults
    except (ValueError, TypeError) as e:
        raise checkpoint.CheckpointError(f"checkpoint {ckpt} has an invalid config: {e}") from None
    conflicts = [
        f"{flag_text(name, getattr(config, name))} (the checkpoint has {_saved_text(name, getattr(saved, name))})"
        for name in FIXED_FIELDS
        if getattr(config, name) is not None and _normal(getattr(config, name)) != _normal(getattr(saved, name))
    ]
    if conflicts:
        raise ValueError(
            f"cannot resume {ckpt} with different settings: {'; '.join(conflicts)}. "
            "A resumed run keeps its model, data and optimizer settings; only steps, grad, log_every "
            "and time_limit may change"
        )
    changes = {name: getattr(config, name) for name in RESUMABLE_FIELDS if getattr(config, name) is not None}
    return dataclasses.replace(saved, **changes).resolved()


def flag_text(name: str, value) -> str:
    """``--hidden 256,256``, ``--bidirectional``: a config field as the flag that sets it."""
    flag = name.replace("_", "-")
    if isinstance(value, bool):
        return f"--{flag}" if value else f"--no-{flag}"
    return f"--{flag} {show_value(value)}"


def _saved_text(name: str, value) -> str:
    return flag_text(name, value) if isinstance(value, bool) else show_value(value)


def _normal(value):
    """hidden as a checkpoint's JSON holds it (a list) or as a config holds it (a tuple, or an int for one layer)."""
    if isinstance(value, (tuple, list)):
        return tuple(value) if len(value) != 1 else value[0]
    return value


def _plan(config: TrainConfig, out_dir, resume, force: bool, metrics_path) -> _Plan:
    """Resolve the config, read the checkpoint to resume and check the paths; write nothing."""
    if resume:
        ckpt = checkpoint_path(out_dir if resume is True else resume)
        out_dir = ckpt.parent if out_dir is None else out_dir
        config = _resume_config(config, ckpt)
        loaded = load_run(ckpt, config)
        task, data, optimizer, state = loaded.task, loaded.data, loaded.optimizer, loaded.state
        elapsed0 = float(loaded.header.get("meta", {}).get("elapsed", 0.0))
    else:
        config = config.resolved()
        task = get_task(config.task)
        data = task.setup(config)
        optimizer, _ = make_optimizer(config)
        state = init_state(task, config, data, optimizer)
        elapsed0 = 0.0
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
    if metrics_path is not None and metrics_path.is_dir():
        raise ValueError(f"--metrics {metrics_path} is a directory")
    return _Plan(config, task, data, optimizer, state, out_dir, metrics_path, bool(resume), elapsed0)


def _jsonable(x):
    return None if isinstance(x, float) and not math.isfinite(x) else x


class RunFiles:
    """The files of a run: ``config.json``, ``metrics.jsonl`` (one line per log step) and the checkpoint.

    ``out_dir`` None writes no config and no checkpoint; ``metrics_path`` None writes no metrics.
    """

    def __init__(self, out_dir: Path | None, metrics_path: Path | None):
        self.out_dir, self.metrics_path = out_dir, metrics_path
        self.checkpoint = out_dir / checkpoint.FILENAME if out_dir is not None else None
        self.last_saved: int | None = None  # the step of the checkpoint on disk, if any
        self._metrics = None

    def start(self, description: dict, records: list[dict], saved_step: int | None) -> None:
        """Write ``config.json`` and rewrite the metrics file to ``records`` (a resumed run's earlier lines)."""
        self.last_saved = saved_step
        if self.out_dir is not None:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            checkpoint.atomic_write(self.out_dir / "config.json", (json.dumps(description, indent=1) + "\n").encode())
        if self.metrics_path is not None:
            self.metrics_path.parent.mkdir(parents=True, exist_ok=True)
            checkpoint.atomic_write(self.metrics_path, "".join(json.dumps(r) + "\n" for r in records).encode())
            self._metrics = open(self.metrics_path, "a")  # noqa: SIM115 (closed by close())

    def append(self, record: dict) -> None:
        if self._metrics is not None:
            self._metrics.write(json.dumps(record) + "\n")
            self._metrics.flush()

    def save(self, arrays: dict, step: int, config: dict, meta: dict) -> None:
        """Write the checkpoint of ``step`` (host arrays), atomically."""
        if self.checkpoint is not None:
            checkpoint.save(self.checkpoint, arrays, config=config, meta={"step": step, **meta})
            self.last_saved = step

    def close(self) -> None:
        if self._metrics is not None:
            self._metrics.close()
            self._metrics = None


def _earlier_records(path: Path | None, upto: int) -> list[dict]:
    """The metrics lines of a resumed run up to its checkpoint's step (later ones were not saved)."""
    records = []
    if path is not None and path.exists():
        for line in path.read_text().splitlines():
            try:
                r = json.loads(line)
            except ValueError:
                continue
            if isinstance(r, dict) and isinstance(r.get("step"), int) and r["step"] <= upto:
                records.append(r)
    return records


class _Device(NamedTuple):
    """Where the step runs: ``step`` (jitted), ``place`` (a host batch onto the devices) and ``to_host``."""

    step: Callable
    place: Callable
    to_host: Callable
    put: Callable  # a TrainState onto the devices


def _device(train_step: Callable, devices: int | None, batch_size: int, stream: TextIO) -> _Device:
    """One device (plain ``jax.jit``), or data parallel over a mesh when ``devices`` or processes ask for it."""
    if devices is None and jax.process_count() == 1:
        same = lambda x: x  # noqa: E731
        return _Device(jax.jit(train_step, donate_argnums=(0, 1)), same, same, same)
    mesh = parallel.make_mesh(devices)
    print(parallel.describe(mesh, batch_size), file=stream, flush=True)

    def put(state: TrainState) -> TrainState:
        return state._replace(
            params=parallel.replicate(mesh, state.params), opt_state=parallel.replicate(mesh, state.opt_state)
        )

    return _Device(
        parallel.data_parallel(train_step, mesh), lambda b: parallel.shard_batch(mesh, b), parallel.to_host, put
    )


class _Clock:
    """Seconds since this call started, and in all (the earlier runs of a resumed run included)."""

    def __init__(self, earlier: float = 0.0):
        self.earlier, self.start = earlier, time.perf_counter()

    def since_start(self) -> float:
        return time.perf_counter() - self.start

    def elapsed(self) -> float:
        return self.earlier + self.since_start()


class _Pending:
    """The (loss, gradient norm, ok) of the steps run since they were last read, still on the device.

    ``push`` lets the host run at most ``ahead`` steps ahead of the device (it then waits on the step
    ``ahead`` back, never on the one just launched), so batches are built while the device computes.
    ``read`` fetches them all in one transfer.
    """

    def __init__(self, step: int, ahead: int = 2):
        self.step, self.ahead = step, ahead  # step: the number of the last step read
        self.outs: list[tuple[jax.Array, jax.Array, jax.Array]] = []

    def push(self, out: dict) -> None:
        self.outs.append((out["loss"], out["grad_norm"], out["ok"]))
        if len(self.outs) > self.ahead:
            jax.block_until_ready(self.outs[-1 - self.ahead][2])

    def read(self) -> tuple[list[float], list[float], tuple[int, float, float] | None]:
        """``(losses, grad_norms)`` of the good steps and ``(step, loss, grad_norm)`` of the first bad one."""
        values = [(float(loss), float(g), bool(ok)) for loss, g, ok in jax.device_get(self.outs)]
        first, self.outs = self.step, []
        self.step += len(values)
        n_good = next((i for i, (_, _, ok) in enumerate(values) if not ok), len(values))
        bad = None if n_good == len(values) else (first + n_good + 1, *values[n_good][:2])
        return [v[0] for v in values[:n_good]], [v[1] for v in values[:n_good]], bad


class _Logger:
    """What happens at a log step: evaluate, record, append to the metrics file, save, run the callbacks.

    Between log steps it collects the training losses and gradient norms (``add``); ``records`` holds
    every record of the run, a resumed run's earlier ones first.
    """

    def __init__(self, config, evaluate, files: RunFiles, callbacks, records, clock: _Clock, to_host, meta: dict):
        self.evaluate, self.files, self.callbacks = evaluate, files, list(callbacks)
        self.records, self.clock, self.to_host = records, clock, to_host
        self.lr_at = make_optimizer(config)[1]
        self.ckpt_config, self.ckpt_meta = dataclasses.asdict(config), meta
        self.losses: list[float] = []
        self.grad_norms: list[float] = []

    def add(self, losses: list[float], grad_norms: list[float]) -> None:
        self.losses += losses
        self.grad_norms += grad_norms

    @property
    def last(self) -> dict:
        return self.records[-1] if self.records else {}

    def save(self, state: TrainState) -> None:
        meta = {"elapsed": self.clock.elapsed(), **self.ckpt_meta}
        self.files.save(self.to_host(state.arrays()), state.step, self.ckpt_config, meta)

    def __call__(self, state: TrainState) -> _Stop | None:
        """Log ``state``; a stop if the validation loss is not finite (nothing saved) or a callback asks."""
        record = {
            "step": state.step,
            "loss": float(np.mean(self.losses)) if self.losses else None,
            "grad_norm": float(np.mean(self.grad_norms)) if self.grad_norms else None,
            "lr": self.lr_at(max(state.step - 1, 0)),
            **self.evaluate(self.to_host(state.params)),
            "elapsed": round(self.clock.elapsed(), 3),
        }
        self.losses, self.grad_norms = [], []
        bad = {k: v for k, v in record.items() if isinstance(v, float) and not math.isfinite(v)}
        record = {k: _jsonable(v) for k, v in record.items()}
        self.records.append(record)
        self.files.append(record)
        if bad:
            what = ", ".join(f"{k} became {v}" for k, v in bad.items())
            return _Stop("nan", _nan_message(what, state.step, self.files))
        self.save(state)
        if any([bool(cb(record, state)) for cb in self.callbacks]):
            return _Stop("callback", f"stopped by a callback at step {state.step}")
        return None


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


def _next_batch(task: Task, data, config: TrainConfig, state: TrainState) -> tuple[jax.Array, dict]:
    """The batch of step ``state.step`` (with the carried state, if the task carries one) and the next key."""
    key, sub = jax.random.split(state.key)
    batch = task.train_batch(data, config, state.step, sub)
    if task.carries_state:
        batch = {**batch, "carry": state.carry}
    return key, batch


def _nan_message(what: str, step: int, files: RunFiles) -> str:
    if files.checkpoint is None or files.last_saved is None:
        kept = "no checkpoint had been written yet"
    else:
        kept = f"the last good checkpoint (step {files.last_saved}) is kept in {files.checkpoint}"
    return f"stopped: {what} at step {step}; {kept}. Try a lower --lr or a smaller --clip."


class _Stop(NamedTuple):
    reason: str  # done, interrupted, hard_interrupt, time_limit, callback, nan
    message: str
    step: int | None = None  # nan: the step whose loss was not finite


def _read(pending: _Pending, log: _Logger, losses: list[float]) -> _Stop | None:
    """Move the pending steps' losses into ``losses`` and the log window; a stop if one was not finite."""
    step_losses, grad_norms, bad = pending.read()
    losses.extend(step_losses)
    log.add(step_losses, grad_norms)
    if bad is None:
        return None
    step, loss, grad_norm = bad
    return _Stop("nan", _nan_message(f"the loss became {loss} (gradient norm {grad_norm})", step, log.files), step)


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
      progress: ``auto``, ``bar``, ``lines`` or ``none`` (see ``jax_lstm.reporting.Progress``).
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
    plan = _plan(config, out_dir, resume, force, metrics_path)
    config, task, data = plan.config, plan.task, plan.data
    lstm_fn = GRADS[config.grad]
    baselines, info, n_params = task.baselines(data), task.info(data), count_params(plan.state.params)
    files = RunFiles(plan.out_dir, plan.metrics_path)
    records = _earlier_records(plan.metrics_path, plan.state.step) if plan.resumed else []
    resumed_at = plan.state.step if plan.resumed else None
    files.start(_describe_run(config, task, info, n_params, baselines), records, resumed_at)
    device = _device(make_train_step(task, plan.optimizer, lstm_fn, config), devices, int(config.batch_size), stream)
    clock = _Clock(plan.elapsed0)
    meta = {"info": info, "task": task.name, "baselines": baselines}
    log = _Logger(
        config, task.make_evaluator(data, config, lstm_fn), files, callbacks, records, clock, device.to_host, meta
    )
    print(_start_line(config, task, n_params, baselines, resumed_at), file=stream, flush=True)
    bar = Progress(config.steps, plan.state.step, task.metric, progress, stream)
    try:
        state, losses, stop = _loop(device.put(plan.state), task, data, config, device, log, bar, clock)
        bar.close()
        stop = _finish(stop, state, log)
        if plot and plan.out_dir is not None and records:
            plot_curves(records, task, baselines, plan.out_dir / "curves.png")
    finally:
        bar.close()
        files.close()
    return TrainResult(
        state,
        config,
        records,
        losses,
        stop.reason,
        baselines,
        clock.elapsed(),
        plan.out_dir,
        stop.message,
        n_params,
        data,
    )


def _loop(state, task, data, config, device: _Device, log: _Logger, bar: Progress, clock: _Clock):
    """Run steps until the last one, a stop at a log step, a non-finite loss, Ctrl-C or the time limit.

    The host never waits for a step: each step's finiteness flag feeds the next step, and the losses are
    read back only at log steps and when the loop ends.

    Returns:
      ``(state, losses, stop)``: the state reached (after a non-finite loss: the last good params with the
      bad step's number), the training loss of every good step, and why it stopped
      (``_Stop("hard_interrupt", ...)`` after a second Ctrl-C, when the state must not be saved).
    """
    losses: list[float] = []
    pending, healthy = _Pending(state.step), jnp.asarray(True)
    stop = None
    with _sigint_flag() as interrupted:
        try:
            while stop is None and state.step < config.steps:
                key, batch = _next_batch(task, data, config, state)
                params, opt_state, out = device.step(state.params, state.opt_state, device.place(batch), healthy)
                state = TrainState(state.step + 1, params, opt_state, key, out.get("carry", state.carry))
                pending.push(out)
                healthy = out["ok"]
                logged = state.step % config.log_every == 0 or state.step == config.steps
                if logged:
                    stop = _read(pending, log, losses) or log(state)
                left = config.time_limit - clock.since_start() if config.time_limit else None
                bar.update(state.step, log.last.get("loss"), log.last.get(task.metric), logged=logged, limit_left=left)
                if stop is None and interrupted.is_set():
                    stop = _Stop("interrupted", f"interrupted at step {state.step}")
                elif stop is None and left is not None and left <= 0:
                    stop = _Stop("time_limit", f"time limit of {config.time_limit:g} s reached at step {state.step}")
        except KeyboardInterrupt:  # a second Ctrl-C: the state may be half-updated, so it is not saved
            stop = _Stop("hard_interrupt", f"interrupted during step {state.step + 1}")
    if pending.outs:  # steps since the last log: a non-finite loss among them overrides any other stop
        stop = _read(pending, log, losses) or stop
    if stop is not None and stop.reason == "nan" and stop.step is not None:
        state = state._replace(step=stop.step)  # the params are those before that step: it kept them
    return state, losses, stop or _Stop("done", f"finished {state.step} steps")


def _finish(stop: _Stop, state: TrainState, log: _Logger) -> _Stop:
    """What a stop leaves behind: a log at the time limit, a checkpoint after Ctrl-C, and the final message."""
    if stop.reason == "time_limit" and log.last.get("step") != state.step:
        logged = log(state)
        stop = logged if logged is not None and logged.reason == "nan" else stop
    elif stop.reason == "interrupted" and log.files.last_saved != state.step:
        log.save(state)
    if stop.reason == "hard_interrupt":
        stop = _Stop("interrupted", stop.message)
    if stop.reason == "interrupted" and log.files.checkpoint is not None and log.files.last_saved is not None:
        where = f"checkpoint at step {log.files.last_saved} in {log.files.checkpoint}, continue with --resume"
        stop = _Stop("interrupted", f"{stop.message}; {where}")
    return stop


def _describe_run(config: TrainConfig, task: Task, info: dict, n_params: int, baselines: dict) -> dict:
    """The content of ``config.json``."""
    return {
        "config": dataclasses.asdict(config),
        "task": {"name": task.name, "metric": task.metric, "metric_label": task.metric_label, **info},
        "parameters": n_params,
        "baselines": baselines,
        "versions": {"python": sys.version.split()[0], "jax": jax.__version__, "optax": optax.__version__},
    }


def _start_line(config: TrainConfig, task: Task, n_params: int, baselines: dict, resumed_at: int | None) -> str:
    return (
        f"{task.name}: {n_params:,} parameters, {describe_model(config)}, batch {config.batch_size} x "
        f"{config.seq_len}, {config.optimizer} lr {config.lr:g} ({config.schedule}), grad {config.grad}, "
        f"{config.dtype}; baselines: "
        + (", ".join(f"{k} {fmt(v)}" for k, v in baselines.items()) or "none")
        + (f"; resuming at step {resumed_at}" if resumed_at is not None else "")
    )
