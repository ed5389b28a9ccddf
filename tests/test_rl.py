"""jax_lstm.rl: the training pass over a rollout equals the agent's step-by-step acting, for both cores.

The property the PPO loss rests on: the one call over a rollout (from the state carried into it, zeros at
every episode end) recomputes exactly the logits and values the agent acted with one step at a time.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("flax")
gymnax = pytest.importorskip("gymnax")

from jax_lstm import rl  # noqa: E402

H, B, T, D = 8, 4, 40, 8


def _close(a, b, tol=2e-6):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape
    err = np.max(np.abs(a - b)) / max(1.0, np.max(np.abs(b)))
    assert err <= tol, err


def _problem(seed=0):
    k = jax.random.split(jax.random.PRNGKey(seed), 4)
    xs = jax.random.normal(k[0], (T, B, D), jnp.float32)
    resets = jax.random.bernoulli(k[1], 0.15, (T, B)).at[0, 1].set(True)  # a reset at the very first step too
    h, c = (jax.random.normal(kk, (B, H), jnp.float32) for kk in k[2:])  # a non-zero carried state
    return xs, resets, h, c


def _step_by_step(core, variables, carry, xs, resets):
    def body(carry, inp):
        return core.apply(variables, carry, *inp, method=type(core).step)

    return jax.lax.scan(body, carry, (xs, resets))


@pytest.mark.parametrize("name", rl.CORES)
def test_core_sequence_call_equals_its_steps(name):
    xs, resets, h, c = _problem()
    core = rl.LSTMCore(H, D) if name == "ours" else rl.FlaxLSTMCore(H)
    carry = rl.LSTMState(h, c) if name == "ours" else (c, h)
    variables = core.init(jax.random.PRNGKey(1), carry, xs, resets)
    got_carry, got = core.apply(variables, carry, xs, resets)
    want_carry, want = _step_by_step(core, variables, carry, xs, resets)
    _close(got, want)
    for g, w in zip(got_carry, want_carry, strict=True):
        _close(g, w)
    # the reset state is zeros, not the carry the sequence started from
    t, b = 0, 1
    _, z = core.apply(variables, rl.zero_carry(name, 1, H), xs[t : t + 1, b : b + 1], resets[t : t + 1, b : b + 1])
    _close(got[t, b], z[0, 0])


def test_our_core_gradient_equals_the_gradient_through_its_steps():
    xs, resets, h, c = _problem(1)
    core = rl.LSTMCore(H, D)
    carry = rl.LSTMState(h, c)
    variables = core.init(jax.random.PRNGKey(2), carry, xs, resets)
    w = jax.random.normal(jax.random.PRNGKey(3), (T, B, H), jnp.float32)

    def loss(run, variables, xs, carry):
        (hT, cT), hs = run(variables, carry, xs)
        return jnp.sum(hs * w) + jnp.sum(hT * w[0]) - jnp.sum(cT * w[1])

    fused = jax.grad(loss, argnums=(1, 2, 3))(lambda v, s, x: core.apply(v, s, x, resets), variables, xs, carry)
    steps = jax.grad(loss, argnums=(1, 2, 3))(
        lambda v, s, x: _step_by_step(core, v, s, x, resets), variables, xs, carry
    )
    for g, s in zip(jax.tree.leaves(fused), jax.tree.leaves(steps), strict=True):
        _close(g, s, 1e-5)


@pytest.mark.parametrize("name", rl.CORES)
def test_training_pass_recomputes_the_rollout(name):
    env, env_params = gymnax.make("MemoryChain-bsuite")
    env_params = env_params.replace(memory_length=6)  # episodes of 7 steps, several per rollout
    config = rl.PPOConfig(core=name, num_envs=4, num_steps=24, num_minibatches=2, hidden=H)
    ppo = rl.make_ppo(env, env_params, config)
    runner = ppo.init(jax.random.PRNGKey(0))
    rollout = jax.jit(ppo.rollout)
    runner, _, _ = rollout(runner)
    runner, traj, carry_in = rollout(runner)  # starts mid-episode, from a non-zero carry
    assert np.any(np.abs(np.asarray(jax.tree.leaves(carry_in)[0])) > 0)
    assert np.any(traj.done[1:]) and not np.all(traj.done)
    carry, logits, values = ppo.network.apply(runner.params, carry_in, traj.obs, traj.done)
    _close(values, traj.value)
    log_prob = jax.nn.log_softmax(logits)
    _close(jnp.take_along_axis(log_prob, traj.action[..., None], axis=-1)[..., 0], traj.log_prob)
    for g, w in zip(carry, runner.carry, strict=True):
        _close(g, w)


def test_bad_config_is_refused():
    with pytest.raises(ValueError, match="core"):
        rl.PPOConfig(core="gru")
    with pytest.raises(ValueError, match="multiple"):
        rl.PPOConfig(num_envs=6, num_minibatches=4)


def test_the_linen_module_in_purejaxrls_line_equals_our_core():
    """``ScannedRNN()(hidden, (x, dones))`` -> ``jax_lstm.linen.LSTM(...)(x, initial_carry=hidden, resets=dones)``."""
    import jax_lstm.linen

    xs, resets, h, c = _problem(2)
    module = jax_lstm.linen.LSTM(H, time_major=True, return_carry=True)
    hidden = (c, h)  # a carried, non-zero carry in Flax's order, as nn.OptimizedLSTMCell makes it
    variables = module.init(jax.random.PRNGKey(4), xs, initial_carry=hidden, resets=resets)
    (c_T, h_T), ys = module.apply(variables, xs, initial_carry=hidden, resets=resets)
    ((params,),) = jax_lstm.linen.from_variables(variables)
    (h_ours, c_ours), ys_ours = rl.LSTMCore(H, H).apply({"params": {"lstm": params}}, rl.LSTMState(h, c), xs, resets)
    _close(ys, ys_ours, 0)
    _close(c_T, c_ours, 0)
    _close(h_T, h_ours, 0)
