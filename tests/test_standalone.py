"""The repository stands alone: no file cites notes that are not in it, and every docs/ page a file
links to exists."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

#: markdown files the benchmark scripts write into their output folders (not notes)
GENERATED = {"summary.md"}
TEXT = (".py", ".md", ".yaml", ".toml", ".txt")


def tracked() -> list[str]:
    out = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    return [f for f in out.split() if f.endswith(TEXT) and f != "tests/test_standalone.py"]


def outside_citations(rel: str, text: str, notes: set[str], paths: set[str]) -> list[str]:
    """Lines of ``text`` that name a markdown note the repository lacks, or a path that climbs out of
    the repository to something it does not hold: a user of the repository has neither."""
    found = []
    for i, line in enumerate(text.splitlines(), 1):
        missing = [n for n in re.findall(r"[\w.-]+\.md\b", line) if n not in notes and n not in GENERATED]
        missing += [p for p in re.findall(r"(?<![\w.])(?:\.\./)+[\w./-]+", line) if p.lstrip("./") not in paths]
        if missing:
            found.append(f"{rel}:{i}: {line.strip()}")
    return found


def test_no_file_cites_notes_outside_the_repository() -> None:
    files = tracked()
    notes = {Path(f).name for f in files if f.endswith(".md")}
    paths = set(subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split())
    paths |= {str(Path(p).parent) for p in paths}
    found = []
    for rel in files:
        if (ROOT / rel).is_file():
            found += outside_citations(rel, (ROOT / rel).read_text(errors="replace"), notes, paths)
    assert found == []


def test_outside_citations_are_caught() -> None:
    """The check itself: a note or a climbing path the repository lacks is reported, its own are not."""
    text = "see the design notes (NOTES.md)\nthe repo's docs/metrics.md\nsee ../elsewhere/x.txt\nok ../traces/io.py"
    got = outside_citations("f.py", text, {"metrics.md"}, {"traces/io.py"})
    assert got == ["f.py:1: see the design notes (NOTES.md)", "f.py:3: see ../elsewhere/x.txt"]


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
