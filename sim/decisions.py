"""A run's decisions, recorded as its host makes them, so that the simulator can replay them.

Validation level ``replayed`` (docs/validation.md) separates the cost model from the policies: the
simulator replays what the runtime decided (the prefetches it issued, the draft length k of each
speculative cycle) instead of deciding again, so a TPOT error there is the model's alone.

- ``DecisionRecorder`` attaches to a ``sim.host.HostController`` (the simulator's or the runtime's:
  the same object) and records, for every prefetch whose copy was actually issued, the decision
  that queued it: the policy hook and where it was called (request, step, MoE layer, cycle, draft
  token, or the n-th landing of a copy), the key, the priority, and the layer-step at which the copy
  went out; every eviction (layer-step, victim, incoming key); every refusal of the policy's
  ``admits`` (an eviction it did not allow). Prefetches that were cancelled or refused by the
  host's admission rule never reached the link and are not decisions to replay.
- ``DecisionLog`` holds them with the k of each cycle, and reads and writes them as one Parquet
  file (one row per record, ``kind`` = prefetch | eviction | refusal | cycle; the model's shape and the
  policy's streaming flags in the file's metadata); a bad file is refused with a one-line error.

The replay itself is ``sim.policies.replay``: a prefetch policy that queues each recorded key at
its recorded decision point (same hook, same place, same priority) and a governor that plays back
the recorded k. Queueing at the decision point, not at the issue point, is what makes the replay
exact: a copy goes out when the queue, the link and the slots let it, which is the simulator's to
model (on the runtime's deterministic virtual-time backend the replay reproduces the run's token
times; tests/test_replay.py).

The recorder wraps the host's policy calls, its ``apply`` and the cache's ``load`` of
this one run (instance attributes); runs that do not record are untouched.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, Sequence

from sim.errors import SimError
from sim.policies.base import Fetch, PrefetchPolicy
from sim.policies.replay import Point  # the key the replay policy looks decisions up by

#: the policy hooks a recorded prefetch can come from (the ``hook`` column)
HOOKS = ("preload", "request_start", "layer_start", "routed", "transfer_done", "cycle_start", "draft_token",
         "request_end")
#: the PrefetchPolicy methods the host calls (``meta["hooks"]``: those the recorded policy implements)
HOOK_METHODS = ("preload", "on_request_start", "on_layer_start", "on_routed", "on_transfer_done", "on_cycle_start",
                "on_draft_token", "on_request_end", "admits")
KINDS = ("prefetch", "eviction", "refusal", "cycle")
#: integer columns (-1 where a field does not apply to the record's kind or hook)
INT_COLUMNS = ("request", "step", "layer", "cycle", "index", "trigger", "key", "priority", "g", "issued_g", "k")
COLUMNS = ("kind", "hook", *INT_COLUMNS)
META_KEY = b"moe_offload.decisions"
FORMAT = 1
#: which location fields each hook uses (the rest are -1): its decision point
_WHERE = {
    "preload": (),
    "request_start": ("request",),
    "request_end": ("request",),
    "layer_start": ("request", "step", "layer"),
    "routed": ("request", "step", "layer"),
    "transfer_done": ("trigger", "index"),  # the index-th landing (1, 2, ...) of expert key ``trigger``
    "cycle_start": ("request", "cycle"),
    "draft_token": ("request", "cycle", "index"),  # draft token ``index`` (0-based) of the cycle
}


class Prefetch(NamedTuple):
    """A prefetch whose copy was issued: decided at ``point`` (layer-step ``g`` there, -1 outside
    a layer-step), issued while the host was at layer-step ``issued_g``."""

    point: Point
    key: int
    priority: int
    g: int
    issued_g: int


class Eviction(NamedTuple):
    """``victim`` left its slot at layer-step ``g`` so that ``key`` could be loaded."""

    g: int
    victim: int
    key: int


class Refusal(NamedTuple):
    """The policy's ``admits`` refused, the ``index``-th time (1, 2, ...) it was asked, to let
    ``key`` evict ``victim`` (the copy waited in the queue)."""

    key: int
    victim: int
    index: int


class CycleK(NamedTuple):
    """The draft length of cycle ``cycle`` (1, 2, ...) of request ``request``."""

    request: int
    cycle: int
    k: int


@dataclass
class DecisionLog:
    """The decisions of one run; ``meta``: num_moe_layers, num_experts, keeps_cache, host_memory,
    and what the writer adds (policy, config_id, source, repetition)."""

    prefetches: list[Prefetch] = field(default_factory=list)
    evictions: list[Eviction] = field(default_factory=list)
    refusals: list[Refusal] = field(default_factory=list)
    cycles: list[CycleK] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)

    # ------------------------------------------------------------ views
    def by_point(self) -> dict[Point, list[Prefetch]]:
        """The prefetches of each decision point, in the order they were queued."""
        out: dict[Point, list[Prefetch]] = {}
        for p in self.prefetches:
            out.setdefault(p.point, []).append(p)
        return out

    def ks(self) -> list[int]:
        """The k of every cycle, in run order (requests in turn, cycles in order)."""
        return [c.k for c in sorted(self.cycles, key=lambda c: (c.request, c.cycle))]

    # ------------------------------------------------------------ files
    def records(self) -> dict[str, list]:
        """Column lists of the Parquet table (one row per prefetch, eviction and cycle)."""
        cols: dict[str, list] = {c: [] for c in COLUMNS}

        def add(kind: str, hook: str = "", **v: int) -> None:
            cols["kind"].append(kind)
            cols["hook"].append(hook)
            for c in INT_COLUMNS:
                cols[c].append(int(v.get(c, -1)))

        for p in self.prefetches:
            pt = p.point
            add("prefetch", pt.hook, request=pt.request, step=pt.step, layer=pt.layer, cycle=pt.cycle, index=pt.index,
                trigger=pt.trigger, key=p.key, priority=p.priority, g=p.g, issued_g=p.issued_g)
        for e in self.evictions:
            add("eviction", g=e.g, key=e.victim, trigger=e.key)
        for r in self.refusals:
            add("refusal", key=r.key, trigger=r.victim, index=r.index)
        for c in self.cycles:
            add("cycle", request=c.request, cycle=c.cycle, k=c.k)
        return cols

    def save(self, path: str | Path) -> Path:
        """Write the log as one Parquet file, atomically."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        from traces.atomic import atomic_write

        cols = self.records()
        arrays = [pa.array(cols["kind"], pa.string()), pa.array(cols["hook"], pa.string())]
        arrays += [pa.array(cols[c], pa.int64()) for c in INT_COLUMNS]
        meta = {**self.meta, "format": FORMAT}
        table = pa.Table.from_arrays(arrays, names=list(COLUMNS)).replace_schema_metadata(
            {META_KEY: json.dumps(meta, sort_keys=True, default=str).encode()})
        return atomic_write(path, lambda tmp: pq.write_table(table, tmp))

    @classmethod
    def load(cls, path: str | Path) -> "DecisionLog":
        """Read a decisions file; anything that is not one, or holds values no run could have
        recorded, is refused with a SimError naming the file, the column and the value."""
        import pyarrow.parquet as pq

        path = Path(path)
        where = f"decisions file {path}"
        if not path.is_file():
            raise SimError(f"{where}: no such file")
        try:
            table = pq.read_table(path)
        except Exception as e:  # pyarrow raises several kinds for a file that is not Parquet
            raise SimError(f"{where}: not a Parquet file ({type(e).__name__}: {str(e).splitlines()[0]})") from None
        raw = (table.schema.metadata or {}).get(META_KEY)
        if raw is None:
            raise SimError(f"{where}: not a decisions file (no {META_KEY.decode()} metadata)")
        try:
            meta = json.loads(raw)
        except ValueError:
            raise SimError(f"{where}: unreadable {META_KEY.decode()} metadata") from None
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise SimError(f"{where}: format {meta.get('format') if isinstance(meta, dict) else meta!r}, "
                           f"this version reads format {FORMAT}")
        for name in ("num_moe_layers", "num_experts"):
            if not isinstance(meta.get(name), int) or meta[name] < 1:
                raise SimError(f"{where}: metadata field '{name}' must be a positive integer, got {meta.get(name)!r}")
        hooks = meta.get("hooks", list(HOOK_METHODS))
        if not isinstance(hooks, list) or set(hooks) - set(HOOK_METHODS):
            raise SimError(f"{where}: metadata field 'hooks' must list policy hooks among {list(HOOK_METHODS)}, "
                           f"got {hooks!r}")
        missing = [c for c in COLUMNS if c not in table.column_names]
        if missing:
            raise SimError(f"{where}: missing column(s) {missing}")
        cols = {c: table.column(c).to_pylist() for c in COLUMNS}
        for c in INT_COLUMNS:
            if any(v is None for v in cols[c]):
                raise SimError(f"{where}: column '{c}' has nulls (-1 marks a field that does not apply)")
        log = cls(meta=meta)
        M, E = meta["num_moe_layers"], meta["num_experts"]
        n_keys = M * E
        seen_cycles: set[tuple[int, int]] = set()
        for i, kind in enumerate(cols["kind"]):
            v = {c: cols[c][i] for c in INT_COLUMNS}

            def bad(col: str, why: str) -> SimError:
                return SimError(f"{where}: row {i} ({kind}): column '{col}' = {v[col]} {why}")

            if kind == "prefetch":
                hook = cols["hook"][i]
                if hook not in _WHERE:
                    raise SimError(f"{where}: row {i} (prefetch): unknown hook {hook!r}; known: {list(HOOKS)}")
                if not 0 <= v["key"] < n_keys:
                    raise bad("key", f"is not an expert key of {M} MoE layers x {E} experts")
                if v["priority"] < 0:
                    raise bad("priority", "is negative")
                for c in _WHERE[hook]:  # cycles and landings count from 1, the rest from 0
                    if v[c] < (1 if c == "cycle" or (c == "index" and hook == "transfer_done") else 0):
                        raise bad(c, f"is out of range for hook '{hook}'")
                if "layer" in _WHERE[hook] and v["layer"] >= M:
                    raise bad("layer", f"is not one of the {M} MoE layers")
                if hook == "transfer_done" and v["trigger"] >= n_keys:
                    raise bad("trigger", f"is not an expert key of {M} MoE layers x {E} experts")
                pt = Point(hook, *(v[c] if c in _WHERE[hook] else -1
                                   for c in ("request", "step", "layer", "cycle", "index", "trigger")))
                log.prefetches.append(Prefetch(pt, v["key"], v["priority"], v["g"], v["issued_g"]))
            elif kind == "eviction":
                for c in ("key", "trigger"):
                    if not 0 <= v[c] < n_keys:
                        raise bad(c, f"is not an expert key of {M} MoE layers x {E} experts")
                log.evictions.append(Eviction(v["g"], v["key"], v["trigger"]))
            elif kind == "refusal":
                for c in ("key", "trigger"):
                    if not 0 <= v[c] < n_keys:
                        raise bad(c, f"is not an expert key of {M} MoE layers x {E} experts")
                if v["index"] < 1:
                    raise bad("index", "is out of range (asks count from 1)")
                log.refusals.append(Refusal(v["key"], v["trigger"], v["index"]))
            elif kind == "cycle":
                if v["request"] < 0 or v["cycle"] < 1:
                    raise bad("request" if v["request"] < 0 else "cycle", "is out of range")
                if v["k"] < 0:
                    raise bad("k", "is negative")
                if (v["request"], v["cycle"]) in seen_cycles:
                    raise bad("cycle", f"appears twice for request {v['request']}")
                seen_cycles.add((v["request"], v["cycle"]))
                log.cycles.append(CycleK(v["request"], v["cycle"], v["k"]))
            else:
                raise SimError(f"{where}: row {i}: unknown kind {kind!r}; known: {list(KINDS)}")
        return log


def agreement(recorded: DecisionLog, replayed: DecisionLog) -> dict[str, float]:
    """How closely a replay followed the recorded run, where the two can differ (the copy stream's
    timing): the share of the recorded prefetches that the replay issued at the same layer-step
    (key and ``issued_g``), and of the recorded evictions that it made too (layer-step, victim,
    incoming key), each counted as a multiset; NaN where the recorded run had none."""
    from collections import Counter

    def share(a: list, b: list) -> float:
        if not a:
            return float("nan")
        return sum((Counter(a) & Counter(b)).values()) / len(a)

    return {"replay_issue_agreement": share([(p.key, p.issued_g) for p in recorded.prefetches],
                                            [(p.key, p.issued_g) for p in replayed.prefetches]),
            "replay_eviction_agreement": share(list(recorded.evictions), list(replayed.evictions))}


class _Recording:
    """The prefetch policy as the host sees it while a recorder is attached: each hook first tells
    the recorder where it is called, then asks the policy. Everything else is the policy's."""

    def __init__(self, policy: Any, rec: "DecisionRecorder") -> None:
        self._policy, self._rec = policy, rec

    def __getattr__(self, name: str) -> Any:
        return getattr(self._policy, name)

    def preload(self, capacity: Sequence[int]) -> list[int]:
        self._rec.point = (Point("preload"), -1)
        return self._policy.preload(capacity)

    def on_request_start(self, request: int) -> list:
        rec = self._rec
        rec.request, rec.cycle = int(request), 0
        rec.point = (Point("request_start", request=int(request)), -1)
        return self._policy.on_request_start(request)

    # per layer-step: the point is built only if the hook's actions change the queue (host time)
    def on_layer_start(self, ls: Any) -> list:
        self._rec.point = ("layer_start", ls)
        return self._policy.on_layer_start(ls)

    def on_routed(self, ls: Any, needed: Sequence[int]) -> list:
        self._rec.point = ("routed", ls)
        return self._policy.on_routed(ls, needed)

    def on_transfer_done(self, key: int) -> list:
        n = self._rec.landings.get(key, 0) + 1
        self._rec.landings[key] = n
        self._rec.point = (Point("transfer_done", index=n, trigger=int(key)), -1)
        return self._policy.on_transfer_done(key)

    def on_cycle_start(self, cycle: Any) -> list:
        rec = self._rec
        rec.cycle += 1
        rec.point = (Point("cycle_start", request=int(cycle.request), cycle=rec.cycle), -1)
        return self._policy.on_cycle_start(cycle)

    def on_draft_token(self, i: int, row: Any, budget: int) -> list:
        rec = self._rec
        rec.point = (Point("draft_token", request=rec.request, cycle=rec.cycle, index=int(i)), -1)
        return self._policy.on_draft_token(i, row, budget)

    def on_request_end(self, request: int) -> list:
        self._rec.point = (Point("request_end", request=int(request)), -1)
        return self._policy.on_request_end(request)


class DecisionRecorder:
    """Records the decisions of the run that ``host`` (a ``sim.host.HostController``) drives.

    Attach it before the run starts (the runtime's ``Run`` does so before its preload). A policy
    action that the host applies right after a hook and that changes the copy queue becomes a
    pending decision of that hook's point; when that very queue entry is issued (the cache loads
    the key), it is recorded. A cancelled, refused or promoted-to-demand entry never is."""

    def __init__(self, host: Any) -> None:
        self.host = host
        # (point, layer-step) of the hook last called, or (hook, layer-step info) for the per-layer hooks
        self.point: tuple[Any, Any] | None = None
        self.request, self.cycle = -1, 0
        self.landings: dict[int, int] = {}
        self.pending: dict[int, tuple[tuple[Point, int], int]] = {}  # key -> ((point, g), queue seq)
        # plain tuples while the run goes (host time), named in ``decisions()``
        self.prefetches: list[tuple] = []
        self.evictions: list[tuple] = []
        self.policy = host.prefetch
        host.prefetch = _Recording(host.prefetch, self)
        queue, cache = host.copy.queue, host.cache
        entry, pending = queue._entry, self.pending
        apply, load = host.apply, cache.load

        def recorded_apply(actions: Any) -> None:
            point, self.point = self.point, None  # a hook's actions are applied once, right after it
            if not actions:
                return
            seq0 = queue._seq
            apply(actions)
            if point is None or queue._seq == seq0:
                return
            if type(point[0]) is str:  # a per-layer hook's (hook, info)
                ls = point[1]
                point = (Point(point[0], int(ls.request), int(ls.step), int(ls.m)), int(ls.g))
            for a in actions:
                if type(a) is Fetch:
                    e = entry.get(a.key)
                    if e is not None and e[1] > seq0 and e[0] == a.priority:
                        pending[a.key] = (point, e[1])

        def recorded_load(key: int, ready_at: float, g: int) -> bool:
            evictions = cache.evictions
            e = entry.get(key)  # the queue entry being issued (try_issue loads before dropping it)
            if not load(key, ready_at, g):
                return False
            if cache.evictions != evictions:
                self.evictions.append((g, cache.last_victim, key))
            p = pending.pop(key, None)
            if p is not None and e is not None and p[1] == e[1]:
                (pt, pg), prio = p[0], e[0]
                self.prefetches.append((pt, key, prio, pg, g))
            return True

        host.apply = recorded_apply
        cache.load = recorded_load
        self.refusals: list[Refusal] = []
        admit = cache.admit
        if admit is not None:  # the policy's admission of evictions (MoE-SpeQ's admits)
            asked: dict[tuple[int, int], int] = {}

            def recorded_admit(key: int, victim: int) -> bool:
                n = asked.get((key, victim), 0) + 1
                asked[(key, victim)] = n
                if admit(key, victim):
                    return True
                self.refusals.append(Refusal(int(key), int(victim), n))
                return False

            cache.admit = recorded_admit

    def decisions(self, cycles: Sequence[Any] = (), **meta: Any) -> DecisionLog:
        """The log so far; ``cycles``: the run's cycle records (dicts or objects with request,
        cycle and k: RunLog.cycles)."""
        get = (lambda c, n: c[n]) if cycles and isinstance(cycles[0], dict) else getattr
        cache = self.host.cache
        return DecisionLog(
            prefetches=[Prefetch(pt, int(k), int(p), int(pg), int(g)) for pt, k, p, pg, g in self.prefetches],
            evictions=[Eviction(int(g), int(v), int(k)) for g, v, k in self.evictions], refusals=list(self.refusals),
            cycles=[CycleK(int(get(c, "request")), int(get(c, "cycle")), int(get(c, "k"))) for c in cycles],
            meta={"num_moe_layers": cache.num_layers, "num_experts": cache.num_experts,
                  "hooks": [h for h in HOOK_METHODS if getattr(type(self.policy), h) is not getattr(PrefetchPolicy, h)],
                  "keeps_cache": bool(self.policy.keeps_cache),
                  "host_memory": getattr(self.policy, "host_memory", None), "prefetch": self.policy.name, **meta})
