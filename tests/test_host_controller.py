"""The host controller (sim/host.py) as a specification, driven by hand through a scripted fake stream.

No SimPy: the test is the compute stream (it answers each ``Sleep(dt)`` with the new time), a
scripted prefetch policy decides what is fetched or cancelled and when, and the copy stream's
``submit`` hook records every copy that reaches the stream (key, prefetch?, start, end). The last
test drives the runtime's side instead (Routing/Compute/Block over ``runtime.copystream.MarkStream``
and a scripted backend) and checks it reaches the simulator's numbers on the same scenario. Every
expected number is worked out by hand in the test's docstring (attention 1 ms per MoE layer,
expert 0.5 ms, no head, no decision delay, no issue overhead).
"""

from __future__ import annotations

import numpy as np
import pytest

from runtime.copystream import MarkStream
from sim.engine import Simulation
from sim.hardware import HardwareSpec
from sim.host import Block, Compute, HostController, Routing, Sleep
from sim.cache import LOADING, RESIDENT
from sim.policies import EVICTION
from sim.policies.base import Cancel, Fetch, PrefetchPolicy
from sim.schedule import Schedule
from sim.spec import ModelSpec
from traces import Trace
from traces.trace import empty_arrays

from test_sim_engine import FixedCost  # round numbers, so times can be checked by hand


class Scripted(PrefetchPolicy):
    """A prefetch policy that returns fixed actions: ``start`` at the request's start, ``routed[g]``
    when layer-step ``g`` is routed, ``done[key]`` when the copy of ``key`` lands."""

    name = "scripted"

    def __init__(self, start=(), routed=None, done=None):
        self.start, self.routed, self.done = list(start), routed or {}, done or {}
        self.seen_done: list[int] = []

    def on_request_start(self, request):
        return self.start if request == 0 else []

    def on_routed(self, ls, needed):
        return self.routed.get(ls.g, [])

    def on_transfer_done(self, key):
        self.seen_done.append(key)
        return self.done.get(key, [])


def make_model(M: int, E: int = 4) -> ModelSpec:
    return ModelSpec(
        name="tiny", num_layers=M, moe_layers=tuple(range(M)), num_experts=E, top_k=1,
        hidden_size=64, expert_intermediate_size=128, dense_intermediate_size=0,
        num_attention_heads=4, num_key_value_heads=4, head_dim=16, vocab_size=100,
    )


def make_trace(model: ModelSpec, tokens: list[list[int]], prefill: int = 1) -> Trace:
    """One request; tokens[t][m] = the expert of token t at MoE layer m (top-1)."""
    T, M = len(tokens), model.num_moe_layers
    a = empty_arrays(1, T, M, 1)
    for t, tok in enumerate(tokens):
        a["position"][0, t] = t
        a["phase"][0, t] = 0 if t < prefill else 1
        a["step"][0, t] = 0 if t < prefill else t - prefill + 1
        a["expert_ids"][0, t] = np.array(tok, dtype=np.int16).reshape(M, 1)
    return Trace(shape=model.shape_only(), request_ids=np.arange(1), lengths=np.array([T], dtype=np.int32), **a)


def drive(tokens, *, M, h2d, slots, policy, copies_in_flight=2, resident=(), host_memory="pinned"):
    """Run the host controller's generator by hand; return (sim, log, the copies that reached the
    stream in issue order, the compute stream's final time)."""
    model = make_model(M)
    hw = HardwareSpec(name="test", memory_gb=10, flops_bf16=1e14, hbm_bandwidth=1e12, launch_overhead_s=0.0,
                      workspace_gb=0.0, h2d_gbps=10, d2h_gbps=10, pageable_h2d_gbps=5, pageable_d2h_gbps=5,
                      copies_in_flight=copies_in_flight, host_memory=host_memory)
    cost = FixedCost(model, hw, h2d=h2d)
    sch = Schedule(make_trace(model, tokens), model, cost)
    sim = Simulation(sch, model, hw, cost, eviction=EVICTION.create("lru"), prefetch=policy, slots=slots,
                     admission=False)
    sim.copy.on_done = sim.host.copy_done  # the scripted policy hears every landing
    for key in resident:
        sim.cache.insert_resident(key, 0)
    stream: list[tuple[int, bool, float, float]] = []

    def submit(key, is_prefetch, start, end):
        stream.append((key, is_prefetch, start, end))
        return end

    sim.copy.submit = submit
    now = 0.0
    run = sim.host.drive()
    try:
        wait = next(run)
        while True:
            assert type(wait) is Sleep and wait.dt >= 0
            now += wait.dt
            wait = run.send(now)
    except StopIteration:
        pass
    return sim, sim.log, stream, now


ms = 1e-3
approx = pytest.approx


def test_completions_in_timestamp_order_and_landing_at_the_decision_is_a_hit():
    """Two MoE layers, prefill token routes L0.e0 (resident), L1.e1 (key 5); decode token L0.e2
    (key 2), L1.e1. The policy queues prefetches of key 5 (priority 1) then key 2 (priority 2) at
    the request's start, one copy in flight, transfer 1.5 ms.

      stream: key 5 issued at 0, lands 1.5; key 2 issued at its completion 1.5 (completion, then
              the issue it allows), lands 3.0. The stream sees them in that order.
      prefill: L0 attn 0-1 hit, expert 1-1.5; L1 attn 1.5-2.5: key 5 landed at 1.5 -> hit,
               expert 2.5-3.0 -> token at 3.0.
      decode: L0 attn 3.0-4.0 (key 2 landed at 3.0, as the step starts); routed at 4.0 -> hit; expert 4.0-4.5; L1 attn 4.5-5.5 hit (key 5), expert -> 6.0.
    The policy heard the landings in timestamp order: 5, then 2. 4 hits, no late, no miss.
    With a transfer of 2.0 ms instead: key 5 lands at 2.0 (before L1's routing at 2.5: hit), key
    2 at 4.0 = L0's decode routing: a copy landing exactly at a decision is a hit, too."""
    tokens = [[0, 1], [2, 1]]
    for h2d, ends in ((1.5 * ms, (1.5 * ms, 3.0 * ms)), (2.0 * ms, (2.0 * ms, 4.0 * ms))):
        pol = Scripted(start=[Fetch(5, 1), Fetch(2, 2)])
        sim, log, stream, end = drive(tokens, M=2, h2d=h2d, slots=8, policy=pol, copies_in_flight=1,
                                      resident=(0,))
        assert [(k, p) for k, p, _, _ in stream] == [(5, True), (2, True)]
        assert [s[3] for s in stream] == approx(list(ends))
        assert stream[1][2] == approx(stream[0][3])  # issued at the completion that freed the stream
        assert pol.seen_done == [5, 2]
        assert (log.hits, log.late, log.misses) == (4, 0, 0)
        assert log.stall == 0 and log.late_wait == 0
        assert log.token_times[0] == approx([3.0 * ms, 6.0 * ms])
        assert end == approx(6.0 * ms)


def test_a_pageable_prefetch_holds_the_host_instead_of_overlapping():
    """One token, two MoE layers: L0.e0 (resident), L1.e1 (key 5). At L0's routing the policy
    prefetches key 5; transfer 1.5 ms (the same time from either memory: the fixed cost model).

      pinned: key 5 issued at 1.0 (L0's routing), lands 2.5; L0's expert 1.0-1.5; L1 attn 1.5-2.5,
              routed at 2.5: hit; expert 2.5-3.0 -> token at 3.0. The copy hid behind compute.
      pageable: the copy holds the host from 1.0 to 2.5, so L0's expert is launched at 2.5 (a
              stall of 1.5 ms, routing to expert start), 2.5-3.0; L1 attn 3.0-4.0, routed 4.0:
              hit; expert 4.0-4.5 -> token at 4.5."""
    for memory, token, stall in (("pinned", 3.0 * ms, 0.0), ("pageable", 4.5 * ms, 1.5 * ms)):
        pol = Scripted(routed={0: [Fetch(5, 1)]})
        sim, log, stream, end = drive([[0, 1]], M=2, h2d=1.5 * ms, slots=8, policy=pol, resident=(0,),
                                      host_memory=memory)
        assert [(k, p, s, e) for k, p, s, e in stream] == [(5, True, approx(1.0 * ms), approx(2.5 * ms))], memory
        assert (log.hits, log.late, log.misses) == (2, 0, 0), memory
        assert log.token_times[0] == approx([token]), memory
        assert log.stall == approx(stall, abs=1e-12), memory
        assert log.stall_per_layer[0] == approx(stall, abs=1e-12), memory


def test_a_copy_landing_after_the_decision_is_late_and_waited_for():
    """The first scenario with a transfer of 2.6 ms: key 5 lands at 2.6, 0.1 ms after L1's routing
    at 2.5: late, the experts start at 2.6 (stall 0.1 ms), token at 3.1. Key 2 was issued at 2.6 and
    lands at 5.2; the decode step's L0 routing is at 3.1 + 1 = 4.1: late again, wait 1.1 ms, expert
    5.2-5.7, L1 attn 5.7-6.7 hit, expert -> 7.2."""
    pol = Scripted(start=[Fetch(5, 1), Fetch(2, 2)])
    sim, log, stream, end = drive([[0, 1], [2, 1]], M=2, h2d=2.6 * ms, slots=8, policy=pol,
                                  copies_in_flight=1, resident=(0,))
    assert [s[3] for s in stream] == approx([2.6 * ms, 5.2 * ms])
    assert (log.hits, log.late, log.misses) == (2, 2, 0)
    assert log.late_wait == approx(1.2 * ms)
    assert log.stall == approx(1.2 * ms)
    assert log.token_times[0] == approx([3.1 * ms, 7.2 * ms])


def test_demand_wait_releases_the_slot_then_the_compute_proceeds():
    """One MoE layer, one slot, on demand (the policy does nothing), transfer 10 ms.
    Tokens need e0, e0, e1, e1 (prefill 1):
      prefill: attn 0-1, miss e0: demand copy 1-11, the host waits for it, expert 11-11.5 -> 11.5
      step 1: attn 11.5-12.5, hit, expert 12.5-13 -> 13.0
      step 2: attn 13-14, miss e1: the only slot was held by e0 until 13.0 (released then), so the
              demand copy goes out at once: 14-24, expert 24-24.5 -> 24.5
      step 3: attn 24.5-25.5, hit, expert 25.5-26 -> 26.0
    2 hits, 2 misses, stall 20 ms; the stream saw two demand copies, e0 then e1."""
    sim, log, stream, end = drive([[0], [0], [1], [1]], M=1, h2d=10 * ms, slots=1, policy=Scripted())
    assert [(k, p) for k, p, _, _ in stream] == [(0, False), (1, False)]
    assert [(s[2], s[3]) for s in stream] == [approx((1 * ms, 11 * ms)), approx((14 * ms, 24 * ms))]
    assert (log.hits, log.late, log.misses) == (2, 0, 2)
    assert log.stall == approx(20 * ms)
    assert log.token_times[0] == approx([11.5 * ms, 13 * ms, 24.5 * ms, 26 * ms])
    assert sim.copy.copies == 2


def test_demand_wait_for_a_slot_held_by_a_running_computation():
    """Two MoE layers, one slot shared, transfer 1 ms, prefill token L0.e0 (key 0), L1.e1 (key 5).
    L0: attn 0-1, miss key 0: demand copy 1-2 (the host waits: stall 1 ms), expert 2-2.5. The
    policy prefetches key 5 when L0 is routed (1.0), but the only slot holds key 0, in use by L0's
    experts until 2.5: the prefetch goes out when that computation releases the slot (2.5) and
    lands at 3.5. L1 is routed at 2.5 + 1 = 3.5: the copy lands exactly then, a hit. Token at 4.0."""
    pol = Scripted(routed={0: [Fetch(5, 1)]})
    sim, log, stream, end = drive([[0, 1]], M=2, h2d=1 * ms, slots=1, policy=pol)
    assert [(k, p) for k, p, _, _ in stream] == [(0, False), (5, True)]
    assert [(s[2], s[3]) for s in stream] == [approx((1 * ms, 2 * ms)), approx((2.5 * ms, 3.5 * ms))]
    assert (log.hits, log.late, log.misses) == (1, 0, 1)
    assert log.stall == approx(1 * ms)
    assert log.token_times[0] == approx([4.0 * ms])


def test_a_cancelled_prefetch_never_reaches_the_stream_and_moves_no_bytes():
    """Two MoE layers, one copy in flight, transfer 10 ms, prefill token L0.e0 (key 0, resident),
    L1.e1 (key 5). At the request's start the policy queues key 5 (priority 1) and key 6
    (priority 2): key 5 goes out at 0, key 6 waits for the stream. L0 is routed at 1.0 and the
    policy cancels key 6 there (queued, not issued). Key 5 lands at 10; nothing else is issued.
    L1 routed at 1.5 + 1 = 2.5: key 5 still loading -> late (wait 7.5), expert 10-10.5 -> token at
    10.5. The stream saw exactly one copy, so the bytes moved are one expert's."""
    pol = Scripted(start=[Fetch(5, 1), Fetch(6, 2)], routed={0: [Cancel(6)]})
    sim, log, stream, end = drive([[0, 1]], M=2, h2d=10 * ms, slots=8, policy=pol, copies_in_flight=1,
                                  resident=(0,))
    assert [(k, p) for k, p, _, _ in stream] == [(5, True)]
    assert sim.copy.copies == 1 and sim.copy.bytes_moved == sim.expert_bytes
    assert (log.hits, log.late, log.misses) == (1, 1, 0)
    assert log.late_wait == approx(7.5 * ms)
    assert log.token_times[0] == approx([10.5 * ms])
    assert 6 not in sim.copy.queue and sim.cache.state[6] == 0


def test_a_stale_prefetch_promoted_to_demand_is_copied_once():
    """A prefetch of key 1 (L0.e1) queued behind key 5 at the request's start (one copy in flight,
    transfer 10 ms) is made stale by L0's routing, which needs key 1 on demand: the demand entry
    supersedes the queued prefetch (the queue's stale entry is skipped), so key 1 reaches the
    stream once, as a demand copy, after key 5 (FIFO: an issued copy is never overtaken).
      key 5: 0-10 (prefetch); L0 routed at 1: miss key 1, demand -> issued at 10, lands 20;
      expert 20-20.5; L1 attn 20.5-21.5 hit (key 5) ... token at 22.0; stall 19 ms."""
    pol = Scripted(start=[Fetch(5, 1), Fetch(1, 2)])
    sim, log, stream, end = drive([[1, 1]], M=2, h2d=10 * ms, slots=8, policy=pol, copies_in_flight=1)
    assert [(k, p) for k, p, _, _ in stream] == [(5, True), (1, False)]
    assert sim.copy.copies == 2
    assert (log.hits, log.late, log.misses) == (1, 0, 1)
    assert log.stall == approx(19 * ms)
    assert log.token_times[0] == approx([22.0 * ms])


class _Mark:
    """A scripted backend's event: complete once the fake clock reaches ``t``."""

    def __init__(self, t: float) -> None:
        self.t = t


class _FakeBackend:
    """The runtime's side, scripted: one FIFO copy engine (a copy starts when the model says, after the
    slot's last reader and the previous copy) and a clock the test moves."""

    def __init__(self, transfer: float) -> None:
        self.now, self.link_free, self.transfer = 0.0, 0.0, transfer

    def copy(self, dst, src, after, pad_s, at=None):
        start = max(at[1], self.link_free, after.t if after is not None else 0.0)
        self.link_free = start + self.transfer
        return _Mark(start), _Mark(self.link_free)

    def query(self, mark) -> bool:
        return mark.t <= self.now

    def seconds(self, mark) -> float:
        return mark.t

    def now_s(self) -> float:
        return self.now


def test_live_driver_demand_wait_blocks_the_host_then_the_compute_runs():
    """The runtime's driver (Routing/Compute/Block, a MarkStream over a scripted backend) on the
    demand-wait scenario above gives the simulator's numbers: two demand copies 1-11 and 14-24 ms
    (the second into the slot e0's last computation released at 13), 2 hits, 2 misses, and the
    experts of each token end at 11.5, 13, 24.5, 26 ms. The host blocks on the copy it needs."""
    model = make_model(1)
    hw = HardwareSpec(name="test", memory_gb=10, flops_bf16=1e14, hbm_bandwidth=1e12, launch_overhead_s=0.0,
                      workspace_gb=0.0, h2d_gbps=10, d2h_gbps=10, pageable_h2d_gbps=5, pageable_d2h_gbps=5,
                      copies_in_flight=2)
    cost = FixedCost(model, hw, h2d=10 * ms)
    sch = Schedule(make_trace(model, [[0], [0], [1], [1]]), model, cost)
    sim = Simulation(sch, model, hw, cost, eviction=EVICTION.create("lru"), prefetch=Scripted(), slots=1)
    cache = sim.cache
    cache.slot_of = [0] * 4  # one slot: every key goes there
    be = _FakeBackend(10 * ms)
    link = MarkStream(cache, be, slot_bytes=[None], source=lambda key: None, num_slots=1, nbytes=1,
                      transfer_time=10 * ms, copies_in_flight=2)
    host = HostController(sch, cache, link, eviction=sim.eviction, prefetch=sim.prefetch, log=sim.log,
                          decision_delay=0.0, expert_bytes=1, transfer_s=10 * ms, live=True, admission=False)
    blocks, token_end, gpu = [], [], 0.0
    host.request_start(0)
    for s in range(4):
        run = host.target_pass(s, None)
        answer = None
        try:
            while True:
                req = run.send(answer)
                answer = None
                if type(req) is Routing:
                    gpu += 1 * ms  # attention
                    be.now = max(be.now, gpu)
                    answer = tuple(sch.needed[req.g])
                elif type(req) is Compute:
                    ready = max([link.done_mark[k].t for k in req.held if k in link.done_mark] + [gpu])
                    gpu = ready + 0.5 * ms
                    answer = _Mark(gpu)
                else:
                    assert type(req) is Block
                    blocks.append(req.mark.t)
                    be.now = max(be.now, req.mark.t)
        except StopIteration:
            pass
        token_end.append(gpu)
    assert [(s.t, e.t, k, p) for s, e, k, p in link.copy_log] == [
        approx((1 * ms, 11 * ms, 0, False)), approx((14 * ms, 24 * ms, 1, False))]
    assert (host.hits, host.late, host.misses) == (2, 0, 2)
    assert token_end == approx([11.5 * ms, 13 * ms, 24.5 * ms, 26 * ms])
    assert blocks == approx([11 * ms, 24 * ms])  # the host waited for each demand copy to land


class _ScriptedCopies(_FakeBackend):
    """A backend whose copies end at scripted times (in issue order), FIFO or not."""

    def __init__(self, ends: list[float]) -> None:
        super().__init__(0.0)
        self.ends = list(ends)

    def copy(self, dst, src, after, pad_s, at=None):
        return _Mark(0.0), _Mark(self.ends.pop(0))


def _two_copies(ends: list[float]):
    from runtime.executor import SlotCache
    from sim.policies import PolicyContext

    ev = EVICTION.create("lru")
    ev.attach(PolicyContext(1, 4, 1, lambda g: (), 0, lambda k, g: 0, lambda k: 0, lambda g: None), 1)
    cache = SlotCache(1, 4, ev, slots=2)
    be = _ScriptedCopies(ends)
    link = MarkStream(cache, be, slot_bytes=[None, None], source=lambda key: None, num_slots=2, nbytes=1,
                      copies_in_flight=2)
    for key in (0, 1):
        link.request(key, 0)
    link.try_issue()
    assert [k for _, _, k, _ in link.copy_log] == [0, 1]
    return link, be, cache


def test_copy_completions_are_applied_in_issue_order():
    """A FIFO stream: copy 0 ends at 1 s, copy 1 at 2 s. At 1.5 s only copy 0 has landed (copy 1
    still loading); at 3 s both, in issue order."""
    link, be, cache = _two_copies([1.0, 2.0])
    be.now = 1.5
    assert link.observe() == 1.5
    assert (cache.state[0], cache.state[1]) == (RESIDENT, LOADING)
    be.now = 3.0
    link.observe()
    assert (cache.state[0], cache.state[1]) == (RESIDENT, RESIDENT) and not link.in_flight


@pytest.mark.parametrize("now", [1.5, 3.0])
def test_a_copy_stream_completing_out_of_issue_order_is_refused(now):
    """Copy 1 (issued second) ends at 1 s, before copy 0 (2 s): at 1.5 s the host sees copy 1
    complete while copy 0 is not; at 3 s both are complete with their end times reversed. Either
    way the copy stream refuses (the model applies completions in issue order; applying copy 1
    first would move its clock backwards) instead of mis-ordering silently."""
    from runtime.errors import ExecutorError

    link, be, cache = _two_copies([2.0, 1.0])
    be.now = now
    with pytest.raises(ExecutorError, match="not first-in-first-out"):
        link.observe()
