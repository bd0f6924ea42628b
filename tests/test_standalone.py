"""The repository stands alone: no file cites notes that are not in it, and every docs/ page a file
links to exists."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

#: names of notes that exist only outside the repository
OUTSIDE = re.compile(r"DESIGN\.md|anchors-offload|anchors-sim|anchors §|ecosystem\.md|routing-statistics"
                     r"|moe-speq\.md|research/|\.\./shared|KINDS\.md")
TEXT = (".py", ".md", ".yaml", ".toml", ".txt")


def tracked() -> list[str]:
    out = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    return [f for f in out.split() if f.endswith(TEXT) and f != "tests/test_standalone.py"]


def test_no_file_cites_notes_outside_the_repository() -> None:
    found = []
    for rel in tracked():
        if not (ROOT / rel).is_file():
            continue
        for i, line in enumerate((ROOT / rel).read_text(errors="replace").splitlines(), 1):
            if OUTSIDE.search(line):
                found.append(f"{rel}:{i}: {line.strip()}")
    assert found == []


def test_links_to_docs_pages_resolve() -> None:
    """`docs/X.md` in code and `(X.md)` links inside docs/ name pages that exist."""
    missing = []
    for rel in tracked():
        if not (ROOT / rel).is_file():
            continue
        text = (ROOT / rel).read_text(errors="replace")
        names = set(re.findall(r"docs/([\w.-]+\.md)", text))
        if rel.startswith("docs/"):
            names |= set(re.findall(r"\]\(([\w.-]+\.md)", text))
        missing += [f"{rel}: docs/{n}" for n in sorted(names) if not (ROOT / "docs" / n).is_file()]
    assert missing == []
