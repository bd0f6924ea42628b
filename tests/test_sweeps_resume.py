"""Resuming a sweep in a fixed sweep dir (resume=true) recomputes only what is missing or changed."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
from hydra import compose, initialize_config_dir

from sim.config import register_configs
from sim.presets import conf_dir
from sim.experiments.jobs import config_fingerprint
from sim.experiments.sweep import run_job

register_configs()
TINY = ["model=tiny", "trace.requests=1", "trace.prompt_tokens=4", "trace.decode_tokens=8"]
FOUR = [*TINY, "policy=lru,belady", "hardware=rtx4090,h200"]


def sweep(d: Path, *args: str, app: str = "sim.sweep", code: int = 0) -> subprocess.CompletedProcess:
    out = subprocess.run([sys.executable, "-m", app, "-m", *args, f"hydra.sweep.dir={d}"],
                         capture_output=True, text=True, timeout=300, env={**os.environ, "MPLBACKEND": "Agg"})
    assert out.returncode == code, out.stdout[-2000:] + out.stderr[-2000:]
    return out


def markers(d: Path) -> dict[str, dict]:
    return {p.parent.name: json.loads(p.read_text()) for p in d.glob("*/sweep_job.json")}


def rows(d: Path) -> pd.DataFrame:
    df = pd.read_parquet(d / "results_all.parquet").drop(columns=["job", "overrides", "wall_s"])
    return df.sort_values(["policy", "hardware"]).reset_index(drop=True)


def test_resume_reuses_every_finished_job(tmp_path):
    sweep(tmp_path, *FOUR)
    before = {j: (tmp_path / j / "results.parquet").read_bytes() for j in "0123"}
    out = sweep(tmp_path, *FOUR, "resume=true")
    assert "4 reused from an earlier run" in out.stdout
    assert {j: m["reused_from"] for j, m in markers(tmp_path).items()} == {j: "self" for j in "0123"}
    assert {j: (tmp_path / j / "results.parquet").read_bytes() for j in "0123"} == before


def test_without_resume_another_sweeps_dir_is_refused(tmp_path):
    """Nothing but an explicit resume writes into a directory another run wrote."""
    sweep(tmp_path, *FOUR)
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    for app in ("sim.sweep", "sim"):
        out = sweep(tmp_path, *FOUR, app=app, code=2)
        assert out.stderr.strip().splitlines() == [
            f"error: {tmp_path} already holds a sweep's results; pass resume=true to reuse and extend them, "
            "or give this sweep its own hydra.sweep.dir"]
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before


def test_interrupted_sweep_recomputes_only_the_missing_job(tmp_path):
    sweep(tmp_path, *FOUR)
    # as if job 2 had been killed before it finished: no results, no marker, nothing indexed
    fp = json.loads((tmp_path / "2" / "sweep_job.json").read_text())["fingerprint"]
    shutil.rmtree(tmp_path / ".sweep_index" / fp)
    (tmp_path / "2" / "results.parquet").unlink()
    (tmp_path / "2" / "sweep_job.json").unlink()
    out = sweep(tmp_path, *FOUR, "resume=true")
    assert "3 reused from an earlier run" in out.stdout
    m = markers(tmp_path)
    assert m["2"]["reused_from"] is None and m["2"]["status"] == "ok"


def test_extended_and_reordered_sweep_reuses_results_from_other_job_dirs(tmp_path):
    """Adding a value renumbers the jobs; results are found by fingerprint in the sweep's index."""
    sweep(tmp_path, *FOUR)
    six = [*TINY, "policy=fifo,belady,lru", "hardware=h200,rtx4090"]
    out = sweep(tmp_path, *six, "resume=true")
    assert "jobs: 6 (6 ok); 4 reused from an earlier run" in out.stdout
    m = markers(tmp_path)
    moved = [j for j, x in m.items() if str(x["reused_from"]).startswith("index")]
    assert len(moved) == 4  # every old config now has another job number: taken from the index
    fresh = tmp_path / "fresh"
    sweep(fresh, *six)
    pd.testing.assert_frame_equal(rows(tmp_path), rows(fresh), check_exact=True)


def test_a_changed_config_is_not_reused(tmp_path):
    sweep(tmp_path, *FOUR)
    first = rows(tmp_path)
    out = sweep(tmp_path, *[a.replace("decode_tokens=8", "decode_tokens=9") for a in FOUR], "resume=true")
    assert "reused" not in out.stdout
    assert (rows(tmp_path).decode_tokens == first.decode_tokens + 1).all()


def test_results_of_the_plain_app_are_resumable(tmp_path):
    """`python -m sim -m` jobs get a marker from the aggregation callback, so sim.sweep resumes them."""
    sweep(tmp_path, *FOUR, app="sim")
    out = sweep(tmp_path, *FOUR, "resume=true")
    assert "4 reused from an earlier run" in out.stdout


def test_fingerprint_ignores_display_keys_and_sees_config_changes():
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        a = compose(config_name="sim", overrides=TINY)
        b = compose(config_name="sim", overrides=[*TINY, "progress=false", "results_name=other", "resume=true"])
        c = compose(config_name="sim", overrides=[*TINY, "hardware.h2d_gbps=12"])
    assert config_fingerprint(a) == config_fingerprint(b) != config_fingerprint(c)


def test_run_job_records_failure_without_raising(tmp_path):
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        cfg = compose(config_name="sim", overrides=[*TINY, "policy=lru", "policy.eviction=nope"])
    res = run_job(cfg, tmp_path)
    assert res.status == "failed" and "nope" in res.error
    m = json.loads((tmp_path / "sweep_job.json").read_text())
    assert m["status"] == "failed" and not (tmp_path / "results.parquet").exists()
