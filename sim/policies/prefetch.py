"""Prefetch policies: on-demand, whole-layer streaming, next-layer gate lookahead, history, oracle."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from sim.policies.errors import PolicyError
from sim.policies.base import DEMAND, PREFETCH, Action, Cancel, Fetch, LayerStep, PolicyContext, PrefetchPolicy


@PREFETCH.register("none")
class OnDemand(PrefetchPolicy):
    """Fetch only what a layer needs when its routing is known (Mixtral-offloading with LRU)."""


def streamed_resident_layers(slots: int, num_experts: int, num_moe_layers: int) -> int:
    """Whole MoE layers that whole-layer streaming keeps on the GPU in one pool of ``slots``: all of
    them if they fit, else as many as fit beside one layer's worth of slots that the streamed
    layers pass through (accelerate's ``device_map="auto"`` fills the GPU in module order and
    offloads the rest, so these are the first layers)."""
    E, M = num_experts, num_moe_layers
    if slots >= E * M:
        return M
    return max(0, (slots - E) // E)


@PREFETCH.register("stream")
class WholeLayerStreaming(PrefetchPolicy):
    """accelerate's device_map offload: as many whole layers as the budget allows stay on the GPU
    (preloaded, never evicted); every other layer's experts are all copied in, every step, and
    dropped after use. The copies come from pageable host memory and block the host (the host
    models that: hardware.host_memory does not apply to this policy)."""

    keeps_cache = False
    host_memory = "pageable"

    def __init__(self) -> None:
        self.resident_layers = 0

    def preload(self, capacity: Sequence[int]) -> list[int]:
        E, M = self.ctx.num_experts, self.ctx.num_moe_layers
        if len(capacity) == 1:
            n = streamed_resident_layers(capacity[0], E, M)
        else:  # per-layer pools: a layer whose pool holds all its experts keeps them
            n = M if min(capacity) >= E else 0
        self.resident_layers = n
        return list(range(n * E))

    def on_layer_start(self, ls: LayerStep) -> list[Action]:
        if ls.m < self.resident_layers:
            return []
        base = ls.m * self.ctx.num_experts
        return [Fetch(base + e, DEMAND) for e in range(self.ctx.num_experts)]


class _Tracked(PrefetchPolicy):
    """Remembers which layer-step each prediction was for. When that layer has routed it cancels
    the prefetches still queued (the host promotes the needed ones to demand; the rest are
    useless) and scores the prediction: the share of predicted experts the layer-step needed, per
    depth (priority), is the confidence its next prefetches carry (Laplace-smoothed: 1/2 before
    any evidence)."""

    def attach(self, ctx: PolicyContext) -> None:
        super().attach(ctx)
        self._for: dict[int, list[int]] = {}  # target layer-step -> keys fetched for it
        self._pred: dict[int, list[tuple[int, int]]] = {}  # target layer-step -> (key, depth) predicted
        self._score: dict[int, list[int]] = {}  # depth -> [predicted keys needed, predicted keys]

    def confidence(self, priority: int) -> float:
        hit, total = self._score.get(priority, (0, 0))
        return (hit + 1) / (total + 2)

    def _issue(self, target_g: int, keys: Sequence[int], priority: int) -> list[Action]:
        pred = self._pred.get(target_g)
        if pred is None:
            self._pred[target_g] = pred = []
        pred.extend((k, priority) for k in keys)
        cached = self.ctx.cached
        todo = [k for k in keys if not cached(k)]
        if not todo:
            return []
        lst = self._for.get(target_g)
        if lst is None:
            self._for[target_g] = todo
        else:
            lst += todo
        c = self.confidence(priority)
        return [Fetch(k, priority, target_g, c) for k in todo]

    def _expire(self, g: int, needed: Sequence[int]) -> list[Action]:
        pred = self._pred.pop(g, None)
        if pred:
            if len(needed) > 8:
                needed = set(needed)
            score = self._score
            for k, p in pred:
                sc = score.get(p)
                if sc is None:
                    score[p] = sc = [0, 0]
                sc[0] += k in needed
                sc[1] += 1
        keys = self._for.pop(g, None)
        if not keys:
            return []
        queued = self.ctx.queued
        return [Cancel(k) for k in keys if queued(k)]


@PREFETCH.register("lookahead")
class GateLookahead(_Tracked):
    """Next-layer gate lookahead of depth D: while layer l runs, fetch what the predictor says
    layers l+1..l+D need (the predictor: the trace's recorded ``lookahead_<d>``, a noisy oracle
    or the oracle). Nearer layers first."""

    def __init__(self, depth: int = 1) -> None:
        if depth < 1:
            raise PolicyError(f"lookahead depth must be >= 1, got {depth}")
        self.depth = int(depth)

    def on_routed(self, ls: LayerStep, needed: Sequence[int]) -> list[Action]:
        acts = self._expire(ls.g, needed)
        pred = self.ctx.predictor
        M = self.ctx.num_moe_layers
        for d in range(1, self.depth + 1):
            keys = pred.lookahead(ls.g, d)
            if keys:
                tm = keys[0] // self.ctx.num_experts
                acts += self._issue(ls.g + (tm - ls.m) if tm < M else ls.g, keys, d)
        return acts


@PREFETCH.register("oracle")
class OraclePrefetch(_Tracked):
    """Perfect knowledge: after each routing decision, fetch the experts of the next ``depth``
    layer-steps (across token boundaries), nearest first."""

    def __init__(self, depth: int = 2) -> None:
        if depth < 1:
            raise PolicyError(f"oracle depth must be >= 1, got {depth}")
        self.depth = int(depth)

    def on_request_start(self, request: int) -> list[Action]:
        return []

    def on_layer_start(self, ls: LayerStep) -> list[Action]:
        # the very first layer-step of the run has no earlier decision point
        if ls.g == 0:
            return self._issue(0, self.ctx.future(0), 1)
        return []

    def on_routed(self, ls: LayerStep, needed: Sequence[int]) -> list[Action]:
        acts = self._expire(ls.g, needed)
        for j in range(1, self.depth + 1):
            acts += self._issue(ls.g + j, self.ctx.future(ls.g + j), j)
        return acts


@PREFETCH.register("history")
class HistoryPrefetch(_Tracked):
    """MoE-Infinity-style: match the request's expert-activation matrix (EAM, layers x experts
    counts) so far against those of past requests (cosine similarity), and prefetch the best
    match's most used experts for the next ``layers_ahead`` layers. Before any request has ended,
    the request's own EAM stands in. Matching runs once per step, at its first MoE layer."""

    def __init__(self, layers_ahead: int = 2, per_layer: int | None = None, max_history: int = 64) -> None:
        if layers_ahead < 1:
            raise PolicyError(f"history layers_ahead must be >= 1, got {layers_ahead}")
        self.layers_ahead = int(layers_ahead)
        self.per_layer = per_layer
        self.max_history = int(max_history)

    def attach(self, ctx: PolicyContext) -> None:
        super().attach(ctx)
        M, E = ctx.num_moe_layers, ctx.num_experts
        self._past: list[np.ndarray] = []
        self._past_norm: np.ndarray | None = None
        self._cur = np.zeros((M, E), dtype=np.float64)
        self._match = self._cur
        self._n = int(self.per_layer or ctx.top_k)
        self._rank: np.ndarray | None = None

    def on_request_start(self, request: int) -> list[Action]:
        self._cur = np.zeros_like(self._cur)
        self._rank = None
        return []

    def on_request_end(self, request: int) -> list[Action]:
        eam = self._cur / max(self._cur.sum(), 1.0)
        self._past.append(eam)
        if len(self._past) > self.max_history:
            self._past.pop(0)
        p = np.stack([x.reshape(-1) for x in self._past])
        self._past_norm = p / np.maximum(np.linalg.norm(p, axis=1, keepdims=True), 1e-12)
        return []

    def _rematch(self) -> None:
        cur = self._cur.reshape(-1)
        if self._past_norm is not None and cur.any():
            sims = self._past_norm @ (cur / np.linalg.norm(cur))
            best = int(np.argmax(sims))  # first maximum: deterministic
            match = self._past[best]
        else:
            match = self._cur
        # experts per layer ranked by use in the matched EAM (stable: ties by expert id)
        self._rank = np.argsort(-match, axis=1, kind="stable")[:, : self._n]
        self._has = match[np.arange(match.shape[0])[:, None], self._rank] > 0

    def on_routed(self, ls: LayerStep, needed: Sequence[int]) -> list[Action]:
        E = self.ctx.num_experts
        cur = self._cur
        for key in needed:
            cur[key // E, key % E] += 1.0
        if ls.m == 0 or self._rank is None:
            self._rematch()
        acts = self._expire(ls.g, needed)
        M = self.ctx.num_moe_layers
        for j in range(1, self.layers_ahead + 1):
            tm = ls.m + j
            if tm >= M:
                break
            keys = [tm * E + int(e) for e, ok in zip(self._rank[tm], self._has[tm]) if ok]
            acts += self._issue(ls.g + j, keys, j)
        return acts
