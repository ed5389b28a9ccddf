"""Recurrent PPO on gymnax's MemoryChain: remember one bit for 16 steps.

At the first step of an episode the agent sees a context bit (+1 or -1); then 16 steps of nothing but a
countdown; at the last step it must act according to the bit: +1 if right, -1 if wrong, the only reward.
A random policy averages 0.0, a perfect one 1.0. A feed-forward policy cannot beat chance: the bit has
to travel 17 steps in the recurrent state.

The agent and the loop are PureJaxRL's ``ppo_rnn.py`` with an LSTM (``jax_lstm.rl``): the whole
training loop in one ``jax.jit``, the environments under ``jax.vmap``, the state reset to zeros at episode
ends both when acting (one cell step at a time) and in the training pass (one fused ``lstm`` call over
the rollout, from the state carried into it). ``--core flax`` runs the same agent with Flax's
``OptimizedLSTMCell`` under ``nn.scan``, PureJaxRL's ``ScannedRNN``.

    python examples/ppo_memory.py                 # jax_lstm's core
    python examples/ppo_memory.py --core flax     # Flax's

The last line is the mean return of the episodes of the last 10 updates. Needs gymnax and flax
(``pip install 'jax_lstm[rl]'``).
"""

from __future__ import annotations

import argparse
import time

import gymnax
import jax
import numpy as np

from jax_lstm.rl import CORES, PPOConfig, make_ppo

MEMORY_LENGTH = 16


def make_env(memory_length: int = MEMORY_LENGTH):
    """MemoryChain (one context bit) with ``memory_length`` steps between the bit and the query."""
    env, params = gymnax.make("MemoryChain-bsuite")
    return env, params.replace(memory_length=memory_length)


def main(argv=None) -> float:
    defaults = PPOConfig()
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--core", choices=CORES, default=defaults.core, help="the LSTM: jax_lstm's or Flax's")
    ap.add_argument(
        "--updates",
        "--steps",
        dest="updates",
        type=int,
        default=defaults.num_updates,
        help=f"PPO updates (default {defaults.num_updates})",
    )
    ap.add_argument("--envs", type=int, default=defaults.num_envs, help=f"environments (default {defaults.num_envs})")
    ap.add_argument(
        "--num-steps", type=int, default=defaults.num_steps, help=f"rollout length T (default {defaults.num_steps})"
    )
    ap.add_argument("--hidden", type=int, default=defaults.hidden, help=f"H (default {defaults.hidden})")
    ap.add_argument("--lr", type=float, default=defaults.lr, help=f"Adam learning rate (default {defaults.lr})")
    ap.add_argument("--unroll", type=int, default=defaults.unroll, help="unroll of the training pass (speed only)")
    ap.add_argument("--memory-length", type=int, default=MEMORY_LENGTH, help="MemoryChain's memory_length")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    env, env_params = make_env(args.memory_length)
    config = PPOConfig(
        core=args.core,
        num_envs=args.envs,
        num_steps=args.num_steps,
        num_updates=args.updates,
        num_minibatches=min(defaults.num_minibatches, args.envs),
        hidden=args.hidden,
        lr=args.lr,
        unroll=args.unroll,
    )
    ppo = make_ppo(env, env_params, config)
    key = jax.random.PRNGKey(args.seed)
    t0 = time.perf_counter()
    train = jax.jit(ppo.train).lower(key).compile()
    t1 = time.perf_counter()
    _, metrics = jax.block_until_ready(train(key))
    t2 = time.perf_counter()
    returns = np.asarray(metrics["mean_return"])
    for u in range(0, len(returns), max(1, len(returns) // 10)):
        print(f"update {u + 1:4d}: mean return {returns[u]:+.3f}, loss {float(metrics['loss'][u]):.4f}")
    frames = args.updates * args.envs * args.num_steps
    print(
        f"{args.core} core: {args.updates} updates, {frames} environment steps: "
        f"compile {t1 - t0:.1f} s, training {t2 - t1:.1f} s"
    )
    last = returns[-10:]
    last = last[np.isfinite(last)]
    mean_return = float(last.mean()) if last.size else float("nan")
    print(f"mean_return = {mean_return:.4f}")
    return mean_return


if __name__ == "__main__":
    main()
