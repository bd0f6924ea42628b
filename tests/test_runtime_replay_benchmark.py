"""benchmarks/gpu_runtime.py --smoke: the whole GPU measurement's control path on the CPU (tiny shapes)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_runtime_benchmark_smoke(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_runtime.py"), "--smoke", "--out", str(out),
                        "--repetitions", "2", "--tmp", str(tmp_path / "tmp")], capture_output=True, text=True,
                       timeout=600, env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert sorted(p.name for p in out.iterdir()) == ["results.json", "results.parquet", "run.log", "summary.md"]
    df = pd.read_parquet(out / "results.parquet")
    assert set(df["shape"]) == {"tiny", "small-moe"}
    for shape in ("tiny", "small-moe"):
        for budget in (0.25, 0.5):
            d = df[(df["shape"] == shape) & (df["budget"] == budget)]
            meas = d[(d.source == "measured") & (d.status == "ok")]
            sim = d[(d.source == "sim") & (d.status == "ok")]
            assert sorted(set(meas.policy)) == ["history", "lookahead", "lru", "oracle"], (shape, budget)
            assert len(meas) == 8 and len(sim) == 4
            # measured and simulated rows of one config share its config_id
            assert set(meas.config_id) == set(sim.config_id)
            assert (meas.tokens_per_s > 0).all() and (meas.bound_tpot_ms > 0).all()
            assert meas["explain"].notna().all()
        res = df[(df["shape"] == shape) & (df.policy == "resident")]
        assert len(res) == 1 and res.status.iloc[0] == "ok" and res.copies.iloc[0] == 0
    md = (out / "summary.md").read_text()
    assert "## tiny" in md and "## small-moe" in md and "cache holds 25% of the experts" in md
    assert "| lookahead |" in md and "tokens/s sim" in md
