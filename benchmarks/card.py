"""The card a GPU benchmark runs on: its conf/hardware preset, and the shapes that already have rows
on it (so a rerun resumes). Shared by gpu_lean.py and gpu_speculative.py."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

CARDS = {  # substring of torch.cuda.get_device_name -> conf/hardware preset
    "H100 80GB HBM3": "h100-sxm", "H100 SXM": "h100-sxm", "H100 PCIe": "h100-pcie5", "H200": "h200",
}


def hardware_of(name: str) -> str | None:
    """The hardware preset of a card name, or None when no preset matches."""
    return next((hw for key, hw in CARDS.items() if key in name), None)


def identify(meta: dict[str, Any], smoke: bool, hardware: str | None, prefer_measured: bool = False) -> int:
    """Fill ``meta["card"]`` and ``meta["hardware"]``; 0, or 2 after saying why the run cannot start.
    ``prefer_measured``: the card's measured profile (``measured/<preset>``, runtime.profile) where one
    is committed, else its preset."""
    if smoke:
        meta.update(card="cpu", hardware=hardware or "h200")
        return 0
    import torch

    if not torch.cuda.is_available():
        print("no CUDA GPU here: use --smoke for the CPU check", file=sys.stderr)
        return 2
    meta["card"] = torch.cuda.get_device_name(0)
    meta["hardware"] = hardware or hardware_of(meta["card"])
    if meta["hardware"] is None:
        print(f"card {meta['card']!r} has no hardware preset here (known: {CARDS}); pass --hardware", file=sys.stderr)
        return 2
    measured = Path(__file__).resolve().parents[1] / "conf" / "hardware" / "measured" / f"{meta['hardware']}.yaml"
    if hardware is None and prefer_measured and measured.is_file():
        meta["hardware"] = f"measured/{meta['hardware']}"
    return 0


def measured_models(rows_path: Path, card: str) -> set[str]:
    """Models with rows on ``card`` in a JSON-lines results file (skipped by a rerun)."""
    if not rows_path.is_file():
        return set()
    rows = (json.loads(line) for line in rows_path.read_text().splitlines())
    return {r["model"] for r in rows if r.get("card") == card}
