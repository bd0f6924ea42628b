"""Policy interfaces: plain objects that see events and answer with actions.

No clock, no SimPy, no torch: the simulator and the GPU runtime host the very same objects.
Experts are named by an integer key ``m * num_experts + e`` (m = MoE-layer ordinal).
Time is never visible; order is: policies see a logical *layer-step* index ``g`` that counts
(step, MoE layer) pairs of the run in execution order, and the host decides at each event.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, NamedTuple, Protocol, Sequence

from sim.policies.errors import PolicyError

DEMAND = 0  # priority of demand fetches: before every prefetch


class Fetch(NamedTuple):
    """Copy ``key`` to the GPU. Lower priority values go first; 0 is reserved for demand.

    A prefetch that names the layer-step it is for (``for_g``) and its predictor's confidence (the
    probability that the layer-step needs ``key``) is admitted by the host's copy queue only when
    it pays for itself (sim/host.py, ``HostController.admit``); one without ``for_g`` always is."""

    key: int
    priority: int = 1
    for_g: int = -1
    confidence: float = 1.0


class Cancel(NamedTuple):
    """Drop a queued (not yet issued) fetch of ``key``; no-op if it is already on the link."""

    key: int


Action = Fetch | Cancel


class LayerStep(Protocol):
    """What a policy may know about one (step, MoE layer) of the run."""

    g: int  # global layer-step index
    request: int  # request ordinal in the trace
    step: int  # step within the request (0 = prefill)
    m: int  # MoE-layer ordinal


@dataclass
class PolicyContext:
    """Read-only facts a policy may use; built by the host (simulator or runtime).

    ``future`` answers what the trace says will be needed at layer-step ``g`` (for oracles and
    Belady only: an online policy must not call it). ``cached`` tells whether a key is resident
    or on its way, ``queued`` whether a fetch of it waits in the host queue (cancellable),
    ``layer_step`` describes a layer-step.
    """

    num_moe_layers: int
    num_experts: int
    top_k: int
    future: Callable[[int], Sequence[int]]
    num_layer_steps: int
    next_use: Callable[[int, int], int]  # (key, after g) -> next g that needs key, or a huge number
    cached: Callable[[int], Any]  # truthy if the key is resident or on its way
    layer_step: Callable[[int], Any]
    queued: Callable[[int], bool] = lambda key: False  # a fetch of key waits in the host queue
    predictor: Any = None  # sim.policies.predictors.Predictor or None
    extra: dict[str, Any] = field(default_factory=dict)

    def key(self, m: int, e: int) -> int:
        return m * self.num_experts + e


@dataclass(frozen=True)
class CycleInfo:
    """What the host knows as a speculative cycle starts (durations as numbers: still no clock)."""

    request: int
    t: int  # the last emitted token's position index (dense axis); drafting starts here
    k: int  # draft length chosen by the governor for this cycle
    t_draft_s: float  # predicted drafting time of the cycle
    expert_transfer_s: float  # one expert over the link
    slots: int  # expert-cache slots in total
    top_k: int


class EvictionPolicy:
    """Chooses which resident expert leaves when a slot is needed.

    The cache tells it about inserts, accesses and removals per pool; ``victim`` gets a predicate
    that is False for slots that must not be evicted (loading or in use).
    """

    name = "base"
    #: inserting a key orders it as a use would: a use of each of a layer-step's demand loads, in
    #: load order with nothing else told in between, changes nothing, so the host may skip those
    #: calls (LRU: insertion is the most recent use; FIFO: uses change nothing). A subclass that
    #: overrides ``inserted`` or ``accessed`` is back to False unless it says so itself.
    insert_counts_as_use = False

    def attach(self, ctx: PolicyContext, num_pools: int) -> None:
        self.ctx = ctx
        self.num_pools = num_pools

    def reset(self) -> None:
        """Forget everything learned so far (``cache.reset=request``: the host calls it with an
        empty cache at a request's start). The default attaches afresh, which any policy that
        keeps its state in ``attach`` gets right."""
        self.attach(self.ctx, self.num_pools)

    def inserted(self, key: int, pool: int, g: int) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def accessed(self, key: int, pool: int, g: int) -> None:
        pass

    def removed(self, key: int, pool: int) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def victim(self, pool: int, g: int, can_evict: Callable[[int], bool]) -> int | None:  # pragma: no cover
        raise NotImplementedError

    def replace(self, pool: int, g: int, can_evict: Callable[[int], bool], key: int) -> int | None:
        """``key`` takes the slot of this policy's victim in ``pool``: the victim is chosen, removed
        and ``key`` inserted, in one call (the cache's common case; one Python call per copy
        instead of three). None, and nothing changes, if nothing is evictable."""
        victim = self.victim(pool, g, can_evict)
        if victim is not None:
            self.removed(victim, pool)
            self.inserted(key, pool, g)
        return victim

    def __init_subclass__(cls, **kwargs: Any) -> None:
        # a subclass that changes how victims are chosen or tracked, but not ``replace``, gets the
        # generic ``replace`` built from its own hooks (a parent's fused one would bypass them);
        # one that changes insertions or uses loses ``insert_counts_as_use`` unless it restates it
        super().__init_subclass__(**kwargs)
        own = cls.__dict__
        if "replace" not in own and any(h in own for h in ("victim", "inserted", "removed")):
            cls.replace = EvictionPolicy.replace
        if "insert_counts_as_use" not in own and any(h in own for h in ("inserted", "accessed")):
            cls.insert_counts_as_use = False


class PrefetchPolicy:
    """Decides what to fetch ahead of need. The default fetches nothing (on-demand)."""

    name = "base"
    #: whole-layer streaming drops a layer's experts after use (no cache between steps)
    keeps_cache = True

    def attach(self, ctx: PolicyContext) -> None:
        self.ctx = ctx

    def reset(self) -> None:
        """Forget everything learned so far (``cache.reset=request``, at a request's start, before
        ``on_request_start``): LFU-like counts, request history. The default attaches afresh."""
        self.attach(self.ctx)

    def preload(self, capacity: Sequence[int]) -> list[int]:
        """Keys copied to the GPU before the first request (as a model load does) and kept there
        for good (never evicted, never dropped), given the slots of each pool. The default
        preloads nothing."""
        return []

    def on_request_start(self, request: int) -> list[Action]:
        return []

    def on_layer_start(self, ls: LayerStep) -> list[Action]:
        """Before the layer's routing is known (its attention is about to run)."""
        return []

    def on_routed(self, ls: LayerStep, needed: Sequence[int]) -> list[Action]:
        """The layer's routing is known on the host; ``needed`` are its keys (fetched on demand)."""
        return []

    def on_transfer_done(self, key: int) -> list[Action]:
        return []

    # speculative decoding (draft k tokens, verify k + 1); autoregressive runs never call these
    def on_cycle_start(self, cycle: CycleInfo) -> list[Action]:
        return []

    def on_draft_token(self, i: int, row: Sequence[tuple[int, ...]], budget: int) -> list[Action]:
        """Draft token ``i`` of the cycle has run: ``row[m]`` are the keys its router picked at MoE
        layer m (one row of the Expert Lookahead Buffer). ``budget``: how many experts the link can
        still move before verification would start (bandwidth guidance; may be <= 0)."""
        return []

    def on_request_end(self, request: int) -> list[Action]:
        return []

    def summary(self) -> dict[str, Any]:
        """Columns the policy adds to its results row (what it decided, in numbers)."""
        return {}

    def admits(self, key: int, victim: int) -> bool:
        """May loading ``key`` evict ``victim`` (the eviction policy's choice)? False leaves the copy
        queued until a slot frees. The host asks only policies that override this."""
        return True


class Registry:
    """Name -> class, filled at import time; errors list the known names."""

    def __init__(self, kind: str, error: type[Exception] = PolicyError) -> None:
        self.kind = kind
        self.error = error  # what a bad name or argument raises (the owner's branch of the error tree)
        self._items: dict[str, type] = {}

    def register(self, name: str) -> Callable[[type], type]:
        def deco(cls: type) -> type:
            if name in self._items:
                raise ValueError(f"{self.kind} '{name}' registered twice")
            cls.name = name
            self._items[name] = cls
            return cls

        return deco

    def get(self, name: str) -> type:
        try:
            return self._items[name]
        except KeyError:
            raise self.error(f"unknown {self.kind} '{name}'; known: {', '.join(sorted(self._items))}") from None

    def create(self, name: str, **kwargs: Any) -> Any:
        cls = self.get(name)
        try:
            return cls(**kwargs)
        except TypeError as e:
            raise self.error(f"{self.kind} '{name}': bad arguments {kwargs}: {e}") from None

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: str) -> bool:
        return name in self._items


EVICTION = Registry("eviction policy")
PREFETCH = Registry("prefetch policy")
PREDICTORS = Registry("predictor")
