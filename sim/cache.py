"""The GPU expert cache: a fixed number of slots, one global pool or one pool per MoE layer.

A slot is empty, loading (ready at a known time), resident, or in use. A loading or in-use slot
is never evicted; a token's own experts at a layer are in use together.
"""

from __future__ import annotations

from typing import Callable

from sim.errors import SimError
from sim.policies.base import EvictionPolicy

ABSENT, LOADING, RESIDENT = 0, 1, 2


class ExpertCache:
    """Slot bookkeeping; the eviction policy only chooses victims among evictable keys."""

    def __init__(
        self,
        num_moe_layers: int,
        num_experts: int,
        eviction: EvictionPolicy,
        *,
        slots: int | None = None,
        per_layer: int | None = None,
    ) -> None:
        if (slots is None) == (per_layer is None):
            raise SimError("ExpertCache needs exactly one of slots (global pool) or per_layer")
        self.num_layers, self.num_experts = num_moe_layers, num_experts
        n = num_moe_layers * num_experts
        if per_layer is not None:
            self.pool_of = [key // num_experts for key in range(n)]
            self.capacity = [int(per_layer)] * num_moe_layers
        else:
            self.pool_of = [0] * n
            self.capacity = [int(slots)]
        self.per_layer = per_layer
        self.total_slots = sum(self.capacity)
        self.state = [ABSENT] * n
        self.in_use = [0] * n
        self.ready_at = [0.0] * n
        self.occupancy = [0] * len(self.capacity)
        self.eviction = eviction
        self.evictions = 0
        self.drop_on_release = False  # whole-layer streaming keeps nothing between steps (but pinned keys)
        self.prefetched = [False] * n  # arrived by prefetch and not used yet (the host clears it on use)
        self.wasted_prefetches = 0  # prefetched experts evicted before any use
        self.refused = 0  # loads refused by ``admit`` (they wait for a free slot)
        self.evicted = [False] * n  # evicted since its last load
        self.refetches = 0  # loads of evicted experts
        self.pinned: frozenset[int] = frozenset()  # preloaded for good (a streaming policy's resident layers)
        state, in_use = self.state, self.in_use
        self._can_evict = lambda key: state[key] == RESIDENT and not in_use[key]  # one call per candidate
        self._victim, self._inserted, self._removed = eviction.victim, eviction.inserted, eviction.removed
        self._replace = eviction.replace
        self._vacate_inline = type(self).vacate is ExpertCache.vacate  # a subclass's own vacate is called
        self.last_victim = -1  # the key the last eviction removed
        # admission (a prefetch policy's ``admits``): (incoming key, victim) -> may it evict?
        self.admit: Callable[[int, int], bool] | None = None

    @property
    def num_pools(self) -> int:
        return len(self.capacity)

    def can_evict(self, key: int) -> bool:
        return self.state[key] == RESIDENT and not self.in_use[key]

    def resident_count(self) -> int:
        return sum(self.occupancy)

    def load(self, key: int, ready_at: float, g: int) -> bool:
        """Start loading ``key`` into a slot of its pool, evicting the policy's victim if the pool
        is full; False (and nothing changes) if every slot is loading or in use."""
        pool_of = self.pool_of
        pool = pool_of[key]
        state, evicted, occupancy = self.state, self.evicted, self.occupancy
        if occupancy[pool] < self.capacity[pool]:
            occupancy[pool] += 1
            self._inserted(key, pool, g)
        else:
            if self.admit is None:  # the policy chooses its victim and puts key in its place
                victim = self._replace(pool, g, self._can_evict, key)
                if victim is None:
                    return False
            else:
                victim = self._victim(pool, g, self._can_evict)
                if victim is None:
                    return False
                if not self.admit(key, victim):
                    self.refused += 1
                    return False
                self._removed(victim, pool)
                self._inserted(key, pool, g)
            if state[victim] != RESIDENT or self.in_use[victim] or pool_of[victim] != pool:
                raise SimError(f"eviction policy {self.eviction.name} chose non-evictable key {victim}")
            # its slot passes to key: the pool's occupancy stays
            if self._vacate_inline:  # ExpertCache.vacate, inlined (one call less per eviction)
                prefetched = self.prefetched
                if prefetched[victim]:
                    prefetched[victim] = False
                    self.wasted_prefetches += 1
                state[victim] = ABSENT
            else:
                self.vacate(victim, pool)
            self.last_victim = victim
            self.evictions += 1
            evicted[victim] = True
        if evicted[key]:  # an evicted expert comes back: what an eviction costs
            evicted[key] = False
            self.refetches += 1
        state[key] = LOADING
        self.ready_at[key] = ready_at
        return True

    def insert_resident(self, key: int, g: int) -> None:
        """Place ``key`` without a transfer (preloaded at start)."""
        if not self.load(key, 0.0, g):
            raise SimError(f"no free slot to preload key {key}")
        self.state[key] = RESIDENT

    def pin(self, keys: list[int]) -> None:
        """Keep resident ``keys`` for good (a policy's ``preload``, once they landed): each counts
        as in use forever, so it is never evicted nor dropped."""
        for key in keys:
            if self.state[key] != RESIDENT:
                raise SimError(f"cannot pin expert key {key}: not resident")
            self.in_use[key] += 1
        self.pinned = self.pinned | frozenset(keys)

    def clear(self) -> None:
        """Empty every slot but the pinned ones (``cache.reset=request``, between requests; the
        host first lets every copy land and every computation end). Prefetched experts never used
        count as wasted."""
        state, in_use, pinned = self.state, self.in_use, self.pinned
        for key, st in enumerate(state):
            if st == ABSENT or key in pinned:
                continue
            if st == LOADING or in_use[key]:
                raise SimError(f"cache cleared while expert key {key} is {'loading' if st == LOADING else 'in use'}")
            self.remove(key)

    def remove(self, key: int) -> None:
        """Evict (or drop) a resident expert."""
        pool = self.pool_of[key]
        self._removed(key, pool)
        self.vacate(key, pool)
        self.occupancy[pool] -= 1

    def vacate(self, key: int, pool: int) -> None:
        """``key`` leaves its slot (evicted, or dropped; the eviction policy was told already):
        what a subclass that tracks slots frees (override it there: ``load`` inlines this
        method's body unless a subclass overrides it)."""
        if self.prefetched[key]:  # never used: a wasted prefetch
            self.prefetched[key] = False
            self.wasted_prefetches += 1
        self.state[key] = ABSENT

    def release(self, keys: tuple[int, ...]) -> None:
        """A computation that used ``keys`` is over: they leave the in-use state."""
        in_use = self.in_use
        for key in keys:
            in_use[key] -= 1
        if self.drop_on_release:
            state = self.state
            for key in keys:
                if state[key] == RESIDENT and not in_use[key]:
                    self.remove(key)

    @property
    def refetch_share(self) -> float:
        """The share of evictions whose expert had to be copied back (Laplace-smoothed): the
        expected extra transfer an eviction costs."""
        return (self.refetches + 1) / (self.evictions + 2)

    def check(self) -> None:
        """Invariants (used by tests): occupancy matches states and never exceeds capacity."""
        counts = [0] * self.num_pools
        for key, s in enumerate(self.state):
            if s != ABSENT:
                counts[self.pool_of[key]] += 1
        if counts != self.occupancy:
            raise AssertionError(f"occupancy {self.occupancy} != states {counts}")
        for p, (c, cap) in enumerate(zip(counts, self.capacity)):
            if c > cap:
                raise AssertionError(f"pool {p} holds {c} > {cap} slots")
