"""``jax-lstm bench --rl``: a tiny run of the harness (no timing is asserted) and its optional imports."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest


def test_jax_lstm_needs_neither_gymnax_nor_flax_and_bench_rl_names_the_extra():
    code = textwrap.dedent(
        """
        import sys
        sys.modules["gymnax"] = None      # as if the rl extra were not installed
        sys.modules["flax"] = None
        import jax_lstm, jax_lstm.bench    # neither needs it
        for name in ("jax_lstm.rl", "jax_lstm.bench.rl"):
            try:
                __import__(name)
                print(name, "| imported")
            except ImportError as e:
                print(name, "|", str(e).split(" (")[0])
        try:
            jax_lstm.bench.main(["--rl", "--quick"])
        except SystemExit as e:
            print("bench --rl |", str(e).split(" (")[0])
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines() == [
        "jax_lstm.rl | jax_lstm.rl needs flax: pip install 'jax_lstm[rl]'",
        "jax_lstm.bench.rl | jax-lstm bench --rl needs gymnax and flax: pip install 'jax_lstm[rl]'",
        "bench --rl | jax-lstm bench: error: jax-lstm bench --rl needs gymnax and flax: pip install 'jax_lstm[rl]'",
    ]


def test_best_unroll_is_the_smallest_within_the_tolerance():
    pytest.importorskip("flax")
    pytest.importorskip("gymnax")
    from jax_lstm.bench import rl as bench_rl

    assert bench_rl.best_unroll({1: 10.0, 2: 9.8, 4: 9.0}) == 4
    assert bench_rl.best_unroll({1: 9.2, 2: 9.8, 4: 9.0}) == 1


def test_interleave_times_every_variant_every_round():
    pytest.importorskip("flax")
    pytest.importorskip("gymnax")
    from jax_lstm.bench import rl as bench_rl

    calls = []
    ms = bench_rl.interleave({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, reps=3, warmup=1)
    assert sorted(ms) == ["a", "b"] and all(v >= 0 for v in ms.values())
    assert calls.count("a") == calls.count("b") == 4


def test_the_training_pass_rows_and_the_table(tmp_path):
    pytest.importorskip("flax")
    pytest.importorskip("gymnax")
    from jax_lstm import bench

    path = tmp_path / "rl.json"
    assert bench.main(["--rl", "--quick", "--no-ppo", "--json", str(path)]) == 0
    report = json.loads(path.read_text())
    (row,) = report["pass"]["rows"]
    assert row["batch"] == 4 and row["ratio"] == pytest.approx(row["ours_ms"] / row["flax_ms"])
    assert row["ours_unroll"] in (1, 2) and row["ratio_same_unroll"] == pytest.approx(
        row["ours_ms_u1"] / row["flax_ms_u1"]
    )
    assert report["pass"]["geomean"] == pytest.approx(row["ratio"])
    assert report["command"].startswith("jax-lstm bench --rl")
    report["ppo"] = dict(
        rows=[
            dict(
                envs=4,
                flax_ms=10.0,
                flax_unroll=1,
                ours_ms=8.0,
                ours_unroll=4,
                ratio=0.8,
                ratio_same_unroll=0.9,
                rollout_flax_ms=1.0,
                rollout_ours_ms=1.0,
            )
        ],
        unrolls=[1, 4],
        geomean=0.8,
        geomean_same_unroll=0.9,
    )
    from jax_lstm.bench import rl as bench_rl

    table = bench_rl.render(report)
    assert "| 4 | 10.0 (1) | 8.0 (4) | **0.80** | 0.90 | 1.0 | 1.0 |" in table
    assert "geomean <= 0.6 (MISSED), each <= 0.9 (met)" in table
