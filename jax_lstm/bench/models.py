"""``jax-lstm bench --models``: model-level rows.

The train step of a small model, features -> LSTM -> dense, with an optax Adam update, built with each
library's own LSTM and with jax_lstm's module for that library:

* nnx:     ``nnx.RNN(nnx.OptimizedLSTMCell)`` against ``jax_lstm.nnx.LSTM``;
* linen:   ``nn.RNN(nn.OptimizedLSTMCell)`` against ``jax_lstm.linen.LSTM``;
* equinox: ``jax.vmap`` over a ``lax.scan`` of ``eqx.nn.LSTMCell`` against ``jax.vmap`` over
  ``jax_lstm.eqx.LSTM``.

Inputs are batch-major (B, T, D), the libraries' default; float32. Timed with ``timing.interleave``.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jax_lstm.bench.render import columns, fmt, mib
from jax_lstm.bench.timing import block, geomean, interleave
from jax_lstm.bench.variant import Shape, temp_bytes

__all__ = [
    "MODEL_LIBRARIES",
    "MODEL_TARGETS",
    "ModelVariant",
    "model_variants",
    "bench_models_shape",
    "bench_models",
    "render_models_table",
]

MODEL_LIBRARIES = ("nnx", "linen", "equinox")
MODEL_TARGETS = {"speedup": 1.5, "memory_ratio": 0.6}  # geo-means: ours >= 1.5x faster, <= 0.6x temp memory


@dataclasses.dataclass
class ModelVariant:
    """One compiled model train step, ready to time."""

    library: str  # "nnx", "linen" or "equinox"
    impl: str  # "theirs" (the library's LSTM) or "ours" (jax_lstm's module)
    train: Callable[[], Any]
    compile_s: float
    temp_bytes: int | None


def _model_problem(shape: Shape, seed: int):
    T, B, D, H = shape
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((B, T, D)).astype(np.float32)
    y = rng.standard_normal((B, T, 1)).astype(np.float32)
    return jax.device_put((x, y))


def _compile_step(library: str, impl: str, loss: Callable, params, x, y, rest=None) -> ModelVariant:
    """Compile ``params, opt_state, rest, x, y -> (params, opt_state, loss)``: gradients and an Adam update.

    ``loss(params, rest, x, y) -> (value, grads)`` if it has ``value_and_grad`` set to True as an attribute,
    else the loss value (differentiated here with respect to ``params``); ``rest`` is state that is not
    differentiated (nnx rng counters).
    """
    import optax

    tx = optax.adam(1e-3)
    opt_state = tx.init(params)

    value_and_grad = loss if getattr(loss, "value_and_grad", False) else jax.value_and_grad(loss)

    def step(params, opt_state, rest, x, y):
        value, grads = value_and_grad(params, rest, x, y)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, value

    t0 = time.perf_counter()
    compiled = jax.jit(step).lower(params, opt_state, rest, x, y).compile()
    compile_s = time.perf_counter() - t0
    return ModelVariant(
        library, impl, lambda: block(compiled(params, opt_state, rest, x, y)), compile_s, temp_bytes(compiled)
    )


def _nnx_variants(shape: Shape, seed: int) -> list[ModelVariant]:
    from flax import nnx

    from jax_lstm.nnx import LSTM

    T, B, D, H = shape
    x, y = _model_problem(shape, seed)

    class Model(nnx.Module):
        def __init__(self, ours: bool, rngs: nnx.Rngs):
            self.lstm = LSTM(D, H, rngs=rngs) if ours else nnx.RNN(nnx.OptimizedLSTMCell(D, H, rngs=rngs))
            self.head = nnx.Linear(H, 1, rngs=rngs)

        def __call__(self, x):
            return self.head(self.lstm(x))

    out = []
    for impl in ("theirs", "ours"):
        graphdef, params, rest = nnx.split(Model(impl == "ours", nnx.Rngs(seed)), nnx.Param, ...)

        def loss(p, rest, x, y, graphdef=graphdef):  # as nnx does it: merge, then nnx.value_and_grad
            model = nnx.merge(graphdef, p, rest)
            return nnx.value_and_grad(lambda m: jnp.mean((m(x) - y) ** 2))(model)

        loss.value_and_grad = True

        out.append(_compile_step("nnx", impl, loss, params, x, y, rest))
    return out


def _linen_variants(shape: Shape, seed: int) -> list[ModelVariant]:
    import flax.linen as nn

    from jax_lstm.linen import LSTM

    T, B, D, H = shape
    x, y = _model_problem(shape, seed)

    class Model(nn.Module):
        ours: bool

        @nn.compact
        def __call__(self, x):
            h = LSTM(H)(x) if self.ours else nn.RNN(nn.OptimizedLSTMCell(H))(x)
            return nn.Dense(1)(h)

    out = []
    for impl in ("theirs", "ours"):
        model = Model(impl == "ours")
        params = model.init(jax.random.PRNGKey(seed), x)

        def loss(p, _, x, y, model=model):
            return jnp.mean((model.apply(p, x) - y) ** 2)

        out.append(_compile_step("linen", impl, loss, params, x, y))
    return out


def _equinox_variants(shape: Shape, seed: int) -> list[ModelVariant]:
    import equinox as eqx

    from jax_lstm.eqx import LSTM

    T, B, D, H = shape
    x, y = _model_problem(shape, seed)
    k_lstm, k_head = jax.random.split(jax.random.PRNGKey(seed))

    class Scanned(eqx.Module):  # the Equinox idiom: a lax.scan over the cell, one example
        cell: eqx.nn.LSTMCell

        def __call__(self, xs):
            def step(state, x_t):
                state = self.cell(x_t, state)
                return state, state[0]

            zeros = jnp.zeros((H,), xs.dtype)
            return jax.lax.scan(step, (zeros, zeros), xs)[1]

    class Ours(eqx.Module):
        lstm: LSTM

        def __call__(self, xs):
            return self.lstm(xs)[0]

    class Model(eqx.Module):
        lstm: eqx.Module
        head: eqx.nn.Linear

        def __call__(self, xs):  # (T, D) -> (T, 1)
            return jax.vmap(self.head)(self.lstm(xs))

    head = eqx.nn.Linear(H, 1, key=k_head, dtype=jnp.float32)
    models = {
        "theirs": Model(Scanned(eqx.nn.LSTMCell(D, H, key=k_lstm, dtype=jnp.float32)), head),
        "ours": Model(Ours(LSTM(D, H, key=k_lstm, dtype=jnp.float32)), head),
    }
    out = []
    for impl, model in models.items():
        params, static = eqx.partition(model, eqx.is_inexact_array)

        def loss(p, _, x, y, static=static):
            return jnp.mean((jax.vmap(eqx.combine(p, static))(x) - y) ** 2)

        out.append(_compile_step("equinox", impl, loss, params, x, y))
    return out


_MODEL_BUILDERS = {"nnx": _nnx_variants, "linen": _linen_variants, "equinox": _equinox_variants}


def model_variants(shape: Shape, libraries: Sequence[str] = MODEL_LIBRARIES, seed: int = 0) -> list[ModelVariant]:
    """The compiled train steps (theirs and ours) of every library in ``libraries`` that is importable."""
    out = []
    for lib in libraries:
        try:
            out += _MODEL_BUILDERS[lib](shape, seed)
        except ImportError as e:
            print(f"models: {lib} left out ({e})", file=sys.stderr)
    return out


def bench_models_shape(
    variants: Sequence[ModelVariant], *, warmup: int = 2, reps: int | None = None, seconds: float = 30.0
) -> list[dict]:
    """Median train-step time of every variant (``timing.interleave``), plus compile time and temp memory;
    one record per library."""
    steps = {f"{v.library}:{v.impl}": (v.train,) for v in variants}
    timings = interleave(steps, warmup=warmup, reps=reps, seconds=seconds)
    records = []
    for lib in dict.fromkeys(v.library for v in variants):
        by_impl = {v.impl: v for v in variants if v.library == lib}
        if set(by_impl) != {"theirs", "ours"}:
            continue
        rec: dict[str, Any] = dict(library=lib, reps=timings.reps)
        for impl, v in by_impl.items():
            rec[f"{impl}_ms"] = 1e3 * timings.seconds[f"{lib}:{impl}"][0]
            rec[f"{impl}_compile_s"] = v.compile_s
            rec[f"{impl}_temp_bytes"] = v.temp_bytes
        rec["speedup"] = rec["theirs_ms"] / rec["ours_ms"]
        t, o = rec["theirs_temp_bytes"], rec["ours_temp_bytes"]
        rec["memory_ratio"] = o / t if t and o else None
        records.append(rec)
    return records


def bench_models(
    shapes: Sequence[Shape],
    *,
    libraries: Sequence[str] = MODEL_LIBRARIES,
    warmup: int = 2,
    reps: int | None = None,
    seconds: float = 30.0,
) -> dict:
    """Model-level rows at every shape, their geometric means per library and the status of the targets."""
    results = []
    for shape in shapes:
        records = bench_models_shape(model_variants(shape, libraries), warmup=warmup, reps=reps, seconds=seconds)
        results.append(dict(shape=list(shape), records=records))
        line = ", ".join(f"{r['library']} {r['theirs_ms']:.1f} -> {r['ours_ms']:.1f} ms" for r in records)
        print(f"models {shape}: {line}", file=sys.stderr)
    geomeans = {}
    for lib in libraries:
        recs = [r for res in results for r in res["records"] if r["library"] == lib]
        if recs:
            geomeans[lib] = dict(
                speedup=geomean([r["speedup"] for r in recs]),
                memory_ratio=geomean([r["memory_ratio"] for r in recs]),
            )
    targets = {
        lib: dict(
            speedup_met=g["speedup"] >= MODEL_TARGETS["speedup"],
            memory_met=None if g["memory_ratio"] is None else g["memory_ratio"] <= MODEL_TARGETS["memory_ratio"],
        )
        for lib, g in geomeans.items()
    }
    return dict(results=results, geomean=geomeans, targets=targets, model_targets=dict(MODEL_TARGETS))


_THEIRS = {
    "nnx": "nnx.RNN(OptimizedLSTMCell)",
    "linen": "nn.RNN(OptimizedLSTMCell)",
    "equinox": "vmap(scan(eqx LSTMCell))",
}


def render_models_table(report: dict) -> str:
    """The stdout table of ``--models``."""
    layout = ("<18", "<8", "<27", ">10", ">9", ">9", ">23", ">6", ">24")
    header = ("T,B,D,H", "library", "theirs", "theirs ms", "ours ms", "speed-up", "temp MiB theirs / ours", "ratio")
    rows = [(*header, "compile s theirs / ours")]
    for res in report["results"]:
        rows += [
            (
                ",".join(map(str, res["shape"])),
                r["library"],
                _THEIRS[r["library"]],
                f"{r['theirs_ms']:.2f}",
                f"{r['ours_ms']:.2f}",
                f"{r['speedup']:.2f}",
                f"{mib(r['theirs_temp_bytes'])} / {mib(r['ours_temp_bytes'])}",
                fmt(r["memory_ratio"], ".2f"),
                f"{r['theirs_compile_s']:.2f} / {r['ours_compile_s']:.2f}",
            )
            for r in res["records"]
        ]
    lines = ["model train step: features (B, T, D) -> LSTM(H) -> dense, optax Adam, float32; median ms", ""]
    lines += columns(layout, rows)
    t = report["model_targets"]
    lines += ["", f"geometric means (targets: speed-up >= {t['speedup']}, temp memory ratio <= {t['memory_ratio']}):"]
    status = lambda m: "n/a" if m is None else ("met" if m else "MISSED")  # noqa: E731
    for lib, g in report["geomean"].items():
        met = report["targets"][lib]
        lines.append(
            f"  {lib:<8} speed-up {fmt(g['speedup'], '.2f')} ({status(met['speedup_met'])}), "
            f"temp memory {fmt(g['memory_ratio'], '.2f')} ({status(met['memory_met'])})"
        )
    return "\n".join(lines)
