"""Flax NNX: features -> jax_lstm.nnx.LSTM -> nnx.Linear, trained with optax on next-step sine prediction.

The data is the ``sine`` task of jax_lstm (``jax_lstm.tasks.sine``): two noisy channels
sin(wt + phi), cos(wt + phi); the model reads the values at t and predicts those at t + 1.
The noise (sigma = 0.1) cannot be predicted, so the best validation MSE is about 0.01.

    python examples/nnx_sine.py --steps 1000

The swap from Flax's own LSTM is one line: ``nnx.RNN(nnx.OptimizedLSTMCell(2, hidden, rngs=rngs))``
becomes ``LSTM(2, hidden, rngs=rngs)``; inputs stay batch-major (B, T, D).
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jax_lstm.nnx import LSTM
from jax_lstm.tasks.sine import VAL_KEY, make_series


class Model(nnx.Module):
    def __init__(self, hidden: int, *, rngs: nnx.Rngs):
        self.lstm = LSTM(2, hidden, rngs=rngs)  # was: nnx.RNN(nnx.OptimizedLSTMCell(2, hidden, rngs=rngs))
        self.head = nnx.Linear(hidden, 2, rngs=rngs)

    def __call__(self, x):  # x: (B, T, 2) -> (B, T, 2)
        return self.head(self.lstm(x))


def main(argv=None) -> float:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=1000, help="training steps (default 1000)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=50)
    ap.add_argument("--hidden", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    model = Model(args.hidden, rngs=nnx.Rngs(args.seed))
    schedule = optax.cosine_decay_schedule(args.lr, max(args.steps, 1))
    optimizer = nnx.Optimizer(model, optax.chain(optax.clip_by_global_norm(1.0), optax.adam(schedule)), wrt=nnx.Param)

    @nnx.jit
    def train_step(model, optimizer, key):
        x, y = make_series(key, args.batch, args.seq_len, jnp.float32)
        loss, grads = nnx.value_and_grad(lambda m: jnp.mean((m(x) - y) ** 2))(model)
        optimizer.update(model, grads)
        return loss

    @nnx.jit
    def mse(model, x, y):
        return jnp.mean((model(x) - y) ** 2)

    val_x, val_y = make_series(jax.random.PRNGKey(VAL_KEY), 500, args.seq_len, jnp.float32)
    key = jax.random.PRNGKey(args.seed + 1)
    for step in range(1, args.steps + 1):
        key, batch_key = jax.random.split(key)
        loss = train_step(model, optimizer, batch_key)
        if step % max(args.steps // 5, 1) == 0:
            print(f"step {step:5d}  train loss {float(loss):.4f}")
    model.eval()
    val_mse = float(mse(model, val_x, val_y))
    print(
        f"baselines: predict zero {float(jnp.mean(val_y**2)):.4f}, predict last value "
        f"{float(jnp.mean((val_y - val_x) ** 2)):.4f}, noise floor 0.0100"
    )
    print(f"val_mse = {val_mse:.4f}")
    return val_mse


if __name__ == "__main__":
    main()
