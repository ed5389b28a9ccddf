"""The ``jax-lstm`` command line (also ``python -m jax_lstm``).

Each subcommand is owned by the module that implements it: that module exposes
``main(argv) -> int`` and builds its own argparse parser, so ``jax-lstm NAME
--help`` shows that subcommand's flags.
"""

from __future__ import annotations

import importlib
import sys

# subcommand -> (module, function, one-line help)
COMMANDS = {
    "train": ("jax_lstm.train", "main_train", "train an LSTM on an embedded task (default: charlm)"),
    "sample": ("jax_lstm.train", "main_sample", "generate text from a charlm checkpoint"),
    "evaluate": ("jax_lstm.train", "main_evaluate", "evaluate a checkpoint on its task's validation split"),
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
    return int(getattr(importlib.import_module(module), func)(rest) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
