"""The two kinds of table the benchmarks print: fixed-width columns and Markdown.

Each benchmark builds its rows of already formatted cells and hands them to one of these.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

__all__ = ["fmt", "mib", "columns", "markdown"]


def fmt(x, spec: str, none: str = "-") -> str:
    """``format(x, spec)``, or ``none`` for None."""
    return none if x is None else format(x, spec)


def mib(n_bytes: int | None, spec: str = ".2f") -> str:
    """A byte count in MiB, or ``-`` for None."""
    return fmt(n_bytes and n_bytes / 2**20, spec)


def columns(layout: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    """Lines of cells padded to their column's format spec (``"<18"``, ``">9"``), one space apart.

    A row may have fewer cells than ``layout``: it fills the first columns.
    """
    return [" ".join(format(cell, spec) for cell, spec in zip(row, layout, strict=False)) for row in rows]


def markdown(header: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    """A Markdown table: the header, its rule, one line per row (an empty cell is ``| |``)."""

    def line(cells):
        return "|" + "|".join(f" {c} " if c else " " for c in cells) + "|"

    return [line(header), "|" + "---|" * len(header), *(line(r) for r in rows)]
