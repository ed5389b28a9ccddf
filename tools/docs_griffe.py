"""A griffe extension for the documentation build (``mkdocs.yml``): grouped argument entries.

The docstrings sometimes describe several arguments in one Google-style entry
(``gate_fn, activation_fn: element-wise activations``). Griffe reads one name per entry, so
this extension writes such an entry once per name, each with the shared description, before
the docstring is parsed. The source files are not changed.
"""

from __future__ import annotations

import re

import griffe

_SECTION = re.compile(r"^(\s*)(Args|Arguments|Parameters|Keyword Args|Keyword Arguments|Other Parameters):\s*$")
_GROUPED = re.compile(r"^(\s+)([A-Za-z_]\w*(?:\s*,\s*[A-Za-z_]\w*)+)\s*:(.*)$")


def split_grouped(text: str) -> str:
    """Return ``text`` with every grouped entry of its argument sections written once per name."""
    lines = text.splitlines()
    out: list[str] = []
    section_indent: int | None = None
    i = 0
    while i < len(lines):
        line = lines[i]
        head = _SECTION.match(line)
        if head:
            section_indent = len(head.group(1))
            out.append(line)
            i += 1
            continue
        if section_indent is not None and line.strip() and len(line) - len(line.lstrip()) <= section_indent:
            section_indent = None
        m = _GROUPED.match(line) if section_indent is not None else None
        if not m:
            out.append(line)
            i += 1
            continue
        indent, names, first = m.group(1), m.group(2), m.group(3)
        body = [first]
        i += 1
        while i < len(lines) and (not lines[i].strip() or len(lines[i]) - len(lines[i].lstrip()) > len(indent)):
            if not lines[i].strip() and (i + 1 >= len(lines) or not lines[i + 1].startswith(indent + " ")):
                break
            body.append(lines[i])
            i += 1
        for name in (n.strip() for n in names.split(",")):
            out.append(f"{indent}{name}:{body[0]}")
            out.extend(body[1:])
    return "\n".join(out)


class GroupedArguments(griffe.Extension):
    """Split ``a, b: text`` argument entries into ``a: text`` and ``b: text``."""

    def on_instance(self, *, obj: griffe.Object, **kwargs) -> None:
        if obj.docstring is not None and "," in obj.docstring.value:
            obj.docstring.value = split_grouped(obj.docstring.value)
