"""Where a forward step of ``lstm`` spends its time on the CPU, and designs of the forward measured against it.

Three measurements, each over the standard shapes of ``jax-lstm bench`` (float32, one layer, forward only,
no gradient), each in one process; the numbers and what they mean are in ``docs/cpu-forward.md``:

    python bench/cpu_forward.py profile   # the thunks of the compiled loop body, µs per step (jax.profiler)
    python bench/cpu_forward.py ablate    # the same parts by ablation, without the profiler's overhead
    python bench/cpu_forward.py ab        # forward designs against ``lstm`` and torch.nn.LSTM, interleaved

``ab NAMES`` times only the named designs (comma-separated; the first is the baseline of the ratios);
``--shapes T,B,D,H;...`` and ``--seconds S`` change the shapes and the time given to each shape.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import math
import shutil
import tempfile

import jax
import jax.numpy as jnp

from jax_lstm.bench.layer import DEFAULT_SHAPES, measure_peak, torch_variant
from jax_lstm.bench.timing import block, interleave
from jax_lstm.bench.variant import problem
from jax_lstm.bptt import lstm
from jax_lstm.cell import LSTMParams, cell_update, gate_activations

# --------------------------------------------------------------------------------------------------
# Designs of the forward: (W, U, b, xs) -> (hs, h_T, c_T), zero initial state, default activations.


def _step(c, z):
    """(h_t, c_t) from c_{t-1} and the pre-activations z_t, as ``lstm`` computes them."""
    c_new, _, h_new = cell_update(c, gate_activations(z))
    return h_new, c_new


def _zeros(xs, W):
    return jnp.zeros((xs.shape[1], W.shape[0]), xs.dtype)


def _scan(step, carry, xs):
    carry, hs = jax.lax.scan(step, carry, xs)
    return carry, hs


def current(W, U, b, xs):
    """``lstm`` itself: xs @ U hoisted, ``lax.scan`` over its rows, one tanh over the four gates."""
    hs, (h, c) = lstm(LSTMParams(W, U, b), xs)
    return hs, h, c


def unroll2(W, U, b, xs):
    """``lstm`` with unroll=2."""
    hs, (h, c) = lstm(LSTMParams(W, U, b), xs, unroll=2)
    return hs, h, c


def fori_inplace(W, U, b, xs):
    """The saving forward's loop: ``fori_loop`` reading row t of xs @ U and writing hs[t] in place."""
    T = xs.shape[0]
    xp = jnp.einsum("tbd,dg->tbg", xs, U)

    def body(t, carry):
        h, c, hs = carry
        h, c = _step(c, xp[t] + b + h @ W)
        return h, c, jax.lax.dynamic_update_index_in_dim(hs, h, t, 0)

    h0 = _zeros(xs, W)
    h, c, hs = jax.lax.fori_loop(0, T, body, (h0, h0, jnp.zeros((T, *h0.shape), xs.dtype)))
    return hs, h, c


def x_in_loop(W, U, b, xs):
    """x_t @ U inside the loop, a second matmul per step, instead of hoisted."""

    def step(carry, x):
        h, c = _step(carry[1], x @ U + b + carry[0] @ W)
        return (h, c), h

    h0 = _zeros(xs, W)
    (h, c), hs = _scan(step, (h0, h0), xs)
    return hs, h, c


def concat_hx(W, U, b, xs):
    """[h_{t-1}, x_t] @ [W; U]: one matmul per step over H + D rows."""
    WU = jnp.concatenate([W, U], 0)

    def step(carry, x):
        h, c = _step(carry[1], jnp.concatenate([carry[0], x], -1) @ WU + b)
        return (h, c), h

    h0 = _zeros(xs, W)
    (h, c), hs = _scan(step, (h0, h0), xs)
    return hs, h, c


def carry_hx(W, U, b, xs):
    """As ``concat_hx``, but the carry is [h_{t-1} | x_t] itself, written by the step before."""
    H = W.shape[0]
    WU = jnp.concatenate([W, U], 0)
    x_next = jnp.concatenate([xs[1:], jnp.zeros_like(xs[:1])], 0)

    def step(carry, x1):
        h, c = _step(carry[1], carry[0] @ WU + b)
        return (jnp.concatenate([h, x1], -1), c), h

    h0 = _zeros(xs, W)
    (hx, c), hs = _scan(step, (jnp.concatenate([h0, xs[0]], -1), h0), x_next)
    return hs, hx[:, :H], c


def chunked(W, U, b, xs, K=10):
    """xs @ U for K steps at a time, just before those steps run (their rows are still in cache)."""
    T, B, D = xs.shape
    K = math.gcd(T, K)
    xc = xs.reshape(T // K, K, B, D)

    def outer(carry, xk):
        def step(carry, x):
            h, c = _step(carry[1], x + b + carry[0] @ W)
            return (h, c), h

        return _scan(step, carry, jnp.einsum("tbd,dg->tbg", xk, U))

    h0 = _zeros(xs, W)
    (h, c), hs = _scan(outer, (h0, h0), xc)
    return hs.reshape(T, B, -1), h, c


def bias_hoisted(W, U, b, xs):
    """The bias added to xs @ U before the loop instead of inside the step."""
    xp = jnp.einsum("tbd,dg->tbg", xs, U) + b

    def step(carry, x):
        h, c = _step(carry[1], x + carry[0] @ W)
        return (h, c), h

    h0 = _zeros(xs, W)
    (h, c), hs = _scan(step, (h0, h0), xp)
    return hs, h, c


def sep_act(W, U, b, xs):
    """jax.nn.sigmoid on f, i, o and tanh on g, instead of one scaled tanh over all four gates."""
    xp = jnp.einsum("tbd,dg->tbg", xs, U)

    def step(carry, x):
        h, c = carry
        f, i, g, o = jnp.split(x + b + h @ W, 4, -1)
        c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
        h = jax.nn.sigmoid(o) * jnp.tanh(c)
        return (h, c), h

    h0 = _zeros(xs, W)
    (h, c), hs = _scan(step, (h0, h0), xp)
    return hs, h, c


def one_output(W, U, b, xs):
    """c_t and h_t as one (2, B, H) carry, so that the step's element-wise work could be one fusion."""
    xp = jnp.einsum("tbd,dg->tbg", xs, U)

    def step(ch, x):
        h, c = _step(ch[0], x + b + ch[1] @ W)
        return jnp.stack([c, h]), h

    h0 = _zeros(xs, W)
    ch, hs = _scan(step, jnp.stack([h0, h0]), xp)
    return hs, ch[1], ch[0]


def h_in_hs(W, U, b, xs):
    """No h in the carry: step t reads h_{t-1} from row t of a (T + 1, B, H) buffer whose row 0 is h0 and
    writes h_t into row t + 1, so that computing h_t and storing it can be one in-place fusion."""
    T = xs.shape[0]
    xp = jnp.einsum("tbd,dg->tbg", xs, U)

    def body(t, carry):
        c, hs = carry
        h, c = _step(c, xp[t] + b + jax.lax.dynamic_index_in_dim(hs, t, keepdims=False) @ W)
        return c, jax.lax.dynamic_update_index_in_dim(hs, h, t + 1, 0)

    h0 = _zeros(xs, W)
    c, hs = jax.lax.fori_loop(0, T, body, (h0, jnp.zeros((T + 1, *h0.shape), xs.dtype)))
    return hs[1:], hs[T], c


def transposed(W, U, b, xs):
    """The state as (H, B) columns: z^T = W^T h^T + (xs U)^T + b, gate blocks are row blocks."""
    H = W.shape[0]
    WT, xpT, bT = W.T, jnp.einsum("dg,tbd->tgb", U, xs), b[:, None]
    a = jnp.concatenate([jnp.full((2 * H,), 0.5), jnp.ones((H,)), jnp.full((H,), 0.5)]).astype(xs.dtype)[:, None]

    def step(carry, x):
        h, c = carry
        f, i, g, o = jnp.split(a * jnp.tanh(a * (x + bT + WT @ h)) + (1 - a), 4, 0)
        c = c * f + i * g
        h = jnp.tanh(c) * o
        return (h, c), h

    h0 = _zeros(xs, W).T
    (h, c), hs = _scan(step, (h0, h0), xpT)
    return jnp.swapaxes(hs, 1, 2), h.T, c.T


def split2(W, U, b, xs):
    """The batch as two independent recurrences in one loop body, which XLA:CPU may run concurrently."""
    xp = jnp.einsum("tbd,dg->tbg", xs, U)

    def step(carry, x):
        new = [_step(c, xx + b + h @ W) for (h, c), xx in zip(carry, jnp.split(x, 2, 0), strict=True)]
        return tuple(new), jnp.concatenate([h for h, _ in new], 0)

    h0 = _zeros(xs, W)[: xs.shape[1] // 2]
    ((ha, ca), (hb, cb)), hs = _scan(step, ((h0, h0), (h0, h0)), xp)
    return hs, jnp.concatenate([ha, hb]), jnp.concatenate([ca, cb])


DESIGNS = dict(
    current=current,
    fori_inplace=fori_inplace,
    unroll2=unroll2,
    x_in_loop=x_in_loop,
    concat_hx=concat_hx,
    carry_hx=carry_hx,
    chunked=chunked,
    bias_hoisted=bias_hoisted,
    sep_act=sep_act,
    one_output=one_output,
    h_in_hs=h_in_hs,
    transposed=transposed,
    split2=split2,
)


def _arrays(shape):
    p, xs, _ = problem(shape)
    return (*(jnp.asarray(a) for a in p[:3]), jnp.asarray(xs))


# --------------------------------------------------------------------------------------------------
# The three measurements.


def profile(shapes, reps: int = 10) -> None:
    """Every thunk of the compiled forward with its µs per step (per call for those outside the loop)."""
    for shape in shapes:
        args = _arrays(shape)
        f = jax.jit(current).lower(*args).compile()
        for _ in range(10):
            block(f(*args))
        d = tempfile.mkdtemp()
        jax.profiler.start_trace(d)
        for _ in range(reps):
            block(f(*args))
        jax.profiler.stop_trace()
        (trace,) = glob.glob(f"{d}/**/*.trace.json.gz", recursive=True)
        events = json.load(gzip.open(trace))["traceEvents"]
        shutil.rmtree(d)
        total = collections.defaultdict(float)
        count = collections.Counter()
        for e in events:
            if e.get("ph") == "X" and not e["name"].startswith(("$", "end:")):
                total[e["name"]] += e["dur"]
                count[e["name"]] += 1
        T = shape[0]
        print(f"{shape}: µs per step (thunks run T times) or per call")
        for name in sorted(total, key=total.get, reverse=True)[:14]:
            per_step = count[name] // reps == T or name.startswith("while")  # the loop itself: all T steps
            unit = "/step" if per_step else "/call"
            print(f"  {name[:52]:<52} {total[name] / reps / (T if per_step else 1):9.2f} {unit}")


def _loop(xp, W, b, *, dot=True, gates=True, write=True):
    """The forward's loop over a given xs @ U, with parts left out: h @ W (replaced by h tiled four
    times), the gate activations, the write of hs[t]."""

    def step(carry, x):
        h, c = carry
        z = x + b + (h @ W if dot else jnp.concatenate([h] * 4, -1))
        c_new, _, h_new = cell_update(c, gate_activations(z) if gates else z)
        return (h_new, c_new), (h_new if write else None)

    h0 = jnp.zeros((xp.shape[1], W.shape[0]), xp.dtype)
    (h, c), hs = jax.lax.scan(step, (h0, h0), xp)
    return hs, h, c


def ablate(shapes, seconds: float) -> None:
    """The parts of a step by difference of whole loops, each compiled on its own, timed interleaved."""
    for shape in shapes:
        W, U, b, xs = _arrays(shape)
        xp = jnp.einsum("tbd,dg->tbg", xs, U)
        loops = dict(loop={}, no_dot=dict(dot=False), no_gates=dict(gates=False), no_write=dict(write=False))
        loops["bare"] = dict(dot=False, gates=False, write=False)
        fs = {"full": (jax.jit(current), (W, U, b, xs)), "xs@U": (jax.jit(lambda x, u: x @ u), (xs, U))}
        for k, kw in loops.items():
            fs[k] = (jax.jit(lambda xp, W, b, kw=kw: _loop(xp, W, b, **kw)), (xp, W, b))
        steps = {k: (lambda f=f, a=a: block(f(*a)),) for k, (f, a) in fs.items()}
        tv = torch_variant(shape)
        if tv is not None:
            steps["torch"] = (tv.fwd,)
        t = interleave(steps, seconds=seconds)
        us = {k: 1e6 * v[0] / shape[0] for k, v in t.seconds.items()}
        parts = dict(
            full=us["full"],
            xs_at_U=us["xs@U"],
            loop=us["loop"],
            dot=us["loop"] - us["no_dot"],
            gates=us["loop"] - us["no_gates"],
            write_hs=us["loop"] - us["no_write"],
            bare=us["bare"],
            torch=us.get("torch"),
        )
        print(f"{shape} reps {t.reps}: µs per step " + "  ".join(f"{k} {v:.2f}" for k, v in parts.items() if v))


def ab(shapes, names, seconds: float) -> None:
    """The designs ``names`` and torch.nn.LSTM, forward only, interleaved; ratios to the first design."""
    for shape in shapes:
        args = _arrays(shape)
        steps, ref = {}, None
        for n in names:
            f = jax.jit(DESIGNS[n]).lower(*args).compile()
            out = f(*args)
            ref = out if ref is None else ref
            err = max(float(jnp.max(jnp.abs(a - r))) for a, r in zip(out, ref, strict=True))
            assert err < 1e-4, (n, err)  # the same values, up to float32 rounding
            steps[n] = (lambda f=f, args=args: block(f(*args)),)
        tv = torch_variant(shape)
        if tv is not None:
            steps["torch"] = (tv.fwd,)
        t = interleave(steps, seconds=seconds)
        base = t.seconds[names[0]][0]
        cells = "  ".join(f"{n} {1e3 * v[0]:.3f} ms ({v[0] / base:.2f})" for n, v in t.seconds.items())
        print(f"{shape} reps {t.reps}: {cells}", flush=True)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("what", choices=("profile", "ablate", "ab"))
    ap.add_argument("names", nargs="?", default=",".join(DESIGNS), help="designs for ab, comma-separated")
    ap.add_argument("--shapes", default=";".join(",".join(map(str, s)) for s in DEFAULT_SHAPES))
    ap.add_argument("--seconds", type=float, default=20.0)
    a = ap.parse_args(argv)
    shapes = [tuple(int(n) for n in s.split(",")) for s in a.shapes.split(";")]
    print(f"matmul peak: {measure_peak():.1f} GFLOP/s", flush=True)
    if a.what == "profile":
        profile(shapes)
    elif a.what == "ablate":
        ablate(shapes, a.seconds)
    else:
        ab(shapes, a.names.split(","), a.seconds)


if __name__ == "__main__":
    main()
