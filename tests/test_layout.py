"""The package's layering: no module imports from a module to its right; no package or bench file over 600 lines.

cell -> inputs -> reference/bptt -> layers -> modules/interop -> tasks -> train -> cli: each module of
``jax_lstm`` has a tier, and every ``jax_lstm`` import it makes (at the top or inside a function) is
of a module of its own tier or one to its left.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "jax_lstm"

TIERS = [
    ("cell", "_sharding", "_entering", "checkpoint", "parallel"),
    ("_inputs", "_vmap_fold"),
    ("reference", "bptt", "bptt_family", "pallas_lstm"),
    ("layers",),
    ("_modules", "nnx", "linen", "eqx", "interop", "rl"),
    ("tasks",),
    ("config", "runs", "reporting", "train"),
    ("cli", "gradcheck", "bench", "__main__", "__init__"),
]
TIER = {name: k for k, names in enumerate(TIERS) for name in names}


def _modules():
    return sorted(p for p in PACKAGE.rglob("*.py"))


def _top(path: Path) -> str:
    """The tier name of a file: its first component below ``jax_lstm`` (``interop/_torch.py`` -> interop)."""
    return path.relative_to(PACKAGE).with_suffix("").parts[0]


def _imports(path: Path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "jax_lstm":
            parts = node.module.split(".")
            if len(parts) > 1:
                yield parts[1], node.lineno
            else:  # from jax_lstm import checkpoint, parallel
                for alias in node.names:
                    yield alias.name, node.lineno
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "jax_lstm" and len(parts) > 1:
                    yield parts[1], node.lineno


def test_every_module_has_a_tier():
    assert {_top(p) for p in _modules()} <= set(TIER), sorted({_top(p) for p in _modules()} - set(TIER))


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_import_from_the_right(path):
    own = TIER[_top(path)]
    bad = [
        f"line {line}: jax_lstm.{name} (tier {TIER.get(name)})"
        for name, line in _imports(path)
        if name in TIER and TIER[name] > own and not (path.name == "__init__.py" and _top(path) == path.stem)
    ]
    assert not bad, f"{path.relative_to(ROOT)} (tier {own}) imports from its right: {bad}"


def test_no_file_over_600_lines():
    files = [*_modules(), *(ROOT / "bench").glob("*.py")]
    long = {str(p.relative_to(ROOT)): n for p in files if (n := len(p.read_text().splitlines())) > 600}
    assert not long, long
