"""The named experiments (conf/experiment/*.yaml) compose, sweep with joblib by default, name only
existing presets, and each ends in one aggregated table and one figure (run here shrunk to tiny
sizes with the basic launcher)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from hydra import compose, initialize_config_dir

from sim.config import register_configs
from sim.presets import conf_dir
from sim.experiments.search import parse_space

register_configs()
EXPERIMENTS = sorted(p.stem for p in (conf_dir() / "experiment").glob("*.yaml"))
SWEEPS = ["hardware-grid", "link-sweep", "cache-sweep"]
TINY = ["model=tiny", "model.layers=null", "trace.requests=1", "trace.prompt_tokens=4", "trace.decode_tokens=8",
        "hardware.workspace_gb=0", "hydra/launcher=basic"]
# each experiment, shrunk: a command-line value replaces the experiment's list for that key
SHRUNK = {
    "hardware-grid": ["hardware=rtx4090,h200", "hardware.memory_gb=0.002", "policy=lru,speq"],
    "link-sweep": ["hardware.memory_gb=0.001", "hardware.h2d_gbps=12,450", "policy=lru,speq"],
    "cache-sweep": ["cache.slots=8,32", "policy=lru,belady", "hardware.memory_gb=0.01", "trace.path=null"],
}


def cfg_of(name: str, *overrides: str):
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        return compose(config_name="sim", overrides=[f"experiment={name}", *overrides], return_hydra_config=True)


def test_the_named_experiments_exist():
    assert set(SWEEPS + ["search"]) <= set(EXPERIMENTS)


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_composes_and_names_existing_presets(name):
    cfg = cfg_of(name)
    policies = {p.stem for p in (conf_dir() / "policy").glob("*.yaml")}
    if cfg.hydra.mode and str(cfg.hydra.mode).endswith("MULTIRUN"):
        assert "Joblib" in cfg.hydra.launcher._target_  # joblib is the default launcher of sweeps
        params = cfg.hydra.sweeper.params
        assert params
        for group in ("policy", "hardware", "model"):
            if group in params:
                for v in str(params[group]).split(","):
                    assert (conf_dir() / group / f"{v}.yaml").is_file(), f"{name}: {group}={v} does not exist"
        agg = cfg.hydra.callbacks.aggregate
        assert agg.table and agg.figure
    elif cfg.experiment.get("map") is not None:  # speculation-map: its own grid, checked by MapSpec
        from sim.experiments.speculation_map import MapSpec, model_entry
        from traces.presets import PRESETS

        spec = MapSpec.from_cfg(dict(cfg.experiment))
        models = {model_entry(m)[0] for m in spec.models}
        assert all(m in PRESETS or (conf_dir() / "model" / f"{m}.yaml").is_file() for m in models), models
        assert (conf_dir() / "hardware" / f"{spec.hardware}.yaml").is_file()
    else:
        space = parse_space(cfg.experiment.search.params)
        for p in space:
            if p.key == "policy":
                assert set(p.choices) <= policies


def test_speculative_policy_is_in_the_sweeps_once_it_exists():
    if not (conf_dir() / "policy" / "speq.yaml").is_file():
        pytest.skip("no MoE-SpeQ preset yet")
    for name in ("hardware-grid", "link-sweep"):
        assert "speq" in str(cfg_of(name).hydra.sweeper.params.policy).split(",")


@pytest.mark.parametrize("name", SWEEPS)
def test_experiment_runs_shrunk_to_one_table_and_figure(name, tmp_path):
    args = [sys.executable, "-m", "sim.sweep", "-m", f"experiment={name}", *TINY, *SHRUNK[name],
            f"hydra.sweep.dir={tmp_path}"]
    out = subprocess.run(args, capture_output=True, text=True, timeout=300, env={**os.environ, "MPLBACKEND": "Agg"})
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    df = pd.read_parquet(tmp_path / "results_all.parquet")
    assert len(df) == 4 and set(df.status) <= {"ok", "infeasible"}
    assert (tmp_path / "figure.png").stat().st_size > 1000
    summary = (tmp_path / "summary.txt").read_text()
    assert summary.splitlines()[0] in out.stdout
    assert (tmp_path / "summary.csv").is_file() and (tmp_path / "jobs.csv").is_file()


def test_plain_app_runs_an_experiment(tmp_path):
    """`python -m sim experiment=...` runs the same sweep (without resume) and aggregates it."""
    args = [sys.executable, "-m", "sim", "-m", "experiment=cache-sweep", *TINY, *SHRUNK["cache-sweep"],
            f"hydra.sweep.dir={tmp_path}"]
    out = subprocess.run(args, capture_output=True, text=True, timeout=300, env={**os.environ, "MPLBACKEND": "Agg"})
    assert out.returncode == 0, out.stderr[-3000:]
    assert len(pd.read_parquet(tmp_path / "results_all.parquet")) == 4
    assert (tmp_path / "figure.png").is_file()
