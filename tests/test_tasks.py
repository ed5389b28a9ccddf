"""The embedded tasks: data, splits, baselines, heads, losses; manual and autodiff task gradients agree."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_lstm import LSTMState, lstm, lstm_ref
from jax_lstm.tasks import TASKS, addition, charlm, get_task, sine
from jax_lstm.train import TrainConfig

TINY = {
    "charlm": dict(batch_size=4, seq_len=12, hidden=8, embed=6),
    "addition": dict(batch_size=8, hidden=6),
    "sine": dict(batch_size=4, seq_len=10, hidden=6),
}


def _cfg(name, dtype="float64", **kw):
    return TrainConfig(task=name, steps=10, dtype=dtype, **{**TINY[name], **kw}).resolved()


@pytest.fixture(scope="module")
def char_data():
    return charlm.TASK.setup(_cfg("charlm"))


def test_registry():
    assert set(TASKS) == {"charlm", "addition", "sine"}
    assert get_task("sine") is sine.TASK
    with pytest.raises(ValueError, match="unknown task 'nope'; choose one of addition, charlm, sine"):
        get_task("nope")


def test_charlm_corpus_and_split(char_data):
    text = charlm.corpus()
    from pydoc_data.topics import topics

    assert text == "".join(topics[k] for k in sorted(topics)) and len(text) > 100_000
    d = char_data
    assert d.vocab == "".join(sorted(set(text)))
    assert len(d.train) + len(d.val) == len(text) and 0.08 < len(d.val) / len(text) < 0.11
    B = charlm.BLOCK  # blocks 9, 19, ... are validation, in order; the others are training
    assert charlm.decode(d.val[:B], d.vocab) == text[9 * B : 10 * B]
    assert charlm.decode(d.val[B : 2 * B], d.vocab) == text[19 * B : 20 * B]
    assert charlm.decode(d.train[: 9 * B], d.vocab) == text[: 9 * B]
    assert charlm.decode(d.train[9 * B : 10 * B], d.vocab) == text[10 * B : 11 * B]
    again = charlm.TASK.setup(_cfg("charlm"))
    np.testing.assert_array_equal(again.val, d.val)
    np.testing.assert_array_equal(again.streams, d.streams)


def test_charlm_windows_continue_each_stream(char_data):
    cfg, d = _cfg("charlm"), char_data
    b0 = charlm.TASK.train_batch(d, cfg, 0, jax.random.PRNGKey(0))
    b1 = charlm.TASK.train_batch(d, cfg, 1, jax.random.PRNGKey(0))
    assert b0["x"].shape == b0["y"].shape == (4, 12) and b0["x"].dtype == np.int32
    np.testing.assert_array_equal(b0["y"][:, :-1], b0["x"][:, 1:])  # next-character targets
    np.testing.assert_array_equal(b1["x"][:, 0], b0["y"][:, -1])  # window 1 continues window 0
    assert b0["reset"].all() and not b1["reset"].any()
    wrap = charlm.TASK.train_batch(d, cfg, d.n_windows, jax.random.PRNGKey(0))  # the walk starts over: state reset
    assert wrap["reset"].all()
    np.testing.assert_array_equal(wrap["x"], b0["x"])


def test_charlm_unigram_baseline(char_data):
    d = char_data
    counts = np.bincount(d.train, minlength=len(d.vocab)) + 1.0
    p = counts / counts.sum()
    expected = -np.mean(np.log2(p[d.val[1:]]))
    assert charlm.TASK.baselines(d)["unigram"] == pytest.approx(expected, rel=1e-12)
    assert 3.0 < expected < math.log2(len(d.vocab))


def test_charlm_untrained_loss_near_uniform(char_data):
    cfg, d = _cfg("charlm"), char_data
    params = charlm.TASK.init_params(jax.random.PRNGKey(0), cfg, d)
    batch = charlm.TASK.train_batch(d, cfg, 0, jax.random.PRNGKey(0))
    z = jnp.ones((4, 8), jnp.float64)
    loss, aux = charlm.TASK.loss(params, {**batch, "carry": ((LSTMState(z, z),),)}, lstm)
    assert abs(float(loss) - math.log2(len(d.vocab))) < 1.0
    # reset=True: the carried state is ignored, so the loss equals the loss from a zero state
    loss0, _ = charlm.TASK.loss(params, {**batch, "carry": ((LSTMState(0 * z, 0 * z),),)}, lstm)
    assert float(loss) == float(loss0)
    assert aux["carry"][0][0].h.shape == (4, 8)


def test_charlm_sample(char_data):
    cfg, d = _cfg("charlm", dtype="float32"), char_data
    params = charlm.TASK.init_params(jax.random.PRNGKey(0), cfg, d)
    a = charlm.sample(params, d.vocab, "The ", 40, temperature=0.7, seed=3)
    assert len(a) == 40 and set(a) <= set(d.vocab)
    assert a == charlm.sample(params, d.vocab, "The ", 40, temperature=0.7, seed=3)
    assert a != charlm.sample(params, d.vocab, "The ", 40, temperature=0.7, seed=4)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        charlm.sample(params, d.vocab, "a", 5, temperature=0.0)
    with pytest.raises(ValueError, match="not in the model's vocabulary"):
        charlm.sample(params, d.vocab, "\x07", 5)


def test_addition_encoding_and_split():
    d = addition.TASK.setup(_cfg("addition"))
    assert len(d.val) == 1000 and len(d.train_pool) == 65536 - 1000
    assert not set(np.asarray(d.val).tolist()) & set(np.asarray(d.train_pool).tolist())
    pairs = jnp.asarray(np.arange(0, 65536, 37), jnp.int32)
    x, y = addition.encode(pairs, jnp.float32)
    a, b = np.asarray(pairs) // 256, np.asarray(pairs) % 256
    assert x.shape == (len(a), 9, 2) and y.shape == (len(a), 9)
    np.testing.assert_array_equal(addition.decode(y), a + b)
    np.testing.assert_array_equal(addition.decode(x[..., 0]), a)
    assert float(x[0, 8].sum()) == 0.0  # bit 8 of both inputs is 0
    x5, y5 = addition.encode(jnp.asarray([5 * 256 + 3], jnp.int32), jnp.float32)  # 5 + 3 = 8, LSB first
    np.testing.assert_array_equal(np.asarray(x5[0, :4, 0]), [1, 0, 1, 0])
    np.testing.assert_array_equal(np.asarray(y5[0, :5]), [0, 0, 0, 1, 0])
    batch = addition.TASK.train_batch(d, _cfg("addition"), 0, jax.random.PRNGKey(1))
    drawn = addition.decode(batch["x"][..., 0]) * 256 + addition.decode(batch["x"][..., 1])
    assert set(drawn.tolist()) <= set(np.asarray(d.train_pool).tolist())


def test_sine_series_and_baselines():
    cfg = _cfg("sine")
    d = sine.TASK.setup(cfg)
    assert d.val_x.shape == d.val_y.shape == (1000, 10, 2)
    np.testing.assert_array_equal(np.asarray(d.val_y[:, :-1]), np.asarray(d.val_x[:, 1:]))  # next values
    base = sine.TASK.baselines(d)
    assert base["predict_zero"] == pytest.approx(0.5 + sine.NOISE**2, rel=0.05)
    # last value: E[(x_{t+1} - x_t)^2] = mean over w of (1 - cos w) + 2 sigma^2, w ~ U(0.2, 1)
    w_avg = 1 - (math.sin(sine.W_MAX) - math.sin(sine.W_MIN)) / (sine.W_MAX - sine.W_MIN)
    assert base["predict_last"] == pytest.approx(w_avg + 2 * sine.NOISE**2, rel=0.05)
    b1 = sine.TASK.train_batch(d, cfg, 0, jax.random.PRNGKey(1))
    b2 = sine.TASK.train_batch(d, cfg, 0, jax.random.PRNGKey(2))
    assert b1["x"].shape == (4, 10, 2) and not np.allclose(b1["x"], b2["x"])


@pytest.mark.parametrize("name", sorted(TASKS))
def test_task_gradient_manual_equals_autodiff(name):
    """The task loss differentiated through lstm (hand-written BPTT) and lstm_ref (autodiff), float64."""
    cfg = _cfg(name)
    task = get_task(name)
    data = task.setup(cfg)
    params = task.init_params(jax.random.PRNGKey(0), cfg, data)
    params = jax.tree.map(lambda a: a + 0.3 * jax.random.normal(jax.random.PRNGKey(1), a.shape, a.dtype), params)
    batch = dict(task.train_batch(data, cfg, 1, jax.random.PRNGKey(2)))
    if task.carries_state:
        k1, k2 = jax.random.split(jax.random.PRNGKey(3))
        s = LSTMState(jax.random.normal(k1, (4, 8), jnp.float64), jax.random.normal(k2, (4, 8), jnp.float64))
        batch.update(carry=((s,),))
    (l_m, _), g_m = jax.jit(jax.value_and_grad(lambda p: task.loss(p, batch, lstm), has_aux=True))(params)
    (l_r, _), g_r = jax.jit(jax.value_and_grad(lambda p: task.loss(p, batch, lstm_ref), has_aux=True))(params)
    assert abs(float(l_m) - float(l_r)) <= 1e-12 * abs(float(l_r))
    for a, b in zip(jax.tree.leaves(g_m), jax.tree.leaves(g_r), strict=True):
        a, b = np.asarray(a), np.asarray(b)
        assert a.dtype == np.float64
        assert np.max(np.abs(a - b)) <= 1e-10 * max(np.max(np.abs(b)), 1e-30)


@pytest.mark.parametrize("name", sorted(TASKS))
def test_evaluator_reports_the_metric(name):
    cfg = _cfg(name, dtype="float32")
    task = get_task(name)
    data = task.setup(cfg)
    params = task.init_params(jax.random.PRNGKey(0), cfg, data)
    values = task.make_evaluator(data, cfg, lstm)(params)
    assert set(values) == {"val_loss", task.metric}
    assert all(math.isfinite(v) for v in values.values())
    if task.loss_is_metric:
        assert values["val_loss"] == values[task.metric]


STACKS = {
    "charlm": dict(hidden=(5, 4), layer_dropout=0.3, recurrent_dropout=0.25),
    "addition": dict(hidden=(5, 4), bidirectional=True, layer_dropout=0.3, recurrent_dropout=0.25),
    "sine": dict(hidden=(5, 4), layer_dropout=0.3, recurrent_dropout=0.25),
}


@pytest.mark.parametrize("name", sorted(TASKS))
def test_stacked_model_with_dropout_manual_equals_autodiff(name):
    """Two layers (bidirectional for addition), dropout between them and on h_{t-1}: lstm_stack with the
    hand-written BPTT and with autodiff give the same loss and gradients (float64, fixed dropout key)."""
    cfg = _cfg(name, **STACKS[name])
    task = get_task(name)
    data = task.setup(cfg)
    params = task.init_params(jax.random.PRNGKey(0), cfg, data)
    assert len(params["lstm"]) == 2 and len(params["lstm"][0]) == (2 if cfg.bidirectional else 1)
    assert params["head"]["w"].shape[0] == 4 * (2 if cfg.bidirectional else 1)
    batch = dict(task.train_batch(data, cfg, 1, jax.random.PRNGKey(2)))
    assert batch["key"].shape[0] == cfg.batch_size  # batch-major, so the batch can be split over devices
    if task.carries_state:
        batch["carry"] = jax.tree.map(lambda a: a + 0.5, train_zero_carry(cfg))
    grad = lambda fn, c: jax.jit(jax.value_and_grad(lambda p: task.loss(p, batch, fn, c)[0]))(params)  # noqa: E731
    (l_m, g_m), (l_r, g_r) = grad(lstm, cfg), grad(lstm_ref, cfg)
    assert abs(float(l_m) - float(l_r)) <= 1e-12 * abs(float(l_r))
    for a, b in zip(jax.tree.leaves(g_m), jax.tree.leaves(g_r), strict=True):
        assert np.max(np.abs(np.asarray(a) - np.asarray(b))) <= 1e-10 * max(np.max(np.abs(np.asarray(b))), 1e-30)
    no_dropout, _ = grad(lstm, None)  # without the config the stack runs without dropout
    assert float(no_dropout) != float(l_m)


def train_zero_carry(cfg):
    from jax_lstm.tasks.base import zero_carry

    return zero_carry(cfg, cfg.batch_size)


@pytest.mark.parametrize("name", ["charlm", "sine"])
def test_bidirectional_is_refused_for_next_step_prediction(name):
    assert get_task(name).causal
    with pytest.raises(ValueError, match=f"--bidirectional is refused for {name}: it predicts the next step"):
        _cfg(name, bidirectional=True)
    assert _cfg("addition", bidirectional=True).bidirectional  # addition's targets are not later inputs


def test_hidden_sizes_one_int_is_one_layer():
    assert _cfg("sine", hidden=[6]).hidden == 6 and _cfg("sine", hidden=[6, 5]).hidden == (6, 5)
    for bad in ((), (6, 0), 2.5):
        with pytest.raises(ValueError, match="hidden must be a positive integer or a tuple of them"):
            _cfg("sine", hidden=bad)


def test_charlm_samples_from_a_stack(char_data):
    cfg = _cfg("charlm", dtype="float32", hidden=(6, 5))
    params = charlm.TASK.init_params(jax.random.PRNGKey(0), cfg, char_data)
    text = charlm.sample(params, char_data.vocab, "The ", 30, temperature=0.7, seed=1)
    assert len(text) == 30 and set(text) <= set(char_data.vocab)
