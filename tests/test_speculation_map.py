"""The speculation map (python -m sim.sweep experiment=speculation-map): the smoke grid end to end,
its points equal to plain runs, and bad grids refused."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from sim.errors import SimError
from sim.experiments.speculation_map import MapSpec, crossing

ROOT = Path(__file__).resolve().parent.parent


def test_smoke_map_end_to_end(tmp_path):
    out = subprocess.run([sys.executable, "-m", "sim.sweep", "experiment=speculation-map", "experiment.scale=smoke",
                          f"hydra.run.dir={tmp_path}"], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    for f in ("speculation_map.parquet", "speculation_map.csv", "speculation_map.png", "speculation_map.md"):
        assert (tmp_path / f).stat().st_size > 0
    df = pd.read_parquet(tmp_path / "speculation_map.parquet")
    assert len(df) == 1 * 2 * 1 * 2 * 3 * 1 and (df["status"] == "ok").all()
    assert (df["speedup"] == df["lru_tpot_ms"] / df["speq_tpot_ms"]).all()
    # LRU does not depend on the draft: one value per (link, host overhead)
    assert df.groupby(["link", "host_per_layer_ms"])["lru_tpot_ms"].nunique().eq(1).all()
    assert "small-moe" in out.stdout and "speed-up >= 1" in out.stdout

    # a point is the plain run of the same config (python -m sim policy=speq with the same keys)
    from hydra import compose, initialize_config_dir

    from sim.config import register_configs
    from sim.presets import conf_dir
    from sim.run import simulate

    register_configs()
    spec = MapSpec.from_cfg({"scale": "smoke", **_yaml_experiment()})
    cell = spec.cells()[-1]
    row = df[(df["link"] == cell["link"]) & (df["host_per_layer_ms"] == cell["host_per_layer_ms"])
             & (df["acceptance"] == 0.95)].iloc[0]
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        cfg = compose(config_name="sim", overrides=spec.overrides(cell) + ["policy=speq", "trace.acceptance=0.95",
                                                                          "trace.draft_agreement=0.909"])
    (plain,) = simulate(cfg)
    assert plain["tpot_ms"] == row["speq_tpot_ms"]


def _yaml_experiment() -> dict:
    from omegaconf import OmegaConf

    raw = OmegaConf.to_container(OmegaConf.load(ROOT / "conf" / "experiment" / "speculation-map.yaml"))
    return {k: v for k, v in raw["experiment"].items() if k != "scale"}


def test_crossing_by_hand():
    d = pd.DataFrame({"acceptance": [0.8, 0.9, 0.95, 1.0], "speedup": [0.5, 1.1, 0.9, 1.2]})
    assert crossing(d) == 1.0  # it stays >= 1 only from 1.0 on
    assert crossing(d.assign(speedup=[0.5, 1.0, 1.1, 1.2])) == 0.9
    assert crossing(d.assign(speedup=[1.5, 1.0, 1.1, 1.2])) == 0.8
    assert pd.isna(crossing(d.assign(speedup=0.5)))


@pytest.mark.parametrize("change, msg", [({"scale": "huge"}, "experiment.scale must be one of"),
                                         ({"map": {"acceptance": [1.2]}}, "experiment.map.acceptance"),
                                         ({"map": {"colour": 1}}, "unknown key"),
                                         ({"map": {"budgets": {}}}, "no budget for model")])
def test_bad_grids_are_refused(change, msg):
    exp = _yaml_experiment()
    exp["scale"] = change.get("scale", "full")
    exp["map"] = {**exp["map"], **change.get("map", {})}
    with pytest.raises(SimError, match=msg):
        MapSpec.from_cfg(exp)
