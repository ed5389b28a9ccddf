"""Every script in examples/ runs with a few training steps and ends by printing a finite metric.

The convention every example follows: it accepts ``--steps N`` and its last line of output
is ``<metric> = <value>`` (e.g. ``val_mse = 0.0142``). Scripts that use an optional library
(flax, equinox, gymnax) are skipped where it is not installed.
"""

from __future__ import annotations

import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = sorted((ROOT / "examples").glob("*.py"))
OPTIONAL = ("flax", "equinox", "gymnax")
METRIC_LINE = re.compile(r"([A-Za-z_][\w.]*) = (\S+)")


def test_the_examples_are_there():
    names = {p.name for p in EXAMPLES}
    assert {"nnx_sine.py", "linen_sine.py", "equinox_sine.py"} <= names, names


@pytest.mark.parametrize("script", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_runs(script):
    source = script.read_text()
    for lib in OPTIONAL:
        if re.search(rf"^\s*(import|from) {lib}\b", source, re.MULTILINE):
            pytest.importorskip(lib)
    out = subprocess.run(
        [sys.executable, str(script), "--steps", "5"], capture_output=True, text=True, timeout=300, cwd=ROOT
    )
    assert out.returncode == 0, f"{script.name} failed:\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}"
    lines = [line.strip() for line in out.stdout.splitlines() if line.strip()]
    assert lines, f"{script.name} printed nothing"
    match = METRIC_LINE.fullmatch(lines[-1])
    assert match, f"{script.name}: the last line should be '<metric> = <value>', got {lines[-1]!r}"
    assert math.isfinite(float(match.group(2))), lines[-1]


def test_ppo_example_runs_a_few_updates_with_flax_core_too():
    """test_example_runs runs it with jax_lstm's core at its default sizes; here Flax's, small."""
    core = "flax"
    pytest.importorskip("flax")
    pytest.importorskip("gymnax")
    args = ["--core", core, "--updates", "3", "--envs", "4", "--num-steps", "32", "--hidden", "16", "--seed", "1"]
    out = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "ppo_memory.py"), *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert out.returncode == 0, f"{out.stdout[-2000:]}\n{out.stderr[-4000:]}"
    lines = out.stdout.split("\n")
    assert f"{core} core: 3 updates" in out.stdout, out.stdout
    losses = [float(line.rsplit("loss ", 1)[1]) for line in lines if line.startswith("update ")]
    assert len(losses) == 3 and all(math.isfinite(v) for v in losses), out.stdout
    assert math.isfinite(float(METRIC_LINE.fullmatch(lines[-2].strip()).group(2))), out.stdout
