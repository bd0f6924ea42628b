"""The runtime's copy stream: the simulator's ``sim.link.CopyEngine`` with real copies.

The host queue, the issue point (at most ``copies_in_flight`` copies on the stream, a slot found by
the eviction policy) and the replay of completions and releases in timestamp order (a release
before a completion at equal times, each followed by the issues it allows) are the simulator's own
code. What differs is where times come from: a copy's completion and a computation's end are
known once the host sees their marks complete, so the host *observes* (``observe``) before each
decision: the times of the marks that are complete are filled in, and the model is advanced to
the host's present. A copy into a slot waits (on the device) for the mark recorded after the last
computation that read the slot.
"""

from __future__ import annotations

from typing import Any, Callable

from runtime.backends import Backend
from runtime.errors import ExecutorError
from sim.cache import ABSENT, ExpertCache
from sim.link import CopyEngine

_INF = float("inf")


def _known(mark: Any) -> float:
    """A mark's time where the backend gives it at once (virtual times), else inf: known once the
    host observes the mark complete. A known time counts only once the host's present reaches it."""
    s = getattr(mark, "s", None)
    return _INF if s is None else s


class MarkStream(CopyEngine):
    """``CopyEngine`` whose copies go to ``backend`` (into ``slot_bytes[slot]`` from ``source(key)``)
    and whose event times are the backend's marks, filled in as the host observes them."""

    def __init__(self, cache: ExpertCache, backend: Backend, *, slot_bytes: list, source: Callable[[int], Any],
                 num_slots: int, nbytes: int, transfer_time: float = 0.0, issue_overhead: float = 0.0,
                 copies_in_flight: int = 4, pad_s: float = 0.0, on_done=None, host_sync: bool = False) -> None:
        super().__init__(cache, nbytes=nbytes, transfer_time=transfer_time, issue_overhead=issue_overhead,
                         copies_in_flight=copies_in_flight, on_done=on_done, submit=self._submit, host_sync=host_sync)
        self.backend = backend
        self.slot_bytes, self.source = slot_bytes, source
        self.pad_s = pad_s
        self.done_mark: dict[int, Any] = {}  # key -> end mark of its latest copy
        self.free_mark: list[Any] = [None] * num_slots  # slot -> mark after the last computation reading it
        self.copy_log: list[tuple[Any, Any, int, bool]] = []  # (start mark, end mark, key, is_prefetch)
        # real backends: one expert's transfer time is measured on every copy the host sees land (an
        # EMA), so the admission rule's head starts use the measured bandwidth; the virtual backend
        # keeps the model's duration (its copies take exactly that)
        self.measure = False
        self.copies_measured = 0
        self.start_mark: dict[int, Any] = {}  # key -> start mark of its latest copy
        # ablation for tests only: no slot guard (copies do not wait for readers, slots are released
        # as soon as their computation is enqueued); shows what the guards prevent
        self.unsafe_no_guard = False

    def _submit(self, key: int, is_prefetch: bool, start: float, end: float) -> float:
        slot = self.cache.slot_of[key]
        after = None if self.unsafe_no_guard else self.free_mark[slot]
        s, e = self.backend.copy(self.slot_bytes[slot], self.source(key), after, self.pad_s, (self.clock, start, end))
        self.done_mark[key] = e
        self.start_mark[key] = s
        if self.host_sync:  # a pageable copy returns once it has landed (sim.link.host_synchronous)
            self.backend.block(e)
        self.copy_log.append((s, e, key, is_prefetch))
        end = _known(e)
        if self.measure and end != _INF:  # a backend whose times are known at once
            self._measured(end - _known(s))
        return end

    def hold(self, keys: tuple[int, ...], done: Any) -> None:
        """``keys`` are read by the computation that ends at mark ``done``: their slots are rewritten
        only after it, and they leave the in-use state once the host observes it."""
        slot_of, free = self.cache.slot_of, self.free_mark
        for key in keys:
            free[slot_of[key]] = done
        if self.unsafe_no_guard:
            self.cache.release(keys)
        else:
            self.holds.append((_known(done), keys, done))

    def observe(self, horizon: Any = None) -> float:
        """Process what has happened by the host's present (or, with ``horizon``, only up to that
        mark's time when it is complete: an unfinished horizon bounds nothing, since whatever is
        complete now ended before it): the times of complete marks are filled in, in order (copies
        complete in issue order, computations in launch order), and the model replays them."""
        be = self.backend
        query, sec = be.query, be.seconds
        lim = be.now_s()
        if horizon is not None and query(horizon):
            h = sec(horizon)
            lim = h if lim is None or h < lim else lim
        inflight, done, holds = self.in_flight, self.done_mark, self.holds
        t = self.clock
        while True:  # copies issued while replaying may be complete already (a zero-time link)
            filled = False
            prev = -_INF
            for i in range(len(inflight)):
                end, key = inflight[i]
                if end == _INF:
                    mk = done[key]
                    if not query(mk):
                        if i + 1 < len(inflight):
                            self._check_fifo(key)
                        break
                    end = sec(mk)
                    if end < prev:
                        self._out_of_order(inflight[i - 1][1], prev, key, end)
                    if lim is not None and end > lim:
                        break
                    inflight[i] = (end, key)
                    filled = True
                    if self.measure:
                        self._measured(end - sec(self.start_mark[key]))
                elif lim is not None and end > lim:
                    break
                if end > t:
                    t = end
                prev = end
            for i in range(len(holds)):
                until, keys, mk = holds[i]
                if until == _INF:
                    if not query(mk):
                        break
                    until = sec(mk)
                    if lim is not None and until > lim:
                        break
                    holds[i] = (until, keys, mk)
                    filled = True
                elif lim is not None and until > lim:
                    break
                if until > t:
                    t = until
            if lim is not None and lim > t:
                t = lim
            self.advance(t)
            if not filled:
                return t

    def _check_fifo(self, key: int) -> None:
        """The copy of ``key`` is not complete: on a first-in-first-out stream no copy issued after
        it is either. The last one is asked, then ``key``'s again (it may have landed meanwhile),
        so a race between two queries cannot raise; a stream that completes out of issue order does,
        since the model applies completions in issue order."""
        last = self.in_flight[-1][1]
        done, query = self.done_mark, self.backend.query
        if query(done[last]) and not query(done[key]):
            raise ExecutorError(
                f"copy stream: the copy of expert {last} completed before the copy of expert {key}, issued "
                f"before it: the backend's copy stream is not first-in-first-out (completions are applied in issue order)")

    def _out_of_order(self, first: int, t_first: float, key: int, t: float) -> None:
        raise ExecutorError(
            f"copy stream: the copy of expert {key} ended at {t:.9g} s, before the copy of expert {first} "
            f"issued before it ({t_first:.9g} s): the backend's copy stream is not first-in-first-out "
            "(completions are applied in issue order)")

    def _measured(self, seconds: float) -> None:
        """One observed copy's time (start mark to end mark) into the transfer-time estimate."""
        if seconds > 0:
            self.duration = seconds if not self.copies_measured else 0.8 * self.duration + 0.2 * seconds
            self.copies_measured += 1

    def blocker(self, keys: set[int]) -> Any:
        """None once every key in ``keys`` is resident or on its way (the compute stream then waits
        for the copies on the device); else the mark the host must wait for first: the oldest copy
        (copies complete in issue order), or the oldest computation holding slots."""
        state = self.cache.state
        if all(state[k] != ABSENT for k in keys):
            return None
        if self.in_flight:
            return self.done_mark[self.in_flight[0][1]]
        if self.holds:
            return self.holds[0][2]
        missing = sorted(k for k in keys if state[k] == ABSENT)
        raise ExecutorError(
            f"experts {missing} can never arrive: the copy queue is blocked (every slot of their pool is "
            "loading or in use) with nothing in flight")

    def last_landing(self, keys: set[int]) -> Any:
        """The done mark of the copy among ``keys`` that lands last (copies land in issue order),
        or None when none of them is on its way any more."""
        for end, key in reversed(self.in_flight):
            if key in keys:
                return self.done_mark[key]
        return None

    def landed(self, key: int) -> bool:
        """Whether the latest copy of ``key`` is complete as far as the host can tell."""
        mk = self.done_mark.get(key)
        return mk is not None and self.backend.query(mk)
