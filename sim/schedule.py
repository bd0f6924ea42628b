"""The run's layer-steps in execution order, with their compute times, computed once before replay.

A *step* is one forward call of the target on one request (prefill = step 0, all prompt tokens; a
decode step = one token). A *layer-step* ``g`` is one (step, MoE layer). Compute between two MoE
layers' routing decisions is folded into the later one's ``pre`` time, so the replay needs one
decision point per layer-step and no pandas or cost-model calls in its hot loop (times precomputed, as in Vidur,
arXiv 2405.05465).
"""

from __future__ import annotations

from bisect import bisect_right
from collections import Counter
from dataclasses import dataclass
from itertools import repeat
from typing import Iterator

import numpy as np

from sim.costmodel import CostModel
from sim.policies.predictors import LayerSteps
from sim.spec import ModelSpec
from traces import Trace

NEVER = 1 << 62


@dataclass
class Step:
    request: int  # ordinal in the trace
    step: int  # the step's number (the trace's, or the speculative cycle's)
    t0: int  # first token index (dense axis)
    t1: int  # one past the last token index
    kv_len: int  # context length after this step
    phase: int  # 0 prefill, 1 decode
    g0: int  # first layer-step
    tail: float  # compute after the last MoE layer (dense layers, final norm, LM head)
    emitted: int = 1  # tokens this step emits (speculative: accepted + 1)
    draft_s: float = 0.0  # drafting that preceded this step (speculative verify passes)


@dataclass(slots=True)
class LayerStepInfo:
    g: int
    request: int
    step: int
    m: int


class Schedule:
    """Replay plan of a trace: steps, layer-steps, needed keys, compute times.

    The autoregressive plan is built up front (``build=True``); a speculative run appends each
    verify pass with ``add_step`` as its cycles are decided.
    """

    def __init__(self, trace: Trace, model: ModelSpec, cost: CostModel, *, build: bool = True) -> None:
        self.trace = trace
        self.model = model
        self.cost = cost
        M, E = model.num_moe_layers, model.num_experts
        self.M, self.E = M, E
        moe = list(model.moe_layers)
        self.steps: list[Step] = []
        self.needed: list[tuple[int, ...]] = []
        self.pre: list[float] = []
        self.exp: list[float] = []
        self.g_step: list[int] = []  # index into self.steps
        self._infos: list[LayerStepInfo] | None = None
        self.request_steps: list[tuple[int, int]] = []  # per request: (first step idx, end step idx)
        self._dense_before = [
            [x for x in range(model.num_layers) if x not in moe and (m == 0 or x > moe[m - 1]) and x < moe[m]]
            for m in range(M)
        ]
        self._dense_after = [x for x in range(model.num_layers) if x > moe[-1]]
        self._offsets = np.arange(M, dtype=np.int64)[:, None] * E
        # MoE layers priced by the same memo entries (the cost model's layer classes, with those of
        # the dense layers before them) get the same pre-routing time: computed once per class
        classes: dict[tuple, int] = {}
        self._pre_class = [classes.setdefault(self._price_class(m), len(classes)) for m in range(M)]
        self._class_reps = [self._pre_class.index(c) for c in range(len(classes))]  # an MoE ordinal per class
        self._one_token_exp: list[float] | None = None
        self._uses: dict[int, list[int]] | None = None
        self._draft_memo: dict[int, float] = {}
        self._verify_memo: dict[tuple[int, int], float] = {}
        self._layer_groups: list[tuple[int, int, bool]] | None = None
        if build:
            for r in range(trace.num_requests):
                L = int(trace.lengths[r])
                steps_r = trace.step[r, :L]
                bounds = np.flatnonzero(np.r_[True, steps_r[1:] != steps_r[:-1], True])
                first = len(self.steps)
                for a, b in zip(bounds[:-1], bounds[1:]):
                    self.add_step(r, int(a), int(b), int(steps_r[a]), int(trace.phase[r, a]))
                self.request_steps.append((first, len(self.steps)))

    def layer_steps(self) -> LayerSteps:
        """Each layer-step's request, trace rows and MoE ordinal (a predictor's input)."""
        g_step = np.asarray(self.g_step, dtype=np.int64)
        st = self.steps
        return LayerSteps(
            request=np.array([s.request for s in st], dtype=np.int64)[g_step],
            t0=np.array([s.t0 for s in st], dtype=np.int64)[g_step],
            t1=np.array([s.t1 for s in st], dtype=np.int64)[g_step],
            m=np.arange(len(g_step)) - np.array([s.g0 for s in st], dtype=np.int64)[g_step],
        )

    @property
    def num_layer_steps(self) -> int:
        return len(self.needed)

    def _price_class(self, m: int) -> tuple:
        cls, dense = self.cost.layer_class, self._dense_before[m]
        layer = self.model.moe_layers[m]
        return (cls("attention", layer), cls("moe", layer), tuple((cls("attention", d), cls("dense", d)) for d in dense))

    def _pre_routing(self, m: int, n: int, kv: int) -> float:
        """MoE layer m's attention and router, with the dense layers since the previous MoE layer."""
        cost, layer = self.cost, self.model.moe_layers[m]
        pre = cost.attention(layer, n, kv) + cost.router(layer, n)
        for dl in self._dense_before[m]:
            pre += cost.attention(dl, n, kv) + cost.dense_ffn(dl, n) + cost.host_layer(dl)
        return pre

    def add_step(self, r: int, a: int, b: int, step_no: int, phase: int, *, emitted: int = 1,
                 draft_s: float = 0.0) -> int:
        """Append a target pass over tokens [a, b) of request r; returns its step index."""
        trace, cost, model, M = self.trace, self.cost, self.model, self.M
        n = b - a
        kv = int(trace.position[r, b - 1]) + 1
        g0 = len(self.needed)
        tail = sum(cost.attention(x, n, kv) + cost.dense_ffn(x, n) + cost.host_layer(x) for x in self._dense_after)
        tail += cost.embed_and_head(n, logits_tokens=n if phase else 1) + cost.host_head()
        s_idx = len(self.steps)
        self.steps.append(Step(r, step_no, a, b, kv, phase, g0, tail, emitted, draft_s))
        keys_all = trace.expert_ids[r, a:b].transpose(1, 0, 2).reshape(M, -1).astype(np.int64) + self._offsets
        moe = model.moe_layers
        base = [self._pre_routing(m, n, kv) for m in self._class_reps]
        if n == 1:  # one token (autoregressive decode): every layer runs its top_k experts once
            k = keys_all.shape[1]
            if self._one_token_exp is None:
                # the experts phase: the longer of their kernels and the host dispatching them
                self._one_token_exp = [max(cost.decode_experts(layer, k), cost.host_experts(layer, k)) for layer in moe]
            # host work before a layer's experts can run (the same for every MoE layer of a class)
            pre_c = [base[c] + cost.host_layer(moe[m], k) for c, m in enumerate(self._class_reps)]
            self.needed.extend(map(tuple, keys_all.tolist()))
            self.pre.extend([pre_c[c] for c in self._pre_class])
            self.exp.extend(self._one_token_exp)
        else:
            for m in range(M):
                layer = moe[m]
                counts = Counter(keys_all[m].tolist())
                keys = tuple(sorted(counts))
                exp = sum(cost.expert_ffn(layer, c) for c in counts.values())
                if model.num_shared_experts:
                    exp += cost.shared_experts(layer, n)
                self.needed.append(keys)
                self.pre.append(base[self._pre_class[m]] + cost.host_layer(layer, len(keys)))
                self.exp.append(max(exp, cost.host_experts(layer, len(keys))))
        self.g_step.extend([s_idx] * M)
        if self._infos is not None:
            self._infos.extend(self._step_infos(s_idx))
        self._uses = None
        return s_idx

    def draft_token_time(self, r: int, t: int) -> float:
        """One draft step at token t: the same model with its routed experts in INT4 and resident
        (no transfers), shared non-expert weights, so only expert FFNs change precision; plus the
        draft's host overhead per layer."""
        kv = int(self.trace.position[r, t]) + 1
        hit = self._draft_memo.get(kv)
        if hit is not None:
            return hit
        cost, model = self.cost, self.model
        total = cost.embed_and_head(1, logits_tokens=1) + cost.host_head()
        for layer in range(model.num_layers):
            total += cost.attention(layer, 1, kv)
            moe = model.is_moe_layer(layer)
            total += cost.host_layer(layer, model.top_k if moe else 0, draft=True)
            if moe:
                total += cost.router(layer, 1) + model.top_k * cost.expert_ffn(layer, 1, "int4")
                if model.num_shared_experts:
                    total += cost.shared_experts(layer, 1)
            else:
                total += cost.dense_ffn(layer, 1)
        self._draft_memo[kv] = total
        return total

    def verify_estimate(self, n: int, kv: int, decision_delay: float) -> float:
        """Compute-only time of a target pass over n positions before its routing is known: each
        layer is assumed to spread its n*top_k selections over min(E, n*top_k) distinct experts.
        Layers that cost the same (same kind, same attention window) are priced once."""
        key = (n, kv)
        hit = self._verify_memo.get(key)
        if hit is not None:
            return hit + self.M * decision_delay
        cost, model = self.cost, self.model
        if self._layer_groups is None:
            groups: dict[tuple[bool, bool], list[int]] = {}
            for layer in range(model.num_layers):
                groups.setdefault((model.is_moe_layer(layer), model.is_sliding_layer(layer)), []).append(layer)
            self._layer_groups = [(layers[0], len(layers), moe) for (moe, _), layers in groups.items()]
        sel = n * model.top_k
        distinct = min(model.num_experts, sel)
        per = max(1, round(sel / distinct))
        total = cost.embed_and_head(n, logits_tokens=n) + cost.host_head()
        for layer, count, moe in self._layer_groups:
            one = cost.attention(layer, n, kv) + cost.host_layer(layer, distinct if moe else 0)
            if moe:
                kernels = distinct * cost.expert_ffn(layer, per)
                one += cost.router(layer, n) + kernels
                if model.num_shared_experts:
                    shared = cost.shared_experts(layer, n)
                    kernels += shared
                    one += shared
                one += max(0.0, cost.host_experts(layer, distinct) - kernels)
            else:
                one += cost.dense_ffn(layer, n)
            total += count * one
        self._verify_memo[key] = total
        return total + self.M * decision_delay

    # ---------------------------------------------------------------- future
    def future(self, g: int) -> tuple[int, ...]:
        return self.needed[g] if 0 <= g < self.num_layer_steps else ()

    def uses(self) -> dict[int, list[int]]:
        """key -> sorted layer-steps that need it (built on first use: only Belady and oracles ask)."""
        if self._uses is None:
            uses: dict[int, list[int]] = {}
            for g, keys in enumerate(self.needed):
                for key in keys:
                    uses.setdefault(key, []).append(g)
            self._uses = uses
        return self._uses

    def request_end(self, g: int) -> int:
        """One past the last layer-step of ``g``'s request (planned so far)."""
        r = self.steps[self.g_step[g]].request
        if r < len(self.request_steps):
            return self.steps[self.request_steps[r][1] - 1].g0 + self.M
        return len(self.needed)

    def next_use_in_request(self, key: int, g: int) -> int:
        """``next_use`` within ``g``'s request only (``cache.reset=request``: the future ends there)."""
        n = self.next_use(key, g)
        return n if n < self.request_end(g) else NEVER

    def next_use(self, key: int, g: int) -> int:
        """First layer-step after ``g`` that needs ``key``; NEVER if none."""
        lst = self.uses().get(key)
        if not lst:
            return NEVER
        i = bisect_right(lst, g)
        return lst[i] if i < len(lst) else NEVER

    @property
    def infos(self) -> list[LayerStepInfo]:
        """Each layer-step's ``LayerStepInfo``, built on first use (policies with layer hooks ask):
        a long run holds one per layer-step, and as many objects tracked by the garbage collector
        cost a run that never reads them a full collection (about as long as building the rest)."""
        if self._infos is None:
            self._infos = [info for s_idx in range(len(self.steps)) for info in self._step_infos(s_idx)]
        return self._infos

    def _step_infos(self, s_idx: int) -> Iterator[LayerStepInfo]:
        s, M = self.steps[s_idx], self.M
        return map(LayerStepInfo, range(s.g0, s.g0 + M), repeat(s.request, M), repeat(s.step, M), range(M))

    def layer_step(self, g: int) -> LayerStepInfo:
        return self.infos[g]

    def compute_time(self, step_idx: int, decision_delay: float) -> float:
        """Time of one step with every expert resident (its drafting included): the compute floor."""
        s = self.steps[step_idx]
        g1 = s.g0 + self.M
        return s.draft_s + sum(self.pre[s.g0:g1]) + sum(self.exp[s.g0:g1]) + self.M * decision_delay + s.tail
