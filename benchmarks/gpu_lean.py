"""The lean decode path on the lent GPU: kernel floor, modelled floor, graphed vs eager TPOT, host
time per MoE layer, INT4 draft step; transformers' own resident forward of the same shape beside it.

One command, on whichever card is lent (the hardware preset follows the card's name):

    . .gpu/prelude.sh; python3 benchmarks/gpu_lean.py --out $OUT

Per shape (each in its own process; bf16 random weights of the preset's shape, built on the GPU):

- transformers' resident decode (experts implementations eager / batched_mm / grouped_mm; dynamic
  and static cache where this transformers takes it): its best TPOT is the reference to beat;
- (a) kernel floor: the lean resident decode step captured as ONE CUDA graph (routing on the device:
  no host work at all), GPU time per replay from CUDA events, and per segment (attention + router of
  each MoE layer, its experts, the head) for the kernel-by-kernel account;
- (b) the modelled floor: the simulator's roofline cost model under the card's preset (and the same
  without per-kernel launch overhead, the bytes/FLOPs floor);
- (c) TPOT, resident: graphed (per-layer graphs, routing read per layer through pinned memory and an
  event, grouped experts), graphed through the executor (its host controller and experts loop),
  eager (transformers' forward + the executor: what the runtime ran so far); offloaded at 50% of the
  experts (LRU, cold start) for both engines;
- (d) exposed host time per MoE layer = (resident TPOT of the path - a) / MoE layers;
- (e) the INT4 draft step (experts int4, all resident; one graph per token, routing copied to a pinned
  Expert Lookahead Buffer asynchronously): GPU time per token against the target's.

Rows (results.jsonl, then results.parquet) carry card, hardware, model, engine, resident, path,
tpot_s, kernel_floor_s, roofline_floor_s, exposed_host_per_layer_s. A rerun with the same --out skips
shapes whose rows exist (resumable); the planned device time is printed first. ``--smoke``: the tiny
preset on the CPU (no graphs), seconds.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

if __package__:  # imported as benchmarks.<script> (the tests)
    from .card import CARDS, hardware_of, identify, measured_models  # noqa: F401
else:  # run as a script: benchmarks/ is on sys.path
    from card import CARDS, hardware_of, identify, measured_models  # noqa: F401 (benchmarks/card.py)

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

PROMPT, DECODE, MAX_LEN = 16, 24, 64
SHAPES = [
    {"name": "mixtral-8x7b-L4", "preset": "mixtral-8x7b", "layers": 4, "est_s": 75},
    {"name": "phi-3.5-moe-L4", "preset": "phi-3.5-moe", "layers": 4, "est_s": 70},
    {"name": "qwen3-30b-a3b-L8", "preset": "qwen3-30b-a3b", "layers": 8, "est_s": 90},
    {"name": "small-moe", "preset": "small-moe", "source": "models/small-moe", "layers": None, "est_s": 40},
]
SMOKE = [{"name": "tiny", "preset": "tiny", "layers": None, "est_s": 10}]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# =============================================================================== floors
def modelled_floor(sh: dict[str, Any], hw: str, kv: int, k: int) -> dict[str, float]:
    """The simulator's roofline cost of one decode step at context ``kv`` under preset ``hw``, by
    term, with and without per-kernel launch overhead."""
    from benchmarks.gpu_runtime import compose_run
    from sim.costmodel import cost_model_for
    from sim.hardware import HardwareSpec
    from sim.spec import ModelSpec

    over = [f"model={sh['preset']}", f"hardware={hw}"] + ([f"model.layers={sh['layers']}"] if sh.get("layers") else [])
    cfg = compose_run(over)
    spec = ModelSpec.from_cfg(cfg.model)
    out: dict[str, float] = {}
    for tag, launch in (("", None), ("_bytes", 0.0)):
        hcfg = cfg.hardware.copy()
        if launch is not None:
            hcfg.launch_overhead_s = launch
        cost = cost_model_for(spec, HardwareSpec.from_cfg(hcfg))
        attn = router = experts = draft = shared = dense = 0.0
        moe = set(spec.moe_layers)
        for layer in range(spec.num_layers):
            attn += cost.attention(layer, 1, kv)
            if layer in moe:
                router += cost.router(layer, 1)
                experts += k * cost.expert_ffn(layer, 1)
                draft += k * cost.expert_ffn(layer, 1, dtype="int4")
                shared += cost.shared_experts(layer, 1)
            else:
                dense += cost.dense_ffn(layer, 1)
        head = cost.embed_and_head(1, logits_tokens=1)
        total = attn + router + experts + shared + dense + head
        out.update({f"floor{tag}_s": total, f"attn{tag}_s": attn, f"router{tag}_s": router, f"experts{tag}_s": experts,
                    f"shared{tag}_s": shared, f"dense{tag}_s": dense, f"head{tag}_s": head,
                    f"draft_floor{tag}_s": total - experts + draft})
    return out


def card_ceilings() -> dict[str, float]:
    """Device-to-device copy bandwidth (read + write), bf16 GEMM rate, pinned H2D: measured once."""
    import torch

    ev = lambda: torch.cuda.Event(enable_timing=True)  # noqa: E731
    res: dict[str, float] = {}
    a = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    b.copy_(a)
    ts = []
    for _ in range(5):
        s, e = ev(), ev()
        s.record(); b.copy_(a); e.record(); e.synchronize()
        ts.append(s.elapsed_time(e) / 1e3)
    res["d2d_tbps"] = 2 * 2**30 / sorted(ts)[2] / 1e12
    del a, b
    n = 8192
    x = torch.randn(n, n, dtype=torch.bfloat16, device="cuda")
    y = torch.randn(n, n, dtype=torch.bfloat16, device="cuda")
    x @ y
    ts = []
    for _ in range(5):
        s, e = ev(), ev()
        s.record(); x @ y; e.record(); e.synchronize()
        ts.append(s.elapsed_time(e) / 1e3)
    res["gemm_tflops"] = 2 * n**3 / sorted(ts)[2] / 1e12
    del x, y
    h = torch.empty(2**28, dtype=torch.uint8, pin_memory=True)
    d = torch.empty(2**28, dtype=torch.uint8, device="cuda")
    d.copy_(h)
    s, e = ev(), ev()
    s.record(); d.copy_(h, non_blocking=True); e.record(); e.synchronize()
    res["h2d_gbps"] = 2**28 / (s.elapsed_time(e) / 1e3) / 1e9
    torch.cuda.empty_cache()
    return res


# =============================================================================== drivers
def sync(dev: Any) -> None:
    import torch

    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def decode_times(step, prompt: list[int], n: int, dev: Any, forced: list[int] | None = None
                 ) -> tuple[list[float], list[Any], list[int]]:
    """Greedy decoding: ``step(ids [1, T], start) -> logits``; wall seconds of each decode step (the
    host waits for the token at the end of each), the logits and tokens.

    ``forced``: feed these tokens instead of the path's own argmax (teacher forcing, from a device
    tensor: no host copy in the timed step). Every path is fed the reference's greedy tokens, so
    their logits compare step by step: a free-running path that picks another token once (a near-tie
    flipped by bf16 rounding) would otherwise be compared on a different sequence from then on."""
    import torch

    toks = torch.tensor([prompt], device=dev)
    fed = torch.tensor(forced, device=dev).reshape(-1, 1, 1) if forced is not None else None
    times, logits_all, out = [], [], []
    with torch.inference_mode():
        logits = step(toks, 0)
        start = len(prompt)
        nxt = logits.argmax(-1).reshape(1, 1) if fed is None else fed[0]
        sync(dev)
        logits_all.append(logits.float().cpu())
        out.append(int(logits.argmax(-1)))
        for i in range(n):
            t0 = time.perf_counter()
            logits = step(nxt, start)
            nxt = logits.argmax(-1).reshape(1, 1) if fed is None else fed[i + 1]
            sync(dev)
            times.append(time.perf_counter() - t0)
            start += 1
            logits_all.append(logits.float().cpu())
            out.append(int(logits.argmax(-1)))
    return times, logits_all, out


def tpot(times: list[float]) -> float:
    """Mean decode step time after the first two steps (first use of a context length, allocator)."""
    t = times[2:] if len(times) > 4 else times
    return sum(t) / len(t)


def hf_stepper(model: Any, cache_kind: str, max_len: int):
    import torch

    from runtime.replay import _forward_kwargs, forward_step, new_cache

    extra = _forward_kwargs(model)
    dev = next(p.device for p in model.parameters())
    state: dict[str, Any] = {}

    def step(ids, start):
        if start == 0:
            if cache_kind == "static":
                from transformers import StaticCache

                state["cache"] = StaticCache(config=model.config, max_cache_len=max_len)
            else:
                state["cache"] = new_cache(model)
        pos = torch.arange(start, start + ids.shape[1], device=dev).reshape(1, -1)
        return forward_step(model, ids, pos, state["cache"], extra)

    return step


def gpu_time(fn, reps: int = 30, warm: int = 3) -> float:
    """Median GPU seconds of ``fn()`` (CUDA events around each call)."""
    import torch

    for _ in range(warm):
        fn()
    ts = []
    for _ in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        e.synchronize()
        ts.append(s.elapsed_time(e) / 1e3)
    ts.sort()
    return ts[len(ts) // 2]


def segment_account(lean: Any, M: int, reps: int = 10, warm: int = 2) -> dict[str, float]:
    """GPU seconds per decode step of the per-layer graphs by kind (attention + router segments,
    experts, head), each graph timed by events inside a full step replayed in CAPTURE ORDER. The
    graphs share one memory pool: a graph's scratch may hold a later graph's input between their
    replays, so replaying one graph on its own (out of order) overwrites another's inputs (on
    Phi-3.5-MoE that fed garbage expert ids to the experts graph: an index out of bounds)."""
    import torch

    order = [(f"seg{s}", lean._graphs[s]) for s in range(M)]
    order = [x for s in range(M) for x in (order[s], (f"exp{s}", lean._egraphs[s]))] + [("head", lean._graphs[M])]
    per: dict[str, list[float]] = {name: [] for name, _ in order}
    for rep in range(warm + reps):
        evs = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in order]
        for (_, g), (a, b) in zip(order, evs):
            a.record(); g.replay(); b.record()
        torch.cuda.synchronize()
        if rep >= warm:
            for (name, _), (a, b) in zip(order, evs):
                per[name].append(a.elapsed_time(b) / 1e3)
    med = {name: sorted(v)[len(v) // 2] for name, v in per.items()}
    return {"attn_router_s": sum(med[f"seg{s}"] for s in range(M)),
            "experts_s": sum(med[f"exp{s}"] for s in range(M)), "head_s": med["head"]}


def first_divergence(a: list[int], b: list[int]) -> int | None:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)


def max_rel(a: list[Any], b: list[Any]) -> float:
    return max(float((x - y).abs().max() / (y.abs().max() + 1e-6)) for x, y in zip(a, b))


# =============================================================================== one shape
def run_shape(sh: dict[str, Any], args: argparse.Namespace, rows_path: Path, out_dir: Path) -> None:
    import torch

    from runtime.lean import ExecutorExperts, GroupedExperts, Int4Experts, LeanModel, int4_reference
    from runtime.models import load_model

    smoke = args.smoke
    dev = torch.device("cpu" if smoke else "cuda")
    card = "cpu" if smoke else torch.cuda.get_device_name(0)
    hw = args.hardware or ("h200" if smoke else hardware_of(card))
    base = {"card": card, "hardware": hw, "model": sh["name"], "date": args.date, "torch": torch.__version__}
    import transformers

    base["transformers"] = transformers.__version__

    def emit(**row: Any) -> None:
        r = {**base, **row}
        with open(rows_path, "a") as f:
            f.write(json.dumps(r, default=str) + "\n")
        log(f"{sh['name']} {row.get('path')}: " + ", ".join(
            f"{k}={v * 1e3:.3f}ms" if isinstance(v, float) and k.endswith("_s") else f"{k}={v}"
            for k, v in row.items() if k in ("tpot_s", "gpu_s", "kernel_floor_s", "exposed_host_per_layer_s", "status")))

    t0 = time.perf_counter()
    src = str(ROOT / sh["source"]) if sh.get("source") else sh["preset"]
    dtype = "float32" if smoke else "bfloat16"
    lm = load_model(src, layers=sh.get("layers"), dtype=dtype, device=dev, attn_implementation="sdpa")
    M, E, k = lm.shape.num_moe_layers, lm.shape.num_experts, lm.shape.top_k
    base.update(moe_layers=M, experts=E, top_k=k)
    log(f"{sh['name']}: loaded in {time.perf_counter() - t0:.1f} s ({M} MoE layers x {E} experts, top-{k})")
    gen = torch.Generator().manual_seed(0)
    vocab = int(lm.config.vocab_size)
    prompt = torch.randint(3, vocab, (PROMPT,), generator=gen).tolist()
    floors = modelled_floor(sh, hw, PROMPT + DECODE // 2, k)
    roof = floors["floor_s"]
    base["roofline_floor_s"] = roof
    emit(path="modelled-floor", engine=None, resident=True, status="ok", **floors)
    mods = [h.experts for h in lm.moe_handles]
    cfg = lm.model.config

    # ---- transformers' own resident forward
    hf: dict[str, float] = {}
    ref_logits = ref_toks = None  # transformers' eager experts loop, dynamic cache: the reference
    hf_logits: dict[str, list[Any]] = {}
    for impl in ("eager", "batched_mm", "grouped_mm"):
        for cache_kind in ("dynamic", "static"):
            if smoke and impl == "grouped_mm":
                continue
            try:
                cfg._experts_implementation = impl
                times, lg, toks_hf = decode_times(hf_stepper(lm.model, cache_kind, MAX_LEN), prompt, DECODE, dev, ref_toks)
                if ref_toks is None:
                    ref_logits, ref_toks = lg, toks_hf
                hf_logits[f"{impl}/{cache_kind}"] = lg
                hf[f"{impl}/{cache_kind}"] = tpot(times)
                emit(path=f"transformers-{impl}-{cache_kind}", engine="transformers", resident=True, status="ok",
                     tpot_s=tpot(times), tpot_median_s=sorted(times)[len(times) // 2])
            except Exception as e:  # noqa: BLE001 - a reference that does not run is a row, not a crash
                emit(path=f"transformers-{impl}-{cache_kind}", engine="transformers", resident=True, status="failed",
                     reason=f"{type(e).__name__}: {e}"[:300])
    cfg._experts_implementation = "eager"
    best = min(hf.items(), key=lambda x: x[1]) if hf else (None, float("nan"))

    # ---- lean resident: kernels, the one-graph floor, per-layer graphs
    kernel = args.experts_kernel
    floor_s = float("nan")
    try:
        experts = GroupedExperts(mods, kernel)
        lean = LeanModel(lm, max_len=MAX_LEN, experts=experts, graphs=not smoke)
        times, lg, toks = decode_times(lean.forward, prompt, DECODE, dev, ref_toks)
    except Exception as e:  # noqa: BLE001
        log(f"grouped_mm path failed ({type(e).__name__}: {e}); trying gather_bmm")
        (out_dir / f"trace-{sh['name']}-grouped.txt").write_text(traceback.format_exc())
        kernel = "gather_bmm"
        experts = GroupedExperts(mods, kernel)
        lean = LeanModel(lm, max_len=MAX_LEN, experts=experts, graphs=not smoke)
        times, lg, toks = decode_times(lean.forward, prompt, DECODE, dev, ref_toks)
    diff = max_rel(lg, ref_logits) if ref_logits else float("nan")
    bmm = hf_logits.get("batched_mm/dynamic")
    diff_bmm = max_rel(lg, bmm) if bmm else float("nan")
    if not smoke:
        try:
            with torch.inference_mode():  # the cache and weights are inference tensors
                lean.capture_step()
            floor_s = gpu_time(lambda: lean.step_graph.replay())
            base["kernel_floor_s"] = floor_s
            acc = segment_account(lean, M)
            emit(path="kernel-floor", engine="graphed", resident=True, status="ok", kernel_floor_s=floor_s, gpu_s=floor_s,
                 experts_kernel=kernel, floor_over_roofline=floor_s / roof,
                 floor_over_bytes_roofline=floor_s / floors["floor_bytes_s"], **acc)
        except Exception as e:  # noqa: BLE001
            (out_dir / f"trace-{sh['name']}-floor.txt").write_text(traceback.format_exc())
            emit(path="kernel-floor", engine="graphed", resident=True, status="failed", reason=f"{type(e).__name__}: {e}"[:300])
        try:
            from torch.profiler import ProfilerActivity, profile

            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(5):
                    lean.step_graph.replay()
                torch.cuda.synchronize()
            (out_dir / f"kernels-{sh['name']}.txt").write_text(
                prof.key_averages().table(sort_by="cuda_time_total", row_limit=30))
        except Exception as e:  # noqa: BLE001
            log(f"profiler: {e}")
    t_graphed = tpot(times)
    emit(path="lean-grouped", engine="graphed" if not smoke else "eager", resident=True, status="ok", tpot_s=t_graphed,
         tpot_median_s=sorted(times)[len(times) // 2], experts_kernel=kernel, read_routing=True,
         exposed_host_per_layer_s=(t_graphed - floor_s) / M, max_rel_logit_diff_vs_transformers=diff,
         max_rel_logit_diff_vs_transformers_batched_mm=diff_bmm,
         transformers_best=best[0], transformers_best_tpot_s=best[1], speedup_vs_transformers=best[1] / t_graphed)
    if not smoke:
        lean.read_routing = False
        times, _, free = decode_times(lean.forward, prompt, DECODE, dev)  # free-running: its own tokens
        emit(path="lean-grouped-async-routing", engine="graphed", resident=True, status="ok", tpot_s=tpot(times),
             free_run_first_divergence=first_divergence(free, ref_toks) if ref_toks else None,
             experts_kernel=kernel, read_routing=False, exposed_host_per_layer_s=(tpot(times) - floor_s) / M)
    if not smoke:
        try:
            plain = LeanModel(lm, max_len=MAX_LEN, experts=experts, graphs=False)
            times, _, _ = decode_times(plain.forward, prompt, DECODE, dev, ref_toks)
            emit(path="lean-grouped-no-graphs", engine="eager", resident=True, status="ok", tpot_s=tpot(times),
                 experts_kernel=kernel, exposed_host_per_layer_s=(tpot(times) - floor_s) / M)
            del plain
        except Exception as e:  # noqa: BLE001
            emit(path="lean-grouped-no-graphs", engine="eager", resident=True, status="failed", reason=f"{type(e).__name__}: {e}"[:300])
    del lean, experts
    if not smoke:
        torch.cuda.empty_cache()

    # ---- the INT4 draft: one graph per token, routing to a pinned ELB
    if not smoke:
        try:
            t1 = time.perf_counter()
            q = Int4Experts(mods, group_size=128)
            ref = int4_reference(mods[:1], group_size=128)
            hcheck = torch.randn(1, lm.config.hidden_size, dtype=torch.bfloat16, device=dev, generator=None)
            idx = torch.randperm(E, device=dev)[:k].reshape(1, k)
            wts = torch.softmax(torch.randn(1, k, device=dev), -1).to(torch.bfloat16)
            with torch.inference_mode():
                a, b = q(0, hcheck, idx, wts), ref(0, hcheck, idx, wts)
            int4_err = float((a.float() - b.float()).norm() / (b.float().norm() + 1e-9))
            del ref
            draft = LeanModel(lm, max_len=MAX_LEN, experts=q, graphs=True)
            with torch.inference_mode():
                draft.forward_eager(torch.tensor([prompt], device=dev), 0, PROMPT)
                draft.capture_step()
            elb = torch.zeros((DECODE, M, 2 * k), dtype=torch.float32, pin_memory=True)
            pos = [PROMPT]

            def one():
                draft.step_one_graph(min(pos[0], MAX_LEN - 1), elb[pos[0] % DECODE])
                pos[0] += 1

            d_gpu = gpu_time(one, reps=20, warm=2)
            torch.cuda.synchronize()
            tw = time.perf_counter()
            for _ in range(DECODE - 4):
                one()
            draft.step_event.synchronize()
            d_wall = (time.perf_counter() - tw) / (DECODE - 4)
            ok_ids = bool(((elb[:, :, :k] >= 0) & (elb[:, :, :k] < E)).all())
            emit(path="draft-int4", engine="graphed", resident=True, status="ok", gpu_s=d_gpu, tpot_s=d_wall,
                 draft_over_target_floor=d_gpu / floor_s, draft_over_graphed_tpot=d_gpu / t_graphed,
                 draft_modelled_floor_s=floors["draft_floor_s"], int4_rel_err_vs_dequant_ref=int4_err,
                 int4_bytes=q.nbytes, elb_ids_valid=ok_ids, setup_s=time.perf_counter() - t1)
            del draft, q
            torch.cuda.empty_cache()
        except Exception as e:  # noqa: BLE001
            (out_dir / f"trace-{sh['name']}-draft.txt").write_text(traceback.format_exc())
            emit(path="draft-int4", engine="graphed", resident=True, status="failed", reason=f"{type(e).__name__}: {e}"[:300])

    # ---- the executor (host controller + experts loop): resident and offloaded, both engines
    from runtime.executor import RunConfig
    from runtime.offloaded import OffloadedModel
    from sim.policies import EVICTION, PREFETCH

    total = M * E
    t1 = time.perf_counter()
    try:
        om = OffloadedModel(lm, max_slots=total, host_memory="pinned")
    except Exception as e:  # noqa: BLE001
        (out_dir / f"trace-{sh['name']}-executor.txt").write_text(traceback.format_exc())
        emit(path="executor-resident", engine="eager", resident=True, status="failed", reason=f"{type(e).__name__}: {e}"[:300])
        return
    log(f"{sh['name']}: executor set up in {time.perf_counter() - t1:.1f} s (host store {om.store.total_bytes / 1e9:.2f} GB)")
    ex = ExecutorExperts(om)
    try:
        lean_ex = LeanModel(lm, max_len=MAX_LEN, experts=ex, layer_start=ex.layer_start, graphs=not smoke)
    except Exception:  # noqa: BLE001 - its rows say why; the eager executor rows still run
        (out_dir / f"trace-{sh['name']}-lean-executor.txt").write_text(traceback.format_exc())
        lean_ex = None
    hf_step = hf_stepper(lm.model, "dynamic", MAX_LEN)
    budget = max(k, total // 2)
    for slots, resident in ((total, True), (budget, False)):
        for engine, step in (("eager", hf_step), ("graphed", lean_ex.forward if lean_ex else None)):
            if step is None:
                emit(path="executor", engine=engine, resident=resident, status="failed", reason="lean model not built")
                continue
            if smoke and engine == "graphed":
                engine = "eager-lean"
            rc = RunConfig(eviction=EVICTION.create("lru"), prefetch=PREFETCH.create("none"), slots=slots, timeline=False)
            run = om.start_run(rc)
            if resident:
                om.preload(run, range(total))
            state = {"i": 0}

            def exec_step(ids, start, run=run, step=step, state=state):
                run.begin_step(0, state["i"], ids.shape[1])
                out = step(ids, start)
                run.end_step()
                state["i"] += 1
                return out

            try:
                run.request_start(0)
                times, lg, _ = decode_times(exec_step, prompt, DECODE, dev, ref_toks)
                run.request_end(0)
                om.end_run()
                t = tpot(times)
                emit(path=f"executor-{'resident' if resident else f'{slots}slots'}", engine=engine, resident=resident,
                     status="ok", tpot_s=t, slots=slots, hits=run.hits, misses=run.misses, copies=run.copies,
                     exposed_host_per_layer_s=(t - floor_s) / M if resident else None,
                     max_rel_logit_diff_vs_transformers=max_rel(lg, ref_logits) if ref_logits else None)
            except Exception as e:  # noqa: BLE001
                (out_dir / f"trace-{sh['name']}-{engine}-{slots}.txt").write_text(traceback.format_exc())
                if om.run is not None:
                    om.run = None
                emit(path=f"executor-{'resident' if resident else f'{slots}slots'}", engine=engine, resident=resident,
                     status="failed", slots=slots, reason=f"{type(e).__name__}: {e}"[:300])
    om.close()
    log(f"{sh['name']}: done in {time.perf_counter() - t0:.1f} s")


# =============================================================================== summary
def summary(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    f = lambda v, fmt="{:.3f}": "-" if v is None or v != v else fmt.format(v)  # noqa: E731
    ms = lambda v: f(None if v is None else v * 1e3)  # noqa: E731
    L = [f"# Lean decode path on {meta.get('card')} ({meta.get('hardware')})", "",
         f"{meta.get('date')}, torch {meta.get('torch')}, transformers {meta.get('transformers')}; command: "
         f"`{meta.get('command')}`; card ceilings measured here: {json.dumps(meta.get('ceilings', {}))}", ""]
    shapes = list(dict.fromkeys(r["model"] for r in rows))
    L += ["| shape | (a) kernel floor ms | (b) modelled floor ms | a/b | transformers best ms | graphed TPOT ms | "
          "(d) graphed host/layer us | eager (executor) TPOT ms | (d) eager host/layer us | graphed via executor ms | "
          "offloaded 50% eager / graphed ms | (e) draft ms/token (GPU) | draft / target floor |", "|" + "---|" * 13]
    for s in shapes:
        rs = [r for r in rows if r["model"] == s]
        get = lambda path, engine=None: next((r for r in rs if r.get("path") == path and (engine is None or r.get("engine") == engine)  # noqa: E731
                                               and r.get("status") == "ok"), {})
        fl, mf, lg = get("kernel-floor"), get("modelled-floor"), get("lean-grouped")
        ee, eg = get("executor-resident", "eager"), get("executor-resident", "graphed")
        off = [r for r in rs if str(r.get("path", "")).startswith("executor-") and not r.get("resident") and r.get("status") == "ok"]
        oe = next((r for r in off if r["engine"] == "eager"), {})
        og = next((r for r in off if r["engine"] == "graphed"), {})
        dr = get("draft-int4")
        a, b = fl.get("kernel_floor_s"), mf.get("floor_s")
        L.append(f"| {s} | {ms(a)} | {ms(b)} | {f(a / b if a and b else None, '{:.2f}')} | "
                 f"{ms(lg.get('transformers_best_tpot_s'))} ({lg.get('transformers_best', '-')}) | {ms(lg.get('tpot_s'))} | "
                 f"{f((lg.get('exposed_host_per_layer_s') or float('nan')) * 1e6, '{:.0f}')} | {ms(ee.get('tpot_s'))} | "
                 f"{f((ee.get('exposed_host_per_layer_s') or float('nan')) * 1e6, '{:.0f}')} | {ms(eg.get('tpot_s'))} | "
                 f"{ms(oe.get('tpot_s'))} / {ms(og.get('tpot_s'))} | {ms(dr.get('gpu_s'))} | "
                 f"{f(dr.get('draft_over_target_floor'), '{:.2f}')} |")
    L += ["", "Failed rows:", ""]
    L += [f"- {r['model']} {r.get('path')} ({r.get('engine')}): {r.get('reason')}" for r in rows if r.get("status") == "failed"] or ["- none"]
    return "\n".join(L) + "\n"


# =============================================================================== main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "gpu_lean_out"))
    ap.add_argument("--smoke", action="store_true", help="the tiny preset on the CPU (no graphs), seconds")
    ap.add_argument("--shapes", default="", help="comma list of shape names (default: all)")
    ap.add_argument("--hardware", default=None, help="hardware preset (default: from the card's name)")
    ap.add_argument("--experts-kernel", default="grouped_mm", choices=["grouped_mm", "gather_bmm"],
                    help="the resident experts' kernel (grouped_mm falls back to gather_bmm if it fails)")
    ap.add_argument("--budget-s", type=float, default=450.0, help="stop starting shapes after this many seconds")
    ap.add_argument("--job", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--date", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows_path = out / "results.jsonl"
    shapes = SMOKE if args.smoke else SHAPES
    if args.shapes:
        want = set(args.shapes.split(","))
        unknown = want - {s["name"] for s in shapes}
        if unknown:
            print(f"--shapes: unknown {sorted(unknown)}; known: {[s['name'] for s in shapes]}", file=sys.stderr)
            return 2
        shapes = [s for s in shapes if s["name"] in want]
    if args.job:
        sh = next(s for s in shapes if s["name"] == args.job)
        if args.smoke:
            import torch

            torch.set_num_threads(1)
        run_shape(sh, args, rows_path, out)
        return 0

    import torch
    import transformers

    meta: dict[str, Any] = {"date": _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat(),
                            "host": platform.node(), "torch": torch.__version__, "transformers": transformers.__version__,
                            "command": " ".join(["python3", "benchmarks/gpu_lean.py", *(argv if argv is not None else sys.argv[1:])])}
    code = identify(meta, args.smoke, args.hardware)
    if code:
        return code
    done = measured_models(rows_path, meta["card"])
    todo = [s for s in shapes if s["name"] not in done]
    log(f"card {meta['card']} -> hardware={meta['hardware']}; planned device time: ~{sum(s['est_s'] for s in todo) + 15} s "
        f"for {[s['name'] for s in todo]} (skipping {sorted(done)}: rows exist)")
    if not args.smoke:
        meta["ceilings"] = card_ceilings()
        log(f"card ceilings: {meta['ceilings']}")
    t_start = time.monotonic()
    for sh in todo:
        left = args.budget_s - (time.monotonic() - t_start)
        if left < sh["est_s"] * 0.6:
            log(f"{sh['name']}: skipped ({left:.0f} s left of the budget; a rerun picks it up)")
            continue
        cmd = [sys.executable, str(Path(__file__).resolve()), "--job", sh["name"], "--out", str(out), "--date", meta["date"]]
        if args.smoke:
            cmd.append("--smoke")
        if args.hardware:
            cmd += ["--hardware", args.hardware]
        r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=max(60, left),
                           env={**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")})
        (out / f"log-{sh['name']}.txt").write_text(r.stdout)
        sys.stdout.write("".join(x + "\n" for x in r.stdout.splitlines() if x.startswith("[")))
        if r.returncode != 0:
            log(f"{sh['name']}: exit {r.returncode}: " + " | ".join(r.stdout.strip().splitlines()[-4:]))
    rows = [json.loads(x) for x in rows_path.read_text().splitlines()] if rows_path.is_file() else []
    rows = [r for r in rows if r.get("card") == meta["card"]]
    (out / "meta.json").write_text(json.dumps(meta, indent=1, default=str))
    text = summary(rows, meta)
    (out / "summary.md").write_text(text)
    try:
        import pandas as pd

        pd.DataFrame(rows).to_parquet(out / "results.parquet")
    except Exception as e:  # noqa: BLE001
        log(f"parquet: {e}")
    print(text)
    return 0


if __name__ == "__main__":
    from traces.cli import run_cli

    sys.exit(run_cli(main))
