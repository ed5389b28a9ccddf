"""``jax-lstm bench --rl``: recurrent PPO with jax_lstm's LSTM against Flax's, and the LSTM training pass alone.

Two tables, each from one interleaved run (every repetition times every variant once, in a shuffled
order, after untimed warm-up calls; medians). Each core's training pass runs at every ``--unroll`` asked
for (default 1 and 4); a table reports each core at its best (the smallest unroll within 3% of the
fastest) and, beside it, the ratio with both at the first unroll (PureJaxRL's default, 1):

* **the PPO update** of ``jax_lstm.rl`` on gymnax's MemoryChain (memory length 16): a rollout of
  T = 128 steps of every environment, GAE, then 4 epochs of 4 minibatch updates (whole environments per
  minibatch), H = 128, with ``core="ours"`` and ``core="flax"``, at 4, 16 and 64 environments. The
  rollout alone is timed too, to show what share of the update the training passes leave;
* **the LSTM training pass alone**: forward and backward of the recurrent core as the PPO loss runs it,
  over (T = 128, B, D = H = 128) inputs from a carried non-zero state with a reset to zeros before
  every 17th step of each row (MemoryChain's episodes, at a random phase per row), gradients of
  ``sum(hs * w)`` for the weights and the inputs, at B = 4, 16, 64: one
  ``lstm(params, xs, state0, resets=resets, reset_state=None)`` call against ``OptimizedLSTMCell`` under
  ``nn.scan`` with a ``where`` reset before each step (PureJaxRL's ``ScannedRNN``).

float32, jit-compiled. Needs gymnax and flax (``pip install 'jax_lstm[rl]'``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jax_lstm.bench import timing
from jax_lstm.bench.command import ints_arg
from jax_lstm.bench.render import markdown
from jax_lstm.bench.timing import UNROLL_TOLERANCE, best_unroll, geomean

try:
    import gymnax

    from jax_lstm import rl
except ImportError as e:
    raise ImportError(f"jax-lstm bench --rl needs gymnax and flax: pip install 'jax_lstm[rl]' ({e})") from e

__all__ = [
    "TARGETS",
    "UNROLL_TOLERANCE",
    "ppo_variants",
    "pass_variants",
    "interleave",
    "best_unroll",
    "bench_ppo",
    "bench_pass",
    "render",
    "main",
]

ENVS = (4, 16, 64)
BATCHES = (4, 16, 64)
T, H = 128, 128
MEMORY_LENGTH = 16
EPISODE = MEMORY_LENGTH + 1  # MemoryChain's episodes last memory_length + 1 steps
TARGETS = {
    "ppo_geomean": 0.6,  # ours / flax PPO update time, geo-mean over the env counts, at most
    "ppo_each": 0.9,  # ... and at each env count
    "pass_geomean": 0.5,  # ours / flax training pass time, geo-mean over the batch sizes, at most
}
CORES = ("ours", "flax")
UNROLLS = (1, 4)


def interleave(variants: dict[str, Callable[[], object]], *, reps: int, warmup: int = 2, seed: int = 0) -> dict:
    """Median milliseconds of each ``variants[name]()`` (which must block until done).

    ``timing.interleave`` without an untimed call before each timed one: ``warmup`` untimed rounds (at
    least one), then ``reps`` rounds, each calling every variant once in a fresh random order.
    """
    t = timing.interleave({k: (f,) for k, f in variants.items()}, warmup=warmup, reps=reps, settle=False, seed=seed)
    return {name: 1e3 * s for name, (s,) in t.seconds.items()}


def _env():
    env, params = gymnax.make("MemoryChain-bsuite")
    return env, params.replace(memory_length=MEMORY_LENGTH)


def ppo_variants(num_envs: int, unroll: int = 1, *, num_steps: int = T, hidden: int = H, seed: int = 0) -> dict:
    """``{"update:ours": fn, "update:flax": fn, "rollout:ours": fn, "rollout:flax": fn}`` at ``num_envs``.

    Each fn runs one jit-compiled PPO update (or rollout; acting does not depend on ``unroll``) from the
    same runner, after one update to leave the initial state behind, and blocks.
    """
    env, env_params = _env()
    out = {}
    for core in CORES:
        config = rl.PPOConfig(
            core=core,
            num_envs=num_envs,
            num_steps=num_steps,
            hidden=hidden,
            num_minibatches=min(4, num_envs),
            unroll=unroll,
        )
        ppo = rl.make_ppo(env, env_params, config)
        update, rollout = jax.jit(ppo.update), jax.jit(ppo.rollout)
        runner, _ = jax.block_until_ready(update(ppo.init(jax.random.PRNGKey(seed))))
        out[f"update:{core}"] = lambda update=update, runner=runner: jax.block_until_ready(update(runner))
        out[f"rollout:{core}"] = lambda rollout=rollout, runner=runner: jax.block_until_ready(rollout(runner))
    return out


def _pass_problem(batch: int, num_steps: int, hidden: int, seed: int):
    rng = np.random.default_rng(seed)
    f32 = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)  # noqa: E731
    phase = rng.integers(0, EPISODE, batch)
    resets = jnp.asarray((np.arange(num_steps)[:, None] + phase[None, :]) % EPISODE == 0)
    return f32(num_steps, batch, hidden), resets, f32(batch, hidden), f32(batch, hidden), f32(num_steps, batch, hidden)


def pass_variants(batch: int, unroll: int = 1, *, num_steps: int = T, hidden: int = H, seed: int = 0) -> dict:
    """``{"pass:ours": fn, "pass:flax": fn}``: forward + backward of each core over (num_steps, batch, hidden)."""
    xs, resets, h, c, w = _pass_problem(batch, num_steps, hidden, seed)
    out = {}
    for core in CORES:
        module = rl.LSTMCore(hidden, hidden, unroll) if core == "ours" else rl.FlaxLSTMCore(hidden, unroll)
        carry = rl.LSTMState(h, c) if core == "ours" else (c, h)
        variables = module.init(jax.random.PRNGKey(seed), carry, xs, resets)

        def loss(variables, xs, module=module, carry=carry):
            _, hs = module.apply(variables, carry, xs, resets)
            return jnp.sum(hs * w)

        grad = jax.jit(jax.grad(loss, argnums=(0, 1)))
        jax.block_until_ready(grad(variables, xs))
        out[f"pass:{core}"] = lambda grad=grad, variables=variables: jax.block_until_ready(grad(variables, xs))
    return out


def _summary(rows: list[dict], unrolls: Sequence[int]) -> dict:
    return dict(
        rows=rows,
        unrolls=list(unrolls),
        geomean=geomean([r["ratio"] for r in rows]),
        geomean_same_unroll=geomean([r["ratio_same_unroll"] for r in rows]),
    )


def _compare(ms: dict, key: Callable[[str, int], str], unrolls: Sequence[int]) -> dict:
    """Each core at its best unroll, and both at the first unroll (the default), from medians ``ms``."""
    row = {}
    for core in CORES:
        u = best_unroll({u: ms[key(core, u)] for u in unrolls})
        row.update(
            {f"{core}_ms": ms[key(core, u)], f"{core}_unroll": u, f"{core}_ms_u{unrolls[0]}": ms[key(core, unrolls[0])]}
        )
    row["ratio"] = row["ours_ms"] / row["flax_ms"]
    row["ratio_same_unroll"] = row[f"ours_ms_u{unrolls[0]}"] / row[f"flax_ms_u{unrolls[0]}"]
    return row


def bench_ppo(
    envs: Sequence[int], *, reps: int, warmup: int, unrolls: Sequence[int] = (1,), num_steps: int = T, hidden: int = H
) -> dict:
    """One interleaved run over every env count, core and unroll; rows with the medians and ours / Flax."""
    variants = {}
    for n in envs:
        for u in unrolls:
            for k, fn in ppo_variants(n, u, num_steps=num_steps, hidden=hidden).items():
                if k.startswith("update") or u == unrolls[0]:
                    variants[f"{n}:{k}:u{u}"] = fn
        print(f"compiled the PPO update at {n} envs", file=sys.stderr)
    ms = interleave(variants, reps=reps, warmup=warmup)
    rows = []
    for n in envs:
        row = dict(envs=n, **_compare(ms, lambda core, u, n=n: f"{n}:update:{core}:u{u}", unrolls))
        row.update({f"rollout_{core}_ms": ms[f"{n}:rollout:{core}:u{unrolls[0]}"] for core in CORES})
        rows.append(row)
    return _summary(rows, unrolls)


def bench_pass(
    batches: Sequence[int],
    *,
    reps: int,
    warmup: int,
    unrolls: Sequence[int] = (1,),
    num_steps: int = T,
    hidden: int = H,
) -> dict:
    """One interleaved run of the training pass over every batch size, core and unroll."""
    variants = {}
    for b in batches:
        for u in unrolls:
            for k, fn in pass_variants(b, u, num_steps=num_steps, hidden=hidden).items():
                variants[f"{b}:{k}:u{u}"] = fn
    ms = interleave(variants, reps=reps, warmup=warmup)
    rows = [dict(batch=b, **_compare(ms, lambda core, u, b=b: f"{b}:pass:{core}:u{u}", unrolls)) for b in batches]
    return _summary(rows, unrolls)


def _table(summary: dict, key: str, label: str, spec: str, extra: Sequence[tuple[str, str]] = ()) -> list[str]:
    """One comparison as Markdown: a row per ``key`` value with each core at its best unroll and the ratios,
    then the ``extra`` (title, key) columns, then the geometric means."""
    u0 = summary["unrolls"][0]
    header = (label, "Flax (unroll)", "ours (unroll)", "ours / Flax", f"ours / Flax, both unroll {u0}")
    rows = [
        (
            str(r[key]),
            f"{r['flax_ms']:{spec}} ({r['flax_unroll']})",
            f"{r['ours_ms']:{spec}} ({r['ours_unroll']})",
            f"**{r['ratio']:.2f}**",
            f"{r['ratio_same_unroll']:.2f}",
            *(f"{r[k]:{spec}}" for _, k in extra),
        )
        for r in summary["rows"]
    ]
    means = ("geometric mean", "", "", f"**{summary['geomean']:.2f}**", f"{summary['geomean_same_unroll']:.2f}")
    return markdown((*header, *(title for title, _ in extra)), [*rows, (*means, *("" for _ in extra))])


def render(report: dict) -> str:
    """Both tables as Markdown, with the targets and whether they are met."""
    t = report["targets"]
    ok = lambda met: "met" if met else "MISSED"  # noqa: E731
    lines = []
    ppo, lp = report.get("ppo"), report.get("pass")
    if ppo:
        lines += [
            f"PPO update (rollout T = {report['num_steps']} + 4 epochs x 4 minibatches, H = {report['hidden']}), "
            f"median ms, each core at its best unroll of {ppo['unrolls']}:",
            "",
            *_table(
                ppo, "envs", "envs", ".1f", (("Flax rollout", "rollout_flax_ms"), ("ours rollout", "rollout_ours_ms"))
            ),
        ]
        worst = max(r["ratio"] for r in ppo["rows"])
        lines += [
            "",
            f"target: geomean <= {t['ppo_geomean']} ({ok(ppo['geomean'] <= t['ppo_geomean'])}), "
            f"each <= {t['ppo_each']} ({ok(worst <= t['ppo_each'])})",
            "",
        ]
    if lp:
        lines += [
            f"LSTM training pass alone (forward + backward, T = {report['num_steps']}, D = H = {report['hidden']}, "
            f"resets to zeros), median ms, each core at its best unroll of {lp['unrolls']}:",
            "",
            *_table(lp, "batch", "B", ".2f"),
            "",
            f"target: geomean <= {t['pass_geomean']} ({ok(lp['geomean'] <= t['pass_geomean'])})",
        ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``jax-lstm bench --rl``."""
    from jax_lstm.cli import nonneg_int, positive_int

    ap = argparse.ArgumentParser(prog="jax-lstm bench --rl", description=__doc__.split("\n\n")[0])
    ap.add_argument("--envs", type=ints_arg, default=list(ENVS), help="env counts of the PPO update (default 4,16,64)")
    ap.add_argument("--batch", type=ints_arg, default=list(BATCHES), help="B of the training pass (default 4,16,64)")
    ap.add_argument("--num-steps", type=positive_int, default=T, help=f"rollout length T (default {T})")
    ap.add_argument("--hidden", type=positive_int, default=H, help=f"H (default {H})")
    ap.add_argument(
        "--unroll", type=ints_arg, default=list(UNROLLS), help="unrolls of the training pass to try (default 1,4)"
    )
    ap.add_argument("--reps", type=positive_int, default=10, help="timed rounds of the PPO updates (default 10)")
    ap.add_argument(
        "--pass-reps", type=positive_int, default=30, help="timed rounds of the training passes (default 30)"
    )
    ap.add_argument("--warmup", type=nonneg_int, default=2, help="untimed rounds before timing (default 2)")
    ap.add_argument("--no-ppo", action="store_true", help="leave out the PPO update")
    ap.add_argument("--no-pass", action="store_true", help="leave out the training pass alone")
    ap.add_argument("--quick", action="store_true", help="a tiny smoke run: 4 envs, B = 4, T = H = 16, 2 rounds")
    ap.add_argument("--json", metavar="FILE", help="write the report as JSON")
    args = ap.parse_args(argv)
    bad = [n for n in args.envs if n > 4 and n % 4]
    if bad:
        ap.error(f"--envs: an env count above 4 must be a multiple of the 4 minibatches, got {bad}")
    if args.quick:
        args.envs, args.batch, args.num_steps, args.hidden = [4], [4], 16, 16
        args.reps, args.pass_reps, args.warmup, args.unroll = 2, 2, 1, [1, 2]
    t0 = time.perf_counter()
    report = dict(
        command="jax-lstm bench --rl " + " ".join(argv if argv is not None else sys.argv[1:]),
        machine=dict(
            platform=platform.platform(), jax=jax.__version__, backend=jax.default_backend(), cpus=os.cpu_count()
        ),
        num_steps=args.num_steps,
        hidden=args.hidden,
        targets=TARGETS,
    )
    kw = dict(warmup=args.warmup, unrolls=args.unroll, num_steps=args.num_steps, hidden=args.hidden)
    if not args.no_ppo:
        report["ppo"] = bench_ppo(args.envs, reps=args.reps, **kw)
    if not args.no_pass:
        report["pass"] = bench_pass(args.batch, reps=args.pass_reps, **kw)
    report["wall_s"] = time.perf_counter() - t0
    print(render(report))
    print(f"\n(total {report['wall_s']:.0f} s)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return 0
