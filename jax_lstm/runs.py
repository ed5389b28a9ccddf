"""Run directories: where a run starts (fresh or from its checkpoint), their files, their lock, signals.

``plan_run`` resolves a run's config, reads the checkpoint it resumes (``load_run``) and checks its
paths and devices, writing nothing: every check that can refuse a run happens there.

A run directory holds ``checkpoint.npz``, ``config.json``, ``metrics.jsonl`` (one JSON line per log
step) and ``curves.png``. While a run writes to it, it also holds ``.lock``: the run has it
``flock``-ed and wrote its pid, host, start time and command line into it. A second run into the same
directory is refused (``RunInUse``) before it writes anything, naming the first. The kernel drops an
``flock`` when its process ends, however it ends, so the ``.lock`` a killed run leaves behind does not
block the next one; a run that ends normally removes it. Once a run holds the lock it deletes the
temporary files (``.checkpoint.npz.XXXX.tmp``, ...) that a run killed during a write leaves behind.

Every failure to write (an ``OSError`` of any kind: a read-only or full disk, a path below a regular
file) is a ``RunWriteError`` whose message names the file and the checkpoint that is kept; the
checkpoint on disk is always the last one written whole (``jax_lstm.checkpoint`` writes atomically).

``Interrupts`` turns SIGINT (Ctrl-C) and SIGTERM into a request to stop that the training loop reads
between steps; a second signal stops at once, except while a checkpoint is being written.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import numpy as np
import optax

from jax_lstm import checkpoint, parallel
from jax_lstm.config import (
    FIXED_FIELDS,
    RESUMABLE_FIELDS,
    TrainConfig,
    config_from_header,
    enable_x64_if,
    make_optimizer,
)
from jax_lstm.tasks import Task, get_task
from jax_lstm.tasks.base import zero_carry

__all__ = [
    "TrainState",
    "LoadedRun",
    "Plan",
    "init_state",
    "load_run",
    "plan_run",
    "LOCKNAME",
    "RunInUse",
    "RunWriteError",
    "ResumeConflict",
    "RunLock",
    "RunFiles",
    "Interrupts",
    "checkpoint_path",
    "check_paths",
    "describe_run",
    "earlier_records",
    "resume_config",
]

LOCKNAME = ".lock"
CONFIG = "config.json"
METRICS = "metrics.jsonl"


class RunInUse(RuntimeError):
    """Another live process holds the run directory's lock."""


class RunWriteError(RuntimeError):
    """A file of the run could not be written; the message names it and the checkpoint that is kept."""


class ResumeConflict(ValueError):
    """A resume asked for settings that the checkpoint fixes.

    Attributes:
      checkpoint: the checkpoint file.
      conflicts: ``(field, asked, saved)`` per differing field.
    """

    def __init__(self, ckpt: Path, conflicts: list[tuple[str, Any, Any]], resumable: Sequence[str]):
        self.checkpoint, self.conflicts, self.resumable = ckpt, conflicts, tuple(resumable)
        super().__init__(self.render(lambda name, v: f"{name}={v!r}", lambda name, v: repr(v)))

    def render(self, asked: Callable[[str, Any], str], saved: Callable[[str, Any], str]) -> str:
        """The message, with each field shown by ``asked(name, value)`` and the checkpoint's by ``saved``."""
        parts = [f"{asked(n, a)} (the checkpoint has {saved(n, s)})" for n, a, s in self.conflicts]
        return (
            f"cannot resume {self.checkpoint} with different settings: {'; '.join(parts)}. "
            "A resumed run keeps its model, data and optimizer settings; only "
            f"{', '.join(self.resumable[:-1])} and {self.resumable[-1]} may change"
        )


def checkpoint_path(path: str | os.PathLike) -> Path:
    """The checkpoint file of ``path``: the file itself, or ``checkpoint.npz`` in a run directory."""
    path = Path(path)
    return path / checkpoint.FILENAME if path.is_dir() or not path.suffix else path


def check_paths(out_dir, metrics_path, *, resume: bool, force: bool) -> tuple[Path | None, Path | None]:
    """``(out_dir, metrics_path)`` as paths (the metrics file defaults to ``out_dir/metrics.jsonl``).

    Raises:
      ValueError: ``out_dir`` is not a directory, or ``metrics_path`` is one.
      FileExistsError: ``out_dir`` holds a checkpoint and neither ``resume`` nor ``force`` is set.
    """
    out_dir = Path(out_dir) if out_dir is not None else None
    if out_dir is not None:
        if out_dir.exists() and not out_dir.is_dir():
            raise ValueError(f"--out {out_dir} exists and is not a directory")
        _refuse_existing(out_dir, resume=resume, force=force)
    if metrics_path is None and out_dir is not None:
        metrics_path = out_dir / METRICS
    metrics_path = Path(metrics_path) if metrics_path is not None else None
    if metrics_path is not None and metrics_path.is_dir():
        raise ValueError(f"--metrics {metrics_path} is a directory")
    return out_dir, metrics_path


def _refuse_existing(out_dir: Path, *, resume: bool, force: bool) -> None:
    existing = out_dir / checkpoint.FILENAME
    if not resume and not force and existing.exists():
        raise FileExistsError(
            f"{out_dir} already holds a checkpoint ({existing}); continue it with --resume, "
            "start over with --force, or choose another --out"
        )


def _file_id(path: Path) -> tuple | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def normal(value):
    """hidden as a checkpoint's JSON holds it (a list) or as a config holds it (a tuple, or an int for one layer)."""
    if isinstance(value, (tuple, list)):
        return tuple(value) if len(value) != 1 else value[0]
    return value


def resume_config(config: TrainConfig, ckpt: Path) -> TrainConfig:
    """The checkpoint's config with ``config``'s ``RESUMABLE_FIELDS``; ``ResumeConflict`` if a fixed field differs."""
    saved = config_from_header(checkpoint.read_header(ckpt))
    enable_x64_if(saved.dtype)
    try:
        saved = saved.resolved()  # an older checkpoint's missing fields take their defaults
    except (ValueError, TypeError) as e:
        raise checkpoint.CheckpointError(f"checkpoint {ckpt} has an invalid config: {e}") from None
    conflicts = [
        (name, getattr(config, name), getattr(saved, name))
        for name in FIXED_FIELDS
        if getattr(config, name) is not None and normal(getattr(config, name)) != normal(getattr(saved, name))
    ]
    if conflicts:
        raise ResumeConflict(ckpt, conflicts, RESUMABLE_FIELDS)
    changes = {name: getattr(config, name) for name in RESUMABLE_FIELDS if getattr(config, name) is not None}
    return dataclasses.replace(saved, **changes).resolved()


def describe_run(config: TrainConfig, task, info: dict, n_params: int, baselines: dict) -> dict:
    """The content of ``config.json``."""
    return {
        "config": dataclasses.asdict(config),
        "task": {"name": task.name, "metric": task.metric, "metric_label": task.metric_label, **info},
        "parameters": n_params,
        "baselines": baselines,
        "versions": {"python": sys.version.split()[0], "jax": jax.__version__, "optax": optax.__version__},
    }


def earlier_records(path: Path | None, upto: int) -> list[dict]:
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


# --------------------------------------------------------------------------- where a run starts


class TrainState(NamedTuple):
    """What a checkpoint holds: the step (the data position) and the arrays."""

    step: int
    params: Any
    opt_state: Any
    key: jax.Array  # (2,) uint32, the PRNG key of the data stream
    carry: Any  # the stack's state carried across windows (h, c: (B, H_l) per layer and direction), or None

    def arrays(self) -> dict[str, Any]:
        return {"params": self.params, "opt_state": self.opt_state, "key": self.key, "carry": self.carry}


def init_state(task: Task, config: TrainConfig, data, optimizer: optax.GradientTransformation) -> TrainState:
    """Step 0: fresh params from ``config.seed``, optimizer state, PRNG key and a zero carry."""
    k_params, k_data = jax.random.split(jax.random.PRNGKey(int(config.seed)))
    params = task.init_params(k_params, config, data)
    carry = zero_carry(config, int(config.batch_size)) if task.carries_state else None
    return TrainState(0, params, optimizer.init(params), k_data, carry)


def count_params(params) -> int:
    return int(sum(np.size(a) for a in jax.tree.leaves(params)))


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
        config = config_from_header(header)
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


class Plan(NamedTuple):
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


def plan_run(config: TrainConfig, out_dir, resume, force: bool, metrics_path, devices: int | None) -> Plan:
    """Resolve the config, read the checkpoint to resume, check the paths and the devices; write nothing."""
    ckpt = None
    if resume:
        ckpt = checkpoint_path(out_dir if resume is True else resume)
        out_dir = ckpt.parent if out_dir is None else out_dir
        config = resume_config(config, ckpt)
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
    mesh = parallel.mesh_for(devices, int(config.batch_size))
    return Plan(config, task, data, optimizer, state, out_dir, metrics_path, bool(resume), elapsed0, ckpt, mesh)


# --------------------------------------------------------------------------- the lock


class RunLock:
    """One writer per run directory: an exclusive ``flock`` on ``DIR/.lock``, taken before anything is written.

    The file holds the holder's pid, host, start time and command line, which a refused run shows.
    ``release`` removes the file and then drops the lock; a run that dies holds no lock (the kernel
    drops it), so its leftover file is taken over by the next run.
    """

    def __init__(self, directory: Path):
        self.directory, self.path = Path(directory), Path(directory) / LOCKNAME
        self._fd: int | None = None

    def acquire(self) -> None:
        """Create the directory if needed and take the lock.

        Raises:
          RunInUse: a live process holds it (the message names that process).
          OSError: the directory or the lock file cannot be created.
        """
        self.directory.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_holder(fd)
                os.close(fd)
                raise RunInUse(
                    f"{self.directory} is in use by another run ({holder}); wait for it to end, or choose another --out"
                ) from None
            except BaseException:
                os.close(fd)
                raise
            # The holder we waited for may have removed the file before we locked it: lock the file that is there.
            here = os.fstat(fd)
            try:
                there = os.stat(self.path)
            except FileNotFoundError:
                there = None
            if there is None or (here.st_dev, here.st_ino) != (there.st_dev, there.st_ino):
                os.close(fd)
                continue
            self._fd = fd
            break
        info = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(), "command": _command()}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)

    def release(self) -> None:
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            os.unlink(self.path)
        os.close(self._fd)
        self._fd = None


def _command() -> str:
    return " ".join(["jax-lstm" if a.endswith("__main__.py") else a for a in sys.argv[:1]] + sys.argv[1:])


def _read_holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 65536, 0).decode() or "{}")
    except (OSError, ValueError):
        info = {}
    if not isinstance(info, dict) or "pid" not in info:
        return "process unknown"
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info.get("started", 0)))
    return f"pid {info['pid']} on {info.get('host', '?')}, started {started}: {info.get('command', '?')}"


# --------------------------------------------------------------------------- the files


class RunFiles:
    """The files of a run: ``config.json``, ``metrics.jsonl`` (one line per log step) and the checkpoint.

    ``out_dir`` None writes no config and no checkpoint; ``metrics_path`` None writes no metrics.
    ``start`` takes the directory's lock (``RunLock``) before anything else; ``close`` (or
    ``abort`` on the way out of a failure) releases it. Every ``OSError`` while writing becomes a
    ``RunWriteError``.
    """

    def __init__(self, out_dir: Path | None, metrics_path: Path | None):
        self.out_dir, self.metrics_path = out_dir, metrics_path
        self.checkpoint = out_dir / checkpoint.FILENAME if out_dir is not None else None
        self.last_saved: int | None = None  # the step of this run's checkpoint on disk, if any
        self.lock = RunLock(out_dir) if out_dir is not None else None
        self._metrics = None

    def kept(self) -> str:
        """Which checkpoint is on disk: for messages."""
        if self.checkpoint is not None and self.last_saved is not None:
            return f"the checkpoint of step {self.last_saved} is kept in {self.checkpoint}"
        if self.checkpoint is not None and self.checkpoint.exists():
            return f"the checkpoint {self.checkpoint} is kept unchanged"
        return "no checkpoint was written"

    @contextlib.contextmanager
    def writing(self, path: Path) -> Iterator[None]:
        """Within the block, an ``OSError`` is a ``RunWriteError`` naming ``path``."""
        try:
            yield
        except OSError as e:
            raise RunWriteError(f"cannot write {path}: {e.strerror or e}; {self.kept()}") from None

    def lock_dir(self, *, resume: bool, force: bool, checked: Path | None) -> bool:
        """Take the lock and delete the temporary files of killed runs; True if ``checked`` (the checkpoint
        read before the lock was taken) has changed since (the caller then reads it again).

        Raises:
          RunInUse: another run holds the directory.
          FileExistsError: a checkpoint appeared while waiting, and neither ``resume`` nor ``force`` is set.
          RunWriteError: the directory or its lock cannot be created.
        """
        if self.lock is None:
            return False
        before = _file_id(checked) if checked is not None else None
        with self.writing(self.lock.path):
            self.lock.acquire()
        try:
            _refuse_existing(self.out_dir, resume=resume, force=force)
            self._clean_temporaries()
        except BaseException:
            self.lock.release()
            raise
        return checked is not None and _file_id(checked) != before

    def _clean_temporaries(self) -> None:
        """Delete ``.NAME.XXXX.tmp`` files of this run's files left by a run killed while writing."""
        targets = {checkpoint.FILENAME, CONFIG, METRICS}
        places = [(self.out_dir, targets)]
        if self.metrics_path is not None and self.metrics_path.parent != self.out_dir:
            places.append((self.metrics_path.parent, {self.metrics_path.name}))
        for directory, names in places:
            if directory is None or not directory.is_dir():
                continue
            for name in names:
                for tmp in directory.glob(f".{name}.*.tmp"):
                    with contextlib.suppress(OSError):
                        tmp.unlink()

    def start(self, description: dict, records: list[dict], saved_step: int | None) -> None:
        """Write ``config.json`` and rewrite the metrics file to ``records`` (a resumed run's earlier lines)."""
        self.last_saved = saved_step
        if self.out_dir is not None:
            with self.writing(self.out_dir / CONFIG):
                self.out_dir.mkdir(parents=True, exist_ok=True)
                data = (json.dumps(description, indent=1) + "\n").encode()
                checkpoint.atomic_write(self.out_dir / CONFIG, data)
        if self.metrics_path is not None:
            with self.writing(self.metrics_path):
                self.metrics_path.parent.mkdir(parents=True, exist_ok=True)
                checkpoint.atomic_write(self.metrics_path, "".join(json.dumps(r) + "\n" for r in records).encode())
                self._metrics = open(self.metrics_path, "a")  # noqa: SIM115 (closed by close())

    def append(self, record: dict) -> None:
        if self._metrics is not None:
            with self.writing(self.metrics_path):
                self._metrics.write(json.dumps(record) + "\n")
                self._metrics.flush()

    def save(self, arrays: dict, step: int, config: dict, meta: dict) -> None:
        """Write the checkpoint of ``step`` (host arrays), atomically."""
        if self.checkpoint is not None:
            with self.writing(self.checkpoint):
                checkpoint.save(self.checkpoint, arrays, config=config, meta={"step": step, **meta})
            self.last_saved = step

    def close(self) -> None:
        """Close the metrics file and release the lock; ``RunWriteError`` if the last metrics did not reach the disk."""
        try:
            if self._metrics is not None:
                metrics, self._metrics = self._metrics, None
                with self.writing(self.metrics_path):
                    metrics.close()
        finally:
            if self.lock is not None:
                self.lock.release()

    def abort(self) -> None:
        """``close`` on the way out of a failure: errors while closing are dropped."""
        with contextlib.suppress(RunWriteError, OSError):
            self.close()


# --------------------------------------------------------------------------- signals


class Interrupts:
    """SIGINT and SIGTERM during a run: the first sets ``requested`` (the loop stops after the step and saves).

    A second signal stops at once: ``hard_stop(signum)`` is called (default: raise ``KeyboardInterrupt``;
    the command line prints one line and exits). Inside ``critical()`` (a checkpoint being written) a
    second signal waits until the write is over; inside ``critical(final=True)`` it is dropped, since
    the run ends right after.

    Use it as a context manager in the main thread; elsewhere it installs nothing.
    """

    def __init__(
        self, signals: Sequence[int] = (signal.SIGINT,), hard_stop: Callable[[int], None] | None = None
    ) -> None:
        self.signals, self.hard_stop = tuple(signals), hard_stop
        self.requested: int | None = None  # the first signal's number
        self._critical, self._final, self._pending = 0, False, None
        self._previous: dict[int, Any] = {}
        self.kept: Callable[[], str] = lambda: "nothing was written"  # the run sets it: which checkpoint is on disk

    def __enter__(self) -> Interrupts:
        if threading.current_thread() is threading.main_thread():
            for s in self.signals:
                self._previous[s] = signal.signal(s, self._handler)
        return self

    def __exit__(self, *exc) -> None:
        for s, previous in self._previous.items():
            signal.signal(s, previous)
        self._previous = {}

    def _handler(self, signum, frame) -> None:
        if self.requested is None:
            self.requested = signum
        elif self._final:
            return
        elif self._critical:
            self._pending = signum
        else:
            self._stop(signum)

    def _stop(self, signum: int) -> None:
        if self.hard_stop is not None:
            self.hard_stop(signum)
        raise KeyboardInterrupt

    @contextlib.contextmanager
    def critical(self, final: bool = False) -> Iterator[None]:
        self._critical += 1
        self._final = self._final or final
        try:
            yield
        finally:
            self._critical -= 1
            pending, self._pending = self._pending, None
            if pending is not None and not self._critical and not self._final:
                self._stop(pending)

    @property
    def name(self) -> str:
        """The first signal's name (``SIGINT``, ``SIGTERM``), or "" if none came."""
        return signal.Signals(self.requested).name if self.requested is not None else ""
