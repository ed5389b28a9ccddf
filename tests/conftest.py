"""Test configuration: float64 available everywhere, implicit rank promotion is an error.

The suite runs on the CPU (``JAX_PLATFORMS=cpu`` unless set otherwise): an installed CUDA
plugin is then loaded without looking for a GPU, and the GPU tests compile for one through a
deviceless topology (``tests/deviceless.py``).
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)
jax.config.update("jax_numpy_rank_promotion", "raise")
