"""The engine as a specification: invariants (hypothesis), the bound, event order, a golden scenario."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from sim.bound import belady_misses
from sim.cache import RESIDENT
from sim.costmodel import CostModel
from sim.engine import Simulation
from sim.hardware import HardwareSpec
from sim.link import CopyQueue
from sim.policies import EVICTION, PREDICTORS, PREFETCH
from sim.policies.base import EvictionPolicy
from sim.run import bound_for, Prepared
from sim.schedule import Schedule
from sim.spec import ModelSpec
from traces import Trace
from traces.trace import empty_arrays


# ----------------------------------------------------------------- fixtures
class FixedCost(CostModel):
    """Round numbers, so times can be checked by hand (also shows a cost model can be swapped)."""

    def __init__(self, model, hw, *, attn=1e-3, expert=0.5e-3, head=0.0, h2d=10e-3):
        super().__init__(model, hw)
        self.a, self.e, self.h, self.x = attn, expert, head, h2d

    def _attention(self, layer, n_tokens, kv_len):
        return self.a

    def _router(self, layer, n_tokens):
        return 0.0

    def _dense_ffn(self, layer, n_tokens):
        return self.a

    def _shared_experts(self, layer, n_tokens):
        return 0.0

    def _expert_ffn(self, layer, n_tokens, dtype):
        return self.e

    def _embed_and_head(self, n_tokens, logits_tokens):
        return self.h

    def _h2d(self, nbytes):
        return self.x

    def _d2h(self, nbytes):
        return self.x


def make_model(num_layers=2, moe_layers=(0, 1), E=4, k=1) -> ModelSpec:
    dense = [x for x in range(num_layers) if x not in moe_layers]
    return ModelSpec(
        name="test", num_layers=num_layers, moe_layers=tuple(moe_layers), num_experts=E, top_k=k,
        hidden_size=64, expert_intermediate_size=128, dense_intermediate_size=128 if dense else 0,
        num_attention_heads=4, num_key_value_heads=4, head_dim=16, vocab_size=100,
    )


def make_hw(**kw) -> HardwareSpec:
    base = dict(name="test", memory_gb=10, flops_bf16=1e14, hbm_bandwidth=1e12, launch_overhead_s=0.0,
                workspace_gb=0.0, h2d_gbps=10, d2h_gbps=10, pageable_h2d_gbps=5, pageable_d2h_gbps=5,
                copies_in_flight=2)
    base.update(kw)
    return HardwareSpec(**base)


def make_trace(model: ModelSpec, routes: list[list[list[list[int]]]], prefill: list[int] | None = None,
               lookahead: dict | None = None) -> Trace:
    """routes[r][t][m] = expert ids of token t of request r at MoE layer m."""
    R, M, k = len(routes), model.num_moe_layers, model.top_k
    T = max(len(x) for x in routes)
    a = empty_arrays(R, T, M, k)
    lengths = np.array([len(x) for x in routes], dtype=np.int32)
    for r, req in enumerate(routes):
        P = (prefill or [1] * R)[r]
        for t, tok in enumerate(req):
            a["position"][r, t] = t
            a["phase"][r, t] = 0 if t < P else 1
            a["step"][r, t] = 0 if t < P else t - P + 1
            a["expert_ids"][r, t] = np.array(tok, dtype=np.int16)
    return Trace(shape=model.shape_only(), request_ids=np.arange(R), lengths=lengths, **a)


def run(trace, model, hw, cost, *, eviction="lru", prefetch="none", pargs=None, predictor=None,
        slots=None, per_layer=None, timeline=True, depths=()):
    sch = Schedule(trace, model, cost)
    sim = Simulation(sch, model, hw, cost, eviction=EVICTION.create(eviction),
                     prefetch=PREFETCH.create(prefetch, **(pargs or {})),
                     predictor=PREDICTORS.create(predictor) if predictor else None,
                     slots=slots, per_layer=per_layer, timeline=timeline, lookahead_depths=depths)
    return sim, sim.run()


@st.composite
def scenarios(draw):
    E = draw(st.integers(2, 6))
    k = draw(st.integers(1, min(3, E)))
    M = draw(st.integers(1, 3))
    model = make_model(num_layers=M, moe_layers=tuple(range(M)), E=E, k=k)
    R = draw(st.integers(1, 3))
    routes = []
    for _ in range(R):
        n = draw(st.integers(2, 7))
        routes.append([[draw(st.permutations(range(E)))[:k] for _ in range(M)] for _ in range(n)])
    prefill = [draw(st.integers(1, len(x) - 1)) for x in routes]
    per_layer = draw(st.booleans())
    if per_layer:
        layout = {"per_layer": draw(st.integers(k, E))}
    else:
        layout = {"slots": draw(st.integers(k, E * M))}
    hw = make_hw(copies_in_flight=draw(st.integers(1, 4)),
                 copy_issue_overhead_s=draw(st.sampled_from([0.0, 1e-4])),
                 decision_delay_s=draw(st.sampled_from([0.0, 2e-4])))
    cost = FixedCost(model, hw, attn=draw(st.sampled_from([1e-3, 3e-3])), h2d=draw(st.sampled_from([1e-3, 1e-2])))
    return model, make_trace(model, routes, prefill), hw, cost, layout


POLICIES = [("lru", "none", {}), ("lfu", "none", {}), ("fifo", "none", {}), ("belady", "none", {}),
            ("lru", "history", {"layers_ahead": 1}), ("belady", "oracle", {"depth": 2}), ("fifo", "stream", {}),
            ("lru", "lookahead", {"depth": 1})]


# ---------------------------------------------------------------- properties
@given(scenarios(), st.sampled_from(POLICIES))
def test_invariants_hold_for_every_policy(scn, pol):
    model, trace, hw, cost, layout = scn
    ev, pf, args = pol
    if pf == "stream":
        assume(layout.get("per_layer", layout.get("slots", 0)) >= model.num_experts)
    sch = Schedule(trace, model, cost)
    pred = PREDICTORS.create("oracle") if pf == "lookahead" else None
    sim = Simulation(sch, model, hw, cost, eviction=EVICTION.create(ev), prefetch=PREFETCH.create(pf, **args),
                     predictor=pred, timeline=True, lookahead_depths=(1,) if pred else (), **layout)
    evicted_in_use = []
    orig_remove = sim.cache.remove

    def remove(key):
        if sim.cache.in_use[key] and sim.prefetch.keeps_cache:
            evicted_in_use.append(key)
        assert sim.cache.state[key] == RESIDENT, "a loading slot was evicted"
        orig_remove(key)
        sim.cache.check()  # never more than its slots

    sim.cache.remove = remove
    log = sim.run()
    assert not evicted_in_use, "an in-use slot was evicted"
    sim.cache.check()
    # every needed (step, layer, expert) is exactly one of hit / late / miss
    assert log.hits + log.late + log.misses == sum(len(x) for x in sch.needed)
    # every byte fetched is accounted once
    assert log.bytes_moved == log.copies * model.bytes_per_expert()
    assert len(log.copy_spans) == log.copies
    prefetched = sum(1 for s in log.copy_spans if s[3]) * model.bytes_per_expert()
    assert log.useful_prefetch_bytes + log.wasted_prefetch_bytes == prefetched
    # the link never exceeds its bandwidth: copies never overlap and each takes its full time
    spans = sorted(log.copy_spans)
    for (s0, e0, *_), (s1, e1, *_) in zip(spans, spans[1:]):
        assert s1 >= e0 - 1e-12
    for s, e, *_ in spans:
        assert e - s == pytest.approx(cost.h2d(model.bytes_per_expert()))
    # simulated time never goes back
    comp = log.compute_spans
    for (a0, a1, _), (b0, b1, _) in zip(comp, comp[1:]):
        assert a1 >= a0 and b0 >= a1 - 1e-12
    for times in log.token_times:
        assert all(b >= a for a, b in zip(times, times[1:]))
    assert [len(t) for t in log.token_times] == [b - a for a, b in sch.request_steps]  # one token a step
    assert all(0 <= n <= sim.cache.total_slots for _, n in log.occupancy)


@given(scenarios())
def test_belady_hits_at_least_every_other_eviction_policy(scn):
    model, trace, hw, cost, layout = scn
    hits = {}
    for ev in ("lru", "lfu", "fifo", "belady"):
        _, log = run(trace, model, hw, cost, eviction=ev, timeline=False, **layout)
        hits[ev] = log.hits + log.late
    assert all(hits["belady"] >= h for h in hits.values()), hits


@given(scenarios())
def test_everything_resident_gives_compute_only_tpot(scn):
    model, trace, hw, cost, _ = scn
    E, M = model.num_experts, model.num_moe_layers
    sch = Schedule(trace, model, cost)
    sim = Simulation(sch, model, hw, cost, eviction=EVICTION.create("lru"), prefetch=PREFETCH.create("none"),
                     slots=E * M)
    for key in range(E * M):
        sim.cache.insert_resident(key, 0)
    log = sim.run()
    assert log.misses == 0 and log.late == 0 and log.stall == 0
    dd = hw.decision_delay_s
    for r, (a, b) in enumerate(sch.request_steps):
        times = log.token_times[r]
        for i, s_idx in enumerate(range(a + 1, b)):
            assert times[i + 1] - times[i] == pytest.approx(sch.compute_time(s_idx, dd), rel=1e-12)


@given(scenarios())
def test_belady_miss_count_is_a_lower_bound(scn):
    model, trace, hw, cost, layout = scn
    sch = Schedule(trace, model, cost)
    for ev, pf, args in POLICIES:
        if pf == "stream" and layout.get("per_layer", layout.get("slots", 0)) < model.num_experts:
            continue
        sim = Simulation(sch, model, hw, cost, eviction=EVICTION.create(ev), prefetch=PREFETCH.create(pf, **args),
                         predictor=PREDICTORS.create("oracle") if pf == "lookahead" else None,
                         lookahead_depths=(1,) if pf == "lookahead" else (), **layout)
        log = sim.run()
        bound = belady_misses(sch.needed, sim.cache.pool_of, sim.cache.capacity)
        assert log.copies >= bound.sum(), (ev, pf)
        prep = Prepared(model, hw, trace, cost, sch, 0)
        b = bound_for(prep, sch, sim.cache.pool_of, sim.cache.capacity)
        assert log.run_time >= b.total_s * (1 - 1e-12)


def test_determinism_bit_identical():
    model = make_model(num_layers=3, moe_layers=(0, 1, 2), E=6, k=2)
    rng = np.random.default_rng(3)
    routes = [[[list(rng.choice(6, 2, replace=False)) for _ in range(3)] for _ in range(30)] for _ in range(3)]
    trace = make_trace(model, routes, prefill=[5, 3, 4])
    hw = make_hw(copy_issue_overhead_s=1e-5, decision_delay_s=1e-5)
    cost = FixedCost(model, hw)
    outs = []
    for _ in range(2):
        _, log = run(trace, model, hw, cost, eviction="lru", prefetch="history", slots=7)
        outs.append((log.token_times, log.hits, log.late, log.misses, log.copy_spans, log.stall))
    assert outs[0] == outs[1]


def _sim_with(eviction, trace, model, hw, cost, prefetch, pargs, layout):
    sch = Schedule(trace, model, cost)
    sim = Simulation(sch, model, hw, cost, eviction=eviction, prefetch=PREFETCH.create(prefetch, **pargs),
                     predictor=PREDICTORS.create("recorded") if prefetch == "lookahead" else None,
                     timeline=True, lookahead_depths=(1,) if prefetch == "lookahead" else (), **layout)
    log = sim.run()
    return (log.token_times, log.hits, log.late, log.misses, log.copy_spans, log.stall, sim.cache.evictions)


@given(scenarios(), st.sampled_from([("lru", "none", {}), ("fifo", "none", {}), ("lru", "history", {"layers_ahead": 1}),
                                     ("fifo", "stream", {})]))
def test_fused_replace_decides_as_victim_removed_inserted(scn, pol):
    """An eviction policy's one-call ``replace`` (choose, remove, insert) is only a faster way to
    make the three calls, and the uses the host skips after demand loads (``insert_counts_as_use``)
    would have changed nothing: the same victims, so the same run as with every call made."""
    model, trace, hw, cost, layout = scn
    name, prefetch, pargs = pol
    if prefetch == "stream":
        assume(layout.get("per_layer", layout.get("slots", 0)) >= model.num_experts)
    base_cls = type(EVICTION.create(name))
    generic = type("Generic", (base_cls,), {"replace": EvictionPolicy.replace, "insert_counts_as_use": False})
    assert base_cls.replace is not EvictionPolicy.replace and base_cls.insert_counts_as_use  # what is compared
    fused = _sim_with(base_cls(), trace, model, hw, cost, prefetch, pargs, layout)
    assert fused == _sim_with(generic(), trace, model, hw, cost, prefetch, pargs, layout)


def test_subclass_that_chooses_its_own_victim_is_obeyed():
    """A plugin that subclasses LRU and overrides only ``victim`` gets its victims evicted (the
    parent's fused ``replace`` would bypass them)."""

    class Mru(EVICTION.get("lru")):
        def victim(self, pool, g, can_evict):
            for key in reversed(self._order[pool]):
                if can_evict(key):
                    return key
            return None

    assert Mru.replace is EvictionPolicy.replace and Mru.insert_counts_as_use  # its uses are LRU's

    class CountingLru(EVICTION.get("lru")):
        def accessed(self, key, pool, g):
            super().accessed(key, pool, g)

    assert not CountingLru.insert_counts_as_use and not EVICTION.get("lfu").insert_counts_as_use
    model = make_model(num_layers=1, moe_layers=(0,), E=3, k=1)
    trace = make_trace(model, [[[0], [1], [2], [0]]])
    hw = make_hw()
    cost = FixedCost(model, hw)
    sch = Schedule(trace, model, cost)
    sim = Simulation(sch, model, hw, cost, eviction=Mru(), prefetch=PREFETCH.create("none"), slots=2)
    log = sim.run()
    # 0 and 1 fill the slots, 2 evicts the most recent (1), so 0 is still there at the end: a hit
    assert (log.hits, log.misses) == (1, 3)


# --------------------------------------------------------------- golden case
def test_golden_scenario_by_hand():
    """One MoE layer, 4 experts, top-1, one slot, LRU, on demand.

    Times: attention 1 ms, expert 0.5 ms, transfer 10 ms, no head, no decision delay.
    Request: prefill token needs e0, decode tokens need e0, e1, e1.
      prefill: attn 0-1, miss e0 -> 1-11, expert 11-11.5            -> token at 11.5
      step 1 (e0): attn 11.5-12.5, hit, expert 12.5-13              -> token at 13.0
      step 2 (e1): attn 13-14, miss (evict e0) 14-24, expert 24-24.5 -> token at 24.5
      step 3 (e1): attn 24.5-25.5, hit, expert 25.5-26              -> token at 26.0
    TTFT 11.5 ms; TPOT (26 - 11.5) / 3 = 4.8333 ms; 2 misses, 2 hits, stall 20 ms.
    Bound: Belady misses the same 2 (e0 cold in prefill, e1 in decode): decode compute 4.5 ms vs
    one transfer 10 ms -> bound TPOT 10/3 ms; x_bound = 4.8333 / 3.3333 = 1.45.
    """
    model = make_model(num_layers=1, moe_layers=(0,), E=4, k=1)
    hw = make_hw()
    cost = FixedCost(model, hw)
    trace = make_trace(model, [[[[0]], [[0]], [[1]], [[1]]]], prefill=[1])
    sim, log = run(trace, model, hw, cost, slots=1)
    assert log.token_times[0] == pytest.approx([11.5e-3, 13e-3, 24.5e-3, 26e-3])
    assert (log.hits, log.late, log.misses) == (2, 0, 2)
    assert log.stall == pytest.approx(20e-3)
    from sim.metrics import results_row

    prep = Prepared(model, hw, trace, cost, sim.schedule, 0)
    b = bound_for(prep, sim.schedule, sim.cache.pool_of, sim.cache.capacity)
    row = results_row(log, b, model.bytes_per_expert(), 1)
    assert row["ttft_ms"] == pytest.approx(11.5)
    assert row["tpot_ms"] == pytest.approx(14.5 / 3)
    assert row["bound_tpot_ms"] == pytest.approx(10 / 3)
    assert row["x_bound"] == pytest.approx(1.45)
    assert row["stall_share"] == pytest.approx(20 / 26)


def test_same_time_order_transfer_landing_at_decision_is_a_hit():
    """Defined order at equal times: completions and releases first (a release before a completion),
    then the host reads the routing. A prefetch that lands exactly when the routing arrives is a hit."""
    model = make_model(num_layers=2, moe_layers=(0, 1), E=4, k=1)
    hw = make_hw()
    # attention 1 ms; transfer 1.5 ms: layer 0 routed at 1 ms, expert to 1.5 ms, layer 1 routed at 2.5 ms
    cost = FixedCost(model, hw, attn=1e-3, expert=0.5e-3, h2d=1.5e-3)
    trace = make_trace(model, [[[[0], [1]]]], prefill=[1])
    sch = Schedule(trace, model, cost)
    sim = Simulation(sch, model, hw, cost, eviction=EVICTION.create("lru"),
                     prefetch=PREFETCH.create("oracle", depth=1), slots=4)
    sim.cache.insert_resident(0, 0)  # layer 0 expert 0 resident
    log = sim.run()
    # oracle fetches L1.E1 at 1.0 ms (layer 0's decision); it lands at 2.5 ms = layer 1's decision
    assert (log.hits, log.late, log.misses) == (2, 0, 0)
    assert log.stall == 0


def test_copy_queue_demand_first_and_cancel():
    q = CopyQueue()
    q.push(5, 2)
    q.push(6, 1)
    q.push(7, 0)
    assert q.peek() == (7, 0)
    q.pop()
    assert q.cancel(6) and not q.cancel(6)
    assert q.peek() == (5, 2)
    assert q.push(5, 0)  # promote to demand
    assert not q.push(5, 3)  # never demoted
    assert q.peek() == (5, 0)


def _stream(E: int, slots: int, in_flight: int, resident: list[int], in_use: list[int], loading: list[int]):
    """A copy stream and cache at 0.5 s: ``resident`` experts (``in_use`` of them held by a
    computation), ``loading`` copies issued at 0 (1 s each, 0.1 s to issue)."""
    from sim.cache import ExpertCache
    from sim.link import CopyEngine
    from sim.policies import PolicyContext

    ev = EVICTION.create("lru")
    ev.attach(PolicyContext(1, E, 1, lambda g: (), 0, lambda k, g: 0, lambda k: 0, lambda g: None), 1)
    cache = ExpertCache(1, E, ev, slots=slots)
    for key in resident:
        cache.insert_resident(key, 0)
    for key in in_use:
        cache.in_use[key] += 1
    link = CopyEngine(cache, nbytes=1, transfer_time=1.0, issue_overhead=0.1, copies_in_flight=in_flight)
    for key in loading:
        link.request(key, 0)
    link.try_issue()
    link.advance(0.5)
    return cache, link


def _stream_state(cache, link) -> tuple:
    queued = sorted(link.queue._entry, key=lambda key: link.queue._entry[key][1])  # in queue order
    return (list(cache.state), list(cache.ready_at), list(cache.occupancy), cache.evictions, list(cache.eviction._order[0]),
            list(link.in_flight), link.copies, link.busy_time, link.host_free, link.link_free, link.blocked, queued)


@given(st.data())
def test_fetch_now_leaves_the_stream_as_queueing_then_try_issue(data):
    """The host's shortcut for a layer-step's misses when nothing is queued (``fetch_now``) leaves
    the cache, the stream and the queue exactly as queueing each miss and ``try_issue`` do: with
    the stream full or not, slots held in use (the rest then queued, in order), a key named twice;
    and so after the stream has run on."""
    E = 8
    slots, in_flight = data.draw(st.integers(1, 5)), data.draw(st.integers(1, 3))
    resident = data.draw(st.lists(st.integers(0, E - 1), unique=True, max_size=slots))
    in_use = data.draw(st.lists(st.sampled_from(resident), unique=True)) if resident else []
    absent = [key for key in range(E) if key not in resident]
    assume(absent)
    keys = data.draw(st.lists(st.sampled_from(absent), min_size=1, max_size=6))
    rest = [key for key in absent if key not in keys]
    loading = data.draw(st.lists(st.sampled_from(rest), unique=True, max_size=3)) if rest else []
    cache_a, link_a = _stream(E, slots, in_flight, resident, in_use, loading)
    cache_b, link_b = _stream(E, slots, in_flight, resident, in_use, loading)
    assume(not link_a.queue and all(cache_a.state[key] == 0 for key in keys))
    link_a.fetch_now(keys)
    for key in keys:
        link_b.queue.push(key, 0)
    link_b.try_issue()
    assert _stream_state(cache_a, link_a) == _stream_state(cache_b, link_b)
    for cache, link in ((cache_a, link_a), (cache_b, link_b)):
        for key in in_use:  # the computation ends; the stream runs on
            cache.in_use[key] -= 1
        link.advance(10.0)
    assert _stream_state(cache_a, link_a) == _stream_state(cache_b, link_b)


def test_waves_when_prefill_needs_more_experts_than_slots():
    model = make_model(num_layers=1, moe_layers=(0,), E=6, k=2)
    hw = make_hw()
    cost = FixedCost(model, hw)
    # prefill of 3 tokens needs experts 0..5 at one layer; only 2 slots
    trace = make_trace(model, [[[[0, 1]], [[2, 3]], [[4, 5]], [[0, 1]]]], prefill=[3])
    sim, log = run(trace, model, hw, cost, slots=2)
    assert log.misses == 6 + 2  # three waves of two, then {0, 1} again after {4, 5}
    sim.cache.check()
    assert len(log.token_times[0]) == 2


def test_stream_keeps_whole_layers_and_copies_the_rest_host_synchronously():
    """3 MoE layers of 2 experts, 4 slots: layer 0 stays resident (preloaded), layers 1 and 2 pass
    through the other 2 slots. Each streamed layer: the host waits for the GPU, copies its 2
    experts one after another (10 ms each, nothing overlapped), then runs attention (1 ms) and
    experts (0.5 ms); layer 0 runs at once: 1.5 + 2 x (20 + 1.5) = 44.5 ms per token."""
    model = make_model(num_layers=3, moe_layers=(0, 1, 2), E=2, k=1)
    hw = make_hw(copy_issue_overhead_s=0.0)
    cost = FixedCost(model, hw)
    trace = make_trace(model, [[[[0], [1], [0]]] * 3], prefill=[1])
    sim, log = run(trace, model, hw, cost, eviction="fifo", prefetch="stream", slots=4)
    assert sim.prefetch.resident_layers == 1 and sim.cache.pinned == {0, 1}
    assert log.request_start == [pytest.approx(20e-3)]  # layer 0 copied before the first request
    assert log.copies == 2 + 3 * 2 * 2  # then the streamed layers' experts, every step
    assert log.hits == 3 and log.misses == 6  # layer 0 resident; the streamed layers' experts copied on demand
    assert log.stall == pytest.approx(3 * 2 * 20e-3)
    times = log.token_times[0]
    assert times[0] - 20e-3 == pytest.approx(44.5e-3) and np.diff(times) == pytest.approx([44.5e-3] * 2)
    assert sim.cache.resident_count() == 2  # only the resident layer stays
    spans = [s for s in log.compute_spans if s[2].startswith("pageable copy")]
    assert len(spans) == 6 and all(b - a == pytest.approx(20e-3) for a, b, _ in spans)
    # every layer fits: all resident, moved once
    sim, log = run(trace, model, hw, cost, eviction="fifo", prefetch="stream", slots=6)
    assert log.copies == 6 and sim.prefetch.resident_layers == 3 and log.stall == 0


def test_unknown_policy_names_are_errors():
    from sim.policies.errors import PolicyError

    with pytest.raises(PolicyError, match="unknown eviction policy 'lruu'.*known: belady, fifo"):
        EVICTION.create("lruu")
    with pytest.raises(PolicyError, match="bad arguments"):
        PREFETCH.create("lookahead", deepth=2)
