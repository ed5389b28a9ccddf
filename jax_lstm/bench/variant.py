"""One layer implementation at one setting, compiled and timed: what the layer and option rows share.

The problem is float32 params, inputs ``xs`` (T, B, D) and three fixed random loss weights; the train
step is the gradient of ``sum(hs * w) + sum(h_T * w2) + sum(c_T * w3)`` with respect to the
parameters and ``xs``.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jax_lstm.bench.timing import block, interleave
from jax_lstm.cell import LSTMParams, init_params

__all__ = [
    "Shape",
    "Variant",
    "problem",
    "compiled_variant",
    "layer_variant",
    "temp_bytes",
    "matmul_flops",
    "bench_shape",
    "bench_pairs",
]

Shape = tuple[int, int, int, int]


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


def problem(shape: Shape, seed: int = 0):
    """float32 params, xs and the three fixed loss weights, as numpy arrays."""
    T, B, D, H = shape
    rng = np.random.default_rng(seed)
    p = init_params(jax.random.PRNGKey(seed), D, H, dtype=jnp.float32)
    p = LSTMParams(*(np.asarray(a) for a in p))
    f32 = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    xs = f32(T, B, D)
    return p, xs, (f32(T, B, H), f32(B, H), f32(B, H))


def temp_bytes(compiled) -> int | None:
    """``temp_size_in_bytes`` of a compiled executable's memory analysis, or None."""
    try:
        return int(compiled.memory_analysis().temp_size_in_bytes)
    except Exception:  # noqa: BLE001 - backends without memory analysis
        return None


def compiled_variant(name: str, unroll: int | None, loss: Callable, forward: Callable, params, xs, ws) -> Variant:
    """Compile ``forward(params, xs)`` and the train step ``grad(loss)(params, xs, *ws)`` (timing the latter)."""
    t0 = time.perf_counter()
    train = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(params, xs, *ws).compile()
    compile_s = time.perf_counter() - t0
    fwd = jax.jit(forward).lower(params, xs).compile()
    return Variant(
        name,
        unroll,
        fwd=lambda: block(fwd(params, xs)),
        train=lambda: block(train(params, xs, *ws)),
        compile_s=compile_s,
        temp_bytes=temp_bytes(train),
    )


def layer_variant(name: str, forward: Callable, params, xs, ws) -> Variant:
    """``compiled_variant`` of a layer ``forward(params, xs) -> (hs, (h_T, c_T))`` with the standard train loss,
    ``sum(hs * w) + sum(h_T * w2) + sum(c_T * w3)`` for ``ws = (w, w2, w3)``."""

    def loss(p_, xs_, w, w2, w3):
        hs, (h, c) = forward(p_, xs_)
        return jnp.sum(hs * w) + jnp.sum(h * w2) + jnp.sum(c * w3)

    return compiled_variant(name, None, loss, forward, params, xs, ws)


def bench_pairs(shape: Shape, names: Sequence[str], make: Callable, **timing) -> dict[str, tuple[dict, dict]]:
    """Per name, the records of ``make(fn, name, shape, impl)`` for ``lstm`` ("manual") and ``lstm_ref``
    ("autodiff"), all timed in one interleaved run (``bench_shape``; ``timing``: its keyword arguments)."""
    from jax_lstm.layers import IMPLS

    timed = [make(fn, name, shape, impl) for name in names for impl, fn in IMPLS.items()]
    by = {r["impl"]: r for r in bench_shape(shape, timed, **timing)}
    return {name: (by[f"manual:{name}"], by[f"autodiff:{name}"]) for name in names}


def matmul_flops(shape: Shape) -> tuple[float, float]:
    """Matmul flops of (forward, forward + backward) of one layer over (T, B, D, H)."""
    T, B, D, H = shape
    fwd = 2.0 * T * B * (D + H) * 4 * H
    return fwd, 3.0 * fwd


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
    """Time every variant's forward and train step, interleaved, and return one record per variant.

    ``reps`` (or, if None, as many as fit in ``seconds``, within [min_reps, max_reps])
    repetitions follow ``warmup`` untimed ones; see ``timing.interleave``.
    """
    steps = {v.name: (v.fwd, v.train) for v in variants}
    timings = interleave(steps, warmup=warmup, reps=reps, seconds=seconds, min_reps=min_reps, max_reps=max_reps)
    f_fwd, f_train = matmul_flops(shape)
    out = []
    for v in variants:
        tf, tt = timings.seconds[v.name]
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
                reps=timings.reps,
            )
        )
    return out
