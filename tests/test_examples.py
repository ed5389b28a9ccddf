"""Every script in examples/ runs with a few training steps and ends by printing a finite metric.

The convention every example follows: it accepts ``--steps N`` and its last line of output
is ``<metric> = <value>`` (e.g. ``val_mse = 0.0142``). Scripts that use an optional library
(flax, equinox) are skipped where it is not installed.
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
OPTIONAL = ("flax", "equinox")
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
