"""Data parallelism: 4 forced host devices and 2 processes give the 1-device result."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from jax_lstm import parallel

WORKER = str(Path(__file__).with_name("dp_worker.py"))
TOL = {"float32": 1e-5, "float64": 1e-10}


def _run(args, devices_per_process=4, timeout=240):
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices_per_process}")
    return subprocess.Popen([sys.executable, WORKER, *map(str, args)], env=env, stdout=subprocess.PIPE, text=True)


def _result(proc, timeout=240):
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0
    return json.loads(out.strip().splitlines()[-1])


def _assert_same(a, b, tol):
    np.testing.assert_allclose(a["losses"], b["losses"], rtol=tol, atol=tol)
    for x, y in zip(a["params"], b["params"], strict=True):
        np.testing.assert_allclose(x, y, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_four_devices_match_one(dtype):
    one, four = _result(_run([1, dtype])), _result(_run([4, dtype]))
    assert one["devices"] == 1 and four["devices"] == 4
    assert np.mean(one["losses"][-5:]) < 0.7 * np.mean(one["losses"][:5])  # it trains
    _assert_same(four, one, TOL[dtype])


def test_two_processes_match_one():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    coord = f"127.0.0.1:{port}"
    procs = [_run([0, "float64", coord, 2, k], devices_per_process=1) for k in range(2)]
    results = [_result(p) for p in procs]
    single = _result(_run([1, "float64"]))
    for r in results:
        assert r["devices"] == 2
        _assert_same(r, single, TOL["float64"])


def test_batch_that_does_not_divide_is_an_error():
    mesh = parallel.make_mesh(1)
    assert parallel.shard_batch(mesh, {"x": np.ones((3, 2))})["x"].shape == (3, 2)
    with pytest.raises(ValueError, match="devices must be between 1 and"):
        parallel.make_mesh(len(jax.devices()) + 1)


def test_batch_that_does_not_divide_over_four_devices():
    code = (
        "import numpy as np; from jax_lstm import parallel\n"
        "try:\n    parallel.shard_batch(parallel.make_mesh(), {'x': np.ones((6, 2))})\n"
        "except ValueError as e:\n    print('ERR', e)\n"
    )
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120).stdout
    assert "ERR batch size 6" in out and "does not divide over 4 devices" in out
