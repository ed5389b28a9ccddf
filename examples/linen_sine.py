"""Flax Linen: features -> jax_lstm.linen.LSTM -> nn.Dense, trained with optax on next-step sine prediction.

The data is the ``sine`` task of jax_lstm (``jax_lstm.tasks.sine``): two noisy channels
sin(wt + phi), cos(wt + phi); the model reads the values at t and predicts those at t + 1.
The noise (sigma = 0.1) cannot be predicted, so the best validation MSE is about 0.01.

    python examples/linen_sine.py --steps 1000

The swap from Flax's own LSTM is one line: ``nn.RNN(nn.OptimizedLSTMCell(hidden))`` becomes
``LSTM(hidden)``; inputs stay batch-major (B, T, D).
"""

from __future__ import annotations

import argparse

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from jax_lstm.linen import LSTM
from jax_lstm.tasks.sine import VAL_KEY, make_series


class Model(nn.Module):
    hidden: int

    @nn.compact
    def __call__(self, x):  # x: (B, T, 2) -> (B, T, 2)
        h = LSTM(self.hidden)(x)  # was: nn.RNN(nn.OptimizedLSTMCell(self.hidden))(x)
        return nn.Dense(2)(h)


def main(argv=None) -> float:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=1000, help="training steps (default 1000)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=50)
    ap.add_argument("--hidden", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    model = Model(args.hidden)
    params = model.init(jax.random.PRNGKey(args.seed), jnp.zeros((1, args.seq_len, 2)))["params"]
    schedule = optax.cosine_decay_schedule(args.lr, max(args.steps, 1))
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(schedule))
    opt_state = tx.init(params)

    def mse(params, x, y):
        return jnp.mean((model.apply({"params": params}, x) - y) ** 2)

    @jax.jit
    def train_step(params, opt_state, key):
        x, y = make_series(key, args.batch, args.seq_len, jnp.float32)
        loss, grads = jax.value_and_grad(mse)(params, x, y)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    val_x, val_y = make_series(jax.random.PRNGKey(VAL_KEY), 500, args.seq_len, jnp.float32)
    key = jax.random.PRNGKey(args.seed + 1)
    for step in range(1, args.steps + 1):
        key, batch_key = jax.random.split(key)
        params, opt_state, loss = train_step(params, opt_state, batch_key)
        if step % max(args.steps // 5, 1) == 0:
            print(f"step {step:5d}  train loss {float(loss):.4f}")
    val_mse = float(jax.jit(mse)(params, val_x, val_y))
    print(
        f"baselines: predict zero {float(jnp.mean(val_y**2)):.4f}, predict last value "
        f"{float(jnp.mean((val_y - val_x) ** 2)):.4f}, noise floor 0.0100"
    )
    print(f"val_mse = {val_mse:.4f}")
    return val_mse


if __name__ == "__main__":
    main()
