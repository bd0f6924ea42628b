"""Host-link model (size curves, pageable, pacing), the roofline cost model on hand-computed cases,
and measured tables replacing terms (ProfiledCostModel)."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sim.costmodel import (
    HostOverhead,
    KERNELS,
    ProfiledCostModel,
    ProfileTables,
    RooflineCostModel,
    causal_pairs,
    cost_model_for,
)
from sim.errors import SimError
from sim.hardware import HardwareSpec, curve_fraction
from sim.spec import ModelSpec

HARDWARE = ["rtx3090", "rtx4090", "l4", "a100-40g-pcie4", "h100-pcie5", "h100-sxm", "h200"]

# A toy model and GPU with round numbers, so every term can be checked by hand.
TOY = ModelSpec(
    name="toy", num_layers=2, moe_layers=(1,), num_experts=4, top_k=2, family="toy", hidden_size=128,
    expert_intermediate_size=256, dense_intermediate_size=512, num_attention_heads=4, num_key_value_heads=2,
    head_dim=32, vocab_size=1000,
)
GPU = HardwareSpec(
    name="toy", memory_gb=10, flops_bf16=1e12, hbm_bandwidth=1e11, launch_overhead_s=1e-6, workspace_gb=1,
    h2d_gbps=10, d2h_gbps=5, pageable_h2d_gbps=2, pageable_d2h_gbps=1, copy_latency_s=2e-6,
)


# ------------------------------------------------------------------ host link
def test_curve_interpolates_in_log_size() -> None:
    curve = ((1e3, 0.5), (1e5, 1.0))
    assert curve_fraction(curve, 1e4) == pytest.approx(0.75)  # the geometric midpoint
    assert curve_fraction(curve, 10**3.5) == pytest.approx(0.625)
    assert curve_fraction(curve, 10) == 0.5 and curve_fraction(curve, 0) == 0.5  # flat below
    assert curve_fraction(curve, 1e9) == 1.0  # flat above
    hw = GPU.replace(pinned_curve=[[1e3, 0.5], [1e5, 1.0]])
    assert hw.h2d_bandwidth(1e4) == pytest.approx(0.75 * 10e9)
    assert hw.d2h_bandwidth(1e4) == pytest.approx(0.75 * 5e9)


@pytest.mark.parametrize("hw_id", HARDWARE)
def test_overriding_a_plateau_scales_the_whole_curve(hw_id: str) -> None:
    hw = HardwareSpec.from_preset(hw_id)
    for kind in ("pinned", "pageable"):
        a = hw.replace(host_memory=kind)
        b = a.replace(h2d_gbps=a.h2d_gbps * 0.5, pageable_h2d_gbps=a.pageable_h2d_gbps * 0.5)
        for n in (4096, 524288, 9437184, 352321536, 2**31):
            assert b.h2d_bandwidth(n) == pytest.approx(0.5 * a.h2d_bandwidth(n))


@pytest.mark.parametrize("hw_id", HARDWARE)
def test_pageable_is_slower_than_pinned(hw_id: str) -> None:
    pinned = HardwareSpec.from_preset(hw_id)
    pageable = pinned.replace(host_memory="pageable")
    for n in (65536, 2**20, 9437184, 49783680, 352321536, 2**30):
        assert pageable.h2d_bandwidth(n) < pinned.h2d_bandwidth(n)
        assert pageable.d2h_bandwidth(n) < pinned.d2h_bandwidth(n)
        assert pageable.h2d_time(n) > pinned.h2d_time(n)


def test_pacing_caps_the_bandwidth() -> None:
    hw = HardwareSpec.from_preset("h200").replace(link_pace_gbps=12.0)
    for n in (2**20, 9437184, 2**30):
        assert hw.h2d_bandwidth(n) == 12e9
        assert hw.h2d_time(n) == pytest.approx(hw.copy_latency_s + n / 12e9)
    slow = hw.replace(host_memory="pageable", link_pace_gbps=100.0)  # a pace above the link changes nothing
    assert slow.h2d_bandwidth(2**30) == HardwareSpec.from_preset("h200").replace(host_memory="pageable").h2d_bandwidth(2**30)


def test_h200_preset_reproduces_the_measured_copies() -> None:
    """Measured on the H200 (conf/hardware/h200.yaml): pinned H2D 55.5 GB/s >= 47 MiB, 53.5 at 9 MiB, 50.5 at 2.25 MiB, 42.7 at 0.5 MiB."""
    hw = HardwareSpec.from_preset("h200")
    for nbytes, gbps in ((49283072, 55.5), (9437184, 53.5), (2359296, 50.5), (524288, 42.7)):
        effective = nbytes / hw.h2d_time(nbytes) / 1e9
        assert effective == pytest.approx(gbps, rel=0.03)
    pageable = hw.replace(host_memory="pageable")
    assert 5 < 2**30 / pageable.h2d_time(2**30) / 1e9 < 17  # 9-17 GB/s measured over sizes, 8.3 at 1 GiB on 2026-11-28


def test_gen4_presets_reproduce_the_rtx4090_copies() -> None:
    """RTX 4090 copies reported in NVlabs/cuda-oxide PR #976: 22.5 GB/s at 1 MiB, 23.9 GB/s at 16-64 MiB."""
    for hw_id in ("rtx4090", "rtx3090", "l4", "a100-40g-pcie4"):
        hw = HardwareSpec.from_preset(hw_id)
        for nbytes, gbps in ((2**20, 22.5), (2**24, 23.9), (2**26, 23.9)):
            assert nbytes / hw.h2d_time(nbytes) / 1e9 == pytest.approx(gbps, rel=0.01)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"pinned_curve": [[1e6, 1.0], [1e3, 0.5]]}, "strictly increasing"),
        ({"pinned_curve": [[1e6, 1.5]]}, r"fractions of the plateau must be in \(0, 1\]"),
        ({"pageable_curve": []}, "at least one"),
        ({"pageable_curve": [[0, 1.0]]}, "> 0 bytes"),
        ({"pinned_curve": [1.0, 2.0]}, "pairs"),
        ({"host_memory": "cxl"}, "host_memory"),
        ({"h2d_gbps": 0}, "h2d_gbps"),
        ({"copies_in_flight": 0}, "copies_in_flight"),
        ({"link_pace_gbps": -1.0}, "link_pace_gbps"),
        ({"copy_latency_s": -1e-6}, "copy_latency_s"),
    ],
)
def test_hardware_validation_names_the_field(change: dict, match: str) -> None:
    with pytest.raises(SimError, match=match):
        GPU.replace(**change)


def test_hardware_from_cfg_and_missing_values() -> None:
    from omegaconf import OmegaConf

    from sim.hardware import HardwareConf

    cfg = OmegaConf.merge(OmegaConf.structured(HardwareConf), GPU.to_dict())
    assert HardwareSpec.from_cfg(cfg) == GPU
    cfg = OmegaConf.structured(HardwareConf)
    cfg.name = "half"
    with pytest.raises(SimError, match="missing value"):
        HardwareSpec.from_cfg(cfg)
    with pytest.raises(SimError, match="unknown field"):
        HardwareSpec.from_dict(GPU.to_dict() | {"pcie_gen": 5})


# ------------------------------------------------------------------ roofline by hand
def test_causal_pairs_brute_force() -> None:
    for kv in range(1, 13):
        for n in range(1, kv + 1):
            for window in (None, 1, 2, 3, 5, 8, 20):
                brute = sum(min(p + 1, window or 10**9) for p in range(kv - n, kv))
                assert causal_pairs(n, kv, window) == brute, (n, kv, window)


def test_roofline_expert_ffn_by_hand() -> None:
    cm = RooflineCostModel(TOY, GPU)
    params = 3 * 128 * 256
    # 1 token: memory bound, weights + activations in and out
    assert cm.expert_ffn(1, 1) == pytest.approx((2 * params + 2 * 128 * 2) / 1e11 + 5e-6)
    # 1000 tokens: compute bound
    assert cm.expert_ffn(1, 1000) == pytest.approx(2 * 1000 * params / 1e12 + 5e-6)
    # int4 (the draft): 4-bit weights + bf16 scale per 128 weights, same FLOP rate
    int4 = params // 2 + 2 * (2 * 256 * 1 + 128 * 2)
    assert TOY.bytes_per_expert("int4") == int4 == 50688
    assert cm.expert_ffn(1, 1, "int4") == pytest.approx((int4 + 512) / 1e11 + 5e-6)
    assert cm.expert_ffn(1, 1000, "int4") == cm.expert_ffn(1, 1000)
    assert KERNELS["expert_ffn"] == 5


def test_roofline_other_terms_by_hand() -> None:
    cm = RooflineCostModel(TOY, GPU)
    attn = 128 * 4 * 32 + 2 * 128 * 2 * 32 + 4 * 32 * 128
    assert TOY.attention_params == attn == 49152
    kv_layer = 2 * 2 * 32 * 2
    flops = 2 * attn + 4 * 10 * 4 * 32  # projections + (QK^T, PV) over 10 causal pairs
    nbytes = 2 * attn + (10 + 1) * kv_layer + 2 * 128 * 2  # weights, KV read + write, activations
    assert cm.attention(0, 1, 10) == pytest.approx(max(flops / 1e12, nbytes / 1e11) + 9e-6)
    assert cm.router(1, 1) == pytest.approx((2 * (4 * 128 + 128 + 128) + 4 * 4) / 1e11 + 4e-6)
    assert cm.dense_ffn(0, 1) == pytest.approx((2 * (3 * 128 * 512 + 128) + 2 * 128 * 2) / 1e11 + 7e-6)
    assert cm.shared_experts(1, 1) == 0.0  # the toy has none
    head = 1000 * 128
    assert cm.embed_and_head(4, logits_tokens=1) == pytest.approx((2 * (head + 128 + 4 * 128) + 1000 * 4) / 1e11 + 4e-6)
    assert cm.h2d(10**6) == pytest.approx(2e-6 + 1e6 / 10e9)
    assert cm.d2h(10**6) == pytest.approx(2e-6 + 1e6 / 5e9)
    assert cm.h2d(0) == pytest.approx(2e-6)
    assert cm.layer_pre_routing(1, 1, 10) == cm.attention(1, 1, 10) + cm.router(1, 1)
    assert cm.expert_h2d() == cm.h2d(TOY.bytes_per_expert())


def test_roofline_sliding_window_and_mla() -> None:
    oss = ModelSpec.from_preset("gpt-oss-20b")
    cm = RooflineCostModel(oss, HardwareSpec.from_preset("h200"))
    assert oss.is_sliding_layer(0) and not oss.is_sliding_layer(1)
    # a sliding layer's cost stops growing past the window; a full layer's keeps growing
    assert cm.attention(0, 1, 4096) == cm.attention(0, 1, 128) < cm.attention(1, 1, 4096)
    flops, _, _ = cm.attention_terms(0, 1, 4096)
    assert flops == 2 * oss.attention_params + 4 * 128 * 64 * 64
    ds = ModelSpec.from_preset("deepseek-v2-lite")
    naive = RooflineCostModel(ds, HardwareSpec.from_preset("h200"))
    absorbed = RooflineCostModel(ds, HardwareSpec.from_preset("h200"), mla_absorbed=True)
    assert absorbed.attention(1, 1, 8192) < naive.attention(1, 1, 8192)  # no per-step latent expansion
    f1, _, _ = naive.attention_terms(1, 1, 100)
    f2, _, _ = naive.attention_terms(1, 1, 200)
    assert f2 - f1 == 2 * 100 * 512 * 16 * 256 + 2 * 100 * 16 * (192 + 128)  # kv_b over 100 more keys + pairs


def test_compute_only_step_sums_the_terms() -> None:
    cm = RooflineCostModel(TOY, GPU)
    expected = (cm.embed_and_head(1) + cm.attention(0, 1, 5) + cm.dense_ffn(0, 1) + cm.attention(1, 1, 5)
                + cm.router(1, 1) + 2 * cm.expert_ffn(1, 1))
    assert cm.compute_only_step(1, 5) == pytest.approx(expected)
    custom = cm.compute_only_step(3, 5, expert_tokens={1: [3, 2, 1]}, logits_tokens=1)
    assert custom == pytest.approx(cm.embed_and_head(3, 1) + cm.attention(0, 3, 5) + cm.dense_ffn(0, 3)
                                   + cm.attention(1, 3, 5) + cm.router(1, 3)
                                   + cm.expert_ffn(1, 3) + cm.expert_ffn(1, 2) + cm.expert_ffn(1, 1))


def test_costs_are_memoised_pure_functions() -> None:
    calls = []

    class Counting(RooflineCostModel):
        def _expert_ffn(self, layer: int, n_tokens: int, dtype: str) -> float:
            calls.append((layer, n_tokens, dtype))
            return super()._expert_ffn(layer, n_tokens, dtype)

    cm = Counting(TOY, GPU)
    a = cm.expert_ffn(1, 3)
    assert cm.expert_ffn(1, 3) == a and calls == [(1, 3, "bf16")]
    assert RooflineCostModel(TOY, GPU).expert_ffn(1, 3) == a  # same arguments, same seconds


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda cm: cm.router(0, 1), "decoder layer 0 is dense"),
        (lambda cm: cm.expert_ffn(0, 1), "decoder layer 0 is dense"),
        (lambda cm: cm.dense_ffn(1, 1), "is an MoE layer"),
        (lambda cm: cm.attention(2, 1, 1), "out of range"),
        (lambda cm: cm.attention(-1, 1, 1), "out of range"),
        (lambda cm: cm.attention(1.0, 1, 1), "must be an integer"),
        (lambda cm: cm.attention(0, 4, 3), "kv_len"),
        (lambda cm: cm.attention(0, 0, 3), "n_tokens"),
        (lambda cm: cm.expert_ffn(1, 1, "fp8"), "expert dtype"),
        (lambda cm: cm.embed_and_head(2, 3), "logits_tokens"),
        (lambda cm: cm.h2d(-1), "nbytes"),
    ],
)
def test_bad_queries_are_errors(call, match: str) -> None:
    with pytest.raises(SimError, match=match):
        call(RooflineCostModel(TOY, GPU))


@given(n=st.integers(1, 64), kv=st.integers(0, 4096), nbytes=st.integers(0, 2**31))
def test_costs_are_positive_and_monotone(n: int, kv: int, nbytes: int) -> None:
    cm = RooflineCostModel(ModelSpec.from_preset("qwen3-30b-a3b"), HardwareSpec.from_preset("rtx4090"))
    kv = kv + n
    a = cm.attention(0, n, kv)
    assert 0 < a <= cm.attention(0, n, kv + 1)
    assert 0 < cm.expert_ffn(0, n) <= cm.expert_ffn(0, n + 1)
    assert cm.h2d(nbytes) <= cm.h2d(nbytes + 4096)
    assert math.isfinite(cm.compute_only_step(n, kv))


# ------------------------------------------------------------------ measured tables
TABLE = [
    {"op": "expert_ffn", "layer": -1, "dtype": "bf16", "n_tokens": 1, "seconds": 1e-5},
    {"op": "expert_ffn", "layer": -1, "dtype": "bf16", "n_tokens": 8, "seconds": 2e-5},
    {"op": "expert_ffn", "layer": -1, "dtype": "bf16", "n_tokens": 8, "seconds": 4e-5},  # repetitions -> median
    {"op": "expert_ffn", "layer": -1, "dtype": "bf16", "n_tokens": 8, "seconds": 3e-5},
    {"op": "attention", "layer": 0, "n_tokens": 1, "kv_len": 10, "seconds": 5e-6},
    {"op": "attention", "layer": 0, "n_tokens": 1, "kv_len": 20, "seconds": 7e-6},
    {"op": "attention", "layer": -1, "n_tokens": 1, "kv_len": 10, "seconds": 9e-6},
    {"op": "attention", "layer": -1, "n_tokens": 1, "kv_len": 100, "seconds": 1e-5},
    {"op": "h2d", "nbytes": 1_000_000, "host_memory": "pinned", "seconds": 2e-4},
    {"op": "h2d", "nbytes": 2_000_000, "host_memory": "pinned", "seconds": 3e-4},
]


def test_profiled_cost_model_uses_the_table_and_falls_back() -> None:
    base = RooflineCostModel(TOY, GPU)
    cm = ProfiledCostModel(base, ProfileTables(TABLE))
    assert cm.expert_ffn(1, 1) == 1e-5
    assert cm.expert_ffn(1, 8) == 3e-5  # median of the repetitions
    assert cm.expert_ffn(1, 4) == pytest.approx(1e-5 + (3e-5 - 1e-5) * 3 / 7)  # interpolated in n_tokens
    assert cm.expert_ffn(1, 16) == base.expert_ffn(1, 16)  # outside the measured range
    assert cm.expert_ffn(1, 4, "int4") == base.expert_ffn(1, 4, "int4")  # no int4 rows
    assert cm.attention(0, 1, 15) == pytest.approx(6e-6)  # layer-specific rows win
    assert cm.attention(1, 1, 55) == pytest.approx(9e-6 + 1e-6 * 45 / 90)  # any-layer rows
    assert cm.attention(1, 2, 55) == base.attention(1, 2, 55)  # n_tokens not measured
    assert cm.router(1, 1) == base.router(1, 1)  # op not measured
    assert cm.h2d(1_500_000) == pytest.approx(2.5e-4)
    assert cm.h2d(3_000_000) == base.h2d(3_000_000)
    assert cm.hits > 0 and cm.fallbacks > 0
    paced = ProfiledCostModel(RooflineCostModel(TOY, GPU.replace(link_pace_gbps=1.0)), ProfileTables(TABLE))
    assert paced.h2d(1_500_000) == pytest.approx(2e-6 + 1.5e6 / 1e9)  # pacing still caps measured copies
    pageable = ProfiledCostModel(RooflineCostModel(TOY, GPU.replace(host_memory="pageable")), ProfileTables(TABLE))
    assert pageable.h2d(1_500_000) == pageable.base.h2d(1_500_000)  # rows are for pinned memory
    only = ProfiledCostModel(base, ProfileTables(TABLE), use=["attention"])
    assert only.expert_ffn(1, 1) == base.expert_ffn(1, 1) and only.attention(0, 1, 10) == 5e-6


@pytest.mark.parametrize(
    ("row", "match"),
    [
        ({"op": "gemm", "seconds": 1.0}, "unknown op 'gemm'"),
        ({"op": "expert_ffn", "dtype": "bf16", "seconds": 1.0}, "missing column 'n_tokens'"),
        ({"op": "h2d", "nbytes": 10}, "missing column 'seconds'"),
        ({"op": "h2d", "nbytes": 10, "seconds": -1.0}, "seconds"),
    ],
)
def test_bad_profile_rows_name_the_row(row: dict, match: str) -> None:
    with pytest.raises(SimError, match=f"row 1.*{match}|{match}"):
        ProfileTables([TABLE[0], row])


def test_measured_profile_with_a_parquet_table(tmp_path: Path) -> None:
    pd = pytest.importorskip("pandas")
    folder = tmp_path / "hardware" / "measured"
    folder.mkdir(parents=True)
    pd.DataFrame(TABLE).to_parquet(folder / "toy.parquet")
    yaml = "\n".join(f"{k}: {v}" for k, v in GPU.to_dict().items()
                     if k not in ("name", "link_pace_gbps", "profile_table", "engine", "provenance") and v is not None)
    (folder / "toy.yaml").write_text(
        "defaults:\n  - /schema/hardware@_here_\n  - _self_\nname: measured/toy\nprofile_table: toy.parquet\n" + yaml + "\n"
    )
    hw = HardwareSpec.from_preset("measured/toy", root=tmp_path)
    assert hw.profile_table_path() == (folder / "toy.parquet").resolve()
    cm = cost_model_for(TOY, hw)
    assert isinstance(cm, ProfiledCostModel)
    assert cm.expert_ffn(1, 8) == 3e-5 and cm.h2d(1_000_000) == 2e-4
    assert isinstance(cost_model_for(TOY, GPU), RooflineCostModel)
    with pytest.raises(SimError, match="not found"):
        cost_model_for(TOY, hw.replace(profile_table=str(tmp_path / "missing.parquet")))
    (folder / "bad.parquet").write_text("not parquet")
    with pytest.raises(SimError, match="not a readable Parquet"):
        ProfileTables.from_parquet(folder / "bad.parquet")


# ------------------------------------------------------------------ host overhead (engine=)
EAGERISH = HostOverhead("eager", host_per_layer_s=100e-6, draft_host_per_layer_s=60e-6, host_per_launch_s=8e-6)


def test_host_overhead_by_hand() -> None:
    """TOY: layer 0 dense (GQA attention 9 kernels + dense FFN 7 = 16 launches), layer 1 MoE
    (attention 9 + router 4 + 5 per routed expert)."""
    cm = RooflineCostModel(TOY, GPU, host=EAGERISH)
    assert cm.layer_launches(0) == 16 and cm.layer_launches(1, 2) == 23
    assert cm.host_layer(0) == pytest.approx(100e-6 + 8e-6 * 16)  # 228 us
    assert cm.host_layer(1, 2) == pytest.approx(100e-6 + 8e-6 * 23)  # 284 us
    assert cm.host_layer(1, 2, draft=True) == pytest.approx(60e-6 + 8e-6 * 23)  # 244 us
    assert cm.host_head() == pytest.approx(8e-6 * 4)
    ideal = RooflineCostModel(TOY, GPU)
    assert ideal.host_layer(1, 2) == 0.0 and ideal.host_head() == 0.0


def test_host_overhead_per_expert_by_hand() -> None:
    """``host_per_expert_s`` prices each routed expert a target MoE layer runs, after its routing
    (``host_experts``): top-k in a decode step, the union of a verify pass; nothing on dense layers,
    nothing in the per-layer term before the routing."""
    h = HostOverhead("graphed", host_per_layer_s=100e-6, draft_host_per_layer_s=20e-6, host_per_expert_s=50e-6)
    cm = RooflineCostModel(TOY, GPU, host=h)
    assert cm.host_layer(0) == cm.host_layer(1, 2) == pytest.approx(100e-6)
    assert cm.host_experts(0, 2) == 0.0  # dense layer
    assert cm.host_experts(1, 2) == pytest.approx(2 * 50e-6)
    assert cm.host_experts(1, 5) == pytest.approx(5 * 50e-6)  # a verify pass's union of 5
    assert cm.host_layer(1, 2, draft=True) == pytest.approx(20e-6)
    assert not h.zero and h.columns()["host_per_expert_s"] == 50e-6


def test_host_overhead_enters_the_schedule_by_hand() -> None:
    """One decode step of TOY: the MoE layer's pre-routing time carries the dense layer's and its
    own host overhead (228 + 284 us), the tail the head's launches (32 us); a draft token the
    draft's per-layer term (32 + 188 + 244 us)."""
    from sim.schedule import Schedule
    from traces.synth import synth_params_for, synthesize

    tr = synthesize(dataclasses.replace(synth_params_for("tiny"), requests=1, prompt_tokens=2, decode_tokens=3),
                    0, shape=TOY.shape_only())
    ideal = Schedule(tr, TOY, RooflineCostModel(TOY, GPU))
    eager = Schedule(tr, TOY, RooflineCostModel(TOY, GPU, host=EAGERISH))
    s = 1  # the first decode step (one token, two distinct experts)
    g = eager.steps[s].g0
    assert len(eager.needed[g]) == 2
    assert eager.pre[g] - ideal.pre[g] == pytest.approx(512e-6)
    assert eager.steps[s].tail - ideal.steps[s].tail == pytest.approx(32e-6)
    assert eager.exp[g] == ideal.exp[g]
    assert eager.draft_token_time(0, 3) - ideal.draft_token_time(0, 3) == pytest.approx(464e-6)


def test_per_expert_host_time_overlaps_the_experts_kernels() -> None:
    """The experts phase of a layer-step lasts the longer of its kernels and the host dispatching
    its experts: a per-expert time below the kernels changes nothing, one above sets the phase to
    experts x it; the time before the routing is untouched either way."""
    from sim.schedule import Schedule
    from traces.synth import synth_params_for, synthesize

    tr = synthesize(dataclasses.replace(synth_params_for("tiny"), requests=1, prompt_tokens=2, decode_tokens=3),
                    0, shape=TOY.shape_only())
    ideal = Schedule(tr, TOY, RooflineCostModel(TOY, GPU))
    g = ideal.steps[1].g0
    kernels = ideal.exp[g]
    for per in (0.25 * kernels / 2, 3 * kernels / 2):
        sch = Schedule(tr, TOY, RooflineCostModel(TOY, GPU, host=HostOverhead("graphed", host_per_expert_s=per)))
        assert sch.pre == ideal.pre
        assert sch.exp[g] == pytest.approx(max(kernels, 2 * per))
    prompt = ideal.steps[0].g0  # the prompt pass: the union of its tokens' experts
    sch = Schedule(tr, TOY, RooflineCostModel(TOY, GPU, host=HostOverhead("graphed", host_per_expert_s=1.0)))
    assert sch.exp[prompt] == pytest.approx(len(sch.needed[prompt]) * 1.0)


def test_engine_values_from_a_measured_hardware_profile() -> None:
    measured = {"host_per_layer_s": 5e-4, "draft_host_per_layer_s": 7e-5, "host_per_launch_s": 0.0}
    hw = GPU.replace(engine={"eager": measured})
    cfg = {"name": "eager", "host_per_layer_s": 1e-4, "draft_host_per_layer_s": 6e-5, "host_per_launch_s": 8e-6,
           "from_hardware": True}
    h = HostOverhead.from_cfg(cfg, hw)
    assert (h.host_per_layer_s, h.draft_host_per_layer_s, h.host_per_launch_s, h.source) == (5e-4, 7e-5, 0.0, "hardware")
    assert HostOverhead.from_cfg({**cfg, "from_hardware": False}, hw).host_per_layer_s == 1e-4
    assert HostOverhead.from_cfg({**cfg, "name": "graphed"}, hw).source == "config"  # the profile has no graphed
    assert HostOverhead.from_cfg(None, hw).zero
    with pytest.raises(SimError, match=r"engine.eager: unknown key\(s\) \['per_layer'\]"):
        GPU.replace(engine={"eager": {**measured, "per_layer": 1}})
    with pytest.raises(SimError, match=r"engine.host_per_launch_s must be a number of seconds >= 0"):
        HostOverhead("x", host_per_launch_s=-1.0)