"""`python -m runtime.profile`: measure the card this runs on and write its hardware profile.

Writes ``<out>/<name>.yaml`` (a hardware preset the simulator loads with
``hardware=measured/<name>`` when written to conf/hardware/measured/) and ``<out>/<name>.parquet``
beside it (the measured op times ``sim.costmodel.ProfileTables`` reads; the YAML's
``profile_table``). ``name`` defaults to the card's (e.g. ``h100-sxm``). What is measured and how
(docs/profile.md has the full account):

- the host link: one copy of each size, host to device and back, from pinned and from pageable
  memory (rows ``h2d``/``d2h`` with ``host_memory``; the YAML's plateaus and normalised curves);
  the per-copy link latency (copies queued back to back at two sizes), the host's cost to issue a
  copy, and the routing read (top-k ids from the GPU to the host: ``decision_delay_s``);
- GPU time of every op the cost model prices, on the shapes of the given model presets: attention
  over KV length (and a few query counts), router, dense and shared FFNs, one routed expert's FFN
  over tokens per expert in bf16 and in INT4 (torch's packed int4 matmul, when this torch has one),
  embedding + LM head. Each op is captured in a CUDA graph and replayed, so a row is the kernels'
  own time without host launch gaps (``method = cuda-graph``; the CPU: host clock);
- the achieved GEMM rate, device-memory bandwidth and per-kernel time in a graph (the roofline's
  ``flops_bf16``, ``hbm_bandwidth``, ``launch_overhead_s``), the memory the card has;
- host overhead per decode path (``engine.graphed`` / ``engine.eager``: ``host_per_layer_s``,
  ``draft_host_per_layer_s``, ``host_per_launch_s``, ``host_per_expert_s``), by microbenchmarks on
  ``engine_shape``, a shape the validation grid does not use (never from a validation run's TPOT):
  the per-layer part from two depths, the per-expert part from two top-k values at one depth.

Nothing is fitted: every number is a median of repeated measurements. ``smoke=true`` runs the same
code at tiny sizes (the CPU: seconds; the test suite runs it).
"""

from __future__ import annotations

import datetime as _dt
import platform
import re
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F

from sim.costmodel import op_shape
from sim.errors import SimError
from sim.hardware import ENGINE_KEYS
from sim.presets import setting
from sim.spec import ModelSpec

# Shapes of the validation grid (runtime.validate); the engine shape must not be one of them.
GRID_SHAPES = ["mixtral-8x7b", "phi-3.5-moe", "qwen3-30b-a3b"]


@dataclass
class ProfileConf:
    """Structured config of `python -m runtime.profile` (ConfigStore name ``profile_schema``)."""

    out: str = setting("conf/hardware/measured", "folder of <name>.yaml and <name>.parquet")
    name: Optional[str] = setting(None, "default: from the card (h100-sxm, h200, ...); cpu-smoke on the CPU")
    overwrite: bool = setting(False, "an existing profile of this name is never replaced unless true")
    smoke: bool = setting(False, "tiny sizes, seconds on the CPU (the test suite runs it)")
    device: str = setting("auto", "auto: cuda if present, else cpu")
    shapes: list[str] = setting(list(GRID_SHAPES), "compute grid: the validation grid's shapes")
    engine_shape: str = setting("olmoe-1b-7b", "host overhead per decode path: a shape the validation grid does not use")
    engine_layers: list[int] = setting([1, 3], "two depths: host time per layer is the slope between them")
    engine_top_k_low: int = setting(2, "a second top-k of the engine shape at the deeper depth: host time per routed "
                                       "expert is the slope between it and the shape's own top-k")
    reps: int = setting(7, "timed repetitions (median)")
    seed: int = setting(0, "seed of random weights and inputs")


# =============================================================================== timing
class Clock:
    """GPU time of a callable (CUDA graph replay; host clock on the CPU) and host time."""

    def __init__(self, device: torch.device, reps: int) -> None:
        self.device = device
        self.cuda = device.type == "cuda"
        self.reps = max(1, int(reps))

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def gpu(self, fn: Callable[[], Any], inner: int = 10) -> tuple[float, str]:
        """(seconds per call, method): ``inner`` calls captured in one CUDA graph, replayed
        ``reps`` times, median of the replays; events around eager calls if capture fails."""
        for _ in range(3):
            fn()
        self.sync()
        if not self.cuda:
            ts = []
            for _ in range(self.reps):
                t0 = time.perf_counter()
                for _ in range(inner):
                    fn()
                ts.append((time.perf_counter() - t0) / inner)
            return statistics.median(ts), "host-clock"
        s = torch.cuda.Stream(self.device)
        s.wait_stream(torch.cuda.current_stream(self.device))
        try:
            g = torch.cuda.CUDAGraph()
            with torch.cuda.stream(s):
                fn()  # warm-up on the capture stream
                torch.cuda.synchronize(self.device)
                with torch.cuda.graph(g, stream=s):
                    for _ in range(inner):
                        fn()
            torch.cuda.current_stream(self.device).wait_stream(s)
            run, method = g.replay, "cuda-graph"
        except Exception:  # noqa: BLE001 - some ops cannot be captured: fall back to events
            torch.cuda.current_stream(self.device).wait_stream(s)
            self.sync()
            g = None

            def run() -> None:
                for _ in range(inner):
                    fn()

            method = "events"
        run()
        self.sync()
        ts = []
        for _ in range(self.reps):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            run()
            b.record()
            b.synchronize()
            ts.append(a.elapsed_time(b) / 1e3 / inner)
        del g
        return statistics.median(ts), method

    def host(self, fn: Callable[[], Any], inner: int = 1) -> float:
        """Median host seconds per call (the device synchronised before each repetition)."""
        ts = []
        for _ in range(self.reps):
            self.sync()
            t0 = time.perf_counter()
            for _ in range(inner):
                fn()
            ts.append((time.perf_counter() - t0) / inner)
        self.sync()
        return statistics.median(ts)


# =============================================================================== ops
def _w(*shape: int, dtype: torch.dtype, device: torch.device, gen: torch.Generator) -> torch.Tensor:
    return (torch.randn(*shape, generator=gen, device="cpu", dtype=torch.float32) * 0.02).to(device=device, dtype=dtype)


def rmsnorm(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    v = x.float().pow(2).mean(-1, keepdim=True)
    return (x.float() * torch.rsqrt(v + 1e-6)).to(x.dtype) * w


class Ops:
    """Plain-torch implementations of one model shape's ops (what a graph-captured bf16 decode
    runs; same kernels per op as sim.costmodel.KERNELS counts), with random weights."""

    def __init__(self, m: ModelSpec, device: torch.device, dtype: torch.dtype, max_kv: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.m, self.device, self.dtype = m, device, dtype
        h = m.hidden_size
        W = lambda *s: _w(*s, dtype=dtype, device=device, gen=g)  # noqa: E731
        self.W = W
        self.norm = torch.ones(h, dtype=dtype, device=device)
        if m.attention == "gqa":
            nh, kv, hd = m.num_attention_heads, m.num_key_value_heads, m.head_dim
            self.wq, self.wk, self.wv, self.wo = W(nh * hd, h), W(kv * hd, h), W(kv * hd, h), W(h, nh * hd)
            self.kc = torch.zeros(1, kv, max_kv, hd, dtype=dtype, device=device)
            self.vc = torch.zeros(1, kv, max_kv, hd, dtype=dtype, device=device)
            self.qn = torch.ones(nh * hd if m.qk_norm == "full" else hd, dtype=dtype, device=device)
            self.kn = torch.ones(kv * hd if m.qk_norm == "full" else hd, dtype=dtype, device=device)
        self.wg = W(m.num_experts, h)
        i = m.expert_intermediate_size
        self.w13, self.w2 = W(2 * i, h), W(h, i)
        self.q13 = self.q2 = None
        if m.dense_intermediate_size:
            d = m.dense_intermediate_size
            self.d13, self.d2 = W(2 * d, h), W(h, d)
        if m.num_shared_experts:
            s = m.shared_intermediate_size * m.num_shared_experts
            self.s13, self.s2 = W(2 * s, h), W(h, s)
            self.sg = W(1, h) if m.shared_expert_gate else None
        self.emb, self.head = W(m.vocab_size, h), W(m.vocab_size, h)
        self._x: dict[int, torch.Tensor] = {}

    def x(self, n: int) -> torch.Tensor:
        if n not in self._x:
            self._x[n] = self.W(n, self.m.hidden_size)
        return self._x[n]

    # -- attention: norm, q/k/v, (q/k norm), rotary, cache write, attention core, o-proj, residual
    def attention(self, n: int, kv_len: int) -> Callable[[], torch.Tensor]:
        m = self.m
        nh, kv, hd = m.num_attention_heads, m.num_key_value_heads, m.head_dim
        x = self.x(n)
        pos = torch.arange(kv_len - n, kv_len, device=self.device, dtype=torch.float32)
        inv = 1.0 / (10000.0 ** (torch.arange(0, hd, 2, device=self.device, dtype=torch.float32) / hd))
        ang = torch.cat([pos[:, None] * inv[None], pos[:, None] * inv[None]], -1)
        cos, sin = ang.cos().to(self.dtype), ang.sin().to(self.dtype)
        mask = None
        if n > 1:
            q_pos = torch.arange(kv_len - n, kv_len, device=self.device)[:, None]
            mask = torch.arange(kv_len, device=self.device)[None, :] <= q_pos

        def rot(t: torch.Tensor) -> torch.Tensor:
            a, b = t[..., : hd // 2], t[..., hd // 2:]
            return t * cos + torch.cat([-b, a], -1) * sin

        def fn() -> torch.Tensor:
            hs = rmsnorm(x, self.norm)
            q, k, v = hs @ self.wq.T, hs @ self.wk.T, hs @ self.wv.T
            if m.qk_norm == "full":
                q, k = rmsnorm(q, self.qn), rmsnorm(k, self.kn)
            q = q.view(1, n, nh, hd).transpose(1, 2)
            k = k.view(1, n, kv, hd).transpose(1, 2)
            v = v.view(1, n, kv, hd).transpose(1, 2)
            if m.qk_norm == "head":
                q, k = rmsnorm(q, self.qn), rmsnorm(k, self.kn)
            q, k = rot(q), rot(k)
            self.kc[:, :, kv_len - n:kv_len].copy_(k)
            self.vc[:, :, kv_len - n:kv_len].copy_(v)
            a = F.scaled_dot_product_attention(q, self.kc[:, :, :kv_len], self.vc[:, :, :kv_len], attn_mask=mask,
                                               enable_gqa=True)
            return x + a.transpose(1, 2).reshape(n, nh * hd) @ self.wo.T

        return fn

    def router(self, n: int) -> Callable[[], Any]:
        x, k = self.x(n), self.m.top_k

        def fn() -> Any:
            logits = rmsnorm(x, self.norm) @ self.wg.T
            return torch.topk(torch.softmax(logits.float(), -1), k, -1)

        return fn

    def _ffn(self, n: int, w13: torch.Tensor, w2: torch.Tensor, gate: torch.Tensor | None = None) -> Callable[[], torch.Tensor]:
        x = self.x(n)

        def fn() -> torch.Tensor:
            hs = rmsnorm(x, self.norm)
            a, b = (hs @ w13.T).chunk(2, -1)
            y = (F.silu(a) * b) @ w2.T
            if gate is not None:
                y = y * torch.sigmoid(hs @ gate.T)
            return x + y

        return fn

    def dense_ffn(self, n: int) -> Callable[[], torch.Tensor]:
        return self._ffn(n, self.d13, self.d2)

    def shared_experts(self, n: int) -> Callable[[], torch.Tensor]:
        return self._ffn(n, self.s13, self.s2, self.sg)

    def expert_ffn(self, n: int, dtype: str = "bf16") -> Callable[[], torch.Tensor]:
        """One routed expert on ``n`` of ``2n`` hidden rows: gather, gate_up, SiLU * up, down,
        weighted accumulate: the kernels sim.costmodel.KERNELS["expert_ffn"] counts, plus the gather)."""
        hidden = self.x(2 * n)
        rows = torch.arange(0, 2 * n, 2, device=self.device)
        wt = torch.full((n, 1), 0.5, dtype=self.dtype, device=self.device)
        out = torch.zeros_like(hidden)
        if dtype == "int4":
            from runtime.quant import linear, quantize

            if self.q13 is None:  # the draft's layout (group 128 along K; tiny smoke shapes: 32)
                h, i = self.m.hidden_size, self.m.expert_intermediate_size
                grp = 128 if h % 128 == 0 and i % 128 == 0 else 32
                self.q13, self.q2 = quantize(self.w13, bits=4, group_size=grp), quantize(self.w2, bits=4, group_size=grp)
            lin = lambda t, w, q: linear(t, q, kernel="fast")  # noqa: E731
        else:
            lin = lambda t, w, q: t @ w.T  # noqa: E731

        def fn() -> torch.Tensor:
            xs = hidden.index_select(0, rows)
            a, b = lin(xs, self.w13, self.q13).chunk(2, -1)
            y = lin(F.silu(a) * b, self.w2, self.q2)
            return out.index_add_(0, rows, y * wt)

        return fn

    def embed_and_head(self, n: int) -> Callable[[], torch.Tensor]:
        ids = torch.arange(n, device=self.device) % self.m.vocab_size

        def fn() -> torch.Tensor:
            return (rmsnorm(self.emb[ids], self.norm) @ self.head.T).float().argmax(-1)

        return fn


def int4_available(device: torch.device, dtype: torch.dtype) -> bool:
    from runtime.quant import fast_path_available

    return fast_path_available(device) and (device.type != "cuda" or dtype == torch.bfloat16)


# =============================================================================== grids
def grids(smoke: bool) -> dict[str, list[int]]:
    if smoke:
        return {"kv_decode": [8, 16, 32], "kv_multi": [16, 32], "q_multi": [4], "tokens": [1, 2, 4],
                "expert_tokens": [1, 2, 4], "link": [4096, 65536, 1 << 20]}
    return {
        "kv_decode": [32, 64, 128, 256, 512, 1024, 2048, 4096],
        "kv_multi": [32, 128, 512, 2048],
        "q_multi": [2, 4, 8, 16, 32],
        "tokens": [1, 2, 4, 8, 16, 32, 64, 128],
        "expert_tokens": [1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 128],
        "link": [1 << k for k in range(12, 31, 2)],
    }


def measure_compute(m: ModelSpec, name: str, clock: Clock, dtype: torch.dtype, gr: dict[str, list[int]],
                    seed: int, log: Callable[[str], None]) -> list[dict[str, Any]]:
    """Rows of GPU time for every op of shape ``m`` over the grid."""
    rows: list[dict[str, Any]] = []
    max_kv = max(gr["kv_decode"] + gr["kv_multi"])
    ops = Ops(m, clock.device, dtype, max_kv, seed)

    def add(op: str, fn: Callable[[], Any], **keys: Any) -> None:
        sec, method = clock.gpu(fn)
        rows.append({"op": op, "shape": op_shape(m, op), "model": name, "layer": -1, "seconds": sec,
                     "method": method, **keys})

    if m.attention == "gqa":
        for kv in gr["kv_decode"]:
            add("attention", ops.attention(1, kv), n_tokens=1, kv_len=kv)
        for n in gr["q_multi"]:
            for kv in gr["kv_multi"]:
                if kv >= n:
                    add("attention", ops.attention(n, kv), n_tokens=n, kv_len=kv)
    else:
        log(f"{name}: attention '{m.attention}' has no microbenchmark here; the roofline prices it")
    for n in gr["tokens"]:
        add("router", ops.router(n), n_tokens=n)
        add("embed_and_head", ops.embed_and_head(n), n_tokens=n)
        if m.dense_intermediate_size:
            add("dense_ffn", ops.dense_ffn(n), n_tokens=n)
        if m.num_shared_experts:
            add("shared_experts", ops.shared_experts(n), n_tokens=n)
    int4 = int4_available(clock.device, dtype)
    if int4:
        try:
            ops.expert_ffn(1, "int4")()
        except RuntimeError as e:  # shapes the packed kernel does not take
            log(f"{name}: no int4 rows ({e})")
            int4 = False
    for n in gr["expert_tokens"]:
        add("expert_ffn", ops.expert_ffn(n), n_tokens=n, dtype="bf16")
        if int4:
            add("expert_ffn", ops.expert_ffn(n, "int4"), n_tokens=n, dtype="int4")
    del ops
    if clock.cuda:
        torch.cuda.empty_cache()
    return rows


# =============================================================================== link
def measure_link(clock: Clock, sizes: list[int], extra: list[int]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """One copy of each size in both directions from pinned and pageable host memory; the per-copy
    latency, issue overhead and the routing read."""
    dev = clock.device
    sizes = sorted(set(sizes) | set(extra))
    top = max(sizes)
    dbuf = torch.empty(top, dtype=torch.uint8, device=dev)
    rows: list[dict[str, Any]] = []
    scal: dict[str, Any] = {}
    side = torch.cuda.Stream(dev) if clock.cuda else None
    for mem in ("pinned", "pageable"):
        hbuf = torch.empty(top, dtype=torch.uint8, pin_memory=(mem == "pinned" and clock.cuda))
        hbuf.fill_(1)
        for n in sizes:
            for d in ("h2d", "d2h"):
                src, dst = (hbuf[:n], dbuf[:n]) if d == "h2d" else (dbuf[:n], hbuf[:n])
                if mem == "pinned" and clock.cuda:
                    sec, method = _event_copy(clock, dst, src), "events"
                elif clock.cuda:  # pageable copies block the host: the host's time, issued as the runtime does
                    sec, method = clock.host(lambda: _side_copy(side, dst, src)), "host-clock"
                else:
                    sec, method = clock.host(lambda: dst.copy_(src)), "host-clock"
                rows.append({"op": d, "shape": "", "model": "", "layer": -1, "nbytes": n, "host_memory": mem,
                             "seconds": sec, "method": method})
        del hbuf
    # per-copy latency: copies queued back to back at two sizes, t(s) = latency + s / bandwidth
    pin = torch.empty(8 << 20, dtype=torch.uint8, pin_memory=clock.cuda)
    dbuf = torch.empty(8 << 20, dtype=torch.uint8, device=dev)
    q = 16
    t = {}
    for s in (512 << 10, 8 << 20):
        def queue(s: int = s) -> None:
            for _ in range(q):
                dbuf[:s].copy_(pin[:s], non_blocking=True)

        t[s] = _events(clock, queue) / q
    s1, s2 = sorted(t)
    scal["copy_latency_s"] = max(0.0, (t[s1] * s2 - t[s2] * s1) / (s2 - s1))
    scal["queued_gbps"] = (s2 - s1) / (t[s2] - t[s1]) / 1e9 if t[s2] > t[s1] else float("nan")
    # issue overhead: host time of one non_blocking pinned copy_ call
    small = pin[:4096]
    scal["copy_issue_overhead_s"] = clock.host(lambda: dbuf[:4096].copy_(small, non_blocking=True), inner=200)
    # routing read: top-k ids from the GPU to the host; the eager path's .tolist() (a sync) and the
    # graphed path's non_blocking copy into pinned memory + event wait
    logits = torch.randn(1, 64, device=dev)
    ids = torch.topk(logits, 8, -1).indices
    scal["decision_delay_s"] = clock.host(lambda: ids.tolist())
    out = torch.empty(ids.shape, dtype=ids.dtype, pin_memory=clock.cuda)

    def pinned_read() -> Any:
        out.copy_(ids, non_blocking=True)
        if clock.cuda:
            ev = torch.cuda.Event()
            ev.record()
            ev.synchronize()
        return out.numpy().tolist()

    scal["decision_delay_pinned_event_s"] = clock.host(pinned_read)
    return rows, scal


def _events(clock: Clock, fn: Callable[[], Any]) -> float:
    """Median seconds of ``fn``'s GPU work between two events (host clock on the CPU)."""
    if not clock.cuda:
        return clock.host(fn)
    fn()
    clock.sync()
    ts = []
    for _ in range(clock.reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b) / 1e3)
    return statistics.median(ts)


def _side_copy(side: Any, dst: torch.Tensor, src: torch.Tensor) -> None:
    """One copy as the runtime's copy stream issues it (runtime.backends: ``copy_(non_blocking=True)``
    on a side stream, then the host waits for its end event): for pageable memory the host's time of
    this call is what a pageable copy holds the host for."""
    with torch.cuda.stream(side):
        dst.copy_(src, non_blocking=True)
        end = torch.cuda.Event()
        end.record(side)
    end.synchronize()


def _event_copy(clock: Clock, dst: torch.Tensor, src: torch.Tensor) -> float:
    return _events(clock, lambda: dst.copy_(src, non_blocking=True))


def link_summary(rows: list[dict[str, Any]], latency: float) -> dict[str, Any]:
    """Plateaus and normalised curves of the HardwareSpec link model from the copy rows: the
    bandwidth of a copy is bytes / (time - latency); the plateau is the best of copies >= 16 MiB."""
    out: dict[str, Any] = {}
    for mem, (h2d_key, d2h_key, curve_key) in {"pinned": ("h2d_gbps", "d2h_gbps", "pinned_curve"),
                                               "pageable": ("pageable_h2d_gbps", "pageable_d2h_gbps", "pageable_curve")}.items():
        bw: dict[str, dict[int, float]] = {"h2d": {}, "d2h": {}}
        for r in rows:
            if r["host_memory"] == mem:
                t = max(r["seconds"] - latency, 1e-9)
                bw[r["op"]][r["nbytes"]] = r["nbytes"] / t
        plateau = {}
        for d in ("h2d", "d2h"):
            big = [v for n, v in bw[d].items() if n >= (16 << 20)] or list(bw[d].values())
            plateau[d] = max(big)
        out[h2d_key], out[d2h_key] = plateau["h2d"] / 1e9, plateau["d2h"] / 1e9
        pts = sorted(bw["h2d"].items())
        out[curve_key] = [[int(n), round(min(1.0, max(1e-3, v / plateau["h2d"])), 4)] for n, v in pts]
    return out


# =============================================================================== roofline scalars
def measure_roofline(clock: Clock, dtype: torch.dtype, smoke: bool) -> dict[str, float]:
    dev = clock.device
    n = 256 if smoke else 8192
    a = torch.randn(n, n, device=dev).to(dtype)
    b = torch.randn(n, n, device=dev).to(dtype)
    t, _ = clock.gpu(lambda: a @ b, inner=2 if not smoke else 4)
    flops = 2 * n**3 / t
    del a, b
    size = (16 << 20) if smoke else (1 << 30)
    x = torch.empty(size, dtype=torch.uint8, device=dev)
    y = torch.empty_like(x)
    t, _ = clock.gpu(lambda: y.copy_(x), inner=2)
    hbm = 2 * size / t
    del x, y
    z = torch.zeros(1, device=dev)
    k = 100
    t, _ = clock.gpu(lambda: z.add_(1.0), inner=k)
    launch_eager = clock.host(lambda: z.add_(1.0), inner=500)
    if clock.cuda:
        torch.cuda.empty_cache()
    return {"flops_bf16": flops, "hbm_bandwidth": hbm, "launch_overhead_s": t, "eager_launch_host_s": launch_eager}


# =============================================================================== host overhead per path
def _decode_wall(step: Callable[[Any, int], Any], n: int, clock: Clock, prompt: int = 8) -> float:
    """Median wall seconds of a greedy one-token decode step (the host waits for each token)."""
    dev = clock.device
    toks = torch.arange(3, 3 + prompt, device=dev).reshape(1, -1)
    ts = []
    with torch.inference_mode():
        nxt = step(toks, 0).argmax(-1).reshape(1, 1)
        clock.sync()
        for i in range(n):
            t0 = time.perf_counter()
            nxt = step(nxt, prompt + i).argmax(-1).reshape(1, 1)
            clock.sync()
            if i >= 2:  # first uses of a context length, allocator
                ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def engine_at_depth(name: str, layers: int, cfg: Any, clock: Clock, top_k: int | None = None,
                    executor_only: bool = False) -> dict[str, float]:
    """One depth of the engine shape, every expert resident: the kernels' own time of a decode step
    (runtime.lean's whole-step CUDA graph, grouped experts), the wall time per step of the runtime's
    executor on each decode path (``engine=graphed``: runtime.lean's graph per layer segment, routing
    read through pinned memory + event; ``engine=eager``: transformers' layers), of runtime.lean with
    grouped resident experts (no executor), the draft's one-graph INT4 step (host time of the launch
    call) and transformers' own forward (the eager draft's layers). ``top_k``: build the shape at
    that top-k; ``executor_only``: only the kernels' floor and the two executor paths."""
    from runtime.lean import GroupedExperts, Int4Experts, LeanModel
    from runtime.models import load_model
    from runtime.replay import _forward_kwargs, forward_step, new_cache

    n = 6 if cfg.smoke else 24
    max_len = 64
    lm = load_model(name, layers=layers, device=clock.device.type, seed=int(cfg.seed), attn_implementation="sdpa",
                    config_overrides={"num_experts_per_tok": int(top_k)} if top_k else None)
    mods = [h.experts for h in lm.moe_handles]
    out: dict[str, float] = {"moe_layers": float(lm.shape.num_moe_layers), "top_k": float(lm.shape.top_k)}
    lean = LeanModel(lm, max_len=max_len, experts=GroupedExperts(mods, "grouped_mm" if hasattr(torch, "_grouped_mm")
                                                                  else "gather_bmm"), graphs=clock.cuda)
    out["lean_grouped_step_s"] = _decode_wall(lean.forward, n, clock)
    if clock.cuda:
        with torch.inference_mode():  # the static KV buffers are inference tensors
            lean.capture_step()
        out["floor_step_s"] = _events(clock, lean.step_graph.replay)  # a graph: timed by events, not re-captured
        out["graph_launch_host_s"] = clock.host(lean._graphs[0].replay, inner=20)
    else:  # no graphs: the eager lean step is all the work there is
        out["floor_step_s"] = out["lean_grouped_step_s"]
        out["graph_launch_host_s"] = 0.0
    del lean
    if executor_only:
        del lm
        for engine in ("graphed", "eager"):
            out[f"executor_{engine}_step_s"] = _resident_tpot(name, layers, cfg, clock, engine, top_k)
        return out
    try:
        draft = LeanModel(lm, max_len=max_len, experts=Int4Experts(mods), graphs=clock.cuda)
        if clock.cuda:
            with torch.inference_mode():
                draft.forward(torch.arange(3, 11, device=clock.device).reshape(1, -1), 0)
                draft.capture_step()
                out["draft_call_host_s"] = _host_issue(clock, lambda: draft.step_one_graph(8), 1)
        else:
            out["draft_call_host_s"] = 0.0
        del draft
    except Exception as e:  # noqa: BLE001 - shapes or a torch without int4 kernels: stated in the notes
        out["draft_error"] = f"{type(e).__name__}: {e}"  # type: ignore[assignment]
    extra = _forward_kwargs(lm.model)
    state: dict[str, Any] = {}

    def hf_step(ids: Any, start: int) -> Any:
        if start == 0:
            state["cache"] = new_cache(lm.model)
        pos = torch.arange(start, start + ids.shape[1], device=clock.device).reshape(1, -1)
        return forward_step(lm.model, ids, pos, state["cache"], extra)

    _decode_wall(hf_step, n, clock)  # warm-up: transformers' first forward in the process is slow
    out["transformers_step_s"] = _decode_wall(hf_step, n, clock)
    del lm, state
    for engine in ("graphed", "eager"):
        out[f"executor_{engine}_step_s"] = _resident_tpot(name, layers, cfg, clock, engine)
    if clock.cuda:
        torch.cuda.empty_cache()
    return out


def engine_values(name: str, cfg: Any, clock: Clock, eager_launch_host_s: float,
                  log: Callable[[str], None]) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, float]]]:
    """Host overhead per decode path on the engine shape (module docstring): per MoE layer, the
    slope over depth of the path's wall time per step minus the slope of the kernels' own time (so
    embedding, head and per-step constants cancel); per routed expert, the same difference between
    two top-k values at the deeper depth. Returns the values per path and the raw measurements by
    label (``L1``, ``L3``, ``L3 top-2``)."""
    l1, l2 = sorted(int(x) for x in cfg.engine_layers)[:2]
    if l2 <= l1:
        raise SimError(f"engine_layers must hold two different depths, got {list(cfg.engine_layers)}")
    spec = ModelSpec.from_preset(name)
    k_low = int(cfg.engine_top_k_low)  # in [1, top_k) (_check_request)
    at = {L: engine_at_depth(name, L, cfg, clock) for L in (l1, l2)}
    low = engine_at_depth(name, l2, cfg, clock, top_k=k_low, executor_only=True)
    raw = {**{f"L{L}": v for L, v in at.items()}, f"L{l2} top-{k_low}": low}
    for label, v in raw.items():
        log(f"engine shape {name} {label}: kernels {v['floor_step_s'] * 1e3:.3f} ms/step; executor graphed "
            f"{v['executor_graphed_step_s'] * 1e3:.3f}, eager {v['executor_eager_step_s'] * 1e3:.3f} ms/step")
    return derive_engine(at, spec, eager_launch_host_s, low), raw


def derive_engine(at: dict[int, dict[str, float]], spec: ModelSpec, eager_launch_host_s: float,
                  low: dict[str, float] | None = None) -> dict[str, dict[str, float]]:
    """The engine keys from the per-depth measurements (``at``, at the shape's own top-k) and, when
    given, the deeper depth at a lower top-k (``low``), in the simulator's terms (docs/engine.md):
    a MoE layer costs host_per_layer_s + host_per_launch_s x launches before its routing, then an
    experts phase lasting max(k x c, k x host_per_expert_s), c = one expert's kernels.

    - per layer, of a path: slope over depth of its wall time per step (embedding, head and per-step
      constants cancel), and of the kernels' own time;
    - per expert: at the deeper depth, the wall time's difference between the two top-k values over
      (MoE layers x the top-k difference) is the longer of c and the host's time per expert (plus,
      eager, the expert's launches); c is the same difference of the kernels' own time;
    - graphed: kernels inside graphs cost the host nothing per launch (``host_per_launch_s`` = 0);
      ``host_per_expert_s`` = the wall slope per expert; ``host_per_layer_s`` = wall slope - kernel
      slope - k x (host_per_expert_s - c). The draft is one graph launch per token: its per-layer
      term is the slope of that call's host time over depth (~0);
    - eager: ``host_per_launch_s`` = one eager launch; ``host_per_expert_s`` = the wall slope per
      expert less its launches (sim.costmodel.KERNELS); ``host_per_layer_s`` likewise less the
      layer's launches; the draft (transformers' own forward) = its slope - kernel slope - launches.

    Where the host is faster than an expert's kernels the per-expert value comes out as c (the
    phase is the kernels' either way). Without ``low``, ``host_per_expert_s`` is 0 and the per-layer
    value holds the engine shape's experts, as profiles before the per-expert term did.
    """
    from sim.costmodel import KERNELS, RooflineCostModel
    from sim.hardware import HardwareSpec

    l1, l2 = sorted(at)[:2]
    dm = at[l2]["moe_layers"] - at[l1]["moe_layers"]
    k = spec.top_k

    def slope(key: str) -> float:
        return (at[l2][key] - at[l1][key]) / dm

    def per_expert(key: str) -> float:
        return (at[l2][key] - low[key]) / (at[l2]["moe_layers"] * (k - low["top_k"]))

    floor = slope("floor_step_s")
    # kernel launches of one of the engine shape's MoE layers (the count needs no hardware numbers)
    launches = RooflineCostModel(spec, HardwareSpec.from_preset("h200")).layer_launches(spec.moe_layers[0], k)
    per_launch = eager_launch_host_s * launches
    draft_graphed = max(0.0, slope("draft_call_host_s")) if all("draft_call_host_s" in v for v in at.values()) else 0.0
    g_exp = e_exp = c = 0.0
    if low is not None and low["top_k"] < k:
        c = max(0.0, per_expert("floor_step_s"))
        g_exp = max(0.0, per_expert("executor_graphed_step_s"))
        e_exp = max(0.0, per_expert("executor_eager_step_s") - eager_launch_host_s * KERNELS["expert_ffn"])
    # the experts phase beyond the kernels' own time that the per-expert term prices (0 without it)
    g_phase = k * (max(g_exp, c) - c) if g_exp else 0.0
    e_phase = k * (max(e_exp, c) - c) if e_exp else 0.0
    return {
        "graphed": {"host_per_layer_s": max(0.0, slope("executor_graphed_step_s") - floor - g_phase),
                    "draft_host_per_layer_s": draft_graphed, "host_per_launch_s": 0.0, "host_per_expert_s": g_exp},
        "eager": {"host_per_layer_s": max(0.0, slope("executor_eager_step_s") - floor - per_launch - e_phase),
                  "draft_host_per_layer_s": max(0.0, slope("transformers_step_s") - floor - per_launch),
                  "host_per_launch_s": eager_launch_host_s, "host_per_expert_s": e_exp},
    }


def _host_issue(clock: Clock, fn: Callable[[], Any], n: int) -> float:
    """Host seconds of one call of ``fn`` while the GPU drains (the host clock stops before the sync)."""
    ts = []
    for _ in range(clock.reps):
        clock.sync()
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        ts.append((time.perf_counter() - t0) / n)
        clock.sync()
    return statistics.median(ts)


def _compose_run(overrides: list[str]) -> Any:
    """The runtime's config (conf/run.yaml) for ``overrides`` (``engine=X`` names the decode path)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from runtime.__main__ import register_configs
    from sim.presets import conf_dir

    register_configs()
    if GlobalHydra.instance().is_initialized():  # inside `python -m runtime.profile` (same search path)
        return compose(config_name="run", overrides=overrides)
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        return compose(config_name="run", overrides=overrides)


def _resident_tpot(name: str, layers: int, cfg: Any, clock: Clock, engine: str, top_k: int | None = None) -> float:
    """Decode TPOT of the runtime's executor on decode path ``engine`` with every expert resident
    (no transfers); ``top_k``: the shape built at that top-k (``model.top_k``)."""
    import numpy as np

    from runtime.executor import RunConfig
    from runtime.measure import Session, run_log
    from runtime.replay import replay
    from sim.policies import EVICTION, PREFETCH

    # 64 decode tokens x 4 timed repetitions: the host side is noisy at 32 x 2 (two runs of the first
    # profile two minutes apart differed by 1.6x, benchmarks/profile.md), and the per-expert value is a
    # difference of two of these
    tokens = (4, 8) if cfg.smoke else (8, 64)
    rcfg = _compose_run([f"model={name}", f"model.layers={layers}", f"device={clock.device.type}", "trace=synth",
                         "trace.requests=1", f"trace.prompt_tokens={tokens[0]}", f"trace.decode_tokens={tokens[1]}",
                         "repetitions=1", "policy=lru", "cache.slots=1", f"seed={int(cfg.seed)}", f"engine={engine}",
                         *([f"model.top_k={int(top_k)}"] if top_k else [])])
    spec = ModelSpec.from_cfg(rcfg.model)
    total = spec.num_routed_experts_total
    sess = Session(rcfg, max_slots=total)
    try:
        prep = sess.prepare(rcfg)
        tp = []
        for rep in range(2 if cfg.smoke else 5):
            rc = RunConfig(eviction=EVICTION.create("lru"), prefetch=PREFETCH.create("none"), slots=total,
                           schedule=prep.schedule, decision_delay_s=0.0)
            run = sess.om.start_run(rc)
            sess.om.preload(run, range(total))
            replay(sess.om, run, prep.trace, prep.schedule, seed=int(cfg.seed))
            sess.om.end_run()
            log = run_log(run, timeline=False)
            if rep == 0:
                continue  # warm-up: kernels first met
            gaps = [b - a for times in log.token_times for a, b in zip(times, times[1:])]
            tp.append(float(np.median(gaps)))
        return statistics.median(tp)
    finally:
        sess.close()


# =============================================================================== the card
def card_info(device: torch.device) -> dict[str, str]:
    info = {"torch": str(torch.__version__), "python": platform.python_version(), "host": platform.node(),
            "cpu": platform.processor() or platform.machine()}
    if device.type == "cuda":
        info["card"] = torch.cuda.get_device_name(device)
        info["cuda"] = str(torch.version.cuda)
        try:
            import subprocess

            q = subprocess.run(["nvidia-smi", "--query-gpu=driver_version,name,memory.total,pcie.link.gen.max,pcie.link.width.max",
                                "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
            info["nvidia_smi"] = q.stdout.strip().splitlines()[0] if q.stdout.strip() else ""
            info["driver"] = info["nvidia_smi"].split(",")[0].strip()
        except Exception:  # noqa: BLE001 - provenance only
            info["driver"] = "unknown"
    else:
        info["card"] = f"cpu ({info['cpu']})"
        info["driver"] = "none"
    return info


def card_name(card: str) -> str:
    """Profile name of a card: ``NVIDIA H100 80GB HBM3`` -> ``h100-sxm``, ``NVIDIA H200`` -> ``h200``."""
    c = card.lower()
    if "h100" in c:
        return "h100-pcie" if "pcie" in c else ("h100-nvl" if "nvl" in c else "h100-sxm")
    if "h200" in c:
        return "h200-nvl" if "nvl" in c else "h200"
    slug = re.sub(r"[^a-z0-9]+", "-", c.replace("nvidia", "")).strip("-")
    return slug or "unknown"


# =============================================================================== main
def _check_request(cfg: Any, device: torch.device) -> tuple[list[str], dict[str, ModelSpec], dict[str, str], str, Path, Path, Path]:
    """Stage 1: the shapes, card, profile name and output paths, every bad value refused before any
    measurement (and an existing profile never overwritten without ``overwrite=true``)."""
    from runtime.models import preset_config_path

    shapes = list(cfg.shapes)
    if cfg.engine_shape in GRID_SHAPES:
        raise SimError(f"engine_shape '{cfg.engine_shape}' is a validation-grid shape ({', '.join(GRID_SHAPES)}); host "
                       "overheads are measured on a shape the grid does not use")
    if not preset_config_path(cfg.engine_shape).is_file():
        raise SimError(f"engine_shape '{cfg.engine_shape}': the runtime builds only presets with a config.json "
                       f"({preset_config_path(cfg.engine_shape)} not found)")
    shapes += [] if cfg.engine_shape in shapes else [cfg.engine_shape]
    specs = {s: ModelSpec.from_preset(s) for s in shapes}  # bad names fail before any work
    k = specs[cfg.engine_shape].top_k
    if not 1 <= int(cfg.engine_top_k_low) < k:
        raise SimError(f"engine_top_k_low={cfg.engine_top_k_low}: must be in [1, {k - 1}], below the top-{k} of "
                       f"engine_shape '{cfg.engine_shape}'")
    info = card_info(device)
    name = cfg.name or (card_name(info["card"]) if device.type == "cuda" else "cpu-smoke")
    if not re.fullmatch(r"[a-z0-9][a-z0-9._-]*", name):
        raise SimError(f"profile name must be lower-case letters, digits, '.', '_' or '-', got {name!r}")
    out = Path(cfg.out)
    ypath, ppath = out / f"{name}.yaml", out / f"{name}.parquet"
    if not cfg.overwrite and (ypath.exists() or ppath.exists()):
        raise SimError(f"{ypath} exists: pass overwrite=true to replace it, or name=... for another profile")
    return shapes, specs, info, name, out, ypath, ppath


def _measure_links(cfg: Any, clock: Clock, gr: dict[str, list[int]], specs: dict[str, ModelSpec],
                   log: Callable[[str], None]) -> tuple[list[dict[str, Any]], dict[str, Any], dict[str, Any]]:
    """Stage 3: the host link's copy curves and scalars (rows, scalars, summary); outside a smoke run
    the shapes' expert sizes (bf16 and int4) are measured too, as the simulator copies them."""
    expert_sizes = sorted({sp.bytes_per_expert(dt) for sp in specs.values() for dt in ("bf16", "int4")})
    link_rows, scal = measure_link(clock, gr["link"], expert_sizes if not cfg.smoke else [])
    link = link_summary(link_rows, scal["copy_latency_s"])
    log(f"link: pinned {link['h2d_gbps']:.1f} / {link['d2h_gbps']:.1f} GB/s, pageable {link['pageable_h2d_gbps']:.1f} / "
        f"{link['pageable_d2h_gbps']:.1f} GB/s (h2d / d2h), latency {scal['copy_latency_s'] * 1e6:.2f} us, issue "
        f"{scal['copy_issue_overhead_s'] * 1e6:.2f} us, routing read {scal['decision_delay_s'] * 1e6:.1f} us")
    return link_rows, scal, link


def _measure_ops(cfg: Any, shapes: list[str], specs: dict[str, ModelSpec], clock: Clock, dtype: torch.dtype,
                 gr: dict[str, list[int]], failed: list[str], log: Callable[[str], None]) -> list[dict[str, Any]]:
    """Stage 4: each shape's op rows. A shape that fails is appended to ``failed`` (stated in the
    notes) and the rest of the profile stands; in a smoke run it raises instead."""
    rows: list[dict[str, Any]] = []
    for s in shapes:
        t0 = time.perf_counter()
        try:
            got = measure_compute(specs[s], s, clock, dtype, gr, int(cfg.seed), log)
        except Exception as e:  # noqa: BLE001
            if cfg.smoke:
                raise
            failed.append(f"op rows of {s}: {type(e).__name__}: {e}"[:300])
            log(f"{s}: FAILED {failed[-1]}")
            continue
        rows += got
        log(f"{s}: {len(got)} op rows in {time.perf_counter() - t0:.1f} s")
    return rows


def _measure_engine(cfg: Any, clock: Clock, roof: dict[str, float], failed: list[str],
                    log: Callable[[str], None]) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, float]]]:
    """Stage 5: each decode path's host overheads on the engine shape (values per path, raw values per
    depth). A failure is appended to ``failed`` and leaves them empty; in a smoke run it raises."""
    try:
        engine, at = engine_values(cfg.engine_shape, cfg, clock, roof["eager_launch_host_s"], log)
    except Exception as e:  # noqa: BLE001
        if cfg.smoke:
            raise
        import traceback

        traceback.print_exc()
        failed.append(f"engine values: {type(e).__name__}: {e}"[:300])
        engine, at = {}, {}
    for path, e in engine.items():
        log(f"engine {path}: host/layer {e['host_per_layer_s'] * 1e6:.1f} us, draft host/layer "
            f"{e['draft_host_per_layer_s'] * 1e6:.1f} us, host/launch {e['host_per_launch_s'] * 1e6:.2f} us, host/expert "
            f"{e['host_per_expert_s'] * 1e6:.1f} us")
    return engine, at


def _notes(cfg: Any, ek: ModelSpec, scal: dict[str, Any], failed: list[str], int4: bool) -> list[str]:
    """Stage 6a: how each number was measured, what failed and what is missing, for the profile's
    provenance (a reader must know what the simulator is being fed)."""
    notes = [
        "Compute rows: plain-torch ops on random weights, captured in CUDA graphs (kernel time, no host gaps).",
        f"Engine values measured on {cfg.engine_shape} (top-{ek.top_k} and top-{cfg.engine_top_k_low}; depths "
        f"{list(cfg.engine_layers)}), a shape outside the validation grid {GRID_SHAPES}, every expert resident: the "
        "host time per MoE layer = slope over MoE layers of the path's wall time per decode step minus the slope of "
        "the kernels' own time (runtime.lean's whole-step CUDA graph); host_per_expert_s = at the deeper depth, the "
        "wall time's difference between the two top-k values over MoE layers x the top-k difference (eager: less "
        "an expert's launches); host_per_layer_s = the per-layer total less what the experts phase takes beyond "
        "the kernels at that per-expert time (and, eager, less the launches). runtime.profile.derive_engine.",
        "graphed: runtime.executor with engine=graphed (runtime.lean: one CUDA graph per layer segment, the routing "
        "read through pinned memory + event, the executor's expert compute); draft = slope over depth of the host "
        "time of the INT4 draft's one-graph step call (runtime.lean, Int4Experts; the call itself, per token, is "
        "draft_call_host_s in engine_raw).",
        "eager: runtime.executor with engine=eager (transformers' layers); draft = transformers' own forward "
        "(no executor hooks).",
        "host_per_launch_s: eager = host time of one eager kernel launch, and the eager per-layer values exclude "
        "the engine shape's layer launches priced at it (the simulator adds host_per_launch_s x launches); graphed = "
        "0 (kernels inside graphs), its per-layer value is the whole per-layer host time.",
        "workspace_gb is not measured (estimate).",
        f"decision_delay_s is the eager .tolist() read; through pinned memory + event: "
        f"{scal['decision_delay_pinned_event_s'] * 1e6:.1f} us.",
    ]
    notes += [f"FAILED, not in this profile: {f}." for f in failed]
    if not int4:
        notes.append("No INT4 rows: this torch has no packed int4 matmul for the device; int4 experts fall back to the roofline.")
    return notes


def _hardware_dict(cfg: Any, name: str, device: torch.device, shapes: list[str], info: dict[str, str],
                   roof: dict[str, float], link: dict[str, Any], scal: dict[str, Any],
                   engine: dict[str, dict[str, float]], at: dict[str, dict[str, float]], notes: list[str],
                   now: _dt.datetime, t_start: float) -> dict[str, Any]:
    """Stage 6b: the hardware profile as the simulator's hardware schema reads it, numbers rounded to
    4 significant digits, with its provenance (card, driver, command, date, notes, raw values)."""
    total_mem = torch.cuda.mem_get_info(device)[1] if device.type == "cuda" else 16e9
    return {
        "name": f"measured/{name}",
        "memory_gb": round(total_mem / 1e9, 2),
        "flops_bf16": float(f"{roof['flops_bf16']:.4g}"),
        "hbm_bandwidth": float(f"{roof['hbm_bandwidth']:.4g}"),
        "launch_overhead_s": float(f"{roof['launch_overhead_s']:.4g}"),
        "workspace_gb": 1.5,
        **{k: round(v, 3) for k, v in link.items() if k.endswith("gbps")},
        "pinned_curve": link["pinned_curve"],
        "pageable_curve": link["pageable_curve"],
        "host_memory": "pinned",
        "link_pace_gbps": None,
        "copy_latency_s": float(f"{scal['copy_latency_s']:.4g}"),
        "copy_issue_overhead_s": float(f"{scal['copy_issue_overhead_s']:.4g}"),
        "copy_engines": 1,
        "copies_in_flight": 4,
        "decision_delay_s": float(f"{scal['decision_delay_s']:.4g}"),
        "profile_table": f"{name}.parquet",
        "engine": {p: {k: float(f"{e[k]:.4g}") for k in ENGINE_KEYS} for p, e in engine.items()} or None,
        "provenance": {
            "card": info["card"], "driver": info["driver"], "torch": info["torch"], "cuda": info.get("cuda", ""),
            "nvidia_smi": info.get("nvidia_smi", ""), "date": now.strftime("%Y-%m-%d %H:%M UTC"),
            "command": "python -m runtime.profile " + " ".join(sys.argv[1:]),
            "shapes": ", ".join(shapes[:-1] if shapes[-1] == cfg.engine_shape and cfg.engine_shape not in cfg.shapes else shapes), "engine_shape": cfg.engine_shape, "smoke": str(bool(cfg.smoke)),
            "duration_s": f"{time.perf_counter() - t_start:.0f}",
            "notes": " ".join(notes),
            "engine_raw": "; ".join(f"{L}: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                                          for k, v in d.items()) for L, d in at.items()),
            "queued_copy_gbps": f"{scal['queued_gbps']:.2f}",
        },
    }


def _write_profile(hw: dict[str, Any], rows: list[dict[str, Any]], info: dict[str, str], now: _dt.datetime,
                   out: Path, ypath: Path, ppath: Path, t_start: float, log: Callable[[str], None]) -> None:
    """Stage 7: check the profile loads as the simulator will load it, render it, then write the op
    table and the YAML atomically (nothing is half-written when a check fails)."""
    import pandas as pd

    from sim.hardware import HardwareSpec
    from traces.atomic import atomic_write

    HardwareSpec.from_dict({**hw, "profile_table": str(ppath.resolve())}, where=str(ypath))  # what the simulator will load
    df = pd.DataFrame(rows)
    for c in ("n_tokens", "kv_len", "nbytes"):
        df[c] = df[c].astype("Int64")
    df["card"], df["driver"], df["torch"], df["date"] = info["card"], info["driver"], info["torch"], now.strftime("%Y-%m-%d")
    text = profile_yaml(hw)  # rendered before anything is written
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(ppath, lambda tmp: df.to_parquet(tmp, index=False))
    atomic_write(ypath, lambda tmp: Path(tmp).write_text(text))
    log(f"wrote {ypath} and {ppath} ({len(df)} rows) in {time.perf_counter() - t_start:.0f} s")


def run_profile(cfg: Any, log: Callable[[str], None] = print) -> tuple[Path, Path]:
    """Measure and write the profile; return (yaml path, parquet path)."""
    from runtime.models import resolve_device

    t_start = time.perf_counter()
    device = resolve_device(cfg.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    shapes, specs, info, name, out, ypath, ppath = _check_request(cfg, device)
    # Stage 2: the clock, seed and size grids every measurement shares
    clock = Clock(device, cfg.reps if not cfg.smoke else 3)
    torch.manual_seed(int(cfg.seed))
    gr = grids(bool(cfg.smoke))
    log(f"profiling {info['card']} (torch {info['torch']}, driver {info['driver']}) -> {ypath}")

    roof = measure_roofline(clock, dtype, bool(cfg.smoke))
    log(f"roofline: {roof['flops_bf16'] / 1e12:.0f} TFLOP/s, {roof['hbm_bandwidth'] / 1e12:.2f} TB/s, "
        f"{roof['launch_overhead_s'] * 1e6:.2f} us/kernel in a graph, {roof['eager_launch_host_s'] * 1e6:.2f} us host/eager launch")
    link_rows, scal, link = _measure_links(cfg, clock, gr, specs, log)
    failed: list[str] = []  # a stage that fails is stated in the notes; the rest of the profile stands
    rows = list(link_rows) + _measure_ops(cfg, shapes, specs, clock, dtype, gr, failed, log)
    int4 = any(r.get("dtype") == "int4" for r in rows)
    engine, at = _measure_engine(cfg, clock, roof, failed, log)

    now = _dt.datetime.now(_dt.timezone.utc)
    notes = _notes(cfg, specs[cfg.engine_shape], scal, failed, int4)
    hw = _hardware_dict(cfg, name, device, shapes, info, roof, link, scal, engine, at, notes, now, t_start)
    _write_profile(hw, rows, info, now, out, ypath, ppath, t_start, log)
    return ypath, ppath


def profile_yaml(hw: dict[str, Any]) -> str:
    import yaml

    p = hw["provenance"]
    head = [
        f"# Measured hardware profile: {p['card']} (driver {p['driver']}, torch {p['torch']}), {p['date']}.",
        f"# Written by `{p['command'].strip()}` (runtime/profile.py; docs/profile.md); load with hardware={hw['name']}.",
        "# Every number is measured on this card except workspace_gb (estimate), copy_engines and copies_in_flight",
        "# (runtime discipline). Op times per shape are in profile_table; engine: host overhead per decode path.",
        "defaults:",
        "  - /schema/hardware@_here_",
        "  - _self_",
        "",
    ]
    body = {k: v for k, v in hw.items() if k != "provenance"}
    return ("\n".join(head) + yaml.safe_dump(body, sort_keys=False, default_flow_style=None, width=110)
            + yaml.safe_dump({"provenance": p}, sort_keys=False, default_flow_style=False, width=110))


def register_configs() -> None:
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="profile_schema", node=ProfileConf)


def _app(cfg: Any) -> None:
    run_profile(cfg)


def main(argv: list[str] | None = None) -> int:
    """Exit code of `python -m runtime.profile key=value ...` (traces.cli: errors print one line)."""
    import hydra

    from traces.cli import hydra_task, run_cli

    register_configs()
    if argv is not None:
        sys.argv = [sys.argv[0]] + list(argv)
    return run_cli(hydra.main(version_base="1.3", config_path="pkg://conf", config_name="profile")(hydra_task(_app)))


if __name__ == "__main__":
    sys.exit(main())
