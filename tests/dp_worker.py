"""Run 20 data-parallel train steps and print the loss curve and params as JSON.

Used by tests/test_parallel.py in fresh processes (XLA_FLAGS must be set before
JAX starts). Usage:
  python tests/dp_worker.py DEVICES DTYPE [COORDINATOR NUM_PROCESSES PROCESS_ID]
"""

from __future__ import annotations

import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jax_lstm import init_params, lstm, parallel

T, B, D, H, STEPS = 6, 8, 3, 5, 20


def main() -> None:
    n_dev, dtype = int(sys.argv[1]), sys.argv[2]
    multi = len(sys.argv) > 3
    if multi:
        parallel.initialize(sys.argv[3], int(sys.argv[4]), int(sys.argv[5]))
    jax.config.update("jax_enable_x64", dtype == "float64")
    dt = jnp.dtype(dtype)
    params = (init_params(jax.random.PRNGKey(0), D, H, dtype=dt), jnp.zeros((H,), dt))
    opt = optax.adam(1e-2)

    def step(params, opt_state, batch):
        def loss(p):
            hs, _ = lstm(p[0], jnp.swapaxes(batch["x"], 0, 1))  # batch-major in, time-major to the LSTM
            pred = jnp.einsum("tbh,h->tb", hs, p[1])
            return jnp.mean((pred - jnp.swapaxes(batch["y"], 0, 1)) ** 2)

        value, grads = jax.value_and_grad(loss)(params)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, {"loss": value}

    rng = np.random.default_rng(0)
    xs = [rng.normal(size=(B, T, D)).astype(dtype) for _ in range(STEPS)]
    batches = [{"x": x, "y": 0.5 * np.tanh(x[..., 0] - x[..., 1])} for x in xs]  # learnable target
    mesh = parallel.make_mesh(n_dev if not multi else None)
    print(parallel.describe(mesh, B), file=sys.stderr)
    p, s = parallel.replicate(mesh, params), parallel.replicate(mesh, opt.init(params))
    train_step = parallel.data_parallel(step, mesh)
    losses = []
    n, k = jax.process_count(), jax.process_index()
    for batch in batches:
        if multi:  # each process feeds its own rows of the global batch
            batch = jax.tree.map(lambda a: a[k * B // n : (k + 1) * B // n], batch)
        p, s, m = train_step(p, s, parallel.shard_batch(mesh, batch, process_local=multi))
        losses.append(float(m["loss"]))
    leaves = [np.asarray(a.addressable_data(0)).ravel().tolist() for a in jax.tree.leaves(p)]
    print(json.dumps({"losses": losses, "params": leaves, "devices": mesh.devices.size}))


if __name__ == "__main__":
    main()
