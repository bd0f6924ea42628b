"""The same 4-job sweep gives bit-identical rows under every launcher and as single runs.

Each launcher runs the sweep in a subprocess (as a user would): basic (sequential, in process),
joblib (2 loky workers), submitit's local executor (one subprocess per job) and Ray (a local Ray
instance started by the sweep; skipped only where Ray or its Hydra plugin is not installed).
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hydra import compose, initialize_config_dir

from sim.config import register_configs
from sim.run import simulate

from sim.presets import conf_dir

register_configs()


def _missing(module: str) -> bool:
    """Whether ``module`` cannot be imported (find_spec raises when a parent package is absent)."""
    try:
        return importlib.util.find_spec(module) is None
    except ModuleNotFoundError:
        return True


TINY = ["model=tiny", "trace.requests=1", "trace.prompt_tokens=4", "trace.decode_tokens=8"]
GRID = {"policy": ["lru", "belady"], "hardware": ["rtx4090", "h200"]}
SWEEP = [*TINY, "policy=" + ",".join(GRID["policy"]), "hardware=" + ",".join(GRID["hardware"])]
KEYS = ["policy", "hardware"]


def run_sweep(sweep_dir: Path, *args: str, app: str = "sim.sweep", timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "RAY_DEDUP_LOGS": "0", "MPLBACKEND": "Agg"}
    return subprocess.run([sys.executable, "-m", app, "-m", *args, f"hydra.sweep.dir={sweep_dir}"],
                          capture_output=True, text=True, timeout=timeout, env=env)


def single_runs() -> pd.DataFrame:
    rows = []
    for p in GRID["policy"]:
        for h in GRID["hardware"]:
            with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
                cfg = compose(config_name="sim", overrides=[*TINY, f"policy={p}", f"hardware={h}"])
            rows += simulate(cfg)
    return pd.DataFrame(rows)


def numeric(df: pd.DataFrame) -> pd.DataFrame:
    """The numeric columns except wall_s (the only one that depends on the machine's load), in a
    fixed row order."""
    df = df.sort_values(KEYS).reset_index(drop=True)
    cols = [c for c in df.columns if pd.api.types.is_numeric_dtype(df[c]) and c != "wall_s"]
    return df[KEYS + cols]


@pytest.fixture(scope="module")
def reference() -> pd.DataFrame:
    return numeric(single_runs())


def check_sweep(sweep_dir: Path, out: subprocess.CompletedProcess, reference: pd.DataFrame) -> None:
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    jobs = sorted(p for p in sweep_dir.iterdir() if (p / ".hydra").is_dir())
    assert [p.name for p in jobs] == ["0", "1", "2", "3"]  # one dir per job
    for j in jobs:
        assert (j / "results.parquet").is_file() and (j / "sweep_job.json").is_file()
    got = numeric(pd.read_parquet(sweep_dir / "results_all.parquet"))
    assert len(reference) == 4 and reference.shape == got.shape
    assert list(got.columns) == list(reference.columns)
    pd.testing.assert_frame_equal(got, reference, check_exact=True)  # bit for bit, NaN == NaN
    assert "jobs: 4 (4 ok)" in out.stdout


def test_basic_launcher_matches_single_runs(tmp_path, reference):
    check_sweep(tmp_path, run_sweep(tmp_path, *SWEEP), reference)


def test_main_app_sweep_matches_single_runs(tmp_path, reference):
    """`python -m sim -m ...` (the plain app) gives the same rows; its jobs get markers too."""
    out = run_sweep(tmp_path, *SWEEP, app="sim")
    check_sweep(tmp_path, out, reference)


def test_joblib_launcher_matches_single_runs(tmp_path, reference):
    out = run_sweep(tmp_path, *SWEEP, "hydra/launcher=joblib", "hydra.launcher.n_jobs=2")
    check_sweep(tmp_path, out, reference)


@pytest.mark.skipif(_missing("hydra_plugins.hydra_submitit_launcher"),
                    reason="hydra-submitit-launcher not installed (pip install -e '.[cluster]')")
def test_submitit_local_launcher_matches_single_runs(tmp_path, reference):
    out = run_sweep(tmp_path, *SWEEP, "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=5")
    check_sweep(tmp_path, out, reference)
    assert (tmp_path / ".submitit").is_dir()


def test_slurm_launcher_config_composes():
    """The documented SLURM config resolves to submitit's SLURM launcher (no cluster here to run it)."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        cfg = compose(config_name="sim", overrides=["hydra/launcher=slurm"], return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert launcher.cpus_per_task == 1 and launcher.mem_gb == 4 and launcher.timeout_min == 60


@pytest.mark.skipif(importlib.util.find_spec("ray") is None
                    or _missing("hydra_plugins.hydra_ray_launcher"),
                    reason="ray / hydra-ray-launcher not installed (pip install -e '.[cluster]')")
def test_ray_launcher_matches_single_runs(tmp_path, reference):
    """The sweep starts a local Ray instance (2 CPUs, no dashboard) and runs each job in a fresh
    worker process (conf/hydra/launcher/ray-local.yaml: max_calls 1)."""
    out = run_sweep(tmp_path, *SWEEP, "hydra/launcher=ray-local", "hydra.launcher.ray.init.num_cpus=2",
                    timeout=400)
    check_sweep(tmp_path, out, reference)


def test_rows_do_not_depend_on_job_order(tmp_path, reference):
    """Self-contained jobs: the reverse order in one process gives the same rows."""
    rev = [*TINY, "policy=" + ",".join(reversed(GRID["policy"])), "hardware=" + ",".join(reversed(GRID["hardware"]))]
    out = run_sweep(tmp_path, *rev)
    assert out.returncode == 0, out.stderr[-3000:]
    got = numeric(pd.read_parquet(tmp_path / "results_all.parquet"))
    pd.testing.assert_frame_equal(got, reference, check_exact=True)
    assert np.isfinite(got.tpot_ms).all()
