"""A plain NumPy (float64) LSTM layer: the equations of API.md, one batch row and one step at a time.

It shares no code with ``jax_lstm``: every option is implemented literally, the
way the API describes it, so that the masks, resets, lengths, direction and
recurrent dropout of ``lstm`` and ``lstm_ref`` can be checked against it.

    z = (h_{t-1} * keep) @ W + x_t @ U + b          gate blocks [f | i | g | o]
    f, i, o = sigmoid(z_f, z_i, z_o);  g = tanh(z_g)
    c_t = c_{t-1} * f + i * g;  h_t = tanh(c_t) * o

The LSTM family, each part optional and written from its equations:

    projection:  h_t = (tanh(c_t) * o) @ W_proj              W_proj (H, P); h is (B, P), W (P, 4H)
    peepholes:   z_f += c_{t-1} * p[0];  z_i += c_{t-1} * p[1];  z_o += c_t * p[2]
    layer norm:  z = LN(h_{t-1} @ W) * gamma_h + LN(x_t @ U) * gamma_x + b
                 h_t = tanh(LN(c_t) * gamma_c + beta_c) * o   LN over the vector, eps 1e-5

Values only; gradients are checked by finite differences of ``lstm_np``.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["lstm_np", "lstm_np_scalar", "dropout_scale", "length_mask"]


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-z))


def _ln(v: np.ndarray) -> np.ndarray:
    """Layer normalisation of one vector: (v - mean) / sqrt(variance + 1e-5)."""
    n = v.shape[0]
    mean = sum(float(e) for e in v) / n
    var = sum((float(e) - mean) ** 2 for e in v) / n
    return (v - mean) / math.sqrt(var + 1e-5)


def length_mask(seq_lengths, T: int) -> np.ndarray:
    """(T, B) bool: ``t < seq_lengths[b]``, compared as Python ints (never in the lengths' dtype)."""
    lengths = [int(v) for v in np.asarray(seq_lengths).tolist()]
    return np.array([[t < n for n in lengths] for t in range(T)], dtype=bool).reshape(T, len(lengths))


def dropout_scale(keep, rate: float) -> np.ndarray:
    """(B, H) multiplier of h_{t-1}: ``1 / (1 - rate)`` where ``keep`` is True, else 0 (inverted dropout)."""
    keep = np.asarray(keep, dtype=bool)
    return np.where(keep, 1.0 / (1.0 - float(rate)), 0.0)


def lstm_np(
    W,
    U,
    b,
    xs,
    h0=None,
    c0=None,
    *,
    seq_lengths=None,
    mask=None,
    resets=None,
    hr=None,
    cr=None,
    keep_scale=None,
    reverse: bool = False,
    time_major: bool = True,
    gate_fn=None,
    activation_fn=None,
    W_proj=None,
    peephole=None,
    norm=None,
):
    """Run one LSTM layer over a sequence, in float64, with a Python loop over rows and steps.

    Args:
      W: (H, 4H) recurrent weights.
      U: (D, 4H) input weights.
      b: (4H,) bias.
      xs: (T, B, D) inputs, or (B, T, D) with ``time_major=False``.
      h0, c0: (B, H) initial state; None means zeros.
      seq_lengths: optional (B,) lengths; step t of row b runs only if t < seq_lengths[b] (Python ints).
      mask: optional (T, B) bool ((B, T) with ``time_major=False``); False skips the step.
      resets: optional (T, B) bool ((B, T) with ``time_major=False``); True sets the state to (hr, cr)
        just before step t is visited, whether or not the step runs.
      hr, cr: (B, H) the state a reset restores; None means zeros.
      keep_scale: optional (B, H) multiplier of h_{t-1} in the ``h @ W`` term only (recurrent dropout);
        the carried state itself is not scaled.
      reverse: visit the steps T-1 down to 0.
      time_major: layout of xs, mask, resets and the returned hs.
      gate_fn, activation_fn: NumPy element-wise functions for the gates (default the logistic
        sigmoid) and for g and c_t (default tanh).
      W_proj: optional (H, P) projection of the output; h, h0, hr, keep_scale and hs are then of size P.
      peephole: optional (3, H) peephole weights, rows f, i, o.
      norm: optional (gamma_x (4H,), gamma_h (4H,), gamma_c (H,), beta_c (H,)) of the layer-normalised LSTM.

    Returns:
      (hs, h, c): hs (T, B, H) (or (B, T, H)), zero at skipped steps; h, c (B, H) the state after
      the last step visited (resets included).
    """
    W, U, b = (np.asarray(a, dtype=np.float64) for a in (W, U, b))
    xs = np.asarray(xs, dtype=np.float64)
    if not time_major:
        xs = xs.transpose(1, 0, 2)
        mask = None if mask is None else np.asarray(mask).T
        resets = None if resets is None else np.asarray(resets).T
    T, B, _ = xs.shape
    H = U.shape[1] // 4
    N = H if W_proj is None else np.asarray(W_proj).shape[1]  # the size of h
    Wp = None if W_proj is None else np.asarray(W_proj, dtype=np.float64)
    peep = None if peephole is None else np.asarray(peephole, dtype=np.float64)
    gx, gh, gc, bc = (None,) * 4 if norm is None else (np.asarray(a, dtype=np.float64) for a in norm)
    h0 = np.zeros((B, N)) if h0 is None else np.asarray(h0, dtype=np.float64)
    c0 = np.zeros((B, H)) if c0 is None else np.asarray(c0, dtype=np.float64)
    hr = np.zeros((B, N)) if hr is None else np.asarray(hr, dtype=np.float64)
    cr = np.zeros((B, H)) if cr is None else np.asarray(cr, dtype=np.float64)
    sig = _sigmoid if gate_fn is None else gate_fn
    act = np.tanh if activation_fn is None else activation_fn
    scale = np.ones((B, N)) if keep_scale is None else np.asarray(keep_scale, dtype=np.float64)
    lengths = None if seq_lengths is None else [int(v) for v in np.asarray(seq_lengths).tolist()]
    mask = None if mask is None else np.asarray(mask, dtype=bool)
    resets = None if resets is None else np.asarray(resets, dtype=bool)

    hs = np.zeros((T, B, N))
    h_out, c_out = np.zeros((B, N)), np.zeros((B, H))
    order = range(T - 1, -1, -1) if reverse else range(T)
    for r in range(B):
        h, c = h0[r].copy(), c0[r].copy()
        for t in order:
            if resets is not None and resets[t, r]:
                h, c = hr[r].copy(), cr[r].copy()
            runs = True
            if mask is not None and not mask[t, r]:
                runs = False
            if lengths is not None and not t < lengths[r]:
                runs = False
            if not runs:
                continue
            rec, inp = (h * scale[r]) @ W, xs[t, r] @ U
            if norm is not None:
                rec, inp = _ln(rec) * gh, _ln(inp) * gx
            z = rec + inp + b
            z_f, z_i, z_g, z_o = z[0:H], z[H : 2 * H], z[2 * H : 3 * H], z[3 * H : 4 * H]
            if peep is not None:
                z_f, z_i = z_f + c * peep[0], z_i + c * peep[1]
            f = sig(z_f)
            i = sig(z_i)
            g = act(z_g)
            c = c * f + i * g
            if peep is not None:
                z_o = z_o + c * peep[2]
            o = sig(z_o)
            h = act(c if norm is None else _ln(c) * gc + bc) * o
            if Wp is not None:
                h = h @ Wp
            hs[t, r] = h
        h_out[r], c_out[r] = h, c
    if not time_major:
        hs = hs.transpose(1, 0, 2)
    return hs, h_out, c_out


def lstm_np_scalar(w, u, b, xs, seq_length: int):
    """The one-unit case (D = H = 1, one row) with Python floats, fast enough for T of 10^5 steps.

    Args:
      w: (1, 4) recurrent weights, u: (1, 4) input weights, b: (4,) bias, as nested lists or arrays.
      xs: (T,) inputs of the row.
      seq_length: the row's length (a Python int); steps t >= seq_length are skipped.

    Returns:
      (hs, h, c): hs a list of T floats (0.0 at skipped steps), and the final state.
    """
    w = [float(v) for v in np.asarray(w, dtype=np.float64).ravel()]
    u = [float(v) for v in np.asarray(u, dtype=np.float64).ravel()]
    b = [float(v) for v in np.asarray(b, dtype=np.float64).ravel()]
    xs = [float(v) for v in np.asarray(xs, dtype=np.float64).ravel()]
    sig = lambda z: 1.0 / (1.0 + math.exp(-z))  # noqa: E731
    h = c = 0.0
    hs = [0.0] * len(xs)
    for t, x in enumerate(xs):
        if not t < seq_length:
            continue
        z = [h * w[k] + x * u[k] + b[k] for k in range(4)]
        c = c * sig(z[0]) + sig(z[1]) * math.tanh(z[2])
        h = math.tanh(c) * sig(z[3])
        hs[t] = h
    return hs, h, c
