"""Speculative decoding on the runtime: MoE-SpeQ's draft/verify cycle on the real model.

The draft is the target with its routed experts quantized to INT4 (runtime.quant, symmetric, group
128), all resident, sharing the embeddings, norms, attention, routers and the KV cache with the
target (arXiv 2511.14102, Sec. 3.1). One cycle follows the simulator's rule (sim/speculative.py)
and is the simulator's own: the host controller's cycle methods (sim.host.HostController
``cycle_begin``, ``draft_token``, ``cycle_end``; docs/host-controller.md) decide and record it, this
module runs the draft and the target around them. With t the position of the last emitted token
x_t, whose keys are not cached yet,

1. the governor (sim.governor, the simulator's object) picks k from measured costs (the cost
   model's on the virtual-time backend: sim.cycle_costs);
2. the draft processes x_t, d_1, ..., d_{k-1} at positions t..t+k-1 (greedy) and proposes
   d_1..d_k; after each draft token its routers' choice (one ELB row: the experts of every MoE
   layer) goes to the prefetch policy (``on_draft_token``: MoE-SpeQ's scheduler, SP-MoE's cutoff,
   or none for spec-lru), whose copies the executor issues on the copy stream while drafting goes on;
3. the draft's keys and values are rolled back (positions >= t) and the target verifies
   x_t, d_1..d_k at t..t+k in ONE pass (the executor's slot pool: a multi-token step);
4. greedy acceptance: a = leading i with d_i == argmax of the target at t+i-1; the cycle emits
   d_1..d_a and the target's own token at t+a (a + 1 tokens);
5. the KV cache is rolled back past the accepted prefix (positions > t + a dropped).

Rollback per engine: ``HFEngine`` (engine=eager: transformers' forward and DynamicCache) crops the
cache (``DynamicCache.crop``); sliding-window layers (gpt_oss) record their past states
(``activate_past_recording``) so that a crop beyond the window can restore them, and every
supported family rolls back. ``LeanEngine`` (engine=graphed: runtime.lean's static KV cache) needs
no work: the next step overwrites the stale positions before any step reads them (eager steps
attend over the written prefix, graphs mask positions past the query). Families whose cache keeps
a recurrent state (linear attention, Mamba) could roll back only with recorded states; none is a
supported family here.

Outputs: greedy speculative decoding emits exactly the target's greedy tokens (up to the
reduction-order differences of a k + 1-token pass against one-token passes: none in fp32 on the
tested models, tests/test_runtime_speculate.py); acceptance per draft position and the draft's set
agreement with the target's routing (live mode) are recorded per cycle.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from torch import nn

from runtime.errors import ExecutorError
from runtime.routing import experts_call_args
from sim.cache import ExpertCache
from sim.cycle_costs import CycleCostSource, MeasuredCosts, ModelledCosts
from sim.host import HostController
from sim.policies.base import PolicyContext, PrefetchPolicy
from sim.runlog import RunLog

__all__ = ["HFEngine", "LeanEngine", "MeasuredCosts", "ModelledCosts", "SpeculativeDecoder", "draft_experts",
           "executed_spec_trace"]

DRAFT_IMPLEMENTATION = "moe_spec_draft"
ExpertsFn = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


# =============================================================================== the draft
def draft_experts(modules: Sequence[nn.Module], group_size: int = 128) -> tuple[ExpertsFn, str, int]:
    """The INT4 draft's experts callback ``(m, hidden, idx, w) -> out``, its kind and its bytes.

    ``int4-packed``: runtime.lean.Int4Experts (torch's int4 kernels; capturable) where the shapes fit
    the kernel; otherwise ``int4-dequantized``: the same quantized weights dequantized into copies
    of the modules (tiny models whose rows are shorter than a group, transposed/biased layouts).
    Built from resident weights: call it before the executor moves the experts to the host."""
    from runtime.lean import Int4Experts, LeanError, int4_reference
    from runtime.quant import quantize_experts

    for mod in modules:
        for n in ("gate_up_proj", "down_proj"):
            t = getattr(mod, n, None)
            if isinstance(t, torch.Tensor) and t.device.type == "meta":
                raise ValueError(f"{type(mod).__name__}.{n} is offloaded (meta): build the draft before the executor")
    try:
        fn = Int4Experts(modules, group_size)
        return fn, "int4-packed", int(fn.nbytes)
    except LeanError:
        nbytes = sum(quantize_experts(m, 4, group_size).nbytes for m in modules)
        return int4_reference(modules, group_size), "int4-dequantized", int(nbytes)


def _draft_forward(self: nn.Module, *args: Any, **kwargs: Any) -> torch.Tensor:
    """The experts forward registered as ``moe_spec_draft``: the module's draft callback."""
    hidden, idx, w = experts_call_args(args, kwargs)
    return self._spec_draft(hidden, idx, w)


def _register() -> None:
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS, ExpertsInterface

    if DRAFT_IMPLEMENTATION not in ALL_EXPERTS_FUNCTIONS:
        ExpertsInterface.register(DRAFT_IMPLEMENTATION, _draft_forward)


class RoutingLog:
    """Per MoE layer, the ids [T, k] each experts call received (filled while ``on``)."""

    def __init__(self, M: int) -> None:
        self.M = M
        self.on = False
        self.rows: list[list[list[int]] | None] = [None] * M

    def clear(self) -> None:
        self.rows = [None] * self.M

    def put(self, m: int, idx: torch.Tensor) -> None:
        if self.on:
            self.rows[m] = idx.tolist()

    def position(self, j: int) -> tuple[tuple[int, ...], ...]:
        """Expert ids of every MoE layer for token j of the last pass (weight order as routed)."""
        return tuple(tuple(int(x) for x in r[j]) for r in self.rows)  # type: ignore[index]


# =============================================================================== engines
class HFEngine:
    """engine=eager: transformers' forward with a DynamicCache; the draft through the experts
    implementation seam (``moe_spec_draft``), the target through the model's own (or the
    offloading executor's ``moe_offload``)."""

    name = "eager"

    def __init__(self, model: nn.Module, experts_modules: Sequence[nn.Module], draft: ExpertsFn) -> None:
        from runtime.replay import _forward_kwargs

        _register()
        self.model = model
        self.modules = list(experts_modules)
        self.M = len(self.modules)
        self.device = next(p.device for p in model.parameters() if p.device.type != "meta")
        extra = _forward_kwargs(model)
        self._cache_kw = extra["_cache"]
        self._keep = "logits_to_keep" in extra
        self.draft_routing = RoutingLog(self.M)
        self.target_routing = RoutingLog(self.M)
        self._hooks = []
        for m, mod in enumerate(self.modules):
            mod._spec_draft = self._draft_call(m, draft)
            self._hooks.append(mod.register_forward_pre_hook(self._target_hook(m), with_kwargs=True))
        self.cache: Any = None
        self.length = 0
        self.vocab_size = int(model.config.vocab_size)

    def _draft_call(self, m: int, draft: ExpertsFn):
        def call(hidden, idx, w):
            self.draft_routing.put(m, idx)
            return draft(m, hidden, idx, w)

        return call

    def _target_hook(self, m: int):
        def hook(module, args, kwargs):
            _, idx, _ = experts_call_args(args, kwargs)
            self.target_routing.put(m, idx)
            return None

        return hook

    def reset(self) -> None:
        from transformers import DynamicCache

        self.cache = DynamicCache(config=self.model.config)
        self.cache.activate_past_recording()  # sliding-window layers keep what a crop must restore
        self.length = 0

    def _forward(self, ids: torch.Tensor, start: int, all_logits: bool) -> torch.Tensor:
        pos = torch.arange(start, start + ids.shape[1], device=self.device).reshape(1, -1)
        kw = {self._cache_kw: self.cache}
        if self._keep:
            kw["logits_to_keep"] = 0 if all_logits else 1
        out = self.model(input_ids=ids, position_ids=pos, use_cache=True, **kw)
        self.length = start + ids.shape[1]
        return out.logits[0] if all_logits else out.logits[0, -1:]

    def target(self, ids: torch.Tensor, start: int) -> torch.Tensor:
        """Logits [T, V] of every position of ``ids`` [1, T] at start..start+T-1 (the target)."""
        self.target_routing.clear()
        self.target_routing.on = True
        try:
            return self._forward(ids, start, True)
        finally:
            self.target_routing.on = False

    @contextlib.contextmanager
    def _draft_mode(self) -> Iterator[None]:
        cfgs = {id(m.config): m.config for m in self.modules}
        cfgs.setdefault(id(self.model.config), self.model.config)
        saved = {k: c._experts_implementation for k, c in cfgs.items()}
        self.draft_routing.on = True
        try:
            for c in cfgs.values():
                c._experts_implementation = DRAFT_IMPLEMENTATION
            yield
        finally:
            self.draft_routing.on = False
            for k, c in cfgs.items():
                c._experts_implementation = saved[k]

    def draft(self, tok: torch.Tensor, pos: int) -> tuple[int, tuple[tuple[int, ...], ...]]:
        """One draft token at ``pos``: (its greedy next token, the routing of every MoE layer)."""
        self.draft_routing.clear()
        with self._draft_mode():
            logits = self._forward(tok, pos, False)
        return int(logits.argmax(-1)), self.draft_routing.position(0)

    def rollback(self, n: int) -> None:
        """Keep positions [0, n) of the cache."""
        self.cache.crop(-(self.length - n))
        self.length = n

    def kv(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Keys and values of the valid positions, per layer (tests compare them)."""
        return [(layer.keys, layer.values) for layer in self.cache.layers]

    def close(self) -> None:
        for h in self._hooks:
            h.remove()
        for mod in self.modules:
            if hasattr(mod, "_spec_draft"):
                del mod._spec_draft


class _Recording:
    """An experts callback that logs the routing it is called with (never captured into a graph)."""

    capturable = False

    def __init__(self, inner: Any, log: RoutingLog) -> None:
        self.inner, self.log = inner, log

    def __call__(self, m: int, hidden: torch.Tensor, idx: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        self.log.put(m, idx)
        return self.inner(m, hidden, idx, w)

    def layer_start(self, m: int) -> None:
        ls = getattr(self.inner, "layer_start", None)
        if ls is not None:
            ls(m)


class LeanEngine:
    """engine=graphed: runtime.lean's static-KV path. The target is ``target`` (a LeanModel, e.g. the
    executor's stepper); the draft is a second LeanModel over the same modules with the INT4
    experts and the *same* StaticKV object. On a GPU the draft's one-token steps run through its
    captured graphs (the INT4 experts captured too) and its routing is read from pinned memory;
    the verify pass (k + 1 tokens) runs through graphs captured for its length at first use (one
    set per k + 1 <= ``graph_max_tokens``: M + 1 segment graphs, activations only, each in its own
    pool); the prefill and longer passes run the segments eagerly."""

    graph_max_tokens = 17  # k_max + 1 (sim.governor's k_max = 16)

    name = "graphed"

    def __init__(self, target: Any, draft: ExpertsFn) -> None:
        from runtime.lean import LeanModel

        self.lean = target
        self.M = target.M
        self.device = target.device
        self.target_routing = RoutingLog(self.M)
        if not isinstance(target.experts, _Recording):
            target.experts = _Recording(target.experts, self.target_routing)
        else:
            self.target_routing = target.experts.log
        self.draft_routing = RoutingLog(self.M)
        graphs = bool(target.graphs and getattr(draft, "capturable", False))
        self.draft_lean = LeanModel(target.loaded, max_len=target.S, experts=draft, graphs=graphs, read_routing=False)
        self.draft_lean.kv = target.kv  # one KV cache for the draft and the target
        self.length = 0
        self.vocab_size = int(target.model.config.vocab_size)

    def reset(self) -> None:
        self.lean.reset()
        self.length = 0

    def target(self, ids: torch.Tensor, start: int) -> torch.Tensor:
        T = ids.shape[1]
        self.target_routing.clear()
        self.target_routing.on = True
        self.lean.all_logits = True
        try:
            if self.lean.graphs and 1 < T <= self.graph_max_tokens:
                out = self.lean.forward_graphed(ids, int(start))  # a verify pass: the graphs of its T
            else:
                out = self.lean.forward_eager(ids, int(start), int(start) + T)
        finally:
            self.lean.all_logits = False
            self.target_routing.on = False
        self.length = start + T
        return out

    def draft(self, tok: torch.Tensor, pos: int) -> tuple[int, tuple[tuple[int, ...], ...]]:
        logits = self.draft_lean.forward(tok, int(pos))
        nxt = int(logits.argmax(-1))
        row = tuple(tuple(int(x) for x in self.draft_lean.routing(m)[0][0]) for m in range(self.M))
        self.length = pos + 1
        return nxt, row

    def rollback(self, n: int) -> None:
        self.length = n  # stale positions are overwritten before they are read (module docstring)

    def kv(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        kv = self.lean.kv
        return [(kv.k[l][:, :, : self.length], kv.v[l][:, :, : self.length]) for l in sorted(kv.k)]

    def close(self) -> None:
        if isinstance(self.lean.experts, _Recording):
            self.lean.experts = self.lean.experts.inner


# =============================================================================== the decoder
@dataclass
class Cycle:
    """One draft/verify cycle: the host controller's record (sim.metrics reads it; ``rec``) plus the
    facts only a live run has, and the executor step of its verify pass (its coverage is known
    once the run has finished)."""

    rec: dict[str, Any]
    matches: list[bool] = field(default_factory=list)  # d_i == target's token, i = 1..k
    agreement: list[float] = field(default_factory=list)  # per drafted position with the target's input
    step: int | None = None  # index into the run's steps

    @property
    def request(self) -> int:
        return self.rec["request"]

    @property
    def k(self) -> int:
        return self.rec["k"]

    @property
    def accepted(self) -> int:
        return self.rec["accepted"]

    @property
    def emitted(self) -> int:
        return self.rec["accepted"] + 1


class _Resident:
    """The copy stream when no executor run is attached: every expert is resident, so the prefetch
    policy's copies are dropped (its calls still happen: the ELB is filled)."""

    class _Queue:
        def apply(self, actions, state) -> None:
            pass

        def __len__(self) -> int:
            return 0

        def queued(self, key: int) -> bool:
            return False

    def __init__(self) -> None:
        self.queue = self._Queue()
        self.in_flight: tuple = ()
        self.link_free = self.busy_time = 0.0
        self.copies = 0
        self.admit = None

    def try_issue(self) -> None:
        pass

    def observe(self, horizon: Any = None) -> float:
        return 0.0


def _resident_host(prefetch: PrefetchPolicy, M: int, E: int, top_k: int, expert_bytes: int) -> HostController:
    """A host controller for a run without offloading (all experts resident): it hosts the cycle
    (the governor, the ELB policy's calls, the records) and moves nothing."""
    from sim.policies import EVICTION

    eviction = EVICTION.create("lru")
    cache = ExpertCache(M, E, eviction, slots=M * E)
    copies = _Resident()
    ctx = PolicyContext(num_moe_layers=M, num_experts=E, top_k=top_k, future=None, num_layer_steps=0,
                        next_use=None, cached=cache.state.__getitem__, layer_step=None, queued=copies.queue.queued)
    eviction.attach(ctx, cache.num_pools)
    prefetch.attach(ctx)
    return HostController(None, cache, copies, eviction=eviction, prefetch=prefetch, log=RunLog(), decision_delay=0.0,
                          expert_bytes=expert_bytes, transfer_s=0.0, live=True, infos=[], admission=False, top_k=top_k)


class SpeculativeDecoder:
    """Greedy speculative decoding on one engine. The cycle is the host controller's
    (sim.host.HostController: ``cycle_begin``, ``draft_token``, ``cycle_end``, with the simulator's
    governor and ELB policy): this class only runs the draft and the target and times them.
    ``run`` (optional): the executor's ``Run`` (its controller hosts the cycles, its prefetch policy
    is the ELB policy, the target's passes are its steps, the policy's copies go to its copy
    stream). Without a run the experts are resident and ``prefetch`` (default none) only reads the
    ELB. ``costs``: what cycles are priced with (sim.cycle_costs; default measured)."""

    def __init__(self, engine: Any, governor: Any, *, num_experts: int, top_k: int, run: Any = None,
                 prefetch: PrefetchPolicy | None = None, costs: CycleCostSource | None = None,
                 expert_bytes: int = 0, sync: Callable[[], None] | None = None) -> None:
        self.engine, self.governor, self.run = engine, governor, run
        self.M, self.E, self.top_k = engine.M, int(num_experts), int(top_k)
        if run is not None:
            self.prefetch = run.prefetch
            self.host = run.host
        else:
            from sim.policies import PREFETCH

            self.prefetch = prefetch if prefetch is not None else PREFETCH.create("none")
            self.host = _resident_host(self.prefetch, self.M, self.E, self.top_k, int(expert_bytes))
        self.costs = costs or MeasuredCosts(0.0)
        self.host.use_governor(governor, self.costs)
        # the virtual-time backend: cycles are timed on its clock, drafting takes the schedule's times
        self.virtual = run is not None and run.virtual
        if self.virtual and run.rc.schedule is None:
            raise ExecutorError("speculation on the virtual backend needs the run's schedule (mode=replay)")
        dev = engine.device
        self.sync = sync or ((lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None))
        self.cycles: list[Cycle] = []
        self.routing: list[list[tuple[tuple[int, ...], ...]]] = []  # per request: target ids per kept position
        self.draft_rows: list[list[tuple[tuple[int, ...], ...] | None]] = []  # per request: draft ids per kept position
        self.draft_match: list[list[bool]] = []

    # ------------------------------------------------------------------ passes
    def _now(self) -> float:
        """The clock cycles are timed on: the virtual backend's compute stream (the end of what is
        enqueued), else the host's wall clock after a device sync."""
        if self.virtual:
            be = self.run.backend
            return be.seconds(be.mark())
        self.sync()
        return time.perf_counter()

    def _target(self, r: int, step: int, ids: list[int], start: int, *, rows: tuple[int, int] | None = None,
                emitted: int = 1, draft_s: float = 0.0, **replayed: Any) -> torch.Tensor:
        """One target pass over ``ids`` at positions start.. (the prefill, step 0, or a verify pass);
        replay on a schedule plans it first, as the simulator does (trace ``rows`` [a, b))."""
        run = self.run
        if run is not None:
            sch = run.rc.schedule
            if sch is not None:
                sch.add_step(r, rows[0], rows[1], step, 1 if step else 0, emitted=emitted, draft_s=draft_s)
            run.begin_step(r, step, len(ids), emitted=emitted, **replayed)
        x = torch.tensor([ids], dtype=torch.long, device=self.engine.device)
        logits = self.engine.target(x, start)
        toks = logits.argmax(-1)
        if run is not None:
            run.end_step()
        return toks

    def _draft(self, x: int, pos: int) -> tuple[int, tuple[tuple[int, ...], ...]]:
        eng = self.engine
        return eng.draft(torch.tensor([[x]], dtype=torch.long, device=eng.device), pos)

    def _keys(self, row: tuple[tuple[int, ...], ...]) -> tuple[tuple[int, ...], ...]:
        E = self.E
        return tuple(tuple(m * E + e for e in ids) for m, ids in enumerate(row))

    # ------------------------------------------------------------------ the request loop
    def _request(self, r: int, src: "_Live | _Replay") -> None:
        """Prefill, then cycles until the request's last position (``src`` runs the draft and the
        target: live or replayed); the host controller decides and records each cycle."""
        eng, run, host = self.engine, self.run, self.host
        if run is not None:
            run.request_start(r)
        else:
            host.request_start(r)
        eng.reset()
        t0 = self._now()
        src.prefill()
        host.speculation_start(t_prefill=self._now() - t0)
        t, L = src.P, src.L
        while t < L:
            t0 = self._now()
            # the compute stream is free (virtual: its clock; else the copy stream's present)
            cyc = host.cycle_begin(r, t, L, src.history(t), t0 if self.virtual else host.observe())
            k = cyc.k
            wall = time.perf_counter()
            for i in range(k):
                row = src.draft(t, i)
                if self.virtual:
                    dt = run.draft_token(r, t + i)
                else:
                    now = time.perf_counter()
                    dt, wall = now - wall, now
                host.draft_token(i, row, dt)
            t1 = self._now()
            eng.rollback(t)  # the draft's keys and values are dropped, the target writes t..t+k
            a, needed = src.verify(t, k, cyc.n, t1 - t0)
            t2 = self._now()
            eng.rollback(t + a + 1)
            rec = host.cycle_end(a, t2 - t0, t1 - t0, t2 - t1, needed, float("nan"))
            self.cycles.append(Cycle(rec, src.matches, src.agreement, len(run.steps) - 1 if run is not None else None))
            t += a + 1
        if run is not None:
            run.request_end(r)
        else:
            host.request_end(r)

    def generate(self, prompts: Sequence[Sequence[int]], new_tokens: int) -> list[list[int]]:
        """Greedy tokens of each prompt (``new_tokens`` each, the prefill's first included)."""
        out = []
        with torch.inference_mode():
            for r, prompt in enumerate(prompts):
                src = _Live(self, r, list(prompt), int(new_tokens))
                self._request(r, src)
                self.routing.append(src.routing)
                self.draft_rows.append(src.drafts)
                self.draft_match.append(src.match)
                out.append(src.emitted[:new_tokens])
        return out

    def replay(self, trace: Any, draft: Any, *, seed: int = 0) -> None:
        """Speculative cycles over a trace's requests (mode=replay): the trace's routing is executed
        (every target pass computes exactly the experts of its rows, with their gate weights), the
        ELB rows and the acceptance come from ``draft`` (sim.speculative.DraftSource: the trace's
        ``draft``/``draft_match`` columns), so the simulator and this run see the same cycles. The
        draft model still runs its k tokens (its compute is measured), on random tokens."""
        rng = np.random.default_rng([seed, 77])
        with torch.inference_mode():
            for r in range(trace.num_requests):
                self._request(r, _Replay(self, r, trace, draft, rng))

    # ------------------------------------------------------------------ reports
    def sim_cycles(self) -> list[dict[str, Any]]:
        """The cycles in the simulator's record format (sim.metrics.speculative_metrics), each with
        its verify pass's coverage once the run has finished."""
        run = self.run
        out = []
        for c in self.cycles:
            rec = dict(c.rec)
            if run is not None and run.finished and c.step is not None:
                rec["coverage"] = run.steps[c.step].coverage
            out.append(rec)
        return out

    def summary(self) -> dict[str, Any]:
        """Acceptance per draft position (P(accepted at i | accepted before i)), mean k, tokens per
        cycle, and the draft's set agreement with the target's routing."""
        cyc = self.cycles
        if not cyc:
            return {"cycles": 0}
        kmax = max(c.k for c in cyc)
        per_pos = []
        for i in range(kmax):
            reached = [c for c in cyc if c.k > i and c.accepted >= i]
            per_pos.append(float(np.mean([c.accepted > i for c in reached])) if reached else float("nan"))
        ag = [x for c in cyc for x in c.agreement]
        drafted = sum(c.k for c in cyc)
        return {
            "cycles": len(cyc),
            "mean_k": float(np.mean([c.k for c in cyc])),
            "tokens_per_cycle": float(np.mean([c.emitted for c in cyc])),
            "acceptance_rate": float(sum(c.accepted for c in cyc) / drafted) if drafted else float("nan"),
            "acceptance_by_position": per_pos,
            "draft_agreement": float(np.mean(ag)) if ag else float("nan"),
        }


class _Live:
    """A live request: the draft proposes tokens (greedy), the target's greedy tokens decide the
    acceptance; the routing of every kept position is recorded (the executed trace)."""

    def __init__(self, dec: SpeculativeDecoder, r: int, prompt: list[int], new_tokens: int) -> None:
        self.dec, self.r, self.prompt = dec, r, prompt
        self.P = len(prompt)
        self.L = self.P + new_tokens - 1  # positions the request's tokens reach (the last is not cached)
        self.routing: list[tuple[tuple[int, ...], ...]] = []
        self.drafts: list[Any] = []
        self.match: list[bool] = []
        self.emitted: list[int] = []
        self.matches: list[bool] = []
        self.agreement: list[float] = []
        self._toks: list[int] = []
        self._rows: list[tuple[tuple[int, ...], ...]] = []

    def prefill(self) -> None:
        dec, P = self.dec, self.P
        toks = dec._target(self.r, 0, self.prompt, 0)
        self.routing = [dec.engine.target_routing.position(j) for j in range(P)]
        self.drafts = [None] * P
        self.match = [False] * P
        self.emitted = [int(toks[-1])]

    def history(self, t: int) -> list:
        return self.routing  # the target's ids of positions 0..t-1

    def draft(self, t: int, i: int) -> tuple[tuple[int, ...], ...]:
        x, row = self.dec._draft(self._toks[-1] if i else self.emitted[-1], t + i)
        self._toks.append(x)
        self._rows.append(row)
        return self.dec._keys(row)

    def verify(self, t: int, k: int, n: int, draft_s: float) -> tuple[int, list]:
        dec = self.dec
        M, E = dec.M, dec.E
        toks, rows = self._toks, self._rows
        y = dec._target(self.r, n, [self.emitted[-1]] + toks, t, draft_s=draft_s).tolist()
        a = 0
        while a < k and toks[a] == y[a]:
            a += 1
        if dec.run is not None:
            dec.run.steps[-1].emitted = a + 1
        vrows = [dec.engine.target_routing.position(j) for j in range(k + 1)]
        self.matches = [toks[i] == y[i] for i in range(k)]
        self.agreement = [sum(len(set(rows[j][m]) & set(vrows[j][m])) for m in range(M)) / (M * dec.top_k)
                          for j in range(min(a + 1, k))]  # positions where the draft saw the target's input
        for j in range(a + 1):
            self.routing.append(vrows[j])
            self.drafts.append(rows[j] if j < k else None)
            self.match.append(j < a or a == k)  # a == k: the bonus position was not drafted (see executed_spec_trace)
        self.emitted.extend(toks[:a] + [y[a]])
        self._toks, self._rows = [], []
        return a, [sorted({m * E + e for j in range(k + 1) for e in vrows[j][m]}) for m in range(M)]


class _Replay:
    """A replayed request: the trace's rows are executed (the router's choice overridden), its
    ``draft``/``draft_match`` columns give the ELB rows and the acceptance; tokens are random."""

    def __init__(self, dec: SpeculativeDecoder, r: int, trace: Any, source: Any, rng: np.random.Generator) -> None:
        self.dec, self.r, self.trace, self.source = dec, r, trace, source
        self.L = int(trace.lengths[r])
        self.P = int((trace.phase[r, :self.L] == 0).sum())
        self.toks = rng.integers(3, max(int(dec.engine.vocab_size), 4), size=self.L).tolist()
        self.matches: list[bool] = []
        self.agreement: list[float] = []
        self._x = 0

    def _overrides(self, a: int, b: int) -> dict[str, Any]:
        trace, dec = self.trace, self.dec
        k = dec.top_k
        ids_np = trace.expert_ids[self.r, a:b].astype(np.int64)  # (n, M, k)
        if trace.gate_weights is not None:
            w_np = trace.gate_weights[self.r, a:b].astype(np.float32)
            w_np = np.where(np.isfinite(w_np), w_np, 1.0 / k)
        else:
            w_np = np.full(ids_np.shape, 1.0 / k, dtype=np.float32)
        dev = dec.engine.device
        ov_ids = torch.from_numpy(np.ascontiguousarray(ids_np.transpose(1, 0, 2))).to(dev)
        ov_w = torch.from_numpy(np.ascontiguousarray(w_np.transpose(1, 0, 2))).to(dev)
        E = dec.E
        needed = [tuple(sorted({m * E + int(e) for e in ids_np[:, m].reshape(-1)})) for m in range(dec.M)]
        return {"override": (ov_ids, ov_w, ids_np.transpose(1, 0, 2).tolist()), "needed": needed}

    def prefill(self) -> None:
        P = self.P
        self.dec._target(self.r, 0, self.toks[:P], 0, rows=(0, P), **self._overrides(0, P))

    def history(self, t: int) -> np.ndarray:
        return self.trace.expert_ids[self.r, :t]  # the verified rows (prefill too, as the simulator)

    def draft(self, t: int, i: int) -> tuple[tuple[int, ...], ...]:
        self._x, _ = self.dec._draft(self._x if i else self.toks[t], t + i)
        return self.source.elb_row(self.r, t + i)

    def verify(self, t: int, k: int, n: int, draft_s: float) -> tuple[int, list]:
        r, src = self.r, self.source
        a = src.accepted(r, t, k)
        ov = self._overrides(t, t + k + 1)
        self.dec._target(r, n, self.toks[t:t + k + 1], int(self.trace.position[r, t]), rows=(t, t + k + 1),
                         emitted=a + 1, draft_s=draft_s, **ov)
        self.matches = [bool(src.accepted(r, t + i, 1)) for i in range(k)]
        return a, ov["needed"]


def executed_spec_trace(dec: SpeculativeDecoder, shape: Any, meta: dict[str, Any]) -> Any:
    """The routing a live speculative run kept (prefill and every emitted position, the target's
    ids from its verify passes), with the draft's ELB row of each drafted position as ``draft``
    and whether its token was accepted as ``draft_match``: the trace on which the simulator predicts
    the same run. Where the draft did not run (the prompt; the bonus position of a cycle that
    accepted all k) the target's ids stand in: the simulator never
    drafts the prompt, and reads such a bonus position only if its own k differs. Such a bonus
    position's ``draft_match`` is True (the cycle's run of matches continues; unmeasured, optimistic),
    a prompt position's False."""
    from traces.io import Rows, trace_from_rows
    from traces.trace import DECODE, PREFILL

    k = int(shape.top_k)
    moe = list(shape.moe_layers)
    cols: dict[str, list] = {x: [] for x in ("rid", "pos", "step", "phase", "layer", "ids", "draft", "match")}
    for r, routing in enumerate(dec.routing):
        P = len(routing) - sum(1 for c in dec.cycles if c.request == r for _ in range(c.emitted))
        for p, row in enumerate(routing):
            d = dec.draft_rows[r][p]
            for m, layer in enumerate(moe):
                cols["rid"].append(r)
                cols["pos"].append(p)
                cols["step"].append(0 if p < P else p - P + 1)
                cols["phase"].append(PREFILL if p < P else DECODE)
                cols["layer"].append(layer)
                cols["ids"].append(list(row[m]))
                cols["draft"].append(list(d[m]) if d is not None else list(row[m]))
                cols["match"].append(bool(dec.draft_match[r][p]))
    rows = Rows(
        request_id=np.asarray(cols["rid"], dtype=np.int64), position=np.asarray(cols["pos"], dtype=np.int64),
        step=np.asarray(cols["step"], dtype=np.int64), phase=np.asarray(cols["phase"], dtype=np.int8),
        layer=np.asarray(cols["layer"], dtype=np.int64), expert_ids=np.asarray(cols["ids"], dtype=np.int64).reshape(-1, k),
        draft=np.asarray(cols["draft"], dtype=np.int64).reshape(-1, k), draft_match=np.asarray(cols["match"], dtype=bool),
    )
    return trace_from_rows(rows, shape, meta, where="executed routing of a live speculative run")
