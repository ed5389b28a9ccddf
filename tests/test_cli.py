"""``jax-lstm train|sample|evaluate``: outputs, exit codes, clear errors, and nothing overwritten on error."""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import pytest

from jax_lstm import checkpoint
from jax_lstm.cli import main
from jax_lstm.train import TrainConfig, load_run

TINY = ["--batch-size", "4", "--seq-len", "10", "--hidden", "8", "--embed", "6", "--progress", "lines"]


def _snapshot(directory: Path) -> dict[str, str]:
    return {
        str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def charlm_run(tmp_path_factory):
    """A finished tiny charlm run (12 steps) made through the command line."""
    out = tmp_path_factory.mktemp("runs") / "charlm"
    code = main(["train", "--steps", "12", "--log-every", "4", "--out", str(out), *TINY])
    assert code == 0
    return out


def test_train_writes_checkpoint_metrics_config_and_plot(charlm_run, capsys):
    out = charlm_run
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.npz", "config.json", "curves.png", "metrics.jsonl"]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [4, 8, 12]
    for r in records:
        assert {"step", "loss", "val_bpc", "val_loss", "lr", "elapsed"} <= set(r)
        assert r["val_bpc"] == r["val_loss"] > 0
    config = json.loads((out / "config.json").read_text())
    assert config["config"]["hidden"] == 8 and config["config"]["task"] == "charlm"
    assert config["task"]["metric"] == "val_bpc" and config["baselines"]["unigram"] > 4
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    header = checkpoint.read_header(out / "checkpoint.npz")
    assert header["meta"]["step"] == 12 and header["config"]["hidden"] == 8


def test_train_prints_progress_and_a_summary(tmp_path, capsys):
    code = main(
        ["train", "--task", "sine", "--steps", "6", "--log-every", "3", "--hidden", "4", "--out", str(tmp_path)]
    )
    assert code == 0
    cap = capsys.readouterr()
    assert "3/6 [" in cap.err and "6/6 [####################] 100%" in cap.err
    assert "val_mse" in cap.err and "steps/s" in cap.err and "ETA" in cap.err
    for row in ("val_mse (step 6)", "baseline: predict_zero", "baseline: predict_last", "files"):
        assert row in cap.out


def test_evaluate_and_sample(charlm_run, capsys):
    assert main(["evaluate", "--checkpoint", str(charlm_run), "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    last = json.loads((charlm_run / "metrics.jsonl").read_text().splitlines()[-1])
    assert got["step"] == 12 and got["val_bpc"] == pytest.approx(last["val_bpc"], rel=1e-6)
    assert got["baselines"]["unigram"] > got["val_bpc"] - 10  # a number, reported beside the metric
    assert main(["evaluate", "--checkpoint", str(charlm_run), "--grad", "autodiff"]) == 0
    assert "baseline: unigram" in capsys.readouterr().out
    args = ["sample", "--checkpoint", str(charlm_run), "--prompt", "def ", "--length", "60", "--seed", "3"]
    assert main(args) == 0
    text = capsys.readouterr().out.rstrip("\n")
    assert text.startswith("def ") and len(text) == 64
    assert main(args) == 0
    assert capsys.readouterr().out.rstrip("\n") == text  # same seed, same text


@pytest.mark.parametrize(
    "argv, expect",
    [
        (["train", "--task", "nope"], "invalid choice: 'nope'"),
        (["train", "--steps", "-5"], "argument --steps: must be a positive integer, got '-5'"),
        (["train", "--steps", "ten"], "argument --steps: must be a positive integer, got 'ten'"),
        (["train", "--grad", "numeric"], "argument --grad: invalid choice"),
        (["train", "--lr", "0"], "argument --lr: must be a positive number"),
        (["train", "--lr", "nan"], "argument --lr: must be a positive number"),
        (["train", "--dtype", "float16"], "argument --dtype: invalid choice"),
        (["train", "--hidden", "256,x"], "argument --hidden: must be a positive integer, got 'x'"),
        (["train", "--hidden", "256,0"], "argument --hidden: must be a positive integer, got '0'"),
        (["train", "--recurrent-dropout", "1"], "argument --recurrent-dropout: must be a number in [0, 1)"),
        (["train", "--layer-dropout", "-0.1"], "argument --layer-dropout: must be a number in [0, 1)"),
        (["train", "--bogus"], "unrecognized arguments: --bogus"),
        (["train", "--resume", "--force"], "--resume and --force contradict each other"),
        (["train", "--task", "addition", "--seq-len", "5"], "seq_len must be 9"),
        (["sample", "--temperature", "0"], "argument --temperature: must be a positive number"),
        (["sample", "--length", "0"], "argument --length: must be a positive integer"),
        (["sample", "--prompt", ""], "--prompt must not be empty"),
        (["evaluate", "--grad", "x"], "argument --grad: invalid choice"),
        (["frobnicate"], "unknown command 'frobnicate'"),
    ],
)
def test_bad_arguments_exit_2_and_write_nothing(tmp_path, capsys, monkeypatch, argv, expect):
    monkeypatch.chdir(tmp_path)  # default --out is runs/TASK under the working directory
    assert main(argv) == 2
    assert expect in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def _copy_run(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True)
    for p in src.iterdir():
        (dst / p.name).write_bytes(p.read_bytes())
    return dst


def test_existing_checkpoint_needs_resume_or_force(charlm_run, tmp_path, capsys):
    out = _copy_run(charlm_run, tmp_path / "run")
    before = _snapshot(out)
    assert main(["train", "--steps", "12", "--out", str(out), *TINY]) == 2
    err = capsys.readouterr().err
    assert "already holds a checkpoint" in err and "--resume" in err and "--force" in err
    assert _snapshot(out) == before


def test_resume_with_another_model_size_is_refused(charlm_run, tmp_path, capsys):
    out = _copy_run(charlm_run, tmp_path / "run")
    before = _snapshot(out)
    assert main(["train", "--resume", "--out", str(out), "--steps", "20", "--hidden", "16"]) == 2
    err = capsys.readouterr().err
    assert "cannot resume" in err and "--hidden 16 (the checkpoint has 8)" in err
    assert _snapshot(out) == before


def test_checkpoint_of_another_model_size_is_rejected(charlm_run, tmp_path, capsys):
    """A well-formed file whose arrays do not match its own config (hidden 8 arrays, config says 16)."""
    out = _copy_run(charlm_run, tmp_path / "run")
    header, arrays = checkpoint.load(out / "checkpoint.npz")
    run = load_run(charlm_run)
    checkpoint.save(
        out / "checkpoint.npz", run.state.arrays(), config={**header["config"], "hidden": 16}, meta=header["meta"]
    )
    before = _snapshot(out)
    for argv in (["evaluate", "--checkpoint", str(out)], ["train", "--resume", "--out", str(out), "--steps", "20"]):
        assert main(argv) == 1
        err = capsys.readouterr().err
        assert "does not fit this model" in err
        assert "['params']['lstm'][0][0].W has shape (8, 32) in the checkpoint, (16, 64) in this model" in err
        assert _snapshot(out) == before


@pytest.mark.parametrize("command", ["train", "evaluate", "sample"])
def test_corrupted_checkpoint_is_rejected(charlm_run, tmp_path, capsys, command):
    out = _copy_run(charlm_run, tmp_path / "run")
    data = bytearray((out / "checkpoint.npz").read_bytes())
    data[len(data) // 2] ^= 0x55
    (out / "checkpoint.npz").write_bytes(bytes(data))
    before = _snapshot(out)
    argv = {
        "train": ["train", "--resume", "--out", str(out), "--steps", "20"],
        "evaluate": ["evaluate", "--checkpoint", str(out)],
        "sample": ["sample", "--checkpoint", str(out)],
    }[command]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert f"jax-lstm {command}: error:" in err and "corrupted" in err and "Traceback" not in err
    assert _snapshot(out) == before


def _damage_zip_directory(path: Path, field: int, bit: int) -> None:
    data = bytearray(path.read_bytes())
    data[data.index(b"PK\x01\x02") + field] ^= 1 << bit  # a field of the first central-directory entry
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("command", ["train", "evaluate", "sample"])
@pytest.mark.parametrize("field, bit", [(10, 1), (8, 0)], ids=["compression-method", "encrypted-flag"])
def test_damaged_zip_directory_is_one_line_and_exit_1(charlm_run, tmp_path, capsys, command, field, bit):
    """Flips that make zipfile raise NotImplementedError or RuntimeError still end as one error line."""
    out = _copy_run(charlm_run, tmp_path / "run")
    _damage_zip_directory(out / "checkpoint.npz", field, bit)
    before = _snapshot(out)
    argv = {
        "train": ["train", "--resume", "--out", str(out), "--steps", "20"],
        "evaluate": ["evaluate", "--checkpoint", str(out)],
        "sample": ["sample", "--checkpoint", str(out)],
    }[command]
    assert main(argv) == 1
    cap = capsys.readouterr()
    lines = cap.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"jax-lstm {command}: error: "), cap.err
    assert str(out / "checkpoint.npz") in lines[0] and "not a readable jax_lstm checkpoint" in lines[0]
    assert cap.out == ""
    assert _snapshot(out) == before


# The C++ runtime's own log lines (an installed CUDA plugin logs "Could not find cuda drivers" at import).
_RUNTIME_LOG = re.compile(
    r"^(WARNING: All log messages before absl::InitializeLog\(\)|[IWEF]\d{4} [\d:.]+ +\d+ \S+:\d+\] )"
)


def _our_lines(stderr: str) -> list[str]:
    """The lines of a subprocess's stderr that jax_lstm wrote."""
    return [line for line in stderr.strip().splitlines() if not _RUNTIME_LOG.match(line)]


def test_damaged_checkpoint_in_a_real_process_prints_no_traceback(charlm_run, tmp_path):
    out = _copy_run(charlm_run, tmp_path / "run")
    _damage_zip_directory(out / "checkpoint.npz", 10, 1)
    cmd = [sys.executable, "-m", "jax_lstm", "evaluate", "--checkpoint", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and proc.stdout == ""
    assert "Traceback" not in proc.stderr and len(_our_lines(proc.stderr)) == 1, proc.stderr
    assert str(out / "checkpoint.npz") in proc.stderr


def test_missing_checkpoint_and_wrong_task(charlm_run, tmp_path, capsys):
    assert main(["evaluate", "--checkpoint", str(tmp_path / "nothing")]) == 1
    assert "no checkpoint at" in capsys.readouterr().err
    assert main(["train", "--resume", "--out", str(tmp_path / "nothing")]) == 1
    assert "no checkpoint at" in capsys.readouterr().err
    assert not (tmp_path / "nothing").exists()
    add = tmp_path / "add"
    assert main(["train", "--task", "addition", "--steps", "2", "--hidden", "4", "--out", str(add)]) == 0
    capsys.readouterr()
    assert main(["sample", "--checkpoint", str(add)]) == 2
    assert "is a addition checkpoint; sample needs a charlm one" in capsys.readouterr().err


def test_resume_continues_and_metrics_flag(charlm_run, tmp_path, capsys):
    out = _copy_run(charlm_run, tmp_path / "run")
    metrics = tmp_path / "elsewhere" / "m.jsonl"
    assert main(["train", "--resume", "--out", str(out), "--steps", "16", "--metrics", str(metrics)]) == 0
    assert "resuming at step 12" in capsys.readouterr().err
    assert [json.loads(x)["step"] for x in metrics.read_text().splitlines()] == [16]
    assert checkpoint.read_header(out / "checkpoint.npz")["meta"]["step"] == 16
    assert load_run(out).config == TrainConfig(**{**load_run(charlm_run).config.__dict__, "steps": 16})


def test_float64_run_from_the_command_line(tmp_path, capsys):
    out = tmp_path / "f64"
    assert (
        main(["train", "--task", "sine", "--steps", "3", "--hidden", "4", "--dtype", "float64", "--out", str(out)]) == 0
    )
    run = load_run(out)
    assert {a.dtype.name for a in jax.tree.leaves(run.state.params)} == {"float64"}


def test_ctrl_c_in_a_real_process_saves_and_exits_cleanly(tmp_path):
    """The installed entry point (python -m jax_lstm), interrupted by SIGINT while training."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "jax_lstm", "train", "--steps", "100000", "--log-every", "50", "--out", str(out)]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(cmd + TINY, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.time() + 120
    while not (out / "checkpoint.npz").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert (out / "checkpoint.npz").exists(), proc.communicate(timeout=60)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr
    assert "interrupted at step" in stderr and "continue with --resume" in stderr
    step = checkpoint.read_header(out / "checkpoint.npz")["meta"]["step"]
    assert f"interrupted at step {step}" in stderr and step >= 50
    assert "stopped" in stdout and "interrupted" in stdout  # the summary table
    assert load_run(out).state.step == step


def test_stacked_model_from_the_command_line(tmp_path, capsys):
    """--hidden 6,5 with dropout between layers and on h_{t-1}: the checkpoint holds the architecture,
    evaluate rebuilds it, and a resume with another one is refused naming the flag and both values."""
    out = tmp_path / "stack"
    flags = ["--task", "sine", "--hidden", "6,5", "--layer-dropout", "0.1", "--recurrent-dropout", "0.2"]
    assert main(["train", *flags, "--steps", "4", "--log-every", "2", "--out", str(out), "--no-sample"]) == 0
    cap = capsys.readouterr()
    assert "LSTM 6,5, layer dropout 0.1, recurrent dropout 0.2" in cap.err and "LSTM 6,5" in cap.out
    config = checkpoint.read_header(out / "checkpoint.npz")["config"]
    assert config["hidden"] == [6, 5] and config["recurrent_dropout"] == 0.2 and config["bidirectional"] is False
    run = load_run(out)
    assert [p.W.shape for (p,) in run.state.params["lstm"]] == [(6, 24), (5, 20)]
    assert main(["evaluate", "--checkpoint", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["step"] == 4
    before = _snapshot(out)
    for flag, value, saved in (("--hidden", "6", "6,5"), ("--recurrent-dropout", "0.3", "0.2")):
        assert main(["train", "--resume", "--out", str(out), "--steps", "6", flag, value]) == 2
        err = capsys.readouterr().err
        assert f"{flag} {value} (the checkpoint has {saved})" in err and len(err.strip().splitlines()) == 1
    assert _snapshot(out) == before
    assert main(["train", "--resume", "--out", str(out), "--steps", "6", "--hidden", "6,5", "--no-sample"]) == 0
    assert load_run(out).state.step == 6


@pytest.mark.parametrize("task", ["charlm", "sine"])
def test_bidirectional_next_step_prediction_is_refused(tmp_path, capsys, monkeypatch, task):
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--task", task, "--bidirectional"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert f"--bidirectional is refused for {task}: it predicts the next step" in err
    assert list(tmp_path.iterdir()) == []


def test_bidirectional_addition_and_its_checkpoint(tmp_path, capsys):
    out = tmp_path / "add"
    argv = ["train", "--task", "addition", "--bidirectional", "--hidden", "4,3", "--steps", "2", "--out", str(out)]
    assert main(argv) == 0
    capsys.readouterr()
    assert [len(layer) for layer in load_run(out).state.params["lstm"]] == [2, 2]
    assert main(["train", "--resume", "--out", str(out), "--steps", "3", "--no-bidirectional"]) == 2
    assert "--no-bidirectional (the checkpoint has --bidirectional)" in capsys.readouterr().err
    assert main(["evaluate", "--checkpoint", str(out)]) == 0


def _single_layer_layout(tree):
    """A train state as checkpoints held it when the model was one LSTMParams (no stack nesting)."""
    if isinstance(tree, dict):
        return {
            k: v[0][0] if k in ("lstm", "carry") and v is not None else _single_layer_layout(v) for k, v in tree.items()
        }
    if isinstance(tree, tuple) and hasattr(tree, "_fields"):
        return type(tree)(*(_single_layer_layout(x) for x in tree))
    if isinstance(tree, tuple):
        return tuple(_single_layer_layout(x) for x in tree)
    return tree


def test_single_layer_checkpoints_of_the_earlier_layout_still_load(charlm_run, tmp_path, capsys):
    out = _copy_run(charlm_run, tmp_path / "old")
    header, _ = checkpoint.load(out / "checkpoint.npz")
    run = load_run(out)
    old_config = {
        k: v for k, v in header["config"].items() if k not in ("bidirectional", "layer_dropout", "recurrent_dropout")
    }
    checkpoint.save(
        out / "checkpoint.npz", _single_layer_layout(run.state.arrays()), config=old_config, meta=header["meta"]
    )
    paths = [e["path"] for e in checkpoint.read_header(out / "checkpoint.npz")["leaves"]]
    assert "['params']['lstm'].W" in paths and "['carry'].h" in paths
    assert main(["evaluate", "--checkpoint", str(charlm_run), "--json"]) == 0
    expected = json.loads(capsys.readouterr().out)["val_bpc"]
    assert main(["evaluate", "--checkpoint", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["val_bpc"] == expected
    assert main(["sample", "--checkpoint", str(out), "--length", "20"]) == 0
    resume = ["train", "--resume", "--out", str(out), "--steps", "14", "--no-sample", "--no-bidirectional"]
    assert main([*resume, "--recurrent-dropout", "0"]) == 0  # the defaults of the fields it lacks
    assert load_run(out).state.step == 14


def test_lstm_family_from_the_command_line(tmp_path, capsys):
    """--proj-size, --peephole, --layer-norm: the checkpoint holds each variant's weights, evaluate rebuilds the
    model, a resume with another variant is refused naming the flag, and a projection as wide as the cell is
    refused before anything is written."""
    out = tmp_path / "family"
    flags = ["--task", "sine", "--hidden", "6,5", "--proj-size", "3", "--peephole", "--layer-norm"]
    assert main(["train", *flags, "--steps", "4", "--log-every", "2", "--out", str(out), "--no-sample"]) == 0
    assert "LSTM 6,5, projection 3, peepholes, layer norm" in capsys.readouterr().err
    config = checkpoint.read_header(out / "checkpoint.npz")["config"]
    assert (config["proj_size"], config["peephole"], config["layer_norm"]) == (3, True, True)
    stack = load_run(out).state.params["lstm"]
    assert [(p.W.shape, p.W_proj.shape, p.peephole.shape, p.norm.gamma_c.shape) for (p,) in stack] == [
        ((3, 24), (6, 3), (3, 6), (6,)),
        ((3, 20), (5, 3), (3, 5), (5,)),
    ]
    assert main(["evaluate", "--checkpoint", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["step"] == 4
    before = _snapshot(out)
    for flag, saved in (("--no-peephole", "--peephole"), ("--proj-size 2", "3"), ("--no-layer-norm", "--layer-norm")):
        assert main(["train", "--resume", "--out", str(out), "--steps", "6", *flag.split()]) == 2
        assert f"{flag} (the checkpoint has {saved})" in capsys.readouterr().err
    assert _snapshot(out) == before
    assert main(["train", "--resume", "--out", str(out), "--steps", "6", "--no-sample"]) == 0
    assert load_run(out).state.step == 6
    wide = tmp_path / "wide"
    assert main(["train", "--task", "sine", "--hidden", "6,5", "--proj-size", "5", "--out", str(wide)]) == 2
    assert "proj_size must be smaller than every hidden size (5 here), got 5" in capsys.readouterr().err
    assert not wide.exists()
