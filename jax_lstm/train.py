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
reproduces an uninterrupted run exactly. Ctrl-C (or SIGTERM, when the
caller asks for it: ``jax_lstm.runs.Interrupts``) finishes the current step,
writes a checkpoint and returns (a second one stops at once and keeps the
last checkpoint whole); a NaN or infinite loss, or validation loss, stops the
run and leaves the last checkpoint (written before the bad step) in place.

The run directory (its lock, its files, what a failed write leaves) is
``jax_lstm.runs``; the command line (``jax-lstm train``, ``sample``,
``evaluate``) is ``jax_lstm.cli``; the progress line, the summary table and
the plots are ``jax_lstm.reporting``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import sys
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
from jax_lstm.reporting import Progress, describe_model, fmt, plot_curves
from jax_lstm.runs import (
    Interrupts,
    ResumeConflict,
    RunFiles,
    check_paths,
    checkpoint_path,
    earlier_records,
    resume_conflicts,
)
from jax_lstm.tasks import DEFAULT_TASK, GRADS, TASKS, Task, get_task
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

# The range of each integer field: counts of steps reach optax's int32 step counter, the seed an int64.
INT32_MAX, INT64_MAX = 2**31 - 1, 2**63 - 1
INT_RANGES = {
    "steps": (1, INT32_MAX),
    "seed": (0, INT64_MAX),
    "batch_size": (1, INT32_MAX),
    "seq_len": (1, INT32_MAX),
    "hidden": (1, INT32_MAX),
    "embed": (0, INT32_MAX),
    "warmup": (0, INT32_MAX),
    "decay_steps": (1, INT32_MAX),
    "log_every": (1, INT32_MAX),
}


def int_error(value, lo: int, hi: int) -> str | None:
    """Why ``value`` is not an integer in [lo, hi] (``lo`` 0 or 1), or None if it is."""
    what = "a positive integer" if lo == 1 else "a non-negative integer"
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < lo:
        return f"must be {what}"
    if value > hi:
        return f"must be {what} of at most {hi}"
    return None


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
        for name, (lo, hi) in INT_RANGES.items():
            v = getattr(self, name)
            why = None if name == "hidden" else int_error(v, lo, hi)
            if why:
                raise ValueError(f"{name} {why}, got {v!r}")
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a positive number, got {self.lr!r}")
        if not (isinstance(self.clip, (int, float)) and math.isfinite(self.clip) and self.clip >= 0):
            raise ValueError(f"clip must be a non-negative number, got {self.clip!r}")
        sizes = self.hidden if isinstance(self.hidden, tuple) else (self.hidden,)
        if not sizes or any(int_error(h, *INT_RANGES["hidden"]) for h in sizes):
            raise ValueError(
                f"hidden must be a positive integer or a tuple of them, one per layer, got {self.hidden!r}"
            )
        for name in ("dropout", "layer_dropout", "recurrent_dropout"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v < 1):
                raise ValueError(f"{name} must be in [0, 1), got {v!r}")
        if not isinstance(self.bidirectional, bool):
            raise ValueError(f"bidirectional must be True or False, got {self.bidirectional!r}")
        limit = self.time_limit
        if limit is not None and not (
            isinstance(limit, (int, float)) and not isinstance(limit, bool) and 0 <= limit < math.inf
        ):
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
    task: Task, optimizer: optax.GradientTransformation, lstm_fn=GRADS["manual"], config: TrainConfig | None = None
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
    checkpoint: Path | None  # the checkpoint resumed from
    mesh: Any  # the data-parallel mesh, or None for one device


def _resume_config(config: TrainConfig, ckpt: Path) -> TrainConfig:
    """The checkpoint's config with this call's ``RESUMABLE_FIELDS``; ``ResumeConflict`` if a fixed field differs."""
    saved = _config_from_header(checkpoint.read_header(ckpt))
    enable_x64_if(saved.dtype)
    try:
        saved = saved.resolved()  # an older checkpoint's missing fields take their defaults
    except (ValueError, TypeError) as e:
        raise checkpoint.CheckpointError(f"checkpoint {ckpt} has an invalid config: {e}") from None
    conflicts = resume_conflicts(dataclasses.asdict(config), dataclasses.asdict(saved), FIXED_FIELDS)
    if conflicts:
        raise ResumeConflict(ckpt, conflicts, RESUMABLE_FIELDS)
    changes = {name: getattr(config, name) for name in RESUMABLE_FIELDS if getattr(config, name) is not None}
    return dataclasses.replace(saved, **changes).resolved()


def _mesh(devices: int | None, batch_size: int) -> parallel.Mesh | None:
    """The data-parallel mesh, or None for one device; ValueError if ``devices`` or the batch does not fit."""
    if devices is None and jax.process_count() == 1:
        return None
    mesh = parallel.make_mesh(devices)
    n = mesh.devices.size
    if batch_size % n:
        raise ValueError(
            f"batch_size {batch_size} does not divide over {n} devices; use a batch size that is a multiple of {n}"
        )
    return mesh


def _plan(config: TrainConfig, out_dir, resume, force: bool, metrics_path, devices: int | None) -> _Plan:
    """Resolve the config, read the checkpoint to resume, check the paths and the devices; write nothing."""
    ckpt = None
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
    out_dir, metrics_path = check_paths(out_dir, metrics_path, resume=bool(resume), force=force)
    mesh = _mesh(devices, int(config.batch_size))
    return _Plan(config, task, data, optimizer, state, out_dir, metrics_path, bool(resume), elapsed0, ckpt, mesh)


def _jsonable(x):
    return None if isinstance(x, float) and not math.isfinite(x) else x


class _Device(NamedTuple):
    """Where the step runs: ``step`` (jitted), ``place`` (a host batch onto the devices) and ``to_host``."""

    step: Callable
    place: Callable
    to_host: Callable
    put: Callable  # a TrainState onto the devices


def _device(train_step: Callable, mesh, batch_size: int, stream: TextIO) -> _Device:
    """One device (plain ``jax.jit``) when ``mesh`` is None, else data parallel over ``mesh``."""
    if mesh is None:
        same = lambda x: x  # noqa: E731
        return _Device(jax.jit(train_step, donate_argnums=(0, 1)), same, same, same)
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

    def __init__(self, config, evaluate, files: RunFiles, callbacks, records, clock, to_host, meta, interrupts):
        self.evaluate, self.files, self.callbacks, self.interrupts = evaluate, files, list(callbacks), interrupts
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

    def save(self, state: TrainState, final: bool = False) -> None:
        """Write the checkpoint; a second signal meanwhile waits for the write (is dropped if ``final``)."""
        meta = {"elapsed": self.clock.elapsed(), **self.ckpt_meta}
        arrays = self.to_host(state.arrays())
        with self.interrupts.critical(final):
            self.files.save(arrays, state.step, self.ckpt_config, meta)

    def __call__(self, state: TrainState, final: bool = False) -> _Stop | None:
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
        self.save(state, final)
        if any([bool(cb(record, state)) for cb in self.callbacks]):
            return _Stop("callback", f"stopped by a callback at step {state.step}")
        return None


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
    interrupts: Interrupts | None = None,
) -> TrainResult:
    """Train a task; see the module docstring.

    Args:
      config: the run; ``None`` fields take the task's defaults. When resuming,
        fields in ``FIXED_FIELDS`` that are set must equal the checkpoint's.
      out_dir: where the checkpoint, ``config.json``, ``metrics.jsonl`` and
        ``curves.png`` go; None writes nothing. The run holds the directory's
        lock (``jax_lstm.runs``) from before its first write to its end.
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
      interrupts: the signals that stop the run, already installed by the
        caller (the command line: SIGINT and SIGTERM); None installs one for
        SIGINT for the duration of the call (a second Ctrl-C then raises
        ``KeyboardInterrupt`` out of the loop, outside checkpoint writes).

    Returns:
      A ``TrainResult``.

    Raises:
      ValueError: a bad configuration, one that conflicts with the checkpoint
        (``ResumeConflict``), or devices that do not fit.
      CheckpointError: the checkpoint to resume is missing, corrupted or of another model.
      FileExistsError: ``out_dir`` holds a checkpoint and neither ``resume`` nor ``force`` is set.
      RunInUse: another live process is running in ``out_dir``.
      RunWriteError: a file could not be written (the last checkpoint written stays whole).
    Nothing is written before all of the checks of the first three pass.
    """
    stream = stream if stream is not None else sys.stderr
    with Interrupts() if interrupts is None else contextlib.nullcontext(interrupts) as interrupts:
        plan = _plan(config, out_dir, resume, force, metrics_path, devices)
        if interrupts.requested:
            return _unstarted(plan, f"{_interrupted(interrupts)} during start-up; nothing was written")
        files = RunFiles(plan.out_dir, plan.metrics_path)
        if files.lock_dir(resume=bool(resume), force=force, checked=plan.checkpoint):
            try:  # another run wrote the checkpoint after it was read: read it again, under the lock
                plan = _plan(config, out_dir, resume, force, metrics_path, devices)
            except BaseException:
                files.abort()
                raise
        try:
            result = _run(plan, files, callbacks, progress, stream, plot, interrupts)
        except BaseException:
            files.abort()
            raise
        files.close()
        return result


def _run(plan: _Plan, files: RunFiles, callbacks, progress: str, stream, plot: bool, interrupts) -> TrainResult:
    """Train from a plan into files whose lock is held."""
    config, task, data = plan.config, plan.task, plan.data
    lstm_fn = GRADS[config.grad]
    baselines, info, n_params = task.baselines(data), task.info(data), count_params(plan.state.params)
    records = earlier_records(plan.metrics_path, plan.state.step) if plan.resumed else []
    resumed_at = plan.state.step if plan.resumed else None
    interrupts.kept = files.kept
    files.start(_describe_run(config, task, info, n_params, baselines), records, resumed_at)
    device = _device(make_train_step(task, plan.optimizer, lstm_fn, config), plan.mesh, int(config.batch_size), stream)
    clock = _Clock(plan.elapsed0)
    meta = {"info": info, "task": task.name, "baselines": baselines}
    evaluate = task.make_evaluator(data, config, lstm_fn)
    log = _Logger(config, evaluate, files, callbacks, records, clock, device.to_host, meta, interrupts)
    print(_start_line(config, task, n_params, baselines, resumed_at), file=stream, flush=True)
    bar = Progress(config.steps, plan.state.step, task.metric, progress, stream)
    try:
        state, losses, stop = _loop(device.put(plan.state), task, data, config, device, log, bar, clock, interrupts)
        bar.close()
        stop = _finish(stop, state, log, plan.state.step)
        if plot and plan.out_dir is not None and records:
            with files.writing(plan.out_dir / "curves.png"):
                plot_curves(records, task, baselines, plan.out_dir / "curves.png")
    finally:
        bar.close()
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


def _unstarted(plan: _Plan, message: str) -> TrainResult:
    """The result of a run stopped before it wrote anything."""
    n_params = count_params(plan.state.params)
    baselines = plan.task.baselines(plan.data)
    return TrainResult(
        plan.state, plan.config, [], [], "interrupted", baselines, plan.elapsed0, None, message, n_params
    )


def _interrupted(interrupts: Interrupts) -> str:
    return "interrupted" if interrupts.name in ("", "SIGINT") else f"interrupted by {interrupts.name}"


def _loop(state, task, data, config, device: _Device, log: _Logger, bar: Progress, clock: _Clock, interrupts):
    """Run steps until the last one, a stop at a log step, a non-finite loss, a signal or the time limit.

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
    if interrupts.requested:
        stop = _Stop("interrupted", f"{_interrupted(interrupts)} during start-up, at step {state.step}")
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
            if stop is None and interrupts.requested:
                stop = _Stop("interrupted", f"{_interrupted(interrupts)} at step {state.step}")
            elif stop is None and left is not None and left <= 0:
                stop = _Stop("time_limit", f"time limit of {config.time_limit:g} s reached at step {state.step}")
    except KeyboardInterrupt:  # a second Ctrl-C: the state may be half-updated, so it is not saved
        stop = _Stop("hard_interrupt", f"interrupted during step {state.step + 1}")
    if pending.outs:  # steps since the last log: a non-finite loss among them overrides any other stop
        stop = _read(pending, log, losses) or stop
    if stop is not None and stop.reason == "nan" and stop.step is not None:
        state = state._replace(step=stop.step)  # the params are those before that step: it kept them
    return state, losses, stop or _Stop("done", f"finished {state.step} steps")


def _finish(stop: _Stop, state: TrainState, log: _Logger, first_step: int) -> _Stop:
    """What a stop leaves behind: a log at the time limit, a checkpoint after a signal, and the final message."""
    if stop.reason == "time_limit" and log.last.get("step") != state.step:
        logged = log(state, final=True)
        stop = logged if logged is not None and logged.reason == "nan" else stop
    elif stop.reason == "interrupted" and log.files.last_saved != state.step and state.step > first_step:
        log.save(state, final=True)
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
