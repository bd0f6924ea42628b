"""Recording a run's decisions and replaying them (sim.decisions, sim.policies.replay): a replay of
the simulator's own decisions is the same run, bit for bit, for every kind of policy (autoregressive
prefetchers, whole-layer streaming, speculative ELB policies with their k per cycle); decisions
files round-trip and bad ones are refused with one line naming the file. The runtime's side (its
logged decisions replayed by the simulator on the virtual-time backend) is in
tests/test_runtime_executor.py."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hydra import compose, initialize_config_dir

from sim.config import register_configs
from sim.decisions import META_KEY, CycleK, DecisionLog, Eviction, Point, Prefetch, Refusal, agreement
from sim.errors import SimError
from sim.governor import CycleCosts, PlaybackGovernor
from sim.policies.errors import PolicyError
from sim.presets import conf_dir
from sim.run import load_policy, prepare, run_policy

register_configs()
ROOT = Path(__file__).resolve().parents[1]
TRACE = ["model=tiny", "trace.requests=3", "trace.prompt_tokens=6", "trace.decode_tokens=20",
         "hardware.decision_delay_s=2e-5"]


def prepared(*overrides: str):
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        return prepare(compose(config_name="sim", overrides=[*TRACE, *overrides]))


def record_and_replay(prep, name: str, admission: bool = True):
    p = load_policy(name)
    p.admission = admission
    row, (sim, log) = run_policy(prep, p, 0, timeline=True, record=True)
    d = sim.recorder.decisions(log.cycles)
    row2, (sim2, log2) = run_policy(prep, p, 0, timeline=True, decisions=d, record=True)
    return d, (row, log), (row2, log2, sim2.recorder.decisions(log2.cycles))


@pytest.mark.parametrize("name,admission,overrides", [
    ("lru", True, ["cache.slots=6"]),
    ("lookahead", True, ["cache.slots=6"]),
    ("lookahead", True, ["cache.per_layer=3"]),
    ("oracle", True, ["cache.slots=6"]),
    ("history", False, ["cache.slots=6"]),  # the tiny preset's link: the admission rule refuses every history guess
    ("stream", True, ["cache.slots=12", "hardware.memory_gb=100"]),  # pageable copies at each layer's start
    # ELB prefetches, lookahead-aware eviction (its victims replayed), k per cycle
    ("speq", True, ["cache.slots=6", "trace.decode_tokens=40"]),
    ("spmoe", True, ["cache.slots=6", "trace.decode_tokens=40"]),
])
def test_a_replay_of_the_simulators_own_decisions_is_the_same_run(name, admission, overrides):
    prep = prepared(*overrides)
    d, (row, log), (row2, log2, d2) = record_and_replay(prep, name, admission)
    assert d.prefetches or name == "lru"  # every prefetching policy here does prefetch
    assert np.array_equal(np.concatenate(log.token_times), np.concatenate(log2.token_times)), name
    assert [(k, pf) for _, _, k, pf in log.copy_spans] == [(k, pf) for _, _, k, pf in log2.copy_spans]
    assert d2.prefetches == d.prefetches and d2.evictions == d.evictions
    assert row2["tpot_ms"] == row["tpot_ms"] and row2["replay_unreached"] == 0
    assert row2["replayed_prefetches"] == len(d.prefetches) and row2["replay_already_cached"] == 0
    agree = agreement(d, d2)
    assert agree["replay_eviction_agreement"] == 1.0 or not d.evictions
    assert agree["replay_issue_agreement"] == 1.0 or not d.prefetches
    if log.cycles:  # speculative: the same k and acceptance per cycle
        assert d.ks() == [c["k"] for c in log.cycles] and d2.cycles == d.cycles
        assert [c["accepted"] for c in log2.cycles] == [c["accepted"] for c in log.cycles]
        assert row2["replay_k_capped"] == 0 and row2["replay_cycles_unreached"] == 0


def test_the_decisions_are_the_issued_prefetches_at_their_decision_points():
    """Every recorded prefetch is a prefetch copy of the run (its key, in issue order), decided at
    a routing before the layer-step it went out at; cancelled and refused ones are not there."""
    prep = prepared("cache.slots=6")
    d, (row, log), _ = record_and_replay(prep, "lookahead")
    issued = [k for _, _, k, pf in log.copy_spans if pf]
    assert [p.key for p in d.prefetches] == issued
    assert all(p.point.hook == "routed" and 0 <= p.g <= p.issued_g for p in d.prefetches)
    assert row["prefetches_refused"] > 0  # the admission rule dropped some: none of them is recorded
    assert len(d.evictions) == log.evictions > 0


def test_replaying_changes_nothing_but_the_decisions():
    """Replaying no prefetches at all is on-demand LRU: the replay adds no decision of its own."""
    prep = prepared("cache.slots=6")
    lru, _ = run_policy(prep, load_policy("lru"), 0)
    empty = DecisionLog(meta={"num_moe_layers": prep.model.num_moe_layers, "num_experts": prep.model.num_experts,
                              "hooks": ["on_routed"]})
    replayed, _ = run_policy(prep, load_policy("lookahead"), 0, decisions=empty)
    assert replayed["tpot_ms"] == lru["tpot_ms"] and replayed["replayed_prefetches"] == 0


def test_agreement_counts_same_layer_step_issues_and_evictions_as_multisets():
    pt = Point("routed", 0, 0, 0)
    rec = DecisionLog(prefetches=[Prefetch(pt, 5, 1, 0, 1), Prefetch(pt, 5, 1, 0, 3), Prefetch(pt, 6, 1, 0, 1)],
                      evictions=[Eviction(1, 2, 5)])
    rep = DecisionLog(prefetches=[Prefetch(pt, 5, 1, 0, 1), Prefetch(pt, 5, 1, 0, 1), Prefetch(pt, 6, 1, 0, 2)])
    a = agreement(rec, rep)
    assert a["replay_issue_agreement"] == pytest.approx(1 / 3) and a["replay_eviction_agreement"] == 0.0
    assert np.isnan(agreement(DecisionLog(), rep)["replay_issue_agreement"])


def test_decisions_file_round_trip(tmp_path: Path):
    d = DecisionLog(
        prefetches=[Prefetch(Point("routed", 0, 1, 2), 17, 1, 5, 6), Prefetch(Point("preload"), 3, 0, -1, 0),
                    Prefetch(Point("transfer_done", index=2, trigger=9), 4, 2, -1, 8),
                    Prefetch(Point("draft_token", request=1, cycle=3, index=0), 30, 1, -1, 40)],
        evictions=[Eviction(6, 2, 17)], refusals=[Refusal(5, 6, 1)], cycles=[CycleK(1, 1, 4), CycleK(0, 1, 2)],
        meta={"num_moe_layers": 4, "num_experts": 8, "hooks": ["on_routed"], "keeps_cache": True, "policy": "x"})
    back = DecisionLog.load(d.save(tmp_path / "d.parquet"))
    assert (back.prefetches, back.evictions, back.refusals, back.cycles) == (d.prefetches, d.evictions, d.refusals,
                                                                            d.cycles)
    assert back.meta["policy"] == "x" and back.meta["format"] == 1
    assert back.ks() == [2, 4]  # run order: requests in turn
    assert DecisionLog.load(str(tmp_path / "d.parquet")).prefetches == d.prefetches


def _write(path: Path, cols: dict, meta: dict | None) -> Path:
    t = pa.table(cols)
    if meta is not None:
        import json

        t = t.replace_schema_metadata({META_KEY: json.dumps(meta).encode()})
    pq.write_table(t, path)
    return path


def _good_cols(**change) -> dict:
    d = DecisionLog(prefetches=[Prefetch(Point("routed", 0, 1, 2), 17, 1, 5, 6)], cycles=[CycleK(0, 1, 2)])
    cols = d.records()
    for c, v in change.items():
        cols[c] = v
    return cols


META = {"format": 1, "num_moe_layers": 4, "num_experts": 8}


@pytest.mark.parametrize("case,match", [
    ("missing", "no such file"),
    ("text", "not a Parquet file"),
    ("no_meta", "not a decisions file"),
    ("format", "format 7"),
    ("no_column", r"missing column\(s\) \['priority'\]"),
    ("key", r"row 0 \(prefetch\): column 'key' = 99 is not an expert key of 4 MoE layers x 8 experts"),
    ("hook", "unknown hook 'sometime'"),
    ("layer", r"column 'layer' = 4 is not one of the 4 MoE layers"),
    ("kind", "unknown kind 'guess'"),
    ("k", r"row 1 \(cycle\): column 'k' = -1 is negative"),
    ("twice", "appears twice for request 0"),
    ("null", "column 'g' has nulls"),
])
def test_bad_decisions_files_are_refused_in_one_line(tmp_path: Path, case: str, match: str):
    p = tmp_path / "d.parquet"
    if case == "text":
        p.write_text("prefetch,17\n")
    elif case == "no_meta":
        _write(p, _good_cols(), None)
    elif case == "format":
        _write(p, _good_cols(), {**META, "format": 7})
    elif case == "no_column":
        _write(p, {k: v for k, v in _good_cols().items() if k != "priority"}, META)
    elif case == "key":
        _write(p, _good_cols(key=[99, -1]), META)
    elif case == "hook":
        _write(p, _good_cols(hook=["sometime", ""]), META)
    elif case == "layer":
        _write(p, _good_cols(layer=[4, -1]), META)
    elif case == "kind":
        _write(p, _good_cols(kind=["guess", "cycle"]), META)
    elif case == "k":
        _write(p, _good_cols(k=[-1, -1]), META)
    elif case == "twice":
        cols = _good_cols(kind=["cycle", "cycle"], hook=["", ""], request=[0, 0], cycle=[1, 1], k=[2, 3])
        _write(p, cols, META)
    elif case == "null":
        _write(p, _good_cols(g=[None, -1]), META)
    with pytest.raises(SimError, match=match) as e:
        DecisionLog.load(p)
    assert str(p) in str(e.value) and "\n" not in str(e.value)


def test_decisions_of_another_model_are_refused_before_the_run(tmp_path: Path):
    prep = prepared("cache.slots=6")
    other = DecisionLog(meta={"num_moe_layers": 3, "num_experts": 8})
    with pytest.raises(PolicyError, match="recorded on 3 MoE layers x 8 experts, the simulated model has"):
        run_policy(prep, load_policy("lookahead"), 0, decisions=other)


def test_a_bad_decisions_file_on_the_command_line_is_one_line_and_exit_2(tmp_path: Path):
    bad = tmp_path / "d.parquet"
    bad.write_text("not parquet")
    r = subprocess.run([sys.executable, "-m", "sim", "model=tiny", "policy=lru", "policy.prefetch=replay",
                        f"+policy.prefetch_args.decisions={bad}", f"hydra.run.dir={tmp_path / 'out'}"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0
    assert f"decisions file {bad}: not a Parquet file" in r.stderr


def costs(k_limit: int | None = None) -> CycleCosts:
    return CycleCosts(t_draft=lambda k: 1e-3 * k, t_verify=lambda n: 5e-3, t_pcie_init=0.0, t_overhead=0.0,
                      expert_transfer_s=1e-3, new_experts=lambda k: k, k_limit=k_limit)


def test_playback_governor_plays_the_logged_k_in_order():
    gov = PlaybackGovernor([3, 0, 5])
    assert [gov.decide(costs()).k, gov.decide(costs()).k] == [3, 0]
    d = gov.decide(costs(k_limit=2))  # fewer tokens left than the log's k: capped, and counted
    assert (d.k, d.phase, gov.capped) == (2, "replayed", 1)
    with pytest.raises(SimError, match="reached cycle 4, the log has 3"):
        gov.decide(costs())
