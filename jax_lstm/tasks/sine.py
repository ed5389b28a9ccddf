"""``sine``: predict the next values of a noisy sine/cosine series.

Each sequence has two channels, ``sin(w t + phi)`` and ``cos(w t + phi)``,
with a random frequency ``w ~ U(0.2, 1.0)`` radians per step and a random
phase ``phi ~ U(0, 2 pi)``, plus Gaussian noise of standard deviation 0.1 on
every value. At step t the LSTM reads the (noisy) values at t and predicts
those at t + 1; the head is a dense layer (H -> 2). The noise at t + 1 cannot
be predicted, so the best achievable MSE is about 0.01.

Metric: mean squared error on 1000 validation sequences drawn with a fixed
key, beside two baselines: predicting zero and predicting the last value.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp

from jax_lstm.tasks.base import Task, dense, init_model, run_stack, stack_key

__all__ = ["Sine", "TASK", "make_series", "SineData"]

W_MIN, W_MAX = 0.2, 1.0
NOISE = 0.1
N_VAL = 1000
VAL_KEY = 7919  # the validation series are the same for every seed


def make_series(key: jax.Array, n: int, T: int, dtype) -> tuple[jax.Array, jax.Array]:
    """n noisy series: inputs (n, T, 2) and next-step targets (n, T, 2)."""
    k_w, k_phi, k_noise = jax.random.split(key, 3)
    w = jax.random.uniform(k_w, (n, 1), dtype, W_MIN, W_MAX)
    phi = jax.random.uniform(k_phi, (n, 1), dtype, 0.0, 2 * jnp.pi)
    angle = w * jnp.arange(T + 1, dtype=dtype)[None, :] + phi  # (n, T + 1)
    clean = jnp.stack([jnp.sin(angle), jnp.cos(angle)], axis=-1)
    noisy = clean + NOISE * jax.random.normal(k_noise, clean.shape, dtype)
    return noisy[:, :-1], noisy[:, 1:]


_make_series = jax.jit(make_series, static_argnums=(1, 2, 3))


@dataclass(frozen=True)
class SineData:
    val_x: jax.Array  # (1000, T, 2)
    val_y: jax.Array  # (1000, T, 2)


class Sine(Task):
    name = "sine"
    metric = "val_mse"
    metric_label = "MSE"
    higher_is_better = False
    carries_state = False
    loss_is_metric = True
    causal = True  # next-step prediction
    defaults = {
        "steps": 3000,
        "batch_size": 32,
        "seq_len": 50,
        "hidden": 32,
        "embed": 0,
        "lr": 5e-3,
        "schedule": "cosine",
        "warmup": 50,
        "clip": 1.0,
    }

    def setup(self, config, info=None) -> SineData:
        x, y = _make_series(jax.random.PRNGKey(VAL_KEY), N_VAL, int(config.seq_len), jnp.dtype(config.dtype))
        return SineData(x, y)

    def init_params(self, key, config, data) -> dict:
        return init_model(key, 2, 2, config)

    def train_batch(self, data, config, step: int, key) -> dict:
        B = int(config.batch_size)
        x, y = _make_series(key, B, int(config.seq_len), jnp.dtype(config.dtype))
        return {"x": x, "y": y, **stack_key(key, config, B)}

    def predict(self, params, x, lstm_fn, config=None, key=None) -> jax.Array:
        """x: (B, T, 2) -> predictions (B, T, 2) of the next values (dropout with ``config`` and ``key``)."""
        hs, _ = run_stack(lstm_fn, params["lstm"], x, config=config, key=key)
        return jnp.swapaxes(dense(params["head"], hs), 0, 1)

    def loss(self, params, batch, lstm_fn, config=None):
        pred = self.predict(params, batch["x"], lstm_fn, config, batch.get("key"))
        return jnp.mean((pred - batch["y"]) ** 2), {}

    def make_evaluator(self, data: SineData, config, lstm_fn):
        @jax.jit
        def run(params, x, y):
            return jnp.mean((self.predict(params, x, lstm_fn) - y) ** 2)

        def evaluate(params) -> dict[str, float]:
            v = float(run(params, data.val_x, data.val_y))
            return {"val_loss": v, self.metric: v}

        return evaluate

    def baselines(self, data: SineData) -> dict[str, float]:
        return {
            "predict_zero": float(jnp.mean(data.val_y**2)),
            "predict_last": float(jnp.mean((data.val_y - data.val_x) ** 2)),
        }


TASK = Sine()
