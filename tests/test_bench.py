"""Smoke test of the benchmark harness on tiny shapes; no timing is asserted."""

from __future__ import annotations

import json
import math

import pytest

from jax_lstm import bench


def test_matmul_flops_counts_forward_and_twice_that_backward():
    T, B, D, H = 3, 2, 5, 7
    fwd, train = bench.matmul_flops((T, B, D, H))
    assert fwd == 2 * T * B * (D + H) * 4 * H
    assert train == 3 * fwd


def _record(impl, unroll, train_ms, fwd_ms=1.0, compile_s=1.0, temp=1000):
    return dict(
        impl=impl,
        unroll=unroll,
        train_ms=train_ms,
        fwd_ms=fwd_ms,
        train_gflops=1.0 / train_ms,
        fwd_gflops=1.0,
        compile_s=compile_s,
        temp_bytes=temp,
    )


def test_summarize_takes_each_implementation_at_its_best_unroll():
    shapes = [list(bench.PEAK_SHAPE), [4, 3, 2, 1]]
    results = [
        dict(
            shape=shapes[0],
            records=[
                _record("manual", 1, 10.0, compile_s=2.0),
                _record("manual", 2, 5.0, compile_s=1.0),
                _record("autodiff", 1, 20.0, compile_s=4.0),
                _record("autodiff", 2, 30.0),
                _record("torch", None, 4.0),
            ],
        ),
        dict(
            shape=shapes[1],
            records=[_record("manual", 1, 8.0), _record("autodiff", 1, 16.0), _record("torch", None, 16.0)],
        ),
    ]
    memory = dict(shape=list(bench.MEMORY_SHAPE), manual_bytes=60, autodiff_bytes=100, ratio=0.6)
    s = bench.summarize(results, peak_gflops=1.0, memory=memory)
    first = s["per_shape"][0]
    assert first["manual_unroll"] == 2 and first["autodiff_unroll"] == 1
    assert first["speedup_vs_autodiff"] == pytest.approx(4.0)
    assert first["time_ratio_vs_torch"] == pytest.approx(1.25)
    assert first["compile_ratio"] == pytest.approx(0.25)
    g = s["geomean"]
    assert g["speedup_vs_autodiff"] == pytest.approx(math.sqrt(4.0 * 2.0))
    assert g["time_ratio_vs_torch"] == pytest.approx(math.sqrt(1.25 * 0.5))
    t = s["targets"]
    assert t["speedup_vs_autodiff"]["met"] is True  # 2.83 >= 2.0
    assert t["time_ratio_vs_torch"]["met"] is True  # 0.79 <= 1.0
    assert t["memory_ratio"]["met"] is True  # 0.6 <= 0.75
    assert t["peak_fraction"]["value"] == pytest.approx(0.2) and t["peak_fraction"]["met"] is False


def test_slowest_shape_targets_list_every_shape_and_render():
    results = [
        dict(
            shape=[3, 2, 2, 2], records=[_record("manual", 1, 5.0, fwd_ms=3.0), _record("torch", None, 4.0, fwd_ms=2.0)]
        ),
        dict(
            shape=[4, 2, 2, 2],
            records=[_record("manual", 1, 8.0, fwd_ms=1.0), _record("torch", None, 16.0, fwd_ms=4.0)],
        ),
    ]
    s = bench.summarize(results, peak_gflops=1.0, memory=None)
    train, fwd = s["targets"]["time_ratio_vs_torch_max"], s["targets"]["fwd_time_ratio_vs_torch_max"]
    assert train["per_shape"] == pytest.approx([1.25, 0.5]) and train["value"] == pytest.approx(1.25)
    assert fwd["per_shape"] == pytest.approx([1.5, 0.25]) and fwd["value"] == pytest.approx(1.5)
    assert train["met"] is False and fwd["met"] is False and fwd["direction"] == "<="
    report = dict(peak_gflops=1.0, peak_n=8, results=results, summary=s, memory=None)
    printed = bench.render_table(report)
    line = next(ln for ln in printed.splitlines() if "forward time, slowest shape" in ln)
    assert "1.50" in line and "MISSED" in line and "per shape: 1.50, 0.25" in line


def test_best_unroll_is_the_smallest_within_the_tolerance():
    records = [_record("manual", 1, 10.0), _record("manual", 2, 9.8), _record("manual", 4, 12.0)]
    records.append(_record("torch", None, 5.0))
    bench.mark_best(records, tol=0.03)
    assert [r["best"] for r in records] == [True, False, False, True]
    bench.mark_best(records, tol=0.0)
    assert [r["best"] for r in records] == [False, True, False, True]
    s = bench.summarize([dict(shape=[1, 1, 1, 1], records=records)], peak_gflops=1.0, memory=None)
    assert s["per_shape"][0]["manual_unroll"] == 2


def test_quick_run_writes_table_json_and_png(tmp_path, capsys):
    out_json, out_png = tmp_path / "bench.json", tmp_path / "bench.png"
    rc = bench.main(["--quick", "--seconds", "1", "--json", str(out_json), "--plot", str(out_png)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "geometric mean" in printed and "targets" in printed

    report = json.loads(out_json.read_text())
    assert report["peak_gflops"] > 0 and isinstance(report["noisy"], bool)
    assert [r["shape"] for r in report["results"]] == [list(s) for s in bench.QUICK_SHAPES]
    records = report["results"][0]["records"]
    impls = {r["impl"] for r in records}
    assert {"manual", "autodiff"} <= impls
    for r in records:
        assert r["fwd_ms"] > 0 and r["train_ms"] > 0 and r["train_gflops"] > 0
        if r["impl"] in ("manual", "autodiff"):
            assert r["unroll"] in (1, 2)
            assert r["compile_s"] > 0 and r["temp_bytes"] is not None and r["temp_bytes"] >= 0
    mem = report["memory"]
    assert mem["shape"] == list(bench.QUICK_MEMORY_SHAPE)
    assert mem["manual_bytes"] > 0 and mem["autodiff_bytes"] > 0
    assert set(report["summary"]["targets"]) == set(bench.TARGETS)
    assert report["summary"]["per_shape"][0]["speedup_vs_autodiff"] > 0
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_shape_flag_is_an_argparse_error():
    with pytest.raises(SystemExit):
        bench.main(["--shape", "1,2,3"])


def test_option_rows_compare_the_same_computation_and_render(tmp_path, capsys):
    import jax
    import numpy as np

    from jax_lstm import lstm, lstm_ref

    shape = (5, 3, 2, 4)
    for option in bench.OPTIONS:
        v_manual = bench.option_variant(lstm, option, shape, "manual")
        v_ref = bench.option_variant(lstm_ref, option, shape, "autodiff")
        # the manual and autodiff train steps of one option return the same gradients
        g_manual, g_ref = v_manual.train(), v_ref.train()
        for a, b in zip(jax.tree.leaves(g_manual), jax.tree.leaves(g_ref), strict=True):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5, err_msg=option)
    with pytest.raises(ValueError, match="option must be one of"):
        bench.option_variant(lstm, "nope", shape, "manual")
    out = tmp_path / "options.json"
    # at the shape above: the rows reuse the train steps compiled there (through the compilation cache)
    assert bench.main(["--options", "--quick", "--shape", "5,3,2,4", "--reps", "1", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert [r["option"] for r in report["results"][0]["rows"]] == list(bench.OPTIONS)
    assert report["summary"]["plain"]["time_ratio"] == pytest.approx(1.0)
    assert "x plain time" in capsys.readouterr().out


def test_variants_rows_time_each_variant_against_its_own_autodiff(tmp_path, capsys):
    """``--variants``: every variant's manual and autodiff train steps give the same gradients, the table has a
    row per variant with the speed-up and memory ratio, and the targets are judged per variant."""
    import jax
    import numpy as np

    from jax_lstm import lstm, lstm_ref
    from jax_lstm.bench import family

    shape = (5, 2, 3, 4)
    for variant in ("all",):  # the three variants' terms at once; each alone: tests/test_variants.py
        g_manual = family.family_variant(lstm, variant, shape, "manual").train()
        g_ref = family.family_variant(lstm_ref, variant, shape, "autodiff").train()
        for a, b in zip(jax.tree.leaves(g_manual), jax.tree.leaves(g_ref), strict=True):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5, err_msg=variant)
    assert family.variant_options("all", 8) == {"proj_size": 4, "peephole": True, "layer_norm": True}
    with pytest.raises(ValueError, match="variant must be one of"):
        family.family_variant(lstm, "nope", shape, "manual")
    out = tmp_path / "variants.json"
    assert bench.main(["--variants", "--quick", "--shape", "5,2,3,4", "--reps", "1", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    rows = report["results"][0]["rows"]
    assert [r["variant"] for r in rows] == list(family.VARIANTS)
    for r in rows:
        assert r["speedup"] == pytest.approx(r["autodiff_ms"] / r["manual_ms"])
        assert 0 < r["memory_ratio"] < 1  # the hand-written backward keeps less than autodiff, every variant
    text = capsys.readouterr().out
    assert "| projection |" in text and "temp memory vs autodiff" in text and ">= 1.5x faster" in text
    with pytest.raises(SystemExit):
        bench.main(["--variants", "--options", "--quick"])
