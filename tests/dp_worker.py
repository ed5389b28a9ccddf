"""Train ``sine`` for a few steps, data-parallel, and print the loss curve and params as JSON.

Used by tests/test_parallel.py in fresh processes, since XLA_FLAGS (the number of
forced host devices) must be set before JAX starts. Usage:
  python tests/dp_worker.py DEVICES DTYPE STEPS
"""

from __future__ import annotations

import json
import sys

import jax
import numpy as np


def main() -> None:
    n_dev, dtype, steps = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    jax.config.update("jax_enable_x64", dtype == "float64")
    from jax_lstm.train import TrainConfig, train

    config = TrainConfig(task="sine", steps=steps, dtype=dtype, batch_size=8, seq_len=12, hidden=8, log_every=steps)
    result = train(config, progress="none", plot=False, devices=n_dev)
    leaves = [np.asarray(a).ravel().tolist() for a in jax.tree.leaves(result.state.params)]
    print(json.dumps({"losses": result.losses, "params": leaves, "devices": len(jax.devices())}))


if __name__ == "__main__":
    main()
