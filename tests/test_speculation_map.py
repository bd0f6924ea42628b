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


# ------------------------------------------------------------------ depth-reduced shapes, budgets in slots
def _measured_exp(**change) -> dict:
    """A tiny map at the measured setting: Phi-3.5-MoE's 4-layer shape on the H100 SXM profile."""
    m = {"hardware": "measured/h100-sxm", "models": ["phi-3.5-moe@4"], "links": {"own": None},
         "budgets": {"phi-3.5-moe@4": {"measured": {"speq_slots": 32}}}, "acceptance": [0.8, 1.0],
         "host_per_layer_ms": [0.0, 1.0], "agreement": [0.909], "decode_tokens": 16, "workers": 1}
    m.update(change)
    return {"scale": "full", "map": m}


def test_model_entry_parses_depth():
    from sim.experiments.speculation_map import model_entry, model_spec

    assert model_entry("phi-3.5-moe@4") == ("phi-3.5-moe", 4)
    assert model_entry("qwen1.5-moe-a2.7b") == ("qwen1.5-moe-a2.7b", None)
    spec = model_spec("qwen1.5-moe-a2.7b@4")
    assert (spec.num_layers, spec.num_moe_layers, spec.num_routed_experts_total) == (4, 4, 240)


@pytest.mark.parametrize("models, msg", [
    (["phi-3.5-moe@x"], "'phi-3.5-moe@x': the depth after '@' must be an integer >= 1, got 'x'"),
    (["phi-3.5-moe@0"], "got '0'"),
    (["phi-3.5-moe@04"], "got '04'"),
    (["@4"], "'@4' names no model preset"),
    (["phi-3.5-moe@33"], r"'phi-3.5-moe@33': model 'phi-3.5-moe': layers=33 must be in \[1, 32\]"),
    (["no-such-model@4"], "'no-such-model@4'"),
])
def test_bad_model_entries_are_refused(models, msg):
    exp = _measured_exp(models=models, budgets={m: {"b": 10} for m in models})
    with pytest.raises(SimError, match=msg):
        MapSpec.from_cfg(exp)


@pytest.mark.parametrize("budget, msg", [({"speq_slots": 0}, r"speq_slots must be an integer >= 1, got 0"),
                                         ({"speq_slots": 2.5}, "got 2.5"),
                                         ({"slots": 32}, r"GiB or \{speq_slots: N\}, got keys \['slots'\]"),
                                         ("big", "must be GiB > 0 or")])
def test_bad_budgets_are_refused(budget, msg):
    with pytest.raises(SimError, match=r"experiment\.map\.budgets\.phi-3\.5-moe@4\.measured"):
        MapSpec.from_cfg(_measured_exp(budgets={"phi-3.5-moe@4": {"measured": budget}}))
    with pytest.raises(SimError, match=msg):
        MapSpec.from_cfg(_measured_exp(budgets={"phi-3.5-moe@4": {"measured": budget}}))


@pytest.mark.parametrize("entry, speq, lru", [("phi-3.5-moe@4", 32, 48), ("qwen1.5-moe-a2.7b@4", 120, 181),
                                              ("mixtral-8x7b@4", 16, 24)])
def test_budget_in_slots_gives_lru_the_measured_runs_slots(entry, speq, lru):
    """At the memory where MoE-SpeQ holds the GPU run's slots beside its INT4 draft, LRU gets what the
    runtime gave its lru row: slots + draft bytes // one expert's bytes (gpu_speculative-h100 rows)."""
    from dataclasses import replace

    from sim.experiments.speculation_map import model_spec
    from sim.hardware import HardwareSpec
    from sim.memory import budget_for_slots, plan_memory

    model, hw = model_spec(entry), HardwareSpec.from_preset("measured/h100-sxm")
    nbytes = budget_for_slots(model, hw, max_context_tokens=288, slots=speq)
    at = replace(hw, memory_gib=nbytes / 2**30)
    assert at.memory_bytes == nbytes
    assert plan_memory(model, at, max_context_tokens=288, draft_resident=True).slots == speq
    draft_experts = model.routed_expert_bytes_total("int4") // model.bytes_per_expert()
    assert plan_memory(model, at, max_context_tokens=288).slots == lru == speq + draft_experts
    one_less = replace(hw, memory_gib=(nbytes - 1) / 2**30)
    assert plan_memory(model, one_less, max_context_tokens=288, draft_resident=True).slots == speq - 1
    with pytest.raises(SimError, match=rf"a budget of 1 slots must be in \[top_k={model.top_k}, every routed expert"):
        budget_for_slots(model, hw, max_context_tokens=288, slots=1)


# ------------------------------------------------------------------ measured points
def _table(path: Path, **row) -> Path:
    """A gpu_speculative-shaped results table: lru at the same memory and MoE-SpeQ's governor, one
    engine each (graphed and eager), Phi-3.5-MoE's 4-layer shape."""
    base = {"card": "NVIDIA H100 80GB HBM3", "model": "phi-3.5-moe-L4", "mode": "replay", "status": "ok",
            "expert_bytes": 157286400, "draft_agreement": float("nan"), "memory": None, "acceptance": float("nan"),
            "acceptance_by_position": None, "speedup_sim": 1.0}
    rows = []
    for engine, x, m in (("graphed", 0.8, 0.6), ("eager", 0.9, 0.3)):
        rows.append({**base, "engine": engine, "label": "lru", "policy": "lru", "k": None, "slots": 48,
                     "memory": "same_memory", "speedup_measured": 1.0})
        rows.append({**base, "engine": engine, "label": "speq", "policy": "speq", "k": "governor", "slots": 32,
                     "acceptance": 0.5, "acceptance_by_position": [x, 0.7, 0.0], "speedup_measured": m,
                     "speedup_sim": 0.7, **row})
        rows.append({**base, "engine": engine, "label": "speq-k4", "policy": "speq", "k": "4", "slots": 32,
                     "acceptance": 0.6, "acceptance_by_position": [0.1, 0.1], "speedup_measured": 9.0})
    p = path / "results.parquet"
    pd.DataFrame(rows).to_parquet(p, index=False)
    return p


def _engine_ms(engine: str) -> float:
    """By hand: the profile's engine values, Phi-3.5-MoE's decode layer (GQA attention 9 kernels,
    router 4, top-2 experts x 5) and head (4 kernels) over its 4 layers (this profile has no
    per-expert host time)."""
    from sim.hardware import HardwareSpec

    v = HardwareSpec.from_preset("measured/h100-sxm").engine_values(engine)
    assert v.get("host_per_expert_s", 0.0) == 0.0
    launches = 9 + 4 + 2 * 5
    per_layer = v["host_per_layer_s"] + v["host_per_launch_s"] * launches
    return (per_layer + v["host_per_launch_s"] * 4 / 4) * 1e3


@pytest.mark.parametrize("per_expert_s", [1e-3, 1e-9])
def test_y_folds_the_experts_host_dispatch_beyond_their_kernels(per_expert_s):
    """A profile with a host time per routed expert: y gains what the top-2 experts' dispatch takes
    beyond their kernels (the schedule overlaps the two), nothing when the kernels hide it."""
    from dataclasses import replace

    from sim.costmodel import HostOverhead, cost_model_for
    from sim.experiments.map_measured import host_y
    from sim.experiments.speculation_map import model_spec
    from sim.hardware import HardwareSpec

    model = model_spec("phi-3.5-moe@4")
    vals = {"host_per_layer_s": 5e-4, "draft_host_per_layer_s": 0.0, "host_per_launch_s": 0.0,
            "host_per_expert_s": per_expert_s}
    hw = replace(HardwareSpec.from_preset("measured/h100-sxm"), engine={"graphed": vals})
    layer, experts, head, source = host_y(model, hw, "graphed")
    kernels = 2 * cost_model_for(model, hw, host=HostOverhead()).expert_ffn(0, 1)
    assert source == "hardware" and layer == 5e-4 and head == 0.0
    assert experts == pytest.approx(max(0.0, 2 * per_expert_s - kernels), rel=1e-12)
    assert (experts > 0) == (per_expert_s == 1e-3)


def test_measured_points_are_placed_and_run(tmp_path):
    from sim.experiments.map_measured import measured_points
    from sim.experiments.speculation_map import run_map

    table = _table(tmp_path)
    spec = MapSpec.from_cfg(_measured_exp(measured=str(table), measured_shapes={"phi-3.5-moe-L4": "phi-3.5-moe@4"}))
    points, others = measured_points(spec)
    assert others == []
    by = {p.engine: p for p in points}
    assert set(by) == {"graphed", "eager"}  # the governor rows only (not k = 4, not lru)
    assert by["graphed"].x == 0.8 and by["eager"].x == 0.9  # per-token acceptance, not accepted / drafted
    assert by["graphed"].acceptance_rate == 0.5
    assert by["graphed"].y_ms == pytest.approx(_engine_ms("graphed"), rel=1e-12)
    assert by["eager"].y_ms == pytest.approx(_engine_ms("eager"), rel=1e-12)
    assert by["eager"].y_ms > by["graphed"].y_ms > 0.1
    assert by["graphed"].agreement == 0.91 and by["graphed"].agreement_source == "replay dial"  # Phi's synth dial
    assert by["graphed"].lru_slots == 48

    res = run_map([], spec, tmp_path / "out")
    pts = res.points.set_index("engine")
    assert (pts["status"] == "ok").all()
    assert list(pts["speq_slots_sim"]) == [32, 32] and list(pts["lru_slots_sim"]) == [48, 48]
    assert pts.loc["graphed", "speedup_measured"] == 0.6
    assert (pts["difference"] == pts["speedup_measured"] - pts["speedup_map"]).all()
    assert (tmp_path / "out" / "speculation_map_measured.parquet").is_file()
    assert "| phi-3.5-moe-L4 | eager (profile) |" in res.summary and "0.30x" in res.summary

    # the point's map value is the plain run of MoE-SpeQ and LRU at exactly (x, y) and the facet's memory
    from hydra import compose, initialize_config_dir

    from sim.config import register_configs
    from sim.presets import conf_dir
    from sim.run import simulate

    register_configs()
    cell = dict(model="phi-3.5-moe@4", link="own", h2d_gbps=None, budget="measured",
                memory_gib=pts.loc["eager", "memory_gib"], host_per_layer_ms=pts.loc["eager", "y_ms"], seed=0)
    over = spec.overrides(cell)
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        speq_cfg = compose(config_name="sim", overrides=over + ["policy=speq", "trace.acceptance=0.9",
                                                                "trace.draft_agreement=0.909"])
        lru_cfg = compose(config_name="sim", overrides=over + ["policy=lru"])
    (speq,), (lru,) = simulate(speq_cfg), simulate(lru_cfg)
    assert pts.loc["eager", "speedup_map"] == lru["tpot_ms"] / speq["tpot_ms"]


@pytest.mark.parametrize("change, msg", [
    ({"slots": 30}, r"ran MoE-SpeQ with 30 slots, but no budget of 'phi-3.5-moe@4' gives it that many .*speq_slots: 30"),
    ({"expert_bytes": 1000}, "has experts of 1000 B but map model 'phi-3.5-moe@4' has 157286400 B"),
    ({"acceptance_by_position": []}, r"has no acceptance_by_position\[0\]"),
])
def test_bad_measured_rows_are_refused_before_work(tmp_path, change, msg):
    from sim.experiments.speculation_map import run_map

    spec = MapSpec.from_cfg(_measured_exp(measured=str(_table(tmp_path, **change)),
                                          measured_shapes={"phi-3.5-moe-L4": "phi-3.5-moe@4"}))
    with pytest.raises(SimError, match=msg):
        run_map([], spec, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("change, msg", [
    ({"measured_shapes": {"phi-3.5-moe-L4": "phi-3.5-moe"}}, "map to no model of experiment.map.models"),
    ({"measured_shapes": {"phi-3.5-moe-L4": "phi-3.5-moe@4"}}, "go together: set both or neither"),
    ({"measured": "results.parquet"}, "go together: set both or neither"),
])
def test_bad_measured_options_are_refused(change, msg):
    with pytest.raises(SimError, match=msg):
        MapSpec.from_cfg(_measured_exp(**change))


def test_measured_table_checks(tmp_path):
    from sim.experiments.map_measured import measured_points

    shapes = {"phi-3.5-moe-L4": "phi-3.5-moe@4"}
    with pytest.raises(SimError, match="no results table at"):
        measured_points(MapSpec.from_cfg(_measured_exp(measured=str(tmp_path / "none.parquet"), measured_shapes=shapes)))
    p = _table(tmp_path)
    spec = MapSpec.from_cfg(_measured_exp(measured=str(p), measured_shapes={"mixtral-8x7b-L4": "phi-3.5-moe@4"}))
    with pytest.raises(SimError, match=r"'mixtral-8x7b-L4' has no MoE-SpeQ governor row .*\['phi-3.5-moe-L4'\]"):
        measured_points(spec)
    pd.read_parquet(p).drop(columns=["acceptance_by_position"]).to_parquet(p)
    with pytest.raises(SimError, match=r"lacks column\(s\) \['acceptance_by_position'\]"):
        measured_points(MapSpec.from_cfg(_measured_exp(measured=str(p), measured_shapes=shapes)))


def test_measured_preset_places_the_committed_runs():
    """conf/experiment/speculation-map-measured.yaml: its grid validates and every MoE-SpeQ governor
    row of the committed H100 table of its four shapes becomes a point inside the grid."""
    from omegaconf import OmegaConf

    from sim.experiments.map_measured import measured_points

    raw = OmegaConf.to_container(OmegaConf.load(ROOT / "conf" / "experiment" / "speculation-map-measured.yaml"))
    spec = MapSpec.from_cfg(raw["experiment"])
    points, others = measured_points(spec)
    assert sorted((p.shape, p.engine) for p in points) == [
        ("mixtral-8x7b-L4", "graphed"), ("phi-3.5-moe-L4", "eager"), ("phi-3.5-moe-L4", "graphed"),
        ("qwen1.5-moe-L4", "graphed"), ("small-moe", "graphed")]
    assert others == []  # every shape of the table is on the map
    for p in points:
        assert min(spec.acceptance) <= p.x <= max(spec.acceptance)
        assert min(spec.host_per_layer_ms) <= p.y_ms <= max(spec.host_per_layer_ms)
