"""Host-to-device copies: a host-side priority queue feeding a FIFO copy stream over the PCIe link.

CUDA streams are first-in-first-out: an issued copy can be neither cancelled nor overtaken. So the
host keeps its own queue (demand before prefetch, cancellable while not yet issued) and issues at
most ``copies_in_flight`` copies to the stream (DESIGN.md §5). The link is modelled as a
busy-until timestamp: an issued copy starts when the host has issued it and the link is free, and
takes ``copy_latency + bytes / bandwidth(bytes)``. Copies therefore complete in issue order, so
one long-lived SimPy process sleeps until the head of the stream completes.
"""

from __future__ import annotations

import heapq
from collections import deque
from typing import Callable

import simpy

from sim.cache import LOADING, ExpertCache
from sim.policies.base import DEMAND


class CopyQueue:
    """Host-side priority queue of expert keys with cancel and promote (lazy deletion)."""

    __slots__ = ("_heap", "_entry", "_seq")

    def __init__(self) -> None:
        self._heap: list[tuple[int, int, int]] = []
        self._entry: dict[int, tuple[int, int]] = {}
        self._seq = 0

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
        self._seq += 1
        entry = (priority, self._seq)
        self._entry[key] = entry
        heapq.heappush(self._heap, (priority, self._seq, key))
        return True

    def cancel(self, key: int) -> bool:
        return self._entry.pop(key, None) is not None

    def peek(self) -> tuple[int, int] | None:
        """(key, priority) of the head, or None."""
        heap, entry = self._heap, self._entry
        while heap:
            p, s, key = heap[0]
            if entry.get(key) == (p, s):
                return key, p
            heapq.heappop(heap)
        return None

    def pop(self) -> None:
        p, s, key = heapq.heappop(self._heap)
        del self._entry[key]


class CopyEngine:
    """The host-to-device copy stream; issues from the queue and completes copies in order."""

    def __init__(
        self,
        env: simpy.Environment,
        cache: ExpertCache,
        *,
        nbytes: int,
        transfer_time: float,
        copy_latency: float,
        issue_overhead: float,
        copies_in_flight: int,
        on_done: Callable[[int, bool], None],
        current_g: Callable[[], int],
        prefetched: list[bool],
        record: list | None = None,
    ) -> None:
        self.env = env
        self.cache = cache
        self.queue = CopyQueue()
        self.nbytes = nbytes
        self.duration = transfer_time  # latency + bytes / bandwidth(bytes), one expert
        self.copy_latency = copy_latency
        self.issue_overhead = issue_overhead
        self.max_in_flight = max(1, int(copies_in_flight))
        self.in_flight: deque[tuple[float, int, bool, float]] = deque()  # (end, key, is_prefetch, start)
        self.link_free = 0.0
        self.host_free = 0.0
        self.on_done = on_done
        self.current_g = current_g
        self.prefetched = prefetched  # per key: arrived by prefetch and not used yet
        self.record = record  # timeline spans (start, end, key, is_prefetch) when enabled
        self.bytes_moved = 0
        self.copies = 0
        self.busy_time = 0.0
        self.blocked = False
        self._wake: simpy.Event | None = None
        self.process = env.process(self._run())

    # ---------------------------------------------------------------- host side
    def request(self, key: int, priority: int) -> None:
        """Queue a fetch unless ``key`` is already on the GPU or on its way."""
        if self.cache.state[key] != 0:  # loading or resident
            return
        self.queue.push(key, priority)

    def cancel(self, key: int) -> None:
        self.queue.cancel(key)

    def try_issue(self) -> None:
        """Issue queued copies while the stream has room and a slot can be found."""
        queue, cache, inflight = self.queue, self.cache, self.in_flight
        issued = False
        self.blocked = False
        while len(inflight) < self.max_in_flight:
            head = queue.peek()
            if head is None:
                break
            key, prio = head
            if cache.state[key] != 0:
                queue.pop()
                continue
            if not cache.reserve(key, self.current_g()):
                self.blocked = True
                break
            queue.pop()
            now = self.env.now
            host = (now if now > self.host_free else self.host_free) + self.issue_overhead
            self.host_free = host
            start = host if host > self.link_free else self.link_free
            end = start + self.duration
            self.link_free = end
            self.busy_time += end - start
            self.bytes_moved += self.nbytes
            self.copies += 1
            cache.start_loading(key, end, self.current_g())
            self.prefetched[key] = prio != DEMAND
            inflight.append((end, key, prio != DEMAND, start))
            if self.record is not None:
                self.record.append((start, end, key, prio != DEMAND))
            issued = True
        if issued:
            if self._wake is not None and not self._wake.triggered:
                self._wake.succeed()

    # -------------------------------------------------------------- the stream
    def _run(self):
        env, inflight, cache = self.env, self.in_flight, self.cache
        while True:
            if not inflight:
                self._wake = env.event()
                yield self._wake
                self._wake = None
                continue
            end, key, is_prefetch, _ = inflight[0]
            if end > env.now:
                yield env.timeout(end - env.now)
            inflight.popleft()
            if cache.state[key] == LOADING:
                cache.loaded(key)
            self.on_done(key, is_prefetch)
            self.try_issue()
