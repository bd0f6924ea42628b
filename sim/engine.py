"""The SimPy engine: the GPU compute stream drives the run; the copy stream moves experts.

Agents, long-lived, never one per token or transfer:
- the GPU compute stream, a SimPy process that drives the host controller (sim/host.py: prefill,
  then autoregressive steps or draft/verify cycles of each request in turn), answering each of its
  wait requests with a timeout;
- the host-to-device copy stream (sim/link.py), an exact timestamp model that the host advances
  lazily: between two host decisions it has no choices of its own, so it needs no events;
- the host controller (policies, the governor, demand fetches), which acts at the moments the
  host really sees: a layer's routing arriving ``decision_delay`` after it is known on the GPU,
  a draft token's ELB row arriving, a copy completing (``on_transfer_done``).
Since the compute stream is the only process that decides anything, SimPy's clock advances once
per target pass (and once per draft token); within a pass the host's decision times are exact,
kept in a local clock (docs/host-controller.md states the same-time order).

Per MoE layer-step: the layer's attention and router (plus dense layers since the last MoE layer)
run; the routing reaches the host ``decision_delay`` later; resident experts are hits, loading ones
are late, absent ones are demand-fetched; the compute stream stalls until all of the layer's
experts are resident, then runs their FFNs (one grouped kernel over the slot pool). If a step
needs more experts at one layer than its pool has slots (a long prefill), it runs in waves.
"""

from __future__ import annotations

import simpy

from sim.cache import ExpertCache
from sim.costmodel import CostModel
from sim.decisions import DecisionRecorder
from sim.errors import SimError
from sim.hardware import HardwareSpec
from sim.host import HostController, policy_context
from sim.link import CopyEngine, host_synchronous
from sim.policies.base import EvictionPolicy, PrefetchPolicy
from sim.runlog import RunLog
from sim.schedule import Schedule
from sim.spec import ModelSpec

__all__ = ["RunLog", "Simulation"]


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
        reset: str = "never",
        admission: bool = True,
        record_decisions: bool = False,
    ) -> None:
        self.schedule = schedule
        self.model, self.hw, self.cost = model, hw, cost
        self.env = simpy.Environment()
        self.log = log = RunLog()
        self.expert_bytes = model.bytes_per_expert()
        sch = schedule
        self.cache = cache = ExpertCache(sch.M, sch.E, eviction, slots=slots, per_layer=per_layer)
        self.prefetched = cache.prefetched
        cache.drop_on_release = not prefetch.keeps_cache
        if not prefetch.keeps_cache and min(cache.capacity) < sch.E:
            raise SimError(
                f"policy '{prefetch.name}' streams whole layers: it needs at least num_experts={sch.E} slots "
                f"per pool, the cache has {min(cache.capacity)}"
            )
        if timeline:
            log.compute_spans, log.copy_spans, log.occupancy = [], [], []
        transfer_s = cost.h2d(self.expert_bytes)
        self.copy = copy = CopyEngine(
            cache,
            nbytes=self.expert_bytes,
            transfer_time=transfer_s,
            issue_overhead=float(hw.copy_issue_overhead_s),
            copies_in_flight=int(hw.copies_in_flight),
            record=log.copy_spans,
            # copies from pageable memory (hardware.host_memory, or a policy's own: whole-layer
            # streaming) hold the host until they land: one at a time, the host controller held
            host_sync=host_synchronous(getattr(prefetch, "host_memory", None), hw.host_memory),
        )
        if predictor is not None:
            predictor.attach(sch.trace, sch.layer_steps(), lookahead_depths, seed)
        self.ctx = ctx = policy_context(sch, cache, copy.queue.queued, predictor, model.top_k)
        if reset == "request":  # Belady's (and any oracle's) future ends with the current request
            ctx.next_use = sch.next_use_in_request
            ctx.future = lambda g: sch.future(g) if g < sch.request_end(self.host.g) else ()
        eviction.attach(ctx, cache.num_pools)
        prefetch.attach(ctx)
        self.eviction, self.prefetch = eviction, prefetch
        self.host = host = HostController(
            sch, cache, copy, eviction=eviction, prefetch=prefetch, log=log,
            decision_delay=float(hw.decision_delay_s), expert_bytes=self.expert_bytes, transfer_s=transfer_s,
            copy_latency_s=float(hw.copy_latency_s), governor=governor, draft=draft,
            layer_names=[f"L{x}" for x in model.moe_layers], progress=progress, reset=reset, admission=admission,
        )
        if timeline or host.has_done:
            copy.on_done = host.copy_done
        # the run's decisions, for a replay (sim.decisions); after the run: recorder.decisions()
        self.recorder = DecisionRecorder(host) if record_decisions else None

    # --------------------------------------------------------------- driver
    def run(self) -> RunLog:
        proc = self.env.process(self._compute_stream())
        self.env.run(until=proc)
        log = self.log
        log.run_time = self.env.now
        log.bytes_moved = self.copy.bytes_moved
        log.copies = self.copy.copies
        log.link_busy = self.copy.busy_time
        log.evictions = self.cache.evictions
        log.wasted_prefetch_bytes = (self.cache.wasted_prefetches + sum(self.prefetched)) * self.expert_bytes
        return log

    def _compute_stream(self):
        """The SimPy process: every wait the host controller requests is a timeout."""
        env = self.env
        timeout = env.timeout
        run = self.host.drive()
        try:
            wait = next(run)
            while True:
                yield timeout(wait.dt)
                wait = run.send(env.now)
        except StopIteration:
            pass
