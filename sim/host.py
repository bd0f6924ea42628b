"""The host controller: every decision the host makes during a run, written once.

It owns routing classification (hit, late, miss), the policies' calls, applying their actions to the
copy queue, completions and releases in timestamp order (through the copy stream, sim/link.py), and
the demand waits; the speculative cycle (draft k, fill the Expert Lookahead Buffer, verify k + 1,
acceptance, the governor's calls, the cycle records) too, as per-cycle methods (``cycle_begin``,
``draft_token``, ``cycle_end``) that the simulator's ``speculative_request`` and the runtime's
``runtime.speculate.SpeculativeDecoder`` both drive. It has no clock of its own: it is a
generator that yields *wait requests* and is resumed with the time at which the wait is over.

- simulator (``live=False``): ``Sleep(dt)``, let ``dt`` seconds pass on the compute stream. The
  SimPy process answers with ``env.timeout(dt)``; the controller yields only where the compute
  stream must really wait for the host (once per target pass, once per draft token, at request
  boundaries), and keeps the host's decision times within a pass in a local clock, since the copy
  stream (``sim.link.CopyEngine``) is an exact model that it advances itself.
- runtime (``live=True``): ``LayerStart(g)``, ``Routing(g)``, ``Compute(...)`` and ``Block(mark)``:
  the executor answers them from the model's forward (layer hooks, the router's output, a kernel
  launch, a wait on a CUDA event or backend mark). The copy stream is then
  ``runtime.copystream.MarkStream``: the same ``CopyEngine`` (one issue point, one replay of
  completions and releases in timestamp order) fed with the times of the marks the host observes.

docs/host-controller.md describes the states, the waits and both drivers.

Same-time order, everywhere: at one instant, slot releases, then copy completions (each followed by
the issues it allows), then the host reads the routing; a copy landing exactly at a decision is a hit.
"""

from __future__ import annotations

from itertools import chain
from typing import Any, Iterator, NamedTuple

import numpy as np

from sim.cache import LOADING, RESIDENT, ExpertCache
from sim.errors import SimError
from sim.cycle_costs import ModelledCosts
from sim.governor import CycleCosts
from sim.policies.base import DEMAND, CycleInfo, EvictionPolicy, Fetch, PolicyContext, PrefetchPolicy
from sim.runlog import RunLog


class Sleep(NamedTuple):
    """Wait request (simulator): ``dt`` seconds pass on the compute stream; resume with the new time."""

    dt: float


class LayerStart(NamedTuple):
    """Wait request (runtime): resume (with None) once the compute stream reaches layer-step ``g``
    (its attention is about to run): only for policies with ``on_layer_start``."""

    g: int


class Routing(NamedTuple):
    """Wait request (runtime): the routing of layer-step ``g``; resume with its keys (a tuple)."""

    g: int


class Compute(NamedTuple):
    """Wait request (runtime): launch the experts ``wave`` (wave ``w`` of layer-step ``g``) on the
    compute stream, after the copies of the ``held`` experts it reads; ``late`` were still loading
    when the routing arrived. Resume with the launch's done mark."""

    g: int
    m: int
    w: int
    wave: tuple
    held: tuple
    late: tuple


class SpecCycle:
    """The state of one speculative cycle between ``cycle_begin`` and ``cycle_end``: request,
    position of its last emitted token, its number in the request, k, the governor's decision, the
    drafting time left, the copy stream's counters at its start and the ELB rows read so far."""

    __slots__ = ("r", "t", "n", "k", "decision", "remaining", "copies0", "busy0", "rows")

    def __init__(self, r: int, t: int, n: int, k: int, decision: Any, remaining: float, copies0: int,
                 busy0: float) -> None:
        self.r, self.t, self.n, self.k, self.decision = r, t, n, k, decision
        self.remaining, self.copies0, self.busy0 = remaining, copies0, busy0
        self.rows: list = []


class Block(NamedTuple):
    """Wait request (runtime): the host blocks until ``mark`` (a copy or a computation) is done;
    resume with None."""

    mark: Any


def policy_context(schedule: Any, cache: ExpertCache, queued: Any, predictor: Any, top_k: int) -> PolicyContext:
    """The facts policies read, from a schedule (replay: future, next use, layer-steps)."""
    return PolicyContext(
        num_moe_layers=schedule.M,
        num_experts=schedule.E,
        top_k=top_k,
        future=schedule.future,
        num_layer_steps=schedule.num_layer_steps,
        next_use=schedule.next_use,
        cached=cache.state.__getitem__,  # truthy when loading or resident
        layer_step=schedule.layer_step,
        queued=queued,
        predictor=predictor,
        extra={"pool_capacity": list(cache.capacity), "pool_of": cache.pool_of},  # admission (speq)
    )


def overridden(policy: Any, base: type, name: str) -> bool:
    """Whether ``policy`` implements hook ``name`` (the host skips calls to the base's no-ops); a
    wrapper that forwards its attributes (``__getattr__``) is asked for every hook."""
    return getattr(type(policy), name, None) is not getattr(base, name)


class HostController:
    """The host of one run: policies, the copy queue and stream, the cache, the counters.

    ``copy`` is the copy stream (``sim.link.CopyEngine``: the exact timestamp model). ``drive()`` is
    the generator of the whole run (every request of the schedule's trace, in order). Speculative
    runs: ``governor`` picks each cycle's k, ``costs`` prices cycles (default: the cost model's,
    ``sim.cycle_costs.ModelledCosts``), ``draft`` gives the simulator's ELB rows and acceptance (the
    runtime's driver brings its own); the runtime attaches them with ``use_governor``."""

    def __init__(
        self,
        schedule: Any,
        cache: ExpertCache,
        copy: Any,
        *,
        eviction: EvictionPolicy,
        prefetch: PrefetchPolicy,
        log: RunLog,
        decision_delay: float,
        expert_bytes: int,
        transfer_s: float,
        copy_latency_s: float = 0.0,
        governor: Any = None,
        draft: Any = None,
        costs: Any = None,
        top_k: int | None = None,
        layer_names: list[str] | None = None,
        progress: Any = None,
        reset: str = "never",
        live: bool = False,
        infos: list | None = None,
        admission: bool = True,
        measured: bool = False,
    ) -> None:
        if not live and (governor is None) != (draft is None):
            raise SimError("speculative decoding needs both a governor and a draft source")
        if reset not in ("never", "request"):
            raise SimError(f"cache.reset must be 'never' or 'request', got {reset!r}")
        self.schedule, self.cache, self.copy, self.log = schedule, cache, copy, log
        self.live = live  # the runtime drives (routing from the model, real copies and compute)
        self.prefetched = cache.prefetched
        self.has_layer_start = overridden(prefetch, PrefetchPolicy, "on_layer_start")
        self.has_routed = overridden(prefetch, PrefetchPolicy, "on_routed")
        self.has_done = overridden(prefetch, PrefetchPolicy, "on_transfer_done")
        # per layer-step: what the layer hooks see (the schedule builds them only when asked)
        self.infos = infos if infos is not None or not (self.has_layer_start or self.has_routed) else schedule.infos
        self.M, self.E = cache.num_layers, cache.num_experts
        self.eviction, self.prefetch = eviction, prefetch
        self.draft = draft  # the simulator's ELB rows and acceptance (sim.speculative.DraftSource)
        self.top_k = int(top_k if top_k is not None else schedule.model.top_k)
        if governor is not None and costs is None:
            costs = ModelledCosts(schedule, decision_delay, transfer_s, copy_latency_s)
        self.use_governor(governor, costs)
        self.cycle: SpecCycle | None = None  # the speculative cycle under way
        self.speculation_start()
        self.decision_delay = float(decision_delay)
        self.expert_bytes = expert_bytes
        self.transfer_s = transfer_s
        self.copy_latency_s = float(copy_latency_s)
        self.progress = progress  # e.g. a tqdm bar: update(1) after each request
        self.layer_names = layer_names or [f"m{m}" for m in range(self.M)]
        if overridden(prefetch, PrefetchPolicy, "admits"):  # asked on every load that must evict
            cache.admit = prefetch.admits
        self.g = 0
        self.now = 0.0  # the compute stream's time when the controller was last resumed
        self.carry = 0.0  # compute committed on the stream but not waited for (relative to now)
        self.host_blocked = 0.0  # simulator: pageable copies hold the host until then (see _held)
        self._copies_held = 0
        self.counts = [0, 0, 0, 0, 0.0, 0.0]  # hits, late, misses, useful, late_wait, stall
        self.stall_layer = [0.0] * self.M
        self.reset = reset
        # admission: the last routed layer-step, its routing time and the experts it waits for
        self.anchor: tuple[int, float, Any] | None = None
        self._routing_at: list[float] = []  # stall-free routing time of each layer-step (see admit)
        self._steps_timed = 0
        self._t_next = 0.0
        # live decoding without a plan: the measured time from one layer's experts starting to the
        # next routing (an EMA), and when the last routed layer-step's experts started
        self._layer_s: float | None = None
        self._exp_start: float | None = None
        # real hardware (the runtime on a real backend): its clock is not the plan's, so the layer
        # time is measured even where a schedule exists
        self.measured = measured or schedule is None
        copy.admit = self.admit if admission else None  # off: every prefetch goes out (tests, ablations)

    # ------------------------------------------------------------ admission
    def admit(self, for_g: int, confidence: float, start: float) -> bool:
        """Whether a prefetch for layer-step ``for_g`` that the link would start at ``start`` pays
        for itself; the copy queue asks as it would issue it (sim.link.CopyEngine.try_issue), so
        ``start`` already counts the bytes queued and in flight ahead of it.

        The head start ``h`` is the time from ``start`` to the layer-step's routing, when a
        demand fetch of the expert would be queued; D is one expert's transfer time. Right (with
        the predictor's confidence p: the share of its past predictions at that depth that were
        needed), the prefetch saves min(h, D). Wrong, its transfer occupies the link for D (a
        demand fetch behind it waits) and its eviction costs the evicted expert's transfer again
        with the measured refetch share q. It goes out only if p min(h, D) > (1 - p)(1 + q) D: a
        confidence threshold per predictor that rises as the time left shrinks."""
        h = self.routing_time(for_g) - start
        if h <= 0.0:
            return False
        D = self.copy.duration
        return confidence * min(h, D) > (1.0 - confidence) * (1.0 + self.cache.refetch_share) * D

    def routing_time(self, g: int) -> float:
        """When layer-step ``g``'s routing will reach the host, as the host estimates it now: the
        last routed layer-step's experts start once the experts it waits for have landed (the
        copy stream's model: ``ready_at``), then every layer runs stall-free (the schedule's
        compute times; on real hardware and in live decoding: the measured layer time instead)."""
        if self.measured:
            return self._measured_routing_time(g)
        at = self._routing_at
        if g >= len(at):
            self._time_steps()
            if g >= len(at):
                return float("inf")  # beyond the plan (a speculative pass not decided yet)
        if self.anchor is None:
            return at[g]  # before the first routing: the run starts at 0
        g0, t, wait = self.anchor
        if g <= g0:
            return float("-inf")  # routed already
        if wait:
            state, ready_at = self.cache.state, self.cache.ready_at
            for key in wait:
                if state[key] == LOADING and ready_at[key] > t:
                    t = ready_at[key]
        return t + at[g] - at[g0]

    def _measured_routing_time(self, g: int) -> float:
        """``routing_time`` from the measured layer time (the runtime on real hardware); before any
        measurement no prefetch is admitted."""
        if self.anchor is None or self._layer_s is None:
            return float("-inf")
        g0, t, wait = self.anchor
        if g <= g0:
            return float("-inf")
        if wait:
            state, ready_at = self.cache.state, self.cache.ready_at
            for key in wait:
                if state[key] == LOADING and ready_at[key] > t:
                    t = ready_at[key]
        return t + (g - g0) * self._layer_s

    def _layer_time(self, routed_at: float) -> None:
        """The runtime: a routing arrived; the time since the last layer-step's experts started is one
        sample of the stall-free layer time."""
        if self._exp_start is not None and routed_at > self._exp_start:
            x = routed_at - self._exp_start
            self._layer_s = x if self._layer_s is None else 0.8 * self._layer_s + 0.2 * x
        self._exp_start = routed_at

    def _time_steps(self) -> None:
        """Extend the stall-free routing times over the schedule's steps added since."""
        sch, dd, at = self.schedule, self.decision_delay, self._routing_at
        pre, exp = sch.pre, sch.exp
        t = self._t_next
        for s in sch.steps[self._steps_timed:]:
            for g in range(s.g0, s.g0 + sch.M):
                at.append(t + pre[g] + dd)
                t += pre[g] + dd + exp[g]
            t += s.tail
        self._t_next = t
        self._steps_timed = len(sch.steps)

    # ------------------------------------------------------------ host events
    def apply(self, actions) -> None:
        """A policy's actions onto the copy queue (sim.link.CopyQueue.apply)."""
        self.copy.queue.apply(actions, self.cache.state)

    def copy_done(self, key: int, t: float) -> None:
        """A copy completed (called by the copy stream, in completion order)."""
        if self.has_done:
            self.apply(self.prefetch.on_transfer_done(key))
        if self.log.occupancy is not None:
            self.log.occupancy.append((t, self.cache.resident_count()))

    def observe(self) -> float:
        """Bring the copy stream to the host's present; returns it."""
        if self.live:
            return self.copy.observe()
        self.copy.advance(self.now)
        return self.now

    def request_start(self, r: int) -> None:
        self.observe()
        self.apply(self.prefetch.on_request_start(r))
        self.copy.try_issue()
        self._held()

    def request_end(self, r: int) -> None:
        self.observe()
        self.apply(self.prefetch.on_request_end(r))
        self.copy.try_issue()
        self._held()

    def _held(self) -> None:
        """Simulator: copies from pageable memory hold the host until the last one issued lands
        (sim.link.host_synchronous); the runtime's backend blocks on them instead."""
        copy = self.copy
        if not self.live and copy.host_sync and copy.copies != self._copies_held:
            self._copies_held = copy.copies  # (the host is held from its present on, at least)
            t = copy.host_free if copy.host_free > self.now else self.now
            if t > self.host_blocked:
                self.host_blocked = t

    @property
    def hits(self) -> int:
        return self.counts[0]

    @property
    def late(self) -> int:
        return self.counts[1]

    @property
    def misses(self) -> int:
        return self.counts[2]

    @property
    def useful(self) -> int:
        return self.counts[3]

    def _settle(self) -> Iterator[Sleep]:
        """Wait for the compute already committed to the stream (and for the host, while pageable
        copies hold it)."""
        wait = self.carry
        if self.host_blocked - self.now > wait:
            wait = self.host_blocked - self.now
        if wait > 0:
            self.now = yield Sleep(wait)
        self.carry = 0.0

    def forget(self) -> None:
        """``cache.reset=request`` once nothing is in flight: empty the cache, clear every policy."""
        self.cache.clear()
        self.eviction.reset()
        self.prefetch.reset()

    def preload(self) -> Iterator[Any]:
        """The experts the prefetch policy keeps for good (a streaming policy's resident layers),
        copied before the first request as a model load does: they count in the bytes moved and
        the run's time, in no request's latency, and the run still starts cold for the bound."""
        keys = self.prefetch.preload(self.cache.capacity)
        if not keys:
            return
        copy = self.copy
        self.apply([Fetch(key, DEMAND) for key in keys])
        copy.try_issue()
        if self.live:
            yield from self._wait_landed(set(keys))
        else:
            t = copy.ready_time(set(keys))
            if t > self.now:
                self.now = yield Sleep(t - self.now)
        self.cache.pin(keys)

    def _wait_landed(self, keys: set[int]) -> Iterator[Block]:
        """Runtime: the host blocks until every key in ``keys`` is resident (their copies issued
        as room and slots free, then the last of them landed), processing the copy stream's events
        up to each mark it waited for: the model's ``ready_time``."""
        copy = self.copy
        blk = copy.blocker(keys)
        while blk is not None:
            yield Block(blk)
            copy.observe(blk)
            blk = copy.blocker(keys)
        landed = copy.last_landing(keys)
        if landed is not None:
            yield Block(landed)
            copy.observe(landed)

    def _cold_start(self) -> Iterator[Sleep]:
        """``cache.reset=request``: nothing queued is issued any more, every copy in flight lands,
        then the cache is emptied and every policy forgets what it learned."""
        copy = self.copy
        copy.queue.clear()
        copy.advance(self.now)
        while copy.in_flight:
            self.now = yield Sleep(copy.in_flight[-1][0] - self.now)
            copy.advance(self.now)
        self.forget()

    # --------------------------------------------------------------- the run
    def drive(self) -> Iterator[Sleep]:
        """The whole run: for each request, prefill, then autoregressive steps or speculative
        draft/verify cycles; the counters go to the log at the end."""
        sch, log = self.schedule, self.log
        yield from self.preload()
        for r in range(sch.trace.num_requests):
            yield from self._settle()
            if self.reset == "request":
                yield from self._cold_start()
            now = self.now
            log.request_start.append(now)
            times: list[float] = [now]  # the request start; dropped below
            self.request_start(r)
            if self.governor is None:
                s_first, s_end = sch.request_steps[r]
                for s_idx in range(s_first, s_end):
                    yield from self.target_pass(s_idx, times)
            else:
                yield from self.speculative_request(r, times)
            log.token_times.append(times[1:])
            yield from self._settle()
            self.request_end(r)
            if self.progress is not None:
                self.progress.update(1)
        c = self.counts
        log.hits, log.late, log.misses = c[0], c[1], c[2]
        log.useful_prefetch_bytes = c[3] * self.expert_bytes
        log.late_wait, log.stall = c[4], c[5]
        log.stall_per_layer = np.asarray(self.stall_layer)

    def speculative_request(self, r: int, times: list[float]) -> Iterator[Sleep]:
        """Prefill, then draft/verify cycles (sim/speculative.py states the replay rule): the
        simulator's driver of the cycle methods below. The draft runs on the GPU without waiting
        for the host; the host reads each ELB row ``decision_delay`` after its draft token ends,
        and the verify pass starts when the draft ends."""
        sch, log, draft = self.schedule, self.log, self.draft
        trace = sch.trace
        dd = self.decision_delay
        L = int(trace.lengths[r])
        P = int((trace.phase[r, :L] == 0).sum())
        if P == 0:
            raise SimError(f"request {int(trace.request_ids[r])} has no prefill token")
        yield from self.target_pass(sch.add_step(r, 0, P, 0, 0), times)
        self.speculation_start(t_prefill=times[-1] - times[0])
        ids_r = trace.expert_ids[r]
        spans = log.compute_spans
        t = P
        while t < L:
            gpu0 = gpu = self.now + self.carry  # the stream is free: the cycle starts
            if self.host_blocked > gpu:  # (or the host, once pageable copies let it go)
                gpu0 = gpu = self.host_blocked
            cyc = self.cycle_begin(r, t, L, ids_r[:t], gpu0)
            k = cyc.k
            for i in range(k):
                if self.host_blocked > gpu:  # pageable copies hold the host: it launches the token late
                    gpu = self.host_blocked
                dt = sch.draft_token_time(r, t + i)
                if spans is not None:
                    spans.append((gpu, gpu + dt, f"draft {i + 1}/{k}"))
                gpu += dt
                self.now = yield Sleep(max(0.0, gpu + dd - self.now))
                self.draft_token(i, draft.elb_row(r, t + i), dt)
            if k:
                self.carry = gpu - self.now
            a = draft.accepted(r, t, k)
            s_idx = sch.add_step(r, t, t + k + 1, cyc.n, 1, emitted=a + 1, draft_s=gpu - gpu0)
            yield from self.target_pass(s_idx, times)
            g0 = sch.steps[s_idx].g0
            self.cycle_end(a, times[-1] - gpu0, gpu - gpu0, sch.compute_time(s_idx, dd) - (gpu - gpu0),
                           sch.needed[g0:g0 + sch.M], log.coverage[-1])
            t += a + 1

    # ------------------------------------------------------------ the speculative cycle
    def use_governor(self, governor: Any, costs: Any) -> None:
        """Host speculative cycles: ``governor`` picks k (sim.governor), ``costs`` prices a cycle
        (sim.cycle_costs: the cost model's prices, or measured ones)."""
        self.governor, self.costs = governor, costs

    def speculation_start(self, t_prefill: float = 0.0) -> None:
        """A request's prefill is done (``t_prefill`` seconds: a TTFT cap's input); its cycles
        follow. The fetched-share estimate of |E_new(k)| starts afresh with each request."""
        self._t_prefill = t_prefill
        self._miss_share: float | None = None  # EMA: experts fetched / experts a verify pass needed
        self._cycle_no = 0

    def cycle_begin(self, r: int, t: int, L: int, history: Any, start: float) -> "SpecCycle":
        """A cycle of request ``r`` (``L`` tokens) begins with its last emitted token at position
        ``t``, the compute stream free at ``start`` (the copy stream's clock). ``history``: the
        expert ids [t, M, top_k] of the request's verified positions (an array, or a list of rows).
        The governor picks k from the cycle's costs; the prefetch policy learns of the cycle
        (``on_cycle_start``) and its copies are issued. Returns the cycle's state (``k``, ``n``)."""
        copy, xfer, costs = self.copy, self.costs.expert_transfer_s, self.costs
        self._cycle_no += 1
        costs.at(r, t, L)
        k_limit = L - 1 - t
        queued = len(copy.queue) + len(copy.in_flight)
        decision = self.governor.decide(CycleCosts(
            t_draft=costs.t_draft, t_verify=costs.t_verify,
            t_pcie_init=max(0.0, copy.link_free - start) + len(copy.queue) * xfer if queued else 0.0,
            t_overhead=costs.overhead_s, expert_transfer_s=xfer,
            new_experts=self._new_experts_fn(history), k_limit=k_limit, expert_bytes=self.expert_bytes,
            t_prefill=self._t_prefill,
        ))
        k = min(decision.k, k_limit)
        remaining = costs.t_draft(k)
        cyc = self.cycle = SpecCycle(r, t, self._cycle_no, k, decision, remaining, copy.copies, copy.busy_time)
        self.apply(self.prefetch.on_cycle_start(CycleInfo(
            request=r, t=t, k=k, t_draft_s=remaining, expert_transfer_s=xfer,
            slots=self.cache.total_slots, top_k=self.top_k)))
        copy.try_issue()
        self._held()
        return cyc

    def _new_experts_fn(self, history: Any):
        """|E_new(k)|, causally: the distinct experts of the last k + 1 positions already verified
        (how fast this request's union grows with window length), times the share of a verify
        pass's experts that recent cycles had to fetch (an EMA). Comparing the *previous* ELB with
        the cache instead would count experts of positions that are verified and cached by now."""
        share, M, E, top_k = self._miss_share, self.M, self.E, self.top_k
        if share is None:
            return lambda k: min(M * E, (k + 1) * top_k * M)
        memo: dict[int, float] = {}
        n = len(history)

        def new_experts(k: int) -> int:
            if k not in memo:
                lo = max(0, n - (k + 1))
                ids = np.sort(np.asarray(history[lo:]).transpose(1, 0, 2).reshape(M, -1), axis=1)
                memo[k] = int((np.diff(ids, axis=1) != 0).sum()) + M  # distinct ids per layer
                if n - lo < k + 1 and n - lo > 0:  # short history: extrapolate per position
                    memo[k] = memo[k] * (k + 1) / (n - lo)
            return int(round(share * memo[k]))

        return new_experts

    def draft_token(self, i: int, row: Any, dt: float) -> None:
        """Draft token ``i`` of the cycle took ``dt`` seconds and the host has read its ELB row
        ``row`` (the keys the draft's router picked at each MoE layer): the prefetch policy gets it
        with the number of copies the link can still finish while drafting goes on (the drafting
        time left, less the link time already committed), and its copies are issued."""
        cyc, copy = self.cycle, self.copy
        now = self.observe()
        cyc.remaining -= dt
        cyc.rows.append(row)
        xfer = self.costs.expert_transfer_s
        busy = max(0.0, copy.link_free - now) if copy.in_flight else 0.0
        budget = int((cyc.remaining - busy) / xfer) - len(copy.queue) if xfer > 0 else 0
        self.apply(self.prefetch.on_draft_token(i, row, budget))
        copy.try_issue()
        self._held()

    def cycle_end(self, accepted: int, observed_s: float, draft_s: float, verify_s: float,
                  needed: Any, coverage: float) -> dict[str, Any]:
        """The verify pass is done and ``accepted`` draft tokens matched: the governor learns the
        cycle (``observed_s``: draft start to verify end), the cost source its measured times, the
        fetched share its sample; the cycle's record (sim.metrics reads it) goes to the log.
        ``needed``: the verify pass's keys per MoE layer (distinct); ``coverage``: the share of its
        experts resident as it started."""
        cyc, copy = self.cycle, self.copy
        k, decision = cyc.k, cyc.decision
        self.governor.observe(k, accepted, observed_s)
        self.costs.observe(k, draft_s, verify_s)
        fetched = copy.copies - cyc.copies0
        rec = {
            "request": cyc.r, "cycle": cyc.n, "t": cyc.t, "k": k, "accepted": accepted, "emitted": accepted + 1,
            "observed_cycle_s": observed_s, "predicted_cycle_s": decision.predicted_cycle_s,
            "predicted_exposed_s": decision.predicted_cycle_exposed_s,
            "predicted_overlapped_s": decision.predicted_cycle_overlapped_s,
            "governor_phase": decision.phase, "predicted_new_experts": decision.new_experts,
            "t_draft": draft_s, "t_verify": verify_s,
            "bytes_moved": fetched * self.expert_bytes, "t_pcie": copy.busy_time - cyc.busy0,
            "coverage": coverage,
        }
        union = sum(len(keys) for keys in needed)
        # ELB recall: the verify pass's experts that the k drafted rows predicted, per layer
        elb_hits = 0
        rows = cyc.rows
        if rows:
            for m in range(self.M):
                elb = set().union(*(row[m] for row in rows))
                elb_hits += sum(1 for key in needed[m] if key in elb)
        rec.update(elb_hits=elb_hits, verify_experts=union)
        self.log.cycles.append(rec)
        share = fetched / union if union else 0.0
        ms = self._miss_share
        self._miss_share = share if ms is None else 0.7 * ms + 0.3 * share
        return rec

    def target_pass(self, s_idx: int, times: list[float] | None, *, decode: bool = True) -> Iterator[Any]:
        """One target pass (prefill, decode step or verify) through every MoE layer: the hot path.

        Simulator: the copy stream is an exact lazy model (sim/link.py), so within a pass the
        host's decision times are kept in a local clock and the pass yields once, at its end: the
        coarsest wait that still changes a decision. Compute that needs no decision is carried to the
        next decision point; a carried computation's experts stay in use until it ends (the copy
        stream releases them then, in order). Counters are locals, added at the end.

        Runtime (``live``; ``s_idx`` is then the pass's first layer-step, ``times`` None and
        ``decode`` whether the pass decodes or verifies, not a prefill, as the simulator reads it
        from the schedule: the layer coverage counts those, the prefill's copies apart): the
        same decisions, the routing, launches and host waits requested from the executor. The
        demand wait blocks the host until every needed copy is issued, the launch waits for the
        copies on the device, and the host then waits for the last of them to land, so that the
        copy stream's events until then are processed in this layer-step, before the next
        layer's, as the model does.

        Pageable copies (``copy.host_sync``) hold the host until they land: the simulator keeps
        that time (``hb``) and launches nothing before it, the runtime's backend blocks instead
        (docs/host-controller.md)."""
        cache, copy, log = self.cache, self.copy, self.log
        prefetch = self.prefetch
        live = self.live
        state, in_use, ready_at, prefetched = cache.state, cache.in_use, cache.ready_at, self.prefetched
        infos = self.infos
        dd = self.decision_delay
        M, E = self.M, self.E
        layer_names = self.layer_names
        spans = log.compute_spans
        occupancy = log.occupancy
        stall_layer = self.stall_layer
        caps = cache.capacity
        per_layer = cache.per_layer is not None
        keeps = prefetch.keeps_cache
        has_start, has_routed, has_done = self.has_layer_start, self.has_routed, self.has_done
        apply = self.apply
        pool_of = cache.pool_of
        accessed = cache.eviction.accessed
        use_is_insert = cache.eviction.insert_counts_as_use
        advance, try_issue, request, ready_time, hold = copy.advance, copy.try_issue, copy.request, copy.ready_time, copy.hold
        clock = self.now  # the host's time within this pass (the driver catches up at the end)
        hits = late = misses = useful = queued = 0
        late_wait = stall_total = cov_ready = cov_requested = 0.0
        carry = self.carry
        qentry = copy.queue._entry  # a miss whose key is queued as a prefetch was requested in time
        push, fetch_now, holds = copy.queue.push, copy.fetch_now, copy.holds
        plain = not live and keeps and not has_routed
        # pageable copies hold the host until they land (sim.link.host_synchronous): the host can
        # launch nothing before hb; the runtime's backend blocks on each such copy it issues
        sync = not live and copy.host_sync
        hb = self.host_blocked
        copies0 = copy.copies
        fresh = lates = None
        if live:
            g0 = s_idx
            track = decode  # (the per-step coverage comes from the executor's marks)
            observe, blocker = copy.observe, copy.blocker
        else:
            sch = self.schedule
            pre, exp, needed_all = sch.pre, sch.exp, sch.needed
            step = sch.steps[s_idx]
            g0 = step.g0
            track = step.phase != 0  # coverage is over decode and verify passes
            # per-step coverage: share of the step's needed experts resident as it starts
            t_start = clock + carry
            if sync and hb > t_start:
                t_start = hb
            keys = list(chain.from_iterable(needed_all[g0:g0 + M]))
            states = list(map(state.__getitem__, keys))
            hit0 = states.count(RESIDENT)
            if LOADING in states:  # landed by then
                hit0 += sum(1 for key, st in zip(keys, states) if st == LOADING and ready_at[key] <= t_start)
            log.coverage.append(hit0 / len(keys) if keys else 1.0)
            kind = "verify " if step.emitted > 1 or step.draft_s else ""
        for m in range(M):
            g = g0 + m
            self.g = copy.g = g
            if live:
                if has_start:
                    yield LayerStart(g)
                    observe()
                    acts = prefetch.on_layer_start(infos[g])
                    apply(acts)
                    try_issue()
                    fresh = None
                    if not keeps and acts:  # a pageable copy blocks the host (see below)
                        fresh = {a.key for a in acts}
                        yield from self._wait_landed(fresh)
                needed = yield Routing(g)
                now = observe()
                self._layer_time(now)
            else:
                # the layer's attn+router span starts where the stream's last work ended (the
                # pass's first: where the host, held by pageable copies, let it start), as the
                # runtime measures it: time the host is held falls into it
                t0 = None
                if has_start:
                    if carry > 0:
                        clock += carry
                    carry = 0.0
                    t0 = clock
                    if sync and hb > clock:
                        clock = hb
                        if m == 0:
                            t0 = hb
                    advance(clock)
                    acts = prefetch.on_layer_start(infos[g])
                    apply(acts)
                    try_issue()
                    fresh = None
                    if not keeps and acts:
                        # a pageable copy blocks the host (accelerate's offload): the layer's experts
                        # land one after another while nothing else is issued, then the layer starts;
                        # they count as misses at its routing and the wait as its stall
                        fresh = {a.key for a in acts}
                        t_ready = ready_time(fresh)
                        stall_total += t_ready - clock
                        stall_layer[m] += t_ready - clock
                        if spans is not None:
                            spans.append((clock, t_ready, f"pageable copy {layer_names[m]}"))
                        clock = t0 = t_ready
                    if sync and copy.host_free > hb:
                        hb = copy.host_free
                t = clock + carry
                if t0 is None:
                    t0 = hb if m == 0 and sync and hb > t else t
                if sync and hb > t:  # pageable copies hold the host: it launches the layer late
                    t = hb
                clock = now = t + pre[g] + dd
                carry = 0.0
                advance(now)
                if spans is not None:
                    spans.append((t0, now, f"{kind}attn+router {layer_names[m]}"))
                needed = needed_all[g]
            cap = caps[m if per_layer else 0]
            if len(needed) <= cap:
                waves = (needed,)
            else:
                waves = tuple(needed[i:i + cap] for i in range(0, len(needed), cap))
            last = len(waves) - 1
            h0, l0, q0 = hits, late, queued
            for w, wave in enumerate(waves):
                wait = None
                missed = None
                qw = queued
                if live:
                    lates = []
                # nothing queued and no hook before the issue: the misses go out directly, in order
                direct = not qentry and plain
                for key in wave:
                    in_use[key] += 1
                    st = state[key]
                    if st == RESIDENT:
                        if fresh is None or key not in fresh:
                            hits += 1
                        else:
                            misses += 1
                        accessed(key, pool_of[key], g)
                    else:
                        if st == LOADING:
                            late += 1
                            late_wait += ready_at[key] - now
                            accessed(key, pool_of[key], g)
                            if live:
                                lates.append(key)
                        else:
                            misses += 1
                            if direct:  # fetched below, in order (named twice: queued by its first miss)
                                queued += missed is not None and key in missed
                            else:
                                if key in qentry:
                                    queued += 1
                                push(key, DEMAND)  # absent: queued (or promoted) as a demand fetch
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
                self.anchor = (g, now, wait)
                if has_routed and w == 0:
                    apply(prefetch.on_routed(infos[g], needed))
                if not direct:
                    try_issue()
                elif missed:
                    fetch_now(missed)
                if live:
                    if wait:
                        # the host waits only until every copy it needs is issued (the slots they
                        # need free as copies land and computations end)
                        blk = blocker(wait)
                        while blk is not None:
                            yield Block(blk)
                            observe(blk)
                            blk = blocker(wait)
                    done = yield Compute(g, m, w, wave, held, tuple(lates))
                    if wait:
                        # the experts start once their copies have landed: what happened on the
                        # copy stream until the last of them landed belongs to this layer-step
                        yield from self._wait_landed(wait)
                        if copy.clock > self._exp_start:  # the experts start once they landed
                            self._exp_start = copy.clock
                    if missed:
                        for key in missed:  # arrived on demand: count the use now
                            accessed(key, pool_of[key], g)
                    hold(held, done)
                    if w < last:
                        yield Block(done)
                        observe(done)
                    continue
                stall = 0.0
                if sync:
                    if copy.host_free > hb:  # copies issued at the routing hold the host
                        hb = copy.host_free
                    hb_issue = hb
                if wait:
                    # the stall needs no wait of its own: nothing is decided when the experts
                    # land, so it is carried into the next wait with the compute
                    if direct and not qentry and not has_done:
                        # every needed copy is in flight and nothing can join the queue before
                        # they land: the last of them is the wait (ready_time's answer, in one
                        # step), and the eviction policy heard nothing since their loads
                        # (the stream is FIFO: the last copy issued lands last)
                        t_ready = ready_at[missed[-1]] if missed and queued == qw else max(map(ready_at.__getitem__, wait))
                        advance(t_ready)
                        uses_told = use_is_insert and queued == qw  # (queued: a key named twice)
                    else:
                        t_ready = ready_time(wait)
                        uses_told = False
                    if missed and not uses_told:
                        for key in missed:  # arrived on demand: count the use now
                            accessed(key, pool_of[key], g)
                    stall = t_ready - now
                    stall_total += stall
                    stall_layer[m] += stall
                    if spans is not None:
                        spans.append((now, t_ready, f"stall {layer_names[m]}"))
                    now = t_ready
                if sync and hb_issue > now:  # the host, held by a pageable copy, launches the experts late
                    stall += hb_issue - now
                    stall_total += hb_issue - now
                    stall_layer[m] += hb_issue - now
                    if spans is not None:
                        spans.append((now, hb_issue, f"stall {layer_names[m]}"))
                    now = hb_issue
                dur = exp[g] if last == 0 else exp[g] * len(wave) / len(needed)
                if spans is not None:
                    spans.append((now, now + dur, f"{kind}experts {layer_names[m]}"))
                holds.append((now + dur, held))  # copy.hold, inlined
                if sync:
                    if copy.host_free > hb:  # copies issued as the needed ones landed hold it too
                        hb = copy.host_free
                    if w == last and m < M - 1:
                        # the runtime's host, once the layer's experts are launched, observes the copy
                        # stream up to its present, at most their end (between waves: their end, below);
                        # what it issues then belongs to the next layer-step
                        copy.g = g + 1
                        advance(min(max(hb, now), now + dur))
                        if copy.host_free > hb:
                            hb = copy.host_free
                if w < last:
                    clock = now = now + dur
                    advance(now)
                else:
                    carry = stall + dur
            if track:
                n_needed = len(needed)
                cov_ready += (hits - h0) / n_needed
                cov_requested += (hits - h0 + late - l0 + queued - q0) / n_needed
            if live:
                # while the experts compute, copies that have landed free room on the copy stream:
                # issue the next queued ones now (they belong to the next layer-step, as in the
                # model); after the pass's last layer the next event may be the request's end
                if m < M - 1:
                    self.g = copy.g = g + 1
                    observe(done)
            elif occupancy is not None:
                occupancy.append((now, cache.resident_count()))
        if live:
            c = self.counts
            c[0] += hits
            c[1] += late
            c[2] += misses
            c[3] += useful
            self._pass_done(track, cov_ready, cov_requested, copies0)
            return
        t0 = clock + carry
        if sync and hb > t0:  # pageable copies hold the host: it launches the head late
            carry = hb - clock
        if step.tail:
            if spans is not None:
                spans.append((t0, clock + carry + step.tail, "head"))
            carry += step.tail
        end = clock + carry
        prev = times[-1]
        n = step.emitted
        times.extend(prev + (end - prev) * (j + 1) / n for j in range(n - 1))
        times.append(end)
        if clock > self.now:
            self.now = yield Sleep(clock - self.now)
        self.carry = carry  # relative to clock, which the driver's clock now equals
        self.host_blocked = hb
        c = self.counts
        c[0] += hits
        c[1] += late
        c[2] += misses
        c[3] += useful
        c[4] += late_wait
        c[5] += stall_total
        self._pass_done(track, cov_ready, cov_requested, copies0)

    def _pass_done(self, decode: bool, cov_ready: float, cov_requested: float, copies0: int) -> None:
        """A pass's layer coverage (decode and verify passes) or its copies (a prefill's) into the log."""
        log = self.log
        if decode:
            log.coverage_ready_sum += cov_ready
            log.coverage_requested_sum += cov_requested
            log.coverage_layers += self.M
        else:
            log.prefill_copies += self.copy.copies - copies0
