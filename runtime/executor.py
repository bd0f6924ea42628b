"""The offloading executor: routed experts in host memory, a fixed pool of GPU slots, and the
simulator's own policy objects deciding what to evict and prefetch (DESIGN.md §5).

Pieces, bottom up:

- **Backends** give the two "streams" of the run. ``CudaBackend``: the compute stream is the
  current CUDA stream, copies go to one dedicated copy stream, and a ``Mark`` is a timing CUDA
  event. ``SyncBackend`` (CPU): everything runs inline, marks are host timestamps; the CI path.
  ``ThreadBackend`` (CPU): two worker threads play the copy and compute streams, FIFO each, with
  cross-stream waits and optional artificial delays, so the ordering discipline can be tested
  without a GPU.
- **HostStore**: every routed expert once, packed in one contiguous byte range (all its tensors,
  e.g. gate_up_proj[e] and down_proj[e]), inside one host buffer that is pinned once at start
  (``cudaHostRegister``, no per-copy pinning) or left pageable (``host_memory=pageable``).
- **SlotCache**: ``sim.cache.ExpertCache`` (the simulator's slot bookkeeping: states, in-use
  counts, the eviction policy's calls) plus the physical slot each key occupies.
- **Run**: one measured run. The host controller mirrors the simulator's engine step by step: the
  same ``sim.link.CopyQueue`` (demand before prefetch, cancellable while queued), at most
  ``copies_in_flight`` copies issued to the copy stream, the same order of policy calls, hit/late/
  miss classification, waves when a layer needs more experts than its pool holds. A copy into a
  slot waits (on the GPU) for the mark recorded after the last computation that read the slot;
  a computation waits (on the GPU) for the copy marks of its experts; the host only blocks when
  the decode loop needs it (the routing of each MoE layer, and a demand copy that cannot be issued
  yet). Experts a computation uses stay in use until the host observes its mark, completions and
  releases are processed in timestamp order: exactly the simulator's ``CopyEngine.advance``.
- **OffloadedModel**: installs all this into a transformers model through the
  experts-implementation seam (``ExpertsInterface.register`` + ``config._experts_implementation``),
  so every family of ``runtime.models.FAMILIES`` runs offloaded, and owns the host store and slots
  across runs (repetitions, policies, budgets).

The experts computation is the transformers eager loop re-done on slot tensors: experts in
ascending id order, the same tensor operations on the same token rows, accumulation with
``index_add_`` in the same order. So offloaded logits equal the non-offloaded eager model's bit for
bit in fp32 on the CPU (tests/test_runtime_executor.py checks every family), and on the GPU in bf16
within rounding of kernel choice (the same kernels in practice).

Policies are the simulator's classes (``sim.policies`` registries), attached to a
``PolicyContext`` built here. Live predictors: ``LiveGatePredictor`` (layer l+d's router applied
to layer l's post-attention residual, normalised by layer l+d's norm, computed on the device during
the run: what the trace's ``lookahead_<d>`` records); history-based prefetch needs no predictor.
"""

from __future__ import annotations

import queue as _queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from runtime.errors import ExecutorError
from runtime.models import LoadedModel
from runtime.routing import experts_call_args, lookahead_route, sort_by_weight
from sim.cache import ABSENT, LOADING, RESIDENT, ExpertCache
from sim.link import CopyQueue
from sim.policies.base import DEMAND, EvictionPolicy, PolicyContext, PrefetchPolicy

IMPLEMENTATION = "moe_offload"
_ALIGN = 256  # bytes: every tensor of a packed expert starts on this boundary
NEVER = 1 << 62


# =============================================================================== backends
class Mark:
    """A point on a CPU "stream": complete once ``t`` (perf_counter seconds) is set."""

    __slots__ = ("t", "_ev")

    def __init__(self, done: bool = True) -> None:
        self.t: float | None = time.perf_counter() if done else None
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
    hint: float | None = None  # set by the host while it processes an event (SyncBackend only)

    def alloc(self, shape: tuple[int, ...]) -> torch.Tensor:
        return torch.empty(shape, dtype=torch.uint8, device=self.device)

    def copy(self, dst: torch.Tensor, src: torch.Tensor, after: Any, pad_s: float) -> tuple[Any, Any]:
        """Enqueue ``dst.copy_(src)`` on the copy stream after mark ``after`` (None: no wait);
        returns (start, end) marks. ``pad_s`` keeps the link busy that much longer (pacing)."""
        raise NotImplementedError

    def compute_wait(self, mark: Any) -> None:
        raise NotImplementedError

    def mark(self) -> Any:
        """A mark on the compute stream after everything enqueued so far."""
        raise NotImplementedError

    def launch(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` (which enqueues computation) on the compute stream; returns its result."""
        return fn()

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
        return mark.t - self.base.t

    def close(self) -> None:
        pass


class SyncBackend(Backend):
    """CPU, inline: a copy happens when issued, computation runs in the caller.

    The link is instantaneous, so a copy's marks carry a virtual time: right after the previous
    copy, at the host's present, or, when the host issues it while processing an earlier event
    (``hint``: a completion or a release seen late), at that event's time. This is the simulator's
    copy stream with zero-time transfers, so hosted policies make the same decisions in both."""

    name = "cpu-sync"

    def __init__(self, pace_sleep: bool = True) -> None:
        self.device = torch.device("cpu")
        self.pace_sleep = pace_sleep
        self.hint: float | None = None
        self._link = 0.0

    def copy(self, dst, src, after, pad_s):
        dst.copy_(src)
        if pad_s > 0 and self.pace_sleep:
            time.sleep(pad_s)
        now = time.perf_counter() if self.hint is None else self.hint
        t0 = max(now, self._link) + 1e-9
        self._link = t1 = t0 + 1e-9 + (pad_s if pad_s > 0 else 0.0)
        start, end = Mark(), Mark()
        start.t, end.t = t0, t1
        return start, end

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

    def copy(self, dst, src, after, pad_s):
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

    def launch(self, fn):
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

    def copy(self, dst, src, after, pad_s):
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


def make_backend(device: torch.device, cpu_backend: str = "sync", **kw: Any) -> Backend:
    """The backend for ``device``: CUDA, or a CPU backend (``sync`` or ``thread``)."""
    if device.type == "cuda":
        return CudaBackend(device)
    if device.type != "cpu":
        raise ExecutorError(f"device {device}: the executor runs on cuda or cpu")
    if cpu_backend == "sync":
        return SyncBackend(**kw)
    if cpu_backend == "thread":
        return ThreadBackend(**kw)
    raise ExecutorError(f"cpu_backend={cpu_backend!r}: use sync or thread")


# =============================================================================== host store
@dataclass(frozen=True)
class Part:
    """One tensor of an expert inside its packed bytes."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    offset: int
    nbytes: int


def expert_parts(module: nn.Module) -> tuple[list[Part], int]:
    """The per-expert tensors of a fused experts module (every parameter whose leading dimension is
    the expert count) and the packed size of one expert."""
    E = int(module.num_experts)
    parts, off = [], 0
    for name, p in module.named_parameters(recurse=False):
        if p.dim() >= 1 and p.shape[0] == E:
            nb = p[0].numel() * p.element_size()
            parts.append(Part(name, tuple(p.shape[1:]), p.dtype, off, nb))
            off += -(-nb // _ALIGN) * _ALIGN
    if not parts:
        raise ExecutorError(f"{type(module).__name__}: no per-expert parameters (leading dimension {E})")
    return parts, off


def _pin(buf: torch.Tensor) -> str:
    """Page-lock ``buf`` once (cudaHostRegister: exact size, no copy); returns how."""
    try:
        rt = torch.cuda.cudart()
        err = rt.cudaHostRegister(buf.data_ptr(), buf.numel(), 0)
        if int(getattr(err, "value", err)) == 0:
            return "registered"
    except Exception:  # noqa: BLE001 - fall back to the caching host allocator
        pass
    return ""


class HostStore:
    """Every routed expert of every MoE layer once, packed, in one host buffer.

    ``pinned`` (CUDA only): page-locked once here, so copies are asynchronous DMA at the link's
    pinned bandwidth; ``pageable``: ordinary memory (copies are staged by the driver and slow)."""

    def __init__(self, modules: Sequence[nn.Module], host_memory: str, device: torch.device) -> None:
        if host_memory not in ("pinned", "pageable"):
            raise ExecutorError(f"host_memory={host_memory!r}: use pinned or pageable")
        self.parts, self.nbytes = expert_parts(modules[0])
        for i, m in enumerate(modules[1:], 1):
            p, nb = expert_parts(m)
            if p != self.parts:
                raise ExecutorError(f"MoE layer ordinal {i}: experts differ in shape from layer 0 ({p} vs {self.parts})")
        self.E = int(modules[0].num_experts)
        self.M = len(modules)
        n = self.M * self.E * self.nbytes
        self.host_memory = host_memory
        self.pinned = ""
        self.buf: torch.Tensor
        if host_memory == "pinned" and device.type == "cuda":
            buf = torch.empty(n, dtype=torch.uint8)
            how = _pin(buf)
            if not how:
                buf = torch.empty(n, dtype=torch.uint8, pin_memory=True)
                how = "pin_memory"
            self.buf, self.pinned = buf, how
        else:
            self.buf = torch.empty(n, dtype=torch.uint8)
        self._views = self.buf.view(self.M * self.E, self.nbytes)
        for m, mod in enumerate(modules):
            for part in self.parts:
                p = getattr(mod, part.name)
                for e in range(self.E):
                    self.tensor(m * self.E + e, part).copy_(p.detach()[e])
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    @property
    def total_bytes(self) -> int:
        return int(self.buf.numel())

    def expert(self, key: int) -> torch.Tensor:
        """The packed bytes of expert ``key`` (a contiguous uint8 view)."""
        return self._views[key]

    def tensor(self, key: int, part: Part) -> torch.Tensor:
        return view_part(self._views[key], part)

    def close(self) -> None:
        if self.pinned == "registered":
            try:
                torch.cuda.cudart().cudaHostUnregister(self.buf.data_ptr())
            except Exception:  # noqa: BLE001
                pass
            self.pinned = ""


def view_part(packed: torch.Tensor, part: Part) -> torch.Tensor:
    """Typed view of one tensor inside an expert's packed bytes (no copy)."""
    return packed[part.offset:part.offset + part.nbytes].view(part.dtype).view(part.shape)


# =============================================================================== slot cache
class SlotCache(ExpertCache):
    """The simulator's ExpertCache (states, in-use counts, eviction calls) plus physical slots:
    a slot freed by an eviction is the one the new expert is copied into."""

    def __init__(self, num_moe_layers: int, num_experts: int, eviction: EvictionPolicy, *,
                 slots: int | None = None, per_layer: int | None = None) -> None:
        super().__init__(num_moe_layers, num_experts, eviction, slots=slots, per_layer=per_layer)
        self.slot_of: dict[int, int] = {}
        self.free: list[list[int]] = []
        base = 0
        for cap in self.capacity:
            self.free.append(list(range(base + cap - 1, base - 1, -1)))  # pop() gives the lowest first
            base += cap

    def remove(self, key: int) -> None:
        s = self.slot_of.pop(key)
        self.free[self.pool_of[key]].append(s)
        super().remove(key)

    def load(self, key: int, ready_at: float, g: int) -> bool:
        if not super().load(key, ready_at, g):
            return False
        self.slot_of[key] = self.free[self.pool_of[key]].pop()
        return True


# =============================================================================== predictors
class LiveGatePredictor:
    """Next-layer gate lookahead computed live: while MoE layer l runs, layer l+d's router applied
    to layer l's post-attention residual (normalised by layer l+d's post-attention norm) names the
    experts l+d will need, for d = 1..depth. The runtime counterpart of the trace's
    ``lookahead_<d>`` columns (predictor ``recorded`` in replay); same ``lookahead(g, d)`` answer as
    ``sim.policies.predictors.Predictor``: keys of the target layer, weight order for one token,
    the sorted union over tokens for a multi-token step, empty where l+d is dense or past the end."""

    name = "live-gate"

    def __init__(self, depth: int = 1, record: bool = False) -> None:
        self.depth = int(depth)
        self._answers: dict[tuple[int, int], tuple[int, ...]] = {}
        self.history: list[tuple[int, int, tuple[int, ...]]] | None = [] if record else None  # (g, d, keys)
        self.rows: dict[tuple[int, int], list[list[int]]] = {}  # (g, d) -> predicted ids per token (executed trace)

    def attach_live(self, loaded: LoadedModel) -> None:
        self.handles = loaded.handles
        self.moe = list(loaded.shape.moe_layers)
        self.E = loaded.shape.num_experts
        self.ordinal = {l: m for m, l in enumerate(self.moe)}
        self.resid: dict[int, torch.Tensor] = {}
        self._hooks = []
        for l in self.moe:
            if self.targets(l):
                self._hooks.append(self.handles[l].post_norm.register_forward_pre_hook(self._keep(l)))

    def targets(self, layer: int) -> list[tuple[int, int]]:
        """(d, target MoE ordinal) of the MoE layers reachable from decoder layer ``layer``."""
        return [(d, self.ordinal[layer + d]) for d in range(1, self.depth + 1) if (layer + d) in self.ordinal]

    def _keep(self, layer: int):
        def hook(module, args):
            self.resid[layer] = args[0].detach()
            return None

        return hook

    def predict(self, m: int) -> list[tuple[int, int, torch.Tensor]]:
        """Device tensors of predicted ids [T, k] (weight order) per (d, target ordinal)."""
        layer = self.moe[m]
        x = self.resid.pop(layer, None)
        if x is None:
            return []
        x = x.reshape(-1, x.shape[-1])
        return [(d, tm, lookahead_route(self.handles[self.moe[tm]], x)[1]) for d, tm in self.targets(layer)]

    def set(self, g: int, d: int, tm: int, ids: list[list[int]]) -> None:
        E = self.E
        if len(ids) == 1:
            keys = tuple(tm * E + int(e) for e in ids[0])
        else:
            keys = tuple(tm * E + e for e in sorted({int(e) for row in ids for e in row}))
        self._answers[(g, d)] = keys
        self.rows[(g, d)] = ids
        if self.history is not None:
            self.history.append((g, d, keys))

    def lookahead(self, g: int, d: int) -> tuple[int, ...]:
        return self._answers.pop((g, d), ())

    def close(self) -> None:
        for h in getattr(self, "_hooks", []):
            h.remove()
        self._hooks = []


# =============================================================================== the run
@dataclass(slots=True)
class LayerInfo:
    """What a policy may know about one layer-step (sim.policies.base.LayerStep)."""

    g: int
    request: int
    step: int
    m: int


@dataclass
class StepRecord:
    request: int
    step: int
    g0: int
    n_tokens: int
    start: Any = None
    token: Any = None
    coverage: float = 1.0
    emitted: int = 1


@dataclass
class LayerRecord:
    """Marks of one layer-step: routing known, per wave (waits done, experts done)."""

    g: int
    m: int
    routed: Any
    waves: list[tuple[Any, Any]] = field(default_factory=list)
    late: list[Any] = field(default_factory=list)  # done marks of experts that were still loading
    resident_after: int = 0


@dataclass
class RunConfig:
    """Everything a run needs besides the model (one policy at one slot layout)."""

    eviction: EvictionPolicy
    prefetch: PrefetchPolicy
    predictor: Any = None
    slots: int | None = None
    per_layer: int | None = None
    copies_in_flight: int = 4
    decision_delay_s: float = 0.0  # the hardware spec's term; subtracted from measured gaps (stall)
    schedule: Any = None  # sim.schedule.Schedule in replay (future, next_use, layer steps)
    seed: int = 0
    link_pace_gbps: float | None = None
    timeline: bool = True
    exec_log: bool = False


class Run:
    """One run of one policy: the host controller, its copies and its marks (see module doc)."""

    def __init__(self, om: "OffloadedModel", rc: RunConfig) -> None:
        self.om, self.rc = om, rc
        M, E, k = om.M, om.E, om.top_k
        self.M, self.E = M, E
        self.backend = be = om.backend
        cap_total = rc.slots if rc.per_layer is None else rc.per_layer * M
        if cap_total is None or cap_total < 1:
            raise ExecutorError("a run needs cache slots (slots or per_layer)")
        if cap_total > om.num_slots:
            raise ExecutorError(f"the run asks for {cap_total} slots, the pool has {om.num_slots}")
        self.cache = SlotCache(M, E, rc.eviction, slots=rc.slots, per_layer=rc.per_layer)
        self.cache.drop_on_release = not rc.prefetch.keeps_cache
        if not rc.prefetch.keeps_cache and min(self.cache.capacity) < E:
            raise ExecutorError(
                f"policy '{rc.prefetch.name}' streams whole layers: it needs at least num_experts={E} slots per pool, "
                f"the cache has {min(self.cache.capacity)}")
        self.queue = CopyQueue()
        self.infos: list[LayerInfo] = []
        sch = rc.schedule

        def no_future(g: int):
            raise ExecutorError("this policy reads the future (oracle, belady): it needs mode=replay with a trace")

        def no_next_use(key: int, g: int) -> int:
            raise ExecutorError("this policy reads the future (belady): it needs mode=replay with a trace")

        self.ctx = PolicyContext(
            num_moe_layers=M, num_experts=E, top_k=k,
            future=sch.future if sch is not None else no_future,
            num_layer_steps=sch.num_layer_steps if sch is not None else NEVER,
            next_use=sch.next_use if sch is not None else no_next_use,
            cached=self.cache.state.__getitem__,
            layer_step=sch.layer_step if sch is not None else self.infos.__getitem__,
            predictor=rc.predictor,
            extra={"schedule": sch, "seed": rc.seed},
        )
        self.ctx.queued = self.queue._entry.__contains__
        rc.eviction.attach(self.ctx, self.cache.num_pools)
        rc.prefetch.attach(self.ctx)
        self.eviction, self.prefetch = rc.eviction, rc.prefetch
        cls = type(rc.prefetch)
        self.has_start = cls.on_layer_start is not PrefetchPolicy.on_layer_start
        self.has_routed = cls.on_routed is not PrefetchPolicy.on_routed
        self.has_done = cls.on_transfer_done is not PrefetchPolicy.on_transfer_done
        self.cap = max(1, int(rc.copies_in_flight))
        self.in_flight: deque[tuple[Any, int]] = deque()  # (end mark, key), issue order
        self.holds: deque[tuple[tuple[int, ...], Any]] = deque()  # (keys, compute mark), compute order
        self.done_mark: dict[int, Any] = {}
        self.free_mark: list[Any] = [None] * om.num_slots
        self.blocked = False
        # ablation for tests only: no slot guard (copies do not wait for readers, slots are released
        # as soon as their computation is enqueued); shows what the guards prevent
        self._unsafe_no_guard = False
        # pacing: every copy padded to nbytes / pace (on the GPU relative to the measured copy time)
        self.pad_s = 0.0
        if rc.link_pace_gbps:
            paced = om.nbytes / (float(rc.link_pace_gbps) * 1e9)
            self.pad_s = max(0.0, paced - (om.copy_s or 0.0))
        # counters (the simulator's names)
        self.hits = self.late = self.misses = self.useful = 0
        self.copies = 0
        self.copy_log: list[tuple[Any, Any, int, bool]] = []
        self.occupancy: list[tuple[Any, int]] = []
        self.steps: list[StepRecord] = []
        self.layers: list[LayerRecord] = []
        self.requests: list[tuple[Any, list[int]]] = []  # (start mark, step indices)
        self.exec_log: list[dict[str, Any]] = []
        self.g = 0
        self._step: StepRecord | None = None
        self._m = 0
        self._override: tuple[torch.Tensor, torch.Tensor, list[list[list[int]]]] | None = None
        self.routing_log: list[tuple[int, int, list[list[int]], list[list[float]]]] = []  # live: (g, m, ids, weights)
        self.finished = False
        self.end_mark: Any = None
        be.begin()
        self.t0 = be.base

    # ------------------------------------------------------------------ queue and copies
    def apply(self, actions: Sequence[Any]) -> None:
        """Actions of a policy, exactly as the simulator applies them."""
        self.queue.apply(actions, self.cache.state)

    def request(self, key: int, priority: int) -> None:
        if self.cache.state[key] == ABSENT:
            self.queue.push(key, priority)

    def try_issue(self) -> None:
        """Issue queued copies while fewer than ``copies_in_flight`` are on the stream and a slot is
        found (sim.link.CopyEngine.try_issue, with real copies)."""
        queue, inflight = self.queue, self.in_flight
        entry = queue._entry
        cap = self.cap
        if not entry or len(inflight) >= cap:
            return
        cache = self.cache
        state, prefetched = cache.state, cache.prefetched
        self.blocked = False
        for p, dq in enumerate(queue._buckets):
            while dq:
                seq, key = dq[0]
                e = entry.get(key)
                if e is None or e[1] != seq:
                    dq.popleft()
                    continue
                if state[key]:
                    dq.popleft()
                    del entry[key]
                    continue
                if not cache.load(key, 0.0, self.g):
                    self.blocked = True
                    return
                dq.popleft()
                del entry[key]
                prefetched[key] = p != DEMAND
                self._copy(key, p != DEMAND)
                if len(inflight) >= cap or not entry:
                    return

    def _copy(self, key: int, is_prefetch: bool) -> None:
        om = self.om
        slot = self.cache.slot_of[key]
        after = None if self._unsafe_no_guard else self.free_mark[slot]
        start, end = self.backend.copy(om.slot_bytes[slot], om.store.expert(key), after, self.pad_s)
        self.done_mark[key] = end
        self.in_flight.append((end, key))
        self.copies += 1
        self.copy_log.append((start, end, key, is_prefetch))

    def pump(self, until: set[int] | None = None, horizon: Any = None) -> None:
        """Process completed copies and computations in timestamp order (a release before a
        completion at equal times), issuing queued copies after each: what the simulator's copy
        stream does in ``advance(now)``. ``horizon``: only events up to that mark's time (between two
        waves of a layer: up to the end of the first). With ``until``, stop as soon as those keys
        are all resident (the simulator's ``ready_time`` stops there too)."""
        be, inflight, holds = self.backend, self.in_flight, self.holds
        entry = self.queue._entry
        if entry and len(inflight) < self.cap:
            self.try_issue()
        state = self.cache.state
        sec = be.seconds
        # an unfinished horizon bounds nothing: whatever is complete now ended before it
        lim = sec(horizon) if horizon is not None and be.query(horizon) else None
        try:
            while True:
                if until is not None and all(state[k] == RESIDENT for k in until):
                    return
                c = inflight[0] if inflight and be.query(inflight[0][0]) else None
                h = holds[0] if holds and be.query(holds[0][1]) else None
                tc = sec(c[0]) if c is not None else None
                th = sec(h[1]) if h is not None else None
                if lim is not None:
                    if tc is not None and tc > lim:
                        c = tc = None
                    if th is not None and th > lim:
                        h = th = None
                if c is None and h is None:
                    return
                if h is not None and (c is None or th <= tc):
                    holds.popleft()
                    be.hint = getattr(h[1], "t", None)
                    self.cache.release(h[0])
                else:
                    end, key = inflight.popleft()
                    be.hint = getattr(end, "t", None)
                    if state[key] == LOADING:
                        state[key] = RESIDENT
                    if self.has_done:
                        self.apply(self.prefetch.on_transfer_done(key))
                    if self.rc.timeline:
                        self.occupancy.append((end, self.cache.resident_count()))
                if entry and len(inflight) < self.cap:
                    self.try_issue()
        finally:
            be.hint = None

    def ensure_issued(self, keys: set[int]) -> None:
        """Make sure every key in ``keys`` has its copy issued: the one wait the decode loop needs,
        when a demand copy is stuck behind the in-flight bound or behind slots that are loading or
        in use (the host then blocks on the oldest copy, or on the oldest computation holding slots).
        Completions are processed, in order, until the keys are resident or their copies are still
        running (the compute stream then waits for them on the device, not the host)."""
        state, be, done = self.cache.state, self.backend, self.done_mark
        while True:
            self.pump(until=keys)
            if all(state[k] == RESIDENT for k in keys):
                return
            if all(state[k] != ABSENT for k in keys):
                if not all(be.query(done[k]) for k in keys if state[k] == LOADING):
                    return
                continue  # they have landed: process up to them, as the simulator does
            if self.in_flight:
                be.block(self.in_flight[0][0])  # copies complete in issue order
            elif self.holds:
                be.block(self.holds[0][1])  # a held slot frees when its computation ends
            else:
                missing = sorted(k for k in keys if state[k] == ABSENT)
                raise ExecutorError(
                    f"experts {missing} can never arrive: the copy queue is blocked (every slot of their pool is "
                    "loading or in use) with nothing in flight")

    # ------------------------------------------------------------------ driver interface
    def request_start(self, r: int) -> None:
        self.pump()
        self.requests.append((self.backend.mark(), []))
        self.apply(self.prefetch.on_request_start(r))
        self.try_issue()

    def request_end(self, r: int) -> None:
        self.pump()
        self.apply(self.prefetch.on_request_end(r))
        self.try_issue()

    def begin_step(self, request: int, step: int, n_tokens: int, *, needed: Sequence[Sequence[int]] | None = None,
                   override: tuple[torch.Tensor, torch.Tensor, list[list[list[int]]]] | None = None,
                   emitted: int = 1) -> StepRecord:
        """Start a target pass over ``n_tokens`` tokens. ``needed`` (replay): the keys of each of
        its MoE layers, for the coverage metric; ``override`` (replay): (ids [M, T, k] and weights
        [M, T, k] on the device, ids as host lists) used instead of the router's choice."""
        g0 = len(self.infos)
        if self.rc.schedule is not None and g0 + self.M > self.rc.schedule.num_layer_steps:
            raise ExecutorError(f"step {step} of request {request} goes past the schedule's {self.rc.schedule.num_layer_steps} layer-steps")
        for m in range(self.M):
            self.infos.append(LayerInfo(g0 + m, request, step, m))
        rec = StepRecord(request, step, g0, n_tokens, emitted=emitted)
        rec.start = self.backend.mark()
        if needed is not None:
            rec.coverage = self._coverage(needed)
        self._step = rec
        self._m = 0
        self._override = override
        self.steps.append(rec)
        self.requests[-1][1].append(len(self.steps) - 1)
        return rec

    def _coverage(self, needed: Sequence[Sequence[int]]) -> float:
        state, be, done = self.cache.state, self.backend, self.done_mark
        tot = hit = 0
        for keys in needed:
            for key in keys:
                tot += 1
                st = state[key]
                hit += st == RESIDENT or (st == LOADING and be.query(done[key]))
        return hit / tot if tot else 1.0

    def end_step(self) -> None:
        """The step's token is emitted (a mark after the LM head)."""
        rec = self._step
        if rec is None:
            raise ExecutorError("end_step without begin_step")
        if self._m != self.M:
            raise ExecutorError(f"step {rec.step} of request {rec.request} ran {self._m} of {self.M} MoE layers")
        rec.token = self.backend.mark()
        self._step = None

    # ------------------------------------------------------------------ per layer
    def layer_start(self, m: int) -> None:
        """A MoE decoder layer is about to run (its attention first). Outside a target step (a
        draft pass of speculative decoding runs the same layers) nothing happens."""
        if self._step is None:
            return
        if self.has_start:
            g = self._step.g0 + m
            self.g = g
            self.pump()
            self.apply(self.prefetch.on_layer_start(self.infos[g]))
            self.try_issue()

    def layer_forward(self, m: int, module: nn.Module, hidden: torch.Tensor, top_k_index: torch.Tensor,
                      top_k_weights: torch.Tensor) -> torch.Tensor:
        rec = self._step
        if rec is None:
            raise ExecutorError("a MoE layer ran outside begin_step/end_step")
        if m != self._m:
            raise ExecutorError(f"MoE layer ordinal {m} ran out of order (expected {self._m})")
        self._m += 1
        g = rec.g0 + m
        self.g = g
        be, om, cache = self.backend, self.om, self.cache
        E = self.E
        routed = be.mark()
        lr = LayerRecord(g, m, routed)
        self.layers.append(lr)
        # the routing (and live lookahead) reach the host: the one sync of the layer
        pred = self.rc.predictor if isinstance(self.rc.predictor, LiveGatePredictor) else None
        look = pred.predict(m) if pred is not None else []
        T, k = top_k_index.shape
        live = self._override is None
        parts = [top_k_index.reshape(-1).float()]
        if live:  # weight order (DeepSeek's routers return ids unsorted) and the weights, for the log
            w_sorted, i_sorted = sort_by_weight(top_k_weights, top_k_index)
            parts += [i_sorted.reshape(-1).float(), w_sorted.reshape(-1)]
        parts += [t.reshape(-1).float() for _, _, t in look]
        host = (torch.cat(parts) if len(parts) > 1 else parts[0]).cpu()
        ids_router = host[: T * k].view(T, k).long().tolist()
        off = T * k
        if live:
            ids_sorted = host[off: off + T * k].view(T, k).long().tolist()
            w_host = host[off + T * k: off + 2 * T * k].view(T, k).tolist()
            off += 2 * T * k
        for d, tm, t in look:
            n = t.numel()
            pred.set(g, d, tm, host[off:off + n].view(t.shape).long().tolist())
            off += n
        if not live:
            ids_dev, w_dev, ids_host = self._override
            idx, w, ids = ids_dev[m], w_dev[m].to(top_k_weights.dtype), ids_host[m]
            if len(ids) != T:
                raise ExecutorError(f"replay: layer-step {g} has {T} tokens, the trace {len(ids)}")
            order = ids
        else:
            idx, w, ids, order = top_k_index, top_k_weights, ids_router, ids_sorted
            if self.om.record_routing:
                self.routing_log.append((g, m, ids_sorted, w_host))
        base = m * E
        if T == 1:
            needed = tuple(base + int(e) for e in order[0])
        else:
            needed = tuple(base + e for e in sorted({int(e) for row in ids for e in row}))
        sch = self.rc.schedule
        if sch is not None and self._override is not None and tuple(sch.needed[g]) != needed:
            raise ExecutorError(f"replay: layer-step {g} computes {needed}, the schedule says {tuple(sch.needed[g])}")
        out = torch.zeros_like(hidden)
        rows = _rows_by_expert(ids) if len(ids) > 1 else None
        self._layer(lr, m, g, needed, module, hidden, idx, w, ids, rows, out)
        lr.resident_after = cache.resident_count()
        return out

    def _layer(self, lr: LayerRecord, m: int, g: int, needed: tuple[int, ...], module, hidden, idx, w, ids, rows, out) -> None:
        """The simulator's layer-step (sim.engine.Simulation._target_step), with real copies and compute."""
        be, cache, om = self.backend, self.cache, self.om
        state, in_use, prefetched = cache.state, cache.in_use, cache.prefetched
        pool_of, accessed = cache.pool_of, cache.eviction.accessed
        E = self.E
        self.pump()
        cap = cache.capacity[m if cache.per_layer is not None else 0]
        waves = (needed,) if len(needed) <= cap else tuple(needed[i:i + cap] for i in range(0, len(needed), cap))
        last = len(waves) - 1
        keeps = self.prefetch.keeps_cache
        for wi, wave in enumerate(waves):
            wait: set[int] = set()
            missed: list[int] = []
            for key in wave:
                in_use[key] += 1
                st = state[key]
                if st == RESIDENT:
                    self.hits += 1
                    accessed(key, pool_of[key], g)
                else:
                    if st == LOADING:
                        self.late += 1
                        lr.late.append(self.done_mark[key])
                        accessed(key, pool_of[key], g)
                    else:
                        self.misses += 1
                        self.request(key, DEMAND)
                        missed.append(key)
                    wait.add(key)
                if st and prefetched[key]:
                    prefetched[key] = False
                    self.useful += 1
            held = wave
            if not keeps:
                extra = tuple(x for x in range(m * E, (m + 1) * E) if x not in wave)
                for key in extra:
                    in_use[key] += 1
                    if state[key] != RESIDENT:
                        self.request(key, DEMAND)
                        wait.add(key)
                held = wave + extra
            if self.has_routed and wi == 0:
                self.apply(self.prefetch.on_routed(self.infos[g], needed))
            self.try_issue()
            if wait:
                self.ensure_issued(wait)
                for key in missed:
                    accessed(key, pool_of[key], g)
            # the compute stream waits for the copies of every expert it reads that the host has not
            # seen land (GPU-side waits: no host sync)
            for key in held:
                if state[key] == LOADING:
                    be.compute_wait(self.done_mark[key])
            waited = be.mark()
            experts = sorted(k - m * E for k in wave)
            slots = {e: cache.slot_of[m * E + e] for e in experts}
            be.launch(lambda: om.compute(module, hidden, idx, w, ids, rows, experts, slots, out))
            done = be.mark()
            lr.waves.append((waited, done))
            for key in held:
                self.free_mark[cache.slot_of[key]] = done
            if self._unsafe_no_guard:
                cache.release(held)
            else:
                self.holds.append((held, done))
            if self.rc.exec_log:
                self.exec_log.append({"g": g, "m": m, "wave": wi, "experts": experts,
                                      "tokens": {e: _tokens_of(ids, e) for e in experts},
                                      "slots": dict(slots)})
            if wi < last:
                be.block(done)
                self.pump(horizon=done)
        if self.rc.timeline:
            self.occupancy.append((lr.waves[-1][1], cache.resident_count()))
        # while the experts compute, copies that have landed free room on the copy stream: issue the
        # next queued ones now rather than at the next layer's routing (the simulator's copy stream
        # reacts at completion times; events after this computation's end wait for the next decision
        # point). These decisions belong to the next layer-step, as in the simulator (Belady reads g);
        # after a step's last layer the next event may be the request's end, so nothing is done early.
        if m < self.M - 1:
            self.g = g + 1
            self.pump(horizon=lr.waves[-1][1])

    # ------------------------------------------------------------------ end
    def finish(self) -> None:
        """Wait for the streams, release what is still held (run end)."""
        self.end_mark = self.backend.mark()
        self.backend.synchronize()
        self.pump()
        self.finished = True


def _rows_by_expert(ids: list[list[int]]) -> dict[int, tuple[list[int], list[int]]]:
    """expert -> (token rows, top-k positions) in the order torch.where gives them in the eager loop
    (position-major: all tokens at top-k position 0, then position 1, ...)."""
    out: dict[int, tuple[list[int], list[int]]] = {}
    k = len(ids[0]) if ids else 0
    for pos in range(k):
        for t, row in enumerate(ids):
            e = int(row[pos])
            r = out.get(e)
            if r is None:
                out[e] = r = ([], [])
            r[0].append(t)
            r[1].append(pos)
    return out


def _tokens_of(ids: list[list[int]], e: int) -> list[int]:
    return sorted({t for t, row in enumerate(ids) if e in row})


# =============================================================================== the model
class _LayerHandle:
    """Attached to each experts module: routes its forward to the active run."""

    def __init__(self, om: "OffloadedModel", m: int) -> None:
        self.om, self.m = om, m

    def forward(self, module, hidden, idx, w):
        run = self.om.run
        if run is None:
            raise ExecutorError("offloaded experts called with no active run (OffloadedModel.start_run first)")
        return run.layer_forward(self.m, module, hidden, idx, w)


def _offload_experts_forward(self, *args, **kwargs):
    """The experts forward registered as ``moe_offload`` in transformers' ExpertsInterface."""
    hidden, idx, w = experts_call_args(args, kwargs)
    h = getattr(self, "_moe_offload", None)
    if h is None:
        raise ExecutorError(f"{type(self).__name__}: experts implementation '{IMPLEMENTATION}' without an executor attached")
    return h.forward(self, hidden, idx, w)


def register_implementation() -> None:
    """Register the offloading experts forward (idempotent)."""
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS, ExpertsInterface

    if IMPLEMENTATION not in ALL_EXPERTS_FUNCTIONS:
        ExpertsInterface.register(IMPLEMENTATION, _offload_experts_forward)


_SUPPORTED_LAYOUTS = {"mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "phimoe", "deepseek_v2", "deepseek_v3", "gpt_oss"}


class OffloadedModel:
    """A transformers MoE model whose routed experts live in a host store and run from GPU slots.

    Built from a ``LoadedModel`` (its experts still in place, on the device or the CPU): the experts
    are packed into the host store, the module parameters are replaced by meta tensors (freeing
    their memory) and the experts implementation is switched to ``moe_offload``. ``max_slots`` sizes
    the device slot pool once; each run uses any number of slots up to it.
    """

    def __init__(self, loaded: LoadedModel, *, max_slots: int, host_memory: str = "pinned",
                 backend: Backend | None = None, cpu_backend: str = "sync", record_routing: bool = False) -> None:
        t0 = time.perf_counter()
        self.loaded = loaded
        fam = loaded.family.model_type
        if fam not in _SUPPORTED_LAYOUTS:
            raise ExecutorError(f"family {fam!r}: the executor's experts loop supports {sorted(_SUPPORTED_LAYOUTS)}")
        self.model = loaded.model
        self.device = loaded.device
        self.handles = loaded.moe_handles
        self.modules = [h.experts for h in self.handles]
        self.M = len(self.modules)
        self.E = int(loaded.shape.num_experts)
        self.top_k = int(loaded.shape.top_k)
        self.backend = backend or make_backend(self.device, cpu_backend)
        self.record_routing = record_routing
        mod0 = self.modules[0]
        self.transposed = bool(getattr(mod0, "is_transposed", False))
        self.has_bias = bool(getattr(mod0, "has_bias", False))
        if not getattr(mod0, "has_gate", True):
            raise ExecutorError(f"{type(mod0).__name__}: experts without a gate projection are not supported")
        self.store = HostStore(self.modules, host_memory, self.device)
        self.parts = self.store.parts
        self.nbytes = self.store.nbytes
        self.names = [p.name for p in self.parts]
        self.num_slots = int(max_slots)
        if self.num_slots < self.top_k:
            raise ExecutorError(f"max_slots={max_slots} is fewer than top_k={self.top_k}")
        self.pool = self.backend.alloc((self.num_slots, self.nbytes))
        self.slot_bytes = [self.pool[s] for s in range(self.num_slots)]
        self.slot_views = [{p.name: view_part(self.pool[s], p) for p in self.parts} for s in range(self.num_slots)]
        # free the module parameters (meta tensors keep shape and dtype for anything that asks)
        for mod in self.modules:
            for p in self.parts:
                old = getattr(mod, p.name)
                setattr(mod, p.name, nn.Parameter(torch.empty(old.shape, dtype=old.dtype, device="meta"), requires_grad=False))
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        register_implementation()
        self._saved_impl: dict[int, tuple[Any, Any]] = {}
        for m, mod in enumerate(self.modules):
            mod._moe_offload = _LayerHandle(self, m)
            cfg = mod.config
            if id(cfg) not in self._saved_impl:
                self._saved_impl[id(cfg)] = (cfg, cfg._experts_implementation)
                cfg._experts_implementation = IMPLEMENTATION
        mc = self.model.config
        if id(mc) not in self._saved_impl:
            self._saved_impl[id(mc)] = (mc, mc._experts_implementation)
            mc._experts_implementation = IMPLEMENTATION
        self._hooks = [h.layer.register_forward_pre_hook(self._layer_pre(m)) for m, h in enumerate(self.handles)]
        self.run: Run | None = None
        self.copy_s: float | None = None  # measured time of one expert copy (CUDA; pacing reference)
        self.setup_s = time.perf_counter() - t0

    # ------------------------------------------------------------------ runs
    def _layer_pre(self, m: int):
        def hook(module, args, *rest):
            if self.run is not None:
                self.run.layer_start(m)
            return None

        return hook

    def start_run(self, rc: RunConfig) -> Run:
        if self.run is not None and not self.run.finished:
            raise ExecutorError("a run is still active")
        self.run = Run(self, rc)
        return self.run

    def end_run(self) -> Run:
        run = self.run
        if run is None:
            raise ExecutorError("no active run")
        if not run.finished:
            run.finish()
        self.run = None
        return run

    def close(self) -> None:
        """Detach from the model (experts implementation restored, hooks removed, host memory unpinned).
        The experts' parameters stay meta: the model cannot compute its experts afterwards."""
        for h in self._hooks:
            h.remove()
        self._hooks = []
        for mod in self.modules:
            if hasattr(mod, "_moe_offload"):
                del mod._moe_offload
        for cfg, impl in self._saved_impl.values():
            cfg._experts_implementation = impl
        self._saved_impl = {}
        self.store.close()
        self.backend.close()

    def restore_experts(self, device: torch.device | str | None = None) -> None:
        """Put the experts back into the modules as ordinary parameters (on ``device``, default the
        model's), e.g. for a resident reference run after the offloaded ones."""
        dev = torch.device(device) if device is not None else self.device
        for m, mod in enumerate(self.modules):
            for p in self.parts:
                t = torch.empty((self.E, *p.shape), dtype=p.dtype, device=dev)
                for e in range(self.E):
                    t[e].copy_(self.store.tensor(m * self.E + e, p))
                setattr(mod, p.name, nn.Parameter(t, requires_grad=False))

    def measure_copy(self, reps: int = 8) -> float:
        """Bytes/s of one expert's host-to-device copy on the copy stream (median of ``reps``
        back-to-back copies, CUDA events); sets ``copy_s``, the pacing reference."""
        be = self.backend
        if not isinstance(be, CudaBackend):
            return float("nan")
        times = []
        for i in range(reps + 2):
            s, e = be.copy(self.slot_bytes[0], self.store.expert(i % (self.M * self.E)), None, 0.0)
            e.synchronize()
            if i >= 2:
                times.append(s.elapsed_time(e) / 1e3)
        times.sort()
        self.copy_s = times[len(times) // 2]
        return self.nbytes / self.copy_s

    def preload(self, run: Run, keys: Sequence[int]) -> None:
        """Make ``keys`` resident before measuring (not counted: a warm cache)."""
        cache = run.cache
        for key in keys:
            if cache.state[key] == ABSENT:
                if not cache.load(key, 0.0, 0):
                    raise ExecutorError(f"no free slot to preload key {key}")
                start, end = self.backend.copy(self.slot_bytes[cache.slot_of[key]], self.store.expert(key), None, 0.0)
                cache.state[key] = RESIDENT
        self.backend.synchronize()

    # ------------------------------------------------------------------ experts computation
    def compute(self, module: nn.Module, hidden: torch.Tensor, idx: torch.Tensor, w: torch.Tensor,
                ids: list[list[int]], rows: dict[int, tuple[list[int], list[int]]] | None,
                experts: list[int], slots: dict[int, int], out: torch.Tensor) -> torch.Tensor:
        """The eager experts loop on slot tensors, for ``experts`` (ascending), accumulated into ``out``."""
        gu_name, d_name = "gate_up_proj", "down_proj"
        tr, bias = self.transposed, self.has_bias
        apply_gate = getattr(module, "_apply_gate", None)
        act = getattr(module, "act_fn", None)
        if len(ids) == 1:
            row = ids[0]
            for e in experts:
                v = self.slot_views[slots[e]]
                pos = row.index(e)
                cur = hidden
                gu = cur @ v[gu_name] if tr else F.linear(cur, v[gu_name])
                if bias:
                    gu = gu + v[gu_name + "_bias"]
                h = apply_gate(gu) if apply_gate is not None else _gate(act, gu)
                o = h @ v[d_name] if tr else F.linear(h, v[d_name])
                if bias:
                    o = o + v[d_name + "_bias"]
                o = o * w[:, pos:pos + 1]
                out.add_(o.to(out.dtype))
            return out
        assert rows is not None
        tok_all: list[int] = []
        pos_all: list[int] = []
        spans = []
        for e in experts:
            t, p = rows[e]
            spans.append((e, len(tok_all), len(t)))
            tok_all += t
            pos_all += p
        both = torch.tensor(tok_all + pos_all, dtype=torch.long).to(hidden.device, non_blocking=True)
        n = len(tok_all)
        for e, a, c in spans:
            v = self.slot_views[slots[e]]
            token_idx, top_k_pos = both[a:a + c], both[n + a:n + a + c]
            cur = hidden[token_idx]
            gu = cur @ v[gu_name] if tr else F.linear(cur, v[gu_name])
            if bias:
                gu = gu + v[gu_name + "_bias"]
            h = apply_gate(gu) if apply_gate is not None else _gate(act, gu)
            o = h @ v[d_name] if tr else F.linear(h, v[d_name])
            if bias:
                o = o + v[d_name + "_bias"]
            o = o * w[token_idx, top_k_pos, None]
            out.index_add_(0, token_idx, o.to(out.dtype))
        return out


def _gate(act, gu: torch.Tensor) -> torch.Tensor:
    gate, up = gu.chunk(2, dim=-1)
    return act(gate) * up
