"""The embedded tasks, by name: ``charlm`` (the default), ``addition`` and ``sine``.

Each task module defines ``TASK``, an instance of ``jax_lstm.tasks.base.Task``
with its data, head, loss and validation metric.
"""

from __future__ import annotations

from jax_lstm.tasks import addition, charlm, sine
from jax_lstm.tasks.base import GRADS, Task

__all__ = ["TASKS", "DEFAULT_TASK", "GRADS", "get_task", "Task"]

TASKS: dict[str, Task] = {t.name: t for t in (charlm.TASK, addition.TASK, sine.TASK)}
DEFAULT_TASK = "charlm"


def get_task(name: str) -> Task:
    """The task registered as ``name``; ValueError listing the known names otherwise."""
    try:
        return TASKS[name]
    except KeyError:
        raise ValueError(f"unknown task {name!r}; choose one of {', '.join(sorted(TASKS))}") from None
