"""State resets: one LSTM reads a stream of concatenated sine series, its state reset at each new series.

Each row of the stream is a run of noisy series sin(wt + phi), cos(wt + phi), one after the other, each
with its own frequency w ~ U(0.2, 1.0) and phase and a random length of 8 to 32 steps (the data of the
``sine`` task, jax_lstm.tasks.sine, cut and joined). The model predicts the next values within a series;
the step whose target belongs to the next series is not scored.

Two models are trained on the same streams, from the same initial weights:

* with resets: ``lstm_stack(..., resets=resets)``, True at the first step of every series, so the state
  restarts from zero there, as if every series were its own sequence (no padding, no reshuffling). A
  reset restores ``reset_states`` (zeros when not given); ``states0``, a state carried in from an earlier
  chunk of the stream, is only the start;
* without: the state is carried across the boundaries, and the model has to notice the jump itself.

    python examples/resets_sine.py --steps 1500

The last two lines give the validation MSE of each (the noise, sigma = 0.1, puts the floor near 0.01).
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import optax

from jax_lstm.layers import init_stack, lstm_stack
from jax_lstm.tasks.sine import NOISE, VAL_KEY, W_MAX, W_MIN

SEG_MIN, SEG_MAX = 8, 32


def make_stream(key: jax.Array, n: int, T: int):
    """n rows of T steps of concatenated series.

    Returns:
      x: (n, T, 2) noisy values at t; y: (n, T, 2) the values at t + 1; resets: (n, T) bool, True where a
      series starts; scored: (n, T) bool, True where y belongs to the same series as x.
    """
    k_len, k_w, k_phi, k_noise = jax.random.split(key, 4)
    n_seg = (T + 1) // SEG_MIN + 1  # enough series to fill T + 1 steps
    lengths = jax.random.randint(k_len, (n, n_seg), SEG_MIN, SEG_MAX + 1)
    starts = jnp.cumsum(lengths, axis=1) - lengths  # (n, n_seg): first step of each series
    t = jnp.arange(T + 1)
    seg = jnp.sum(starts[:, None, :] <= t[None, :, None], axis=-1) - 1  # (n, T + 1): series of each step
    pos = t[None, :] - jnp.take_along_axis(starts, seg, axis=1)  # step inside its series
    w = jnp.take_along_axis(jax.random.uniform(k_w, (n, n_seg), minval=W_MIN, maxval=W_MAX), seg, axis=1)
    phi = jnp.take_along_axis(jax.random.uniform(k_phi, (n, n_seg), maxval=2 * jnp.pi), seg, axis=1)
    angle = w * pos + phi
    values = jnp.stack([jnp.sin(angle), jnp.cos(angle)], axis=-1)
    values = values + NOISE * jax.random.normal(k_noise, values.shape)
    return values[:, :-1], values[:, 1:], pos[:, :-1] == 0, seg[:, 1:] == seg[:, :-1]


def predict(params, x, resets):
    """x: (B, T, 2) -> (B, T, 2); ``resets`` (B, T) or None (the state is carried across series)."""
    hs, _ = lstm_stack(params["lstm"], x, resets=resets, time_major=False)
    return hs @ params["w"] + params["b"]


def mse(params, x, y, resets, scored):
    err = jnp.sum((predict(params, x, resets) - y) ** 2, axis=-1) / 2  # (B, T)
    return jnp.sum(jnp.where(scored, err, 0.0)) / jnp.sum(scored)


def train(use_resets: bool, args) -> float:
    """Train one model; its validation MSE, read the way it was trained (with or without resets)."""
    k_lstm, k_head = jax.random.split(jax.random.PRNGKey(args.seed))
    params = {
        "lstm": init_stack(k_lstm, 2, (args.hidden,)),
        "w": jax.nn.initializers.glorot_uniform()(k_head, (args.hidden, 2)),
        "b": jnp.zeros(2),
    }
    optimizer = optax.chain(
        optax.clip_by_global_norm(1.0), optax.adam(optax.cosine_decay_schedule(args.lr, args.steps))
    )
    opt_state = optimizer.init(params)

    def loss(p, x, y, resets, scored):
        return mse(p, x, y, resets if use_resets else None, scored)

    @jax.jit
    def step(params, opt_state, key):
        x, y, resets, scored = make_stream(key, args.batch, args.seq_len)
        value, grads = jax.value_and_grad(loss)(params, x, y, resets, scored)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, value

    key = jax.random.PRNGKey(args.seed + 1)  # the same training streams for both models
    for _ in range(args.steps):
        key, sub = jax.random.split(key)
        params, opt_state, _ = step(params, opt_state, sub)
    val = make_stream(jax.random.PRNGKey(VAL_KEY), 256, 4 * args.seq_len)
    return float(jax.jit(loss)(params, *val))


def main(argv=None) -> tuple[float, float]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=1500, help="training steps of each model (default 1500)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=100, help="steps per training row (several series)")
    ap.add_argument("--hidden", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    without = train(False, args)
    with_resets = train(True, args)
    print(f"validation MSE over 256 streams of {4 * args.seq_len} steps; noise floor {NOISE**2:.4f}")
    print(f"val_mse_without_resets = {without:.4f}")
    print(f"val_mse_with_resets = {with_resets:.4f}")
    return without, with_resets


if __name__ == "__main__":
    main()
