"""The configuration of a training run: one dataclass, each field's default, range and check in one place.

``TrainConfig`` is what ``jax_lstm.train.train`` runs and what a checkpoint's header and a run
directory's ``config.json`` hold; the command line derives its flags' ranges from ``INT_RANGES`` and
the choices below, and builds the config from the fields by name.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass

import jax
import numpy as np
import optax

from jax_lstm import checkpoint
from jax_lstm.tasks import DEFAULT_TASK, GRADS, TASKS, get_task

__all__ = [
    "TrainConfig",
    "FIXED_FIELDS",
    "RESUMABLE_FIELDS",
    "INT_RANGES",
    "int_error",
    "make_optimizer",
    "config_from_header",
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
    "proj_size",
    "peephole",
    "layer_norm",
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
    "proj_size": (0, INT32_MAX),
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
      proj_size: P, 0 < P < every hidden size: project each layer's output to size P (LSTMP); 0: none.
      peephole: peephole connections (the f, i, o gates also see the cell state).
      layer_norm: the layer-normalised LSTM (normalised projections and cell state).
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
    proj_size: int | None = None
    peephole: bool | None = None
    layer_norm: bool | None = None
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
            "proj_size": 0,
            "peephole": False,
            "layer_norm": False,
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
        for name in ("bidirectional", "peephole", "layer_norm"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if self.proj_size and self.proj_size >= min(sizes):
            raise ValueError(
                f"proj_size must be smaller than every hidden size ({min(sizes)} here), got {self.proj_size}"
            )
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


def config_from_header(header: dict) -> TrainConfig:
    """The ``TrainConfig`` of a checkpoint header (unresolved: an older checkpoint may lack fields)."""
    saved = header.get("config", {})
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(saved) - fields)
    if unknown:
        raise checkpoint.CheckpointError(f"checkpoint config has unknown fields {unknown}")
    return TrainConfig(**saved)


def enable_x64_if(dtype: str | None) -> None:
    """Turn on ``jax_enable_x64`` for a float64 run (the command line's way to honour ``--dtype float64``)."""
    if dtype == "float64" and not jax.config.jax_enable_x64:
        jax.config.update("jax_enable_x64", True)


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
