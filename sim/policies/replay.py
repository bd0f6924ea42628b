"""Replaying a recorded run's decisions (sim.decisions): validation level ``replayed``.

``ReplayPrefetch`` queues exactly the prefetches the recorded run issued, each at the decision point
where that run's policy queued it (same hook, same request, step, MoE layer, cycle or landing; same
priority), and nothing else: it never cancels, and its fetches name no layer-step, so the host's
admission rule lets them all out (the recorded run's rule already admitted them). The eviction
policy runs as configured (``ReplayEviction`` replays the recorded victims of one that follows the
prefetch policy's predictions, MoE-SpeQ's lookahead-aware eviction); demand fetches come from the
routing as always; where the recorded policy vetoed evictions (``admits``), the same asks are
refused again. ``PlaybackGovernor`` (sim.governor) returns the recorded k of each speculative cycle
in turn.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Sequence

from sim.policies.base import PREFETCH, Action, EvictionPolicy, Fetch, LayerStep, PolicyContext, PrefetchPolicy
from sim.policies.errors import PolicyError


class Point(NamedTuple):
    """Where a policy was asked: the hook and its location (-1 where it does not apply). Defined
    here, with the policy that looks decisions up by it; sim.decisions records and stores them."""

    hook: str
    request: int = -1
    step: int = -1
    layer: int = -1
    cycle: int = -1
    index: int = -1
    trigger: int = -1


@PREFETCH.register("replay")
class ReplayPrefetch(PrefetchPolicy):
    """The recorded prefetches at their recorded decision points (``decisions``: a loaded
    sim.decisions.DecisionLog; sim.run loads a ``policy.prefetch_args.decisions`` file). Streaming flags (``keeps_cache``, ``host_memory``) are the
    recorded policy's, and so are the hooks it implements: the host treats a policy that acts at a
    layer's start differently (it acts as the device reaches the layer, which synchronises the
    two), so an instance implements exactly the recorded policy's hooks (``meta["hooks"]``)."""

    def __new__(cls, decisions: Any) -> "ReplayPrefetch":
        hooks = frozenset(decisions.meta.get("hooks", GATED)) & frozenset(GATED)
        variant = _VARIANTS.get(hooks)
        if variant is None:
            base = {h: getattr(PrefetchPolicy, h) for h in GATED if h not in hooks}
            variant = _VARIANTS[hooks] = type(cls.__name__, (cls,), base)
        obj = super().__new__(variant)
        obj.decisions = decisions
        return obj

    def __init__(self, decisions: Any) -> None:
        meta = self.decisions.meta  # read by __new__
        self.keeps_cache = bool(meta.get("keeps_cache", True))
        self.host_memory = meta.get("host_memory")

    def attach(self, ctx: PolicyContext) -> None:
        super().attach(ctx)
        meta = self.decisions.meta
        M, E = meta.get("num_moe_layers"), meta.get("num_experts")
        if (M, E) != (ctx.num_moe_layers, ctx.num_experts):
            raise PolicyError(f"replayed decisions were recorded on {M} MoE layers x {E} experts, the simulated model has "
                           f"{ctx.num_moe_layers} x {ctx.num_experts}")
        self._at: dict[Any, list[Fetch]] = {
            pt: [Fetch(p.key, p.priority) for p in ps] for pt, ps in self.decisions.by_point().items()}
        self._landings: dict[int, int] = {}
        self._refused = {(r.key, r.victim, r.index) for r in self.decisions.refusals}
        self._asked: dict[tuple[int, int], int] = {}
        self._request, self._cycle = -1, 0
        self.replayed = 0
        self.already = 0  # replayed keys already resident or loading here (the two runs' caches differ)

    def reset(self) -> None:
        """``cache.reset=request``: the recorded decisions are the state; nothing to forget."""

    def _take(self, pt: Any) -> list[Action]:
        acts = self._at.pop(pt, None)
        if not acts:
            return []
        self.replayed += len(acts)
        cached = self.ctx.cached
        self.already += sum(1 for a in acts if cached(a.key))
        return acts

    def preload(self, capacity: Sequence[int]) -> list[int]:
        return [a.key for a in self._take(Point("preload"))]

    def on_request_start(self, request: int) -> list[Action]:
        self._request, self._cycle = int(request), 0
        return self._take(Point("request_start", request=int(request)))

    def on_layer_start(self, ls: LayerStep) -> list[Action]:
        return self._take(Point("layer_start", ls.request, ls.step, ls.m))

    def on_routed(self, ls: LayerStep, needed: Sequence[int]) -> list[Action]:
        return self._take(Point("routed", ls.request, ls.step, ls.m))

    def on_transfer_done(self, key: int) -> list[Action]:
        n = self._landings.get(key, 0) + 1
        self._landings[key] = n
        return self._take(Point("transfer_done", index=n, trigger=int(key)))

    def on_cycle_start(self, cycle: Any) -> list[Action]:
        self._cycle += 1
        return self._take(Point("cycle_start", request=int(cycle.request), cycle=self._cycle))

    def on_draft_token(self, i: int, row: Sequence[tuple[int, ...]], budget: int) -> list[Action]:
        return self._take(Point("draft_token", request=self._request, cycle=self._cycle, index=int(i)))

    def on_request_end(self, request: int) -> list[Action]:
        return self._take(Point("request_end", request=int(request)))

    def admits(self, key: int, victim: int) -> bool:
        """The recorded policy's answer: refused where it refused, the same time it was asked."""
        n = self._asked.get((key, victim), 0) + 1
        self._asked[(key, victim)] = n
        return (key, victim, n) not in self._refused

    def summary(self) -> dict[str, Any]:
        """How much of the log was replayed: prefetches queued, those whose key was already on the
        GPU or on its way here, and those whose decision point the simulated run never reached (a
        different trace, or cycles that went another way)."""
        return {"replayed_prefetches": self.replayed, "replay_already_cached": getattr(self, "already", 0),
                "replay_unreached": sum(len(v) for v in getattr(self, "_at", {}).values())}


#: the hooks the host calls only where a policy implements them (sim.host.overridden); the others it
#: always calls, and the replay needs them to know where it is (request, cycle)
GATED = ("on_layer_start", "on_routed", "on_transfer_done", "admits")
#: ReplayPrefetch per set of implemented gated hooks
_VARIANTS: dict[frozenset[str], type] = {}


class ReplayEviction(EvictionPolicy):
    """The recorded victims, in order per pool, for an eviction policy whose choices follow the
    prefetch policy's predictions (which a replay does not make). Where the recorded victim cannot
    be evicted now (the replayed run went another way), ``inner`` chooses; ``fallbacks`` counts it."""

    def __init__(self, inner: EvictionPolicy, decisions: Any) -> None:
        self.inner, self.decisions = inner, decisions
        self.name = f"replay({inner.name})"
        self.fallbacks = 0

    def attach(self, ctx: PolicyContext, num_pools: int) -> None:
        super().attach(ctx, num_pools)
        self.inner.attach(ctx, num_pools)
        pool_of = ctx.extra.get("pool_of")
        self._victims: list[list[int]] = [[] for _ in range(num_pools)]
        for e in self.decisions.evictions:
            self._victims[pool_of[e.victim] if pool_of is not None else 0].append(e.victim)
        self._next = [0] * num_pools

    def reset(self) -> None:
        """``cache.reset=request``: the inner policy forgets; the recorded victims go on."""
        self.inner.reset()

    def inserted(self, key: int, pool: int, g: int) -> None:
        self.inner.inserted(key, pool, g)

    def accessed(self, key: int, pool: int, g: int) -> None:
        self.inner.accessed(key, pool, g)

    def removed(self, key: int, pool: int) -> None:
        i, vs = self._next[pool], self._victims[pool]
        if i < len(vs) and vs[i] == key:
            self._next[pool] = i + 1
        self.inner.removed(key, pool)

    def victim(self, pool: int, g: int, can_evict: Callable[[int], bool]) -> int | None:
        i, vs = self._next[pool], self._victims[pool]
        if i < len(vs) and can_evict(vs[i]):
            return vs[i]
        self.fallbacks += 1
        return self.inner.victim(pool, g, can_evict)
