"""Speculative decoding on the runtime: MoE-SpeQ's draft/verify cycle on the real model.

The draft is the target with its routed experts quantized to INT4 (runtime.quant, symmetric, group
128), all resident, sharing the embeddings, norms, attention, routers and the KV cache with the
target (arXiv 2511.14102, Sec. 3.1). One cycle follows the simulator's rule (sim/speculative.py):
with t the position of the last emitted token x_t, whose keys are not cached yet,

1. the governor (sim.governor, the simulator's object) picks k from measured costs;
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

from runtime.routing import experts_call_args
from sim.governor import CycleCosts
from sim.policies.base import CycleInfo, PolicyContext, PrefetchPolicy

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


# =============================================================================== measured costs
class MeasuredCosts:
    """What the governor is fed: measured draft-token and verify-pass times (EMA per size), the
    measured per-expert transfer time, and the causal |E_new(k)| estimate of the simulator's host
    (distinct experts of the last k + 1 verified positions x the share a verify pass had to fetch)."""

    def __init__(self, expert_transfer_s: float, copy_latency_s: float = 0.0, alpha: float = 0.3) -> None:
        self.expert_transfer_s = float(expert_transfer_s)
        self.copy_latency_s = float(copy_latency_s)
        self.alpha = float(alpha)
        self.draft_s: float | None = None
        self.verify: dict[int, float] = {}
        self.miss_share: float | None = None

    def _ema(self, old: float | None, new: float) -> float:
        return new if old is None else (1 - self.alpha) * old + self.alpha * new

    def at(self, r: int, t: int, L: int) -> None:
        """The cycle about to be priced (request, position, request length): measured costs do not
        depend on it."""

    def observe_draft(self, per_token_s: float) -> None:
        self.draft_s = self._ema(self.draft_s, per_token_s)

    def observe_verify(self, n: int, s: float) -> None:
        self.verify[n] = self._ema(self.verify.get(n), s)

    def observe_fetch(self, fetched: int, needed: int) -> None:
        if needed:
            self.miss_share = self._ema(self.miss_share, fetched / needed)

    def t_draft(self, k: int) -> float:
        return k * (self.draft_s if self.draft_s is not None else 0.0)

    def t_verify(self, n: int) -> float:
        """Measured at n when seen; else linear through the two nearest measured sizes (one: flat)."""
        if n in self.verify:
            return self.verify[n]
        if not self.verify:
            return 0.0
        xs = sorted(self.verify, key=lambda x: (abs(x - n), x))[:2]
        if len(xs) == 1:
            return self.verify[xs[0]]
        (a, b) = sorted(xs)
        slope = (self.verify[b] - self.verify[a]) / (b - a)
        return max(0.0, self.verify[a] + slope * (n - a))

    def cycle_costs(self, history: np.ndarray, M: int, E: int, top_k: int, t_pcie_init: float, k_limit: int,
                    expert_bytes: int) -> CycleCosts:
        """``history``: expert ids [positions, M, k] of the request's verified positions so far."""
        memo: dict[int, int] = {}
        share = self.miss_share

        def new_experts(k: int) -> int:
            if share is None:
                return min(M * E, (k + 1) * top_k * M)
            if k not in memo:
                h = history[-(k + 1):] if len(history) else history
                if len(h) == 0:
                    memo[k] = min(M * E, (k + 1) * top_k * M)
                else:
                    distinct = sum(len(np.unique(h[:, m])) for m in range(M))
                    memo[k] = distinct * (k + 1) / len(h)
            return int(round(share * memo[k]))

        return CycleCosts(t_draft=self.t_draft, t_verify=self.t_verify, t_pcie_init=t_pcie_init,
                          t_overhead=self.copy_latency_s, expert_transfer_s=self.expert_transfer_s,
                          new_experts=new_experts, k_limit=k_limit, expert_bytes=expert_bytes)


class ModelledCosts(MeasuredCosts):
    """The simulator's cost model in place of measured times (a virtual-time run): draft and verify
    priced by the schedule exactly as the simulator's host prices them, so the governor sees the
    simulator's inputs (tests of identical decisions; what-if runs). Transfers: ``expert_transfer_s``."""

    def __init__(self, schedule: Any, trace: Any, decision_delay_s: float, expert_transfer_s: float,
                 copy_latency_s: float = 0.0) -> None:
        super().__init__(expert_transfer_s, copy_latency_s + decision_delay_s)
        self.schedule, self.trace, self.dd = schedule, trace, float(decision_delay_s)
        self.r = self.t = self.L = 0

    def at(self, r: int, t: int, L: int) -> None:
        self.r, self.t, self.L = r, t, L

    def observe_draft(self, per_token_s: float) -> None:
        pass

    def observe_verify(self, n: int, s: float) -> None:
        pass

    def t_draft(self, k: int) -> float:
        r, t, L = self.r, self.t, self.L
        return sum(self.schedule.draft_token_time(r, t + i) for i in range(min(k, L - 1 - t)))

    def t_verify(self, n: int) -> float:
        r, t, L = self.r, self.t, self.L
        return self.schedule.verify_estimate(n, int(self.trace.position[r, min(t + n, L) - 1]) + 1, self.dd)


# =============================================================================== the decoder
@dataclass
class Cycle:
    """One draft/verify cycle as measured (the simulator's cycle record, plus live-mode facts)."""

    request: int
    cycle: int
    t: int
    k: int
    accepted: int
    draft_s: float
    verify_s: float
    matches: list[bool] = field(default_factory=list)  # d_i == target's token, i = 1..k
    agreement: list[float] = field(default_factory=list)  # per drafted position with the target's input
    coverage: float = float("nan")
    elb_hits: int = 0  # experts the verify pass needed that the ELB forecast (per layer)
    verify_experts: int = 0  # distinct experts the verify pass needed (per layer, summed)
    fetched: int = 0
    predicted_cycle_s: float = float("nan")
    governor_phase: str = ""

    @property
    def emitted(self) -> int:
        return self.accepted + 1


class _NoHost:
    """The host side when no executor run is attached: the policy's actions are dropped (the
    experts are resident), its calls still happen (the ELB is filled)."""

    def __init__(self, prefetch: PrefetchPolicy, M: int, E: int, top_k: int) -> None:
        self.prefetch = prefetch
        prefetch.attach(PolicyContext(num_moe_layers=M, num_experts=E, top_k=top_k, future=None, num_layer_steps=0,
                                      next_use=None, cached=lambda key: False, layer_step=None))

    def apply(self, actions) -> None:
        pass


class SpeculativeDecoder:
    """Greedy speculative decoding of prompts on one engine, with the simulator's governor and ELB
    policy. ``run`` (optional): the executor's ``Run`` (its prefetch policy is the ELB policy; the
    target's passes are its steps; the policy's copies go to its copy stream). Without a run the
    experts are resident and ``prefetch`` (default none) only reads the ELB."""

    def __init__(self, engine: Any, governor: Any, *, num_experts: int, top_k: int, run: Any = None,
                 prefetch: PrefetchPolicy | None = None, costs: MeasuredCosts | None = None,
                 expert_bytes: int = 0, sync: Callable[[], None] | None = None) -> None:
        self.engine, self.governor, self.run = engine, governor, run
        self.M, self.E, self.top_k = engine.M, int(num_experts), int(top_k)
        if run is not None:
            self.prefetch = run.prefetch
            self.host = run
        else:
            from sim.policies import PREFETCH

            self.prefetch = prefetch if prefetch is not None else PREFETCH.create("none")
            self.host = _NoHost(self.prefetch, self.M, self.E, self.top_k)
        self.costs = costs or MeasuredCosts(0.0)
        self.expert_bytes = int(expert_bytes)
        dev = engine.device
        self.sync = sync or ((lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None))
        self.cycles: list[Cycle] = []
        self.routing: list[list[tuple[tuple[int, ...], ...]]] = []  # per request: target ids per kept position
        self.draft_rows: list[list[tuple[tuple[int, ...], ...] | None]] = []  # per request: draft ids per kept position
        self.draft_match: list[list[bool]] = []

    # ------------------------------------------------------------------ host calls
    def _issue(self, actions) -> None:
        self.host.apply(actions)
        if self.run is not None:
            self.run.try_issue()

    def _keys(self, row: tuple[tuple[int, ...], ...]) -> tuple[tuple[int, ...], ...]:
        E = self.E
        return tuple(tuple(m * E + e for e in ids) for m, ids in enumerate(row))

    def _link_state(self) -> tuple[float, int]:
        """(link time already committed, queued copies) at a cycle start."""
        run = self.run
        if run is None:
            return 0.0, 0
        run.pump()
        busy = (len(run.queue) + len(run.in_flight)) * self.costs.expert_transfer_s
        return busy, len(run.queue)

    # ------------------------------------------------------------------ passes
    def _target(self, r: int, step: int, ids: list[int], start: int, emitted: int = 1, **replayed: Any) -> torch.Tensor:
        run = self.run
        if run is not None:
            run.begin_step(r, step, len(ids), emitted=emitted, **replayed)
        x = torch.tensor([ids], dtype=torch.long, device=self.engine.device)
        logits = self.engine.target(x, start)
        toks = logits.argmax(-1)
        if run is not None:
            run.end_step()
        return toks

    def generate(self, prompts: Sequence[Sequence[int]], new_tokens: int) -> list[list[int]]:
        """Greedy tokens of each prompt (``new_tokens`` each, the prefill's first included)."""
        out = []
        with torch.inference_mode():
            for r, prompt in enumerate(prompts):
                out.append(self._request(r, list(prompt), int(new_tokens)))
        return out

    def _request(self, r: int, prompt: list[int], new_tokens: int) -> list[int]:
        eng, run, gov, costs = self.engine, self.run, self.governor, self.costs
        if run is not None:
            run.request_start(r)
        else:
            self._issue(self.prefetch.on_request_start(r))
        eng.reset()
        P = len(prompt)
        toks = self._target(r, 0, prompt, 0)
        routing = [eng.target_routing.position(j) for j in range(P)]
        drafts: list[Any] = [None] * P
        match = [False] * P
        emitted = [int(toks[-1])]
        t, cycle = P, 0  # t: position of the last emitted token (not cached yet)
        while len(emitted) < new_tokens:
            cycle += 1
            k_limit = new_tokens - len(emitted) - 1  # a cycle emits up to k + 1 tokens
            busy, queued = self._link_state()
            hist = np.asarray(routing[P:] or routing[-1:], dtype=np.int64)
            cc = costs.cycle_costs(hist, self.M, self.E, self.top_k, busy, k_limit, self.expert_bytes)
            d = gov.decide(cc)
            k = max(0, min(int(d.k), k_limit))
            copies0 = run.copies if run is not None else 0
            self._issue(self.prefetch.on_cycle_start(CycleInfo(
                request=r, t=t, k=k, t_draft_s=costs.t_draft(k), expert_transfer_s=costs.expert_transfer_s,
                slots=run.cache.total_slots if run is not None else self.M * self.E, top_k=self.top_k)))
            # drafting
            self.sync()
            t0 = time.perf_counter()
            draft_toks: list[int] = []
            rows = []
            x = emitted[-1]
            for i in range(k):
                x, row = eng.draft(torch.tensor([[x]], dtype=torch.long, device=eng.device), t + i)
                draft_toks.append(x)
                rows.append(row)
                if run is not None:
                    run.pump()
                left = costs.t_draft(k - i - 1)
                busy, queued = self._link_state() if run is not None else (0.0, 0)
                xfer = costs.expert_transfer_s
                budget = int((left - busy) / xfer) - queued if xfer > 0 else 0
                self._issue(self.prefetch.on_draft_token(i, self._keys(row), budget))
            self.sync()
            t1 = time.perf_counter()
            # verify: the draft's keys/values are dropped, the target writes t..t+k
            eng.rollback(t)
            ver = [emitted[-1]] + draft_toks
            y = self._target(r, cycle, ver, t).tolist()
            self.sync()
            t2 = time.perf_counter()
            a = 0
            while a < k and draft_toks[a] == y[a]:
                a += 1
            if run is not None:
                run.steps[-1].emitted = a + 1
            eng.rollback(t + a + 1)
            # bookkeeping: routing of the kept positions, the draft's rows there, acceptance
            vrows = [eng.target_routing.position(j) for j in range(k + 1)]
            agree = []
            for j in range(min(a + 1, k)):  # positions where the draft saw the target's input
                inter = sum(len(set(rows[j][m]) & set(vrows[j][m])) for m in range(self.M))
                agree.append(inter / (self.M * self.top_k))
            for j in range(a + 1):
                routing.append(vrows[j])
                drafts.append(rows[j] if j < k else None)
                match.append(j < a or a == k)  # a == k: the bonus position was not drafted (see executed_spec_trace)
            fetched = (run.copies - copies0) if run is not None else 0
            need_sets = [{e for j in range(k + 1) for e in vrows[j][m]} for m in range(self.M)]
            needed = sum(len(x) for x in need_sets)
            elb_hits = sum(len(need_sets[m] & {e for row in rows for e in row[m]}) for m in range(self.M))
            if k:
                costs.observe_draft((t1 - t0) / k)
            costs.observe_verify(k + 1, t2 - t1)
            costs.observe_fetch(fetched, needed)
            gov.observe(k, a, t2 - t0)
            self.cycles.append(Cycle(
                request=r, cycle=cycle, t=t, k=k, accepted=a, draft_s=t1 - t0, verify_s=t2 - t1,
                matches=[draft_toks[i] == y[i] for i in range(k)], agreement=agree,
                coverage=run.steps[-1].coverage if run is not None else float("nan"), fetched=fetched,
                elb_hits=elb_hits, verify_experts=needed,
                predicted_cycle_s=float(getattr(d, "predicted_cycle_s", float("nan"))),
                governor_phase=str(getattr(d, "phase", ""))))
            emitted.extend(draft_toks[:a] + [y[a]])
            t += a + 1
        if run is not None:
            run.request_end(r)
        else:
            self._issue(self.prefetch.on_request_end(r))
        self.routing.append(routing)
        self.draft_rows.append(drafts)
        self.draft_match.append(match)
        return emitted[:new_tokens]

    # ------------------------------------------------------------------ replay
    def replay(self, trace: Any, draft: Any, *, seed: int = 0) -> None:
        """Speculative cycles over a trace's requests (mode=replay): the trace's routing is executed
        (every target pass computes exactly the experts of its rows, with their gate weights), the
        ELB rows and the acceptance come from ``draft`` (sim.speculative.DraftSource: the trace's
        ``draft``/``draft_match`` columns), so the simulator and this run see the same cycles for the
        same k. The draft model still runs its k tokens (its compute is measured), on random tokens."""
        rng = np.random.default_rng([seed, 77])
        with torch.inference_mode():
            for r in range(trace.num_requests):
                self._replay_request(r, trace, draft, rng)

    def _overrides(self, trace: Any, r: int, a: int, b: int) -> dict[str, Any]:
        k = self.top_k
        ids_np = trace.expert_ids[r, a:b].astype(np.int64)  # (n, M, k)
        if trace.gate_weights is not None:
            w_np = trace.gate_weights[r, a:b].astype(np.float32)
            w_np = np.where(np.isfinite(w_np), w_np, 1.0 / k)
        else:
            w_np = np.full(ids_np.shape, 1.0 / k, dtype=np.float32)
        dev = self.engine.device
        ov_ids = torch.from_numpy(np.ascontiguousarray(ids_np.transpose(1, 0, 2))).to(dev)
        ov_w = torch.from_numpy(np.ascontiguousarray(w_np.transpose(1, 0, 2))).to(dev)
        E = self.E
        needed = [tuple(sorted({m * E + int(e) for e in ids_np[:, m].reshape(-1)})) for m in range(self.M)]
        return {"override": (ov_ids, ov_w, ids_np.transpose(1, 0, 2).tolist()), "needed": needed}

    def _replay_request(self, r: int, trace: Any, draft: Any, rng: np.random.Generator) -> None:
        eng, run, gov, costs = self.engine, self.run, self.governor, self.costs
        L = int(trace.lengths[r])
        P = int((trace.phase[r, :L] == 0).sum())
        vocab = int(eng.vocab_size)
        if run is not None:
            run.request_start(r)
        else:
            self._issue(self.prefetch.on_request_start(r))
        eng.reset()
        toks = rng.integers(3, max(vocab, 4), size=L).tolist()
        self._target(r, 0, toks[:P], 0, **self._overrides(trace, r, 0, P))
        t, cycle = P, 0
        while t < L:
            cycle += 1
            k_limit = L - 1 - t
            busy, _ = self._link_state()
            costs.at(r, t, L)
            hist = trace.expert_ids[r, max(0, t - 64):t].astype(np.int64)  # verified rows (prefill too, as the simulator)
            d = gov.decide(costs.cycle_costs(hist, self.M, self.E, self.top_k, busy, k_limit, self.expert_bytes))
            k = max(0, min(int(d.k), k_limit))
            copies0 = run.copies if run is not None else 0
            self._issue(self.prefetch.on_cycle_start(CycleInfo(
                request=r, t=t, k=k, t_draft_s=costs.t_draft(k), expert_transfer_s=costs.expert_transfer_s,
                slots=run.cache.total_slots if run is not None else self.M * self.E, top_k=self.top_k)))
            self.sync()
            t0 = time.perf_counter()
            x = toks[t]
            elb: set[int] = set()
            for i in range(k):
                x, _ = eng.draft(torch.tensor([[x]], dtype=torch.long, device=eng.device), t + i)
                if run is not None:
                    run.pump()
                busy, queued = self._link_state()
                xfer = costs.expert_transfer_s
                budget = int((costs.t_draft(k - i - 1) - busy) / xfer) - queued if xfer > 0 else 0
                row = draft.elb_row(r, t + i)
                elb.update(key for keys in row for key in keys)
                self._issue(self.prefetch.on_draft_token(i, row, budget))
            self.sync()
            t1 = time.perf_counter()
            eng.rollback(t)
            a = draft.accepted(r, t, k)
            ov = self._overrides(trace, r, t, t + k + 1)
            self._target(r, cycle, toks[t:t + k + 1], int(trace.position[r, t]), emitted=a + 1, **ov)
            self.sync()
            t2 = time.perf_counter()
            eng.rollback(t + a + 1)
            fetched = (run.copies - copies0) if run is not None else 0
            if k:
                costs.observe_draft((t1 - t0) / k)
            costs.observe_verify(k + 1, t2 - t1)
            costs.observe_fetch(fetched, sum(len(x) for x in ov["needed"]))
            gov.observe(k, a, t2 - t0)
            self.cycles.append(Cycle(
                request=r, cycle=cycle, t=t, k=k, accepted=a, draft_s=t1 - t0, verify_s=t2 - t1,
                matches=[bool(draft.accepted(r, t + i, 1)) for i in range(k)],
                coverage=run.steps[-1].coverage if run is not None else float("nan"), fetched=fetched,
                elb_hits=sum(1 for keys in ov["needed"] for key in keys if key in elb),
                verify_experts=sum(len(x) for x in ov["needed"]),
                predicted_cycle_s=float(getattr(d, "predicted_cycle_s", float("nan"))),
                governor_phase=str(getattr(d, "phase", ""))))
            t += a + 1
        if run is not None:
            run.request_end(r)
        else:
            self._issue(self.prefetch.on_request_end(r))

    # ------------------------------------------------------------------ reports
    def sim_cycles(self) -> list[dict[str, Any]]:
        """The cycles in the simulator's record format (sim.metrics.speculative_metrics)."""
        return [{"request": c.request, "cycle": c.cycle, "t": c.t, "k": c.k, "accepted": c.accepted,
                 "emitted": c.emitted, "observed_cycle_s": c.draft_s + c.verify_s, "t_draft": c.draft_s,
                 "t_verify": c.verify_s, "predicted_cycle_s": c.predicted_cycle_s, "governor_phase": c.governor_phase,
                 "coverage": c.coverage,
                 **({"elb_hits": c.elb_hits, "verify_experts": c.verify_experts} if c.k else {})} for c in self.cycles]

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
