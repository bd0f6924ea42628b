"""Speculative decoding in the simulator: k = 0 is autoregressive, the scheduler's guarantees,
memory accounting of the draft, and bad configurations."""

from __future__ import annotations

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from sim.config import PolicyConf, register_configs
from sim.errors import SimError
from sim.run import load_policy, plan_for, policy_plan, prepare, run_policy, simulate
from sim.presets import conf_dir
from sim.speculative import DraftSource
from traces import Trace

register_configs()
SMALL = ["trace.requests=2", "trace.prompt_tokens=4", "trace.decode_tokens=40"]


def cfg_of(*overrides: str):
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        return compose(config_name="sim", overrides=list(overrides))


def policy(**kw):
    return OmegaConf.merge(OmegaConf.structured(PolicyConf), kw)


def with_draft(trace: Trace, draft: np.ndarray, match: np.ndarray) -> Trace:
    return Trace(shape=trace.shape, request_ids=trace.request_ids, lengths=trace.lengths, position=trace.position,
                 step=trace.step, phase=trace.phase, expert_ids=trace.expert_ids, gate_weights=trace.gate_weights,
                 lookahead=trace.lookahead, draft=draft, draft_match=match, meta=trace.meta)


def test_k_zero_reproduces_autoregressive_exactly():
    cfg = cfg_of("model=olmoe-1b-7b", "hardware.memory_gb=3", "policy=lru", *SMALL)
    prep = prepare(cfg)
    plan = prep.plan
    ar_row, (_, ar) = run_policy(prep, policy(name="lru", eviction="lru"), 0, plan=plan)
    sp_row, (_, sp) = run_policy(prep, policy(name="spec-lru", eviction="lru", decoding="speculative"), 0,
                                 governor_cfg={"name": "fixed", "k": 0}, trace_cfg=cfg.trace, plan=plan)
    assert sp.token_times == ar.token_times
    assert (sp.hits, sp.late, sp.misses, sp.copies, sp.stall) == (ar.hits, ar.late, ar.misses, ar.copies, ar.stall)
    assert sp_row["tpot_ms"] == ar_row["tpot_ms"] and sp_row["bound_tpot_ms"] == ar_row["bound_tpot_ms"]
    assert sp_row["mean_k"] == 0 and sp_row["drafted_tokens"] == 0


def test_cycles_follow_the_acceptance_rule():
    cfg = cfg_of("model=tiny", "policy=spec-lru", "governor=fixed", "governor.k=3", *SMALL)
    prep = prepare(cfg)
    row, (sim, log) = run_policy(prep, policy(name="spec-lru", eviction="lru", decoding="speculative"), 0,
                                 governor_cfg=cfg.governor, trace_cfg=cfg.trace, plan=plan_for(prep, speculative=True))
    tr = prep.trace
    for c in log.cycles:
        r, t, k, a = c["request"], c["t"], c["k"], c["accepted"]
        flags = tr.draft_match[r, t:t + k]
        expected = int(np.argmin(flags)) if not flags.all() else k
        assert a == expected and k <= 3
    # every request emits exactly what autoregressive decoding emits: 1 + its decode tokens
    dec = (tr.phase == 1) & tr.valid_mask()
    assert [len(x) for x in log.token_times] == [1 + int(d) for d in dec.sum(axis=1)]
    assert row["emitted_tokens"] == int(dec.sum())
    # tokens of one cycle share its time equally
    times = log.token_times[0]
    gaps = np.diff(times)
    assert (gaps > 0).all()


def test_perfect_draft_with_enough_slots_reaches_the_bound():
    """Draft routing = the target's and every draft token accepted: after the cold misses every
    verify pass finds its experts (except the bonus position's) resident; TPOT within 10 % of the bound."""
    cfg = cfg_of("model=tiny", "policy=speq", "governor=fixed", "governor.k=4", "trace.requests=2",
                 "trace.prompt_tokens=8", "trace.decode_tokens=120")
    prep = prepare(cfg)
    tr = prep.trace
    prep.trace = with_draft(tr, tr.expert_ids.copy(), np.ones_like(tr.draft_match))
    prep.schedule = type(prep.schedule)(prep.trace, prep.model, prep.cost)
    all_slots = prep.model.num_experts * prep.model.num_moe_layers
    plan = plan_for(prep, speculative=True)
    from dataclasses import replace

    plan = replace(plan, slots=all_slots, per_layer=None, layout="global")
    row, (sim, log) = run_policy(prep, load_policy("speq"), 0,
                                 governor_cfg=cfg.governor, trace_cfg=cfg.trace, plan=plan)
    assert row["x_bound"] <= 1.10, row["x_bound"]
    late_cycles = [c for c in log.cycles[4:] if c["coverage"] < 1.0]
    assert len(late_cycles) <= len(log.cycles) // 4


def test_useless_predictions_cost_no_more_than_their_wasted_bandwidth():
    cfg = cfg_of("model=qwen3-30b-a3b", "model.layers=4", "hardware.memory_gb=4.5", "governor=fixed",
                 "governor.k=4", *SMALL)
    prep = prepare(cfg)
    tr = prep.trace
    rng = np.random.default_rng(0)
    E = tr.shape.num_experts
    junk = np.argsort(rng.random(tr.expert_ids.shape[:-1] + (E,)), axis=-1)[..., : tr.shape.top_k].astype(np.int16)
    junk[tr.expert_ids < 0] = -1
    prep.trace = with_draft(tr, junk, tr.draft_match)
    plan = plan_for(prep, speculative=True)
    speq_row, _ = run_policy(prep, load_policy("speq"), 0,
                             governor_cfg=cfg.governor, trace_cfg=cfg.trace, plan=plan)
    lru_row, _ = run_policy(prep, policy(name="spec-lru", eviction="lru", decoding="speculative"), 0,
                            governor_cfg=cfg.governor, trace_cfg=cfg.trace, plan=plan)
    bw = prep.hw.h2d_bandwidth(prep.model.bytes_per_expert())
    tokens = speq_row["decode_tokens"]
    slack_ms = speq_row["wasted_prefetch_gb"] * 1e9 / bw / tokens * 1e3
    assert speq_row["tpot_ms"] <= lru_row["tpot_ms"] + slack_ms * 1.05 + 1e-9
    assert speq_row["wasted_prefetch_gb"] > 0


def test_draft_memory_is_accounted():
    prep = prepare(cfg_of("model=qwen3-30b-a3b", "hardware=rtx4090", *SMALL))
    ar = policy_plan(prep, policy(name="lru", eviction="lru"))
    spec = policy_plan(prep, load_policy("speq"))
    same = policy_plan(prep, load_policy("lru-same-cache"))
    m = prep.model
    assert spec.draft_bytes >= m.routed_expert_bytes_total("int4")
    assert spec.slots < ar.slots and same.slots == spec.slots
    # the slots lost are the draft's bytes over the slot size (up to rounding)
    assert abs((ar.slots - spec.slots) - spec.draft_bytes / m.bytes_per_expert()) <= 1


def test_budget_that_leaves_no_slot_after_the_draft_is_infeasible_row():
    rows = simulate(cfg_of("model=mixtral-8x7b", "hardware=rtx4090", "policy=speculative", *SMALL))
    by = {r["policy"]: r for r in rows}
    assert by["speq"]["status"] == "infeasible" and "GB" in by["speq"]["reason"]
    assert by["lru"]["status"] == "ok"


def test_bad_governor_config_is_an_error():
    with pytest.raises(SimError, match="k_min"):
        simulate(cfg_of("model=tiny", "policy=spec-lru", "governor.k_min=5", "governor.k_max=3", *SMALL))


def test_speculative_policy_refuses_autoregressive_predictors():
    with pytest.raises(SimError, match="speculative decoding runs with ELB-driven policies"):
        simulate(cfg_of("model=tiny", "policy=spec-lru", "policy.prefetch=lookahead", *SMALL))


def test_draft_source_needs_draft_columns():
    tr = prepare(cfg_of("model=tiny", *SMALL)).trace
    src = DraftSource(tr)
    E = tr.shape.num_experts
    assert [sorted(x % E for x in keys) for keys in src.elb_row(0, 5)] == [
        sorted(int(x) for x in tr.draft[0, 5, m] if x >= 0) for m in range(tr.shape.num_moe_layers)]
    with pytest.raises(SimError, match="needs a trace with draft columns"):
        DraftSource(with_draft(tr, None, None))


def test_governor_roofline_decisions_logged_and_deterministic():
    cfg = cfg_of("model=olmoe-1b-7b", "hardware.memory_gb=6", "policy=speq", *SMALL)
    a, b = simulate(cfg), simulate(cfg)
    assert a[0]["k_per_cycle"] == b[0]["k_per_cycle"] and a[0]["tpot_ms"] == b[0]["tpot_ms"]
    assert 1 <= a[0]["mean_k"] <= 16


# ------------------------------------------------------------------ draft-quality dials end to end
def test_trace_dials_reach_the_generator():
    """trace.acceptance / trace.draft_agreement shape the synthetic trace's draft columns (null: the
    model preset's values: Phi-3.5-MoE 0.88 and 0.91)."""
    from traces import stats

    base = prepare(cfg_of("model=phi-3.5-moe", *SMALL)).trace
    assert base.meta["synth"]["params"]["acceptance"] == 0.88
    assert base.meta["synth"]["params"]["draft_agreement"] == 0.91
    tr = prepare(cfg_of("model=phi-3.5-moe", "trace.acceptance=0.5", "trace.draft_agreement=0.0",
                        "trace.acceptance_corr=0.3", *SMALL)).trace
    p = tr.meta["synth"]["params"]
    assert (p["acceptance"], p["draft_agreement"], p["acceptance_corr"]) == (0.5, 0.0, 0.3)
    assert stats.draft_agreement(tr)[0].overall == 0.0  # every row disagrees
    assert np.array_equal(tr.expert_ids, base.expert_ids)  # the routing does not move


@pytest.mark.parametrize("override, field", [("trace.acceptance=1.5", "trace.acceptance"),
                                             ("trace.acceptance_corr=-0.2", "trace.acceptance_corr"),
                                             ("trace.draft_agreement=2", "trace.draft_agreement"),
                                             ("trace.draft_wrong_ids=9", "trace.draft_wrong_ids")])
def test_trace_dials_range_checked(override, field):
    with pytest.raises(SimError, match=rf"^{field} = .* must be"):
        prepare(cfg_of("model=phi-3.5-moe", override, *SMALL))


def test_trace_file_with_draft_columns_refuses_dials(tmp_path):
    from traces import write_trace

    path = write_trace(prepare(cfg_of("model=tiny", *SMALL)).trace, tmp_path / "t.parquet")
    with pytest.raises(SimError, match=r"trace.acceptance=0.7 cannot apply: the trace carries its own draft"):
        prepare(cfg_of("model=tiny", f"trace.path={path}", "trace.acceptance=0.7", *SMALL))


def test_trace_file_without_draft_gets_a_stand_in_with_the_dials(tmp_path):
    from traces import write_trace

    tr = prepare(cfg_of("model=tiny", *SMALL)).trace
    path = write_trace(with_draft(tr, None, None), tmp_path / "bare.parquet")
    cfg = cfg_of("model=tiny", f"trace.path={path}", "policy=spec-lru", "trace.acceptance=1.0",
                 "trace.draft_agreement=1.0", "governor=fixed", "governor.k=3", *SMALL)
    (row,) = simulate(cfg)
    assert row["draft_source"].startswith("stand-in(draft_agreement=1, draft_wrong_ids=1, acceptance=1,")
    assert row["acceptance_rate"] == 1.0


def test_ttft_cap_on_requests_shorter_than_k_max():
    """The TTFT cap prices k over the governor's whole range once, also when the first request has
    fewer tokens left than k_max + 1: those passes extend the context past its last position
    instead of failing, and the decode k stays within what each request allows."""
    short = ["trace.requests=2", "trace.prompt_tokens=4", "trace.decode_tokens=8"]
    for budget in (5, 500):
        rows = simulate(cfg_of("model=tiny", "policy=speq", "governor.slo=ttft",
                               f"governor.latency_budget_ms={budget}", *short))
        assert [r["status"] for r in rows] == ["ok"]
        assert 1 <= rows[0]["mean_k"] <= 7


def test_cycle_cost_sources():
    """What the host prices a cycle with (sim/cycle_costs.py). Modelled: t_draft(k) is the sum of
    the schedule's draft-token times over positions t..t+k-1, never past the request's last
    token; t_verify(n) the schedule's estimate at the context of the pass's last position, a pass
    longer than the request extending it one key per token. Measured: an EMA per verify size,
    linear between the two nearest measured sizes, flat beyond a single one; nothing before the
    first cycle."""
    from sim.cycle_costs import MeasuredCosts, ModelledCosts

    prep = prepare(cfg_of("model=tiny", *SMALL))
    sch, tr = prep.schedule, prep.trace
    mc = ModelledCosts(sch, 2e-5, 1e-3, 5e-6)
    L = int(tr.lengths[0])
    t = L - 3
    mc.at(0, t, L)
    assert mc.overhead_s == 5e-6 + 2e-5 and mc.expert_transfer_s == 1e-3
    assert mc.t_draft(0) == 0.0
    assert mc.t_draft(2) == sch.draft_token_time(0, t) + sch.draft_token_time(0, t + 1)
    assert mc.t_draft(9) == mc.t_draft(2)  # capped: only L - 1 - t tokens can be drafted
    kv = int(tr.position[0, L - 1]) + 1
    assert mc.t_verify(3) == sch.verify_estimate(3, kv, 2e-5)
    assert mc.t_verify(5) == sch.verify_estimate(5, kv + 2, 2e-5)
    mc.at(0, 4, L)  # a new cycle: nothing memoised from the last one
    assert mc.t_draft(2) == sch.draft_token_time(0, 4) + sch.draft_token_time(0, 5)

    m = MeasuredCosts(1e-3, 3e-5, alpha=0.5)
    assert (m.t_draft(4), m.t_verify(5), m.overhead_s) == (0.0, 0.0, 3e-5)
    m.observe(2, 2e-3, 5e-3)  # k = 2: 1 ms per draft token, 5 ms to verify 3 positions
    assert m.t_draft(4) == pytest.approx(4e-3) and m.t_verify(7) == 5e-3
    m.observe(2, 4e-3, 7e-3)  # EMA with alpha 0.5
    assert m.t_draft(1) == pytest.approx(1.5e-3) and m.t_verify(3) == pytest.approx(6e-3)
    m.observe(0, 0.0, 2e-3)  # k = 0: no draft token, a 1-position pass
    assert m.t_draft(1) == pytest.approx(1.5e-3)
    assert m.t_verify(2) == pytest.approx(4e-3)  # halfway between n = 1 (2 ms) and n = 3 (6 ms)
    assert m.t_verify(5) == pytest.approx(10e-3)  # extended through the two nearest (n = 3, 1)
