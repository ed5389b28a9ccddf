"""The training loop: addition is learnt, resume is exact, Ctrl-C and NaN are handled, manual == autodiff."""

from __future__ import annotations

import dataclasses
import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jax_lstm import checkpoint, lstm, parallel
from jax_lstm.tasks import get_task
from jax_lstm.train import TrainConfig, init_state, load_run, make_optimizer, make_train_step, train

TINY_CHARLM = dict(task="charlm", batch_size=4, seq_len=10, hidden=8, embed=6, lr=1e-2, warmup=3)


def _leaves(state):
    return [np.asarray(a) for a in jax.tree.leaves(state.arrays())]


def _assert_bitwise(a, b):
    la, lb = _leaves(a), _leaves(b)
    assert len(la) == len(lb)
    for x, y in zip(la, lb, strict=True):
        assert x.dtype == y.dtype and x.shape == y.shape
        assert np.array_equal(x, y), f"max difference {np.max(np.abs(x.astype(float) - y.astype(float)))}"


def test_addition_reaches_full_accuracy_on_held_out_pairs():
    """The default addition run (600 steps, float32, hand-written BPTT) gets all 1000 held-out sums right."""
    result = train(TrainConfig(task="addition", seed=0), progress="none")
    assert result.stop == "done" and result.state.step == 600
    assert result.records[-1]["val_accuracy"] == 1.0
    assert result.records[0]["val_accuracy"] < 0.5  # it had to learn it
    task = get_task("addition")
    a, b = np.array([255, 0, 200, 31]), np.array([255, 0, 99, 64])
    np.testing.assert_array_equal(task.predict(result.state.params, a, b, lstm), a + b)


@pytest.mark.parametrize("name", ["charlm", "addition", "sine"])
def test_manual_and_autodiff_give_the_same_loss_curve(name):
    """float64, the first 20 steps: the loss curves agree to 1e-9 (relative)."""
    kw = TINY_CHARLM if name == "charlm" else dict(task=name, batch_size=8, hidden=6)
    if name == "sine":
        kw["seq_len"] = 12
    curves = {}
    for grad in ("manual", "autodiff"):
        cfg = TrainConfig(**kw, steps=20, dtype="float64", grad=grad, log_every=20)
        curves[grad] = np.array(train(cfg, progress="none").losses)
    assert curves["manual"].shape == (20,)
    assert curves["manual"][-1] < curves["manual"][0]  # it trains
    np.testing.assert_allclose(curves["manual"], curves["autodiff"], rtol=1e-9, atol=0)


def test_resume_after_ctrl_c_is_bitwise_identical(tmp_path, monkeypatch):
    """charlm (carried LSTM state, cosine schedule): Ctrl-C in step 5 + resume to 10 == 10 steps at once."""
    cfg = TrainConfig(**TINY_CHARLM, steps=10, log_every=2)
    full = train(cfg, out_dir=tmp_path / "full", progress="none")

    task = get_task("charlm")
    original = task.train_batch

    def batch_then_ctrl_c(data, config, step, key):
        if step == 4:  # while the 5th step is being prepared: between two log steps
            os.kill(os.getpid(), signal.SIGINT)  # what Ctrl-C does; the loop finishes the step and saves
        return original(data, config, step, key)

    monkeypatch.setattr(task, "train_batch", batch_then_ctrl_c)
    part = train(cfg, out_dir=tmp_path / "part", progress="none")
    monkeypatch.undo()
    assert part.stop == "interrupted" and part.state.step == 5
    assert checkpoint.read_header(tmp_path / "part" / "checkpoint.npz")["meta"]["step"] == 5
    assert "continue with --resume" in part.message
    resumed = train(TrainConfig(steps=10), out_dir=tmp_path / "part", resume=True, progress="none")
    assert resumed.state.step == 10 and resumed.config == full.config
    _assert_bitwise(resumed.state, full.state)
    assert resumed.state.carry is not None
    # the metrics file holds each logged step once, as the uninterrupted run's
    steps = [r["step"] for r in resumed.records]
    assert steps == [r["step"] for r in full.records] == [2, 4, 6, 8, 10]


def test_stop_and_resume_with_more_steps_is_bitwise_identical(tmp_path):
    """addition (random batches from the saved PRNG key): 7 steps, then resume to 15 == 15 steps."""
    kw = dict(task="addition", batch_size=8, hidden=6, log_every=5)
    full = train(TrainConfig(**kw, steps=15), progress="none")
    first = train(TrainConfig(**kw, steps=7), out_dir=tmp_path, progress="none")
    assert first.state.step == 7
    resumed = train(TrainConfig(steps=15), resume=tmp_path / "checkpoint.npz", progress="none")
    _assert_bitwise(resumed.state, full.state)
    np.testing.assert_array_equal(first.losses + resumed.losses, full.losses)


def test_nan_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    task = get_task("sine")
    original = task.train_batch

    def poisoned_from_step_5(data, config, step, key):
        batch = original(data, config, step, key)
        return {**batch, "x": batch["x"] * jnp.inf} if step >= 4 else batch

    monkeypatch.setattr(task, "train_batch", poisoned_from_step_5)
    saved = {}

    def remember_checkpoint(record, state):
        saved[record["step"]] = (tmp_path / "checkpoint.npz").read_bytes()

    cfg = TrainConfig(task="sine", batch_size=4, seq_len=6, hidden=4, steps=50, log_every=2)
    result = train(cfg, out_dir=tmp_path, progress="none", callbacks=[remember_checkpoint])
    assert result.stop == "nan" and result.state.step == 5
    assert "the loss became nan" in result.message and "at step 5" in result.message
    assert f"the last good checkpoint (step 4) is kept in {tmp_path / 'checkpoint.npz'}" in result.message
    assert (tmp_path / "checkpoint.npz").read_bytes() == saved[4]
    run = load_run(tmp_path)
    assert run.state.step == 4
    assert all(np.isfinite(np.asarray(a)).all() for a in jax.tree.leaves(run.state.params))


def test_diverging_run_stops_before_saving_bad_params(tmp_path):
    """A learning rate of 1e30 blows the model up at once: the run stops and writes no checkpoint."""
    cfg = TrainConfig(
        task="sine",
        batch_size=4,
        seq_len=6,
        hidden=4,
        steps=50,
        lr=1e30,
        clip=0.0,
        log_every=1,
        schedule="constant",
        warmup=0,
    )
    result = train(cfg, out_dir=tmp_path, progress="none")
    assert result.stop == "nan" and result.state.step < 50
    assert "no checkpoint had been written yet" in result.message
    assert "became inf" in result.message or "became nan" in result.message
    assert not (tmp_path / "checkpoint.npz").exists()


def test_callbacks_run_at_each_log_step_and_can_stop(tmp_path):
    seen = []

    def cb(record, state):
        seen.append((record["step"], state.step, sorted(record)))
        return record["step"] >= 6

    result = train(
        TrainConfig(task="sine", batch_size=4, seq_len=6, hidden=4, steps=20, log_every=3),
        out_dir=tmp_path,
        callbacks=[cb],
        progress="none",
    )
    assert [s for s, _, _ in seen] == [3, 6] and all(a == b for a, b, _ in seen)
    assert {"step", "loss", "val_loss", "val_mse", "lr", "grad_norm", "elapsed"} <= set(seen[0][2])
    assert result.stop == "callback" and result.state.step == 6
    assert checkpoint.read_header(tmp_path / "checkpoint.npz")["meta"]["step"] == 6


def test_train_step_is_pure_and_shards_over_a_mesh():
    """The same step function under plain jit and under parallel.data_parallel (1 device) agrees."""
    cfg = TrainConfig(task="addition", batch_size=8, hidden=6, steps=3, dtype="float64").resolved()
    task = get_task("addition")
    data = task.setup(cfg)
    opt, _ = make_optimizer(cfg)
    step = make_train_step(task, opt)
    batch = task.train_batch(data, cfg, 0, jax.random.PRNGKey(5))
    assert all(a.shape[0] == 8 for a in jax.tree.leaves(batch))  # batch-major
    results = []
    mesh = parallel.make_mesh(1)
    for run in (jax.jit(step), parallel.data_parallel(step, mesh)):
        st = init_state(task, cfg, data, opt)
        p, s = st.params, st.opt_state
        for _ in range(3):
            p, s, m = run(p, s, batch)
        results.append((p, float(m["loss"])))
    assert results[0][1] == pytest.approx(results[1][1], rel=1e-12)
    for a, b in zip(jax.tree.leaves(results[0][0]), jax.tree.leaves(results[1][0]), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-12, atol=1e-14)


def test_optimizer_schedule_and_clipping():
    cfg = TrainConfig(task="sine", steps=100, lr=0.1, warmup=10, schedule="cosine").resolved()
    opt, lr_at = make_optimizer(cfg)
    assert lr_at(0) == 0.0 and lr_at(10) == pytest.approx(0.1) and lr_at(100) == pytest.approx(0.01)
    params = {"w": jnp.zeros(3, jnp.float32)}
    state = opt.init(params)
    updates, _ = opt.update({"w": jnp.array([3e6, 4e6, 0.0], jnp.float32)}, state, params)
    assert np.all(np.isfinite(np.asarray(updates["w"])))
    clip = optax.clip_by_global_norm(1.0)
    g, _ = clip.update({"w": jnp.array([3.0, 4.0])}, clip.init(None))
    assert float(optax.tree.norm(g)) == pytest.approx(1.0)


def test_float32_run_keeps_float32_under_x64(tmp_path):
    result = train(TrainConfig(task="sine", batch_size=4, seq_len=6, hidden=4, steps=3), progress="none")
    assert {np.asarray(a).dtype for a in jax.tree.leaves(result.state.params)} == {np.dtype("float32")}


def test_progress_bar_rewrites_one_line_on_a_terminal():
    import io

    from jax_lstm.reporting import Progress

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    out = Terminal()
    bar = Progress(total=10, start=0, metric="val_bpc", stream=out)
    for step in range(1, 11):
        bar.update(step, 2.0 / step, 1.5 if step >= 5 else None, logged=step % 5 == 0)
    bar.close()
    text = out.getvalue()
    assert bar.mode == "bar" and text.count("\n") == 1 and text.endswith("\n")
    last = text.rstrip("\n").split("\r")[-1]
    assert last.startswith("10/10 [####################] 100% | loss 0.2000 | val_bpc 1.5000 |")
    assert "steps/s | ETA 0:00" in last
    assert Progress(10, 0, "m", stream=io.StringIO()).mode == "lines"  # not a terminal: one line per log step


def test_nan_between_log_steps_keeps_the_last_good_state(tmp_path, monkeypatch):
    """The loop reads the losses only at log steps: a NaN at step 7 is found at step 10, yet the run reports
    step 7 and its params are those of step 6 (every step after the bad one kept the state it was given)."""
    task = get_task("sine")
    original = task.train_batch
    monkeypatch.setattr(
        task,
        "train_batch",
        lambda data, config, step, key: {
            **original(data, config, step, key),
            "x": original(data, config, step, key)["x"] * (jnp.nan if step == 6 else 1.0),
        },
    )
    cfg = TrainConfig(task="sine", batch_size=4, seq_len=6, hidden=4, steps=50, log_every=5)
    result = train(cfg, out_dir=tmp_path, progress="none")
    six = train(dataclasses.replace(cfg, steps=6), progress="none")
    assert result.stop == "nan" and result.state.step == 7 and "at step 7" in result.message
    assert "the last good checkpoint (step 5)" in result.message
    assert len(result.losses) == 6
    for a, b in zip(jax.tree.leaves(result.state.params), jax.tree.leaves(six.state.params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert load_run(tmp_path).state.step == 5


def test_loop_reads_the_device_only_at_log_steps(monkeypatch):
    """20 steps with a log every 10: two transfers of the step losses, not one per step."""
    calls = []
    device_get = jax.device_get
    monkeypatch.setattr(jax, "device_get", lambda x: calls.append(1) or device_get(x))
    result = train(TrainConfig(task="sine", batch_size=4, seq_len=6, hidden=4, steps=20, log_every=10), progress="none")
    assert result.state.step == 20 and len(result.losses) == 20
    assert len(calls) == 2


def test_train_step_keeps_its_inputs_when_the_loss_is_not_finite():
    cfg = TrainConfig(task="sine", batch_size=4, seq_len=6, hidden=4, steps=3).resolved()
    task = get_task("sine")
    data = task.setup(cfg)
    opt, _ = make_optimizer(cfg)
    step = jax.jit(make_train_step(task, opt))
    st = init_state(task, cfg, data, opt)
    batch = task.train_batch(data, cfg, 0, jax.random.PRNGKey(0))
    for b, healthy, ok in (
        (batch, True, True),
        ({**batch, "x": batch["x"] * jnp.inf}, True, False),
        (batch, False, False),
    ):
        p, s, m = step(st.params, st.opt_state, b, jnp.asarray(healthy))
        assert bool(m["ok"]) == ok
        same = [
            np.array_equal(np.asarray(x), np.asarray(y))
            for x, y in zip(jax.tree.leaves((p, s)), jax.tree.leaves((st.params, st.opt_state)), strict=True)
        ]
        assert all(same) != ok
