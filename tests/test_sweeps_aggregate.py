"""Aggregation of complete and partial sweeps: infeasible configs are rows with status infeasible,
failed jobs are listed (and are rows with status failed), unfinished and never-started jobs are
listed, and job dirs of an earlier sweep in the same dir are not mixed in."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import JobReturn, JobStatus
from omegaconf import open_dict

from sim.experiments import aggregate
from sim.experiments.aggregate import AggregateSweep, aggregate_dir, scan_sweep, summary_table
from sim.config import register_configs
from sim.presets import conf_dir

register_configs()
TINY = ["model=tiny", "trace.requests=1", "trace.prompt_tokens=4", "trace.decode_tokens=8"]
# 4 jobs: (lru, 0.001 GB) infeasible, (lru, 24 GB) ok, (nope, 0.001 GB) infeasible (the budget is
# checked first), (nope, 24 GB) fails: unknown eviction policy
MIXED = [*TINY, "policy=lru", "policy.eviction=lru,nope", "hardware.memory_gb=0.001,24"]


def run(*args: str, app: str = "sim.sweep") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", app, *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "MPLBACKEND": "Agg"})


def agg(*args: str) -> subprocess.CompletedProcess:
    return run(*args, app="sim.aggregate")


@pytest.fixture(scope="module")
def mixed(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    d = tmp_path_factory.mktemp("mixed")
    return d, run("-m", *MIXED, f"hydra.sweep.dir={d}")


def test_failed_and_infeasible_jobs_are_rows_and_listed(mixed):
    d, out = mixed
    assert out.returncode == 0, out.stderr[-2000:]  # one job ran: exit 0, the others stay rows with their reason
    df = pd.read_parquet(d / "results_all.parquet")
    assert len(df) == 4
    assert df.status.tolist() == ["infeasible", "ok", "infeasible", "failed"]
    assert "GB" in df.reason[0]  # the infeasible row says by how much
    failed = df[df.status == "failed"].iloc[0]
    assert "nope" in failed.reason and failed.memory_gb == 24 and failed.policy == "lru"
    assert failed.job == "3" and "policy.eviction=nope" in failed.overrides
    jobs = pd.read_csv(d / "jobs.csv")
    assert jobs.status.tolist() == ["ok", "ok", "ok", "failed"]
    assert "failed jobs:" in out.stdout and "unknown eviction policy 'nope'" in out.stdout
    marker = json.loads((d / "3" / "sweep_job.json").read_text())
    assert marker["status"] == "failed" and "Traceback" in marker["traceback"]


def test_aggregate_command_reaggregates_any_dir(mixed, tmp_path):
    d, _ = mixed
    copy = tmp_path / "copy"
    shutil.copytree(d, copy)
    (copy / "results_all.parquet").unlink()
    out = agg(str(copy))
    assert out.returncode == 0, out.stderr
    assert pd.read_parquet(copy / "results_all.parquet").status.tolist() == ["infeasible", "ok", "infeasible", "failed"]
    assert "jobs: 4 (3 ok, 1 failed)" in out.stdout
    strict = agg(str(copy), "--strict")
    assert strict.returncode == 2 and "1 job(s) without current results: 3" in strict.stderr
    df, missing = aggregate_dir(copy)
    assert missing == ["3"] and len(df) == 4


def test_partial_sweep_lists_unfinished_and_not_started(mixed, tmp_path):
    d, _ = mixed
    part = tmp_path / "part"
    shutil.copytree(d, part)
    # job 1 was killed mid-run: its dir and config exist, no results, no marker
    (part / "1" / "results.parquet").unlink()
    (part / "1" / "sweep_job.json").unlink()
    # job 2 never started
    shutil.rmtree(part / "2")
    scan = scan_sweep(part)
    states = dict(zip(scan.jobs.job, scan.jobs.status))
    assert states == {"0": "ok", "1": "unfinished", "2": "not started", "3": "failed"}
    assert scan.expected == 4 and sorted(scan.incomplete) == ["1", "2", "3"]
    assert scan.rows.job.tolist() == ["0", "3"]  # only current results (and the failed row)
    out = agg(str(part))
    assert "unfinished jobs:" in out.stdout and "not started jobs:" in out.stdout
    assert "hardware.memory_gb=0.001" in out.stdout  # the never-started job's overrides are named


def test_relaunched_job_that_did_not_finish_is_not_reported_with_old_results(mixed, tmp_path):
    d, _ = mixed
    part = tmp_path / "relaunch"
    shutil.copytree(d, part)
    cfg = part / "1" / ".hydra" / "config.yaml"
    cfg.write_text(cfg.read_text() + "\n# rewritten by a later launch\n")
    scan = scan_sweep(part)
    assert dict(zip(scan.jobs.job, scan.jobs.status))["1"] == "unfinished"
    assert "1" not in scan.rows.job.tolist()


def test_dirs_of_an_earlier_sweep_are_stale_not_results(tmp_path):
    out = run("-m", *TINY, "policy=lru,fifo,lfu", f"hydra.sweep.dir={tmp_path}")
    assert out.returncode == 0, out.stderr[-2000:]
    # another sweep into the same dir: only as an explicit resume (without it: refused, test_sweeps_resume)
    out = run("-m", *TINY, "policy=belady", f"hydra.sweep.dir={tmp_path}", "resume=true")
    assert out.returncode == 0, out.stderr[-2000:]
    scan = scan_sweep(tmp_path)
    assert scan.rows.policy.tolist() == ["belady"]
    assert scan.names("stale") == ["1", "2"] and scan.incomplete == []
    assert "ignored 2 job dir(s) of an earlier sweep" in out.stdout


def test_callback_records_a_job_that_hydra_marks_failed(tmp_path):
    """Under `python -m sim` a job that raises is FAILED for Hydra; the callback writes its marker."""
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        cfg = compose(config_name="sim", overrides=TINY, return_hydra_config=True)
    job = tmp_path / "0"
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "config.yaml").write_text("model: {name: tiny}\n")
    (job / ".hydra" / "overrides.yaml").write_text("- policy=lru\n")
    with open_dict(cfg):
        cfg.hydra.mode = "MULTIRUN"
        cfg.hydra.runtime.output_dir = str(job)
        cfg.hydra.sweep.dir = str(tmp_path)
    HydraConfig.instance().set_config(cfg)
    ret = JobReturn()
    ret.status, ret.return_value = JobStatus.FAILED, RuntimeError("boom")
    AggregateSweep().on_job_end(config=cfg, job_return=ret)
    scan = scan_sweep(tmp_path)
    assert scan.jobs.status.tolist() == ["failed"] and "RuntimeError: boom" in scan.jobs.error[0]
    assert scan.rows.status.tolist() == ["failed"]


def test_summary_table_marks_infeasible_and_failed_cells(mixed):
    d, _ = mixed
    df = pd.read_parquet(d / "results_all.parquet")
    text, num = summary_table(df, {"index": ["memory_gb"], "columns": "job", "values": "tpot_ms"})
    assert "infeasible" in text and "failed" in text
    assert num.notna().sum().sum() == 1  # one ok value


def test_missing_dir_is_an_error(tmp_path):
    out = agg(str(tmp_path / "nope"))
    assert out.returncode == 2 and "no such sweep directory" in out.stderr
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("not a sweep")
    out = agg(str(tmp_path / "empty"))
    assert out.returncode == 2 and "holds no sweep" in out.stderr and "Traceback" not in out.stderr
    assert sorted(p.name for p in (tmp_path / "empty").iterdir()) == ["notes.txt"]  # nothing written
    with pytest.raises(FileNotFoundError):
        aggregate.scan_sweep(tmp_path / "nope")


def test_keys_the_named_ones_determine_stay_out_of_the_index():
    """memory_gb follows memory_gib, and a policy that pins its own engine or host memory makes those
    vary with the policy: neither splits the table's rows; a key that varies independently does."""
    rows = pd.DataFrame([
        {"model": "m", "memory_gib": g, "memory_gb": g * 1.073741824, "policy": p, "engine": e, "seed": s,
         "status": "ok", "tpot_ms": 10.0 * g + i + s}
        for g in (16, 24) for i, (p, e) in enumerate((("lru", "ideal"), ("hf-offload", "eager"))) for s in (0, 1)
    ])
    text, num = summary_table(rows, {"index": ["model", "memory_gib"], "columns": "policy"})
    assert list(num.index.names) == ["model", "memory_gib", "seed"]
    assert num.loc[("m", 24, 1), "hf-offload"] == 242.0
