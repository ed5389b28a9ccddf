"""Recurrent PPO in the PureJaxRL pattern, with jax_lstm's LSTM or Flax's ``OptimizedLSTMCell`` as the core.

Everything runs inside one ``jax.jit``: ``num_envs`` gymnax environments stepped under ``jax.vmap``, a
rollout of ``num_steps`` steps, generalised advantage estimation, then ``update_epochs`` passes of
``num_minibatches`` minibatches (each a set of whole environments, all ``num_steps`` steps) of the
clipped PPO loss. The agent is PureJaxRL's ``ActorCriticRNN`` with an LSTM for the GRU: a dense
embedding, the recurrent core, and a two-layer actor and critic on its output.

Episode boundaries follow PureJaxRL's convention. A transition stores ``done``, True when the episode
ended at the step before it, so the state entering step t is reset where ``done[t]``; that is exactly
``resets[t]`` of ``jax_lstm.lstm`` ("reset just before step t"). The two places resets happen agree:

* acting, one step at a time (``ActorCritic.step``): the carry is set to zeros where ``done``, then one
  cell step (``lstm_cell``, or Flax's cell);
* training, one call over the whole rollout (``ActorCritic.__call__``): it starts from the state carried
  into the rollout and restarts from zeros at every episode end,
  ``lstm(params, xs, carried, resets=done, reset_state=None)`` with jax_lstm; with Flax, PureJaxRL's
  ``ScannedRNN``: ``nn.scan`` over the cell with the same ``where`` before every step.

``core="ours"`` and ``core="flax"`` differ in the recurrent core only; the dense layers, the
environments and the PPO arithmetic are the same code. Needs flax (``pip install 'jax_lstm[rl]'``,
which brings gymnax for the environments).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

try:
    import flax.linen as nn
except ImportError as e:  # pragma: no cover - flax comes with the rl extra
    raise ImportError("jax_lstm.rl needs flax: pip install 'jax_lstm[rl]'") from e

from jax_lstm.bptt import lstm
from jax_lstm.cell import LSTMState, init_params, lstm_cell

__all__ = [
    "CORES",
    "PPOConfig",
    "Transition",
    "Runner",
    "LSTMCore",
    "FlaxLSTMCore",
    "ActorCritic",
    "zero_carry",
    "PPO",
    "make_ppo",
]

CORES = ("ours", "flax")


def _zeros_where(reset: jax.Array, carry):
    """The carry with the rows where ``reset`` (B,) is True set to zeros."""
    return jax.tree.map(lambda s: jnp.where(reset[:, None], jnp.zeros_like(s), s), carry)


class LSTMCore(nn.Module):
    """jax_lstm's core: one fused ``lstm`` call over a rollout, ``lstm_cell`` for a step.

    The carry is ``LSTMState(h, c)``, h, c: (B, H). Weights from ``init_params`` (the variable ``lstm``
    holds an ``LSTMParams``).
    """

    features: int  # H
    in_features: int  # D
    unroll: int = 1  # of the training pass's loops; speed only

    def setup(self):
        self.lstm = self.param("lstm", lambda key: init_params(key, self.in_features, self.features))

    def __call__(self, carry: LSTMState, xs: jax.Array, resets: jax.Array):
        """xs: (T, B, D), resets: (T, B) bool -> (carry, hs (T, B, H)); zeros where resets[t], before step t."""
        hs, carry = lstm(self.lstm, xs, carry, resets=resets, reset_state=None, unroll=self.unroll)
        return carry, hs

    def step(self, carry: LSTMState, x: jax.Array, reset: jax.Array):
        """x: (B, D), reset: (B,) bool -> (carry, h (B, H)); zeros where reset, before the step."""
        return lstm_cell(self.lstm, _zeros_where(reset, carry), x)


def _flax_step(core: FlaxLSTMCore, carry, x, reset):
    return core.cell(_zeros_where(reset, carry), x)


class FlaxLSTMCore(nn.Module):
    """Flax's ``OptimizedLSTMCell`` the way PureJaxRL's ``ScannedRNN`` runs a cell: ``nn.scan`` over steps.

    The carry is Flax's ``(c, h)``, each (B, H).
    """

    features: int  # H
    unroll: int = 1  # of nn.scan; speed only

    def setup(self):
        self.cell = nn.OptimizedLSTMCell(self.features)

    def __call__(self, carry, xs: jax.Array, resets: jax.Array):
        """xs: (T, B, D), resets: (T, B) bool -> (carry, hs (T, B, H)); zeros where resets[t], before step t."""
        scan = nn.scan(_flax_step, variable_broadcast="params", split_rngs={"params": False}, unroll=self.unroll)
        return scan(self, carry, xs, resets)

    def step(self, carry, x: jax.Array, reset: jax.Array):
        """x: (B, D), reset: (B,) bool -> (carry, h (B, H)); zeros where reset, before the step."""
        return _flax_step(self, carry, x, reset)


def zero_carry(core: str, batch: int, hidden: int, dtype=jnp.float32):
    """The zero carry of ``core``: ``LSTMState(h, c)`` for ``"ours"``, Flax's ``(c, h)`` for ``"flax"``."""
    z = jnp.zeros((batch, hidden), dtype)
    if core == "ours":
        return LSTMState(z, z)
    if core == "flax":
        return (z, z)
    raise ValueError(f"core must be one of {CORES}, got {core!r}")


class ActorCritic(nn.Module):
    """PureJaxRL's ``ActorCriticRNN`` with an LSTM core: dense(H) + relu -> LSTM(H) -> actor and critic.

    The actor and the critic are dense(H) + relu -> dense (logits, one value); orthogonal initialisation
    with PureJaxRL's scales.
    """

    num_actions: int
    hidden: int = 128
    core: str = "ours"
    unroll: int = 1  # of the core's training pass

    def setup(self):
        def dense(n, scale):
            return nn.Dense(n, kernel_init=nn.initializers.orthogonal(scale), bias_init=nn.initializers.zeros)

        if self.core not in CORES:
            raise ValueError(f"core must be one of {CORES}, got {self.core!r}")
        self.embed = dense(self.hidden, np.sqrt(2))
        if self.core == "ours":
            self.rnn = LSTMCore(self.hidden, self.hidden, self.unroll)
        else:
            self.rnn = FlaxLSTMCore(self.hidden, self.unroll)
        self.actor = (dense(self.hidden, 2.0), dense(self.num_actions, 0.01))
        self.critic = (dense(self.hidden, 2.0), dense(1, 1.0))

    def _heads(self, y):
        logits = self.actor[1](nn.relu(self.actor[0](y)))
        value = self.critic[1](nn.relu(self.critic[0](y)))[..., 0]
        return logits, value

    def __call__(self, carry, obs: jax.Array, dones: jax.Array):
        """The training pass. obs: (T, B, O), dones: (T, B) -> (carry, logits (T, B, A), values (T, B))."""
        carry, y = self.rnn(carry, nn.relu(self.embed(obs)), dones)
        return (carry, *self._heads(y))

    def step(self, carry, obs: jax.Array, done: jax.Array):
        """Acting. obs: (B, O), done: (B,) -> (carry, logits (B, A), values (B,))."""
        carry, y = self.rnn.step(carry, nn.relu(self.embed(obs)), done)
        return (carry, *self._heads(y))


@dataclasses.dataclass(frozen=True)
class PPOConfig:
    """Hyperparameters of the PPO loop (PureJaxRL's names, lower case)."""

    core: str = "ours"  # "ours" (jax_lstm) or "flax" (OptimizedLSTMCell under nn.scan)
    num_envs: int = 64
    num_steps: int = 128  # T of a rollout
    num_updates: int = 30
    update_epochs: int = 4
    num_minibatches: int = 4  # each takes num_envs // num_minibatches whole environments
    hidden: int = 128  # H of the embedding, the LSTM and the heads
    unroll: int = 1  # unroll of the training pass's loops (either core); changes speed, never values
    lr: float = 1e-3
    anneal_lr: bool = True
    gamma: float = 0.99
    gae_lambda: float = 0.95
    clip_eps: float = 0.2
    ent_coef: float = 0.01
    vf_coef: float = 0.5
    max_grad_norm: float = 0.5

    def __post_init__(self):
        if self.core not in CORES:
            raise ValueError(f"core must be one of {CORES}, got {self.core!r}")
        if self.num_envs % self.num_minibatches:
            raise ValueError(
                f"num_envs ({self.num_envs}) must be a multiple of num_minibatches ({self.num_minibatches})"
            )


class Transition(NamedTuple):
    """One rollout step of every environment; (T, B, ...) once stacked."""

    done: jax.Array  # (B,) bool: the episode ended at the step before, the state entering this one is reset
    action: jax.Array  # (B,) int
    value: jax.Array  # (B,)
    reward: jax.Array  # (B,)
    log_prob: jax.Array  # (B,)
    obs: jax.Array  # (B, O)
    episode_end: jax.Array  # (B,) bool: the episode ends at this step
    episode_return: jax.Array  # (B,) its undiscounted return where episode_end, else 0


class Runner(NamedTuple):
    """Everything the loop carries from one update to the next."""

    params: Any
    opt_state: Any
    env_state: Any
    obs: jax.Array  # (B, O) the next observation
    done: jax.Array  # (B,) bool: the episode ended at the last step
    carry: Any  # the recurrent state entering the next step
    ep_return: jax.Array  # (B,) return so far of each running episode
    key: jax.Array


@dataclasses.dataclass(frozen=True)
class PPO:
    """The pieces of the loop, each a pure function (``jax.jit`` them, or ``train`` whole)."""

    config: PPOConfig
    network: ActorCritic
    init: Callable[[jax.Array], Runner]
    rollout: Callable[[Runner], tuple[Runner, Transition, Any]]  # -> runner, (T, B) transitions, carry in
    update: Callable[[Runner], tuple[Runner, dict]]  # one PPO update: rollout + epochs of minibatches
    train: Callable[[jax.Array], tuple[Runner, dict]]  # init + num_updates updates; metrics (num_updates,)


def _log_prob(logits, action):
    return jnp.take_along_axis(jax.nn.log_softmax(logits), action[..., None], axis=-1)[..., 0]


def make_ppo(env, env_params, config: PPOConfig) -> PPO:
    """The PPO loop for a gymnax (1.0) environment with discrete actions; ``env.step`` resets at episode ends.

    Returns:
      A ``PPO``; ``jax.jit(ppo.train)(key)`` runs ``config.num_updates`` updates and returns the last
      ``Runner`` and per-update metrics: ``mean_return`` (episodes finished in that rollout; NaN where
      none), ``episodes`` and ``loss`` (mean over the minibatches of the last epoch).
    """
    cfg = config
    n_envs, T, n_mb = cfg.num_envs, cfg.num_steps, cfg.num_minibatches
    network = ActorCritic(env.num_actions, cfg.hidden, cfg.core, cfg.unroll)
    obs_shape = env.observation_space(env_params).shape

    def schedule(count):
        frac = 1.0 - (count // (n_mb * cfg.update_epochs)) / cfg.num_updates
        return cfg.lr * frac

    tx = optax.chain(
        optax.clip_by_global_norm(cfg.max_grad_norm),
        optax.adam(schedule if cfg.anneal_lr else cfg.lr, eps=1e-5),
    )

    def init(key):
        k_net, k_env, k_run = jax.random.split(key, 3)
        carry = zero_carry(cfg.core, n_envs, cfg.hidden)
        params = network.init(
            k_net, carry, jnp.zeros((1, n_envs, *obs_shape), jnp.float32), jnp.zeros((1, n_envs), bool)
        )
        obs, env_state = jax.vmap(env.reset, in_axes=(0, None))(jax.random.split(k_env, n_envs), env_params)
        return Runner(
            params,
            tx.init(params),
            env_state,
            obs,
            jnp.zeros((n_envs,), bool),
            carry,
            jnp.zeros((n_envs,), jnp.float32),
            k_run,
        )

    def env_step(r: Runner, _):
        key, k_act, k_env = jax.random.split(r.key, 3)
        carry, logits, value = network.apply(r.params, r.carry, r.obs, r.done, method=ActorCritic.step)
        action = jax.random.categorical(k_act, logits)
        obs, env_state, reward, terminated, truncated, _ = jax.vmap(env.step, in_axes=(0, 0, 0, None))(
            jax.random.split(k_env, n_envs), r.env_state, action, env_params
        )
        done = jnp.logical_or(terminated, truncated)  # the env has reset itself; as in PureJaxRL, no bootstrap
        reward = reward.astype(jnp.float32)
        ep_return = r.ep_return + reward
        tr = Transition(
            r.done, action, value, reward, _log_prob(logits, action), r.obs, done, jnp.where(done, ep_return, 0.0)
        )
        return Runner(r.params, r.opt_state, env_state, obs, done, carry, jnp.where(done, 0.0, ep_return), key), tr

    def rollout(r: Runner):
        carry_in = r.carry
        r, traj = jax.lax.scan(env_step, r, None, T)
        return r, traj, carry_in

    def gae(traj: Transition, last_value, last_done):
        def back(acc, tr):
            adv, next_value, next_done = acc
            live = 1.0 - next_done.astype(jnp.float32)
            delta = tr.reward + cfg.gamma * next_value * live - tr.value
            adv = delta + cfg.gamma * cfg.gae_lambda * live * adv
            return (adv, tr.value, tr.done), adv

        _, adv = jax.lax.scan(back, (jnp.zeros_like(last_value), last_value, last_done), traj, reverse=True)
        return adv, adv + traj.value

    def loss_fn(params, carry0, traj: Transition, adv, targets):
        _, logits, value = network.apply(params, carry0, traj.obs, traj.done)
        log_prob = _log_prob(logits, traj.action)
        v_clipped = traj.value + jnp.clip(value - traj.value, -cfg.clip_eps, cfg.clip_eps)
        v_loss = 0.5 * jnp.maximum(jnp.square(value - targets), jnp.square(v_clipped - targets)).mean()
        ratio = jnp.exp(log_prob - traj.log_prob)
        adv = (adv - adv.mean()) / (adv.std() + 1e-8)
        pi_loss = -jnp.minimum(ratio * adv, jnp.clip(ratio, 1.0 - cfg.clip_eps, 1.0 + cfg.clip_eps) * adv).mean()
        entropy = -jnp.sum(jax.nn.softmax(logits) * jax.nn.log_softmax(logits), axis=-1).mean()
        return pi_loss + cfg.vf_coef * v_loss - cfg.ent_coef * entropy

    grad_fn = jax.value_and_grad(loss_fn)

    def minibatch_step(state, batch):
        params, opt_state = state
        loss, grads = grad_fn(params, *batch)
        updates, opt_state = tx.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), loss

    def epoch(state, key, batch):
        # whole environments per minibatch: (T, B, ...) -> (n_mb, T, B / n_mb, ...); the carry (B, H) likewise
        perm = jax.random.permutation(key, n_envs)
        carry0, traj, adv, targets = batch

        def split_time_major(x):
            x = jnp.take(x, perm, axis=1)
            return jnp.swapaxes(x.reshape(x.shape[0], n_mb, -1, *x.shape[2:]), 0, 1)

        def split_rows(x):
            return jnp.take(x, perm, axis=0).reshape(n_mb, -1, *x.shape[1:])

        mbs = (jax.tree.map(split_rows, carry0), *jax.tree.map(split_time_major, (traj, adv, targets)))
        return jax.lax.scan(minibatch_step, state, mbs)

    def update(r: Runner):
        r, traj, carry_in = rollout(r)
        _, _, last_value = network.apply(r.params, r.carry, r.obs, r.done, method=ActorCritic.step)
        adv, targets = gae(traj, last_value, r.done)
        key, k_epochs = jax.random.split(r.key)

        def one_epoch(state, k):
            return epoch(state, k, (carry_in, traj, adv, targets))

        (params, opt_state), losses = jax.lax.scan(
            one_epoch, (r.params, r.opt_state), jax.random.split(k_epochs, cfg.update_epochs)
        )
        episodes = jnp.sum(traj.episode_end)
        metrics = dict(
            mean_return=jnp.where(episodes > 0, jnp.sum(traj.episode_return) / jnp.maximum(episodes, 1), jnp.nan),
            episodes=episodes,
            loss=losses[-1].mean(),
        )
        return r._replace(params=params, opt_state=opt_state, key=key), metrics

    def train(key):
        return jax.lax.scan(lambda r, _: update(r), init(key), None, cfg.num_updates)

    return PPO(cfg, network, init, rollout, update, train)
