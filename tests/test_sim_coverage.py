"""Coverage metrics (docs/metrics.md), hand-computed: coverage_ready, coverage_requested, experts
fetched per emitted token, and the ELB recall of a speculative run."""

from __future__ import annotations

import pytest

from sim.policies.base import Fetch, PrefetchPolicy
from sim.metrics import results_row, speculative_metrics
from sim.run import bound_for
from sim.engine import Simulation
from sim.policies import EVICTION
from sim.schedule import Schedule
from test_sim_engine import FixedCost, make_hw, make_model, make_trace


class FetchAtFirstDecode(PrefetchPolicy):
    """Asks for keys 4 and 5 (layer 1, experts 0 and 1) as the first decode step starts."""

    name = "test-fetch"

    def on_layer_start(self, ls):
        return [Fetch(4, 1), Fetch(5, 1)] if (ls.step, ls.m) == (1, 0) else []


def test_coverage_ready_and_requested_by_hand():
    """E = 4, top-2, two MoE layers, 8 slots, one copy in flight, 10 ms per copy, 1 ms attention.

    prefill  L0 {0,1}   L1 {6,7}    (not counted: coverage is over decode and verify passes)
    t1       L0 {0,1}   L1 {4,5}    L0 both resident: ready 2/2. L1: 4 loading (issued at t1's
                                    start, 10 ms), 5 queued behind it: ready 0/2, requested 2/2
    t2       L0 {2,3}   L1 {4,5}    L0 absent: 0/2, 0/2. L1 resident: 2/2, 2/2
    coverage_ready = (1 + 0 + 0 + 1) / 4 = 0.5; coverage_requested = (1 + 1 + 0 + 1) / 4 = 0.75.
    Copies: 4 in prefill, 2 prefetched, 2 on demand at t2 -> (8 - 4) / 2 decode tokens = 2 per token.
    """
    model = make_model(num_layers=2, moe_layers=(0, 1), E=4, k=2)
    hw = make_hw(copies_in_flight=1)
    cost = FixedCost(model, hw, attn=1e-3, expert=0.5e-3, h2d=10e-3)
    trace = make_trace(model, [[[[0, 1], [2, 3]], [[0, 1], [0, 1]], [[2, 3], [0, 1]]]], prefill=[1])
    sch = Schedule(trace, model, cost)
    sim = Simulation(sch, model, hw, cost, eviction=EVICTION.create("lru"), prefetch=FetchAtFirstDecode(), slots=8)
    log = sim.run()
    assert log.coverage_layers == 4
    assert log.coverage_ready_sum / 4 == 0.5 and log.coverage_requested_sum / 4 == 0.75
    assert (log.copies, log.prefill_copies) == (8, 4)
    row = results_row(log, bound_for_sim(sim), sim.expert_bytes, 2)
    assert (row["coverage_ready"], row["coverage_requested"], row["experts_per_token"]) == (0.5, 0.75, 2.0)


def bound_for_sim(sim):
    from sim.run import Prepared

    prep = Prepared(sim.model, sim.hw, sim.schedule.trace, sim.cost, sim.schedule, 0)
    return bound_for(prep, sim.schedule, sim.cache.pool_of, sim.cache.capacity)


def test_elb_recall_and_tokens_per_cycle_by_hand():
    cycles = [  # k, accepted, ELB hits / verify experts per cycle
        {"k": 3, "accepted": 3, "coverage": 1.0, "elb_hits": 9, "verify_experts": 10},
        {"k": 2, "accepted": 0, "coverage": 0.5, "elb_hits": 3, "verify_experts": 6},
        {"k": 0, "accepted": 0, "coverage": 1.0, "elb_hits": 0, "verify_experts": 2},  # no draft: no ELB
    ]
    m = speculative_metrics(cycles)
    assert m["elb_recall"] == pytest.approx(12 / 16)
    assert m["tokens_per_cycle"] == pytest.approx((4 + 1 + 1) / 3)
    assert m["acceptance_rate"] == pytest.approx(3 / 5) and m["mean_k"] == pytest.approx(5 / 3)
    assert (m["k_hist_0"], m["k_hist_2"], m["k_hist_3"], m["k_hist_16"]) == (pytest.approx(1 / 3),) * 3 + (0.0,)
