"""``jax-lstm gradcheck``: the hand-written BPTT against autodiff and finite differences.

For a few configurations it compares ``jax.vjp`` of ``lstm`` with that of
``lstm_ref`` (random cotangents on hs, h_T and c_T at once) for every input
(W, U, b, xs, h0, c0), in float32 and float64, and checks ``lstm``'s gradient
against central finite differences in float64. Exit code 1 if any error
exceeds its tolerance.
"""

from __future__ import annotations

import argparse
import sys
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jax_lstm.bptt import lstm
from jax_lstm.cell import LSTMParams, LSTMState, hidden_out_size, init_params
from jax_lstm.reference import lstm_ref

__all__ = ["random_problem", "random_like", "rel_err", "vjp_errors", "fd_error", "main"]

TOLERANCE = {"float64": 1e-10, "float32": 1e-5}
FD_TOLERANCE = 1e-6


def random_problem(seed: int, T: int, B: int, D: int, H: int, dtype=jnp.float64, with_state: bool = True):
    """Params moved away from their init so every gate is exercised, xs (T, B, D) and state0.

    Returns:
      (params, xs, state0); state0 is None unless ``with_state``.
    """
    ks = jax.random.split(jax.random.PRNGKey(seed), 7)
    p = init_params(ks[0], D, H, dtype=dtype)
    p = LSTMParams(*(a + 0.5 * jax.random.normal(k, a.shape, dtype) for a, k in zip(p[:3], ks[1:4], strict=True)))
    xs = jax.random.normal(ks[4], (T, B, D), dtype)
    s0 = None
    if with_state:
        s0 = LSTMState(jax.random.normal(ks[5], (B, H), dtype), jax.random.normal(ks[6], (B, H), dtype))
    return p, xs, s0


def random_like(seed: int, tree):
    """A random pytree shaped like ``tree``, e.g. a cotangent for every output."""
    leaves, treedef = jax.tree.flatten(tree)
    keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
    return jax.tree.unflatten(
        treedef, [jax.random.normal(k, a.shape, a.dtype) for k, a in zip(keys, leaves, strict=True)]
    )


def _rel(x, y) -> float:
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    return float(np.max(np.abs(x - y), initial=0.0) / max(np.max(np.abs(y), initial=0.0), 1e-300))


def rel_err(a, b) -> float:
    """max |a - b| / max |b|, the largest over the leaves of two pytrees."""
    return max(jax.tree.leaves(jax.tree.map(_rel, a, b)), default=0.0)


class VJPErrors(NamedTuple):
    """Per input: (max absolute error, relative error) of ``lstm``'s VJP against ``lstm_ref``'s."""

    values: tuple[float, float]
    grads: dict[str, tuple[float, float]]


def vjp_errors(params, xs, state0, *, seed: int = 0, **kwargs) -> VJPErrors:
    """Compare values and VJPs of ``lstm`` and ``lstm_ref`` with one random cotangent on all outputs."""
    if state0 is None:
        B, H = xs.shape[1], params.U.shape[1] // 4
        N = hidden_out_size(params)  # the size of h: P with a projection
        state0 = LSTMState(jnp.zeros((B, N), xs.dtype), jnp.zeros((B, H), xs.dtype))

    def run(fn):
        return jax.vjp(lambda p, x, s: fn(p, x, s, **kwargs), params, xs, state0)

    out_m, vjp_m = run(lstm)
    out_r, vjp_r = run(lstm_ref)
    ct = random_like(seed + 1, out_r)
    (gp_m, gx_m, gs_m), (gp_r, gx_r, gs_r) = vjp_m(ct), vjp_r(ct)
    named_m = {"W": gp_m.W, "U": gp_m.U, "b": gp_m.b, "xs": gx_m, "h0": gs_m.h, "c0": gs_m.c}
    named_r = {"W": gp_r.W, "U": gp_r.U, "b": gp_r.b, "xs": gx_r, "h0": gs_r.h, "c0": gs_r.c}
    grads = {
        k: (
            float(np.max(np.abs(np.asarray(named_m[k], np.float64) - np.asarray(named_r[k], np.float64)))),
            _rel(named_m[k], named_r[k]),
        )
        for k in named_r
    }
    max_abs = max(
        float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))
        for a, b in zip(jax.tree.leaves(out_m), jax.tree.leaves(out_r), strict=True)
    )
    return VJPErrors((max_abs, rel_err(out_m, out_r)), grads)


def fd_error(params, xs, state0, *, seed: int = 0, eps: float = 1e-6, n_dirs: int = 3, **kwargs) -> float:
    """Relative error of ``lstm``'s directional derivatives against central differences (float64).

    The scalar is <cotangent, outputs> for a random cotangent; directions are
    random over (params, xs, state0) together.
    """
    args = (params, xs, state0)
    ct = random_like(seed + 1, lstm(*args, **kwargs))

    def loss(p, x, s):
        out = lstm(p, x, s, **kwargs)
        return sum(jnp.vdot(a, b) for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(ct), strict=True))

    grads = jax.grad(loss, argnums=(0, 1, 2))(*args)
    worst = 0.0
    for k in range(n_dirs):
        v = random_like(seed + 100 + k, args)
        plus = jax.tree.map(lambda a, d: a + eps * d, args, v)
        minus = jax.tree.map(lambda a, d: a - eps * d, args, v)
        fd = (loss(*plus) - loss(*minus)) / (2 * eps)
        an = sum(jnp.vdot(g, d) for g, d in zip(jax.tree.leaves(grads), jax.tree.leaves(v), strict=True))
        worst = max(worst, abs(float(fd - an)) / max(abs(float(an)), 1e-12))
    return worst


CONFIGS = [
    # (name, T, B, D, H, kwargs)
    ("T=1", 1, 2, 3, 4, {}),
    ("T=17", 17, 3, 5, 4, {}),
    ("T=9 reverse", 9, 3, 5, 4, {"reverse": True}),
    ("T=9 lengths", 9, 3, 5, 4, {"seq_lengths": jnp.array([0, 4, 9], jnp.int32)}),
    ("T=9 lengths reverse", 9, 3, 5, 4, {"seq_lengths": jnp.array([9, 1, 0], jnp.int32), "reverse": True}),
]


def main(argv: list[str] | None = None) -> int:
    """Print the error table; return 1 if any error exceeds its tolerance."""
    from jax_lstm.cli import nonneg_int

    ap = argparse.ArgumentParser(prog="jax-lstm gradcheck", description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=nonneg_int, default=0, help="PRNG seed for parameters, inputs and cotangents")
    ap.add_argument("--quick", action="store_true", help="two configurations instead of all")
    args = ap.parse_args(argv)
    jax.config.update("jax_enable_x64", True)

    failed = 0
    header = f"{'config':<22}{'dtype':<9}{'input':<6}{'max abs err':>13}{'rel err':>11}{'tol':>9}  ok"
    print(header)
    print("-" * len(header))
    for name, T, B, D, H, kw in CONFIGS[:: len(CONFIGS) - 1] if args.quick else CONFIGS:
        for dtype in ("float64", "float32"):
            p, xs, s0 = random_problem(args.seed, T, B, D, H, dtype=jnp.dtype(dtype))
            res = vjp_errors(p, xs, s0, seed=args.seed, **kw)
            tol = TOLERANCE[dtype]
            rows = [("value", res.values), *res.grads.items()]
            for inp, (abs_e, rel_e) in rows:
                ok = rel_e <= tol
                failed += not ok
                print(f"{name:<22}{dtype:<9}{inp:<6}{abs_e:>13.2e}{rel_e:>11.2e}{tol:>9.0e}  {'ok' if ok else 'FAIL'}")
        p, xs, s0 = random_problem(args.seed, T, B, D, H, dtype=jnp.float64)
        fd = fd_error(p, xs, s0, seed=args.seed, **kw)
        ok = fd <= FD_TOLERANCE
        failed += not ok
        print(f"{name:<22}{'float64':<9}{'fd':<6}{'':>13}{fd:>11.2e}{FD_TOLERANCE:>9.0e}  {'ok' if ok else 'FAIL'}")
    print(f"\n{'all checks passed' if not failed else f'{failed} check(s) FAILED'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
