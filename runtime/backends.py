"""The two "streams" of a run (compute, copy) on a device, with marks on them.

- ``CudaBackend``: the compute stream is the current CUDA stream, copies go to one dedicated copy
  stream, and a mark is a timing CUDA event.
- ``SyncBackend`` (CPU): everything runs inline, marks are host timestamps; a copy is instantaneous
  and carries the copy stream model's time (a zero-time link).
- ``ThreadBackend`` (CPU): two worker threads play the copy and compute streams, FIFO each, with
  cross-stream waits and optional artificial delays, so the ordering discipline can be tested
  without a GPU (real sleeps: for ordering checks, not exact equality).
- ``VirtualBackend`` (CPU): deterministic virtual time. Computation runs inline and takes the
  durations the executor states (the simulator's cost model in replay); copies take the copy
  stream model's times. The runtime hosted on it makes exactly the simulator's decisions.
"""

from __future__ import annotations

import queue as _queue
import threading
import time
from typing import Any, Callable

import torch

from runtime.errors import ExecutorError


class Mark:
    """A point on a CPU "stream": complete once ``t`` (perf_counter seconds) is set. ``s``, when
    set, is its time in seconds since the run's start as a model gives it (virtual time)."""

    __slots__ = ("t", "s", "_ev")

    def __init__(self, done: bool = True, s: float | None = None) -> None:
        self.t: float | None = time.perf_counter() if done else None
        self.s = s
        self._ev: threading.Event | None = None if done else threading.Event()

    def set(self) -> None:
        self.t = time.perf_counter()
        if self._ev is not None:
            self._ev.set()

    def query(self) -> bool:
        return self.t is not None

    def synchronize(self) -> None:
        if self._ev is not None:
            self._ev.wait()


class Backend:
    """Two in-order streams (compute, copy), marks on them, and timestamps after the run."""

    name = "base"
    device: torch.device

    def alloc(self, shape: tuple[int, ...]) -> torch.Tensor:
        return torch.empty(shape, dtype=torch.uint8, device=self.device)

    def copy(self, dst: torch.Tensor, src: torch.Tensor, after: Any, pad_s: float,
             at: tuple[float, float, float] | None = None) -> tuple[Any, Any]:
        """Enqueue ``dst.copy_(src)`` on the copy stream after mark ``after`` (None: no wait);
        returns (start, end) marks. ``pad_s`` keeps the link busy that much longer (pacing).
        ``at``: (issue, start, end) as the copy stream model times it (seconds since ``begin``);
        only the CPU backends that stand in for a link use it."""
        raise NotImplementedError

    def compute_wait(self, mark: Any) -> None:
        raise NotImplementedError

    def mark(self) -> Any:
        """A mark on the compute stream after everything enqueued so far."""
        raise NotImplementedError

    def launch(self, fn: Callable[[], Any], duration_s: float = 0.0) -> Any:
        """Run ``fn`` (which enqueues computation) on the compute stream; returns its result.
        ``duration_s``: how long it takes in virtual time (VirtualBackend only)."""
        return fn()

    def elapse(self, duration_s: float) -> None:
        """The compute stream ran ``duration_s`` of work not launched through ``launch`` (attention,
        dense layers, the LM head): only a virtual clock needs to be told."""

    def host_read(self, mark: Any, delay_s: float) -> None:
        """The host reads a value produced at ``mark`` (the routing), ``delay_s`` after it exists
        on the device: only a virtual clock needs to be told (real ones block in the read)."""

    def read_ahead(self, mark: Any, delay_s: float) -> None:
        """The host reads a value produced at ``mark`` (a draft token's ELB row) ``delay_s`` after it
        exists, while the compute stream runs on: the work enqueued after the read (the next draft
        token, the verify pass) does not wait for it. Only a virtual clock needs to be told."""

    def now_s(self) -> float | None:
        """The host's present in seconds since ``begin``, where the backend's marks share the host's
        clock (None: unknown; every complete mark lies before it)."""
        return None

    def query(self, mark: Any) -> bool:
        return mark.query()

    def block(self, mark: Any) -> None:
        mark.synchronize()

    def synchronize(self) -> None:
        pass

    def begin(self) -> None:
        """Start of a run: the base of every timestamp."""
        self.base = self.mark()
        self.synchronize()

    def seconds(self, mark: Any) -> float:
        """Time of a completed mark, seconds since ``begin``."""
        return mark.s if mark.s is not None else mark.t - self.base.t

    def close(self) -> None:
        pass


class SyncBackend(Backend):
    """CPU, inline: a copy happens when issued, computation runs in the caller.

    The link is instantaneous, so a copy's marks carry a virtual time: right after the previous
    copy, at the copy stream's clock when the host issued it (the host's present, or the time of
    the completion or release it was processing). This is the simulator's copy stream with
    zero-time transfers, so hosted policies make the same decisions in both."""

    name = "cpu-sync"

    def __init__(self, pace_sleep: bool = True) -> None:
        self.device = torch.device("cpu")
        self.pace_sleep = pace_sleep
        self._link = 0.0

    def copy(self, dst, src, after, pad_s, at=None):
        dst.copy_(src)
        if pad_s > 0 and self.pace_sleep:
            time.sleep(pad_s)
        now = at[0] if at is not None else time.perf_counter() - self.base.t
        t0 = max(now, self._link) + 1e-9
        self._link = t1 = t0 + 1e-9 + (pad_s if pad_s > 0 else 0.0)
        return Mark(s=t0), Mark(s=t1)

    def begin(self) -> None:
        super().begin()
        self._link = 0.0

    def now_s(self) -> float:
        return time.perf_counter() - self.base.t

    def compute_wait(self, mark) -> None:
        mark.synchronize()

    def mark(self) -> Mark:
        return Mark()


class _Worker:
    """One FIFO stream played by a thread."""

    def __init__(self, name: str) -> None:
        self.q: _queue.SimpleQueue = _queue.SimpleQueue()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.thread.start()

    def submit(self, fn: Callable[[], None]) -> None:
        self.q.put(fn)

    def _run(self) -> None:
        while True:
            fn = self.q.get()
            if fn is None:
                return
            try:
                fn()
            except BaseException as e:  # noqa: BLE001 - reported by the host on the next call
                self.error = e

    def stop(self) -> None:
        self.q.put(None)
        self.thread.join(timeout=10)


class ThreadBackend(Backend):
    """CPU, asynchronous: a copy-stream thread and a compute-stream thread, FIFO each.

    ``copy_delay_s`` delays every copy (before its bytes move) and ``compute_delay_s`` every
    launched computation: artificial delays that make ordering bugs visible. ``write_log``
    records (slot tensor data_ptr, start, end) of every copy for tests. With ``async_compute`` a
    launched computation runs later on the compute thread while the host goes on (as on a GPU);
    only the executor's own layer calls work then, not a model forward that reads the result."""

    name = "cpu-thread"

    def __init__(self, copy_delay_s: float = 0.0, compute_delay_s: float = 0.0, async_compute: bool = False) -> None:
        self.device = torch.device("cpu")
        self.copy_delay_s = copy_delay_s
        self.compute_delay_s = compute_delay_s
        self.async_compute = async_compute  # launch() returns at once, like a kernel launch (no model forward then)
        self._copy = _Worker("copy-stream")
        self._compute = _Worker("compute-stream")
        self.write_log: list[tuple[int, float, float]] = []

    def _check(self) -> None:
        for w in (self._copy, self._compute):
            if w.error is not None:
                e, w.error = w.error, None
                raise e

    def copy(self, dst, src, after, pad_s, at=None):
        start, end = Mark(False), Mark(False)
        delay = self.copy_delay_s + max(pad_s, 0.0)

        def job() -> None:
            if after is not None:
                after.synchronize()
            start.set()
            if delay:
                time.sleep(delay)
            dst.copy_(src)
            end.set()
            self.write_log.append((dst.data_ptr(), start.t, end.t))

        self._copy.submit(job)
        self._check()
        return start, end

    def compute_wait(self, mark) -> None:
        self._compute.submit(mark.synchronize)

    def mark(self) -> Mark:
        m = Mark(False)
        self._compute.submit(m.set)
        return m

    def launch(self, fn, duration_s=0.0):
        box: list[Any] = []
        done = Mark(False)
        delay = self.compute_delay_s

        def job() -> None:
            try:
                if delay:
                    time.sleep(delay)
                box.append(fn())
            finally:
                done.set()

        self._compute.submit(job)
        if self.async_compute:
            return None
        done.synchronize()
        self._check()
        return box[0]

    def launch_async(self, fn: Callable[[], None]) -> None:
        """Enqueue ``fn`` on the compute stream without waiting (tests: slow readers)."""
        self._compute.submit(fn)

    def synchronize(self) -> None:
        a, b = Mark(False), Mark(False)
        self._copy.submit(a.set)
        self._compute.submit(b.set)
        a.synchronize()
        b.synchronize()
        self._check()

    def close(self) -> None:
        self._copy.stop()
        self._compute.stop()


class CudaBackend(Backend):
    """The GPU: compute on the current stream, copies on one dedicated stream, timing events."""

    name = "cuda"

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.compute_stream = torch.cuda.current_stream(device)
        self.copy_stream = torch.cuda.Stream(device)
        self.cycles_per_s: float | None = None

    def copy(self, dst, src, after, pad_s, at=None):
        s = self.copy_stream
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        if after is not None:
            s.wait_event(after)
        with torch.cuda.stream(s):
            start.record(s)
            dst.copy_(src, non_blocking=True)
            if pad_s > 0 and self.cycles_per_s:
                torch.cuda._sleep(int(pad_s * self.cycles_per_s))
            end.record(s)
        return start, end

    def compute_wait(self, mark) -> None:
        self.compute_stream.wait_event(mark)

    def mark(self):
        e = torch.cuda.Event(enable_timing=True)
        e.record(self.compute_stream)
        return e

    def synchronize(self) -> None:
        torch.cuda.synchronize(self.device)

    def seconds(self, mark) -> float:
        return self.base.elapsed_time(mark) / 1e3

    def calibrate_sleep(self) -> float:
        """GPU clock cycles per second of ``torch.cuda._sleep`` (for copy pacing)."""
        cyc = 20_000_000
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        with torch.cuda.stream(self.copy_stream):
            torch.cuda._sleep(1000)
            a.record(self.copy_stream)
            torch.cuda._sleep(cyc)
            b.record(self.copy_stream)
        b.synchronize()
        self.cycles_per_s = cyc / (a.elapsed_time(b) / 1e3)
        return self.cycles_per_s


class VirtualBackend(Backend):
    """CPU, deterministic virtual time: the simulator's timing with the executor's real code path.

    Computation runs inline (the same tensors as ``SyncBackend``) and takes the durations the
    executor states (``launch(duration_s)``, ``elapse``); a copy takes the times the copy stream
    model gives it (``at``). Host and compute stream each have a clock: an operation on the compute
    stream starts when the stream is free, the host has enqueued it and the copies it waits for have
    landed; the host moves on when it blocks on a mark or reads the routing. A mark is complete once
    the host's clock has reached it. The host may also read a result without holding the compute
    stream back (``read_ahead``: a speculative cycle's ELB rows): its clock moves on, but what it
    enqueues next counts as enqueued before that read (``enq``), as the simulator's draft runs on
    the GPU without waiting for the host."""

    name = "cpu-virtual"

    def __init__(self) -> None:
        self.device = torch.device("cpu")
        self.host = 0.0  # the host's clock
        self.enq = 0.0  # when the host enqueued what it enqueues now (its clock, less reads ahead)
        self.free = 0.0  # the compute stream's: when everything enqueued so far is done
        self._wait = 0.0  # the compute stream waits for copies until then (compute_wait)

    def _start(self) -> float:
        t = max(self.free, self.enq, self._wait)
        self._wait = 0.0
        return t

    def copy(self, dst, src, after, pad_s, at=None):
        if at is None:
            raise ExecutorError("the virtual backend needs the copy stream model's times")
        dst.copy_(src)
        return Mark(s=at[1]), Mark(s=at[2])

    def compute_wait(self, mark) -> None:
        self._wait = max(self._wait, mark.s)

    def mark(self) -> Mark:
        self.free = self._start()
        return Mark(s=self.free)

    def launch(self, fn, duration_s=0.0):
        out = fn()
        self.free = self._start() + duration_s
        return out

    def elapse(self, duration_s: float) -> None:
        self.free = self._start() + duration_s

    def host_read(self, mark, delay_s: float) -> None:
        self.host = self.enq = max(self.host, mark.s + delay_s)

    def read_ahead(self, mark, delay_s: float) -> None:
        self.host = max(self.host, mark.s + delay_s)

    def query(self, mark) -> bool:
        return mark.s <= self.host

    def block(self, mark) -> None:
        if mark.s > self.host:
            self.host = mark.s
        self.enq = self.host

    def synchronize(self) -> None:
        self.host = self.enq = max(self.host, self.free)

    def begin(self) -> None:
        self.host = self.enq = self.free = self._wait = 0.0
        self.base = Mark(s=0.0)

    def now_s(self) -> float:
        return self.host


def make_backend(device: torch.device, cpu_backend: str = "sync", **kw: Any) -> Backend:
    """The backend for ``device``: CUDA, or a CPU backend (``sync``, ``thread`` or ``virtual``)."""
    if device.type == "cuda":
        return CudaBackend(device)
    if device.type != "cpu":
        raise ExecutorError(f"device {device}: the executor runs on cuda or cpu")
    if cpu_backend == "sync":
        return SyncBackend(**kw)
    if cpu_backend == "thread":
        return ThreadBackend(**kw)
    if cpu_backend == "virtual":
        return VirtualBackend(**kw)
    raise ExecutorError(f"cpu_backend={cpu_backend!r}: use sync, thread or virtual")
