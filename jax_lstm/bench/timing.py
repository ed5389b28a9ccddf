"""The one timing loop of every benchmark: interleaved, shuffled, medians after warm-up.

Each round visits every variant once, in a freshly shuffled order (seeded), and runs its steps (a
layer's forward and train step, a model's train step, a PPO update) in order. With ``settle``, each
timed call is preceded by an untimed one: it absorbs what the previous variant left behind (torch's
OpenMP threads spin for milliseconds after a call; caches hold the other variant's data), so no
variant pays for its neighbour. Untimed warm-up rounds of the same calls come first; the last one
also sizes the run when no repetition count is given.
"""

from __future__ import annotations

import math
import random
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax

__all__ = ["UNROLL_TOLERANCE", "Timings", "block", "time_call", "interleave", "best_unroll", "geomean"]

UNROLL_TOLERANCE = 0.03  # unrolls within 3% of the fastest count as equally fast; the smallest wins


class Timings(NamedTuple):
    """What ``interleave`` measured."""

    seconds: dict[str, tuple[float, ...]]  # variant name -> median seconds of each of its steps
    reps: int  # timed rounds


def block(x):
    """``x`` once every array in it is computed."""
    return jax.block_until_ready(x)


def time_call(f: Callable[[], Any]) -> float:
    """Wall seconds of one call of ``f`` (which blocks until done)."""
    t0 = time.perf_counter()
    f()
    return time.perf_counter() - t0


def interleave(
    variants: Mapping[str, Sequence[Callable[[], Any]]],
    *,
    warmup: int = 2,
    reps: int | None = None,
    seconds: float = 40.0,
    min_reps: int = 5,
    max_reps: int = 50,
    settle: bool = True,
    seed: int = 0,
) -> Timings:
    """Time the steps of every variant (each a call that blocks until done), interleaved.

    ``max(warmup, 1)`` untimed rounds, then ``reps`` timed ones (if None, as many as fit in
    ``seconds`` at the pace of the last warm-up round, within [min_reps, max_reps]).
    """
    calls = 2 if settle else 1
    t_round = 0.0
    for _ in range(max(warmup, 1)):
        t0 = time.perf_counter()
        for steps in variants.values():
            for step in steps:
                for _ in range(calls):
                    step()
        t_round = time.perf_counter() - t0
    if reps is None:
        reps = int(min(max_reps, max(min_reps, seconds // max(t_round, 1e-9))))
    times: dict[str, list[list[float]]] = {name: [[] for _ in steps] for name, steps in variants.items()}
    rng = random.Random(seed)
    order = list(variants)
    for _ in range(reps):
        rng.shuffle(order)
        for name in order:
            for step, ts in zip(variants[name], times[name], strict=True):
                if settle:
                    step()
                ts.append(time_call(step))
    return Timings({name: tuple(statistics.median(ts) for ts in steps) for name, steps in times.items()}, reps)


def best_unroll(ms_by_unroll: Mapping[Any, float], tol: float = UNROLL_TOLERANCE):
    """The smallest unroll whose time is within ``tol`` (relative) of the fastest.

    Differences that small are within the run-to-run noise of a shared machine, and a smaller unroll
    compiles faster. A variant without unrolls has the single key None.
    """
    fastest = min(ms_by_unroll.values())
    return min((u for u, ms in ms_by_unroll.items() if ms <= fastest * (1 + tol)), key=lambda u: u or 0)


def geomean(xs: Sequence[float | None]) -> float | None:
    """The geometric mean of the values that are not None; None if there are none."""
    xs = [x for x in xs if x is not None]
    return math.exp(sum(math.log(x) for x in xs) / len(xs)) if xs else None
