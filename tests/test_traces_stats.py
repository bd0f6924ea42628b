"""traces.stats on tiny hand-built traces whose every statistic is computed by hand below."""

from __future__ import annotations

import argparse
import json
import math

import numpy as np
import pytest

from traces import ModelShape, Trace, TraceError, read_trace, write_trace
from traces import stats
from traces.trace import DECODE, PREFILL


def build(
    requests: list[list[list[list[int]]]],
    shape: ModelShape,
    prompt: list[int] | None = None,
    lookahead: dict[int, list] | None = None,
    draft: list | None = None,
    draft_match: list[list[bool]] | None = None,
) -> Trace:
    """requests[r][t][m] = the k expert ids of token t at MoE ordinal m (first ``prompt[r]`` tokens prefill)."""
    R, M, k = len(requests), shape.num_moe_layers, shape.top_k
    T = max(len(x) for x in requests)
    prompt = prompt or [0] * R
    lengths = np.array([len(x) for x in requests], dtype=np.int32)
    pos = np.full((R, T), -1, np.int32)
    step = np.full((R, T), -1, np.int32)
    phase = np.full((R, T), -1, np.int8)

    def dense(a: list | None) -> np.ndarray | None:
        if a is None:
            return None
        out = np.full((R, T, M, k), -1, np.int16)
        for r, toks in enumerate(a):
            for t, layers in enumerate(toks):
                for m, row in enumerate(layers):
                    if row is not None:
                        out[r, t, m] = row
        return out

    for r, n in enumerate(lengths):
        pos[r, :n] = np.arange(n)
        p = prompt[r]
        phase[r, :n] = np.where(np.arange(n) < p, PREFILL, DECODE)
        step[r, :n] = np.where(np.arange(n) < p, 0, np.arange(n) - p + 1)
    ids = dense(requests)
    w = np.where(ids >= 0, 0.0, np.nan).astype(np.float32)
    w[..., 0] += 0.7 if k > 1 else 1.0
    if k > 1:
        w[..., 1:] += 0.3 / (k - 1)
    dm = None
    if draft_match is not None:
        dm = np.zeros((R, T), bool)
        for r, row in enumerate(draft_match):
            dm[r, : len(row)] = row
    return Trace(
        shape=shape, request_ids=np.arange(R, dtype=np.int64), lengths=lengths, position=pos, step=step,
        phase=phase, expert_ids=ids, gate_weights=w,
        lookahead={d: dense(a) for d, a in (lookahead or {}).items()}, draft=dense(draft), draft_match=dm,
    )


ONE = ModelShape("hand", 1, (0,), 4, 2)
SEQ = [[[0, 1]], [[1, 2]], [[2, 3]], [[0, 1]]]  # one layer, E=4, k=2


# ---------------------------------------------------------------------- reuse
def test_reuse_next_and_window_by_hand():
    tr = build([SEQ], ONE)
    # pairs: {1,2}&{0,1}={1} -> 1/2; {2,3}&{1,2}={2} -> 1/2; {0,1}&{2,3}={} -> 0
    r1 = stats.reuse(tr, 1)
    assert r1.den.tolist() == [3]
    assert r1.per_layer[0] == pytest.approx(1 / 3)
    # window 2, tokens with 2 predecessors: t2 {2,3} vs {0,1,2} -> 1/2; t3 {0,1} vs {1,2,3} -> 1/2
    r2 = stats.reuse(tr, 2)
    assert r2.den.tolist() == [2]
    assert r2.per_layer[0] == pytest.approx(0.5)
    # window 3: only t3, {0,1} vs {0,1,2,3} -> 1
    assert stats.reuse(tr, 3).per_layer[0] == pytest.approx(1.0)
    # window longer than the request: nothing counted
    assert stats.reuse(tr, 4).den.tolist() == [0] and math.isnan(stats.reuse(tr, 4).per_layer[0])


def test_reuse_counts_only_selected_phase_and_never_crosses_requests():
    # request 0: 2 prefill tokens then SEQ as decode; request 1: SEQ reversed, decode only
    pre = [[[2, 3]], [[0, 1]]]
    tr = build([pre + SEQ, SEQ[::-1]], ONE, prompt=[2, 0])
    # decode: request 0 pairs as above (1/2, 1/2, 0); request 1 reversed pairs:
    # {2,3}&{0,1}=0, {1,2}&{2,3}=1/2, {0,1}&{1,2}=1/2 -> total 2 / 6 pairs
    assert stats.reuse(tr, 1, phase="decode").per_layer[0] == pytest.approx(2 / 6)
    # prefill: one pair {0,1}&{2,3} = 0
    r = stats.reuse(tr, 1, phase="prefill")
    assert r.den.tolist() == [1] and r.per_layer[0] == 0.0
    # all: request 0 adds the pairs (t1 vs t0)=0 and (first decode {0,1} vs {0,1})=1 -> 3 / 8
    assert stats.reuse(tr, 1, phase="all").per_layer[0] == pytest.approx(3 / 8)
    with pytest.raises(TraceError, match="phase"):
        stats.reuse(tr, 1, phase="verify")


# ------------------------------------------------------------------------ LRU
def test_lru_hit_rates_by_hand():
    tr = build([SEQ], ONE)
    # c=2: t1 hits 1, t2 hits 2, t3 none -> 2/8
    # c=3: recency after t2 is 1,2,3 (0 evicted by 3) -> t3 hits 1 -> 3/8
    # c=4: t1 1, t2 2, t3 0 and 1 -> 4/8 (only cold misses)
    rates = stats.lru_hit_rates(tr, [2, 3, 4])
    assert {c: float(r.per_layer[0]) for c, r in rates.items()} == {2: 0.25, 3: 0.375, 4: 0.5}
    assert rates[2].den.tolist() == [4]
    with pytest.raises(TraceError, match="top_k"):
        stats.lru_hit_rates(tr, [1])


def test_lru_touch_order_is_the_simulators():
    """Resident experts first, then the fetched ones, each in gate-weight order (highest first)."""
    five = ModelShape("hand5", 1, (0,), 5, 2)
    # t0 fetches 0 then 1, so 0 is older: t1 {2,3} evicts 0 (c=3), and t2 {1,2} hits both -> 2/6
    # (touching the top-1 expert last would evict 1 instead: one hit)
    tr = build([[[[0, 1]], [[2, 3]], [[1, 2]]]], five)
    assert stats.lru_hit_rates(tr, [3])[3].per_layer[0] == pytest.approx(2 / 6)
    # t1 {2,1}: 1 resident (touched first), 2 fetched (touched last): order 0,1,2; t2 {3,4} evicts
    # 0 then 1; t3 {2,3} hits both -> 3/8 (pure gate-weight order would evict 2: 2/8)
    tr = build([[[[0, 1]], [[2, 1]], [[3, 4]], [[2, 3]]]], five)
    assert stats.lru_hit_rates(tr, [3])[3].per_layer[0] == pytest.approx(3 / 8)


def test_lru_is_cold_at_each_request_and_per_layer():
    two = ModelShape("hand2", 2, (0, 1), 4, 2)
    req = [[[0, 1], [2, 3]], [[0, 1], [0, 1]]]  # layer 0 repeats, layer 1 switches
    tr = build([req, req], two)
    rates = stats.lru_hit_rates(tr, [2])[2].per_layer
    # layer 0: second token hits both, per request -> 2 hits / 4 selections; layer 1: no hit
    assert rates.tolist() == [0.5, 0.0]
    with pytest.raises(TraceError):
        stats.lru_hit_rates(tr, [0])


def test_lru_with_cache_equal_to_k_equals_reuse_next():
    rng = np.random.default_rng(0)
    shape = ModelShape("rand", 1, (0,), 6, 3)
    seq = [[list(rng.choice(6, 3, replace=False))] for _ in range(40)]
    tr = build([seq], shape)
    lru = stats.lru_hit_rates(tr, [3])[3]
    r = stats.reuse(tr, 1)
    # same hits; lru counts the first (cold) token too
    assert lru.num[0] == pytest.approx(r.num[0]) and lru.den[0] == r.den[0] + 1


# ----------------------------------------------------------------- popularity
def test_top_quarter_and_entropy_by_hand():
    shape = ModelShape("e8", 1, (0,), 8, 2)
    seq = [[[0, 1]], [[0, 2]], [[3, 4]], [[5, 6]], [[7, 0]]]  # 5 tokens, windows of 2
    tr = build([seq], shape)
    p = stats.popularity(tr, skew_window=2)
    # windows {0,1,0,2}: top 2 = 3/4; {3,4,5,6}: 2/4; the partial window (t4) is dropped
    assert p["top_quarter_window"][0] == pytest.approx(0.625)
    # global counts 0:3, 1..7:1 (10 selections): top 2 = 4/10
    assert p["top_quarter_global"][0] == pytest.approx(0.4)
    pg = np.array([3, 1, 1, 1, 1, 1, 1, 1]) / 10
    assert p["entropy_global"][0] == pytest.approx(-(pg * np.log(pg)).sum() / math.log(8))
    h1 = -(0.5 * math.log(0.5) + 2 * 0.25 * math.log(0.25)) / math.log(8)
    h2 = math.log(4) / math.log(8)
    assert p["entropy_window"][0] == pytest.approx((h1 + h2) / 2)
    # a request shorter than the window is one window
    p = stats.popularity(tr, skew_window=10)
    assert p["top_quarter_window"][0] == pytest.approx(0.4)
    assert stats.top_quarter_size(8) == 2 and stats.top_quarter_size(60) == 15 and stats.top_quarter_size(2) == 1


# ---------------------------------------------------------------- co-occurrence
def test_cooccurrence_recall_by_hand():
    two = ModelShape("e4k1", 2, (0, 1), 4, 1)
    fit = [[[0], [1]], [[0], [1]], [[2], [3]], [[2], [3]], [[2], [1]]]
    ev = [[[0], [1]], [[2], [3]], [[3], [0]], [[0], [3]]]
    tr = build([fit, ev], two)  # request 0 (even) fits, request 1 (odd) is predicted
    co, pop = stats.cooccurrence_recall(tr)
    # P(1|0)=1, P(3|2)=2/3, P(1|2)=1/3; popularity at layer 1: 1 (3/5) > 3 (2/5)
    # eval: 0->pred 1 (hit), 2->pred 3 (hit), 3 unseen->popularity 1 (miss), 0->1 (miss) = 2/4
    assert math.isnan(co.per_layer[0]) and co.per_layer[1] == pytest.approx(0.5)
    assert co.den.tolist() == [0, 4]
    assert pop.per_layer[1] == pytest.approx(0.25)  # always 1: one hit in four
    # one request: cannot split
    co1, _ = stats.cooccurrence_recall(build([fit], two))
    assert math.isnan(co1.overall)


# ----------------------------------------------------------- recorded predictors
def test_predictor_recall_and_acceptance_by_hand(tmp_path):
    shape = ModelShape("dense0", 4, (1, 2, 3), 4, 2)  # decoder layer 0 dense
    truth = [[[0, 1], [1, 2], [2, 3]]]  # one token, MoE layers 1, 2, 3
    la1 = [[[1, 3], [2, 3], None]]  # layer 1 -> 2: 1/2; layer 2 -> 3: 1; layer 3: null
    la2 = [[[0, 1], None, None]]  # layer 1 -> 3: 0
    draft = [[[0, 1], [0, 3], [3, 2]]]  # 1, 0, 1
    tr = build([truth * 2], shape, lookahead={1: [la1 * 2], 2: [la2 * 2]}, draft=[draft * 2],
               draft_match=[[True, False]])
    rec = stats.predictor_recall(tr)
    np.testing.assert_allclose(rec["lookahead_1"].per_layer, [0.5, 1.0, np.nan])
    assert rec["lookahead_1"].overall == pytest.approx(0.75)
    np.testing.assert_allclose(rec["lookahead_2"].per_layer, [0.0, np.nan, np.nan])
    np.testing.assert_allclose(rec["draft"].per_layer, [1.0, 0.0, 1.0])
    assert rec["draft"].overall == pytest.approx(2 / 3)
    assert stats.acceptance(tr) == 0.5
    # the hand-built trace is a valid trace file
    assert read_trace(write_trace(tr, tmp_path / "hand.parquet")).equals(tr)


def test_draft_set_agreement_recall_and_acceptance_correlation_by_hand():
    # rows: {0,1} vs {1,0}: same set (order ignored); {1,2} vs {1,3}: 1 of 2 right; {2,3} vs {0,1}:
    # 0 of 2; {0,1} vs {0,1}: same -> set agreement 2/4, recall (2+1+0+2)/8, wrong ids (1+2)/2
    draft = [[[1, 0]], [[1, 3]], [[0, 1]], [[0, 1]]]
    tr = build([SEQ], ONE, draft=[draft], draft_match=[[True, True, False, False]])
    agree, wrong = stats.draft_agreement(tr, phase="all")
    assert agree.overall == 0.5 and wrong == 1.5
    assert stats.predictor_recall(tr, phase="all")["draft"].overall == pytest.approx(5 / 8)
    # pairs (x_t, x_t+1): (1,1), (1,0), (0,0): cov 1/9, both variances 2/9 -> 0.5
    assert stats.acceptance_corr(tr, phase="all") == pytest.approx(0.5)


# -------------------------------------------------------------- all together + CLI
def test_compute_stats_table_and_json(tmp_path, capsys):
    shape = ModelShape("dense0", 4, (1, 2, 3), 4, 2)
    truth = [[[0, 1], [1, 2], [2, 3]], [[1, 2], [1, 2], [0, 1]]]
    la1 = [[[1, 3], [2, 3], None], [[1, 2], [0, 3], None]]
    tr = build([truth, truth], shape, lookahead={1: [la1, la1]}, draft=[truth, truth],
               draft_match=[[True, True], [False, True]])
    st = stats.compute_stats(tr, window=1, cache_sizes=[2])
    df = st.per_layer
    assert list(df.index) == [1, 2, 3, "all"]
    assert {"reuse_next", "reuse_w1", "lru_c2", "top_quarter_window", "cooc_recall", "popularity_recall",
            "lookahead_1_recall", "draft_recall", "draft_set_agreement", "entropy_global"} <= set(df.columns)
    # layer 1: {1,2}&{0,1} -> 1/2; layer 2: 1; layer 3: 0 (both requests alike)
    assert df["reuse_next"].tolist()[:3] == [0.5, 1.0, 0.0]
    assert df.loc["all", "reuse_next"] == pytest.approx(0.5)
    assert df.loc["all", "draft_recall"] == 1.0 and df.loc["all", "draft_set_agreement"] == 1.0
    assert st.scalars["acceptance"] == 0.75 and st.scalars["chance"] == 0.5
    assert "lookahead_1_recall" in st.to_text()

    path = write_trace(tr, tmp_path / "t.parquet")
    p = argparse.ArgumentParser()
    stats.add_arguments(p)
    args = p.parse_args([str(path), "--json", "--window", "1", "--cache-sizes", "2,3", "-o", str(tmp_path / "s.json")])
    assert stats.run(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert out == json.loads((tmp_path / "s.json").read_text())
    assert out["per_layer"]["layer"] == [1, 2, 3]
    assert out["per_layer"]["reuse_next"] == [0.5, 1.0, 0.0]
    assert out["per_layer"]["lookahead_1_recall"][2] is None  # NaN -> null
    assert out["settings"]["cache_sizes"] == [2, 3] and out["acceptance"] == 0.75
    args = p.parse_args([str(path)])
    assert stats.run(args) == 0
    assert "reuse_next" in capsys.readouterr().out


def test_stats_on_trace_without_optional_columns():
    tr = build([SEQ, SEQ], ONE)
    tr.gate_weights = None
    st = stats.compute_stats(tr)
    assert not any(c.startswith("lookahead") or c.startswith("draft") for c in st.per_layer.columns)
    assert math.isnan(st.scalars["acceptance"])
    assert stats.default_cache_sizes(8, 2) == [2, 4, 8] and stats.default_cache_sizes(128, 8) == [8, 16, 32]


def test_prefill_only_log_shows_prefill_statistics(tmp_path, capsys):
    from pathlib import Path

    from traces.importers import import_log

    case = Path(__file__).resolve().parent / "data" / "logs" / "prefill-only.jsonl"
    path = write_trace(import_log(case), tmp_path / "p.parquet")
    p = argparse.ArgumentParser()
    stats.add_arguments(p)
    assert stats.run(p.parse_args([str(path), "--json"])) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["note"].startswith("prefill-only trace") and out["settings"]["phase"] == "prefill"
    assert out["tokens"] == 20 and out["overall"]["lru_c2"] is not None  # 4 requests x 5 prompt tokens
    assert stats.run(p.parse_args([str(path)])) == 0
    text = capsys.readouterr().out
    assert "prefill-only trace" in text and "20 prefill tokens" in text
    with pytest.raises(TraceError, match="no decode token.*--phase prefill"):
        stats.run(p.parse_args([str(path), "--phase", "decode"]))
