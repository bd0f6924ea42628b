"""Prompts for trace capture: a text file (one per line), a JSONL file (one field), or the built-in set.

The built-in set was written for this project (public domain, like the rest of its text): short,
varied requests (code, prose, arithmetic, lists, dialogue) so that a capture without any data
file still exercises different experts. Real studies should bring their own prompts.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from runtime.errors import CaptureError

BUILTIN_PROMPTS: tuple[str, ...] = (
    "Write a Python function that returns the n-th Fibonacci number without recursion.",
    "Explain in two sentences why the sky looks blue during the day and red at sunset.",
    "List five kinds of trees that grow well in cold climates, with one fact about each.",
    "def merge_sorted(a, b):\n    \"\"\"Merge two sorted lists into one sorted list.\"\"\"\n",
    "Translate into French: The library opens at nine and closes at six on weekdays.",
    "A train leaves at 14:05 and arrives at 17:50. How long is the journey in minutes?",
    "Summarise the plot of a story about a lighthouse keeper who finds a message in a bottle.",
    "What is the difference between a process and a thread in an operating system?",
    "Write a haiku about the first snow falling on a quiet city street.",
    "Give three tips for writing clear error messages in command-line tools.",
    "SELECT name, COUNT(*) FROM orders GROUP BY name ORDER BY 2 DESC; -- explain this query",
    "Describe how a hash table handles collisions, with a short example.",
    "Dear team, I am writing to let you know that the meeting on Thursday has moved to",
    "Compute 17 * 23 step by step, then check the result by division.",
    "Once upon a time, in a village at the edge of a great forest, there lived a clockmaker who",
    "Name the planets of the solar system in order from the sun and give each one's largest moon.",
    "Write a short dialogue between a customer and a baker about a birthday cake.",
    "import numpy as np\n\n# Compute the moving average of a 1-D array with window w\ndef moving_average(x, w):",
    "What are the main causes of inflation, and how do central banks respond to it?",
    "Rewrite this sentence in the passive voice: The committee approved the new budget yesterday.",
    "Explain what a mixture-of-experts language model is to a high-school student.",
    "Give a recipe for a simple tomato soup for four people.",
    "The quick brown fox jumps over the lazy dog. Count the letters in this sentence.",
    "Outline the steps to set up a small vegetable garden on a balcony.",
)


@dataclass
class PromptSet:
    """Prompt texts plus where they came from (recorded in the trace metadata)."""

    texts: list[str]
    origin: dict[str, Any] = field(default_factory=dict)


def _digest(texts: list[str]) -> str:
    h = hashlib.sha256()
    for t in texts:
        h.update(t.encode("utf-8"))
        h.update(b"\0")
    return h.hexdigest()


def builtin_prompts(limit: int | None = None) -> PromptSet:
    texts = list(BUILTIN_PROMPTS[:limit] if limit else BUILTIN_PROMPTS)
    return PromptSet(texts, {"origin": "builtin", "count": len(texts), "sha256": _digest(texts)})


def load_prompts(path: str | os.PathLike | None = None, field: str = "text", limit: int | None = None) -> PromptSet:
    """Prompts from ``path`` (``.jsonl``/``.json``: one object per line, its ``field``; else one prompt
    per non-blank line), or the built-in set when ``path`` is None."""
    if limit is not None and limit < 1:
        raise CaptureError(f"prompts.limit must be >= 1, got {limit}")
    if path is None:
        return builtin_prompts(limit)
    p = Path(path).expanduser()
    if not p.is_file():
        raise CaptureError(f"{p}: prompt file not found")
    raw = p.read_text(encoding="utf-8")
    texts: list[str] = []
    if p.suffix in (".jsonl", ".json", ".ndjson"):
        for n, line in enumerate(raw.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise CaptureError(f"{p}:{n}: not valid JSON ({e.msg})") from None
            if not isinstance(obj, dict) or field not in obj:
                raise CaptureError(f"{p}:{n}: no field {field!r} (set prompts.field=...)")
            v = obj[field]
            if not isinstance(v, str):
                raise CaptureError(f"{p}:{n}: field {field!r} is {type(v).__name__}, expected a string")
            if v.strip():
                texts.append(v)
        kind = "jsonl"
    else:
        texts = [line for line in raw.splitlines() if line.strip()]
        kind = "text"
    if not texts:
        raise CaptureError(f"{p}: no prompts in the file (empty, or only blank lines/values)")
    if limit:
        texts = texts[:limit]
    origin = {"origin": kind, "path": str(p), "count": len(texts), "sha256": _digest(texts)}
    if kind == "jsonl":
        origin["field"] = field
    return PromptSet(texts, origin)
