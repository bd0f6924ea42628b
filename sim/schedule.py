"""The run's layer-steps in execution order, with their compute times, computed once before replay.

A *step* is one forward call of the target on one request (prefill = step 0, all prompt tokens; a
decode step = one token). A *layer-step* ``g`` is one (step, MoE layer). Compute between two MoE
layers' routing decisions is folded into the later one's ``pre`` time, so the replay needs one
decision point per layer-step and no pandas or cost-model calls in its hot loop (anchors-sim §7.4).
"""

from __future__ import annotations

from bisect import bisect_right
from dataclasses import dataclass

import numpy as np

from sim.costmodel import CostModel
from sim.spec import ModelSpec
from traces import Trace

NEVER = 1 << 62


@dataclass
class Step:
    request: int  # ordinal in the trace
    step: int  # the trace's step number
    t0: int  # first token index (dense axis)
    t1: int  # one past the last token index
    kv_len: int  # context length after this step
    phase: int  # 0 prefill, 1 decode
    g0: int  # first layer-step
    tail: float  # compute after the last MoE layer (dense layers, final norm, LM head)


@dataclass(slots=True)
class LayerStepInfo:
    g: int
    request: int
    step: int
    m: int


class Schedule:
    """Autoregressive replay plan of a trace: steps, layer-steps, needed keys, compute times."""

    def __init__(self, trace: Trace, model: ModelSpec, cost: CostModel) -> None:
        self.trace = trace
        self.model = model
        M, E = model.num_moe_layers, model.num_experts
        self.M, self.E = M, E
        moe = list(model.moe_layers)
        self.steps: list[Step] = []
        self.needed: list[tuple[int, ...]] = []
        self.pre: list[float] = []
        self.exp: list[float] = []
        self.g_request: list[int] = []
        self.g_step: list[int] = []  # index into self.steps
        self.request_steps: list[tuple[int, int]] = []  # per request: (first step idx, end step idx)
        dense_layers_before = [
            [layer for layer in range(model.num_layers) if layer not in moe and (m == 0 or layer > moe[m - 1]) and layer < moe[m]]
            for m in range(M)
        ]
        dense_after = [layer for layer in range(model.num_layers) if layer > moe[-1]]
        offsets = np.arange(M, dtype=np.int64)[:, None] * E
        for r in range(trace.num_requests):
            L = int(trace.lengths[r])
            steps_r = trace.step[r, :L]
            bounds = np.flatnonzero(np.r_[True, steps_r[1:] != steps_r[:-1], True])
            first = len(self.steps)
            for a, b in zip(bounds[:-1], bounds[1:]):
                a, b = int(a), int(b)
                n = b - a
                kv = int(trace.position[r, b - 1]) + 1
                ids = trace.expert_ids[r, a:b]  # (n, M, k)
                g0 = len(self.needed)
                tail = sum(cost.attention(layer, n, kv) + cost.dense_ffn(layer, n) for layer in dense_after)
                tail += cost.embed_and_head(n, logits_tokens=1)
                self.steps.append(Step(r, int(steps_r[a]), a, b, kv, int(trace.phase[r, a]), g0, tail))
                s_idx = len(self.steps) - 1
                keys_all = ids.transpose(1, 0, 2).reshape(M, -1).astype(np.int64) + offsets
                for m in range(M):
                    layer = moe[m]
                    pre = cost.attention(layer, n, kv) + cost.router(layer, n)
                    for dl in dense_layers_before[m]:
                        pre += cost.attention(dl, n, kv) + cost.dense_ffn(dl, n)
                    if n == 1:
                        keys = tuple(int(x) for x in keys_all[m])
                        exp = len(keys) * cost.expert_ffn(layer, 1)
                    else:
                        uk, counts = np.unique(keys_all[m], return_counts=True)
                        keys = tuple(int(x) for x in uk)
                        exp = sum(cost.expert_ffn(layer, int(c)) for c in counts)
                    if model.num_shared_experts:
                        exp += cost.shared_experts(layer, n)
                    self.needed.append(keys)
                    self.pre.append(pre)
                    self.exp.append(exp)
                    self.g_request.append(r)
                    self.g_step.append(s_idx)
            self.request_steps.append((first, len(self.steps)))
        self.num_layer_steps = len(self.needed)
        self.infos = [
            LayerStepInfo(g, self.steps[si].request, self.steps[si].step, g - self.steps[si].g0)
            for g, si in enumerate(self.g_step)
        ]
        self._uses: dict[int, list[int]] | None = None

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

    def next_use(self, key: int, g: int) -> int:
        """First layer-step after ``g`` that needs ``key``; NEVER if none."""
        lst = self.uses().get(key)
        if not lst:
            return NEVER
        i = bisect_right(lst, g)
        return lst[i] if i < len(lst) else NEVER

    def layer_step(self, g: int) -> LayerStepInfo:
        return self.infos[g]

    def tokens_of(self, g: int) -> tuple[int, int, int]:
        """(request, first token, end token) of layer-step ``g``'s step."""
        s = self.steps[self.g_step[g]]
        return s.request, s.t0, s.t1

    def compute_time(self, step_idx: int, decision_delay: float) -> float:
        """Time of one step with every expert resident: the compute-only floor."""
        s = self.steps[step_idx]
        g1 = self.steps[step_idx + 1].g0 if step_idx + 1 < len(self.steps) else self.num_layer_steps
        return sum(self.pre[s.g0:g1]) + sum(self.exp[s.g0:g1]) + (g1 - s.g0) * decision_delay + s.tail
