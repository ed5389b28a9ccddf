"""Run directories: one writer at a time, nothing written on bad arguments, write failures and signals as
one line with the last checkpoint whole. Signals and a full disk are tried on real processes."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from jax_lstm import runs
from jax_lstm.cli import main
from jax_lstm.train import load_run

TINY = ["--batch-size", "4", "--seq-len", "10", "--hidden", "8", "--embed", "6", "--progress", "lines", "--no-sample"]
LONG = ["train", "--steps", "100000", "--log-every", "20", *TINY]


def _state(directory: Path) -> dict[str, tuple[bytes, int]]:
    """Every file under ``directory`` with its bytes and mtime."""
    return {
        str(p.relative_to(directory)): (p.read_bytes(), p.stat().st_mtime_ns)
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "run"
    assert main(["train", "--steps", "8", "--log-every", "4", "--out", str(out), *TINY]) == 0
    return out


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _start(args: list[str], **kw) -> subprocess.Popen:
    env = dict(os.environ, PYTHONUNBUFFERED="1", **kw.pop("env", {}))
    cmd = [sys.executable, "-m", "jax_lstm", *args]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, **kw)


def _wait_for(proc: subprocess.Popen, path: Path, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while not path.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.1)
    if not path.exists():
        proc.kill()
        raise AssertionError(proc.communicate(timeout=60))


def _one_line(stderr: str) -> str:
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.strip().splitlines() if line.startswith("jax-lstm")]
    assert len(lines) == 1, stderr
    return lines[0]


# --------------------------------------------------------------------------- one writer


def test_a_second_run_is_refused_sigterm_saves_and_a_dead_holders_lock_does_not_block(tmp_path, capsys):
    out = tmp_path / "run"
    first = _start([*LONG, "--out", str(out)])
    try:
        _wait_for(first, out / "checkpoint.npz")
        lock, config = (out / runs.LOCKNAME).read_text(), (out / "config.json").read_bytes()
        assert str(first.pid) in lock and "train" in lock
        for extra in (["--force"], ["--resume"]):
            assert main(["train", "--steps", "30", "--out", str(out), *TINY, *extra]) == 2
            err = capsys.readouterr().err.strip()
            assert len(err.splitlines()) == 1 and "is in use by another run" in err
            assert f"pid {first.pid}" in err and "jax-lstm train --steps 100000" in err
        assert (out / "config.json").read_bytes() == config
        first.send_signal(signal.SIGTERM)  # what schedulers and docker stop send: handled as Ctrl-C
        _, stderr = first.communicate(timeout=120)
    finally:
        with contextlib.suppress(ProcessLookupError):
            first.kill()
    assert first.returncode == 143, stderr
    step = load_run(out).state.step
    assert f"interrupted by SIGTERM at step {step}; checkpoint at step {step}" in _one_line(stderr)
    assert not (out / runs.LOCKNAME).exists()

    # a holder that dies without any clean-up (SIGKILL) leaves its lock file and a half-written checkpoint
    hold = "import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT); "
    hold += "fcntl.flock(fd, fcntl.LOCK_EX); os.write(fd, b'{\"pid\": 1}'); print(flush=True); time.sleep(600)"
    holder = subprocess.Popen([sys.executable, "-c", hold, str(out / runs.LOCKNAME)], stdout=subprocess.PIPE)
    holder.stdout.readline()
    assert main(["train", "--resume", "--out", str(out), "--steps", str(step + 2), *TINY]) == 2
    assert "in use by another run (pid 1 on" in capsys.readouterr().err
    (out / ".checkpoint.npz.x1y2.tmp").write_bytes(b"half a checkpoint")
    holder.kill()
    holder.wait(timeout=60)
    assert (out / runs.LOCKNAME).exists()  # left behind, but held by no one
    assert main(["train", "--resume", "--out", str(out), "--steps", str(step + 2), *TINY]) == 0
    assert load_run(out).state.step == step + 2
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.npz", "config.json", "curves.png", "metrics.jsonl"]


def test_lock_names_its_holder_and_is_released():
    lock_dir = Path(os.environ.get("TMPDIR", "/tmp")) / f"jax_lstm_lock_{os.getpid()}"
    try:
        a, b = runs.RunLock(lock_dir), runs.RunLock(lock_dir)
        a.acquire()
        with pytest.raises(runs.RunInUse, match=f"pid {os.getpid()} on "):
            b.acquire()
        a.release()
        b.acquire()  # the file a removed, or a fresh one: either way b holds the lock now
        b.release()
        assert not (lock_dir / runs.LOCKNAME).exists()
    finally:
        shutil.rmtree(lock_dir, ignore_errors=True)


# --------------------------------------------------------------------------- nothing written on bad arguments


@pytest.mark.parametrize(
    "flags, expect",
    [
        (["--devices", "64"], "devices must be between 1 and"),
        (["--warmup", "3000000000"], "argument --warmup: must be a non-negative integer of at most 2147483647"),
        (["--warmup", "3e9"], "argument --warmup: must be a non-negative integer, got '3e9'"),
        (["--seed", str(2**64)], "argument --seed: must be a non-negative integer of at most 9223372036854775807"),
        (["--seed", "1e20"], "argument --seed: must be a non-negative integer, got '1e20'"),
        (["--steps", str(2**31)], "argument --steps: must be a positive integer of at most"),
        (["--hidden", "8,3000000000"], "argument --hidden: must be a positive integer of at most"),
        (["--time-limit", "inf"], "argument --time-limit: must be a non-negative number"),
    ],
)
def test_bad_arguments_leave_an_existing_run_untouched(finished_run, tmp_path, capsys, flags, expect):
    out = _copy(finished_run, tmp_path / "run")
    before = _state(out)
    for how in (["--force"], ["--resume"]):
        assert main(["train", "--steps", "8", "--out", str(out), *TINY, *how, *flags]) == 2
        err = capsys.readouterr().err
        assert expect in err and "Traceback" not in err
        assert _state(out) == before


def test_a_batch_that_does_not_divide_over_the_devices_writes_nothing(finished_run, tmp_path):
    out = _copy(finished_run, tmp_path / "run")
    before = _state(out)
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    args = ["train", "--out", str(out), "--force", "--devices", "2", *TINY[:-1], "--batch-size", "3"]
    proc = _start(args, env=env)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 2
    assert "batch_size 3 does not divide over 2 devices" in _one_line(stderr)
    assert _state(out) == before


@pytest.mark.parametrize(
    "argv",
    [
        ["sample", "--seed", str(2**64)],
        ["sample", "--seed", "1e20"],
        ["sample", "--length", str(2**40)],
        ["gradcheck", "--seed", "1e20"],
        ["gradcheck", "--seed", str(2**64)],
        ["bench", "--reps", "-2"],
        ["bench", "--reps", "0"],
        ["bench", "--unroll-tol", "nan"],
        ["bench", "--peak", "-5"],
        ["bench", "--peak", "nan"],
        ["bench", "--seconds", "0"],
        ["bench", "--warmup", "-1"],
    ],
)
def test_numeric_flags_have_ranges(argv, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    try:
        code = main(argv)
    except SystemExit as e:  # bench and gradcheck exit through argparse
        code = e.code
    assert code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and f"argument {argv[1]}: must be" in err.strip().splitlines()[-1]
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- failures to write


def test_out_below_a_regular_file_is_one_line_and_exit_1(tmp_path, capsys):
    (tmp_path / "file").write_text("not a directory")
    assert main(["train", "--steps", "2", "--out", str(tmp_path / "file" / "run"), *TINY]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"cannot write {tmp_path / 'file' / 'run'}" in err
    assert "no checkpoint was written" in err


def test_metrics_below_a_regular_file_keeps_the_checkpoint(finished_run, tmp_path, capsys):
    out = _copy(finished_run, tmp_path / "run")
    (tmp_path / "file").write_text("not a directory")
    before = (out / "checkpoint.npz").read_bytes()
    metrics = tmp_path / "file" / "m.jsonl"
    assert main(["train", "--resume", "--out", str(out), "--steps", "10", "--metrics", str(metrics)]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"cannot write {metrics}" in err
    assert f"the checkpoint of step 8 is kept in {out / 'checkpoint.npz'}" in err
    assert (out / "checkpoint.npz").read_bytes() == before
    assert not (out / runs.LOCKNAME).exists()


def _mount(*args: str) -> bool:
    if sys.platform != "linux" or shutil.which("mount") is None:
        return False
    return subprocess.run(["mount", *args], capture_output=True).returncode == 0


@contextlib.contextmanager
def _tmpfs(path: Path, size: str):
    """A small tmpfs at ``path`` (the test runs as root, for whom permissions do not stop a write)."""
    path.mkdir()
    if not _mount("-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)):
        pytest.skip("cannot mount a tmpfs here")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def test_read_only_out_is_one_line_and_keeps_the_checkpoint(finished_run, tmp_path, capsys):
    with _tmpfs(tmp_path / "mnt", "1m") as mnt:
        out = _copy(finished_run, mnt / "run")
        if not _mount("-o", "remount,ro", str(mnt)):
            pytest.skip("cannot remount the tmpfs read-only")
        before = _state(out)
        assert main(["train", "--resume", "--out", str(out), "--steps", "10", *TINY]) == 1
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and f"cannot write {out / runs.LOCKNAME}: Read-only file system" in err
        assert f"the checkpoint {out / 'checkpoint.npz'} is kept unchanged" in err
        assert _state(out) == before


def test_full_disk_is_one_line_and_keeps_the_last_checkpoint(finished_run, tmp_path):
    """A real process on a tmpfs with a few KiB left: config.json and the metrics fit, the checkpoint does not."""
    with _tmpfs(tmp_path / "mnt", "512k") as mnt:
        out = _copy(finished_run, mnt / "run")
        before = (out / "checkpoint.npz").read_bytes()
        assert len(before) > 12 * 1024
        st = os.statvfs(mnt)
        (mnt / "filler").write_bytes(b"\0" * (st.f_bavail * st.f_frsize - 12 * 1024))
        proc = _start(["train", "--resume", "--out", str(out), "--steps", "12", "--log-every", "2", *TINY])
        _, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 1, stderr
        line = _one_line(stderr)
        assert f"cannot write {out / 'checkpoint.npz'}: No space left on device" in line
        assert f"the checkpoint of step 8 is kept in {out / 'checkpoint.npz'}" in line
        assert (out / "checkpoint.npz").read_bytes() == before
        assert not list(out.glob(".*.tmp")) and not (out / runs.LOCKNAME).exists()


# --------------------------------------------------------------------------- signals


def test_ctrl_c_twice_in_a_real_process_keeps_a_whole_checkpoint(tmp_path):
    out = tmp_path / "run"
    proc = _start([*LONG, "--out", str(out)])
    _wait_for(proc, out / "checkpoint.npz")
    proc.send_signal(signal.SIGINT)
    time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr and "Exception ignored" not in stderr, stderr
    step = load_run(out).state.step  # whole, whichever write it came from
    said = (  # the second came during the step (stop at once), or during the final write (held off)
        f"SIGINT again: stopped at once; the checkpoint of step {step} is kept in",
        f"interrupted at step {step}; checkpoint at step {step}",
    )
    assert step >= 20 and any(s in stderr for s in said), stderr


def _catches(pid: int, signum: int) -> bool:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) >> (signum - 1) & 1)
    return False


def test_ctrl_c_during_start_up_writes_nothing(tmp_path):
    if not Path("/proc/self/status").exists():
        pytest.skip("needs /proc to see when the command has started")
    out = tmp_path / "run"
    proc = _start([*LONG, "--out", str(out)])
    deadline = time.time() + 120
    while proc.poll() is None and not _catches(proc.pid, signal.SIGTERM) and time.time() < deadline:
        time.sleep(0.005)  # the command installs its handlers first: it is starting up
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "interrupted during start-up" in _one_line(stderr)
    assert not out.exists()


def test_a_second_signal_waits_for_a_checkpoint_write_and_is_dropped_in_the_final_one():
    stopped = []
    with runs.Interrupts(hard_stop=stopped.append) as interrupts:
        os.kill(os.getpid(), signal.SIGINT)
        assert interrupts.requested == signal.SIGINT and interrupts.name == "SIGINT" and stopped == []
        with pytest.raises(KeyboardInterrupt):
            with interrupts.critical():
                os.kill(os.getpid(), signal.SIGINT)
                assert stopped == []  # held until the write is over
        assert stopped == [signal.SIGINT]
        stopped.clear()
        with interrupts.critical(final=True):
            os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)
        assert stopped == []  # the run is ending: nothing to stop any more
