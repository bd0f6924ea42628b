"""benchmarks/gpu_lean.py --smoke on the CPU: every path runs, rows carry the issue's columns, a rerun
with the same --out skips the shapes whose rows exist (resumable)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import gpu_lean  # noqa: E402


def test_smoke_rows_and_resume(tmp_path, capsys):
    assert gpu_lean.main(["--smoke", "--out", str(tmp_path)]) == 0
    rows = [json.loads(x) for x in (tmp_path / "results.jsonl").read_text().splitlines()]
    paths = {r["path"] for r in rows}
    assert {"modelled-floor", "lean-grouped", "transformers-eager-dynamic", "executor-resident"} <= paths
    assert all(r["status"] == "ok" for r in rows), [r for r in rows if r["status"] != "ok"]
    for r in rows:
        for col in ("card", "model", "engine", "resident", "roofline_floor_s"):
            assert col in r, (col, r["path"])
    tp = [r for r in rows if "tpot_s" in r]
    assert tp and all(r["tpot_s"] > 0 for r in tp)
    assert (tmp_path / "summary.md").read_text().startswith("# Lean decode path on cpu")
    n = len(rows)
    capsys.readouterr()
    assert gpu_lean.main(["--smoke", "--out", str(tmp_path)]) == 0
    assert "skipping ['tiny']: rows exist" in capsys.readouterr().out
    assert len((tmp_path / "results.jsonl").read_text().splitlines()) == n


def test_card_names_map_to_presets():
    assert gpu_lean.hardware_of("NVIDIA H100 80GB HBM3") == "h100-sxm"
    assert gpu_lean.hardware_of("NVIDIA H200") == "h200"
    assert gpu_lean.hardware_of("NVIDIA A10") is None
    for hw in set(gpu_lean.CARDS.values()):
        assert (ROOT / "conf" / "hardware" / f"{hw}.yaml").is_file()
