"""The offloading executor: one measured run of one policy, with routed experts in host memory
(runtime/store.py), a fixed pool of device slots, and the simulator's own host controller
(sim/host.py) and policy objects deciding what to evict, prefetch and wait for.

- **SlotCache**: ``sim.cache.ExpertCache`` (the simulator's slot bookkeeping: states, in-use
  counts, the eviction policy's calls) plus the physical slot each key occupies.
- **Run**: hosts ``sim.host.HostController`` in its runtime mode. The model's forward drives it:
  ``begin_step`` starts the controller's target pass, each MoE layer's pre-hook and experts call
  answer its requests (the layer is starting, the routing, launch a wave of experts, block on a
  mark). Copies go through ``runtime.copystream.MarkStream``: the simulator's copy stream model
  (queue, issue point, replay of completions and releases in timestamp order) with real copies,
  fed with the times of the marks the host observes. A copy into a slot waits (on the device) for
  the mark recorded after the last computation that read the slot; a computation waits (on the
  device) for the copy marks of its experts; the host only blocks when the decode loop needs it
  (the routing of each MoE layer, a demand copy that cannot be issued yet, request boundaries).
- **LiveGatePredictor**: next-layer gate lookahead computed live on the device.

Policies are the simulator's classes (``sim.policies`` registries), attached to the same
``PolicyContext`` the simulator builds (replay) or one without the future (live decoding).
On ``runtime.backends.VirtualBackend`` (deterministic virtual time, the simulator's durations) the
run makes exactly the simulator's decisions (tests/test_runtime_executor.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Sequence

import torch
from torch import nn

from runtime.backends import VirtualBackend
from runtime.copystream import MarkStream
from runtime.errors import ExecutorError
from runtime.models import LoadedModel
from runtime.routing import lookahead_route, sort_by_weight
from sim.cache import LOADING, RESIDENT, ExpertCache
from sim.decisions import DecisionRecorder
from sim.host import Block, Compute, HostController, LayerStart, Routing, policy_context
from sim.link import host_synchronous
from sim.policies.base import EvictionPolicy, PolicyContext, PrefetchPolicy
from sim.runlog import RunLog

if TYPE_CHECKING:
    from runtime.offloaded import OffloadedModel

NEVER = 1 << 62


class SlotCache(ExpertCache):
    """The simulator's ExpertCache (states, in-use counts, eviction calls) plus physical slots:
    a slot freed by an eviction is the one the new expert is copied into."""

    def __init__(self, num_moe_layers: int, num_experts: int, eviction: EvictionPolicy, *,
                 slots: int | None = None, per_layer: int | None = None) -> None:
        super().__init__(num_moe_layers, num_experts, eviction, slots=slots, per_layer=per_layer)
        self.slot_of: dict[int, int] = {}
        self.free: list[list[int]] = []
        base = 0
        for cap in self.capacity:
            self.free.append(list(range(base + cap - 1, base - 1, -1)))  # pop() gives the lowest first
            base += cap

    def vacate(self, key: int, pool: int) -> None:
        self.free[pool].append(self.slot_of.pop(key))
        super().vacate(key, pool)

    def load(self, key: int, ready_at: float, g: int) -> bool:
        if not super().load(key, ready_at, g):
            return False
        self.slot_of[key] = self.free[self.pool_of[key]].pop()
        return True


class LiveGatePredictor:
    """Next-layer gate lookahead computed live: while MoE layer l runs, layer l+d's router applied
    to layer l's post-attention residual (normalised by layer l+d's post-attention norm) names the
    experts l+d will need, for d = 1..depth. The runtime counterpart of the trace's
    ``lookahead_<d>`` columns (predictor ``recorded`` in replay); same ``lookahead(g, d)`` answer as
    ``sim.policies.predictors.Predictor``: keys of the target layer, weight order for one token,
    the sorted union over tokens for a multi-token step, empty where l+d is dense or past the end."""

    name = "live-gate"

    def __init__(self, depth: int = 1, record: bool = False) -> None:
        self.depth = int(depth)
        self._answers: dict[tuple[int, int], tuple[int, ...]] = {}
        self.history: list[tuple[int, int, tuple[int, ...]]] | None = [] if record else None  # (g, d, keys)
        self.rows: dict[tuple[int, int], list[list[int]]] = {}  # (g, d) -> predicted ids per token (executed trace)

    def attach_live(self, loaded: LoadedModel) -> None:
        self.handles = loaded.handles
        self.moe = list(loaded.shape.moe_layers)
        self.E = loaded.shape.num_experts
        self.ordinal = {l: m for m, l in enumerate(self.moe)}
        self.resid: dict[int, torch.Tensor] = {}
        self._hooks = []
        for l in self.moe:
            if self.targets(l):
                self._hooks.append(self.handles[l].post_norm.register_forward_pre_hook(self._keep(l)))

    def targets(self, layer: int) -> list[tuple[int, int]]:
        """(d, target MoE ordinal) of the MoE layers reachable from decoder layer ``layer``."""
        return [(d, self.ordinal[layer + d]) for d in range(1, self.depth + 1) if (layer + d) in self.ordinal]

    def _keep(self, layer: int):
        def hook(module, args):
            self.resid[layer] = args[0].detach()
            return None

        return hook

    def predict(self, m: int) -> list[tuple[int, int, torch.Tensor]]:
        """Device tensors of predicted ids [T, k] (weight order) per (d, target ordinal)."""
        layer = self.moe[m]
        x = self.resid.pop(layer, None)
        if x is None:
            return []
        x = x.reshape(-1, x.shape[-1])
        return [(d, tm, lookahead_route(self.handles[self.moe[tm]], x)[1]) for d, tm in self.targets(layer)]

    def set(self, g: int, d: int, tm: int, ids: list[list[int]]) -> None:
        E = self.E
        if len(ids) == 1:
            keys = tuple(tm * E + int(e) for e in ids[0])
        else:
            keys = tuple(tm * E + e for e in sorted({int(e) for row in ids for e in row}))
        self._answers[(g, d)] = keys
        self.rows[(g, d)] = ids
        if self.history is not None:
            self.history.append((g, d, keys))

    def lookahead(self, g: int, d: int) -> tuple[int, ...]:
        return self._answers.pop((g, d), ())

    def close(self) -> None:
        for h in getattr(self, "_hooks", []):
            h.remove()
        self._hooks = []


@dataclass(slots=True)
class LayerInfo:
    """What a policy may know about one layer-step (sim.policies.base.LayerStep)."""

    g: int
    request: int
    step: int
    m: int


@dataclass
class StepRecord:
    request: int
    step: int
    g0: int
    n_tokens: int
    start: Any = None
    token: Any = None
    coverage: float = 1.0
    emitted: int = 1
    s_idx: int | None = None  # the schedule's step (replay)
    resident: int = 0  # needed experts resident as the host began the step (replay)
    loading: list[Any] = field(default_factory=list)  # done marks of needed experts then loading
    needed: int = 0


@dataclass
class LayerRecord:
    """Marks of one layer-step: routing known, per wave (waits done, experts done)."""

    g: int
    m: int
    routed: Any
    waves: list[tuple[Any, Any]] = field(default_factory=list)
    late: list[Any] = field(default_factory=list)  # done marks of experts that were still loading
    resident_after: int = 0


@dataclass
class RunConfig:
    """Everything a run needs besides the model (one policy at one slot layout)."""

    eviction: EvictionPolicy
    prefetch: PrefetchPolicy
    predictor: Any = None
    slots: int | None = None
    per_layer: int | None = None
    copies_in_flight: int = 4
    decision_delay_s: float = 0.0  # the hardware spec's term; subtracted from measured gaps (stall)
    schedule: Any = None  # sim.schedule.Schedule in replay (future, next_use, layer steps)
    seed: int = 0
    link_pace_gbps: float | None = None
    timeline: bool = True
    exec_log: bool = False
    # the copy stream model's times (sim.link.CopyEngine): one expert's transfer and the host's
    # issue overhead; the virtual backend's copies take them, real backends ignore them
    transfer_s: float = 0.0
    issue_overhead_s: float = 0.0
    # the host's prefetch admission rule (sim.host.HostController.admit); off: every prefetch goes out
    admission: bool = True
    reset: str = "never"  # cache.reset: 'request' empties the cache and every policy's state per request
    # record the run's decisions (sim.decisions.DecisionRecorder: prefetches issued, evictions) for a
    # replay in the simulator (validation level replayed); after the run: Run.recorder.decisions()
    record_decisions: bool = False


class Run:
    """One run of one policy: the host controller (sim.host.HostController) driven by the model's
    forward, with real copies (runtime.copystream.MarkStream) and real computation."""

    def __init__(self, om: "OffloadedModel", rc: RunConfig) -> None:
        self.om, self.rc = om, rc
        M, E, k = om.M, om.E, om.top_k
        self.M, self.E = M, E
        self.backend = be = om.backend
        cap_total = rc.slots if rc.per_layer is None else rc.per_layer * M
        if cap_total is None or cap_total < 1:
            raise ExecutorError("a run needs cache slots (slots or per_layer)")
        if cap_total > om.num_slots:
            raise ExecutorError(f"the run asks for {cap_total} slots, the pool has {om.num_slots}")
        self.cache = cache = SlotCache(M, E, rc.eviction, slots=rc.slots, per_layer=rc.per_layer)
        cache.drop_on_release = not rc.prefetch.keeps_cache
        if not rc.prefetch.keeps_cache and min(cache.capacity) < E:
            raise ExecutorError(
                f"policy '{rc.prefetch.name}' streams whole layers: it needs at least num_experts={E} slots per pool, "
                f"the cache has {min(cache.capacity)}")
        sch = rc.schedule
        self.virtual = isinstance(be, VirtualBackend)
        if self.virtual and sch is None:
            raise ExecutorError("the virtual backend takes its compute times from a schedule: it needs mode=replay")
        # pacing: every copy padded to nbytes / pace (on the GPU relative to the measured copy time)
        pad_s = 0.0
        if rc.link_pace_gbps:
            paced = om.nbytes / (float(rc.link_pace_gbps) * 1e9)
            pad_s = max(0.0, paced - (om.copy_s or 0.0))
        self.link = link = MarkStream(
            cache, be, slot_bytes=om.slot_bytes, source=om.store.expert, num_slots=om.num_slots, nbytes=om.nbytes,
            transfer_time=rc.transfer_s, issue_overhead=rc.issue_overhead_s, copies_in_flight=rc.copies_in_flight,
            pad_s=pad_s,
            # copies from pageable memory (the store's, or a policy's own) hold the host: one at a time
            host_sync=host_synchronous(getattr(rc.prefetch, "host_memory", None), om.store.host_memory))
        self.queue, self.in_flight, self.copy_log = link.queue, link.in_flight, link.copy_log
        link.measure = not self.virtual  # the admission rule's link: measured on real backends
        self.infos: list[LayerInfo] = []
        if sch is not None:
            self.ctx = policy_context(sch, cache, link.queue.queued, rc.predictor, k)
        else:
            def no_future(g: int):
                raise ExecutorError("this policy reads the future (oracle, belady): it needs mode=replay with a trace")

            def no_next_use(key: int, g: int) -> int:
                raise ExecutorError("this policy reads the future (belady): it needs mode=replay with a trace")

            self.ctx = PolicyContext(
                num_moe_layers=M, num_experts=E, top_k=k, future=no_future, num_layer_steps=NEVER,
                next_use=no_next_use, cached=cache.state.__getitem__, layer_step=self.infos.__getitem__,
                queued=link.queue.queued, predictor=rc.predictor)
        rc.eviction.attach(self.ctx, cache.num_pools)
        rc.prefetch.attach(self.ctx)
        self.eviction, self.prefetch = rc.eviction, rc.prefetch
        self.log = RunLog(occupancy=[] if rc.timeline else None)
        self.host = host = HostController(
            sch, cache, link, eviction=rc.eviction, prefetch=rc.prefetch, log=self.log,
            decision_delay=float(rc.decision_delay_s), expert_bytes=om.nbytes, transfer_s=rc.transfer_s,
            live=True, infos=self.infos, admission=rc.admission, measured=not self.virtual, reset=rc.reset, top_k=k)
        if rc.timeline or host.has_done:
            link.on_done = host.copy_done
        self.recorder = DecisionRecorder(host) if rc.record_decisions else None
        if self.recorder is not None:
            self.prefetch = host.prefetch  # the speculative decoder calls the policy through the run
        self.steps: list[StepRecord] = []
        self.layers: list[LayerRecord] = []
        self.occupancy: list[tuple[Any, int]] = []  # (mark, resident experts) after each layer-step
        self.requests: list[tuple[Any, list[int]]] = []  # (start mark, step indices)
        self.exec_log: list[dict[str, Any]] = []
        self.routing_log: list[tuple[int, int, list[list[int]], list[list[float]]]] = []  # live: (g, m, ids, weights)
        self._step: StepRecord | None = None
        self._m = 0
        self._pass: Any = None  # the controller's target pass (a generator) and its pending request
        self._req: Any = None
        self._override: tuple[torch.Tensor, torch.Tensor, list[list[list[int]]]] | None = None
        self.finished = False
        self.end_mark: Any = None
        be.begin()
        self.t0 = be.base
        for req in host.preload():  # a streaming policy's resident layers, before the first request
            be.block(req.mark)

    # ------------------------------------------------------------------ the host's state
    @property
    def hits(self) -> int:
        return self.host.hits

    @property
    def late(self) -> int:
        return self.host.late

    @property
    def misses(self) -> int:
        return self.host.misses

    @property
    def useful(self) -> int:
        return self.host.useful

    @property
    def copies(self) -> int:
        return self.link.copies

    @property
    def _unsafe_no_guard(self) -> bool:
        return self.link.unsafe_no_guard

    @_unsafe_no_guard.setter
    def _unsafe_no_guard(self, v: bool) -> None:
        self.link.unsafe_no_guard = v

    def apply(self, actions: Sequence[Any]) -> None:
        """Actions of a policy, exactly as the simulator applies them."""
        self.host.apply(actions)

    def request(self, key: int, priority: int) -> None:
        self.link.request(key, priority)

    def try_issue(self) -> None:
        self.link.try_issue()

    def ensure_issued(self, keys: set[int]) -> None:
        """Block until every key in ``keys`` has its copy issued (the controller's demand wait)."""
        link = self.link
        link.observe()
        blk = link.blocker(keys)
        while blk is not None:
            self.backend.block(blk)
            link.observe()
            blk = link.blocker(keys)

    # ------------------------------------------------------------------ driver interface
    def request_start(self, r: int) -> None:
        """A request begins once the previous one's last token is on the host; with
        cache.reset=request every copy lands first and the cache and the policies start afresh."""
        be = self.backend
        be.block(be.mark())
        if self.rc.reset == "request":
            self.queue.clear()
            link = self.link
            while link.in_flight:
                be.block(link.done_mark[link.in_flight[-1][1]])
                link.observe()
            self.host.forget()
        self.requests.append((be.mark(), []))
        self.host.request_start(r)

    def request_end(self, r: int) -> None:
        be = self.backend
        be.block(be.mark())
        self.host.request_end(r)

    def begin_step(self, request: int, step: int, n_tokens: int, *, needed: Sequence[Sequence[int]] | None = None,
                   override: tuple[torch.Tensor, torch.Tensor, list[list[list[int]]]] | None = None,
                   emitted: int = 1) -> StepRecord:
        """Start a target pass over ``n_tokens`` tokens. ``needed`` (replay): the keys of each of
        its MoE layers, for the coverage metric; ``override`` (replay): (ids [M, T, k] and weights
        [M, T, k] on the device, ids as host lists) used instead of the router's choice."""
        if self._step is not None:
            raise ExecutorError("begin_step while a step is running (end_step first)")
        g0 = len(self.infos)
        sch = self.rc.schedule
        if sch is not None and g0 + self.M > sch.num_layer_steps:
            raise ExecutorError(f"step {step} of request {request} goes past the schedule's {sch.num_layer_steps} layer-steps")
        for m in range(self.M):
            self.infos.append(LayerInfo(g0 + m, request, step, m))
        rec = StepRecord(request, step, g0, n_tokens, emitted=emitted)
        decode = step > 0  # step 0 is the prefill (the trace's convention)
        if sch is not None:
            rec.s_idx = sch.g_step[g0]
            decode = sch.steps[rec.s_idx].phase != 0
        rec.start = self.backend.mark()
        if needed is not None:
            state, link = self.cache.state, self.link
            for keys in needed:
                for key in keys:
                    rec.needed += 1
                    st = state[key]
                    if st == RESIDENT:
                        rec.resident += 1
                    elif st == LOADING:
                        rec.loading.append(link.done_mark[key])
        self._step = rec
        self._m = 0
        self._override = override
        self.steps.append(rec)
        self.requests[-1][1].append(len(self.steps) - 1)
        self._pass = self.host.target_pass(g0, None, decode=decode)
        self._req = next(self._pass)
        return rec

    def end_step(self) -> None:
        """The step's token is emitted (a mark after the LM head)."""
        rec = self._step
        if rec is None:
            raise ExecutorError("end_step without begin_step")
        if self._m != self.M or self._req is not None:
            raise ExecutorError(f"step {rec.step} of request {rec.request} ran {self._m} of {self.M} MoE layers")
        if self.virtual:
            self.backend.elapse(self.rc.schedule.steps[rec.s_idx].tail)
        rec.token = self.backend.mark()
        self._step = None

    def _resume(self, value: Any) -> None:
        try:
            self._req = self._pass.send(value)
        except StopIteration:
            self._req = self._pass = None

    def draft_token(self, request: int, t: int) -> float:
        """Virtual time (speculative replay): a draft token at trace position ``t`` of ``request``
        runs on the compute stream for the schedule's draft-token time, and the host reads its ELB
        row ``decision_delay`` after it ends without holding the stream back (the simulator's rule:
        the draft and then the verify pass run on without waiting for the host). Returns its time."""
        if not self.virtual:
            raise ExecutorError("draft_token: only the virtual backend takes its draft times from the schedule")
        be = self.backend
        dt = self.rc.schedule.draft_token_time(request, t)
        be.elapse(dt)
        be.read_ahead(be.mark(), float(self.rc.decision_delay_s))
        return dt

    # ------------------------------------------------------------------ per layer
    def layer_start(self, m: int) -> None:
        """A MoE decoder layer is about to run (its attention first). Outside a target step (a
        draft pass of speculative decoding runs the same layers) nothing happens."""
        if self._step is None:
            return
        if type(self._req) is LayerStart:
            be = self.backend
            be.block(be.mark())  # the policy acts as the device reaches the layer (as in the model)
            self._resume(None)
            while type(self._req) is Block:  # a host-synchronous (pageable) copy of the layer
                be.block(self._req.mark)
                self._resume(None)

    def layer_forward(self, m: int, module: nn.Module, hidden: torch.Tensor, top_k_index: torch.Tensor,
                      top_k_weights: torch.Tensor) -> torch.Tensor:
        rec = self._step
        if rec is None:
            raise ExecutorError("a MoE layer ran outside begin_step/end_step")
        if m != self._m:
            raise ExecutorError(f"MoE layer ordinal {m} ran out of order (expected {self._m})")
        self._m += 1
        g = rec.g0 + m
        be, cache = self.backend, self.cache
        E = self.E
        sch = self.rc.schedule
        if self.virtual:
            be.elapse(sch.pre[g])
        routed = be.mark()
        lr = LayerRecord(g, m, routed)
        self.layers.append(lr)
        # the routing (and live lookahead) reach the host: the one sync of the layer
        pred = self.rc.predictor if isinstance(self.rc.predictor, LiveGatePredictor) else None
        look = pred.predict(m) if pred is not None else []
        T, k = top_k_index.shape
        live = self._override is None
        parts = [top_k_index.reshape(-1).float()]
        if live:  # weight order (DeepSeek's routers return ids unsorted) and the weights, for the log
            w_sorted, i_sorted = sort_by_weight(top_k_weights, top_k_index)
            parts += [i_sorted.reshape(-1).float(), w_sorted.reshape(-1)]
        parts += [t.reshape(-1).float() for _, _, t in look]
        host = (torch.cat(parts) if len(parts) > 1 else parts[0]).cpu()
        be.host_read(routed, float(self.rc.decision_delay_s))
        ids_router = host[: T * k].view(T, k).long().tolist()
        off = T * k
        if live:
            ids_sorted = host[off: off + T * k].view(T, k).long().tolist()
            w_host = host[off + T * k: off + 2 * T * k].view(T, k).tolist()
            off += 2 * T * k
        for d, tm, t in look:
            n = t.numel()
            pred.set(g, d, tm, host[off:off + n].view(t.shape).long().tolist())
            off += n
        if not live:
            ids_dev, w_dev, ids_host = self._override
            idx, w, ids = ids_dev[m], w_dev[m].to(top_k_weights.dtype), ids_host[m]
            if len(ids) != T:
                raise ExecutorError(f"replay: layer-step {g} has {T} tokens, the trace {len(ids)}")
            order = ids
        else:
            idx, w, ids, order = top_k_index, top_k_weights, ids_router, ids_sorted
            if self.om.record_routing:
                self.routing_log.append((g, m, ids_sorted, w_host))
        base = m * E
        if T == 1:
            needed = tuple(base + int(e) for e in order[0])
        else:
            needed = tuple(base + e for e in sorted({int(e) for row in ids for e in row}))
        if sch is not None and self._override is not None and tuple(sch.needed[g]) != needed:
            raise ExecutorError(f"replay: layer-step {g} computes {needed}, the schedule says {tuple(sch.needed[g])}")
        out = torch.zeros_like(hidden)
        rows = _rows_by_expert(ids) if len(ids) > 1 else None
        if type(self._req) is not Routing or self._req.g != g:
            raise ExecutorError(f"layer-step {g}: the host controller expected {self._req}")
        self._resume(needed)
        # the controller's requests until it needs the next layer: host waits and launches
        while self._req is not None:
            req = self._req
            if type(req) is Block:
                be.block(req.mark)
                self._resume(None)
            elif type(req) is Compute:
                self._resume(self._launch(lr, req, needed, module, hidden, idx, w, ids, rows, out))
            else:
                break
        lr.resident_after = cache.resident_count()
        if self.rc.timeline:
            self.occupancy.append((lr.waves[-1][1], lr.resident_after))
        return out

    def _launch(self, lr: LayerRecord, req: Compute, needed: tuple[int, ...], module, hidden, idx, w, ids, rows,
                out) -> Any:
        """One wave of a layer's experts on the compute stream, after the copies of every expert it
        reads that the host has not seen land (device-side waits: no host sync)."""
        be, cache, link, om = self.backend, self.cache, self.link, self.om
        state, done_mark = cache.state, link.done_mark
        m, E = req.m, self.E
        for key in req.held:
            if state[key] == LOADING:
                be.compute_wait(done_mark[key])
        waited = be.mark()
        experts = sorted(key - m * E for key in req.wave)
        slots = {e: cache.slot_of[m * E + e] for e in experts}
        dur = 0.0
        if self.virtual:
            dur = self.rc.schedule.exp[req.g]
            if len(req.wave) != len(needed):
                dur = dur * len(req.wave) / len(needed)
        be.launch(lambda: om.compute(module, hidden, idx, w, ids, rows, experts, slots, out), dur)
        done = be.mark()
        lr.waves.append((waited, done))
        lr.late.extend(done_mark[key] for key in req.late)
        if self.rc.exec_log:
            self.exec_log.append({"g": req.g, "m": m, "wave": req.w, "experts": experts,
                                  "tokens": {e: _tokens_of(ids, e) for e in experts}, "slots": dict(slots)})
        return done

    # ------------------------------------------------------------------ end
    def finish(self) -> None:
        """Wait for the streams, release what is still held (run end); each step's coverage: the
        share of its experts resident or landed by the time it began on the device."""
        be = self.backend
        self.end_mark = be.mark()
        be.synchronize()
        self.link.observe()
        sec = be.seconds
        for rec in self.steps:
            if rec.needed:
                t = sec(rec.start)
                rec.coverage = (rec.resident + sum(sec(mk) <= t for mk in rec.loading)) / rec.needed
        self.finished = True


def _rows_by_expert(ids: list[list[int]]) -> dict[int, tuple[list[int], list[int]]]:
    """expert -> (token rows, top-k positions) in the order torch.where gives them in the eager loop
    (position-major: all tokens at top-k position 0, then position 1, ...)."""
    out: dict[int, tuple[list[int], list[int]]] = {}
    k = len(ids[0]) if ids else 0
    for pos in range(k):
        for t, row in enumerate(ids):
            e = int(row[pos])
            r = out.get(e)
            if r is None:
                out[e] = r = ([], [])
            r[0].append(t)
            r[1].append(pos)
    return out


def _tokens_of(ids: list[list[int]], e: int) -> list[int]:
    return sorted({t for t, row in enumerate(ids) if e in row})
