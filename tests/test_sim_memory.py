"""The GPU memory budget (docs/architecture.md): arithmetic, slot layouts and every infeasible case's message."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sim.errors import InfeasibleError, SimError
from sim.hardware import HardwareSpec
from sim.memory import plan_memory
from sim.spec import ModelSpec

MIXTRAL = ModelSpec.from_preset("mixtral-8x7b")
RTX4090 = HardwareSpec.from_preset("rtx4090")
H200 = HardwareSpec.from_preset("h200")
EXPERT = 352_321_536  # Mixtral bytes per expert, bf16
NON_EXPERT = 3_211_272_192
KV_4096 = 4096 * 131_072


def test_budget_arithmetic_mixtral_on_rtx4090() -> None:
    p = plan_memory(MIXTRAL, RTX4090, max_context_tokens=4096)
    assert p.budget_bytes == 25_770_000_000  # memory_gb=25.77, GB = 1e9 bytes
    assert (p.non_expert_bytes, p.kv_bytes, p.workspace_bytes, p.draft_bytes) == (NON_EXPERT, KV_4096, 1_500_000_000, 0)
    x = 25_770_000_000 - NON_EXPERT - KV_4096 - 1_500_000_000
    assert p.expert_budget_bytes == x
    assert p.slot_bytes == EXPERT
    assert p.slots == x // EXPERT == 58
    assert (p.layout, p.per_layer, p.all_resident) == ("global", None, False)
    assert p.non_expert_bytes + p.kv_bytes + p.workspace_bytes + p.slots_bytes + p.unused_bytes == p.budget_bytes
    assert "58 slots of 336.00 MiB" in p.summary()
    assert p.to_dict()["slots"] == 58


def test_slots_are_capped_at_all_experts() -> None:
    p = plan_memory(MIXTRAL, H200, max_context_tokens=4096)
    assert p.slots == 256 and p.all_resident
    p = plan_memory(MIXTRAL, H200, max_context_tokens=4096, slots=1000)
    assert p.slots == 256 and p.all_resident


def test_direct_slots_and_per_layer() -> None:
    p = plan_memory(MIXTRAL, RTX4090, max_context_tokens=4096, slots=40)
    assert (p.slots, p.layout, p.per_layer) == (40, "global", None)
    p = plan_memory(MIXTRAL, H200, max_context_tokens=4096, per_layer=3)
    assert (p.slots, p.layout, p.per_layer, p.all_resident) == (96, "per_layer", 3, False)
    p = plan_memory(MIXTRAL, H200, max_context_tokens=4096, per_layer=8)
    assert p.all_resident
    ds = ModelSpec.from_preset("deepseek-v2-lite")
    p = plan_memory(ds, RTX4090, max_context_tokens=2048, per_layer=10)
    assert p.slots == 10 * 26  # MoE layers only


def test_gpt_oss_slots_are_mxfp4_experts() -> None:
    oss = ModelSpec.from_preset("gpt-oss-20b")
    p = plan_memory(oss, RTX4090.replace(memory_gb=8.0), max_context_tokens=4096)
    assert p.slot_bytes == 13_236_480
    assert p.kv_bytes == oss.kv_bytes(4096)
    assert p.slots == (p.expert_budget_bytes // 13_236_480)


def test_draft_resident_spends_x_on_int4_experts_first() -> None:
    q = ModelSpec.from_preset("qwen3-30b-a3b")
    p = plan_memory(q, RTX4090, max_context_tokens=4096, draft_resident=True)
    draft = 48 * 128 * q.bytes_per_expert("int4")
    assert p.draft_bytes == draft == 48 * 128 * 2_433_024
    assert p.slot_budget_bytes == p.expert_budget_bytes - draft
    assert p.slots == p.slot_budget_bytes // 9_437_184
    assert p.slots < plan_memory(q, RTX4090, max_context_tokens=4096).slots


# ------------------------------------------------------------------ infeasible cases
def _gb(x: float) -> str:
    return f"{x / 1e9:.2f} GB"


def test_non_expert_weights_alone_exceed_the_budget() -> None:
    hw = RTX4090.replace(memory_gb=3.0)
    with pytest.raises(InfeasibleError) as e:
        plan_memory(MIXTRAL, hw, max_context_tokens=1)
    short = NON_EXPERT - 3_000_000_000
    assert e.value.short_by_bytes == short
    assert e.value.reason == str(e.value)
    assert "non-expert weights alone (3.21 GB) exceed the budget of 3.00 GB (short by 0.21 GB)" in e.value.reason
    assert "hardware.memory_gb=3" in e.value.reason


def test_nothing_left_for_experts() -> None:
    hw = RTX4090.replace(memory_gb=5.0)
    with pytest.raises(InfeasibleError) as e:
        plan_memory(MIXTRAL, hw, max_context_tokens=4096)
    short = NON_EXPERT + KV_4096 + 1_500_000_000 - 5_000_000_000
    assert e.value.short_by_bytes == short
    assert f"short by {_gb(short)}" in e.value.reason and "KV cache 0.54 GB (4096 tokens)" in e.value.reason


def test_fewer_slots_than_top_k_from_the_budget() -> None:
    # room for exactly one Mixtral expert: top_k = 2 cannot run
    mem = (NON_EXPERT + KV_4096 + 1_500_000_000 + EXPERT + 1000) / 1e9
    with pytest.raises(InfeasibleError) as e:
        plan_memory(MIXTRAL, RTX4090.replace(memory_gb=mem), max_context_tokens=4096)
    assert "holds 1 slot(s) of 336.0 MiB, fewer than top_k=2" in e.value.reason
    avail = round(mem * 1e9) - NON_EXPERT - KV_4096 - 1_500_000_000
    assert e.value.short_by_bytes == 2 * EXPERT - avail  # about one expert short
    assert "short by 0.35 GB for 2 slots" in e.value.reason


def test_draft_does_not_fit() -> None:
    with pytest.raises(InfeasibleError) as e:
        plan_memory(MIXTRAL, RTX4090, max_context_tokens=4096, draft_resident=True)
    draft = 256 * 90_832_896
    x = 25_770_000_000 - NON_EXPERT - KV_4096 - 1_500_000_000
    assert e.value.short_by_bytes == draft - x
    assert f"INT4 draft experts need {_gb(draft)} but only {_gb(x)} is left" in e.value.reason
    assert "short by 2.73 GB" in e.value.reason


def test_draft_leaves_no_slot() -> None:
    draft = 256 * 90_832_896
    mem = (NON_EXPERT + KV_4096 + 1_500_000_000 + draft + EXPERT // 2) / 1e9
    with pytest.raises(InfeasibleError, match="the resident INT4 draft .* leaves 0.18 GB, not one slot of 336.0 MiB"):
        plan_memory(MIXTRAL, RTX4090.replace(memory_gb=mem), max_context_tokens=4096, draft_resident=True)


def test_directly_set_slots_that_do_not_fit() -> None:
    x = 25_770_000_000 - NON_EXPERT - KV_4096 - 1_500_000_000
    with pytest.raises(InfeasibleError) as e:
        plan_memory(MIXTRAL, RTX4090, max_context_tokens=4096, slots=100)
    assert e.value.short_by_bytes == 100 * EXPERT - x
    assert f"cache.slots=100 needs {_gb(100 * EXPERT)} but only {_gb(x)} is left for experts" in e.value.reason
    with pytest.raises(InfeasibleError, match="cache.per_layer=4 needs 128 slots = 45.10 GB"):
        plan_memory(MIXTRAL, RTX4090, max_context_tokens=4096, per_layer=4)
    with pytest.raises(InfeasibleError, match="left after the INT4 draft"):
        plan_memory(ModelSpec.from_preset("qwen3-30b-a3b"), RTX4090, max_context_tokens=4096, slots=2000,
                    draft_resident=True)


def test_pools_smaller_than_top_k() -> None:
    with pytest.raises(InfeasibleError, match="cache.slots=1 is fewer than top_k=2"):
        plan_memory(MIXTRAL, H200, max_context_tokens=16, slots=1)
    with pytest.raises(InfeasibleError, match="cache.per_layer=1 is fewer slots than top_k=2"):
        plan_memory(MIXTRAL, H200, max_context_tokens=16, per_layer=1)


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"slots": 4, "per_layer": 2}, "not both"),
        ({"per_layer": 9}, r"cache.per_layer=9 must be in \[1, num_experts=8\]"),
        ({"slots": 0}, "cache.slots must be >= 1"),
        ({"max_context_tokens": 0}, "max_context_tokens must be >= 1"),
    ],
)
def test_bad_cache_settings_are_errors(kw: dict, match: str) -> None:
    args = {"max_context_tokens": 16} | kw
    with pytest.raises(SimError, match=match) as e:
        plan_memory(MIXTRAL, H200, **args)
    assert not isinstance(e.value, InfeasibleError)


_PRESETS: dict[str, ModelSpec] = {}


def _preset(model_id: str) -> ModelSpec:
    if model_id not in _PRESETS:
        _PRESETS[model_id] = ModelSpec.from_preset(model_id)
    return _PRESETS[model_id]


@given(
    model_id=st.sampled_from(["mixtral-8x7b", "phi-3.5-moe", "qwen3-30b-a3b", "deepseek-v2-lite", "gpt-oss-20b"]),
    memory_gb=st.floats(1.0, 200.0),
    ctx=st.integers(1, 32768),
    draft=st.booleans(),
)
def test_plan_fits_the_budget_and_uses_it(model_id: str, memory_gb: float, ctx: int, draft: bool) -> None:
    model = _preset(model_id)
    try:
        p = plan_memory(model, RTX4090.replace(memory_gb=memory_gb), max_context_tokens=ctx, draft_resident=draft)
    except InfeasibleError as e:
        assert "short by" in e.reason
        return
    used = p.non_expert_bytes + p.kv_bytes + p.workspace_bytes + p.draft_bytes + p.slots * p.slot_bytes
    assert used <= p.budget_bytes
    assert p.slots >= model.top_k
    # as many slots as fit, or all of them
    assert p.all_resident or used + p.slot_bytes > p.budget_bytes
