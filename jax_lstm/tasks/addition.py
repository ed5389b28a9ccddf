"""``addition``: binary addition of two 8-bit numbers, least significant bit first.

At step t (0 <= t < 9) the LSTM reads bit t of ``a`` and of ``b`` (two
features; bit 8 of both is 0) and emits bit t of ``a + b``: 9 output bits,
so the carry out of bit 7 is the last output. The LSTM's input weights ``U``
(D=2) are the input projection; the head is a dense layer (H -> 1) giving one
logit per step.

Validation: 1000 pairs held out from the 65536 possible ones (a fixed
permutation, the same for every seed); training draws only from the other
64536. Metric: exact-match accuracy, the fraction of held-out pairs whose 9
bits are all right.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jax_lstm.tasks.base import Task, dense, init_model, run_stack, stack_key

__all__ = ["Addition", "TASK", "encode", "decode", "AdditionData"]

BITS = 8
STEPS = BITS + 1
N_VAL = 1000
SPLIT_SEED = 20240  # fixes the held-out pairs independently of the run's seed


@dataclass(frozen=True)
class AdditionData:
    """Pairs encoded as ``a * 256 + b``."""

    train_pool: jax.Array  # (64536,) int32
    val: jax.Array  # (1000,) int32


def encode(pairs: jax.Array, dtype) -> tuple[jax.Array, jax.Array]:
    """Pairs ``a * 256 + b`` (N,) -> inputs (N, 9, 2) and target bits (N, 9), LSB first."""
    a, b = pairs // 2**BITS, pairs % 2**BITS
    t = jnp.arange(STEPS, dtype=pairs.dtype)[None, :]
    bit = lambda v: (v[:, None] >> t) & 1  # noqa: E731
    x = jnp.stack([bit(a), bit(b)], axis=-1).astype(dtype)
    return x, bit(a + b).astype(dtype)


def decode(bits) -> np.ndarray:
    """(N, 9) bits, LSB first -> (N,) integers."""
    bits = np.asarray(bits).astype(np.int64)
    return (bits << np.arange(bits.shape[-1])[None, :]).sum(axis=-1)


@functools.partial(jax.jit, static_argnums=(2, 3))
def _draw(key: jax.Array, pool: jax.Array, n: int, dtype) -> tuple[jax.Array, jax.Array]:
    """n pairs drawn uniformly (with replacement) from ``pool``, encoded."""
    return encode(pool[jax.random.randint(key, (n,), 0, pool.shape[0], dtype=jnp.int32)], dtype)


class Addition(Task):
    name = "addition"
    metric = "val_accuracy"
    metric_label = "exact match"
    higher_is_better = True
    carries_state = False
    defaults = {
        "steps": 600,
        "batch_size": 64,
        "seq_len": STEPS,
        "hidden": 16,
        "embed": 0,
        "lr": 1e-2,
        "schedule": "constant",
        "warmup": 0,
        "clip": 1.0,
    }

    def setup(self, config, info=None) -> AdditionData:
        if int(config.seq_len) != STEPS:
            raise ValueError(f"addition has {STEPS} steps per sequence; seq_len must be {STEPS}, got {config.seq_len}")
        perm = np.random.default_rng(SPLIT_SEED).permutation(2 ** (2 * BITS)).astype(np.int32)
        return AdditionData(train_pool=jnp.asarray(np.sort(perm[N_VAL:])), val=jnp.asarray(np.sort(perm[:N_VAL])))

    def init_params(self, key, config, data) -> dict:
        return init_model(key, 2, 1, config)

    def train_batch(self, data: AdditionData, config, step: int, key) -> dict:
        B = int(config.batch_size)
        x, y = _draw(key, data.train_pool, B, jnp.dtype(config.dtype))
        return {"x": x, "y": y, **stack_key(key, config, B)}

    def logits(self, params, x, lstm_fn, config=None, key=None) -> jax.Array:
        """x: (N, 9, 2) -> logits (N, 9) (dropout with ``config`` and ``key``)."""
        hs, _ = run_stack(lstm_fn, params["lstm"], x, config=config, key=key)
        return jnp.swapaxes(dense(params["head"], hs)[..., 0], 0, 1)

    def loss(self, params, batch, lstm_fn, config=None):
        logits = self.logits(params, batch["x"], lstm_fn, config, batch.get("key"))
        return jnp.mean(optax.sigmoid_binary_cross_entropy(logits, batch["y"])), {}

    def make_evaluator(self, data: AdditionData, config, lstm_fn):
        x, y = encode(data.val, jnp.dtype(config.dtype))

        @jax.jit
        def run(params, x, y):
            logits = self.logits(params, x, lstm_fn)
            exact = jnp.all((logits > 0) == (y > 0.5), axis=-1)
            return jnp.mean(optax.sigmoid_binary_cross_entropy(logits, y)), jnp.mean(exact.astype(jnp.float32))

        def evaluate(params) -> dict[str, float]:
            loss, acc = run(params, x, y)
            return {"val_loss": float(loss), self.metric: float(acc)}

        return evaluate

    def predict(self, params, a, b, lstm_fn) -> np.ndarray:
        """The model's sums of int arrays ``a`` and ``b`` (each 0..255)."""
        pairs = jnp.asarray(np.asarray(a) * 2**BITS + np.asarray(b), jnp.int32)
        x, _ = encode(pairs, params["head"]["w"].dtype)
        return decode(self.logits(params, x, lstm_fn) > 0)

    def baselines(self, data) -> dict[str, float]:
        return {"chance": 2.0**-STEPS}

    def demo(self, params, data: AdditionData, lstm_fn) -> str:
        pairs = np.asarray(data.val[::167][:6])
        a, b = pairs // 2**BITS, pairs % 2**BITS
        got = self.predict(params, a, b, lstm_fn)
        lines = [
            f"  {x:3d} + {y:3d} = {z:3d}  {'ok' if z == x + y else f'wrong, {x + y}'}"
            for x, y, z in zip(a, b, got, strict=True)
        ]
        return "held-out sums:\n" + "\n".join(lines)


TASK = Addition()
