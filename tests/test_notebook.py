"""The notebook ``notebooks/manual_vs_autodiff.ipynb`` runs top to bottom and matches its source.

The notebook is executed in a fresh ``python3`` kernel with ``JAX_LSTM_NB_FAST=1``
(same code, smaller shapes); any error in any cell fails the test. The committed
notebook must carry outputs and be built from ``notebooks/manual_vs_autodiff.py``
(``.venv/bin/python notebooks/build_notebook.py`` rebuilds it).
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
NOTEBOOK = NOTEBOOKS / "manual_vs_autodiff.ipynb"

# The rules of the seed (shared/seed/lstm_units.md) that disagree with autodiff, bias gradient included.
SEED_ERRATA = {"δ7", "δ8", "δ13", "δ14", "δ15", "δ16", "δ22", "δ23", "δb"}


def _builder():
    spec = importlib.util.spec_from_file_location("build_notebook", NOTEBOOKS / "build_notebook.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _stream_text(nb) -> str:
    return "".join(
        out.get("text", "") for cell in nb.cells if cell.cell_type == "code" for out in cell.get("outputs", [])
    )


def test_committed_notebook_is_built_from_its_source():
    build = _builder()
    committed = nbformat.read(NOTEBOOK, as_version=4)
    fresh = build.build(build.SOURCE.read_text(encoding="utf-8"))
    got = [(c.cell_type, c.source) for c in committed.cells]
    want = [(c.cell_type, c.source) for c in fresh.cells]
    assert got == want, "notebook out of date with manual_vs_autodiff.py: run notebooks/build_notebook.py"


def test_committed_notebook_has_outputs_and_no_errors():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(c.execution_count is not None for c in code), "a code cell was never executed"
    assert [c.execution_count for c in code] == list(range(1, len(code) + 1)), "cells not run top to bottom"
    assert not [o for c in code for o in c.outputs if o.output_type == "error"]
    images = [o for c in code for o in c.outputs if "image/png" in o.get("data", {})]
    assert len(images) >= 4, "the four figures (layout, BPTT over time, speed/memory, training) are missing"
    assert "full run" in _stream_text(nb), "the committed notebook was built in fast mode"


def test_notebook_executes(monkeypatch, tmp_path):
    monkeypatch.setenv("JAX_LSTM_NB_FAST", "1")
    from nbclient import NotebookClient

    nb = nbformat.read(NOTEBOOK, as_version=4)
    for cell in nb.cells:  # run from a clean slate, not on top of the stored outputs
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    # raises CellExecutionError on the first cell that fails
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    text = _stream_text(nb)
    assert "fast mode" in text
    found = re.search(r"rules the seed gets wrong: (.*)", text)
    assert found, "the errata summary line is missing"
    assert set(found.group(1).split(", ")) == SEED_ERRATA
