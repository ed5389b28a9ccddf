"""Deviceless H100 compiles: every path of the library through XLA's GPU pipeline, no GPU needed.

Each test compiles for the H100 described in ``h100_target_config.txtpb`` (see
``deviceless.py``; skipped where the CUDA plugin is absent), asserts that the compile
succeeds and that the time loops are there, and reports the kernels each time step of
every loop body launches (printed, and written to ``kernels.json`` in the test's tmp dir).
The shapes are small: a compile costs about a second.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from deviceless import compile_for, h100_mesh, loop_kernels

from jax_lstm import LSTMState, init_params, init_stack, lstm, lstm_ref, lstm_stack

T, B, D, H = 8, 8, 16, 32


def _report(tmp_path, name, compiled, n_steps=T):
    """Kernels per step of every loop of ``compiled``; asserts the time loops are there."""
    loops = loop_kernels(compiled.as_text())
    path = tmp_path / "kernels.json"  # one record per compile of the test
    records = json.loads(path.read_text()) if path.exists() else []
    path.write_text(json.dumps([*records, {"case": name, "loops": loops}], indent=1))
    print(
        f"\n{name}: " + "; ".join(f"{lp['loop']} x{lp['trip_count']}: {lp['per_step']} {lp['kinds']}" for lp in loops)
    )
    time_loops = [lp for lp in loops if lp["trip_count"] == n_steps]
    assert time_loops, f"no loop of {n_steps} steps in the compiled {name}"
    assert all(lp["per_step"] >= 1 for lp in time_loops)
    return loops


def _loss(fn, **kw):
    def loss(params, xs, state0, w):
        hs, (h, c) = fn(params, xs, state0, **kw)
        return jnp.sum(hs.astype(jnp.float32) * w) + jnp.sum(h.astype(jnp.float32)) + jnp.sum(c.astype(jnp.float32))

    return loss


def _inputs(dtype, time_major=True, seed=0):
    rng = np.random.default_rng(seed)
    p = init_params(jax.random.PRNGKey(seed), D, H, dtype=dtype)
    shape = (T, B, D) if time_major else (B, T, D)
    xs = jnp.asarray(rng.normal(size=shape), dtype)
    s0 = LSTMState(*(jnp.asarray(rng.normal(size=(B, H)), dtype) for _ in range(2)))
    w = jnp.asarray(rng.normal(size=(*shape[:2], H)), jnp.float32)
    return p, xs, s0, w


# The options grouped so that every one is compiled in a few compiles: (name, dtype, time_major, options).
_CASES = [
    ("plain f32", jnp.float32, True, {}),
    (
        "lengths, resets to reset_state, recurrent dropout, f32",
        jnp.float32,
        True,
        {"seq_lengths": "lengths", "resets": "resets", "reset_state": "state", "recurrent_dropout": 0.25},
    ),
    ("mask, reverse, batch-major, bf16", jnp.bfloat16, False, {"mask": "mask", "reverse": True}),
]


def _options(opts, time_major):
    rng = np.random.default_rng(1)
    flags = (T, B) if time_major else (B, T)
    made = {
        "lengths": jnp.asarray(rng.integers(0, T + 1, B), jnp.int32),
        "resets": jnp.asarray(rng.random(flags) < 0.2),
        "mask": jnp.asarray(rng.random(flags) < 0.8),
    }
    arrays = {k: made[v] for k, v in opts.items() if isinstance(v, str) and v in made}
    static = {k: v for k, v in opts.items() if not isinstance(v, str)}
    return arrays, static, "reset_state" in opts


# every case for lstm; the autodiff reference for one, as the baseline
_RUNS = [("lstm", *case) for case in _CASES] + [("lstm_ref", *_CASES[1])]


@pytest.mark.parametrize("impl,name,dtype,time_major,opts", _RUNS, ids=[f"{r[0]}: {r[1]}" for r in _RUNS])
def test_lstm_forward_and_gradient_compile(tmp_path, impl, name, dtype, time_major, opts):
    mesh = h100_mesh()
    fn = {"lstm": lstm, "lstm_ref": lstm_ref}[impl]
    p, xs, s0, w = _inputs(dtype, time_major)
    arrays, static, with_reset_state = _options(opts, time_major)
    key = jax.random.PRNGKey(2)

    def value_and_grad(p, xs, s0, w, arrays, key):
        kw = dict(arrays, key=key, time_major=time_major, **static)
        if with_reset_state:
            kw["reset_state"] = s0
        return jax.value_and_grad(_loss(fn, **kw), argnums=(0, 1, 2))(p, xs, s0, w)

    def forward(p, xs, s0, arrays, key):
        kw = dict(arrays, key=key, time_major=time_major, **static)
        if with_reset_state:
            kw["reset_state"] = s0
        return fn(p, xs, s0, **kw)

    grad_loops = _report(
        tmp_path, f"{impl} gradient, {name}", compile_for(mesh, value_and_grad, p, xs, s0, w, arrays, key)
    )
    fwd_loops = _report(tmp_path, f"{impl} forward, {name}", compile_for(mesh, forward, p, xs, s0, arrays, key))
    if impl == "lstm":  # the value and gradient: one forward loop that saves residuals, one backward loop
        assert len([lp for lp in grad_loops if lp["trip_count"] == T]) == 2
        assert len([lp for lp in fwd_loops if lp["trip_count"] == T]) == 1


def test_lstm_stack_gradient_compiles(tmp_path):
    mesh = h100_mesh()
    params = init_stack(jax.random.PRNGKey(0), D, (H, H), bidirectional=True, dtype=jnp.float32)
    xs = jnp.ones((T, B, D), jnp.float32)
    lengths = jnp.full((B,), T, jnp.int32)

    def loss(params, xs, lengths, key):
        hs, _ = lstm_stack(params, xs, seq_lengths=lengths, dropout=0.1, recurrent_dropout=0.1, key=key)
        return jnp.sum(hs**2)

    loops = _report(
        tmp_path,
        "lstm_stack gradient, 2 bidirectional layers",
        compile_for(mesh, jax.grad(loss), params, xs, lengths, jax.random.PRNGKey(1)),
    )
    assert len([lp for lp in loops if lp["trip_count"] == T]) == 8  # 2 layers x 2 directions x (forward, backward)


def _regression(seed=3):
    rng = np.random.default_rng(seed)
    return tuple(jnp.asarray(rng.standard_normal((B, T, n)), jnp.float32) for n in (D, 2))


def test_nnx_train_step_compiles(tmp_path):
    nnx = pytest.importorskip("flax.nnx")
    from jax_lstm.nnx import LSTM

    mesh = h100_mesh()
    model = LSTM(D, (H, H), recurrent_dropout=0.1, dropout=0.1, rngs=nnx.Rngs(0, dropout=1))
    head = nnx.Linear(H, 2, rngs=nnx.Rngs(2))
    opt = nnx.Optimizer((model, head), optax.adam(1e-3), wrt=nnx.Param)
    graphdef, state = nnx.split((model, head, opt))
    x, y = _regression()

    def step(state, x, y):
        model, head, opt = nnx.merge(graphdef, state)
        loss = lambda mh: jnp.mean((mh[1](mh[0](x)) - y) ** 2)  # noqa: E731
        value, grads = nnx.value_and_grad(loss)((model, head))
        opt.update((model, head), grads)
        return value, nnx.state((model, head, opt))

    _report(tmp_path, "flax.nnx train step", compile_for(mesh, step, state, x, y))


def test_linen_train_step_compiles(tmp_path):
    nn = pytest.importorskip("flax.linen")
    from jax_lstm.linen import LSTM

    class Model(nn.Module):
        @nn.compact
        def __call__(self, x, deterministic=True):
            h = LSTM((H, H), dropout=0.1, recurrent_dropout=0.1, name="lstm")(x, deterministic=deterministic)
            return nn.Dense(2)(h)

    mesh = h100_mesh()
    model = Model()
    x, y = _regression()
    variables = model.init(jax.random.PRNGKey(0), x)
    tx = optax.adam(1e-3)

    def step(variables, opt_state, x, y, key):
        def loss(v):
            return jnp.mean((model.apply(v, x, deterministic=False, rngs={"dropout": key}) - y) ** 2)

        value, grads = jax.value_and_grad(loss)(variables)
        updates, opt_state = tx.update(grads, opt_state, variables)
        return optax.apply_updates(variables, updates), opt_state, value

    _report(
        tmp_path,
        "flax.linen train step",
        compile_for(mesh, step, variables, tx.init(variables), x, y, jax.random.PRNGKey(1)),
    )


def test_equinox_train_step_compiles(tmp_path):
    eqx = pytest.importorskip("equinox")
    from jax_lstm.eqx import LSTM

    mesh = h100_mesh()
    model = LSTM(D, (H, H), recurrent_dropout=0.1, dtype=jnp.float32, key=jax.random.PRNGKey(0))
    arrays, static = eqx.partition(model, eqx.is_array)
    tx = optax.adam(1e-3)
    x, y = _regression()
    w = jnp.ones((H, 2), jnp.float32)

    def step(arrays, opt_state, x, y, key):
        def loss(arrays):
            m = eqx.combine(arrays, static)
            hs = jax.vmap(lambda xb, k: m(xb, key=k)[0])(x, jax.random.split(key, B))
            return jnp.mean((hs @ w - y) ** 2)

        value, grads = jax.value_and_grad(loss)(arrays)
        updates, opt_state = tx.update(grads, opt_state, arrays)
        return optax.apply_updates(arrays, updates), opt_state, value

    _report(
        tmp_path, "equinox train step", compile_for(mesh, step, arrays, tx.init(arrays), x, y, jax.random.PRNGKey(1))
    )


def test_charlm_train_step_compiles(tmp_path):
    from jax_lstm.tasks import get_task
    from jax_lstm.train import TrainConfig, init_state, make_optimizer, make_train_step

    mesh = h100_mesh()
    config = TrainConfig(
        task="charlm",
        steps=10,
        batch_size=B,
        seq_len=T,
        hidden=(H, H),
        embed=16,
        dtype="float32",
        recurrent_dropout=0.1,
        layer_dropout=0.1,
    ).resolved()
    task = get_task("charlm")
    data = task.setup(config)
    optimizer, _ = make_optimizer(config)
    state = init_state(task, config, data, optimizer)
    batch = {**task.train_batch(data, config, 0, state.key), "carry": state.carry}
    step = make_train_step(task, optimizer, lstm, config)
    _report(tmp_path, "charlm train step", compile_for(mesh, step, state.params, state.opt_state, batch))


_HLO = """
%gemm_fusion_dot.1_computation (p0: f32[8,32], p1: f32[32,128]) -> f32[8,128] {
  ROOT %dot.1 = f32[8,128]{1,0} dot(%p0, %p1), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

%body (arg: (s32[], f32[8,32])) -> (s32[], f32[8,32]) {
  %arg = (s32[], f32[8,32]{1,0}) parameter(0)
  %i = s32[] get-tuple-element(%arg), index=0
  %h = f32[8,32]{1,0} get-tuple-element(%arg), index=1
  %w = f32[32,128]{1,0} constant({...})
  %gemm_fusion_dot.1 = f32[8,128]{1,0} fusion(%h, %w), kind=kCustom, calls=%gemm_fusion_dot.1_computation
  %loop_fusion = (f32[8,32]{1,0}, s32[]) fusion(%gemm_fusion_dot.1, %i), kind=kLoop, calls=%fused
  %copy.1 = f32[8,32]{1,0} copy(%h)
  %cc = f32[8,32]{1,0} custom-call(%copy.1), custom_call_target="__gpu$xla.gpu.triton"
  ROOT %t = (s32[], f32[8,32]{1,0}) tuple(%i, %cc)
}

%cond (arg.1: (s32[], f32[8,32])) -> pred[] {
  %arg.1 = (s32[], f32[8,32]{1,0}) parameter(0)
  ROOT %lt = pred[] fusion(%arg.1), kind=kLoop, calls=%fused_lt
}

ENTRY %main (x: f32[8,32]) -> f32[8,32] {
  %x = f32[8,32]{1,0} parameter(0)
  %init = (s32[], f32[8,32]{1,0}) tuple(%zero, %x)
  %while.3 = (s32[], f32[8,32]) while(%init), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"5"}}
  ROOT %out = f32[8,32]{1,0} get-tuple-element(%while.3), index=1
}
"""


def test_loop_kernels_counts_the_launches_of_a_loop_body():
    # runs everywhere: the HLO reader needs no plugin
    (loop,) = loop_kernels(_HLO)
    assert loop == {
        "loop": "while.3",
        "per_step": 4,
        "kinds": {"copy": 1, "custom-call:__gpu$xla.gpu.triton": 1, "fusion": 1, "gemm": 1},
        "condition": 1,
        "trip_count": 5,
    }
