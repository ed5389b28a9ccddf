"""``jax-lstm bench``: the hand-written BPTT against autodiff, Flax and PyTorch.

``timing`` holds the one interleaved timing loop every benchmark uses and ``render`` the two kinds of
table they print; ``layer`` (the layer rows), ``models`` (``--models``), ``options`` (``--options``)
and ``rl`` (``--rl``, imported only then: it needs gymnax and flax) are one benchmark each;
``variant`` is the compiled layer train step the layer and option rows share, ``plot`` the layer
rows' PNG and ``command`` the ``jax-lstm bench`` command.
"""

from __future__ import annotations

from jax_lstm.bench.command import main
from jax_lstm.bench.layer import (
    DEFAULT_SHAPES,
    MEMORY_SHAPE,
    PEAK_SHAPE,
    QUICK_MEMORY_SHAPE,
    QUICK_SHAPES,
    TARGETS,
    bench_layer,
    flax_variant,
    jax_variant,
    mark_best,
    measure_peak,
    memory_compare,
    render_table,
    summarize,
    torch_variant,
)
from jax_lstm.bench.models import ModelVariant, bench_models, model_variants, render_models_table
from jax_lstm.bench.options import OPTIONS, bench_options, option_variant, render_options_table
from jax_lstm.bench.plot import plot
from jax_lstm.bench.timing import UNROLL_TOLERANCE, interleave
from jax_lstm.bench.variant import Variant, bench_shape, matmul_flops, temp_bytes

__all__ = [
    "bench_layer",
    "bench_models",
    "bench_options",
    "bench_shape",
    "DEFAULT_SHAPES",
    "flax_variant",
    "interleave",
    "jax_variant",
    "main",
    "mark_best",
    "matmul_flops",
    "measure_peak",
    "memory_compare",
    "MEMORY_SHAPE",
    "model_variants",
    "ModelVariant",
    "option_variant",
    "OPTIONS",
    "PEAK_SHAPE",
    "plot",
    "QUICK_MEMORY_SHAPE",
    "QUICK_SHAPES",
    "render_models_table",
    "render_options_table",
    "render_table",
    "summarize",
    "TARGETS",
    "temp_bytes",
    "torch_variant",
    "UNROLL_TOLERANCE",
    "Variant",
]
