"""Eviction policies: LRU, LFU, FIFO, Belady (future-knowing) and lookahead-aware."""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable

from sim.policies.base import EVICTION, EvictionPolicy, PolicyContext

NEVER = 1 << 62


class _Ordered(EvictionPolicy):
    """Per-pool ordered dict; victim = first evictable entry in order."""

    move_on_access = False
    insert_counts_as_use = True  # inserted at the end, where a use moves it

    def attach(self, ctx: PolicyContext, num_pools: int) -> None:
        super().attach(ctx, num_pools)
        self._order: list[OrderedDict[int, None]] = [OrderedDict() for _ in range(num_pools)]

    def inserted(self, key: int, pool: int, g: int) -> None:
        self._order[pool][key] = None

    def accessed(self, key: int, pool: int, g: int) -> None:
        if self.move_on_access:
            od = self._order[pool]
            if key in od:
                od.move_to_end(key)

    def removed(self, key: int, pool: int) -> None:
        self._order[pool].pop(key, None)

    def victim(self, pool: int, g: int, can_evict: Callable[[int], bool]) -> int | None:
        for key in self._order[pool]:
            if can_evict(key):
                return key
        return None

    def replace(self, pool: int, g: int, can_evict: Callable[[int], bool], key: int) -> int | None:
        od = self._order[pool]
        for victim in od:
            if can_evict(victim):
                del od[victim]
                od[key] = None
                return victim
        return None


@EVICTION.register("lru")
class LruEviction(_Ordered):
    """Least recently used (insertion counts as a use)."""

    move_on_access = True


@EVICTION.register("fifo")
class FifoEviction(_Ordered):
    """First in, first out: accesses do not refresh."""

    move_on_access = False


@EVICTION.register("lfu")
class LfuEviction(EvictionPolicy):
    """Least frequently used; counts persist across evictions (history), ties go to the least recent."""

    def attach(self, ctx: PolicyContext, num_pools: int) -> None:
        super().attach(ctx, num_pools)
        self._count: dict[int, int] = {}
        self._last: dict[int, int] = {}
        self._members: list[dict[int, None]] = [dict() for _ in range(num_pools)]
        self._tick = 0

    def inserted(self, key: int, pool: int, g: int) -> None:
        self._members[pool][key] = None
        self._tick += 1
        self._last[key] = self._tick

    def accessed(self, key: int, pool: int, g: int) -> None:
        self._count[key] = self._count.get(key, 0) + 1
        self._tick += 1
        self._last[key] = self._tick

    def removed(self, key: int, pool: int) -> None:
        self._members[pool].pop(key, None)

    def victim(self, pool: int, g: int, can_evict: Callable[[int], bool]) -> int | None:
        best, best_score = None, None
        count, last = self._count, self._last
        for key in self._members[pool]:
            if not can_evict(key):
                continue
            score = (count.get(key, 0), last[key])
            if best_score is None or score < best_score:
                best, best_score = key, score
        return best


@EVICTION.register("belady")
class BeladyEviction(EvictionPolicy):
    """MIN: evict the expert whose next use is farthest in the future (reads the trace's future).

    Ties (several never used again) go to the smallest key, so results are deterministic.
    """

    def attach(self, ctx: PolicyContext, num_pools: int) -> None:
        super().attach(ctx, num_pools)
        self._members: list[dict[int, None]] = [dict() for _ in range(num_pools)]

    def inserted(self, key: int, pool: int, g: int) -> None:
        self._members[pool][key] = None

    def removed(self, key: int, pool: int) -> None:
        self._members[pool].pop(key, None)

    def victim(self, pool: int, g: int, can_evict: Callable[[int], bool]) -> int | None:
        next_use = self.ctx.next_use
        best, best_score = None, None
        for key in self._members[pool]:
            if not can_evict(key):
                continue
            score = (next_use(key, g), -key)
            if best_score is None or score > best_score:
                best, best_score = key, score
        return best


@EVICTION.register("lookahead")
class LookaheadAwareEviction(LruEviction):
    """Keeps what the predictor says is needed soonest; among the rest, LRU.

    Evicts first an expert with no predicted use in the horizon (in LRU order), else the one whose
    predicted next use is farthest. The prediction comes from ``ctx.extra['predicted_next_use']``
    (a callable key, g -> layer-step or None) that a prefetch policy or the ELB provides, with
    optionally ``ctx.extra['predicted_keys']``, the set of keys it predicts (a fast path).
    """

    #: its victims follow the prefetch policy's predictions: a replay of a run replays its victims
    #: (sim.policies.replay.ReplayEviction)
    follows_prefetch = True

    def victim(self, pool: int, g: int, can_evict: Callable[[int], bool]) -> int | None:
        predicted = self.ctx.extra.get("predicted_next_use")
        if predicted is None:
            return super().victim(pool, g, can_evict)
        protected = self.ctx.extra.get("predicted_keys")
        order = self._order[pool]
        if protected is not None:  # fast path: the first evictable key with no predicted use
            for key in order:
                if key not in protected and can_evict(key):
                    return key
        far, far_score = None, -1
        for key in order:
            if not can_evict(key):
                continue
            nxt = predicted(key, g)
            if nxt is None:
                return key
            if nxt > far_score:
                far, far_score = key, nxt
        return far
