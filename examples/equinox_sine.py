"""Equinox: features -> jax_lstm.eqx.LSTM -> eqx.nn.Linear per example, batched with jax.vmap, trained with optax.

The data is the ``sine`` task of jax_lstm (``jax_lstm.tasks.sine``): two noisy channels
sin(wt + phi), cos(wt + phi); the model reads the values at t and predicts those at t + 1.
The noise (sigma = 0.1) cannot be predicted, so the best validation MSE is about 0.01.

    python examples/equinox_sine.py --steps 1000

The swap from Equinox's own LSTM: a ``lax.scan`` over ``eqx.nn.LSTMCell`` becomes one call
of ``LSTM`` on the example's (T, D) inputs; ``jax.vmap(model)`` batches it as before.
"""

from __future__ import annotations

import argparse

import equinox as eqx
import jax
import jax.numpy as jnp
import optax

from jax_lstm.eqx import LSTM
from jax_lstm.tasks.sine import VAL_KEY, make_series


class Model(eqx.Module):
    lstm: LSTM
    head: eqx.nn.Linear

    def __init__(self, hidden: int, *, key):
        k_lstm, k_head = jax.random.split(key)
        self.lstm = LSTM(2, hidden, key=k_lstm)  # was: eqx.nn.LSTMCell(2, hidden, key=k_lstm) and a lax.scan
        self.head = eqx.nn.Linear(hidden, 2, key=k_head)

    def __call__(self, x):  # one example, x: (T, 2) -> (T, 2)
        hs, _ = self.lstm(x)
        return jax.vmap(self.head)(hs)


def main(argv=None) -> float:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=1000, help="training steps (default 1000)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=50)
    ap.add_argument("--hidden", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    model = Model(args.hidden, key=jax.random.PRNGKey(args.seed))
    schedule = optax.cosine_decay_schedule(args.lr, max(args.steps, 1))
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(schedule))
    opt_state = tx.init(eqx.filter(model, eqx.is_array))

    def mse(model, x, y):
        return jnp.mean((jax.vmap(model)(x) - y) ** 2)

    @eqx.filter_jit
    def train_step(model, opt_state, key):
        x, y = make_series(key, args.batch, args.seq_len, jnp.float32)
        loss, grads = eqx.filter_value_and_grad(mse)(model, x, y)
        updates, opt_state = tx.update(grads, opt_state, eqx.filter(model, eqx.is_array))
        return eqx.apply_updates(model, updates), opt_state, loss

    val_x, val_y = make_series(jax.random.PRNGKey(VAL_KEY), 500, args.seq_len, jnp.float32)
    key = jax.random.PRNGKey(args.seed + 1)
    for step in range(1, args.steps + 1):
        key, batch_key = jax.random.split(key)
        model, opt_state, loss = train_step(model, opt_state, batch_key)
        if step % max(args.steps // 5, 1) == 0:
            print(f"step {step:5d}  train loss {float(loss):.4f}")
    val_mse = float(eqx.filter_jit(mse)(eqx.nn.inference_mode(model), val_x, val_y))
    print(
        f"baselines: predict zero {float(jnp.mean(val_y**2)):.4f}, predict last value "
        f"{float(jnp.mean((val_y - val_x) ** 2)):.4f}, noise floor 0.0100"
    )
    print(f"val_mse = {val_mse:.4f}")
    return val_mse


if __name__ == "__main__":
    main()
