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

from jax_lstm import parallel
from jax_lstm.config import TrainConfig, enable_x64_if, make_optimizer  # noqa: F401 (imported from here too)
from jax_lstm.reporting import Progress, describe_model, fmt, plot_curves
from jax_lstm.runs import (  # noqa: F401 (TrainState, init_state, load_run, checkpoint_path: imported from here too)
    Interrupts,
    LoadedRun,
    Plan,
    RunFiles,
    TrainState,
    checkpoint_path,
    count_params,
    describe_run,
    earlier_records,
    init_state,
    load_run,
    plan_run,
)
from jax_lstm.tasks import GRADS, Task

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


# --------------------------------------------------------------------------- the loop's parts


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
    return f"stopped: {what} at step {step}; {kept}"


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
        plan = plan_run(config, out_dir, resume, force, metrics_path, devices)
        if interrupts.requested:
            return _unstarted(plan, f"{_interrupted(interrupts)} during start-up; nothing was written")
        files = RunFiles(plan.out_dir, plan.metrics_path)
        if files.lock_dir(resume=bool(resume), force=force, checked=plan.checkpoint):
            try:  # another run wrote the checkpoint after it was read: read it again, under the lock
                plan = plan_run(config, out_dir, resume, force, metrics_path, devices)
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


def _run(plan: Plan, files: RunFiles, callbacks, progress: str, stream, plot: bool, interrupts) -> TrainResult:
    """Train from a plan into files whose lock is held."""
    config, task, data = plan.config, plan.task, plan.data
    lstm_fn = GRADS[config.grad]
    baselines, info, n_params = task.baselines(data), task.info(data), count_params(plan.state.params)
    records = earlier_records(plan.metrics_path, plan.state.step) if plan.resumed else []
    resumed_at = plan.state.step if plan.resumed else None
    interrupts.kept = files.kept
    files.start(describe_run(config, task, info, n_params, baselines), records, resumed_at)
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
        if plot and plan.out_dir is not None and records:  # the run is over: a signal now changes nothing
            with interrupts.critical(final=True), files.writing(plan.out_dir / "curves.png"):
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


def _unstarted(plan: Plan, message: str) -> TrainResult:
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


def _start_line(config: TrainConfig, task: Task, n_params: int, baselines: dict, resumed_at: int | None) -> str:
    return (
        f"{task.name}: {n_params:,} parameters, {describe_model(config)}, batch {config.batch_size} x "
        f"{config.seq_len}, {config.optimizer} lr {config.lr:g} ({config.schedule}), grad {config.grad}, "
        f"{config.dtype}; baselines: "
        + (", ".join(f"{k} {fmt(v)}" for k, v in baselines.items()) or "none")
        + (f"; resuming at step {resumed_at}" if resumed_at is not None else "")
    )
