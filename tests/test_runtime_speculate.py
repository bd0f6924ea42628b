"""Speculative decoding on the runtime (runtime/speculate.py), on the CPU in fp32.

Specifications: the speculative output is the target's greedy output (k in {1, 3, 5} and the
roofline governor; the project's trained small-moe and a tiny random model of every supported
family, both engines where the lean path supports the family); a draft that is often wrong
changes nothing but the acceptance; after rollback the KV cache equals a non-speculative run's;
the ELB rows the policy receives are the draft's routing, and MoE-SpeQ's scheduler holds exactly
their union; the executor's run counts a verify pass as one multi-token step; `python -m runtime`
measures speculative policies in live mode and prints acceptance, mean k and tokens per cycle; on
the virtual-time backend the runtime's speculation (hosted by the simulator's controller) makes
exactly the simulator's decisions for the governor, fixed k, spec-lru and SP-MoE.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from runtime.lean import LEAN_FAMILIES, LeanModel
from runtime.models import FAMILIES, load_model
from runtime.replay import prompt_tokens, reference_decode
from runtime.speculate import HFEngine, LeanEngine, SpeculativeDecoder, draft_experts
from sim.governor import build_governor
from sim.policies import PREFETCH

SMALL_MOE = Path(__file__).resolve().parents[1] / "models" / "small-moe"
GOVERNORS = [{"name": "fixed", "k": 1}, {"name": "fixed", "k": 3}, {"name": "fixed", "k": 5},
             {"name": "roofline", "k_min": 1, "k_max": 6, "warmup_cycles": 1}]


def _compose(overrides):
    from benchmarks.gpu_speculative import compose

    return compose(overrides)


def _engine(lm, kind: str, draft=None):
    mods = [h.experts for h in lm.moe_handles]
    fn = draft if draft is not None else draft_experts(mods)[0]
    if kind == "eager":
        return HFEngine(lm.model, mods, fn)
    return LeanEngine(LeanModel(lm, max_len=64), fn)


def _decode(eng, lm, gov, prompts, n, prefetch=None):
    dec = SpeculativeDecoder(eng, build_governor(gov), num_experts=lm.shape.num_experts, top_k=lm.shape.top_k,
                             prefetch=prefetch)
    return dec, dec.generate(prompts, n)


def _check_exact(lm, kinds, prompts, n):
    ref = reference_decode(lm.model, prompts, n)["tokens"]
    for kind in kinds:
        eng = _engine(lm, kind)
        try:
            for gov in GOVERNORS:
                dec, out = _decode(eng, lm, gov, prompts, n)
                assert out == ref, (kind, gov)
                assert sum(c.emitted for c in dec.cycles) == len(prompts) * (n - 1)
        finally:
            eng.close()


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_speculative_output_is_the_targets_greedy_output_tiny(family):
    lm = load_model(f"tiny-{family}", dtype="float32", device="cpu", seed=0)
    prompts = prompt_tokens(lm.model.config.vocab_size, [6, 9], 1)
    kinds = ["eager"] + (["graphed"] if family in LEAN_FAMILIES else [])
    _check_exact(lm, kinds, prompts, 12)


def test_speculative_output_is_the_targets_greedy_output_small_moe():
    lm = load_model(str(SMALL_MOE), dtype="float32", device="cpu", seed=0)
    prompts = prompt_tokens(lm.model.config.vocab_size, [8], 3)
    _check_exact(lm, ["eager", "graphed"], prompts, 12)


@pytest.mark.parametrize("kind", ["eager", "graphed"])
def test_a_wrong_draft_costs_acceptance_not_correctness(kind):
    """The draft's experts output zero: its tokens are often wrong, rollbacks happen every cycle,
    and the output is still the target's."""
    lm = load_model("tiny-mixtral", dtype="float32", device="cpu", seed=0)
    prompts = prompt_tokens(lm.model.config.vocab_size, [6], 2)
    ref = reference_decode(lm.model, prompts, 16)["tokens"]
    eng = _engine(lm, kind, draft=lambda m, h, idx, w: torch.zeros_like(h))
    dec, out = _decode(eng, lm, {"name": "fixed", "k": 4}, prompts, 16)
    assert out == ref
    assert any(c.accepted < c.k for c in dec.cycles)  # the rejection path ran
    eng.close()


@pytest.mark.parametrize("family,kind", [("mixtral", "eager"), ("gpt_oss", "eager"), ("deepseek_v2", "eager"),
                                         ("qwen2_moe", "graphed"), ("mixtral", "graphed")])
def test_rollback_leaves_the_cache_of_a_non_speculative_run(family, kind):
    """After speculative cycles (rejections included: a zero draft) the cache holds exactly the
    positions a non-speculative run has, with its keys and values (gpt_oss: sliding-window layers
    of window 4, crossed many times)."""
    lm = load_model(f"tiny-{family}", dtype="float32", device="cpu", seed=0)
    prompts = prompt_tokens(lm.model.config.vocab_size, [5], 4)
    eng = _engine(lm, kind, draft=lambda m, h, idx, w: torch.zeros_like(h))
    dec, out = _decode(eng, lm, {"name": "fixed", "k": 3}, prompts, 14)
    spec_kv = [(k.clone(), v.clone()) for k, v in eng.kv()]
    n = eng.length
    seq = prompts[0] + out[0][:-1]  # the last emitted token is not cached yet
    assert n == len(seq)
    ref = _engine(lm, kind, draft=lambda m, h, idx, w: torch.zeros_like(h))
    ref.reset()
    if kind == "eager":  # transformers' own cache, as a non-speculative run keeps it (no past recording)
        from transformers import DynamicCache

        ref.cache = DynamicCache(config=lm.model.config)
    for p, tok in enumerate(seq):  # one token at a time: the non-speculative decode
        ref.target(torch.tensor([[tok]]), p)
    ref_kv = ref.kv()
    assert len(ref_kv) == len(spec_kv)
    for (k1, v1), (k2, v2) in zip(spec_kv, ref_kv):
        assert k1.shape == k2.shape
        torch.testing.assert_close(k1, k2, rtol=0, atol=1e-5)
        torch.testing.assert_close(v1, v2, rtol=0, atol=1e-5)
    eng.close()
    ref.close()


class _Recorder:
    """MoE-SpeQ's scheduler, recording what it is given and what it asks for."""

    def __init__(self) -> None:
        self.inner = PREFETCH.create("speq")
        self.rows: list[list] = []
        self.phase3: list[set[int]] = []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def on_cycle_start(self, cycle):
        self.rows.append([])
        return self.inner.on_cycle_start(cycle)

    def on_draft_token(self, i, row, budget):
        self.rows[-1].append(row)
        out = self.inner.on_draft_token(i, row, budget)
        if i == self.inner._k - 1:
            self.phase3.append({a.key for a in out})
        return out


@pytest.mark.parametrize("kind", ["eager", "graphed"])
def test_the_elb_holds_exactly_the_drafts_routing(kind):
    lm = load_model("tiny-olmoe", dtype="float32", device="cpu", seed=0)
    E, M = lm.shape.num_experts, lm.shape.num_moe_layers
    eng = _engine(lm, kind)
    seen: list[tuple] = []  # what the draft's experts were called with, per draft token
    inner = eng.draft

    def draft(tok, pos):
        nxt, row = inner(tok, pos)
        seen.append(row)
        return nxt, row

    if kind == "eager":  # independent of RoutingLog: the experts modules' own calls in draft mode
        calls: list = []
        hooks = [h.experts.register_forward_pre_hook(
            (lambda m: lambda mod, args, kw: calls.append((m, (args[1] if len(args) > 1 else kw["top_k_index"]).tolist()))
             if eng.draft_routing.on else None)(m), with_kwargs=True) for m, h in enumerate(lm.moe_handles)]
    eng.draft = draft
    rec = _Recorder()
    dec = SpeculativeDecoder(eng, build_governor({"name": "fixed", "k": 4}), num_experts=E, top_k=lm.shape.top_k,
                             prefetch=rec)
    dec.generate(prompt_tokens(lm.model.config.vocab_size, [6], 5), 11)
    got = [row for cyc in rec.rows for row in cyc]
    assert got == [tuple(tuple(m * E + e for e in ids) for m, ids in enumerate(r)) for r in seen]
    assert len(got) == sum(c.k for c in dec.cycles) > 0
    if kind == "eager":
        for h in hooks:
            h.remove()
        assert [tuple(tuple(ids[0]) for _, ids in calls[i * M:(i + 1) * M]) for i in range(len(seen))] == seen
    # the scheduler's ELB of the last cycle is the union of its rows; Phase III asks for all of it
    last = rec.rows[-1]
    for m in range(M):
        assert rec.inner._elb[m] == {key for row in last for key in row[m]}
    for cyc, keys in zip(rec.rows, rec.phase3):
        assert keys == {key for row in cyc for ids in row for key in ids}
    eng.close()


def test_the_executor_runs_a_verify_pass_as_one_step():
    """On the offloading executor: one step per cycle with k + 1 tokens, emitted = accepted + 1, the
    policy's prefetches copied; output still the target's."""
    from runtime.executor import RunConfig
    from runtime.offloaded import OffloadedModel
    from runtime.speculate import MeasuredCosts
    from sim.policies import EVICTION

    lm = load_model("tiny-qwen3_moe", dtype="float32", device="cpu", seed=0)
    prompts = prompt_tokens(lm.model.config.vocab_size, [7], 6)
    ref = reference_decode(lm.model, prompts, 14)["tokens"]
    mods = [h.experts for h in lm.moe_handles]
    fn = draft_experts(mods)[0]
    om = OffloadedModel(lm, max_slots=6)
    run = om.start_run(RunConfig(eviction=EVICTION.create("lru"), prefetch=PREFETCH.create("speq"), slots=6))
    eng = HFEngine(om.model, om.modules, fn)
    dec = SpeculativeDecoder(eng, build_governor({"name": "fixed", "k": 3}), num_experts=om.E, top_k=om.top_k,
                             run=run, costs=MeasuredCosts(1e-4), expert_bytes=om.nbytes)
    out = dec.generate(prompts, 14)
    om.end_run()
    assert out == ref
    verify = run.steps[1:]
    assert [s.n_tokens for s in verify] == [c.k + 1 for c in dec.cycles]
    assert [s.emitted for s in verify] == [c.emitted for c in dec.cycles]
    assert run.copies > 0 and run.hits + run.late + run.misses > 0
    eng.close()
    om.close()


def test_runtime_app_measures_speculative_policies_live(tmp_path, capsys):
    from runtime.__main__ import run_app

    cfg = _compose(["model=tiny", "mode=live", "policy.suite=[lru,speq,spec-lru,spmoe]", "policy.name=s",
                    "trace.requests=1", "trace.prompt_tokens=6", "trace.decode_tokens=12", "repetitions=1",
                    "warmup_steps=0", "governor=roofline"])
    rows = run_app(cfg, tmp_path)
    meas = {r["policy"]: r for r in rows if r["source"] == "measured"}
    assert all(r["status"] == "ok" for r in meas.values()), [r.get("reason") for r in meas.values()]
    for p in ("speq", "spec-lru", "spmoe"):
        r = meas[p]
        assert r["decoding"] == "speculative" and r["mean_k"] > 0 and 1 <= r["tokens_per_cycle"] <= r["mean_k"] + 1
        assert 0 <= r["acceptance_rate"] <= 1 and 0 <= r["draft_agreement"] <= 1
        assert any(s["policy"] == p and s["source"] == "sim" and s["status"] == "ok" for s in rows)
    out = capsys.readouterr().out
    assert "tokens_per_cycle" in out and "acceptance_rate" in out


@pytest.mark.parametrize("engine", ["eager", "graphed"])
def test_speculative_replay_runs_the_simulators_cycles(engine):
    """mode=replay: the trace's draft columns (here the synthetic trace's stand-in draft) drive
    the ELB and the acceptance, so at fixed k the measured run has the simulator's cycles exactly,
    and on-demand LRU under speculation (spec-lru) sees the same hits and misses."""
    from runtime.measure import Session

    cfg = _compose(["model=tiny", "policy.suite=[speq,spec-lru]", "policy.name=s", "repetitions=1",
                    "warmup_steps=0", "trace.requests=2", "trace.prompt_tokens=5", "trace.decode_tokens=14",
                    "governor=fixed", "governor.k=3", "cache.slots=12", f"engine={engine}"])
    sess = Session(cfg)
    try:
        rows = sess.measure(cfg)
    finally:
        sess.close()
    by = {(r["policy"], r["source"]): r for r in rows}
    for p in ("speq", "spec-lru"):
        m, s = by[(p, "measured")], by[(p, "sim")]
        assert m["status"] == s["status"] == "ok", m.get("reason")
        assert list(m["k_per_cycle"]) == list(s["k_per_cycle"]) and m["cycles"] == s["cycles"]
        assert m["acceptance_rate"] == s["acceptance_rate"] and m["emitted_tokens"] == s["emitted_tokens"]
    assert by[("spec-lru", "measured")]["hit_rate"] == by[("spec-lru", "sim")]["hit_rate"]
    assert by[("spec-lru", "measured")]["miss_rate"] == by[("spec-lru", "sim")]["miss_rate"]


def test_gpu_speculative_benchmark_smoke(tmp_path):
    """The GPU evidence script runs end to end on the CPU (tiny preset) and writes its rows."""
    import json

    from benchmarks.gpu_speculative import main

    assert main(["--smoke", "--out", str(tmp_path), "--ks", "2", "--reps", "1"]) == 0
    rows = [json.loads(x) for x in (tmp_path / "results.jsonl").read_text().splitlines()]
    labels = {r["label"]: r for r in rows}
    assert {"lru", "lru-same-cache", "lookahead", "lookahead-same-cache", "oracle", "speq", "speq-k2", "spec-lru",
            "spmoe"} <= set(labels)
    # live mode: the oracle reads the trace's future, so its rows say why they did not run
    assert labels["oracle"]["status"] == "unsupported" and "replay" in labels["oracle"]["reason"]
    for r in rows:
        if r["policy"] == "oracle":
            continue
        assert r["status"] == "ok", r.get("reason")
        for c in ("card", "model", "engine", "policy", "budget", "k", "tpot_measured_s", "tpot_sim_s",
                  "speedup_measured", "speedup_sim"):
            assert c in r and r[c] is not None or c == "k", c
    assert labels["lru"]["speedup_measured"] == 1.0 and labels["lru"]["slots"] > labels["lru-same-cache"]["slots"]
    assert labels["speq"]["k"] == "governor" and labels["speq-k2"]["mean_k"] <= 2
    assert labels["speq"]["token_mismatch_share"] == 0.0  # fp32 on the CPU: the target's greedy output
    assert (tmp_path / "summary.md").read_text().count("MoE-SpeQ") >= 2
    import pandas as pd

    # live mode: the routing the GPU executed is stored per config, so --resimulate predicts the live rows
    # again; under the run's own hardware exactly as recorded, under another one differently
    assert {f"tiny-eager-{x}.parquet" for x in ("lru", "speq", "speq-k2", "spec-lru")} <= {
        p.name for p in (tmp_path / "traces").iterdir()}
    for hw in ("h200", "h100-pcie5"):
        assert main(["--resimulate", str(tmp_path), "--hardware", hw]) == 0
    same = pd.read_parquet(tmp_path / "resimulated-h200.parquet").query("status == 'ok'")
    other = pd.read_parquet(tmp_path / "resimulated-h100-pcie5.parquet").query("status == 'ok'")
    assert len(same) >= 8 and (same.tpot_sim_s == same.tpot_sim_before_s).all()
    assert (other.tpot_sim_s != other.tpot_sim_before_s).any() and set(other.hardware) == {"h100-pcie5"}
    cyc = pd.read_parquet(tmp_path / "cycles.parquet")  # every speculative config's measured cycles
    assert {"speq", "speq-k2", "spec-lru", "spmoe"} <= set(cyc["label"]) and "lru" not in set(cyc["label"])
    assert cyc["observed_cycle_s"].gt(0).all() and cyc["predicted_cycle_s"].notna().all()
    assert cyc.loc[cyc.label == "speq-k2", "k"].le(2).all()


@pytest.mark.parametrize("layout", [["cache.slots=10"], ["cache.per_layer=3"], ["cache.slots=10", "cache.reset=request"],
                                    ["cache.slots=10", "hardware.host_memory=pageable"]])
def test_virtual_time_speculation_makes_exactly_the_simulators_decisions(layout):
    """Speculative replay hosted by the runtime on the deterministic virtual-time backend (compute
    and drafting take the cost model's times, copies the copy stream model's) makes exactly the
    simulator's decisions on the same trace, for the roofline governor (MoE-SpeQ), fixed k,
    on-demand LRU under speculation and SP-MoE's cutoff (one global pool, per-layer pools, a cache
    emptied at each request, copies from pageable memory that hold the host): the same k and acceptance in every cycle,
    the same copies in the same order (demand or prefetch), the same hits, late experts, misses,
    evictions, refused prefetches and ELB recall; copy and token times equal within rounding (the
    two sum the same durations in a different order). Both run the same controller methods
    (sim.host.HostController.cycle_begin / draft_token / cycle_end)."""
    from runtime.measure import Session, run_log
    from sim.run import policy_governor, run_policy

    cfg = _compose(["model=tiny", "policy.suite=[speq,speq-k4,spec-lru,spmoe]", "policy.name=s", "repetitions=1",
                    "warmup_steps=0", "trace.requests=2", "trace.prompt_tokens=5", "trace.decode_tokens=40",
                    "governor=roofline", "governor.k_max=6", "governor.warmup_cycles=2", *layout, "engine=eager",
                    "cpu_backend=virtual", "hardware.decision_delay_s=2e-5"])
    sess = Session(cfg)
    prefetches = refused = 0
    ks: set[int] = set()
    try:
        prep = sess.prepare(cfg)
        for p in cfg.policy.suite:
            from sim.run import load_policy

            pcfg = load_policy(p)
            plan = sess.plan(cfg, pcfg)
            run = sess.run_config(cfg, pcfg, plan, schedule=prep.schedule, trace=prep.trace)
            row, (sim, log) = run_policy(prep, pcfg, int(cfg.seed), timeline=True, governor_cfg=policy_governor(cfg, pcfg),
                                         trace_cfg=cfg.trace, plan=plan)
            cyc = run.spec.sim_cycles()
            assert [c["k"] for c in cyc] == [c["k"] for c in log.cycles], p
            assert [c["accepted"] for c in cyc] == [c["accepted"] for c in log.cycles], p
            assert [c["elb_hits"] for c in cyc] == [c["elb_hits"] for c in log.cycles], p
            assert [c["governor_phase"] for c in cyc] == [c["governor_phase"] for c in log.cycles], p
            got = [(k, pf) for _, _, k, pf in run.copy_log]
            want = [(k, pf) for _, _, k, pf in log.copy_spans]
            assert got == want, p
            assert (run.hits, run.late, run.misses, run.cache.evictions) == (log.hits, log.late, log.misses, log.evictions), p
            assert run.link.refused == sim.copy.refused, p
            sec = run.backend.seconds
            assert np.allclose([sec(b) for _, b, _, _ in run.copy_log], [b for _, b, _, _ in log.copy_spans],
                               rtol=1e-9, atol=0), p
            rl = run_log(run)
            assert np.allclose(np.concatenate(rl.token_times), np.concatenate(log.token_times), rtol=1e-9, atol=0), p
            assert [c["coverage"] for c in cyc] == pytest.approx([c["coverage"] for c in log.cycles], rel=1e-12), p
            prefetches += sum(pf for _, pf in got)
            refused += sim.copy.refused
            ks.update(c["k"] for c in log.cycles if p == "speq")
    finally:
        sess.close()
    assert prefetches > 0  # the ELB policies' copies are compared, not only demand fetches
    assert len(ks) > 1  # the governor moved (warm-up, then its choice): a real comparison


def test_gpu_speculative_resimulates_replay_rows_under_another_profile(tmp_path):
    """``--resimulate DIR --hardware H``: each replay-mode row is predicted again from its own config
    (policy, governor or fixed k, slots, engine), the speed-ups over lru recomputed; live rows without
    a stored executed trace keep their prediction; without --hardware it refuses."""
    import json

    import pandas as pd

    from benchmarks.gpu_speculative import main

    def row(label, policy, k, slots, mode="replay"):
        return {"card": "cpu", "date": "d", "hardware": "h200", "model": "tiny", "engine": "eager", "mode": mode,
                "decode_tokens": 14, "label": label, "policy": policy, "k": k, "slots": slots, "status": "ok",
                "tpot_measured_s": 0.01, "tpot_sim_s": 1.0}

    rows = [row("lru", "lru", None, 22), row("speq", "speq", "governor", 16), row("speq-k2", "speq", 2, 16),
            row("speq-live", "speq", "governor", 16, mode="live")]
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["--resimulate", str(tmp_path)]) == 2
    assert main(["--resimulate", str(tmp_path), "--hardware", "h100-pcie5"]) == 0
    df = pd.read_parquet(tmp_path / "resimulated-h100-pcie5.parquet").set_index("label")
    assert (df.loc[["lru", "speq", "speq-k2"], "tpot_sim_s"] < 1.0).all()  # predicted again (not the 1 s placeholder)
    assert df.loc["speq-live", "tpot_sim_s"] == 1.0  # live, and no routing the GPU executed stored here
    assert df.loc["speq-k2", "sim_mean_k"] <= 2 and df.loc["speq", "k"] == "governor"
    assert df.loc["speq", "speedup_sim"] == df.loc["lru", "tpot_sim_s"] / df.loc["speq", "tpot_sim_s"]
    assert (tmp_path / "resimulated-h100-pcie5").with_suffix(".md").read_text().count("MoE-SpeQ") == 1
