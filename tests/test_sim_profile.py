"""A measured hardware profile in the simulator: op rows keyed by the shape they were measured on,
link rows by host-memory kind, INT4 rows, engine host overheads per decode path, bad files named,
and ``hardware=measured/NAME`` changing the prediction."""

from __future__ import annotations

from pathlib import Path

import pytest

from sim.costmodel import ProfiledCostModel, ProfileTables, RooflineCostModel, cost_model_for, op_shape
from sim.errors import SimError
from sim.hardware import HardwareSpec
from sim.spec import ModelSpec

TOY = ModelSpec(
    name="toy", num_layers=2, moe_layers=(1,), num_experts=4, top_k=2, family="toy", hidden_size=128,
    expert_intermediate_size=256, dense_intermediate_size=512, num_attention_heads=4, num_key_value_heads=2,
    head_dim=32, vocab_size=1000,
)
WIDE = ModelSpec(**{**TOY.to_dict(), "name": "wide", "expert_intermediate_size": 512})
GPU = HardwareSpec(
    name="toy", memory_gb=10, flops_bf16=1e12, hbm_bandwidth=1e11, launch_overhead_s=1e-6, workspace_gb=1,
    h2d_gbps=10, d2h_gbps=5, pageable_h2d_gbps=2, pageable_d2h_gbps=1, copy_latency_s=2e-6,
)
# graphed as profiles write it now; eager as profiles written before host_per_expert_s existed
ENGINE = {"graphed": {"host_per_layer_s": 3e-5, "draft_host_per_layer_s": 1e-6, "host_per_launch_s": 4e-6,
                      "host_per_expert_s": 6e-5},
          "eager": {"host_per_layer_s": 1.2e-3, "draft_host_per_layer_s": 9e-4, "host_per_launch_s": 7e-6}}


def rows() -> list[dict]:
    e = op_shape(TOY, "expert_ffn")
    return [
        {"op": "expert_ffn", "shape": e, "dtype": "bf16", "n_tokens": 1, "seconds": 1e-5},
        {"op": "expert_ffn", "shape": e, "dtype": "bf16", "n_tokens": 9, "seconds": 5e-5},
        {"op": "expert_ffn", "shape": e, "dtype": "int4", "n_tokens": 1, "seconds": 4e-6},
        {"op": "expert_ffn", "shape": e, "dtype": "int4", "n_tokens": 9, "seconds": 8e-6},
        {"op": "router", "shape": "h999.e4.k2", "n_tokens": 1, "seconds": 1.0},  # another model's router
        {"op": "h2d", "nbytes": 1000, "host_memory": "pinned", "seconds": 1e-6},
        {"op": "h2d", "nbytes": 3000, "host_memory": "pinned", "seconds": 2e-6},
        {"op": "h2d", "nbytes": 1000, "host_memory": "pageable", "seconds": 1e-5},
        {"op": "h2d", "nbytes": 3000, "host_memory": "pageable", "seconds": 3e-5},
    ]


def test_op_rows_serve_only_models_of_the_shape_they_were_measured_on() -> None:
    t = ProfileTables(rows())
    toy, wide = ProfiledCostModel(RooflineCostModel(TOY, GPU), t), ProfiledCostModel(RooflineCostModel(WIDE, GPU), t)
    assert toy.expert_ffn(1, 5) == pytest.approx(3e-5)  # interpolated between 1 and 9 tokens
    assert wide.expert_ffn(1, 5) == wide.base.expert_ffn(1, 5)  # other expert width: the roofline
    assert toy.router(1, 1) == toy.base.router(1, 1)  # a router row of another shape is not used
    deeper = ProfiledCostModel(RooflineCostModel(TOY.with_layers(2), GPU), t)
    assert deeper.expert_ffn(1, 9) == 5e-5  # same op shape, any depth


def test_int4_rows_price_the_draft_experts() -> None:
    cm = ProfiledCostModel(RooflineCostModel(TOY, GPU), ProfileTables(rows()))
    assert cm.expert_ffn(1, 5, "int4") == pytest.approx(6e-6)
    assert cm.expert_ffn(1, 5) == pytest.approx(3e-5)
    assert cm.expert_ffn(1, 12, "int4") == cm.base.expert_ffn(1, 12, "int4")  # beyond the grid: roofline


def test_link_rows_by_host_memory_kind() -> None:
    t = ProfileTables(rows())
    pinned = ProfiledCostModel(RooflineCostModel(TOY, GPU), t)
    pageable = ProfiledCostModel(RooflineCostModel(TOY, GPU.replace(host_memory="pageable")), t)
    assert pinned.h2d(2000) == pytest.approx(1.5e-6)
    assert pageable.h2d(2000) == pytest.approx(2e-5)
    assert pinned.d2h(2000) == pinned.base.d2h(2000)  # no d2h rows
    assert t.has("h2d", host_memory="pageable") and not t.has("d2h", host_memory="pinned")


@pytest.mark.parametrize(
    ("row", "match"),
    [
        ({"op": "h2d", "nbytes": 10, "host_memory": "cuda", "seconds": 1.0}, "host_memory must be one of"),
        ({"op": "expert_ffn", "dtype": "fp8", "n_tokens": 1, "seconds": 1.0}, "expert dtype must be one of"),
    ],
)
def test_bad_rows_are_named(row: dict, match: str) -> None:
    with pytest.raises(SimError, match=f"my.parquet: row 1: {match}"):
        ProfileTables([rows()[0], row], where="my.parquet")


def test_engine_values_per_decode_path() -> None:
    hw = GPU.replace(engine=ENGINE, provenance={"card": "toy card", "date": "2026-12-07"})
    assert hw.engine_values("eager") == {**ENGINE["eager"], "host_per_expert_s": 0.0}  # absent: 0
    assert hw.engine_values("graphed") == ENGINE["graphed"]
    assert GPU.engine_values("eager") is None  # presets carry none: the engine group's placeholders apply
    assert hw.replace(name="again").engine == hw.engine  # survives to_dict/replace
    assert dict(hw.provenance)["card"] == "toy card"
    assert hash(hw)  # still a value type


@pytest.mark.parametrize(
    ("engine", "match"),
    [
        ({"turbo": ENGINE["eager"]}, r"engine.turbo: unknown decode path"),
        ({"eager": {**ENGINE["eager"], "host_s": 1.0}}, r"engine.eager: unknown key\(s\) \['host_s'\]"),
        ({"eager": {"host_per_layer_s": 1.0}}, r"engine.eager: missing key"),
        ({"eager": {**ENGINE["eager"], "host_per_layer_s": -1.0}}, r"engine.eager.host_per_layer_s must be a number >= 0"),
    ],
)
def test_bad_engine_values_are_named(engine: dict, match: str) -> None:
    with pytest.raises(SimError, match=match):
        GPU.replace(engine=engine)


def write_profile(root: Path, name: str, table: list[dict] | None, absolute: bool = False) -> None:
    import pandas as pd
    import yaml

    folder = root / "hardware" / "measured"
    folder.mkdir(parents=True, exist_ok=True)
    d = {k: v for k, v in GPU.to_dict().items() if k not in ("engine", "provenance", "link_pace_gbps", "profile_table")}
    d.update(name=f"measured/{name}", engine=ENGINE, provenance={"card": "toy card"})
    if table is not None:
        pd.DataFrame(table).to_parquet(folder / f"{name}.parquet")
        d["profile_table"] = str(folder / f"{name}.parquet") if absolute else f"{name}.parquet"
    text = "defaults:\n  - /schema/hardware@_here_\n  - _self_\n" + yaml.safe_dump(d, sort_keys=False)
    (folder / f"{name}.yaml").write_text(text)


def test_measured_profile_changes_the_prediction(tmp_path: Path) -> None:
    write_profile(tmp_path, "card", rows())
    hw = HardwareSpec.from_preset("measured/card", root=tmp_path)
    assert hw.engine_values("graphed") == ENGINE["graphed"]
    measured, roof = cost_model_for(TOY, hw), cost_model_for(TOY, GPU)
    assert isinstance(measured, ProfiledCostModel)
    counts = {1: [1, 1, 1, 1]}  # 4 experts with one token each (the interpolation's grid point)
    delta = 4 * (measured.base.expert_ffn(1, 1) - 1e-5)
    assert roof.compute_only_step(1, 8, counts) - measured.compute_only_step(1, 8, counts) == pytest.approx(delta)
    assert delta != 0


def test_bad_profile_files_are_named(tmp_path: Path) -> None:
    write_profile(tmp_path, "bad", None)
    path = tmp_path / "hardware" / "measured" / "bad.yaml"
    path.write_text(path.read_text().replace("host_per_layer_s: 0.0012", "host_per_layer_s: -1"))
    with pytest.raises(SimError, match=rf"{path}: .*engine.eager.host_per_layer_s"):
        HardwareSpec.from_preset("measured/bad", root=tmp_path)
    write_profile(tmp_path, "missing", None)
    hw = HardwareSpec.from_preset("measured/missing", root=tmp_path).replace(profile_table=str(tmp_path / "nope.parquet"))
    with pytest.raises(SimError, match="nope.parquet: measured profile table not found"):
        cost_model_for(TOY, hw)


def test_hardware_measured_name_changes_the_simulated_run(tmp_path: Path) -> None:
    """Through Hydra, as `python -m sim hardware=measured/NAME` composes it: a profile whose table
    says the tiny model's experts are slow predicts a slower decode than the same profile without."""
    import shutil

    from hydra import compose, initialize_config_dir

    from sim.config import register_configs
    from sim.presets import conf_dir
    from sim.run import simulate
    from sim.spec import ModelSpec

    conf = tmp_path / "conf"
    shutil.copytree(conf_dir(), conf)
    tiny = ModelSpec.from_preset("tiny")
    slow = [{"op": "expert_ffn", "shape": op_shape(tiny, "expert_ffn"), "dtype": "bf16", "n_tokens": n, "seconds": 1e-3}
            for n in (1, 64)]
    write_profile(conf, "slow", slow, absolute=True)  # a relative table resolves against the shipped conf/
    write_profile(conf, "plain", None)
    register_configs()
    tpot = {}
    for name in ("slow", "plain"):
        with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
            cfg = compose(config_name="sim", overrides=[f"hardware=measured/{name}", "model=tiny", "policy=lru",
                                                        "trace.requests=1", "trace.prompt_tokens=4", "trace.decode_tokens=8"])
        row = simulate(cfg)[0]
        assert row["status"] == "ok" and row["hardware"] == f"measured/{name}"
        tpot[name] = row["tpot_ms"]
    # every decode step runs at least top_k experts per MoE layer at >= 1 ms each
    assert tpot["slow"] - tpot["plain"] >= tiny.top_k * len(tiny.moe_layers) * 1.0 * 0.9
