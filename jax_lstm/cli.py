"""The ``jax-lstm`` command line (also ``python -m jax_lstm``).

``train``, ``sample`` and ``evaluate`` are defined here, each as a parser and a
``main_NAME(argv) -> int``; ``gradcheck`` and ``bench`` belong to their modules,
imported when called. ``jax-lstm NAME --help`` shows a command's flags.

Exit codes: 0 success, 1 failure (a NaN, an unreadable or unfitting
checkpoint, a file that could not be written), 2 bad arguments or a run
directory in use by another run (nothing written), 130 interrupted by
Ctrl-C (SIGINT), 143 stopped by SIGTERM (both after writing a checkpoint).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import math
import os
import signal
import sys
from collections.abc import Callable, Sequence
from typing import Any

from jax_lstm import checkpoint, parallel
from jax_lstm.config import (
    DTYPES,
    INT32_MAX,
    INT64_MAX,
    INT_RANGES,
    OPTIMIZERS,
    PROGRESS_MODES,
    SCHEDULES,
    TrainConfig,
    enable_x64_if,
    int_error,
)
from jax_lstm.reporting import fmt, show_value, summary_table, table
from jax_lstm.runs import Interrupts, ResumeConflict, RunInUse, RunWriteError, checkpoint_path
from jax_lstm.tasks import DEFAULT_TASK, GRADS, TASKS, get_task
from jax_lstm.train import load_run, train

# Exit codes of the commands.
EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2
EXIT_SIGNAL = {signal.SIGINT: 130, signal.SIGTERM: 143}  # 128 + the signal's number
EXIT_INTERRUPTED = EXIT_SIGNAL[signal.SIGINT]

# subcommand -> (module, function, one-line help)
COMMANDS = {
    "train": ("jax_lstm.cli", "main_train", "train an LSTM on an embedded task (default: charlm)"),
    "sample": ("jax_lstm.cli", "main_sample", "generate text from a charlm checkpoint"),
    "evaluate": ("jax_lstm.cli", "main_evaluate", "evaluate a checkpoint on its task's validation split"),
    "gradcheck": ("jax_lstm.gradcheck", "main", "compare hand-written BPTT with autodiff and finite differences"),
    "bench": ("jax_lstm.bench", "main", "benchmark manual BPTT against autodiff, Flax and PyTorch"),
}


def _usage() -> str:
    lines = ["usage: jax-lstm COMMAND [options]", "", "commands:"]
    lines += [f"  {name:<10} {help_}" for name, (_, _, help_) in COMMANDS.items()]
    lines += ["", "`jax-lstm COMMAND --help` shows a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"jax-lstm: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module, func, _ = COMMANDS[name]
    try:
        return int(getattr(importlib.import_module(module), func)(rest) or 0)
    except KeyboardInterrupt:
        print(f"jax-lstm {name}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


def _number(convert: Callable, ok: Callable, what: str) -> Callable[[str], Any]:
    """An argparse ``type``: ``convert`` the text, accept it if ``ok``, else say it must be ``what``."""

    def parse(text: str):
        try:
            v = convert(text)
        except ValueError:
            v = None
        if v is None or not ok(v):
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}")
        return v

    return parse


def int_in(lo: int, hi: int) -> Callable[[str], int]:
    """An argparse ``type``: an integer in [lo, hi] (``lo`` 0 or 1), refused with the reason otherwise."""

    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            v = None
        why = int_error(v, lo, hi)
        if why:
            raise argparse.ArgumentTypeError(f"{why}, got {text!r}")
        return v

    return parse


def _field(name: str) -> Callable[[str], int]:
    """The ``type`` of the flag of an integer ``TrainConfig`` field, with the field's range."""
    return int_in(*INT_RANGES[name])


positive_int = _positive_int = int_in(1, INT32_MAX)
nonneg_int = _nonneg_int = int_in(0, INT32_MAX)
seed_int = int_in(0, INT64_MAX)
_positive_float = _number(float, lambda v: math.isfinite(v) and v > 0, "a positive number")
_nonneg_float = _number(float, lambda v: math.isfinite(v) and v >= 0, "a non-negative number")
positive_float, nonneg_float = _positive_float, _nonneg_float


def _rate(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number in [0, 1), got {text!r}") from None
    if not 0 <= v < 1:
        raise argparse.ArgumentTypeError(f"must be a number in [0, 1), got {text!r}")
    return v


def _hidden(text: str) -> int | tuple[int, ...]:
    """``256`` (one layer) or ``256,128`` (one size per layer, bottom first)."""
    sizes = [_field("hidden")(part.strip()) for part in text.split(",")]
    return sizes[0] if len(sizes) == 1 else tuple(sizes)


def _parse(parser: argparse.ArgumentParser, argv: Sequence[str]) -> argparse.Namespace | int:
    """Parse, turning argparse's exit into a return code (2 for errors, 0 for --help)."""
    try:
        return parser.parse_args(list(argv))
    except SystemExit as e:
        return int(e.code) if isinstance(e.code, int) else EXIT_USAGE


def _error(prog: str, message: str, code: int) -> int:
    print(f"{prog}: error: {message}", file=sys.stderr)
    return code


def flag_text(name: str, value) -> str:
    """``--hidden 256,256``, ``--bidirectional``: a config field as the flag that sets it."""
    flag = name.replace("_", "-")
    if isinstance(value, bool):
        return f"--{flag}" if value else f"--no-{flag}"
    return f"--{flag} {show_value(value)}"


def _saved_text(name: str, value) -> str:
    return flag_text(name, value) if isinstance(value, bool) else show_value(value)


def train_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="jax-lstm train",
        description="Train an LSTM (hand-written BPTT by default) on an embedded task. With no arguments: "
        "charlm, the character-level language model on Python's pydoc_data text, about 5 minutes on 2 CPU cores.",
        epilog="Defaults per task: "
        + "; ".join(
            f"{name}: " + ", ".join(f"{k}={v}" for k, v in t.defaults.items() if k in ("steps", "hidden", "lr"))
            for name, t in TASKS.items()
        ),
    )
    p.add_argument("--task", choices=sorted(TASKS), help=f"the task (default {DEFAULT_TASK})")
    p.add_argument("--steps", type=_field("steps"), help="total optimizer steps (default: the task's)")
    p.add_argument("--seed", type=_field("seed"), help="seed of params and data (default 0)")
    p.add_argument("--out", metavar="DIR", help="run directory (default runs/TASK)")
    p.add_argument(
        "--resume",
        nargs="?",
        const=True,
        default=False,
        metavar="PATH",
        help="continue the run in --out, or the one in PATH (a run directory or checkpoint file)",
    )
    p.add_argument("--force", action="store_true", help="start over in a directory that holds a checkpoint")
    p.add_argument("--grad", choices=tuple(GRADS), help="manual: hand-written BPTT (default); autodiff: lstm_ref")
    p.add_argument("--metrics", metavar="FILE", help="JSON-lines log (default DIR/metrics.jsonl)")
    p.add_argument("--batch-size", type=_field("batch_size"))
    p.add_argument("--seq-len", type=_field("seq_len"), help="window length (charlm) or sequence length (sine)")
    p.add_argument(
        "--hidden",
        type=_hidden,
        metavar="H[,H...]",
        help="LSTM hidden sizes: 256 is one layer, 256,256 a stack of two (bottom first)",
    )
    p.add_argument(
        "--bidirectional",
        action=argparse.BooleanOptionalAction,
        help="every layer also runs backwards (addition only: refused where the targets are later inputs)",
    )
    p.add_argument(
        "--proj-size",
        type=_field("proj_size"),
        metavar="P",
        help="project every layer's output to size P < H (LSTMP, as torch.nn.LSTM(proj_size=P)); 0: none (default)",
    )
    p.add_argument(
        "--peephole",
        action=argparse.BooleanOptionalAction,
        help="peephole connections: the f, i, o gates also see the cell state",
    )
    p.add_argument(
        "--layer-norm",
        action=argparse.BooleanOptionalAction,
        help="the layer-normalised LSTM: normalised input and recurrent projections and cell state",
    )
    p.add_argument("--embed", type=_field("embed"), help="embedding size (charlm)")
    p.add_argument("--optimizer", choices=OPTIMIZERS, help="default adam")
    p.add_argument("--lr", type=_positive_float, help="peak learning rate")
    p.add_argument("--schedule", choices=SCHEDULES, help="constant or warm-up + cosine decay to lr/10")
    p.add_argument("--warmup", type=_field("warmup"), help="warm-up steps")
    p.add_argument("--clip", type=_nonneg_float, help="clip gradients to this global norm (0: off)")
    p.add_argument("--dropout", type=_rate, help="dropout rate on the LSTM outputs in training (charlm default 0.2)")
    p.add_argument("--layer-dropout", type=_rate, help="dropout rate between stacked layers in training (default 0)")
    p.add_argument(
        "--recurrent-dropout",
        type=_rate,
        metavar="P",
        help="variational dropout on every layer's h_{t-1} in training: one mask per sequence (default 0)",
    )
    p.add_argument("--dtype", choices=DTYPES, help="default float32")
    p.add_argument("--log-every", type=_field("log_every"), help="evaluate, log and checkpoint every N steps")
    p.add_argument(
        "--time-limit",
        type=_nonneg_float,
        metavar="SECONDS",
        help="stop (with a checkpoint) after this many seconds; 0: no limit (charlm default 480, a safety cap)",
    )
    p.add_argument("--progress", choices=PROGRESS_MODES, default="auto", help="progress display on stderr")
    p.add_argument(
        "--no-sample",
        action="store_true",
        help="do not print the text sample (charlm) or example sums (addition) at the end",
    )
    dp = p.add_argument_group("data parallel (jax.sharding; see README, Scale out)")
    dp.add_argument("--devices", type=_positive_int, help="split each batch over the first N devices")
    dp.add_argument("--coordinator", metavar="HOST:PORT", help="jax.distributed coordinator (process 0's address)")
    dp.add_argument("--num-processes", type=_positive_int, help="processes in a jax.distributed run")
    dp.add_argument("--process-id", type=_nonneg_int, help="this process's rank in a jax.distributed run")
    return p


def main_train(argv: Sequence[str]) -> int:
    """``jax-lstm train``: returns 0 on success, 1 on failure (NaN, bad checkpoint, a failed write), 2 on bad
    arguments or a run directory in use, 130 after Ctrl-C and 143 after SIGTERM (both with a checkpoint)."""
    prog = "jax-lstm train"

    def stop_now(signum: int) -> None:  # a second signal: one line, and out, keeping the checkpoint on disk
        os.write(2, f"\n{prog}: {signal.Signals(signum).name} again: stopped at once; {interrupts.kept()}\n".encode())
        os._exit(EXIT_SIGNAL[interrupts.requested])

    with Interrupts((signal.SIGINT, signal.SIGTERM), hard_stop=stop_now) as interrupts:
        code = _train(prog, argv, interrupts)
    return code


def _train(prog: str, argv: Sequence[str], interrupts: Interrupts) -> int:
    args = _parse(train_parser(), argv)
    if isinstance(args, int):
        return args
    config = TrainConfig(**{f.name: getattr(args, f.name, None) for f in dataclasses.fields(TrainConfig)})
    out = args.out
    if out is None and not (args.resume and args.resume is not True):
        out = os.path.join("runs", args.task or DEFAULT_TASK)
    if args.resume and args.force:
        return _error(prog, "--resume and --force contradict each other", EXIT_USAGE)
    multi = (args.coordinator, args.num_processes, args.process_id)
    if any(v is not None for v in multi):
        if any(v is None for v in multi):
            return _error(prog, "--coordinator, --num-processes and --process-id go together", EXIT_USAGE)
        try:
            parallel.initialize(args.coordinator, args.num_processes, args.process_id)
        except (ValueError, RuntimeError) as e:
            return _error(prog, f"jax.distributed could not start: {e}", EXIT_FAIL)
        if args.process_id != 0:  # process 0 alone writes the run directory
            out, args.metrics = None, None
    enable_x64_if(args.dtype)
    try:
        result = train(
            config,
            out_dir=out,
            resume=args.resume,
            force=args.force,
            metrics_path=args.metrics,
            progress=args.progress,
            devices=args.devices,
            interrupts=interrupts,
        )
    except (checkpoint.CheckpointError, RunWriteError) as e:
        return _error(prog, str(e), EXIT_FAIL)
    except ResumeConflict as e:
        return _error(prog, e.render(flag_text, _saved_text), EXIT_USAGE)
    except (ValueError, FileExistsError, RunInUse) as e:
        return _error(prog, str(e), EXIT_USAGE)
    if result.stop == "interrupted" and not result.losses:  # stopped before its first step
        print(f"{prog}: {result.message}", file=sys.stderr)
        return EXIT_SIGNAL[interrupts.requested or signal.SIGINT]
    task = get_task(result.config.task)
    with interrupts.critical(final=True):  # the run is over: a signal now changes nothing
        print(summary_table(result, task, result.n_params))
        if result.stop != "nan" and not args.no_sample:
            demo = task.demo(result.state.params, result.data, GRADS[result.config.grad])
            if demo:
                print(demo)
    if result.stop == "nan":
        return _error(prog, f"{result.message}. Try a lower --lr or a smaller --clip.", EXIT_FAIL)
    print(f"{prog}: {result.message}", file=sys.stderr)
    if result.stop == "interrupted":
        return EXIT_SIGNAL[interrupts.requested or signal.SIGINT]
    return EXIT_OK


def _checkpoint_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--checkpoint",
        default=os.path.join("runs", "charlm"),
        metavar="PATH",
        help="run directory or checkpoint file (default runs/charlm)",
    )


def _load(prog: str, path: str):
    """The run at ``path``, or the exit code after one line on stderr when its checkpoint cannot be read."""
    try:
        return load_run(path)
    except checkpoint.CheckpointError as e:
        return _error(prog, str(e), EXIT_FAIL)


def sample_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="jax-lstm sample", description="Generate text from a charlm checkpoint.")
    _checkpoint_argument(p)
    p.add_argument("--prompt", default="The ", help="text the model reads first (default 'The ')")
    p.add_argument("--length", type=_positive_int, default=500, help="characters to generate (default 500)")
    p.add_argument("--temperature", type=_positive_float, default=0.8, help="> 0; lower is more conservative")
    p.add_argument("--seed", type=seed_int, default=0)
    return p


def main_sample(argv: Sequence[str]) -> int:
    """``jax-lstm sample``: print the prompt and the generated text."""
    from jax_lstm.tasks import charlm

    prog = "jax-lstm sample"
    args = _parse(sample_parser(), argv)
    if isinstance(args, int):
        return args
    if not args.prompt:
        return _error(prog, "--prompt must not be empty", EXIT_USAGE)
    run = _load(prog, args.checkpoint)
    if isinstance(run, int):
        return run
    if run.task.name != "charlm":
        return _error(prog, f"{args.checkpoint} is a {run.task.name} checkpoint; sample needs a charlm one", EXIT_USAGE)
    try:
        text = charlm.sample(run.state.params, run.data.vocab, args.prompt, args.length, args.temperature, args.seed)
    except ValueError as e:
        return _error(prog, f"--prompt: {e}", EXIT_USAGE)
    print(args.prompt + text)
    return EXIT_OK


def evaluate_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="jax-lstm evaluate", description="Evaluate a checkpoint on its task's validation split."
    )
    _checkpoint_argument(p)
    p.add_argument("--grad", choices=tuple(GRADS), default="manual", help="which LSTM runs the forward pass")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    return p


def main_evaluate(argv: Sequence[str]) -> int:
    """``jax-lstm evaluate``: the validation metric and loss of a checkpoint, beside the baselines."""
    prog = "jax-lstm evaluate"
    args = _parse(evaluate_parser(), argv)
    if isinstance(args, int):
        return args
    run = _load(prog, args.checkpoint)
    if isinstance(run, int):
        return run
    values = run.task.make_evaluator(run.data, run.config, GRADS[args.grad])(run.state.params)
    baselines = run.task.baselines(run.data)
    if args.json:
        print(json.dumps({"task": run.task.name, "step": run.state.step, **values, "baselines": baselines}))
        return EXIT_OK
    rows = [("checkpoint", f"{checkpoint_path(args.checkpoint)} (step {run.state.step})"), ("task", run.task.name)]
    rows += [(k, fmt(v)) for k, v in values.items()]
    rows += [(f"baseline: {k}", fmt(v)) for k, v in baselines.items()]
    print(table(rows))
    return EXIT_OK


if __name__ == "__main__":
    raise SystemExit(main())
