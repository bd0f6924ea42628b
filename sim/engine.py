"""The SimPy engine: the GPU compute stream drives the run; the copy stream moves experts.

Agents (anchors-sim §7.4), long-lived, never one per token or transfer:
- the GPU compute stream, a SimPy process: the decode driver (prefill, then autoregressive steps
  or draft/verify cycles of each request in turn);
- the host-to-device copy stream (sim/link.py), an exact timestamp model that the host advances
  lazily: between two host decisions it has no choices of its own, so it needs no events;
- the host controller (policies, the governor, demand fetches), which acts at the moments the
  host really sees: a layer's routing arriving ``decision_delay`` after it is known on the GPU,
  a draft token's ELB row arriving, a copy completing (``on_transfer_done``).
Since the compute stream is the only process that decides anything, SimPy's clock advances once
per target pass (and once per draft token); within a pass the host's decision times are exact,
kept in a local clock. Same-time order: at one instant, slot releases, then copy completions (each
followed by the issues it allows), then the host reads the routing; a copy landing exactly at a
decision is a hit (tested).

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
from sim.governor import CycleCosts
from sim.policies.base import DEMAND, CycleInfo, EvictionPolicy, PolicyContext, PrefetchPolicy
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
    cycles: list[dict] = field(default_factory=list)  # speculative: one record per draft/verify cycle


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
        governor=None,
        draft=None,
        progress=None,
    ) -> None:
        self.schedule = schedule
        self.model, self.hw, self.cost = model, hw, cost
        self.governor, self.draft = governor, draft
        self.progress = progress  # e.g. a tqdm bar: update(1) after each request
        if (governor is None) != (draft is None):
            raise SimError("speculative decoding needs both a governor and a draft source")
        self.env = simpy.Environment()
        self.log = RunLog()
        self.g = 0
        self.expert_bytes = model.bytes_per_expert()
        self.decision_delay = float(hw.decision_delay_s)
        self.timeline = timeline
        sch = schedule
        self.cache = ExpertCache(sch.M, sch.E, eviction, slots=slots, per_layer=per_layer)
        self.prefetched = self.cache.prefetched
        self.cache.drop_on_release = not prefetch.keeps_cache
        if predictor is not None:
            predictor.attach(sch.trace, sch, lookahead_depths, seed)
        self.ctx = PolicyContext(
            num_moe_layers=sch.M,
            num_experts=sch.E,
            top_k=model.top_k,
            future=sch.future,
            num_layer_steps=sch.num_layer_steps,
            next_use=sch.next_use,
            cached=self.cache.state.__getitem__,  # truthy when loading or resident
            layer_step=sch.layer_step,
            predictor=predictor,
            extra={"schedule": sch, "seed": seed},
        )

        eviction.attach(self.ctx, self.cache.num_pools)
        prefetch.attach(self.ctx)
        self.eviction, self.prefetch = eviction, prefetch
        if timeline:
            self.log.compute_spans, self.log.copy_spans, self.log.occupancy = [], [], []
        self.copy = copy = CopyEngine(
            self.cache,
            nbytes=self.expert_bytes,
            transfer_time=cost.h2d(self.expert_bytes),
            issue_overhead=float(hw.copy_issue_overhead_s),
            copies_in_flight=int(hw.copies_in_flight),
            on_done=self._copy_done if (timeline or self._needs_done(prefetch)) else None,
            record=self.log.copy_spans,
        )
        self.ctx.queued = copy.queue._entry.__contains__  # the policies' view of the host queue
        if not prefetch.keeps_cache and min(self.cache.capacity) < sch.E:
            raise SimError(
                f"policy '{prefetch.name}' streams whole layers: it needs at least num_experts={sch.E} slots "
                f"per pool, the cache has {min(self.cache.capacity)}"
            )
        cls = type(prefetch)
        self._has_layer_start = cls.on_layer_start is not PrefetchPolicy.on_layer_start
        self._has_routed = cls.on_routed is not PrefetchPolicy.on_routed
        self._has_done = cls.on_transfer_done is not PrefetchPolicy.on_transfer_done
        self._layer_names = [f"L{x}" for x in model.moe_layers]

    @staticmethod
    def _needs_done(prefetch: PrefetchPolicy) -> bool:
        return type(prefetch).on_transfer_done is not PrefetchPolicy.on_transfer_done

    # ------------------------------------------------------------ callbacks
    def _copy_done(self, key: int, t: float) -> None:
        if self._has_done:
            self._apply(self.prefetch.on_transfer_done(key))
        if self.log.occupancy is not None:
            self.log.occupancy.append((t, self.cache.resident_count()))

    def _apply(self, actions) -> None:
        self.copy.queue.apply(actions, self.cache.state)

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
        log.wasted_prefetch_bytes = (self.cache.wasted_prefetches + sum(self.prefetched)) * self.expert_bytes
        return log

    def _driver(self):
        """The decode driver on the GPU compute stream: for each request, prefill, then
        autoregressive steps or speculative draft/verify cycles. ``self._carry`` is compute already
        committed on the stream but not yet waited for (negative when the host is ahead of it)."""
        env, sch, copy, log = self.env, self.schedule, self.copy, self.log
        prefetch = self.prefetch
        self._carry = 0.0
        self._counts = [0, 0, 0, 0, 0.0, 0.0]  # hits, late, misses, useful, late_wait, stall
        self._stall_layer = [0.0] * sch.M
        for r in range(self.schedule.trace.num_requests):
            if self._carry > 0:
                yield env.timeout(self._carry)
            self._carry = 0.0
            copy.advance(env.now)
            log.request_start.append(env.now)
            times: list[float] = [env.now]  # the request start; dropped below
            self._apply(prefetch.on_request_start(r))
            copy.try_issue()
            if self.governor is None:
                s_first, s_end = sch.request_steps[r]
                for s_idx in range(s_first, s_end):
                    yield from self._target_step(s_idx, times)
            else:
                yield from self._speculative_request(r, times)
            log.token_times.append(times[1:])
            if self._carry > 0:
                yield env.timeout(self._carry)
            self._carry = 0.0
            copy.advance(env.now)
            self._apply(prefetch.on_request_end(r))
            copy.try_issue()
            if self.progress is not None:
                self.progress.update(1)
        c = self._counts
        log.hits, log.late, log.misses = c[0], c[1], c[2]
        log.useful_prefetch_bytes = c[3] * self.expert_bytes
        log.late_wait, log.stall = c[4], c[5]
        log.stall_per_layer = np.asarray(self._stall_layer)

    def _speculative_request(self, r: int, times: list[float]):
        """Prefill, then draft/verify cycles (sim/speculative.py states the replay rule)."""
        env, sch, copy, cache, log = self.env, self.schedule, self.copy, self.cache, self.log
        trace, draft, governor, prefetch = sch.trace, self.draft, self.governor, self.prefetch
        dd = self.decision_delay
        L = int(trace.lengths[r])
        P = int((trace.phase[r, :L] == 0).sum())
        if P == 0:
            raise SimError(f"request {int(trace.request_ids[r])} has no prefill token")
        yield from self._target_step(sch.add_step(r, 0, P, 0, 0), times)
        xfer = self.cost.h2d(self.expert_bytes)
        miss_share: float | None = None  # EMA: experts fetched / experts a verify pass needed
        t, cycle = P, 0
        while t < L:
            cycle += 1
            gpu0 = env.now + self._carry  # the stream is free: the cycle starts
            draft_memo: dict[int, float] = {}
            union_memo: dict[int, float] = {}

            def t_draft(k: int, t=t, memo=draft_memo) -> float:
                if k not in memo:
                    memo[k] = sum(sch.draft_token_time(r, t + i) for i in range(min(k, L - 1 - t)))
                return memo[k]

            def t_verify(n: int, t=t) -> float:
                return sch.verify_estimate(n, int(trace.position[r, min(t + n, L) - 1]) + 1, dd)

            def new_experts(k: int, t=t, memo=union_memo) -> int:
                """|E_new(k)|, causally: the distinct experts of the last k + 1 positions already
                verified (how fast this request's union grows with window length), times the share
                of a verify pass's experts that recent cycles had to fetch (an EMA). Comparing the
                *previous* ELB with the cache instead would count experts of positions that are
                verified and cached by now."""
                if miss_share is None:
                    return min(sch.M * sch.E, (k + 1) * sch.model.top_k * sch.M)
                if k not in memo:
                    lo = max(0, t - (k + 1))
                    ids = np.sort(trace.expert_ids[r, lo:t].transpose(1, 0, 2).reshape(sch.M, -1), axis=1)
                    memo[k] = int((np.diff(ids, axis=1) != 0).sum()) + sch.M  # distinct ids per layer
                    if t - lo < k + 1 and t - lo > 0:  # short history: extrapolate per position
                        memo[k] = memo[k] * (k + 1) / (t - lo)
                return int(round(miss_share * memo[k]))

            queued = len(copy.queue) + len(copy.in_flight)
            costs = CycleCosts(
                t_draft=t_draft, t_verify=t_verify,
                t_pcie_init=max(0.0, copy.link_free - gpu0) + len(copy.queue) * xfer if queued else 0.0,
                t_overhead=float(self.hw.copy_latency_s) + dd, expert_transfer_s=xfer,
                new_experts=new_experts, k_limit=L - 1 - t, expert_bytes=self.expert_bytes,
            )
            decision = governor.decide(costs)
            k = min(decision.k, L - 1 - t)
            bytes0, busy0 = copy.copies, copy.busy_time
            self._apply(prefetch.on_cycle_start(CycleInfo(
                request=r, t=t, k=k, t_draft_s=t_draft(k), expert_transfer_s=xfer,
                slots=cache.total_slots, top_k=sch.model.top_k)))
            copy.try_issue()
            # drafting: the draft runs on the GPU without waiting for the host; the host reads each
            # ELB row ``decision_delay`` after its draft token ends
            rows = []
            gpu = gpu0
            remaining = t_draft(k)
            for i in range(k):
                dt = sch.draft_token_time(r, t + i)
                if self.log.compute_spans is not None:
                    self.log.compute_spans.append((gpu, gpu + dt, f"draft {i + 1}/{k}"))
                gpu += dt
                remaining -= dt
                yield env.timeout(max(0.0, gpu + dd - env.now))
                copy.advance(env.now)
                row = draft.elb_row(r, t + i)
                rows.append(row)
                busy = max(0.0, copy.link_free - env.now) if copy.in_flight else 0.0
                budget = int((remaining - busy) / xfer) - len(copy.queue) if xfer > 0 else 0
                self._apply(prefetch.on_draft_token(i, row, budget))
                copy.try_issue()
            if k:
                self._carry = gpu - env.now
            a = draft.accepted(r, t, k)
            s_idx = sch.add_step(r, t, t + k + 1, cycle, 1, emitted=a + 1, draft_s=gpu - gpu0)
            yield from self._target_step(s_idx, times)
            observed = times[-1] - gpu0
            governor.observe(k, a, observed)
            log.cycles.append({
                "request": r, "cycle": cycle, "t": t, "k": k, "accepted": a, "emitted": a + 1,
                "observed_cycle_s": observed, "predicted_cycle_s": decision.predicted_cycle_s,
                "predicted_exposed_s": decision.predicted_cycle_exposed_s,
                "predicted_overlapped_s": decision.predicted_cycle_overlapped_s,
                "governor_phase": decision.phase, "predicted_new_experts": decision.new_experts,
                "t_draft": gpu - gpu0, "t_verify": sch.compute_time(s_idx, dd) - (gpu - gpu0),
                "bytes_moved": (copy.copies - bytes0) * self.expert_bytes, "t_pcie": copy.busy_time - busy0,
                "coverage": log.coverage[-1],
            })
            union = sum(len(sch.needed[g]) for g in range(sch.steps[s_idx].g0, sch.steps[s_idx].g0 + sch.M))
            share = (copy.copies - bytes0) / union if union else 0.0
            miss_share = share if miss_share is None else 0.7 * miss_share + 0.3 * share
            t += a + 1

    def _target_step(self, s_idx: int, times: list[float]):
        """One target pass (prefill, decode step or verify) through every MoE layer.

        The compute stream is the only SimPy process that decides anything (the copy stream is an
        exact lazy model, sim/link.py), so within a pass the host's decision times are kept in a
        local clock and SimPy's clock is advanced once, at the end of the pass: the coarsest event
        that still changes a decision (anchors-sim §7.4). Compute that needs no decision is
        carried to the next decision point; a carried computation's experts stay in use until it
        ends (the copy stream releases them then, in order). Counters are locals, added at the end."""
        env, sch, cache, copy, log = self.env, self.schedule, self.cache, self.copy, self.log
        prefetch = self.prefetch
        state, in_use, ready_at, prefetched = cache.state, cache.in_use, cache.ready_at, self.prefetched
        pre, exp, needed_all, infos = sch.pre, sch.exp, sch.needed, sch.infos
        dd = self.decision_delay
        M, E = sch.M, sch.E
        layer_names = self._layer_names
        spans = log.compute_spans
        occupancy = log.occupancy
        stall_layer = self._stall_layer
        caps = cache.capacity
        per_layer = cache.per_layer is not None
        keeps = prefetch.keeps_cache
        has_start, has_routed = self._has_layer_start, self._has_routed
        pool_of = cache.pool_of
        accessed = cache.eviction.accessed
        advance, try_issue, request, ready_time, hold = copy.advance, copy.try_issue, copy.request, copy.ready_time, copy.hold
        clock = env.now  # the host's time within this pass (SimPy catches up at the end)
        hits = late = misses = useful = 0
        late_wait = stall_total = 0.0
        carry = self._carry
        step = sch.steps[s_idx]
        g0 = step.g0
        # per-step coverage: share of the step's needed experts resident as it starts
        t_start = clock + carry
        tot = hit0 = 0
        for g in range(g0, g0 + M):
            for key in needed_all[g]:
                tot += 1
                st = state[key]
                hit0 += st == RESIDENT or (st == LOADING and ready_at[key] <= t_start)
        log.coverage.append(hit0 / tot if tot else 1.0)
        kind = "verify " if step.emitted > 1 or step.draft_s else ""
        for m in range(M):
            g = g0 + m
            self.g = copy.g = g
            if has_start:
                if carry > 0:
                    clock += carry
                carry = 0.0
                advance(clock)
                self._apply(prefetch.on_layer_start(infos[g]))
                try_issue()
            t = clock + carry
            clock = now = t + pre[g] + dd
            carry = 0.0
            advance(now)
            if spans is not None:
                spans.append((t, now, f"{kind}attn+router {layer_names[m]}"))
            needed = needed_all[g]
            cap = caps[m if per_layer else 0]
            if len(needed) <= cap:
                waves = (needed,)
            else:
                waves = tuple(needed[i:i + cap] for i in range(0, len(needed), cap))
            last = len(waves) - 1
            for w, wave in enumerate(waves):
                wait = None
                missed = None
                for key in wave:
                    in_use[key] += 1
                    st = state[key]
                    if st == RESIDENT:
                        hits += 1
                        accessed(key, pool_of[key], g)
                    else:
                        if st == LOADING:
                            late += 1
                            late_wait += ready_at[key] - now
                            accessed(key, pool_of[key], g)
                        else:
                            misses += 1
                            request(key, DEMAND)
                            if missed is None:
                                missed = [key]
                            else:
                                missed.append(key)
                        if wait is None:
                            wait = {key}
                        else:
                            wait.add(key)
                    if st and prefetched[key]:
                        prefetched[key] = False
                        useful += 1
                held = wave
                if not keeps:
                    # streaming moves the whole layer and computes once all of it landed
                    extra = tuple(x for x in range(m * E, (m + 1) * E) if x not in wave)
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
                    # the stall needs no event of its own: nothing is decided when the experts
                    # land, so it is carried into the next timeout with the compute
                    t_ready = ready_time(wait)
                    if missed:
                        for key in missed:  # arrived on demand: count the use now
                            accessed(key, pool_of[key], g)
                    stall = t_ready - now
                    stall_total += stall
                    stall_layer[m] += stall
                    if spans is not None:
                        spans.append((now, t_ready, f"stall {layer_names[m]}"))
                    now = t_ready
                dur = exp[g] if last == 0 else exp[g] * len(wave) / len(needed)
                if spans is not None:
                    spans.append((now, now + dur, f"{kind}experts {layer_names[m]}"))
                hold(held, now + dur)
                if w < last:
                    clock = now = now + dur
                    advance(now)
                else:
                    carry = stall + dur
            if occupancy is not None:
                occupancy.append((now, cache.resident_count()))
        if step.tail:
            if spans is not None:
                spans.append((clock + carry, clock + carry + step.tail, "head"))
            carry += step.tail
        end = clock + carry
        prev = times[-1]
        n = step.emitted
        times.extend(prev + (end - prev) * (j + 1) / n for j in range(n - 1))
        times.append(end)
        if clock > env.now:
            yield env.timeout(clock - env.now)
        self._carry = carry  # relative to clock, which SimPy's clock now equals
        c = self._counts
        c[0] += hits
        c[1] += late
        c[2] += misses
        c[3] += useful
        c[4] += late_wait
        c[5] += stall_total
