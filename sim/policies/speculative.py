"""Prefetch policies for speculative decoding: the MoE-SpeQ expert scheduler and SP-MoE's cutoff.

Both read the Expert Lookahead Buffer (ELB): for each draft token i and MoE layer m, the experts the
draft's router picked. The verify pass needs, at each layer, the union over the k + 1 verified
positions of the target's experts; the ELB forecasts k of those positions.
"""

from __future__ import annotations

from typing import Any, Sequence

from sim.policies.errors import PolicyError
from sim.policies.base import PREFETCH, Action, Cancel, CycleInfo, Fetch, LayerStep, PolicyContext, PrefetchPolicy

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
    Mispredicted experts are demand-fetched by the host during verification. The scheduler
    publishes ``predicted_next_use`` for the lookahead-aware eviction: an expert of layer m that
    the ELB predicts and that the verify pass has not yet passed is used at layer m; any other is
    not predicted (evicted first).

    Admission (what keeps a prefetch from hurting):
    - ``admits``: a prefetch never evicts an expert that the ELB says the verify pass needs at the
      same or an earlier layer than the one it brings in (the copy waits for a slot instead);
      demand fetches (needed now) are always admitted.
    - per pool, the predicted experts held or requested never exceed the pool's slots (the host's
      ``ctx.extra["pool_capacity"]`` and ``["pool_of"]``; without them one pool of ``cycle.slots``).
    - stale prefetches are cancelled while still queued: those of a layer the verify pass has
      routed (``on_routed``), and at a cycle's start those of the previous cycle's ELB.
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
        self._issued: set[int] = set()  # keys this scheduler asked for in the current cycle
        self._claimed: set[int] = set()  # predicted keys holding (or promised) a slot this cycle
        self._claims: list[int] = [0]
        self._cap: list[int] = [0]
        self._pool_of: Sequence[int] | None = None
        self.cancelled = 0  # stale prefetches cancelled (queued when cancelled)
        ctx.extra["predicted_next_use"] = self.predicted_next_use
        ctx.extra["predicted_keys"] = self._protected

    def summary(self) -> dict[str, Any]:
        return {"prefetches_cancelled": self.cancelled}

    def predicted_next_use(self, key: int, g: int | None = None) -> int | None:
        m = key // self.ctx.num_experts
        if m > self._verify_m and key in self._elb[m]:
            return m
        return None

    def admits(self, key: int, victim: int) -> bool:
        need = self.predicted_next_use(key)
        if need is None:  # not a pending prediction: a demand fetch, needed now
            return True
        v = self.predicted_next_use(victim)
        return v is None or v > need

    def _pool(self, key: int) -> int:
        return 0 if self._pool_of is None else self._pool_of[key]

    def on_cycle_start(self, cycle: CycleInfo) -> list[Action]:
        queued = self.ctx.queued
        stale = [Cancel(key) for key in sorted(self._issued) if queued(key)]
        self.cancelled += len(stale)
        for s in self._elb:
            s.clear()
        self._protected.clear()
        self._issued.clear()
        self._claimed.clear()
        self._rows = []
        self._k = cycle.k
        self._verify_m = -1
        cap = self.ctx.extra.get("pool_capacity")
        self._pool_of = self.ctx.extra.get("pool_of") if cap is not None else None
        self._cap = list(cap) if cap is not None else [int(cycle.slots)]
        self._claims = [0] * len(self._cap)
        return stale

    def _take(self, key: int) -> bool:
        """Claim a slot of ``key``'s pool for it; False when the pool is fully claimed."""
        p = self._pool(key)
        if self._claims[p] >= self._cap[p]:
            return False
        self._claims[p] += 1
        self._claimed.add(key)
        return True

    def _fetch(self, key: int, priority: int, out: list[Action]) -> bool:
        if key in self._claimed or not self._take(key):
            return False
        self._issued.add(key)
        out.append(Fetch(key, priority))
        return True

    def on_draft_token(self, i: int, row: Sequence[tuple[int, ...]], budget: int) -> list[Action]:
        self._rows.append(row)
        cached = self.ctx.cached
        for m, keys in enumerate(row):
            elb = self._elb[m]
            for key in keys:
                if key not in elb:
                    elb.add(key)
                    self._protected.add(key)
                    if cached(key) and key not in self._claimed:
                        self._take(key)  # already held: it occupies a slot the verify pass needs
        k = self._k
        filled = (i + 1) / k
        out: list[Action] = []
        if i == k - 1:  # Phase III: the ELB is complete
            for m in range(len(self._elb)):
                for key in sorted(self._elb[m]):
                    if not cached(key):
                        self._fetch(key, PHASE3, out)
            return out
        if filled < self.phase2_start:  # Phase I
            return out
        lo, hi = int(self.window_lo * k), max(int(self.window_lo * k) + 1, int(round(self.window_hi * k)))
        rows = self._rows[lo:min(hi, len(self._rows))]
        n = int(budget * self.bandwidth_share)
        if n <= 0 or not rows:
            return out
        for m in range(len(self._elb)):
            for row in rows:
                for key in row[m]:
                    if not cached(key) and self._fetch(key, PHASE2, out) and len(out) >= n:
                        return out
        return out

    def on_routed(self, ls: LayerStep, needed: Sequence[int]) -> list[Action]:
        self._verify_m = ls.m
        layer = self._elb[ls.m]
        self._protected.difference_update(layer)
        for key in layer:  # this layer's claims end: its experts are in use now or not needed
            if key in self._claimed:
                self._claimed.discard(key)
                self._claims[self._pool(key)] -= 1
        # queued prefetches of this layer that it does not need are stale (needed ones were
        # promoted to demand by the host, which a Cancel never drops)
        queued, need = self.ctx.queued, set(needed)
        stale = [Cancel(key) for key in sorted(layer & self._issued) if key not in need and queued(key)]
        self.cancelled += len(stale)
        return stale


@PREFETCH.register("spmoe")
class SpMoeCutoff(PrefetchPolicy):
    """SP-MoE's cutoff-layer policy (arXiv 2510.10302; docs/speculation.md): prefetch the
    draft-predicted experts only for the first L_cut MoE layers, as the predictions arrive; deeper
    layers load on demand.

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

    def summary(self) -> dict[str, Any]:
        """``spmoe_l_cut_mean`` / ``_max``: the cutoff chosen per cycle (0: nothing prefetched, the
        rows then equal spec-lru's; docs/speculation.md says when and why)."""
        return {"spmoe_l_cut_mean": sum(self.log) / len(self.log) if self.log else float("nan"),
                "spmoe_l_cut_max": max(self.log, default=0)}
