"""lstm, lstm_ref and lstm_stack under jax.shard_map and on Explicit-axis meshes (4 forced host devices).

All cases run in one fresh process (tests/sharding_worker.py), since the number of
host devices must be set before JAX starts; each case is reported and checked here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from sharding_worker import CASES

WORKER = str(Path(__file__).with_name("sharding_worker.py"))


@pytest.fixture(scope="module")
def results() -> dict:
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4")
    out = subprocess.run([sys.executable, WORKER], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_every_case_ran(results):
    assert sorted(results) == sorted(CASES)


@pytest.mark.parametrize("case", CASES)
def test_sharded_matches_one_device(results, case):
    r = results[case]
    assert r["error"] is None, f"{r['error']}\n" + "\n".join(r.get("where", []))
    assert r["ok"] and r["err"] <= 1e-12, r
