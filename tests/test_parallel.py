"""Data parallelism: 4 forced host devices and 2 jax.distributed processes give the 1-device result."""

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
STEPS = 20


def _env(n_devices: int) -> dict:
    return dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={n_devices}")


def _worker(n_dev: int, dtype: str) -> dict:
    out = subprocess.run(
        [sys.executable, WORKER, str(n_dev), dtype, str(STEPS)],
        env=_env(4),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1]), out.stderr


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_four_devices_match_one(dtype):
    (one, _), (four, log) = _worker(1, dtype), _worker(4, dtype)
    assert "4 device(s)" in log and "batch 8 global" in log and "2 per device" in log
    assert len(one["losses"]) == STEPS and np.mean(one["losses"][-5:]) < np.mean(one["losses"][:5])
    np.testing.assert_allclose(four["losses"], one["losses"], rtol=TOL[dtype], atol=TOL[dtype])
    for a, b in zip(four["params"], one["params"], strict=True):
        np.testing.assert_allclose(a, b, rtol=TOL[dtype], atol=TOL[dtype])


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_two_processes_train_together_like_one(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    common = ["--task", "sine", "--steps", "12", "--dtype", "float64", "--log-every", "4", "--progress", "none"]
    common += ["--batch-size", "8", "--seq-len", "12", "--hidden", "8", "--no-sample"]
    cli = [sys.executable, "-m", "jax_lstm", "train", *common]
    multi = [
        subprocess.Popen(
            [*cli, "--out", str(tmp_path / "multi"), "--coordinator", f"127.0.0.1:{port}"]
            + ["--num-processes", "2", "--process-id", str(k)],
            env=_env(1),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for k in range(2)
    ]
    single = subprocess.run(
        [*cli, "--out", str(tmp_path / "single")], env=_env(1), capture_output=True, text=True, timeout=300
    )
    assert single.returncode == 0, single.stderr[-2000:]
    for p in multi:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-2000:]
        assert "2 device(s) (cpu) in 2 process(es)" in err
    got, want = _records(tmp_path / "multi" / "metrics.jsonl"), _records(tmp_path / "single" / "metrics.jsonl")
    assert [r["step"] for r in got] == [r["step"] for r in want] == [4, 8, 12]
    for r, w in zip(got, want, strict=True):
        np.testing.assert_allclose([r["loss"], r["val_mse"]], [w["loss"], w["val_mse"]], rtol=1e-10)
    assert (tmp_path / "multi" / "checkpoint.npz").exists()


def test_make_mesh_rejects_more_devices_than_exist():
    with pytest.raises(ValueError, match="devices must be between 1 and"):
        parallel.make_mesh(len(jax.devices()) + 1)


def test_batch_that_does_not_divide_over_four_devices_is_an_error():
    code = (
        "import numpy as np; from jax_lstm import parallel\n"
        "try:\n    parallel.shard_batch(parallel.make_mesh(), {'x': np.ones((6, 2))})\n"
        "except ValueError as e:\n    print('ERR', e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], env=_env(4), capture_output=True, text=True, timeout=120).stdout
    assert "ERR batch size 6" in out and "does not divide over 4 devices" in out
