"""``jax-lstm bench --variants``: the LSTM family's hand-written BPTT against autodiff of the same variant.

For each shape, the train step (see ``variant``) of ``lstm`` and of ``lstm_ref`` for the plain LSTM,
each variant alone (projection with P = H / 2, peepholes, layer norm) and all three together, timed in
one interleaved run (``timing.interleave``), with the compiled temporary memory of each.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jax_lstm.bench.render import fmt, markdown
from jax_lstm.bench.timing import geomean
from jax_lstm.bench.variant import Shape, Variant, bench_pairs, layer_variant
from jax_lstm.cell import init_params

__all__ = [
    "VARIANTS",
    "VARIANT_TARGETS",
    "variant_options",
    "family_variant",
    "bench_variants",
    "render_variants_table",
]

VARIANTS = ("plain", "projection", "peephole", "layer_norm", "all")
VARIANT_TARGETS = {
    "speedup": 1.5,  # geo-mean over shapes of t_autodiff / t_manual, per variant, at least
    "memory_ratio": 0.6,  # geo-mean over shapes of temp_manual / temp_autodiff, per variant, at most
}


def variant_options(variant: str, H: int) -> dict:
    """``init_params``' keyword arguments of a variant: projection to P = H // 2 (at least 1)."""
    proj = {"proj_size": max(1, H // 2)} if H > 1 else {}
    return {
        "plain": {},
        "projection": proj,
        "peephole": {"peephole": True},
        "layer_norm": {"layer_norm": True},
        "all": {**proj, "peephole": True, "layer_norm": True},
    }[variant]


def family_variant(fn, variant: str, shape: Shape, impl: str, seed: int = 0) -> Variant:
    """The train step of ``fn`` (``lstm`` or ``lstm_ref``) for one variant: float32 params, inputs, loss weights."""
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    T, B, D, H = shape
    p = init_params(jax.random.PRNGKey(seed), D, H, dtype=jnp.float32, **variant_options(variant, H))
    rng = np.random.default_rng(seed)
    P = H if p.W_proj is None else p.W_proj.shape[1]
    f32 = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)  # noqa: E731
    xs, ws = f32(T, B, D), (f32(T, B, P), f32(B, P), f32(B, H))

    return layer_variant(f"{impl}:{variant}", fn, p, xs, ws)


def bench_variants(
    shapes: Sequence[Shape],
    variants: Sequence[str] = VARIANTS,
    *,
    warmup: int = 2,
    reps: int | None = None,
    seconds: float = 40.0,
) -> dict:
    """Train-step time and temp memory of every variant for ``lstm`` and ``lstm_ref``, interleaved per shape."""
    results = []
    for shape in shapes:
        pairs = bench_pairs(shape, variants, family_variant, warmup=warmup, reps=reps, seconds=seconds)
        rows = []
        for v, (m, a) in pairs.items():
            tm, ta = m["temp_bytes"], a["temp_bytes"]
            rows.append(
                dict(
                    variant=v,
                    manual_ms=m["train_ms"],
                    autodiff_ms=a["train_ms"],
                    speedup=a["train_ms"] / m["train_ms"],
                    manual_temp_mib=None if tm is None else tm / 2**20,
                    autodiff_temp_mib=None if ta is None else ta / 2**20,
                    memory_ratio=tm / ta if tm and ta else None,
                )
            )
        results.append(dict(shape=list(shape), rows=rows))
        print(f"timed {shape}: " + ", ".join(f"{r['variant']} {r['speedup']:.2f}x" for r in rows), file=sys.stderr)
    summary = {
        v: {
            key: geomean([next(r for r in res["rows"] if r["variant"] == v)[key] for res in results])
            for key in ("speedup", "memory_ratio")
        }
        for v in variants
    }
    return dict(results=results, summary=summary, targets=VARIANT_TARGETS)


def render_variants_table(report: dict) -> str:
    """Every (shape, variant) row as a Markdown table, then the geometric means against the targets."""
    lines = markdown(
        ("shape (T, B, D, H)", "variant", "manual ms", "autodiff ms", "speed-up", "temp MiB manual / autodiff",
         "ratio"),
        [
            (
                str(tuple(res["shape"])),
                r["variant"],
                f"{r['manual_ms']:.2f}",
                f"{r['autodiff_ms']:.2f}",
                f"{r['speedup']:.2f}x",
                f"{fmt(r['manual_temp_mib'], '.1f')} / {fmt(r['autodiff_temp_mib'], '.1f')}",
                fmt(r["memory_ratio"], ".2f"),
            )
            for res in report["results"]
            for r in res["rows"]
        ],
    )
    t = report["targets"]
    lines += ["", "geometric mean over shapes:", ""]
    lines += markdown(
        ("variant", "speed-up vs autodiff", "temp memory vs autodiff", "targets"),
        [
            (
                v,
                fmt(s["speedup"], ".2f") + "x",
                fmt(s["memory_ratio"], ".2f"),
                _verdict(s, t),
            )
            for v, s in report["summary"].items()
        ],
    )
    lines.append(
        f"\ntargets: each variant's manual train step >= {t['speedup']:.1f}x faster than autodiff of the same "
        f"variant and <= {t['memory_ratio']:.1f}x its temp memory (geometric means over the shapes)"
    )
    return "\n".join(lines)


def _verdict(s: dict, t: dict) -> str:
    fast = s["speedup"] is not None and s["speedup"] >= t["speedup"]
    lean = s["memory_ratio"] is not None and s["memory_ratio"] <= t["memory_ratio"]
    return "met" if fast and lean else "missed: " + ", ".join(
        w for w, ok in (("speed", fast), ("memory", lean)) if not ok
    )
