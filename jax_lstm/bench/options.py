"""``jax-lstm bench --options``: what masks, resets, recurrent dropout, batch-major input and vmap cost.

The train step (see ``variant``) of ``lstm`` and ``lstm_ref`` with each option, against the plain
layer, timed in one interleaved run per shape (``timing.interleave``).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jax_lstm.bench.render import fmt, markdown
from jax_lstm.bench.timing import geomean
from jax_lstm.bench.variant import Shape, Variant, bench_pairs, layer_variant, problem

__all__ = ["OPTIONS", "OPTION_TARGETS", "option_variant", "bench_options", "render_options_table"]

OPTIONS = ("plain", "mask", "resets", "recurrent_dropout", "batch_major", "vmap")
OPTION_TARGETS = {
    "time_ratio": 1.10,  # geo-mean of t_manual(option) / t_manual(plain), at most
    "memory_ratio": 1.10,  # geo-mean of temp(option) / temp(plain), at most
}


def option_variant(fn: Callable, option: str, shape: Shape, impl: str, seed: int = 0) -> Variant:
    """The train step of ``fn`` (``lstm`` or ``lstm_ref``) with one option of the second round.

    ``mask``: a random 90% of the steps run; ``resets``: 5% of the steps reset;
    ``recurrent_dropout``: rate 0.25; ``batch_major``: (B, T, D) input,
    ``time_major=False``; ``vmap``: ``jax.vmap`` over the B examples of a call
    on (T, 1, D), as an equinox model is used.
    """
    if option not in OPTIONS:
        raise ValueError(f"option must be one of {OPTIONS}, got {option!r}")
    p, xs, ws = problem(shape, seed)
    T, B = xs.shape[:2]
    rng = np.random.default_rng(seed + 1)
    kw: dict[str, Any] = {}
    if option == "mask":
        kw["mask"] = jnp.asarray(rng.random((T, B)) < 0.9)
    elif option == "resets":
        kw["resets"] = jnp.asarray(rng.random((T, B)) < 0.05)
    elif option == "recurrent_dropout":
        kw.update(recurrent_dropout=0.25, key=jax.random.PRNGKey(seed))
    if option == "batch_major":
        xs, ws = np.ascontiguousarray(xs.transpose(1, 0, 2)), (np.ascontiguousarray(ws[0].transpose(1, 0, 2)), *ws[1:])

        def forward(p_, xs_):
            return fn(p_, xs_, time_major=False)

    elif option == "vmap":
        xs, ws = (
            np.ascontiguousarray(xs.transpose(1, 0, 2)[:, :, None, :]),
            (
                np.ascontiguousarray(ws[0].transpose(1, 0, 2)[:, :, None, :]),
                ws[1][:, None, :],
                ws[2][:, None, :],
            ),
        )

        def forward(p_, xs_):
            return jax.vmap(lambda x: fn(p_, x))(xs_)

    else:

        def forward(p_, xs_):
            return fn(p_, xs_, **kw)

    return layer_variant(f"{impl}:{option}", forward, *jax.device_put((p, xs, ws)))


def bench_options(
    shapes: Sequence[Shape],
    options: Sequence[str] = OPTIONS,
    *,
    warmup: int = 2,
    reps: int | None = None,
    seconds: float = 40.0,
) -> dict:
    """Train-step time and temp memory of every option for ``lstm`` and ``lstm_ref``, interleaved per shape."""
    results = []
    for shape in shapes:
        pairs = bench_pairs(shape, options, option_variant, warmup=warmup, reps=reps, seconds=seconds)
        plain = pairs["plain"][0]
        rows = []
        for opt, (m, a) in pairs.items():
            rows.append(
                dict(
                    option=opt,
                    manual_ms=m["train_ms"],
                    autodiff_ms=a["train_ms"],
                    time_ratio=m["train_ms"] / plain["train_ms"],
                    memory_ratio=_ratio(m["temp_bytes"], plain["temp_bytes"]),
                    manual_temp_mib=None if m["temp_bytes"] is None else m["temp_bytes"] / 2**20,
                    speedup_vs_autodiff=a["train_ms"] / m["train_ms"],
                )
            )
        results.append(dict(shape=list(shape), rows=rows))
        print(f"timed {shape}: " + ", ".join(f"{r['option']} x{r['time_ratio']:.2f}" for r in rows), file=sys.stderr)
    summary = {}
    for opt in options:
        rows = [next(r for r in res["rows"] if r["option"] == opt) for res in results]
        summary[opt] = {
            key: geomean([r[key] for r in rows if r[key] is not None])
            for key in ("time_ratio", "memory_ratio", "speedup_vs_autodiff")
        }
    return dict(results=results, summary=summary, targets=OPTION_TARGETS)


def _ratio(a, b):
    return a / b if a and b else None


def render_options_table(report: dict) -> str:
    """The option rows as a Markdown table, plus the geometric means and their targets."""
    header = ("shape (T, B, D, H)", "option", "manual ms", "autodiff ms", "x plain time", "x plain temp")
    lines = markdown(
        (*header, "speed-up vs autodiff"),
        [
            (
                str(tuple(res["shape"])),
                r["option"],
                f"{r['manual_ms']:.1f}",
                f"{r['autodiff_ms']:.1f}",
                f"{r['time_ratio']:.2f}",
                fmt(r["memory_ratio"], ".2f"),
                f"{r['speedup_vs_autodiff']:.2f}",
            )
            for res in report["results"]
            for r in res["rows"]
        ],
    )
    lines += ["", "geometric mean over shapes:", ""]
    lines += markdown(
        ("option", "x plain time", "x plain temp", "speed-up vs autodiff"),
        [
            (opt, *(fmt(s[k], ".2f") for k in ("time_ratio", "memory_ratio", "speedup_vs_autodiff")))
            for opt, s in report["summary"].items()
        ],
    )
    plain_speedup = report["summary"].get("plain", {}).get("speedup_vs_autodiff")
    t = report["targets"]
    lines.append(
        f"\ntargets: each option <= {t['time_ratio']:.2f}x the plain train step's time and <= {t['memory_ratio']:.2f}x "
        f"its temp memory; its speed-up over autodiff with the same option >= the plain layer's "
        f"({fmt(plain_speedup, '.2f')})"
    )
    return "\n".join(lines)
