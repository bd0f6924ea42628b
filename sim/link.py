"""Host-to-device copies: a host-side priority queue feeding a FIFO copy stream over the PCIe link.

CUDA streams are first-in-first-out: an issued copy can be neither cancelled nor overtaken. So the
host keeps its own queue (demand before prefetch, cancellable while not yet issued) and issues at
most ``copies_in_flight`` copies to the stream (docs/host-controller.md). The link is modelled as a
busy-until timestamp: an issued copy starts when the host has issued it (``issue_overhead`` of host
time each) and the link is free, and takes ``copy_latency + bytes / bandwidth(bytes)``. Copies
therefore complete in issue order.
"""

from __future__ import annotations

from collections import deque
from typing import Callable

from sim.cache import LOADING, RESIDENT, ExpertCache
from sim.policies.base import DEMAND, Cancel

_INF = float("inf")


def host_synchronous(policy_memory: str | None, host_memory: str) -> bool:
    """Whether copies hold the host until they land: those from pageable host memory do
    (``cudaMemcpyAsync`` from pageable memory returns only once the data is staged for the DMA,
    CUDA Runtime API, "API synchronization behavior"), so the host issues one copy at a time and
    can decide or launch nothing while it lasts. A policy may copy from its own kind of memory
    (``policy_memory``: whole-layer streaming is pageable, as accelerate's offload); else the
    store's (``host_memory``: ``hardware.host_memory``)."""
    return (policy_memory or host_memory) == "pageable"


class CopyQueue:
    """Host-side priority queue of expert keys: FIFO within a priority, lower priorities first,
    cancel and promote in O(1) (stale bucket entries are skipped lazily).

    Priorities are small integers (0 = demand, d = a prefetch d layers ahead), so one deque per
    priority beats a heap here."""

    __slots__ = ("_buckets", "_entry", "_seq", "queued", "target")

    def __init__(self) -> None:
        self._buckets: list[deque[tuple[int, int]]] = [deque()]  # priority -> (seq, key)
        self._entry: dict[int, tuple[int, int]] = {}  # key -> (priority, seq) of its live entry
        self._seq = 0
        # key -> (layer-step, confidence) of a queued prefetch that names its target (admission)
        self.target: dict[int, tuple[int, float]] = {}
        self.queued: Callable[[int], bool] = self._entry.__contains__  # the policies' view (fast)

    def __contains__(self, key: int) -> bool:
        return key in self._entry

    def __len__(self) -> int:
        return len(self._entry)

    def priority(self, key: int) -> int | None:
        e = self._entry.get(key)
        return None if e is None else e[0]

    def push(self, key: int, priority: int) -> bool:
        """Queue ``key``; an already queued key only moves up (never down). True if changed."""
        e = self._entry.get(key)
        if e is not None and e[0] <= priority:
            return False
        if priority < 0:
            raise ValueError(f"copy priority must be >= 0, got {priority}")
        self._seq += 1
        self._entry[key] = (priority, self._seq)
        buckets = self._buckets
        while len(buckets) <= priority:
            buckets.append(deque())
        buckets[priority].append((self._seq, key))
        return True

    def clear(self) -> None:
        """Drop every queued fetch (``cache.reset=request``: nothing of the last request is issued)."""
        for dq in self._buckets:
            dq.clear()
        self._entry.clear()
        self.target.clear()

    def cancel(self, key: int) -> bool:
        self.target.pop(key, None)
        return self._entry.pop(key, None) is not None

    def apply(self, actions, state: list[int]) -> None:
        """A policy's actions, the one way both hosts (simulator and runtime) apply them: a Cancel
        drops a queued prefetch (never a demand fetch), a Fetch queues a key that is absent."""
        entry = self._entry
        for a in actions:
            if type(a) is Cancel:
                e = entry.get(a.key)
                if e is not None and e[0] != DEMAND:
                    del entry[a.key]
                    self.target.pop(a.key, None)
            elif state[a.key] == 0 and self.push(a.key, a.priority):
                if a.priority != DEMAND and a.for_g >= 0:
                    self.target[a.key] = (a.for_g, a.confidence)
                else:
                    self.target.pop(a.key, None)

    def peek(self) -> tuple[int, int] | None:
        """(key, priority) of the head, or None."""
        entry = self._entry
        if not entry:
            return None
        for p, dq in enumerate(self._buckets):
            while dq:
                seq, key = dq[0]
                e = entry.get(key)
                if e is not None and e[1] == seq:
                    return key, p
                dq.popleft()
        return None

    def pop(self) -> None:
        """Remove the head returned by the last ``peek``."""
        key, p = self.peek()
        self._buckets[p].popleft()
        del self._entry[key]
        self.target.pop(key, None)


class CopyEngine:
    """The host-to-device copy stream as an exact timestamp model, advanced lazily.

    Between two host decisions the copy stream has no choices of its own: it completes copies in
    order and issues the next queued one when a copy frees room in the stream (or a slot frees). So
    instead of one SimPy event per transfer, the host calls ``advance(t)`` at each decision point
    and the stream replays, in time order, every completion, issue and slot release up to ``t``;
    when the compute stream must wait for experts, ``ready_time`` runs the same replay forward to
    the moment they have all landed. Issue times, link occupancy and evictions are exactly those of
    an event-per-transfer model (a test checks this against a brute-force reference).
    """

    def __init__(
        self,
        cache: ExpertCache,
        *,
        nbytes: int,
        transfer_time: float,
        issue_overhead: float,
        copies_in_flight: int,
        on_done: Callable[[int, float], None] | None = None,
        record: list | None = None,
        submit: Callable[[int, bool, float, float], float] | None = None,
        host_sync: bool = False,
    ) -> None:
        self.cache = cache
        self.queue = CopyQueue()
        self.nbytes = nbytes
        self.duration = transfer_time  # latency + bytes / bandwidth(bytes), one expert
        self.issue_overhead = issue_overhead
        # copies from pageable host memory hold the host until they land (see host_synchronous):
        # one copy is in flight at a time, and host_free is the landing of the last copy issued
        self.host_sync = bool(host_sync)
        self.max_in_flight = 1 if host_sync else max(1, int(copies_in_flight))
        self.in_flight: deque[tuple[float, int]] = deque()  # (end, key), in issue (= completion) order
        self.clock = 0.0  # the stream's state is exact up to this time
        self.link_free = 0.0
        self.host_free = 0.0
        self.g = 0  # the host's current layer-step (set by the compute stream)
        self.on_done = on_done
        self.record = record  # timeline spans (start, end, key, is_prefetch) when enabled
        # the runtime's copies: submit(key, is_prefetch, start, end) enqueues the real copy and returns
        # its completion time as far as the host knows it (inf until observed); None: the model only
        self.submit = submit
        self.copies = 0
        self.busy_time = 0.0
        self.blocked = False  # the queue head waits for a slot
        # the host's admission rule for prefetches that name their layer-step:
        # admit(for_g, confidence, start) -> issue it now? (None: every prefetch goes out)
        self.admit: Callable[[int, float, float], bool] | None = None
        self.refused = 0  # prefetches the admission rule dropped
        self.holds: deque[tuple[float, tuple[int, ...]]] = deque()  # (until, experts in use), compute order

    # ------------------------------------------------------------ host side
    def request(self, key: int, priority: int) -> None:
        """Queue a fetch unless ``key`` is already on the GPU or on its way."""
        if self.cache.state[key] == 0:  # absent
            self.queue.push(key, priority)

    def cancel(self, key: int) -> None:
        self.queue.cancel(key)

    def hold(self, keys: tuple[int, ...], until: float) -> None:
        """``keys`` are in use by a computation that ends at ``until`` (released then, in order)."""
        self.holds.append((until, keys))

    def try_issue(self) -> None:
        """Issue queued copies at ``self.clock`` while the stream has room and a slot is found.

        The one issue point of both hosts (the simulator's model and the runtime's real copies)."""
        queue, inflight = self.queue, self.in_flight
        entry = queue._entry
        cap = self.max_in_flight
        if not entry or len(inflight) >= cap:
            return
        cache = self.cache
        state, load = cache.state, cache.load
        prefetched, record, g, submit = cache.prefetched, self.record, self.g, self.submit
        admit, target = self.admit, queue.target
        self.blocked = False
        for p, dq in enumerate(queue._buckets):
            while dq:
                seq, key = dq[0]
                e = entry.get(key)
                if e is None or e[1] != seq:
                    dq.popleft()  # stale: cancelled or promoted
                    continue
                if state[key]:
                    dq.popleft()
                    del entry[key]
                    continue
                clock = self.clock
                host = (clock if clock > self.host_free else self.host_free) + self.issue_overhead
                start = host if host > self.link_free else self.link_free
                end = start + self.duration
                if p != DEMAND and target:
                    tc = target.get(key)
                    if tc is not None and admit is not None and not admit(tc[0], tc[1], start):
                        dq.popleft()
                        del entry[key], target[key]
                        self.refused += 1
                        continue
                if not load(key, end, g):
                    self.blocked = True
                    return
                dq.popleft()
                del entry[key]
                if target:
                    target.pop(key, None)
                self.host_free = end if self.host_sync else host
                self.link_free = end
                self.busy_time += end - start
                self.copies += 1
                prefetched[key] = p != DEMAND
                inflight.append((end if submit is None else submit(key, p != DEMAND, start, end), key))
                if record is not None:
                    record.append((start, end, key, p != DEMAND))
                if len(inflight) >= cap or not entry:
                    return

    def fetch_now(self, keys: list[int]) -> None:
        """Demand fetches of the absent ``keys``, in order, with nothing queued: exactly what
        queueing them and ``try_issue`` do, without the queue's bookkeeping (the host's common
        case: every miss of a layer-step, no prefetch waiting). Those the stream has no room or
        slot for yet are queued, in order."""
        inflight = self.in_flight
        room = self.max_in_flight - len(inflight)
        if room <= 0:
            self._queue_absent(keys)
            return
        cache = self.cache
        state, load = cache.state, cache.load
        record, g, submit = self.record, self.g, self.submit
        clock, overhead = self.clock, self.issue_overhead
        host_free, link_free, copies, busy = self.host_free, self.link_free, self.copies, self.busy_time
        sync = self.host_sync
        self.blocked = False
        for i, key in enumerate(keys):
            if state[key]:  # already on its way (a key named twice)
                continue
            host = (clock if clock > host_free else host_free) + overhead
            start = host if host > link_free else link_free
            end = start + self.duration
            if not load(key, end, g):  # (an absent key is never marked prefetched: nothing to clear)
                self.blocked = True
                self._queue_absent(keys[i:])
                break
            host_free = end if sync else host
            link_free = end
            busy += end - start
            copies += 1
            inflight.append((end if submit is None else submit(key, False, start, end), key))
            if record is not None:
                record.append((start, end, key, False))
            room -= 1
            if not room:
                self._queue_absent(keys[i + 1:])
                break
        self.host_free, self.link_free, self.copies, self.busy_time = host_free, link_free, copies, busy

    def _queue_absent(self, keys: list[int]) -> None:
        state, push = self.cache.state, self.queue.push
        for key in keys:
            if not state[key]:
                push(key, DEMAND)

    @property
    def bytes_moved(self) -> int:
        return self.copies * self.nbytes

    def advance(self, t: float) -> None:
        """Replay completions, releases and issues up to time ``t`` (never backwards).

        Equal times: a release before a completion, each followed by the issues it allows."""
        if t < self.clock:
            raise AssertionError(f"copy stream asked to go back from {self.clock} to {t}")
        inflight, state, entry = self.in_flight, self.cache.state, self.queue._entry
        cap = self.max_in_flight
        on_done = self.on_done
        if entry and len(inflight) < cap:
            self.try_issue()
        holds, release = self.holds, self.cache.release
        rel = holds[0][0] if holds else _INF
        while inflight:
            end, key = inflight[0]
            if rel <= end and rel <= t:  # a computation ends: its experts leave the in-use state
                if rel > self.clock:
                    self.clock = rel
                release(holds.popleft()[1])
                rel = holds[0][0] if holds else _INF
            elif end <= t:
                inflight.popleft()
                self.clock = end
                if state[key] == LOADING:
                    state[key] = RESIDENT
                if on_done is not None:
                    on_done(key, end)
            else:
                break
            if entry and len(inflight) < cap:
                self.try_issue()
        while rel <= t:
            if rel > self.clock:
                self.clock = rel
            release(holds.popleft()[1])
            rel = holds[0][0] if holds else _INF
            if entry and len(inflight) < cap:
                self.try_issue()
            if inflight and inflight[0][0] <= t:  # copies issued at the release may end by t too
                self.advance(t)
                return
        self.clock = t

    def ready_time(self, keys: set[int]) -> float:
        """Run the stream forward until every key in ``keys`` is resident; return that time.

        Only valid while the host makes no decision in between (the compute stream is waiting)."""
        state, inflight = self.cache.state, self.in_flight
        ready_at = self.cache.ready_at
        for k in keys:
            while state[k] != RESIDENT:
                if state[k] == LOADING:
                    self.advance(ready_at[k])  # completes everything before it, in order
                elif inflight:
                    self.advance(inflight[0][0])
                elif self.holds:
                    self.advance(self.holds[0][0])
                else:
                    missing = sorted(x for x in keys if state[x] != RESIDENT)
                    raise AssertionError(f"experts {missing} can never arrive: queue blocked with nothing in flight")
        return self.clock
