"""The dry run of bench/gpu_check.py (CPU, tiny shapes, Pallas in interpret mode), so that the
script a GPU machine runs cannot rot; no timing is asserted."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "gpu_check.py"


def test_gpu_check_dry_run(tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--dry-run", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["dry_run"] and report["checks"]
    assert all(r["ok"] for r in report["checks"]), report["checks"]
    timed = {(r["impl"], r["dtype"]) for r in report["timings"] if "ms" in r}
    assert {("scan", "float32"), ("scan", "bfloat16"), ("autodiff", "float32"), ("pallas", "float32")} <= timed
    assert {r["impl"] for r in report["checks"]} == {"scan", "pallas"}
    assert not [r for r in report["timings"] if "error" in r], report["timings"]
    assert {r["skipped"] for r in report["timings"] if r["impl"] == "cudnn"} == {"cuDNN only"}
    table = (tmp_path / "gpu_check.md").read_text()
    assert "| scan | plain |" in table and "Train step" in table
