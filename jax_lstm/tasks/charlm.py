"""``charlm``: a character-level language model on the text of ``pydoc_data.topics``.

The corpus ships with Python: the values of ``pydoc_data.topics.topics``
joined in sorted key order (about 465k characters). The text is cut into
blocks of 8192 characters; every tenth block (blocks 9, 19, 29, ...) goes to
the validation split, the rest, in order, to the training split. (Topics are
sorted by name, so a plain "last 10%" would hold only the pages on built-in
types.) The vocabulary is every character of the corpus, sorted.

Training walks through the training text as ``batch_size`` parallel streams
(the text cut into that many contiguous pieces), one window of ``seq_len``
characters per step; the LSTM state is carried from one window to the next
and reset when the walk starts over (truncated BPTT). The data position is
therefore the step index.

Model: an embedding (V, E) -> LSTM stack (``config.hidden``: one size per
layer) -> dropout (training only, rate ``config.dropout``) -> dense head
(H_L, V). Bidirectional stacks are refused: they would read the characters
they are asked to predict. Loss and metric:
cross-entropy in bits per character; the unigram baseline is the
cross-entropy of the training split's character frequencies (add-one
smoothed) on the validation split.
"""

from __future__ import annotations

import functools
import hashlib
import math
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jax_lstm.layers import lstm_stack
from jax_lstm.tasks.base import LSTMFn, Task, dense, init_model, out_sizes, run_stack, stack_key

__all__ = ["CharLM", "TASK", "corpus", "CharData", "sample"]

BLOCK = 8192  # characters per block of the train/validation split
VAL_EVERY = 10  # every tenth block is validation
VAL_STREAMS = 32  # the validation text is scored as this many contiguous streams
LN2 = math.log(2.0)


def corpus() -> str:
    """The text: ``pydoc_data.topics.topics`` values joined in sorted key order."""
    from pydoc_data.topics import topics

    return "".join(topics[k] for k in sorted(topics))


@dataclass(frozen=True)
class CharData:
    """The encoded corpus and the training streams."""

    vocab: str  # every character of the corpus, sorted; id = position
    train: np.ndarray  # (N_train,) int32 character ids
    val: np.ndarray  # (N_val,) int32
    streams: np.ndarray  # (B, L) int32: the training text as B contiguous streams
    n_windows: int  # windows of seq_len characters per pass over the streams
    corpus_sha256: str


def encode(text: str, vocab: str) -> np.ndarray:
    """Characters -> int32 ids. Raises ValueError naming characters not in ``vocab``."""
    index = {ch: i for i, ch in enumerate(vocab)}
    missing = sorted(set(text) - set(index))
    if missing:
        raise ValueError(f"characters not in the model's vocabulary: {''.join(missing)!r}")
    return np.fromiter((index[ch] for ch in text), dtype=np.int32, count=len(text))


def decode(ids, vocab: str) -> str:
    """int ids -> text."""
    return "".join(vocab[int(i)] for i in np.asarray(ids).ravel())


def split(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(train, val): every ``VAL_EVERY``-th block of ``BLOCK`` characters is validation."""
    block = np.arange(len(ids)) // BLOCK
    is_val = block % VAL_EVERY == VAL_EVERY - 1
    return ids[~is_val], ids[is_val]


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def dropout_mask(key: jax.Array, shape: tuple[int, ...], rate: float, dtype) -> jax.Array:
    """Inverted-dropout multipliers of ``shape``: 0 with probability ``rate``, else 1 / (1 - rate)."""
    keep = jax.random.bernoulli(key, 1.0 - rate, shape)
    return keep.astype(dtype) / jnp.asarray(1.0 - rate, dtype)


class CharLM(Task):
    name = "charlm"
    metric = "val_bpc"
    metric_label = "bits/char"
    higher_is_better = False
    carries_state = True
    loss_is_metric = True
    causal = True  # next-character prediction
    defaults = {
        "steps": 5000,
        "batch_size": 32,
        "seq_len": 100,
        "hidden": 256,
        "embed": 64,
        "lr": 3e-3,
        "schedule": "cosine",
        "warmup": 100,
        "clip": 1.0,
        "dropout": 0.2,
        "time_limit": 480.0,
    }

    def setup(self, config, info=None) -> CharData:
        """Encode the corpus and cut it into streams.

        Args:
          config: reads ``batch_size`` and ``seq_len``.
          info: ``{"vocab", "corpus_sha256"}`` of an existing model (from its
            checkpoint); None builds the vocabulary from the corpus.
        """
        text = corpus()
        vocab = "".join(sorted(set(text))) if info is None else info["vocab"]
        ids = encode(text, vocab)
        train, val = split(ids)
        B, T = int(config.batch_size), int(config.seq_len)
        L = len(train) // B
        n_windows = (L - 1) // T
        if n_windows < 1:
            raise ValueError(f"batch_size {B} x seq_len {T} is too large for the {len(train)}-character training text")
        streams = train[: B * L].reshape(B, L)
        sha = hashlib.sha256(text.encode("utf-8")).hexdigest()
        return CharData(vocab, train, val, streams, n_windows, sha)

    def info(self, data: CharData) -> dict:
        return {"vocab": data.vocab, "corpus_sha256": data.corpus_sha256}

    def init_params(self, key, config, data: CharData) -> dict:
        k_emb, k_model = jax.random.split(key)
        dtype = jnp.dtype(config.dtype)
        V = len(data.vocab)
        params = init_model(k_model, int(config.embed), V, config)
        params["embed"] = jax.random.normal(k_emb, (V, int(config.embed)), jnp.float32).astype(dtype)
        return params

    def train_batch(self, data: CharData, config, step: int, key) -> dict:
        """Window ``step mod n_windows`` of every stream; ``reset`` is True at the first window.

        With ``config.dropout`` > 0 the batch also holds ``drop`` (B, T, H_L), the
        dropout multipliers of the LSTM outputs, drawn from ``key``; with dropout inside
        the stack, ``key`` (see ``stack_key``).
        """
        T = int(config.seq_len)
        w = int(step) % data.n_windows
        chunk = data.streams[:, w * T : (w + 1) * T + 1]
        B = chunk.shape[0]
        batch = {"x": chunk[:, :-1], "y": chunk[:, 1:], "reset": np.full((B,), w == 0)}
        rate = float(getattr(config, "dropout", 0.0) or 0.0)
        if rate > 0:
            batch["drop"] = dropout_mask(key, (B, T, out_sizes(config)[-1]), rate, jnp.dtype(config.dtype))
        return {**batch, **stack_key(key, config, B)}

    def logits(self, params, x_bm: jax.Array, state0, lstm_fn: LSTMFn, drop=None, config=None, key=None):
        """x_bm: (B, T) ids -> logits (T, B, V) and the stack's final state.

        ``state0``: the stack's state (h, c: (B, H_l) per layer) or None; ``drop``: (B, T, H_L) or None;
        ``config`` and ``key``: dropout inside the stack (training).
        """
        xs = params["embed"][x_bm]  # (B, T, E)
        hs, final = run_stack(lstm_fn, params["lstm"], xs, state0, config=config, key=key)
        if drop is not None:
            hs = hs * jnp.swapaxes(drop, 0, 1)
        return dense(params["head"], hs), final

    def loss(self, params, batch, lstm_fn, config=None):
        keep = jnp.logical_not(batch["reset"])[:, None]  # (B, 1): False where the walk starts over
        state0 = jax.tree.map(lambda a: jnp.where(keep, a, jnp.zeros_like(a)), batch["carry"])
        logits, final = self.logits(params, batch["x"], state0, lstm_fn, batch.get("drop"), config, batch.get("key"))
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.swapaxes(batch["y"], 0, 1))
        return jnp.mean(ce) / LN2, {"carry": jax.tree.map(jax.lax.stop_gradient, final)}

    def _val_streams(self, data: CharData):
        """Inputs, targets and mask (VAL_STREAMS, L): every validation character after the first is a target."""
        n = len(data.val) - 1
        L = -(-n // VAL_STREAMS)
        pad = VAL_STREAMS * L - n
        x = np.concatenate([data.val[:-1], np.zeros(pad, np.int32)]).reshape(VAL_STREAMS, L)
        y = np.concatenate([data.val[1:], np.zeros(pad, np.int32)]).reshape(VAL_STREAMS, L)
        mask = np.concatenate([np.ones(n, bool), np.zeros(pad, bool)]).reshape(VAL_STREAMS, L)
        return x, y, mask

    def make_evaluator(self, data: CharData, config, lstm_fn):
        x, y, mask = (jnp.asarray(a) for a in self._val_streams(data))

        @jax.jit
        def bits(params, x, y, mask):
            logits, _ = self.logits(params, x, None, lstm_fn)
            ce = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.swapaxes(y, 0, 1))
            m = jnp.swapaxes(mask, 0, 1).astype(ce.dtype)
            return jnp.sum(ce * m) / jnp.sum(m) / LN2

        def evaluate(params) -> dict[str, float]:
            v = float(bits(params, x, y, mask))
            return {"val_loss": v, self.metric: v}

        return evaluate

    def baselines(self, data: CharData) -> dict[str, float]:
        V = len(data.vocab)
        counts = np.bincount(data.train, minlength=V).astype(np.float64) + 1.0
        logp = np.log2(counts / counts.sum())
        return {"unigram": float(-logp[data.val[1:]].mean())}

    def demo(self, params, data: CharData, lstm_fn) -> str:
        prompt = "The "
        text = sample(params, data.vocab, prompt, 300, temperature=0.8, seed=0)
        return f"sample (prompt {prompt!r}, temperature 0.8, seed 0):\n{prompt}{text}"


TASK = CharLM()


@functools.partial(jax.jit, static_argnames=("length",))
def _generate(params, prompt_ids, key, temperature, length: int):
    xs = params["embed"][prompt_ids][:, None, :]  # (P, 1, E)
    hs, states = lstm_stack(params["lstm"], xs)
    logits = dense(params["head"], hs[-1])  # (1, V)

    def body(carry, k):
        states, logits = carry
        c = jax.random.categorical(k, logits / temperature, axis=-1)  # (1,)
        hs, states = lstm_stack(params["lstm"], params["embed"][c][None], states)  # one step of every layer
        return (states, dense(params["head"], hs[0])), c[0]

    _, out = jax.lax.scan(body, (states, logits), jax.random.split(key, length))
    return out


def sample(params, vocab: str, prompt: str, length: int, temperature: float = 1.0, seed: int = 0) -> str:
    """Generate ``length`` characters after ``prompt``.

    Args:
      params: charlm parameters (``embed``, ``lstm``: a unidirectional stack, ``head``).
      vocab: the model's vocabulary.
      prompt: non-empty text made of vocabulary characters; the LSTM reads it first.
      length: number of characters to generate.
      temperature: > 0; logits are divided by it before sampling.
      seed: PRNG seed.

    Returns:
      The generated text (without the prompt).
    """
    if not prompt:
        raise ValueError("prompt must not be empty")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if length < 0:
        raise ValueError(f"length must be >= 0, got {length}")
    if length == 0:
        return ""
    ids = jnp.asarray(encode(prompt, vocab))
    dtype = params["embed"].dtype
    out = _generate(params, ids, jax.random.PRNGKey(seed), jnp.asarray(temperature, dtype), int(length))
    return decode(out, vocab)
