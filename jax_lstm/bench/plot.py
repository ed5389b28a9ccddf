"""``jax-lstm bench --plot FILE``: the layer rows as a PNG."""

from __future__ import annotations

import numpy as np

from jax_lstm.bench.layer import TARGETS, best_record
from jax_lstm.bench.render import fmt

__all__ = ["plot"]


def plot(report: dict, path: str) -> None:
    """A PNG: per shape, train-step and forward speed relative to autodiff, and temp memory.

    Speed is ``t_autodiff / t_impl`` at each one's best unroll (autodiff = 1,
    higher is faster), with each bar labelled by its median time in ms;
    memory is the compiled temp memory relative to autodiff's.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = report["results"]
    present = {r["impl"] for x in results for r in x["records"]}
    impls = [k for k in ("manual", "autodiff", "flax", "torch") if k in present] + sorted(
        present - {"manual", "autodiff", "flax", "torch"}
    )
    colors = {"manual": "tab:blue", "autodiff": "tab:orange", "flax": "tab:green", "torch": "tab:red"}
    labels = [",".join(map(str, x["shape"])) for x in results]
    fig, axes = plt.subplots(1, 3, figsize=(17, 5.2))
    xs = np.arange(len(results))

    def bars(ax, key, impl_list, relative_to_autodiff_time, floor=0.0):
        width = 0.8 / max(len(impl_list), 1)
        top = floor
        for j, impl in enumerate(impl_list):
            vals, texts = [], []
            for x in results:
                r, a = best_record(x["records"], impl), best_record(x["records"], "autodiff")
                v = r.get(key) if r else None
                base = a.get(key) if a else None
                if v and base:
                    vals.append(base / v if relative_to_autodiff_time else v / base)
                    texts.append(f"{v:.3g}" if relative_to_autodiff_time else f"{v / 2**20:.3g}")
                else:
                    vals.append(np.nan)
                    texts.append("")
            pos = xs + (j - (len(impl_list) - 1) / 2) * width
            ax.bar(pos, vals, width, label=impl, color=colors.get(impl))
            top = max([top] + [v for v in vals if np.isfinite(v)])
            for p_, v, t in zip(pos, vals, texts, strict=True):
                if np.isfinite(v):
                    ax.text(p_, v, t, ha="center", va="bottom", fontsize=7, rotation=90)
        ax.set_xticks(xs, labels, rotation=15)
        ax.set_xlabel("T,B,D,H")
        ax.set_ylim(0, 1.35 * top)
        ax.grid(axis="y", alpha=0.3)

    bars(axes[0], "train_ms", impls, True, floor=TARGETS["speedup_vs_autodiff"])
    axes[0].axhline(TARGETS["speedup_vs_autodiff"], color="tab:blue", ls="--", lw=1, label="target (manual)")
    axes[0].set_title("train step (fwd + bwd): speed vs autodiff, labels: ms")
    axes[0].set_ylabel("t_autodiff / t (higher is faster)")
    axes[0].legend(fontsize=8, ncol=3, loc="upper left")
    bars(axes[1], "fwd_ms", impls, True)
    axes[1].set_title("forward only: speed vs autodiff, labels: ms")
    axes[1].set_ylabel("t_autodiff / t (higher is faster)")
    bars(axes[2], "temp_bytes", [k for k in impls if k != "torch"], False)
    axes[2].axhline(TARGETS["memory_ratio"], color="tab:blue", ls="--", lw=1, label="target (manual)")
    axes[2].set_title("compiled temp memory of the train step, labels: MiB")
    axes[2].set_ylabel("relative to autodiff (lower is less)")
    axes[2].legend(fontsize=8, ncol=3, loc="upper left")
    g = report["summary"]["geomean"]
    fig.suptitle(
        f"jax_lstm, float32, {report['machine']['cpu_count']} CPU cores, matmul peak {report['peak_gflops']:.0f} "
        f"GFLOP/s; geo-mean train speed-up manual vs autodiff {fmt(g['speedup_vs_autodiff'], '.2f')}x, "
        f"manual / torch.nn.LSTM time {fmt(g['time_ratio_vs_torch'], '.2f')}"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
