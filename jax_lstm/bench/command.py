"""``jax-lstm bench``: the hand-written BPTT against autodiff, Flax and PyTorch.

The command's flags, the choice of benchmark (the layer rows, ``--models``, ``--options``, ``--variants``
or ``--rl``), the shapes and repetitions each runs at, and the report: a table on stdout with the ratios
the performance targets are stated in, ``--json FILE`` and ``--plot FILE`` (PNG, the layer rows).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from typing import Any

import jax

from jax_lstm.bench import family, layer, models, options
from jax_lstm.bench.layer import DEFAULT_SHAPES, MEMORY_SHAPE, QUICK_MEMORY_SHAPE, QUICK_SHAPES
from jax_lstm.bench.plot import plot
from jax_lstm.bench.timing import UNROLL_TOLERANCE
from jax_lstm.bench.variant import Shape

__all__ = ["main", "machine", "shape_arg", "ints_arg"]


def shape_arg(s: str) -> Shape:
    """An argparse ``type``: ``T,B,D,H``, four positive ints."""
    try:
        t = tuple(int(v) for v in s.split(","))
    except ValueError:
        t = ()
    if len(t) != 4 or min(t) < 1:
        raise argparse.ArgumentTypeError(f"expected T,B,D,H (four positive ints), got {s!r}")
    return t  # type: ignore[return-value]


def ints_arg(s: str) -> list[int]:
    """An argparse ``type``: a comma-separated list of positive ints."""
    try:
        v = [int(x) for x in s.split(",")]
    except ValueError:
        v = []
    if not v or min(v) < 1:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list of positive ints, got {s!r}")
    return v


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        return platform.processor()


def machine() -> dict:
    """The platform, processor, JAX version and devices a report was measured on."""
    return dict(
        platform=platform.platform(),
        processor=_cpu_model(),
        cpu_count=os.cpu_count(),
        jax=jax.__version__,
        backend=jax.default_backend(),
        devices=[str(d) for d in jax.devices()],
        python=platform.python_version(),
    )


def _parser() -> argparse.ArgumentParser:
    from jax_lstm.cli import nonneg_float, nonneg_int, positive_float, positive_int

    ap = argparse.ArgumentParser(prog="jax-lstm bench", description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--shape",
        type=shape_arg,
        action="append",
        metavar="T,B,D,H",
        help="an extra shape (repeatable); with --only-shapes, the only ones",
    )
    ap.add_argument("--only-shapes", action="store_true", help="time only the --shape shapes, not the default four")
    ap.add_argument("--quick", action="store_true", help="a tiny smoke run: one small shape, few repetitions")
    ap.add_argument(
        "--unroll", type=ints_arg, default=None, help="unrolls to try for manual and autodiff (default 1,2,4)"
    )
    ap.add_argument(
        "--unroll-tol",
        type=nonneg_float,
        default=UNROLL_TOLERANCE,
        help="best unroll: the smallest within this relative margin of the fastest (default 0.03)",
    )
    ap.add_argument(
        "--reps", type=positive_int, default=None, help="timed repetitions per shape (default: fit --seconds)"
    )
    ap.add_argument(
        "--seconds", type=positive_float, default=40.0, help="time budget per shape when --reps is not given"
    )
    ap.add_argument("--warmup", type=nonneg_int, default=2, help="untimed repetitions before timing")
    ap.add_argument("--peak", type=positive_float, default=None, help="matmul peak in GFLOP/s instead of measuring it")
    ap.add_argument("--no-flax", action="store_true", help="leave Flax out")
    ap.add_argument("--no-torch", action="store_true", help="leave PyTorch out")
    ap.add_argument("--no-memory", action="store_true", help=f"skip the temp-memory comparison at {MEMORY_SHAPE}")
    ap.add_argument("--json", metavar="FILE", help="write the full report as JSON")
    ap.add_argument("--plot", metavar="FILE", help="write a PNG chart")
    ap.add_argument(
        "--models",
        action="store_true",
        help="instead: the train step of features -> LSTM -> dense with the Flax NNX, Flax Linen and Equinox "
        "LSTMs against jax_lstm's modules for them",
    )
    ap.add_argument(
        "--options",
        action="store_true",
        help="instead: the train step of lstm and lstm_ref with a mask, resets, recurrent dropout, batch-major "
        "input and under vmap, against the plain layer",
    )
    ap.add_argument(
        "--variants",
        action="store_true",
        help="instead: the train step of the LSTM family (projection, peepholes, layer norm, all three), "
        "lstm against lstm_ref of the same variant",
    )
    ap.add_argument("--rl", action="store_true", help="instead: recurrent PPO, ours against Flax (--rl --help)")
    return ap


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``jax-lstm bench``."""
    rest = list(sys.argv[1:] if argv is None else argv)
    if "--rl" in rest:  # its own flags: jax_lstm.bench.rl
        try:
            from jax_lstm.bench import rl
        except ImportError as e:
            raise SystemExit(f"jax-lstm bench: error: {e}") from e
        return rl.main([a for a in rest if a != "--rl"])
    ap = _parser()
    args = ap.parse_args(argv)
    rows = args.models or args.options or args.variants  # only those rows: no peak, unrolls, memory or plot
    if sum((args.models, args.options, args.variants)) > 1:
        ap.error("--models, --options and --variants are separate benchmarks: choose one")
    if args.quick:
        shapes, reps, warmup = list(args.shape or QUICK_SHAPES), args.reps or 3, 1
    else:
        shapes = list(args.shape or []) if args.only_shapes else list(DEFAULT_SHAPES) + list(args.shape or [])
        reps, warmup = args.reps, args.warmup
    if not shapes:
        if rows:
            raise SystemExit("jax-lstm bench: error: no shapes: --only-shapes needs at least one --shape")
        ap.error("no shapes: --only-shapes needs at least one --shape")
    command = "jax-lstm bench " + " ".join(argv if argv is not None else sys.argv[1:])

    t_start = time.perf_counter()
    if rows:
        run, render = (
            (models.bench_models, models.render_models_table)
            if args.models
            else (options.bench_options, options.render_options_table)
            if args.options
            else (family.bench_variants, family.render_variants_table)
        )
        report = run(shapes, warmup=warmup, reps=reps, seconds=args.seconds)
        report.update(machine=machine(), command=command)
    else:
        render = layer.render_table
        report = dict(
            machine=machine(),
            command=command,
            **layer.bench_layer(
                shapes,
                unrolls=args.unroll or ([1, 2] if args.quick else [1, 2, 4]),
                unroll_tol=args.unroll_tol,
                warmup=warmup,
                reps=reps,
                seconds=args.seconds,
                peak=args.peak,
                peak_n=1024 if args.quick else 4096,
                peak_reps=2 if args.quick else 5,
                flax=not args.no_flax,
                torch=not args.no_torch,
                memory_shape=None if args.no_memory else QUICK_MEMORY_SHAPE if args.quick else MEMORY_SHAPE,
            ),
        )
    report["wall_s"] = time.perf_counter() - t_start
    print(render(report))
    print(f"\n(total {report['wall_s']:.0f} s)")
    return _write(args.json, lambda path: _dump(report, path)) or _write(
        None if rows else args.plot, lambda path: plot(report, path)
    )


def _dump(report: dict, path: str) -> None:
    with open(path, "w") as f:
        json.dump(report, f, indent=1)


def _write(path: str | None, write: Callable[[str], Any]) -> int:
    """``write(path)`` unless ``path`` is None: 0, or 1 after one line on stderr if the file cannot be written."""
    if path is None:
        return 0
    try:
        write(path)
    except OSError as e:
        print(f"jax-lstm bench: error: cannot write {path}: {e.strerror or e}", file=sys.stderr)
        return 1
    return 0
