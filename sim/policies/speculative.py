"""Prefetch policies for speculative decoding: the MoE-SpeQ expert scheduler and SP-MoE's cutoff.

Both read the Expert Lookahead Buffer (ELB): for each draft token i and MoE layer m, the experts the
draft's router picked. The verify pass needs, at each layer, the union over the k + 1 verified
positions of the target's experts; the ELB forecasts k of those positions.
"""

from __future__ import annotations

from typing import Sequence

from sim.policies.errors import PolicyError
from sim.policies.base import PREFETCH, Action, CycleInfo, Fetch, LayerStep, PolicyContext, PrefetchPolicy

PHASE3, PHASE2 = 1, 2  # copy priorities (0 is demand)


@PREFETCH.register("speq")
class SpeqScheduler(PrefetchPolicy):
    """MoE-SpeQ's three-phase schedule, keyed to how much of the ELB exists (arXiv 2511.14102,
    Sec. 3.3, Fig. 9).

    - Phase I (ELB filled below ``phase2_start``): serve what is cached, leave the link idle.
    - Phase II (from ``phase2_start``): prefetch the experts predicted by the *middle* draft tokens
      (those in ``[window_lo, window_hi)`` of the draft, where predictions are most useful and
      still certain enough), at most ``bandwidth_share`` x what the link can move before
      verification would start, earliest layers first.
    - Phase III (ELB complete): fetch every still-missing predicted expert at high priority, in
      layer order, so that verification starts with the cache saturated.
    Mispredicted experts are demand-fetched by the host during verification. The scheduler also
    publishes ``predicted_next_use`` for the lookahead-aware eviction: an expert of layer m that
    the ELB predicts and that the verify pass has not yet passed is used at layer m; any other is
    not predicted (evicted first).
    """

    def __init__(self, phase2_start: float = 0.25, window_lo: float = 0.25, window_hi: float = 0.75,
                 bandwidth_share: float = 1.0) -> None:
        for name, v in (("phase2_start", phase2_start), ("window_lo", window_lo), ("window_hi", window_hi)):
            if not 0.0 <= float(v) <= 1.0:
                raise PolicyError(f"speq {name} must be in [0, 1], got {v}")
        if window_lo > window_hi:
            raise PolicyError(f"speq window_lo ({window_lo}) must be <= window_hi ({window_hi})")
        if bandwidth_share < 0:
            raise PolicyError(f"speq bandwidth_share must be >= 0, got {bandwidth_share}")
        self.phase2_start, self.window_lo, self.window_hi = float(phase2_start), float(window_lo), float(window_hi)
        self.bandwidth_share = float(bandwidth_share)

    def attach(self, ctx: PolicyContext) -> None:
        super().attach(ctx)
        self._elb: list[set[int]] = [set() for _ in range(ctx.num_moe_layers)]
        self._rows: list[Sequence[tuple[int, ...]]] = []
        self._k = 0
        self._verify_m = -1  # verify pass position: layers <= this are done
        self._protected: set[int] = set()  # ELB keys of layers the verify pass has not reached
        ctx.extra["predicted_next_use"] = self.predicted_next_use
        ctx.extra["predicted_keys"] = self._protected

    def predicted_next_use(self, key: int, g: int) -> int | None:
        m = key // self.ctx.num_experts
        if m > self._verify_m and key in self._elb[m]:
            return m
        return None

    def on_cycle_start(self, cycle: CycleInfo) -> list[Action]:
        for s in self._elb:
            s.clear()
        self._protected.clear()
        self._rows = []
        self._k = cycle.k
        self._verify_m = -1
        return []

    def on_draft_token(self, i: int, row: Sequence[tuple[int, ...]], budget: int) -> list[Action]:
        self._rows.append(row)
        for m, keys in enumerate(row):
            self._elb[m].update(keys)
            self._protected.update(keys)
        k = self._k
        filled = (i + 1) / k
        cached = self.ctx.cached
        if i == k - 1:  # Phase III: the ELB is complete
            return [Fetch(key, PHASE3) for m in range(len(self._elb)) for key in sorted(self._elb[m]) if not cached(key)]
        if filled < self.phase2_start:  # Phase I
            return []
        lo, hi = int(self.window_lo * k), max(int(self.window_lo * k) + 1, int(round(self.window_hi * k)))
        rows = self._rows[lo:min(hi, len(self._rows))]
        n = int(budget * self.bandwidth_share)
        if n <= 0 or not rows:
            return []
        out, seen = [], set()
        for m in range(len(self._elb)):
            for row in rows:
                for key in row[m]:
                    if key not in seen and not cached(key):
                        seen.add(key)
                        out.append(Fetch(key, PHASE2))
                        if len(out) >= n:
                            return out
        return out

    def on_routed(self, ls: LayerStep, needed: Sequence[int]) -> list[Action]:
        self._verify_m = ls.m
        self._protected.difference_update(self._elb[ls.m])
        return []


@PREFETCH.register("spmoe")
class SpMoeCutoff(PrefetchPolicy):
    """SP-MoE's cutoff-layer policy (arXiv 2510.10302): prefetch the draft-predicted experts only for
    the first L_cut MoE layers, as the predictions arrive; deeper layers load on demand.

    L_cut = max L with L * n * t_io <= T_draft (the transfers hide under drafting) and
    L * n <= slots * ``memory_share`` (they fit), n = min(E, k * top_k) experts per layer,
    chosen per cycle; ``max_layers`` caps it (the paper reports thrashing beyond ~3 layers when
    prefetch goes deeper)."""

    def __init__(self, memory_share: float = 0.5, max_layers: int | None = None) -> None:
        if not 0 < memory_share <= 1:
            raise PolicyError(f"spmoe memory_share must be in (0, 1], got {memory_share}")
        self.memory_share = float(memory_share)
        self.max_layers = max_layers

    def attach(self, ctx: PolicyContext) -> None:
        super().attach(ctx)
        self.l_cut = 0
        self.log: list[int] = []

    def on_cycle_start(self, cycle: CycleInfo) -> list[Action]:
        n = max(1, min(self.ctx.num_experts, cycle.k * cycle.top_k))
        by_time = int(cycle.t_draft_s / (n * cycle.expert_transfer_s)) if cycle.expert_transfer_s > 0 else self.ctx.num_moe_layers
        by_memory = int(cycle.slots * self.memory_share // n)
        cut = max(0, min(by_time, by_memory, self.ctx.num_moe_layers))
        if self.max_layers is not None:
            cut = min(cut, int(self.max_layers))
        self.l_cut = cut
        self.log.append(cut)
        return []

    def on_draft_token(self, i: int, row: Sequence[tuple[int, ...]], budget: int) -> list[Action]:
        cached = self.ctx.cached
        return [Fetch(key, 1 + m) for m in range(self.l_cut) for key in row[m] if not cached(key)]
