"""Check that every non-trivial line of a README is on some page of docs/.

    python tools/check_docs_content.py OLD_README.md [docs]

A line is compared after stripping its indentation and heading marks, with links into
``docs/`` written relative to the docs folder (as the pages write them). Blank lines, code
fences and table rules are skipped. Prints the lines found nowhere and exits 1 if there are any.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path


def normalise(line: str) -> str:
    line = line.strip()
    line = re.sub(r"^#+\s+", "", line)
    return line.replace("](docs/", "](")


def trivial(line: str) -> bool:
    return not line or line.startswith("```") or re.fullmatch(r"[|\-: ]+", line) is not None


def main(argv: list[str]) -> int:
    readme = Path(argv[1])
    docs = Path(argv[2] if len(argv) > 2 else "docs")
    pages = "\n".join(normalise(x) for p in sorted(docs.rglob("*.md")) for x in p.read_text().splitlines())
    lines = [normalise(x) for x in readme.read_text().splitlines()]
    checked = [x for x in lines if not trivial(x)]
    missing = [x for x in checked if x not in pages]
    for x in missing:
        print("missing:", x)
    print(f"{len(checked) - len(missing)} of {len(checked)} non-trivial lines of {readme} are in {docs}/*.md")
    return 1 if missing else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
