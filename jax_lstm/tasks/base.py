"""What every embedded task provides, and the model pieces the tasks share.

A task owns its data, its head (a dense readout on top of the LSTM), its loss
and its validation metric. The model is always::

    inputs (B, T, ...) --embedding / features--> xs (T, B, D)
        --lstm or lstm_ref--> hs (T, B, H) --dense head--> outputs (T, B, K)

Arrays handed to and from the trainer are batch-major (the batch is the
leading axis, so a batch can be split over devices); the LSTM itself runs
time-major.

A task reads these fields of the run configuration (attribute access):
``seed``, ``batch_size``, ``seq_len``, ``hidden``, ``embed``, ``dtype``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from jax_lstm.cell import LSTMState, init_params

__all__ = ["Task", "LSTMFn", "init_dense", "dense", "run_lstm", "init_model"]

# lstm or lstm_ref: (params, xs, state0) -> (hs, final_state)
LSTMFn = Callable[..., tuple[jax.Array, LSTMState]]


class Task:
    """Interface of an embedded task; one instance per task module (``TASK``).

    Attributes:
      name: registry name, e.g. ``"charlm"``.
      metric: name of the validation metric as it appears in metrics files,
        e.g. ``"val_bpc"``.
      metric_label: human-readable unit of the metric, e.g. ``"bits/char"``.
      higher_is_better: whether a larger metric is better.
      carries_state: whether consecutive training batches continue the same
        sequences, so the LSTM state is carried from one step to the next
        (truncated BPTT). The trainer then adds ``h0`` and ``c0`` (B, H) to
        each batch and reads the final state back from the loss's aux
        output ``"carry"``.
      loss_is_metric: whether the validation loss and the metric are the same
        number (then one plot panel shows both).
      defaults: run-configuration defaults for this task.
    """

    name: str = ""
    metric: str = ""
    metric_label: str = ""
    higher_is_better: bool = False
    carries_state: bool = False
    loss_is_metric: bool = False
    defaults: dict[str, Any] = {}

    def setup(self, config, info: dict[str, Any] | None = None) -> Any:
        """Build the task's data (train/validation splits); deterministic.

        Args:
          config: the run configuration.
          info: what ``info`` returned when the model was created (read back
            from its checkpoint), or None for a new model.
        """
        raise NotImplementedError

    def info(self, data) -> dict[str, Any]:
        """JSON-serialisable facts about the data that a checkpoint must keep (e.g. a vocabulary)."""
        return {}

    def init_params(self, key: jax.Array, config, data) -> dict[str, Any]:
        """Model parameters: a dict with at least ``"lstm"`` (``LSTMParams``) and ``"head"``."""
        raise NotImplementedError

    def train_batch(self, data, config, step: int, key: jax.Array) -> dict[str, Any]:
        """The batch for training step ``step`` (0-based); arrays with the batch as leading axis.

        Args:
          data: from ``setup``.
          config: the run configuration.
          step: global step index; tasks that walk through a fixed corpus use
            it as the data position.
          key: a fresh PRNG key for this step; tasks that draw random
            examples use it.
        """
        raise NotImplementedError

    def loss(self, params, batch: dict[str, Any], lstm_fn: LSTMFn) -> tuple[jax.Array, dict[str, Any]]:
        """Scalar training loss and an aux dict (``"carry"``: final ``LSTMState`` if ``carries_state``)."""
        raise NotImplementedError

    def make_evaluator(self, data, config, lstm_fn: LSTMFn) -> Callable[[Any], dict[str, float]]:
        """A function ``params -> {"val_loss": ..., self.metric: ...}`` over the validation split."""
        raise NotImplementedError

    def baselines(self, data) -> dict[str, float]:
        """Trivial predictors' values of the validation metric, by name."""
        return {}

    def demo(self, params, data, lstm_fn: LSTMFn) -> str | None:
        """A few lines showing what the trained model does (printed after training), or None."""
        return None


def init_dense(key: jax.Array, n_in: int, n_out: int, dtype) -> dict[str, jax.Array]:
    """A dense layer ``{"w": (n_in, n_out), "b": (n_out,)}``, Glorot-uniform weights, zero bias."""
    w = jax.nn.initializers.glorot_uniform()(key, (n_in, n_out), jnp.float32).astype(dtype)
    return {"w": w, "b": jnp.zeros((n_out,), dtype)}


def dense(p: dict[str, jax.Array], hs: jax.Array) -> jax.Array:
    """Apply a dense layer to the last axis: (..., n_in) -> (..., n_out)."""
    lead = (None,) * (hs.ndim - 1)
    return jnp.matmul(hs, p["w"]) + p["b"][lead]


def init_model(key: jax.Array, n_in: int, n_out: int, config) -> dict[str, Any]:
    """``{"lstm": LSTMParams (D=n_in, H=config.hidden), "head": dense(H -> n_out)}``."""
    k_lstm, k_head = jax.random.split(key)
    dtype = jnp.dtype(config.dtype)
    return {
        "lstm": init_params(k_lstm, n_in, config.hidden, dtype=dtype),
        "head": init_dense(k_head, config.hidden, n_out, dtype),
    }


def run_lstm(lstm_fn: LSTMFn, params, xs_bm: jax.Array, state0: LSTMState | None = None, **kwargs):
    """Run the LSTM on batch-major inputs.

    Args:
      lstm_fn: ``lstm`` or ``lstm_ref``.
      params: ``LSTMParams``.
      xs_bm: (B, T, D) inputs, batch-major.
      state0: ``LSTMState`` with h, c: (B, H), or None for zeros.
      **kwargs: passed on (``seq_lengths``, ``unroll``).

    Returns:
      ``(hs, final_state)`` with hs: (T, B, H), time-major.
    """
    return lstm_fn(params, jnp.swapaxes(xs_bm, 0, 1), state0, **kwargs)
