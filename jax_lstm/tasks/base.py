"""What every embedded task provides, and the model pieces the tasks share.

A task owns its data, its head (a dense readout on top of the LSTM), its loss
and its validation metric. The model is always::

    inputs (B, T, ...) --embedding / features--> xs (T, B, D)
        --lstm_stack (lstm, or lstm_ref with --grad autodiff)--> hs (T, B, H_out) --dense head--> outputs (T, B, K)

where the stack has one layer per entry of ``config.hidden`` (an int is one
layer), optionally bidirectional (then ``H_out = 2 H_L``), with
``config.layer_dropout`` between layers and ``config.recurrent_dropout`` on
every layer's h_{t-1} during training.

Arrays handed to and from the trainer are batch-major (the batch is the
leading axis, so a batch can be split over devices); the LSTM itself runs
time-major. A training batch that needs dropout inside the stack holds
``"key"``: (B, 2), the same PRNG key in every row (``stack_key``).

A task reads these fields of the run configuration (attribute access):
``seed``, ``batch_size``, ``seq_len``, ``hidden``, ``bidirectional``,
``layer_dropout``, ``recurrent_dropout``, ``embed``, ``dtype``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from jax_lstm.cell import LSTMState
from jax_lstm.layers import IMPLS, init_stack, lstm_stack

__all__ = [
    "Task",
    "LSTMFn",
    "GRADS",
    "init_dense",
    "dense",
    "hidden_sizes",
    "init_model",
    "out_sizes",
    "zero_carry",
    "stack_key",
    "run_stack",
]

# lstm or lstm_ref: which LSTM the stack runs (the hand-written BPTT or autodiff through lax.scan)
LSTMFn = Callable[..., tuple[jax.Array, LSTMState]]
# The one table of the two implementations (``jax_lstm.layers.IMPLS``), by the names ``--grad`` and
# ``lstm_stack(impl=...)`` take: the hand-written BPTT, or autodiff through lax.scan (the oracle).
GRADS: dict[str, LSTMFn] = IMPLS
_STACK_IMPL = {fn: name for name, fn in IMPLS.items()}  # the name of each function


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
        (truncated BPTT). The trainer then adds ``"carry"`` (the stack's
        state, h, c: (B, H_l) per layer and direction) to each batch and
        reads the final state back from the loss's aux output ``"carry"``.
      causal: whether the target at step t is the input at a later step
        (next-step prediction); a bidirectional stack would then see its
        targets, so ``--bidirectional`` is refused.
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
    causal: bool = False
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
        """Model parameters: a dict with at least ``"lstm"`` (``StackParams``) and ``"head"``."""
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

    def loss(self, params, batch: dict[str, Any], lstm_fn: LSTMFn, config=None) -> tuple[jax.Array, dict[str, Any]]:
        """Scalar training loss and an aux dict (``"carry"``: the stack's final state if ``carries_state``).

        ``config`` gives the stack's dropout rates, applied when the batch holds a ``"key"``; None: no
        dropout inside the stack.
        """
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


def hidden_sizes(config) -> tuple[int, ...]:
    """``config.hidden`` as one size per layer: an int is one layer."""
    h = config.hidden
    return (int(h),) if isinstance(h, int) else tuple(int(x) for x in h)


def out_sizes(config) -> tuple[int, ...]:
    """The size of each layer's h: ``config.proj_size`` where set (LSTMP), else the hidden size."""
    P = int(config.proj_size)
    return tuple(P or h for h in hidden_sizes(config))


def init_model(key: jax.Array, n_in: int, n_out: int, config) -> dict[str, Any]:
    """``{"lstm": StackParams (D=n_in, sizes from config.hidden), "head": dense(H_out -> n_out)}``.

    The stack has ``config``'s LSTM-family options: ``proj_size`` (then ``H_out`` is P per direction),
    ``peephole``, ``layer_norm``.
    """
    k_lstm, k_head = jax.random.split(key)
    dtype = jnp.dtype(config.dtype)
    sizes, bidirectional = hidden_sizes(config), bool(config.bidirectional)
    family = {"proj_size": int(config.proj_size), "peephole": config.peephole, "layer_norm": config.layer_norm}
    return {
        "lstm": init_stack(k_lstm, n_in, sizes, bidirectional=bidirectional, dtype=dtype, **family),
        "head": init_dense(k_head, out_sizes(config)[-1] * (2 if bidirectional else 1), n_out, dtype),
    }


def zero_carry(config, batch_size: int):
    """The stack's zero state: per layer and direction ``LSTMState``, c: (batch_size, H_l), h: (batch_size, P_l)."""
    n_dir = 2 if config.bidirectional else 1
    zeros = lambda h: jnp.zeros((batch_size, h), jnp.dtype(config.dtype))  # noqa: E731
    return tuple(
        tuple(LSTMState(zeros(p), zeros(h)) for _ in range(n_dir))
        for h, p in zip(hidden_sizes(config), out_sizes(config), strict=True)
    )


def stack_key(key: jax.Array, config, batch_size: int) -> dict[str, jax.Array]:
    """``{"key": (B, 2)}`` for a training batch when the stack uses dropout, else ``{}``.

    The key is repeated on every row so that the batch keeps the batch as its leading axis
    (and can be split over devices); ``run_stack`` uses row 0.
    """
    if not (float(config.recurrent_dropout) > 0 or (float(config.layer_dropout) > 0 and len(hidden_sizes(config)) > 1)):
        return {}
    return {"key": jnp.broadcast_to(jax.random.fold_in(key, 1), (batch_size, *key.shape))}


def run_stack(lstm_fn: LSTMFn, params, xs_bm: jax.Array, states0=None, *, config=None, key=None, **kwargs):
    """Run the LSTM stack on batch-major inputs.

    Args:
      lstm_fn: a value of ``GRADS``: ``lstm`` (hand-written BPTT) or ``lstm_ref`` (autodiff).
      params: ``StackParams``.
      xs_bm: (B, T, D) inputs, batch-major.
      states0: the stack's initial state, or None for zeros.
      config: with ``key``, the run configuration whose ``layer_dropout`` and
        ``recurrent_dropout`` apply (training); without both, no dropout (evaluation).
      key: the batch's ``"key"`` (B, 2) from ``stack_key``, or None.
      **kwargs: passed on (``seq_lengths``, ``unroll``).

    Returns:
      ``(hs, final_states)`` with hs: (T, B, H_out), time-major.
    """
    if lstm_fn not in _STACK_IMPL:
        raise ValueError(f"lstm_fn must be jax_lstm.lstm or jax_lstm.lstm_ref, got {lstm_fn!r}")
    if key is not None and config is not None:
        kwargs["key"] = key[0]
        kwargs["dropout"] = float(config.layer_dropout)
        if float(config.recurrent_dropout) > 0:
            kwargs["recurrent_dropout"] = float(config.recurrent_dropout)
    return lstm_stack(params, jnp.swapaxes(xs_bm, 0, 1), states0, impl=_STACK_IMPL[lstm_fn], **kwargs)
