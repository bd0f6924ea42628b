"""MoE-SpeQ's scheduler admission, as properties of the policy object and the cache (no engine):
a prefetch never evicts an expert the ELB says is needed at the same or an earlier layer; the
predicted experts held or requested per pool never exceed its slots; stale prefetches are cancelled."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from sim.cache import ABSENT, ExpertCache
from sim.policies.base import Cancel, CycleInfo, Fetch, PolicyContext
from sim.policies.eviction import LookaheadAwareEviction
from sim.policies.speculative import SpeqScheduler

M, E = 4, 6


class LS:
    def __init__(self, m: int) -> None:
        self.g, self.request, self.step, self.m = m, 0, 1, m


def setup(slots: int, queued=lambda key: False):
    ev = LookaheadAwareEviction()
    cache = ExpertCache(M, E, ev, slots=slots)
    ctx = PolicyContext(num_moe_layers=M, num_experts=E, top_k=2, future=lambda g: (), num_layer_steps=0,
                        next_use=lambda key, g: 1 << 62, cached=cache.state.__getitem__, layer_step=lambda g: None,
                        queued=queued)
    ev.attach(ctx, cache.num_pools)
    sp = SpeqScheduler()
    sp.attach(ctx)
    ctx.extra["pool_capacity"], ctx.extra["pool_of"] = list(cache.capacity), cache.pool_of
    cache.admit = sp.admits
    return cache, sp


rows_st = st.lists(st.lists(st.lists(st.integers(0, E - 1), min_size=1, max_size=2, unique=True),
                            min_size=M, max_size=M), min_size=1, max_size=5)


@settings(max_examples=150, deadline=None)
@given(slots=st.integers(2, 10), pre=st.lists(st.integers(0, M * E - 1), max_size=12, unique=True), rows=rows_st,
       verify_to=st.integers(-1, M - 1), data=st.data())
def test_a_prefetch_never_evicts_an_expert_needed_sooner(slots, pre, rows, verify_to, data) -> None:
    cache, sp = setup(slots)
    for key in pre[:slots]:
        cache.insert_resident(key, 0)
    for key in data.draw(st.lists(st.sampled_from(pre[:slots]), unique=True)) if pre else []:
        cache.in_use[key] = 1  # a computation holds it: not evictable, so victims must come from the rest
    sp.on_cycle_start(CycleInfo(request=0, t=0, k=len(rows), t_draft_s=0.0, expert_transfer_s=1.0, slots=slots,
                                top_k=2))
    actions = []
    for i, row in enumerate(rows):
        keyed = [tuple(m * E + e for e in ids) for m, ids in enumerate(row)]
        actions += sp.on_draft_token(i, keyed, budget=100)
    for m in range(verify_to + 1):
        sp.on_routed(LS(m), ())
    # load the scheduler's fetches and some demand keys of the routed layer, in any order
    demand = [verify_to * E + e for e in range(E)] if verify_to >= 0 else []
    keys = [a.key for a in actions if type(a) is Fetch] + demand
    order = data.draw(st.permutations(keys))
    for key in order:
        if cache.state[key] != ABSENT:
            continue
        need = sp.predicted_next_use(key)
        before = {k for k, s in enumerate(cache.state) if s}
        if cache.load(key, 0.0, 0):
            gone = before - {k for k, s in enumerate(cache.state) if s}
            for victim in gone:
                v = sp.predicted_next_use(victim)
                assert need is None or v is None or v > need, (key, need, victim, v)
            cache.state[key] = 2  # landed
        cache.check()


@settings(max_examples=100, deadline=None)
@given(slots=st.integers(1, 8), rows=rows_st)
def test_prefetches_per_pool_never_exceed_its_slots(slots, rows) -> None:
    cache, sp = setup(slots)
    sp.on_cycle_start(CycleInfo(0, 0, len(rows), 0.0, 1.0, slots, 2))
    fetched = set()
    for i, row in enumerate(rows):
        acts = sp.on_draft_token(i, [tuple(m * E + e for e in ids) for m, ids in enumerate(row)], budget=100)
        fetched |= {a.key for a in acts if type(a) is Fetch}
    assert len(fetched) <= slots


def test_stale_prefetches_are_cancelled_by_hand() -> None:
    queue = set()
    cache, sp = setup(20, queued=queue.__contains__)
    sp.on_cycle_start(CycleInfo(0, 0, 1, 0.0, 1.0, 20, 2))
    acts = sp.on_draft_token(0, [(0, 1), (6, 7), (12,), (18,)], budget=100)  # k = 1: Phase III at once
    assert [a.key for a in acts] == [0, 1, 6, 7, 12, 18]
    queue.update({1, 7, 12, 18})  # 0 and 6 already issued to the link
    # layer 0 routed and needs key 0 only: queued 1 is stale; a needed key is never cancelled
    assert sp.on_routed(LS(0), (0,)) == [Cancel(1)]
    queue.discard(1)
    # the next cycle: every prefetch of the previous cycle's ELB still queued is cancelled
    assert sp.on_cycle_start(CycleInfo(0, 2, 1, 0.0, 1.0, 20, 2)) == [Cancel(7), Cancel(12), Cancel(18)]
    assert sp.cancelled == 4
