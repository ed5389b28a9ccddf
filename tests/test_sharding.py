"""lstm, lstm_ref and lstm_stack under jax.shard_map and on Explicit-axis meshes (4 forced host devices).

All cases run in one fresh process (tests/sharding_worker.py), since the number of
host devices must be set before JAX starts and each case costs a compile. One test
checks them all, so that pytest-xdist never starts the process twice; a failure
lists every case with its error or its relative difference from one device.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from sharding_worker import CASES, TOL

WORKER = str(Path(__file__).with_name("sharding_worker.py"))


def test_sharded_matches_one_device():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4")
    out = subprocess.run([sys.executable, WORKER], env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    results = json.loads(out.stdout.strip().splitlines()[-1])
    assert sorted(results) == sorted(CASES)
    report = []
    for case in CASES:
        r = results[case]
        ok = r["error"] is None and r["ok"] and r["err"] <= TOL
        detail = f"max rel diff {r['err']:.1e}" if r["error"] is None else r["error"].splitlines()[0][:300]
        report.append(f"{'ok  ' if ok else 'FAIL'} {case} ({r['seconds']} s): {detail}")
        print(report[-1])
    failed = [line for line in report if line.startswith("FAIL")]
    assert not failed, f"{len(failed)} of {len(CASES)} cases failed:\n" + "\n".join(failed)
