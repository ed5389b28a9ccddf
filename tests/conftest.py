"""Test configuration: float64 available everywhere, implicit rank promotion is an error.

The suite runs on the CPU (``JAX_PLATFORMS=cpu`` unless set otherwise): an installed CUDA
plugin is then loaded without looking for a GPU, and the GPU tests compile for one through a
deviceless topology (``tests/deviceless.py``).

Compiled programs are shared through JAX's persistent compilation cache in a directory made
fresh for each run (unless ``JAX_COMPILATION_CACHE_DIR`` is set): the pytest-xdist workers and
every process a test starts (the CLI, the examples, the notebook's kernel) read it, so a program
that several of them build is compiled once. Each run starts empty, so its time is a fresh
clone's time, and the directory is removed when the run ends. (A reader that meets an entry
still being written gets a warning from JAX and compiles the program itself.)
"""

import atexit
import os
import shutil
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "JAX_COMPILATION_CACHE_DIR" not in os.environ and "PYTEST_XDIST_WORKER" not in os.environ:
    # the controller (or a run without xdist) makes it; workers and subprocesses inherit the variables
    _cache = tempfile.mkdtemp(prefix="jax_lstm_tests_cache_")
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)
jax.config.update("jax_numpy_rank_promotion", "raise")
