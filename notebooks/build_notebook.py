"""Build ``manual_vs_autodiff.ipynb`` from its source ``manual_vs_autodiff.py`` and run it.

The source is a Python file in the "percent" format: a line ``# %%`` starts a code
cell, ``# %% [markdown]`` a Markdown cell whose lines are comments. The built
notebook is executed top to bottom and saved with its outputs::

    .venv/bin/python notebooks/build_notebook.py            # build, run, save
    .venv/bin/python notebooks/build_notebook.py --no-run   # build only

Set ``JAX_LSTM_NB_FAST=1`` to run on the small shapes the test suite uses (do not
commit a notebook built that way).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import nbformat
from nbclient import NotebookClient

HERE = Path(__file__).resolve().parent
SOURCE = HERE / "manual_vs_autodiff.py"
NOTEBOOK = HERE / "manual_vs_autodiff.ipynb"
KERNEL = "python3"


def parse_cells(text: str) -> list[tuple[str, str]]:
    """Split percent-format source into (cell_type, source) pairs, cell_type "code" or "markdown"."""
    cells: list[tuple[str, list[str]]] = []
    for line in text.splitlines():
        if line.startswith("# %%"):
            cells.append(("markdown" if "[markdown]" in line else "code", []))
        elif cells:
            cells[-1][1].append(line)
        elif line.strip():
            raise ValueError(f"{SOURCE.name}: text before the first '# %%' marker: {line!r}")
    out = []
    for kind, lines in cells:
        if kind == "markdown":
            lines = [ln[2:] if ln.startswith("# ") else ln.lstrip("#") for ln in lines]
        source = "\n".join(lines).strip("\n")
        if source:
            out.append((kind, source))
    return out


def build(text: str) -> nbformat.NotebookNode:
    """A fresh notebook (no outputs) from percent-format source."""
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": KERNEL, "display_name": "Python 3", "language": "python"}
    nb.metadata["language_info"] = {"name": "python"}
    make = {"code": nbformat.v4.new_code_cell, "markdown": nbformat.v4.new_markdown_cell}
    nb.cells = [make[kind](source) for kind, source in parse_cells(text)]
    for k, cell in enumerate(nb.cells):
        cell["id"] = f"cell-{k:02d}"  # stable ids keep diffs small
    return nb


def execute(nb: nbformat.NotebookNode, timeout: int = 900) -> nbformat.NotebookNode:
    """Run every cell in order in a fresh kernel; raises ``CellExecutionError`` on the first error."""
    NotebookClient(nb, timeout=timeout, kernel_name=KERNEL, resources={"metadata": {"path": str(HERE)}}).execute()
    return nb


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--no-run", action="store_true", help="write the notebook without executing it")
    args = ap.parse_args(argv)
    nb = build(SOURCE.read_text(encoding="utf-8"))
    if not args.no_run:
        execute(nb)
    nbformat.write(nb, NOTEBOOK)
    print(f"wrote {NOTEBOOK}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
