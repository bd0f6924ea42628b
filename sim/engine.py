"""The SimPy engine: the GPU compute stream drives layer-steps; the copy stream moves experts.

Processes are per hardware agent (anchors-sim §7.4): one process for the GPU compute stream (the
decode driver: prefill, then decode steps of each request in turn), one for the host-to-device
copy stream (sim/link.py). The host controller (policies, demand fetches) acts at the events the
host really sees: a layer's routing arriving after ``decision_delay``, and copies completing.

Per MoE layer-step: the layer's attention and router (plus dense layers since the last MoE layer)
run; the routing reaches the host ``decision_delay`` later; resident experts are hits, loading ones
are late, absent ones are demand-fetched; the compute stream stalls until all of the layer's
experts are resident, then runs their FFNs (one grouped kernel over the slot pool). If a step
needs more experts at one layer than its pool has slots (a long prefill), it runs in waves.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import simpy

from sim.cache import LOADING, RESIDENT, ExpertCache
from sim.costmodel import CostModel
from sim.errors import SimError
from sim.hardware import HardwareSpec
from sim.link import CopyEngine
from sim.policies.base import DEMAND, Cancel, EvictionPolicy, PolicyContext, PrefetchPolicy
from sim.schedule import Schedule
from sim.spec import ModelSpec


@dataclass
class RunLog:
    """Raw observations of one run; sim/metrics.py turns them into the results row."""

    request_start: list[float] = field(default_factory=list)
    token_times: list[list[float]] = field(default_factory=list)  # per request: emission times
    run_time: float = 0.0
    hits: int = 0
    late: int = 0
    misses: int = 0
    late_wait: float = 0.0
    stall: float = 0.0
    stall_per_layer: np.ndarray | None = None
    coverage: list[float] = field(default_factory=list)  # per step
    bytes_moved: int = 0
    copies: int = 0
    link_busy: float = 0.0
    useful_prefetch_bytes: int = 0
    wasted_prefetch_bytes: int = 0
    evictions: int = 0
    compute_spans: list[tuple[float, float, str]] | None = None
    copy_spans: list[tuple[float, float, int, bool]] | None = None
    occupancy: list[tuple[float, int]] | None = None


class Simulation:
    """One replay of a trace under one policy on one hardware/memory configuration."""

    def __init__(
        self,
        schedule: Schedule,
        model: ModelSpec,
        hw: HardwareSpec,
        cost: CostModel,
        *,
        eviction: EvictionPolicy,
        prefetch: PrefetchPolicy,
        predictor=None,
        slots: int | None = None,
        per_layer: int | None = None,
        seed: int = 0,
        timeline: bool = False,
        lookahead_depths: tuple[int, ...] = (),
    ) -> None:
        self.schedule = schedule
        self.model, self.hw, self.cost = model, hw, cost
        self.env = simpy.Environment()
        self.log = RunLog()
        self.g = 0
        self.expert_bytes = model.bytes_per_expert()
        self.decision_delay = float(hw.decision_delay_s)
        self.timeline = timeline
        sch = schedule
        self.cache = ExpertCache(sch.M, sch.E, eviction, slots=slots, per_layer=per_layer)
        self.prefetched = [False] * (sch.M * sch.E)
        self.cache.on_evict = self._evicted
        if predictor is not None:
            predictor.attach(sch.trace, sch, lookahead_depths, seed)
        self.ctx = PolicyContext(
            num_moe_layers=sch.M,
            num_experts=sch.E,
            top_k=model.top_k,
            future=sch.future,
            num_layer_steps=sch.num_layer_steps,
            next_use=sch.next_use,
            cached=self.cache.present,
            layer_step=sch.layer_step,
            predictor=predictor,
            extra={"schedule": sch, "seed": seed},
        )
        eviction.attach(self.ctx, self.cache.num_pools)
        prefetch.attach(self.ctx)
        self.eviction, self.prefetch = eviction, prefetch
        if timeline:
            self.log.compute_spans, self.log.copy_spans, self.log.occupancy = [], [], []
        self.copy = CopyEngine(
            self.cache,
            nbytes=self.expert_bytes,
            transfer_time=cost.h2d(self.expert_bytes),
            issue_overhead=float(hw.copy_issue_overhead_s),
            copies_in_flight=int(hw.copies_in_flight),
            current_g=lambda: self.g,
            prefetched=self.prefetched,
            on_done=self._copy_done if (timeline or self._needs_done(prefetch)) else None,
            on_release=self._release,
            record=self.log.copy_spans,
        )
        if not prefetch.keeps_cache and min(self.cache.capacity) < sch.E:
            raise SimError(
                f"policy '{prefetch.name}' streams whole layers: it needs at least num_experts={sch.E} slots "
                f"per pool, the cache has {min(self.cache.capacity)}"
            )
        cls = type(prefetch)
        self._has_layer_start = cls.on_layer_start is not PrefetchPolicy.on_layer_start
        self._has_routed = cls.on_routed is not PrefetchPolicy.on_routed
        self._has_done = cls.on_transfer_done is not PrefetchPolicy.on_transfer_done

    @staticmethod
    def _needs_done(prefetch: PrefetchPolicy) -> bool:
        return type(prefetch).on_transfer_done is not PrefetchPolicy.on_transfer_done

    # ------------------------------------------------------------ callbacks
    def _evicted(self, key: int) -> None:
        if self.prefetched[key]:
            self.prefetched[key] = False
            self.log.wasted_prefetch_bytes += self.expert_bytes

    def _copy_done(self, key: int, t: float) -> None:
        if self._has_done:
            self._apply(self.prefetch.on_transfer_done(key))
        if self.log.occupancy is not None:
            self.log.occupancy.append((t, self.cache.resident_count()))

    def _apply(self, actions) -> None:
        copy = self.copy
        for a in actions:
            if type(a) is Cancel:
                p = copy.queue.priority(a.key)
                if p is not None and p != DEMAND:
                    copy.queue.cancel(a.key)
            else:
                copy.request(a.key, a.priority)

    # --------------------------------------------------------------- driver
    def run(self) -> RunLog:
        proc = self.env.process(self._driver())
        self.env.run(until=proc)
        log = self.log
        log.run_time = self.env.now
        log.bytes_moved = self.copy.bytes_moved
        log.copies = self.copy.copies
        log.link_busy = self.copy.busy_time
        log.evictions = self.cache.evictions
        log.wasted_prefetch_bytes += sum(self.prefetched) * self.expert_bytes
        return log

    def _release(self, keys: tuple[int, ...]) -> None:
        """A computation is over: its experts leave the in-use state (streaming drops them)."""
        cache = self.cache
        in_use, state = cache.in_use, cache.state
        for key in keys:
            in_use[key] -= 1
        if not self.prefetch.keeps_cache:
            for key in keys:
                if state[key] == RESIDENT and not in_use[key]:
                    cache.remove(key)

    def _driver(self):
        """The GPU compute stream. Compute that needs no decision is not waited for at once: it is
        carried (``carry``) into the next timeout, so a layer-step costs one event when its experts
        hit; the experts of a carried computation stay in use until it ends (the copy stream
        releases them at that time, in order)."""
        env, sch, cache, copy, log = self.env, self.schedule, self.cache, self.copy, self.log
        prefetch = self.prefetch
        state, in_use, ready_at, prefetched = cache.state, cache.in_use, cache.ready_at, self.prefetched
        pre, exp, needed_all, infos = sch.pre, sch.exp, sch.needed, sch.infos
        dd = self.decision_delay
        M = sch.M
        layer_names = [f"L{x}" for x in sch.model.moe_layers]
        spans = log.compute_spans
        occupancy = log.occupancy
        stall_layer = np.zeros(M)
        xbytes = self.expert_bytes
        caps = cache.capacity
        per_layer = cache.per_layer is not None
        keeps = prefetch.keeps_cache
        has_start, has_routed = self._has_layer_start, self._has_routed
        touch = cache.touch
        advance, try_issue, request = copy.advance, copy.try_issue, copy.request
        carry = 0.0
        for r, (s_first, s_end) in enumerate(sch.request_steps):
            if carry:
                yield env.timeout(carry)
                carry = 0.0
            advance(env.now)
            log.request_start.append(env.now)
            times: list[float] = []
            log.token_times.append(times)
            self._apply(prefetch.on_request_start(r))
            try_issue()
            for s_idx in range(s_first, s_end):
                step = sch.steps[s_idx]
                g0 = step.g0
                # per-step coverage: share of the step's needed experts resident as it starts
                t_start = env.now + carry
                tot = hit0 = 0
                for g in range(g0, g0 + M):
                    for key in needed_all[g]:
                        tot += 1
                        st = state[key]
                        hit0 += st == RESIDENT or (st == LOADING and ready_at[key] <= t_start)
                log.coverage.append(hit0 / tot if tot else 1.0)
                for m in range(M):
                    g = g0 + m
                    self.g = g
                    if has_start:
                        if carry:
                            yield env.timeout(carry)
                            carry = 0.0
                        advance(env.now)
                        self._apply(prefetch.on_layer_start(infos[g]))
                        try_issue()
                    t = env.now + carry
                    yield env.timeout(carry + pre[g] + dd)
                    carry = 0.0
                    now = env.now
                    advance(now)
                    if spans is not None:
                        spans.append((t, now, f"attn+router {layer_names[m]}"))
                    needed = needed_all[g]
                    cap = caps[m if per_layer else 0]
                    waves = (needed,) if len(needed) <= cap else tuple(needed[i:i + cap] for i in range(0, len(needed), cap))
                    last = len(waves) - 1
                    for w, wave in enumerate(waves):
                        wait = None
                        missed: list[int] = []
                        for key in wave:
                            in_use[key] += 1
                            st = state[key]
                            if st == RESIDENT:
                                log.hits += 1
                                touch(key, g)
                            else:
                                if st == LOADING:
                                    log.late += 1
                                    log.late_wait += ready_at[key] - now
                                    touch(key, g)
                                else:
                                    log.misses += 1
                                    request(key, DEMAND)
                                    missed.append(key)
                                if wait is None:
                                    wait = set()
                                wait.add(key)
                            if st and prefetched[key]:
                                prefetched[key] = False
                                log.useful_prefetch_bytes += xbytes
                        held = wave
                        if not keeps:
                            # streaming moves the whole layer and computes once all of it landed
                            base = m * self.schedule.E
                            extra = tuple(x for x in range(base, base + self.schedule.E) if x not in wave)
                            for key in extra:
                                in_use[key] += 1
                                if state[key] != RESIDENT:
                                    request(key, DEMAND)
                                    if wait is None:
                                        wait = set()
                                    wait.add(key)
                            held = wave + extra
                        if has_routed and w == 0:
                            self._apply(prefetch.on_routed(infos[g], needed))
                        try_issue()
                        stall = 0.0
                        if wait:
                            # the stall needs no event of its own: nothing is decided when the
                            # experts land, so it is carried into the next timeout with the compute
                            t_ready = copy.ready_time(wait)
                            for key in missed:  # arrived on demand: count the use now
                                touch(key, g)
                            stall = t_ready - now
                            log.stall += stall
                            stall_layer[m] += stall
                            if spans is not None:
                                spans.append((now, t_ready, f"stall {layer_names[m]}"))
                            now = t_ready
                        dur = exp[g] if last == 0 else exp[g] * len(wave) / len(needed)
                        if spans is not None:
                            spans.append((now, now + dur, f"experts {layer_names[m]}"))
                        copy.hold(held, now + dur)
                        if w < last:
                            yield env.timeout(stall + dur)
                            now = env.now
                            advance(now)
                        else:
                            carry = stall + dur
                    if occupancy is not None:
                        occupancy.append((now, cache.resident_count()))
                if step.tail:
                    if spans is not None:
                        spans.append((env.now + carry, env.now + carry + step.tail, "head"))
                    carry += step.tail
                times.append(env.now + carry)
            if carry:
                yield env.timeout(carry)
                carry = 0.0
            advance(env.now)
            self._apply(prefetch.on_request_end(r))
            try_issue()
        log.stall_per_layer = stall_layer
