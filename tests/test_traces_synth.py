"""traces.presets and traces.synth: determinism, validity of every preset, and the dials.

How the statistical tolerances are computed
-------------------------------------------
Each check compares a statistic measured by ``traces.stats`` (or, for the hot-set share, from the
generator's latent hot sets) with the dial that produced it, and asserts

    |measured - dial| <= Z * SE  (+ a documented model bias, none unless stated),  Z = 4,

where SE is the standard error implied by the number of independent trials behind the estimate:

* reuse at layer m: every counted row (a decode token with a previous decode token) keeps each of
  the previous token's k experts independently with probability p = reuse[m] and never re-draws a
  dropped one, so its share is Binomial(k, p) / k, independent across rows:
  SE = sqrt(p (1 - p) / (k n)), n = counted rows of that layer.
* lookahead_<d> recall: each true id is kept independently with probability
  r, so a row's recall is Binomial(k, r) / k, independent across rows and layers:
  SE = sqrt(r (1 - r) / (k n)), n = rows with a target (pooled over source layers).
* draft set agreement: one Bernoulli(s) per (token, layer) row: SE = sqrt(s (1 - s) / n); with
  one wrong id per disagreeing row (the presets) a row's recall is 1 - (1 - X) / k, X that
  Bernoulli, so recall's SE is the set agreement's divided by k.
* acceptance correlation (presets: i.i.d.): the lag-1 sample correlation of n i.i.d. flags has
  SE ~ 1 / sqrt(n).
* acceptance: one Bernoulli(p) per token: SE = sqrt(p (1 - p) / n), n = decode tokens.
* hot-set share (skew) at layer m, with drift = 0 so each (request, layer) keeps one hot set:
  seen per slot, a row's k slots are independent two-state chains (hot / not hot) that keep
  their state with probability rho = reuse[m] and otherwise redraw it as Bernoulli(h), so the
  slot indicator is stationary with variance h (1 - h) and autocorrelation rho^lag. For a chain
  of n tokens Var(sum_t X_t) = k h (1 - h) [n + 2 sum_{l=1}^{n-1} (n - l) rho^l] (X_t = hot
  experts of token t); chains (requests) are independent and SE = sqrt(sum Var) / (k N). This is
  exact when both classes hold at least 2k experts (ceil(E/4) >= 2k and E - ceil(E/4) >= 2k);
  with 8 experts and top-2 (Mixtral, tiny) a hot pick that finds no hot expert left falls back to
  a cold one, a bias that can only lower the share, so there the check is one-sided.

With deterministic seeds each check either always passes or always fails; the per-layer reuse
checks make about 200 comparisons, where a 4-SE rule leaves about a 1% chance that an exact
generator would ever fail one for some seed.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest

from traces import ModelShape, TraceError, read_trace, write_trace
from traces import stats, synth
from traces.presets import PRESETS, preset_names, shape_for
from traces.synth import SynthParams, depth_profile, synth_params_for, synthesize, synthesize_with_internals

Z = 4.0
ROOT = Path(__file__).resolve().parents[1]


# -------------------------------------------------------------------- presets
EXPECTED = {
    "mixtral-8x7b": (32, 8, 2, 0, 0),
    "phi-3.5-moe": (32, 16, 2, 0, 0),
    "qwen1.5-moe-a2.7b": (24, 60, 4, 1, 0),
    "qwen3-30b-a3b": (48, 128, 8, 0, 0),
    "deepseek-v2-lite": (27, 64, 6, 2, 1),
    "olmoe-1b-7b": (16, 64, 8, 0, 0),
    "gpt-oss-20b": (24, 32, 4, 0, 0),
    "tiny": (4, 8, 2, 0, 0),
}


def test_preset_shapes():
    assert preset_names() == list(EXPECTED)
    for name, (layers, experts, k, shared, first) in EXPECTED.items():
        s = shape_for(name)
        assert (s.name, s.num_layers, s.num_experts, s.top_k, s.num_shared_experts) == (name, layers, experts, k, shared)
        assert s.moe_layers == tuple(range(first, layers))
    assert shape_for("deepseek-v2-lite").num_moe_layers == 26
    with pytest.raises(TraceError, match="known presets: mixtral-8x7b, phi-3.5-moe"):
        shape_for("mixtral")
    with pytest.raises(TraceError, match="unknown model preset"):
        synth_params_for("gpt-oss-120b")


def test_presets_agree_with_conf_model():
    yaml = pytest.importorskip("yaml")
    checked = 0
    for name, s in PRESETS.items():
        path = ROOT / "conf" / "model" / f"{name}.yaml"
        if not path.exists():
            continue
        d = yaml.safe_load(path.read_text())
        assert d["num_layers"] == s.num_layers, name
        assert tuple(d["moe_layers"]) == s.moe_layers, name
        assert (d["num_experts"], d["top_k"], d.get("num_shared_experts", 0)) == (
            s.num_experts, s.top_k, s.num_shared_experts), name
        checked += 1
    if not checked:
        pytest.skip("no conf/model presets in this checkout")


# ----------------------------------------------------------------- basic shape
def small(model: str, **kw) -> SynthParams:
    return dataclasses.replace(synth_params_for(model), requests=3, prompt_tokens=8, decode_tokens=24, **kw)


@pytest.mark.parametrize("model", list(PRESETS))
def test_every_preset_writes_and_reads_back(model, tmp_path):
    tr = synthesize(small(model, length_jitter=0.5, lookahead_depth=3), seed=11)
    back = read_trace(write_trace(tr, tmp_path / f"{model}.parquet"))  # the validating path
    assert back.equals(tr)
    s = tr.shape
    assert s == shape_for(model)
    assert sorted(tr.lookahead) == [1, 2, 3]
    # lookahead null exactly where l+d is not an MoE layer, set elsewhere
    valid = tr.valid_mask()
    for d in (1, 2, 3):
        tgt = tr.lookahead_target(d)
        for m in range(s.num_moe_layers):
            col = tr.lookahead[d][:, :, m][valid]
            assert (col < 0).all() if tgt[m] < 0 else (col >= 0).all()
    # phases and steps: prefill tokens share step 0, decode steps 1..
    P = tr.prefill_lengths()
    for r in range(tr.num_requests):
        n, p = int(tr.lengths[r]), int(P[r])
        assert (tr.step[r, :p] == 0).all() and tr.step[r, p:n].tolist() == list(range(1, n - p + 1))
        assert tr.position[r, :n].tolist() == list(range(n))
    # gate weights: positive, descending, softmax-like
    w = tr.gate_weights[valid]
    assert (w > 0).all() and (np.diff(w, axis=-1) <= 0).all()
    tot = w.sum(-1)
    if synth_params_for(model).gate_renormalize:
        np.testing.assert_allclose(tot, 1.0, rtol=1e-5)
    else:
        assert (tot < 1.0).all()
    # the metadata records every dial and the seed, and no date
    meta = tr.meta
    assert meta["synth"]["seed"] == 11
    assert meta["synth"]["params"] == small(model, length_jitter=0.5, lookahead_depth=3).to_meta()
    assert meta["provenance"]["generator"] == "traces.synth" and meta["provenance"]["date"] is None


def test_determinism_and_independent_streams():
    p = small("qwen1.5-moe-a2.7b")
    a, b = synthesize(p, 5), synthesize(p, 5)
    assert a.equals(b)
    c = synthesize(p, 6)
    assert not c.equals(a) and not np.array_equal(c.expert_ids, a.expert_ids)
    # changing a predictor dial leaves the routing itself untouched
    d = synthesize(dataclasses.replace(p, acceptance=0.3, draft_agreement=0.5, lookahead_recall=0.6), 5)
    assert np.array_equal(d.expert_ids, a.expert_ids) and np.array_equal(d.gate_weights, a.gate_weights, equal_nan=True)
    assert not np.array_equal(d.draft_match, a.draft_match)
    e = synthesize(dataclasses.replace(p, draft=False, lookahead_depth=0), 5)
    assert e.draft is None and e.lookahead == {} and np.array_equal(e.expert_ids, a.expert_ids)


def test_bad_dials_are_named():
    with pytest.raises(TraceError, match=r"SynthParams.reuse"):
        synthesize(dataclasses.replace(small("tiny"), reuse=(0.1, 1.2, 0.3)), 0)
    with pytest.raises(TraceError, match=r"SynthParams.requests"):
        synthesize(dataclasses.replace(small("tiny"), requests=0), 0)
    with pytest.raises(TraceError, match=r"SynthParams.acceptance"):
        synthesize(dataclasses.replace(small("tiny"), acceptance=-0.1), 0)
    with pytest.raises(TraceError, match="seed"):
        synthesize(small("tiny"), -1)
    with pytest.raises(TraceError, match="num_experts >= 2 \\* top_k"):
        synthesize(small("tiny"), 0, shape=ModelShape("wide", 2, (0, 1), 6, 4))
    # a custom shape (depth-reduced) works
    tr = synthesize(small("mixtral-8x7b"), 0, shape=ModelShape("mixtral-4l", 4, (0, 1, 2, 3), 8, 2))
    assert tr.expert_ids.shape[2] == 4


def test_depth_profile():
    prof = depth_profile((0.1, 0.5, 0.3), 10)
    assert prof[0] == pytest.approx(0.1) and prof[-1] == pytest.approx(0.3)
    mid = prof[4:6]
    assert (mid == pytest.approx(0.5)) and prof.argmax() in range(3, 7)
    assert (np.diff(prof[:4]) > 0).all() and (np.diff(prof[6:]) < 0).all()
    assert depth_profile(0.2, 1).tolist() == [0.2]


def test_cli(tmp_path, capsys):
    p = argparse.ArgumentParser()
    synth.add_arguments(p)
    out = tmp_path / "t.parquet"
    args = p.parse_args(["--model", "tiny", "-o", str(out), "--requests", "2", "--prompt-tokens", "4",
                         "--decode-tokens", "8", "--reuse", "0.3", "--hot-share", "0.3,0.5,0.4", "--no-draft",
                         "--lookahead-depth", "1", "--seed", "3"])
    assert synth.run(args) == 0
    assert "synthetic tiny trace" in capsys.readouterr().out
    tr = read_trace(out)
    prm = tr.meta["synth"]["params"]
    assert prm["reuse"] == [0.3, 0.3, 0.3] and prm["hot_share"] == [0.3, 0.5, 0.4]
    assert prm["requests"] == 2 and tr.draft is None and sorted(tr.lookahead) == [1]
    expect = dataclasses.replace(synth_params_for("tiny"), requests=2, prompt_tokens=4, decode_tokens=8,
                                 reuse=(0.3, 0.3, 0.3), hot_share=(0.3, 0.5, 0.4), draft=False, lookahead_depth=1)
    assert tr.equals(synthesize(expect, 3))


# ------------------------------------------------------------ dials vs measured
def se_binom(p: float, k: int, n: int) -> float:
    return math.sqrt(p * (1 - p) / (k * n))


def se_hot(h: float, rho: float, k: int, chain_lengths: np.ndarray) -> float:
    var = 0.0
    for n in chain_lengths:
        n = int(n)
        lags = np.arange(1, n)
        var += k * h * (1 - h) * (n + 2 * float(((n - lags) * rho**lags).sum()))
    return math.sqrt(var) / (k * float(chain_lengths.sum()))


DIAL_SIZE = dict(requests=6, prompt_tokens=16, decode_tokens=256)


@pytest.fixture(scope="module")
def dial_traces():
    return {
        m: synthesize(dataclasses.replace(synth_params_for(m), lookahead_depth=3, **DIAL_SIZE), seed=2024)
        for m in PRESETS
    }


@pytest.mark.parametrize("model", list(PRESETS))
def test_measured_statistics_match_dials(model, dial_traces):
    tr = dial_traces[model]
    p = dataclasses.replace(synth_params_for(model), lookahead_depth=3, **DIAL_SIZE)
    s = tr.shape
    k, M = s.top_k, s.num_moe_layers
    sel = stats.select_tokens(tr, "decode")
    report = []

    # reuse, per layer and overall
    rho = depth_profile(p.reuse, M)
    r = stats.reuse(sel, 1)
    for m in range(M):
        se = se_binom(rho[m], k, int(r.den[m]))
        assert abs(r.per_layer[m] - rho[m]) <= Z * se + 1e-12, (model, "reuse", m, r.per_layer[m], rho[m], se)
    se_all = math.sqrt(sum(rho[m] * (1 - rho[m]) / (k * r.den[m]) for m in range(M))) / M
    assert abs(r.overall - rho.mean()) <= Z * se_all
    report.append(("reuse", rho.mean(), r.overall, se_all))

    # lookahead recall per depth (decays towards chance), draft agreement
    rec = stats.predictor_recall(sel)
    for d in (1, 2, 3):
        want = synth.lookahead_recall_at(p, d, s)
        got = rec[f"lookahead_{d}"]
        se = se_binom(want, k, int(got.den.sum()))
        assert abs(got.overall - want) <= Z * se, (model, d, got.overall, want, se)
        report.append((f"lookahead_{d}", want, got.overall, se))
    assert synth.lookahead_recall_at(p, 1, s) > synth.lookahead_recall_at(p, 2, s) > synth.lookahead_recall_at(p, 3, s)
    # draft: exact set agreement is the dial; per-id recall follows (one wrong id per disagreeing row)
    agree, wrong_ids = stats.draft_agreement(sel)
    n_rows = int(agree.den.sum())
    se = math.sqrt(p.draft_agreement * (1 - p.draft_agreement) / n_rows)
    assert abs(agree.overall - p.draft_agreement) <= Z * se
    assert wrong_ids == p.draft_wrong_ids == 1.0
    want = 1 - (1 - p.draft_agreement) * p.draft_wrong_ids / k
    got = rec["draft"]
    assert abs(got.overall - want) <= Z * math.sqrt(p.draft_agreement * (1 - p.draft_agreement) / n_rows) / k
    report.append(("draft_set_agreement", p.draft_agreement, agree.overall, se))

    # acceptance
    n = sel.tokens
    se = math.sqrt(p.acceptance * (1 - p.acceptance) / n)
    acc = stats.acceptance(sel)
    assert abs(acc - p.acceptance) <= Z * se
    report.append(("acceptance", p.acceptance, acc, se))
    assert abs(stats.acceptance_corr(sel)) <= Z / math.sqrt(n)  # preset: i.i.d.
    print(model, [(name, round(a, 4), round(b, 4), round(c, 4)) for name, a, b, c in report])


@pytest.mark.parametrize("model", list(PRESETS))
def test_hot_share_matches_dial(model):
    p = dataclasses.replace(synth_params_for(model), drift=0.0, requests=4, prompt_tokens=8, decode_tokens=192)
    tr, st = synthesize_with_internals(p, seed=7)
    s = tr.shape
    E, k, M = s.num_experts, s.top_k, s.num_moe_layers
    q = synth.hot_set_size(E)
    exact = q >= 2 * k and E - q >= 2 * k
    valid = tr.valid_mask()
    for m in range(M):
        ids = tr.expert_ids[:, :, m].astype(np.int64)
        hot = st.hot[:, m, 0]  # (R, E): drift 0 keeps the first segment's set
        in_hot = np.take_along_axis(hot[:, None, :].repeat(ids.shape[1], 1), np.maximum(ids, 0), axis=2)
        share = in_hot[valid].mean()
        h, rho = st.hot_share[m], st.reuse[m]
        se = se_hot(h, rho, k, tr.lengths)
        if exact:
            assert abs(share - h) <= Z * se, (model, m, share, h, se)
        else:
            assert share - h <= Z * se, (model, m, share, h, se)
    # stats' top quarter is at least the hot set's share in any window (it is the top ceil(E/4))
    pop = stats.popularity(tr, skew_window=64, phase="all")
    hs = depth_profile(p.hot_share, M)
    ses = np.array([se_hot(hs[m], st.reuse[m], k, tr.lengths) for m in range(M)])
    if exact:
        assert (pop["top_quarter_window"] >= hs - Z * ses).all()


def test_hot_sets_drift_by_the_dial():
    p = dataclasses.replace(synth_params_for("qwen3-30b-a3b"), drift=0.3, segment_tokens=16, requests=4,
                            prompt_tokens=16, decode_tokens=240)
    _, st = synthesize_with_internals(p, seed=1)
    hot = st.hot  # (R, M, S, E)
    q = synth.hot_set_size(128)
    assert (hot.sum(-1) == q).all()
    stayed = (hot[:, :, 1:] & hot[:, :, :-1]).sum(-1)  # members kept across each boundary
    trials = hot[:, :, :-1].sum()
    frac_replaced = 1 - stayed.sum() / trials
    assert abs(frac_replaced - 0.3) <= Z * math.sqrt(0.3 * 0.7 / trials)


@pytest.mark.parametrize("model", ["qwen3-30b-a3b", "qwen1.5-moe-a2.7b", "deepseek-v2-lite"])
def test_cooccurrence_predictor_beats_chance_on_fine_grained(model, dial_traces):
    tr = dial_traces[model]
    co, pop = stats.cooccurrence_recall(tr)
    chance = tr.shape.top_k / tr.shape.num_experts
    assert co.overall >= 2.5 * chance, (co.overall, chance)
    assert co.overall > pop.overall


def test_draft_and_acceptance_dials():
    """Set agreement and wrong ids per disagreeing row are dials, per-id recall follows; acceptance
    is a two-state Markov chain with the dialled stationary mean and lag-1 correlation."""
    p = dataclasses.replace(synth_params_for("qwen1.5-moe-a2.7b"), requests=8, prompt_tokens=4, decode_tokens=512,
                            draft_agreement=0.7, draft_wrong_ids=2.5, acceptance=0.8, acceptance_corr=0.5)
    tr = synthesize(p, 3)
    sel = stats.select_tokens(tr, "decode")
    k = tr.shape.top_k
    agree, wrong = stats.draft_agreement(sel)
    n = int(agree.den.sum())
    assert abs(agree.overall - 0.7) <= Z * math.sqrt(0.7 * 0.3 / n)
    assert abs(wrong - 2.5) <= 0.05  # j = 1 + Binomial(3, 0.5): sd 0.87 over ~0.3 n rows
    assert abs(stats.predictor_recall(sel)["draft"].overall - (1 - 0.3 * 2.5 / k)) <= 0.01
    t = sel.tokens
    # a Markov chain's mean has variance inflated by (1 + rho) / (1 - rho) = 3
    assert abs(stats.acceptance(sel) - 0.8) <= Z * math.sqrt(0.8 * 0.2 * 3 / t)
    assert abs(stats.acceptance_corr(sel) - 0.5) <= Z / math.sqrt(t)
    # the routing does not move with the draft dials (own streams)
    base = synthesize(dataclasses.replace(p, draft_agreement=0.9, acceptance_corr=0.0), 3)
    assert np.array_equal(base.expert_ids, tr.expert_ids)


@pytest.mark.parametrize("field, value", [("acceptance_corr", 1.5), ("acceptance_corr", -0.1),
                                          ("draft_wrong_ids", 0.5), ("draft_wrong_ids", 5.0),
                                          ("draft_agreement", 1.2)])
def test_draft_dials_range_checked(field, value):
    with pytest.raises(TraceError, match=rf"SynthParams.{field}"):
        synthesize(dataclasses.replace(small("qwen1.5-moe-a2.7b"), **{field: value}), 0)


def test_with_draft_draws_exactly_the_generators_draft_columns():
    """A trace without draft columns gets, from the same dials and seed, the very draft columns the
    generator writes (the speculation map and stand-in drafts rely on it)."""
    p = dataclasses.replace(small("qwen1.5-moe-a2.7b"), length_jitter=0.3, acceptance=0.7, acceptance_corr=0.2)
    a = synthesize(p, 4)
    b = synth.with_draft(synthesize(dataclasses.replace(p, draft=False), 4), p, 4)
    assert np.array_equal(a.draft, b.draft) and np.array_equal(a.draft_match, b.draft_match)
    assert b.meta["draft_stand_in"]["acceptance"] == 0.7
    with pytest.raises(TraceError, match="already carries draft columns"):
        synth.with_draft(a, p, 4)
