"""Speculation governors: the Amortization Roofline governor picks the argmax, respects k_SLO,
reacts to acceptance, tracks p_j by warm-up mean then EMA (checked by hand); fixed returns k; bad
configs name their field; presets compose through Hydra."""

from __future__ import annotations

import math
import random
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sim.errors import SimError
from sim.governor import (
    GOVERNORS,
    AcceptanceTracker,
    CycleCosts,
    GovernorConf,
    build_governor,
    cycle_model_error,
    expected_accepted,
)
from sim.config import register_configs
from sim.presets import conf_dir

MS = 1e-3


def quad_costs(**kw) -> CycleCosts:
    """T_cycle(k) = 15 + 2k + k^2 ms (exposed reading): draft 1 ms/token, verify 15 ms + 1 ms per
    extra position, k^2 new experts of 1 ms each. With p = 1, Θ(k) = k / T_cycle(k) peaks at
    k = 4 (102.6 tok/s; k = 3 and k = 5 give 100)."""
    d = dict(
        t_draft=lambda k: 1 * MS * k, t_verify=lambda n: 15 * MS + 1 * MS * (n - 1), t_pcie_init=0.0,
        t_overhead=0.0, expert_transfer_s=1 * MS, new_experts=lambda k: k * k,
    )
    d.update(kw)
    return CycleCosts(**d)


def roofline(**kw):
    conf = dict(name="roofline", k_min=1, k_max=8, warmup_cycles=0, prior_accept=1.0)
    conf.update(kw)
    return build_governor(conf)


# ------------------------------------------------------------------ formulas
def test_expected_accepted_by_hand() -> None:
    p = [0.9, 0.8, 0.5]
    assert expected_accepted(p, 0) == 0.0
    assert expected_accepted(p, 1) == pytest.approx(0.9)
    assert expected_accepted(p, 3) == pytest.approx(0.9 + 0.72 + 0.36)


def test_cycle_time_exposed_and_overlapped_by_hand() -> None:
    g = roofline(pcie_new="exposed")
    costs = CycleCosts(
        t_draft=lambda k: 2 * MS * k, t_verify=lambda n: 10 * MS + MS * n, t_pcie_init=3 * MS, t_overhead=0.5 * MS,
        expert_transfer_s=1 * MS, new_experts=lambda k: [1, 3, 4, 8][k],
    )
    (pr,) = g.predict(costs, [3], [1.0, 1.0, 1.0])
    # exposed: max(6, 3) + 0.5 + 8 * 1 + (10 + 4) = 28.5 ms
    assert pr.cycle_exposed_s == pytest.approx(28.5 * MS)
    assert pr.t_pcie_new == pytest.approx(8.5 * MS)
    # overlapped: link free at L0 = 3 + 0.5 + 1 = 4.5; token 1 known at 2: L1 = 4.5 + 2 = 6.5;
    # token 2 known at 4: L2 = 6.5 + 1 = 7.5; token 3 known at 6: L3 = 7.5 + 4 = 11.5;
    # cycle = max(6, 11.5) + 14 = 25.5 ms
    assert pr.cycle_overlapped_s == pytest.approx(25.5 * MS)
    assert pr.cycle_s == pr.cycle_exposed_s
    (pr2,) = roofline(pcie_new="overlapped").predict(costs, [3], [1.0] * 3)
    assert pr2.cycle_s == pytest.approx(25.5 * MS)


@given(
    td=st.floats(0, 0.05), tt=st.floats(0, 0.01), init=st.floats(0, 0.05), ovh=st.floats(0, 0.01),
    x=st.floats(0, 0.01), inc=st.lists(st.integers(0, 20), min_size=9, max_size=9),
)
def test_overlapped_never_exceeds_exposed(td, tt, init, ovh, x, inc) -> None:
    n = [sum(inc[: i + 1]) for i in range(9)]
    costs = CycleCosts(t_draft=lambda k: td + tt * k, t_verify=lambda m: 0.01 * m, t_pcie_init=init, t_overhead=ovh,
                       expert_transfer_s=x, new_experts=lambda k: n[k])
    for pr in roofline(k_min=0).predict(costs, range(0, 9)):
        assert pr.cycle_overlapped_s <= pr.cycle_exposed_s + 1e-12
        assert pr.cycle_overlapped_s >= max(pr.t_draft, init) + pr.t_verify - 1e-12


# ------------------------------------------------------------------ choosing k
def test_roofline_picks_the_known_optimum() -> None:
    d = roofline().decide(quad_costs())
    assert d.k == 4
    assert d.predicted_cycle_s == pytest.approx(39 * MS)
    assert d.predicted_accept == pytest.approx(4.0)
    assert d.k_slo == 8 and d.slo_met
    assert [c.k for c in d.candidates] == list(range(1, 9))
    assert max(d.candidates, key=lambda c: c.throughput).k == 4


def brute_force(p, costs, lo, hi, objective, budget_s):
    best, best_v = None, -1.0
    for k in range(lo, hi + 1):
        td = costs.t_draft(k) if k else 0.0
        # same order of operations as the governor, so near-ties break the same way
        t = max(td, costs.t_pcie_init) + (costs.t_overhead + costs.new_experts(k) * costs.expert_transfer_s) \
            + costs.t_verify(k + 1)
        acc = sum(math.prod(p[:i]) for i in range(1, k + 1))
        if budget_s is not None and t > budget_s:
            break  # the test's T_cycle grows with k: the first violation ends the SLO range
        v = (acc + (objective == "emitted")) / t
        if v > best_v:
            best, best_v = k, v
    return best


@given(
    p=st.lists(st.floats(0.05, 1.0), min_size=8, max_size=8),
    base=st.floats(0.001, 0.05), per_tok=st.floats(0.0, 0.01), ver=st.floats(0.001, 0.05),
    ver_tok=st.floats(0.0, 0.01), x=st.floats(0.0, 0.01), per_k=st.integers(0, 12), init=st.floats(0, 0.03),
    objective=st.sampled_from(["accepted", "emitted"]), k_min=st.integers(0, 3),
    budget_ms=st.one_of(st.none(), st.floats(20, 300)),
)
def test_roofline_matches_brute_force(p, base, per_tok, ver, ver_tok, x, per_k, init, objective, k_min,
                                      budget_ms) -> None:
    costs = CycleCosts(t_draft=lambda k: base + per_tok * k, t_verify=lambda n: ver + ver_tok * n, t_pcie_init=init,
                       t_overhead=0.0005, expert_transfer_s=x, new_experts=lambda k: per_k * k)
    g = roofline(k_min=k_min, objective=objective, latency_budget_ms=budget_ms)
    g.tracker._p = list(p)  # set the estimates directly (warm-up 0: EMA state)
    d = g.decide(costs)
    want = brute_force(p, costs, k_min, 8, objective, None if budget_ms is None else budget_ms / 1e3)
    if want is None:  # nothing meets the budget: the smallest k, flagged
        assert d.k == k_min and not d.slo_met
    else:
        assert d.k == want


def test_k_under_each_cap_by_hand() -> None:
    """quad_costs: T_cycle(k) = 15 + 2k + k^2 ms, p = 1, so Θ(k) = k / T_cycle(k) peaks at k = 4."""
    # no cap (the preset's default): the argmax over the whole range [1, 16]
    d = roofline(k_max=16).decide(quad_costs())
    assert (d.k, d.k_slo, d.slo_met) == (4, 16, True)
    # slo = cycle, 35 ms: 15 + 2k + k^2 <= 35 -> k <= 3 (k = 4 gives 39 ms)
    d = roofline(k_max=16, slo="cycle", latency_budget_ms=35).decide(quad_costs())
    assert (d.k, d.k_slo) == (3, 3)
    # slo = per_token, 8 ms: (15 + 2k + k^2) / (k + 1) <= 8 -> k = 4 (7.8 ms) is the largest (k = 5: 8.33)
    d = roofline(k_max=16, slo="per_token", latency_budget_ms=8).decide(quad_costs())
    assert (d.k, d.k_slo) == (4, 4)
    # slo = ttft, 35 ms with a 10 ms prefill: 10 + 15 + 2k + k^2 <= 35 -> k^2 + 2k <= 10 -> k <= 2
    g = roofline(k_max=16, slo="ttft", latency_budget_ms=35)
    d = g.decide(quad_costs(t_prefill=10 * MS))
    assert (d.k, d.k_slo, d.slo_met) == (2, 2, True)
    g.observe(2, 2, 0.03)
    # ... computed once: with no new experts T_cycle(k) = 15 + 2k ms; every cycle's cap would allow
    # k <= 10 (slo = cycle), the TTFT cap stays at 2
    cheap = quad_costs(new_experts=lambda k: 0, t_prefill=10 * MS)
    assert g.decide(cheap).k == 2
    assert roofline(k_max=16, slo="cycle", latency_budget_ms=35).decide(cheap).k_slo == 10


def test_ttft_cap_spans_the_whole_range_even_when_the_first_request_is_short() -> None:
    g = roofline(k_max=16, slo="ttft", latency_budget_ms=35)
    d = g.decide(quad_costs(k_limit=1, t_prefill=10 * MS))
    assert (d.k, d.k_slo) == (1, 1)  # capped by the host's k_limit now...
    g.observe(1, 1, 0.02)
    assert g.decide(quad_costs(t_prefill=10 * MS)).k_slo == 2  # ...but the cap was computed over [1, 16]


def test_roofline_respects_k_slo_cycle_budget() -> None:
    # T_cycle: k=3 30 ms, k=4 39 ms: a 35 ms budget caps k at 3
    d = roofline(latency_budget_ms=35).decide(quad_costs())
    assert (d.k_slo, d.k) == (3, 3)
    assert d.slo_met and d.predicted_cycle_s <= 35 * MS


def test_roofline_per_token_budget() -> None:
    # per token (p = 1): T(k) / (k + 1): k=4 7.8 ms, k=5 8.33, k=6 9.0; k=1 9.0 (violates, but a larger k fits)
    d = roofline(latency_budget_ms=8.5, slo="per_token").decide(quad_costs())
    assert (d.k_slo, d.k) == (5, 4)  # does not bind below the throughput optimum
    d = roofline(latency_budget_ms=8.0, slo="per_token").decide(quad_costs())
    assert (d.k_slo, d.k) == (4, 4)


def test_no_k_meets_the_budget() -> None:
    d = roofline(k_min=2, latency_budget_ms=1).decide(quad_costs())
    assert d.k == 2 and d.k_slo == 2 and not d.slo_met


def test_k_limit_from_the_host() -> None:
    d = roofline().decide(quad_costs(k_limit=2))
    assert d.k == 2 and max(c.k for c in d.candidates) == 2
    d = roofline(k_min=3).decide(quad_costs(k_limit=1))
    assert d.k == 1
    assert build_governor({"name": "fixed", "k": 6}).decide(quad_costs(k_limit=3)).k == 3


def test_emitted_objective_can_choose_autoregressive() -> None:
    # acceptance 0: drafting only costs time; with the bonus token, k = 0 wins
    g = roofline(k_min=0, objective="emitted", prior_accept=0.0)
    assert g.decide(quad_costs()).k == 0
    # as printed (accepted tokens only) every k scores 0: the tie goes to the smallest k
    g = roofline(k_min=0, objective="accepted", prior_accept=0.0)
    assert g.decide(quad_costs()).k == 0


def test_fixed_returns_k() -> None:
    for k in (0, 1, 4, 12):
        g = build_governor({"name": "fixed", "k": k})
        for _ in range(3):
            d = g.decide(quad_costs())
            assert d.k == k and d.phase == "fixed"
            g.observe(k, 0, 0.05)
    d = build_governor({"name": "fixed", "k": 4, "prior_accept": 1.0, "warmup_cycles": 0}).decide(quad_costs())
    assert d.predicted_cycle_s == pytest.approx(39 * MS) and d.predicted_accept == pytest.approx(4)


def draw_accepted(rng: random.Random, k: int, q: float) -> int:
    a = 0
    while a < k and rng.random() < q:
        a += 1
    return a


def test_roofline_reacts_when_acceptance_drops() -> None:
    g = build_governor({"name": "roofline", "k_min": 1, "k_max": 8, "warmup_cycles": 4, "ema_alpha": 0.2,
                        "prior_accept": 0.8})
    rng = random.Random(7)
    ks = []
    for c in range(160):
        q = 0.95 if c < 80 else 0.4
        d = g.decide(quad_costs())
        g.observe(d.k, draw_accepted(rng, d.k, q), d.predicted_cycle_s)
        ks.append(d.k)
    assert ks[:4] == [8] * 4  # warm-up at the top of the range
    before, after = ks[40:80], ks[120:]
    assert min(before) >= 3
    assert max(after) < min(before)
    assert sum(after) / len(after) <= 2.5
    p = g.tracker.estimates()
    assert p[0] < 0.6


def test_warmup_k_and_slo_during_warmup() -> None:
    g = roofline(warmup_cycles=2, warmup_k=6)
    assert g.decide(quad_costs()).k == 6
    g = roofline(warmup_cycles=2, latency_budget_ms=35)
    d = g.decide(quad_costs())
    assert d.phase == "warmup" and d.k == 3  # the top of the SLO range


# ------------------------------------------------------------------ acceptance tracking
def test_warmup_mean_then_ema_by_hand() -> None:
    t = AcceptanceTracker(positions=4, alpha=0.25, warmup_cycles=2, prior=0.5)
    assert t.estimates() == [0.5] * 4 and t.in_warmup
    t.update(3, 3)  # positions 1-3 accepted
    assert t.estimates() == [1.0, 1.0, 1.0, 0.5]
    t.update(3, 1)  # 1 accepted, 2 rejected, 3 censored
    assert not t.in_warmup
    assert t.estimates() == [1.0, 0.5, 1.0, 0.5]  # 2/2, 1/2, 1/1, prior
    t.update(3, 0)  # 1 rejected
    assert t.estimates() == [0.75, 0.5, 1.0, 0.5]
    t.update(3, 2)  # 1, 2 accepted, 3 rejected
    assert t.estimates() == pytest.approx([0.8125, 0.625, 0.75, 0.5])
    t.update(0, 0)  # k = 0 teaches nothing
    assert t.cycles == 4


def test_no_warmup_starts_from_the_prior() -> None:
    t = AcceptanceTracker(positions=2, alpha=0.5, warmup_cycles=0, prior=0.6)
    t.update(2, 0)
    assert t.estimates() == pytest.approx([0.3, 0.6])


def test_shared_acceptance_pools_positions() -> None:
    t = AcceptanceTracker(positions=3, alpha=0.5, warmup_cycles=1, prior=0.5, shared=True)
    t.update(3, 1)  # observations 1, 0: mean 0.5
    assert t.estimates() == [0.5, 0.5, 0.5]
    t.update(2, 2)  # two accepted observations: 0.75, then 0.875
    assert t.estimates(2) == pytest.approx([0.875, 0.875])


def test_tracker_grows_past_its_positions() -> None:
    t = AcceptanceTracker(positions=2, alpha=1.0, warmup_cycles=0, prior=0.5)
    t.update(4, 4)
    assert t.estimates() == [1.0] * 4


# ------------------------------------------------------------------ log
def test_log_records_every_decision_and_observation(tmp_path: Path) -> None:
    g = roofline(warmup_cycles=1)
    d = g.decide(quad_costs())
    assert g.log()[-1]["observed_cycle_s"] is None
    g.observe(d.k, 2, 0.05)
    d2 = g.decide(quad_costs())
    g.observe(d2.k, 1, 0.04)
    g.observe(3, 3, 0.03)  # an observation without a decision (e.g. a replayed log)
    log = g.log()
    assert len(log) == 3
    e0 = log[0]
    for key in ("cycle", "phase", "k", "k_slo", "predicted_cycle_s", "predicted_cycle_exposed_s",
                "predicted_cycle_overlapped_s", "predicted_accept", "p", "observed_cycle_s", "accepted",
                "candidate_k", "candidate_cycle_s", "new_experts", "t_pcie_new"):
        assert key in e0
    assert (e0["k"], e0["observed_k"], e0["accepted"], e0["observed_cycle_s"]) == (d.k, d.k, 2, 0.05)
    assert e0["phase"] == "warmup" and log[1]["phase"] == "ema"
    assert len(e0["p"]) == 8
    assert log[2]["k"] is None and log[2]["observed_k"] == 3
    assert [e["cycle"] for e in log] == [0, 1, 2]
    import pandas as pd

    pd.DataFrame(log).to_parquet(tmp_path / "log.parquet")  # the log is a table the driver can write


def test_cycle_model_error() -> None:
    log = [
        {"k": 2, "observed_k": 2, "observed_cycle_s": 0.10, "predicted_cycle_exposed_s": 0.12,
         "predicted_cycle_overlapped_s": 0.10},
        {"k": 2, "observed_k": 2, "observed_cycle_s": 0.20, "predicted_cycle_exposed_s": 0.20,
         "predicted_cycle_overlapped_s": 0.18},
        {"k": 3, "observed_k": 1, "observed_cycle_s": 0.5, "predicted_cycle_exposed_s": 9,
         "predicted_cycle_overlapped_s": 9},  # host changed k: not comparable
    ]
    err = cycle_model_error(log)
    assert err["exposed"]["n"] == 2
    assert err["exposed"]["mape"] == pytest.approx(0.1)
    assert err["exposed"]["bias"] == pytest.approx(0.1)
    assert err["overlapped"]["mape"] == pytest.approx(0.05)
    assert err["overlapped"]["bias"] == pytest.approx(-0.05)


def test_same_inputs_same_decisions() -> None:
    def run():
        g = roofline(warmup_cycles=3, prior_accept=0.7)
        rng = random.Random(3)
        for _ in range(30):
            d = g.decide(quad_costs())
            g.observe(d.k, draw_accepted(rng, d.k, 0.8), d.predicted_cycle_s * 1.1)
        return g.log()

    assert run() == run()


# ------------------------------------------------------------------ bad input
@pytest.mark.parametrize("conf, field", [
    ({"name": "roofline", "k_min": 5, "k_max": 3}, "k_min"),
    ({"name": "fixed", "k": -1}, "k"),
    ({"name": "roofline", "k_min": -1}, "k_min"),
    ({"name": "roofline", "ema_alpha": 0.0}, "ema_alpha"),
    ({"name": "roofline", "ema_alpha": 1.5}, "ema_alpha"),
    ({"name": "roofline", "prior_accept": 1.2}, "prior_accept"),
    ({"name": "roofline", "warmup_cycles": -2}, "warmup_cycles"),
    ({"name": "roofline", "latency_budget_ms": 0}, "latency_budget_ms"),
    ({"name": "roofline", "latency_budget_ms": "soon"}, "latency_budget_ms"),
    ({"name": "roofline", "objective": "tokens"}, "objective"),
    ({"name": "roofline", "pcie_new": "hidden"}, "pcie_new"),
    ({"name": "roofline", "slo": "prefill"}, "slo"),
    ({"name": "roofline", "acceptance": "bayes"}, "acceptance"),
    ({"name": "roofline", "warmup_k": 20}, "warmup_k"),
    ({"name": "fixed", "k": 2.5}, "k"),
    ({"name": "roofline", "kmax": 3}, "kmax"),
    ({"name": "adaptive"}, "adaptive"),
])
def test_bad_configs_name_the_field(conf, field) -> None:
    with pytest.raises(SimError, match=field):
        build_governor(conf)


def test_bad_observations_and_costs() -> None:
    g = roofline()
    with pytest.raises(SimError, match="accepted"):
        g.observe(2, 3, 0.1)
    with pytest.raises(SimError, match="accepted"):
        g.observe(2, -1, 0.1)
    with pytest.raises(SimError, match="observed_cycle_s"):
        g.observe(2, 1, float("nan"))
    with pytest.raises(SimError, match="new_experts"):
        g.decide(quad_costs(new_experts=lambda k: -1))
    with pytest.raises(SimError, match="t_verify"):
        g.decide(quad_costs(t_verify=lambda n: float("inf")))


def test_registry() -> None:
    assert GOVERNORS.names() == ["fixed", "roofline"]
    assert build_governor(GovernorConf(name="roofline")).name == "roofline"


# ------------------------------------------------------------------ Hydra presets
def test_presets_compose_through_hydra(tmp_path: Path) -> None:
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    (tmp_path / "config.yaml").write_text(
        f"defaults:\n  - governor: roofline\n  - _self_\nhydra:\n  searchpath:\n    - file://{conf_dir()}\n"
    )
    register_configs()
    register_configs()  # idempotent
    with initialize_config_dir(config_dir=str(tmp_path), version_base="1.3"):
        cfg = compose(config_name="config")
        fixed = compose(config_name="config", overrides=["governor=fixed", "governor.k=6"])
        with pytest.raises(Exception):
            compose(config_name="config", overrides=["governor.k_max=lots"])  # the schema types it
    assert OmegaConf.missing_keys(cfg.governor) == set()
    g = build_governor(cfg.governor)
    assert (g.name, g.k_min, g.k_max, g.latency_budget_ms, g.pcie_new, g.objective, g.slo) == (
        "roofline", 1, 16, None, "exposed", "accepted", "ttft")
    f = build_governor(fixed.governor)
    assert f.name == "fixed" and f.k == 6
    assert sorted(p.stem for p in (conf_dir() / "governor").glob("*.yaml")) == ["fixed", "roofline"]


def test_governor_imports_nothing_heavy() -> None:
    code = ("import sys, sim.governor; bad = [m for m in ('simpy', 'torch', 'matplotlib', 'pandas') "
            "if m in sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parent.parent)


def test_governor_choice_benchmark_runs_and_refuses_to_overwrite(tmp_path) -> None:
    """benchmarks/governor_choice.py: every shape, engine and variant has a row, the table names the
    best fixed k of each, and a second run into the same folder is refused (nothing overwritten)."""
    import pandas as pd

    from benchmarks.governor_choice import SHAPES, VARIANTS, main

    assert main(["--ks", "1,2", "--decode-tokens", "12", "--hardware", "h100-sxm", "--out", str(tmp_path)]) == 0
    df = pd.read_parquet(tmp_path / "governor_choice.parquet")
    assert len(df) == len(SHAPES) * 2 * (len(VARIANTS) + 2) and df.tpot_ms.gt(0).all()
    md = (tmp_path / "governor_choice.md").read_text()
    assert md.count("| k=") == len(SHAPES) * 2 and all(s in md for s in SHAPES)  # one best k per shape, engine
    before = md
    assert main(["--ks", "1", "--out", str(tmp_path)]) == 2
    assert (tmp_path / "governor_choice.md").read_text() == before
