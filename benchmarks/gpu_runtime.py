"""GPU runtime benchmark: measured offloaded decoding next to the simulator's prediction and the bound.

One command does the whole measurement (about 4-6 minutes on the H200):

    . .gpu/prelude.sh; python3 benchmarks/gpu_runtime.py --out $OUT

For each shape, in its own process (one shape per process: built directly in bf16 on the GPU, its
experts then packed into pinned host memory):

- depth-reduced Mixtral-8x7B (4 layers) and Phi-3.5-MoE (4 layers), Qwen3-30B-A3B (8 layers),
  each replaying a seeded synthetic trace of its preset (2 requests x (16 prompt + 24 decode));
  the project's own small MoE (model=small-moe) replaying traces/data/small-moe.parquet (its first
  2 requests, cut to 96 tokens);
- expert budgets: a global slot pool holding 25% and 50% of all routed experts (cache.slots);
- policies lru (on-demand, the Mixtral-offloading design), lookahead (depth-1 gate lookahead,
  recorded predictor), history (MoE-Infinity-style), oracle; 3 repetitions each;
- beside each config: the simulator's prediction for the same config (hardware=h200, no
  calibration) and the bound, both from `sim`;
- references: all experts resident (the executor's own experts path, no transfers) against the
  simulator's compute floor, and Hugging Face accelerate's device_map offload of the same model
  (experts in pageable host memory, moved every forward) for a few tokens, against the simulator's
  `stream` policy with pageable host memory.

Reported per config: tokens/s (mean and spread over repetitions), TPOT, hit rate, link utilisation
(busy share, and achieved bytes/s over the run against the measured pinned bandwidth), copy
bandwidth while copying, stall share, the simulator's numbers, measured/simulated speed-ups over
lru, and where measurement and prediction differ by more than 10%, the term that differs most
(attention+router, stall, experts, head compute spans; per-copy link time; host decision gaps).

Output under --out (few, small files): results.parquet (every row: measured, sim, references),
results.json, summary.md, run.log. ``--smoke``: the tiny preset (and small-moe cut short) on the
CPU in seconds; the CI test runs it.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import platform
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

POLICIES = ["lru", "lookahead", "history", "oracle"]
FRACTIONS = (0.25, 0.5)
TERMS = ("attn+router", "stall", "experts", "head")


def shapes(smoke: bool) -> list[dict[str, Any]]:
    if smoke:
        return [
            {"name": "tiny", "model": "tiny", "layers": None, "synth": (1, 4, 6)},
            {"name": "small-moe", "model": "small-moe", "layers": None, "trace": "traces/data/small-moe.parquet",
             "requests": 1, "tokens": 72},  # request 0: 64 prompt tokens, then 8 decode steps
        ]
    return [
        {"name": "mixtral-8x7b-L4", "model": "mixtral-8x7b", "layers": 4, "synth": (2, 16, 24)},
        {"name": "phi-3.5-moe-L4", "model": "phi-3.5-moe", "layers": 4, "synth": (2, 16, 24)},
        {"name": "qwen3-30b-a3b-L8", "model": "qwen3-30b-a3b", "layers": 8, "synth": (2, 16, 24)},
        {"name": "small-moe", "model": "small-moe", "layers": None, "trace": "traces/data/small-moe.parquet",
         "requests": 2, "tokens": 96},
    ]


# =============================================================================== one shape
def cut_trace(path: Path, requests: int, tokens: int, out: Path) -> Path:
    """The first ``requests`` requests of a trace, each cut to its first ``tokens`` tokens."""
    import numpy as np

    from traces import read_trace, write_trace

    tr = read_trace(path).select_requests(list(range(requests)))
    T = min(tokens, tr.max_tokens)
    tr.lengths = np.minimum(tr.lengths, T).astype(tr.lengths.dtype)
    for name in ("position", "step", "phase", "expert_ids", "gate_weights", "draft", "draft_match"):
        a = getattr(tr, name)
        if a is not None:
            setattr(tr, name, np.ascontiguousarray(a[:, :T]))
    tr.lookahead = {d: np.ascontiguousarray(a[:, :T]) for d, a in tr.lookahead.items()}
    tr.meta = {**tr.meta, "cut": {"from": str(path), "requests": requests, "tokens": T}}
    tr.check_shapes()
    return write_trace(tr, out)


def compose_run(overrides: list[str]):
    from hydra import compose, initialize_config_dir

    from runtime.__main__ import register_configs
    from sim.presets import conf_dir

    register_configs()
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        return compose(config_name="run", overrides=overrides)


def span_terms(log: Any) -> dict[str, float]:
    """Seconds per compute-span kind, mean per-copy link seconds, copies."""
    out = {t: 0.0 for t in TERMS}
    for a, b, name in log.compute_spans or []:
        kind = name.replace("verify ", "").split(" ")[0]
        if kind in out:
            out[kind] += b - a
    cs = log.copy_spans or []
    out["copy_each"] = sum(b - a for a, b, _, _ in cs) / len(cs) if cs else float("nan")
    return out


def explain(meas: dict[str, float], sim: dict[str, float], m_e2e: float, s_e2e: float) -> str:
    """The term whose measured - simulated difference is largest, with its share of the e2e gap."""
    diffs = {t: meas.get(t, 0.0) - sim.get(t, 0.0) for t in TERMS}
    t = max(diffs, key=lambda x: abs(diffs[x]))
    gap = m_e2e - s_e2e
    share = diffs[t] / gap if gap else float("nan")
    txt = f"{t} {diffs[t] * 1e3:+.1f} ms ({share:.0%} of the {gap * 1e3:+.1f} ms e2e gap)"
    ce_m, ce_s = meas.get("copy_each"), sim.get("copy_each")
    if t == "stall" and ce_m and ce_s and math.isfinite(ce_m) and math.isfinite(ce_s):
        txt += f"; one copy {ce_m * 1e3:.3f} ms measured vs {ce_s * 1e3:.3f} ms modelled"
    return txt


def log_line(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def save_part(rows: list[dict[str, Any]], part: Path | None) -> None:
    """The child's rows so far (a killed child still leaves what it measured)."""
    if part is None:
        return
    part.parent.mkdir(parents=True, exist_ok=True)
    tmp = part.with_suffix(".tmp")
    tmp.write_text(json.dumps(rows, default=_jsonable))
    os.replace(tmp, part)


def run_shape(sh: dict[str, Any], args: argparse.Namespace, deadline: float, part: Path | None = None) -> list[dict[str, Any]]:
    """Everything measured on one shape (called in its own process)."""
    import numpy as np
    import torch

    from runtime.executor import RunConfig
    from runtime.measure import Session, measured_row, run_log
    from runtime.replay import replay
    from sim.policies import EVICTION, PREFETCH
    from sim.run import base_keys, config_id, load_policy, run_policy

    dev = "cpu" if args.smoke else "cuda"
    over = [f"model={sh['model']}", "hardware=h200", f"device={dev}", f"repetitions={args.repetitions}",
            "policy=baselines", f"policy.suite=[{','.join(args.policies)}]", f"warmup_steps={args.warmup_steps}"]
    if sh.get("layers"):
        over.append(f"model.layers={sh['layers']}")
    if "synth" in sh:
        R, P, D = sh["synth"]
        over += [f"trace.requests={R}", f"trace.prompt_tokens={P}", f"trace.decode_tokens={D}"]
    else:
        tmp = Path(args.tmp)
        tmp.mkdir(parents=True, exist_ok=True)
        cut = cut_trace(ROOT / sh["trace"], sh["requests"], sh["tokens"],
                        tmp / f"{sh['name']}-{sh['requests']}x{sh['tokens']}.parquet")
        over.append(f"trace.path={cut}")
    cfg0 = compose_run(over + ["cache.slots=2"])
    from sim.spec import ModelSpec

    spec = ModelSpec.from_cfg(cfg0.model)
    total = spec.num_routed_experts_total
    t0 = time.perf_counter()
    sess = Session(cfg0, max_slots=total)  # the pool holds every expert (for the resident reference)
    log_line(f"{sh['name']}: setup {time.perf_counter() - t0:.1f} s (model {sess.load_s:.1f} s, pinned host store "
             f"{sess.om.store.total_bytes / 1e9:.2f} GB by {sess.om.store.pinned or 'none'}), "
             f"copy {sess.h2d_gbps:.1f} GB/s, peak host {peak_gb():.1f} GB")
    shape_info = {"shape": sh["name"], "setup_s": sess.setup_s, "load_s": sess.load_s,
                  "host_store_gb": sess.om.store.total_bytes / 1e9, "pinned_by": sess.om.store.pinned or None,
                  "h2d_gbps_measured": sess.h2d_gbps, "expert_mib": sess.om.nbytes / 2**20,
                  "experts_total": total, "peak_host_gb_after_setup": peak_gb()}
    rows: list[dict[str, Any]] = []
    try:
        for frac in args.fractions:
            slots = max(spec.top_k, int(round(frac * total)))
            cfg = compose_run(over + [f"cache.slots={slots}"])
            logs: dict[str, Any] = {}

            def on_run(p, run, log, row, logs=logs):
                if log.compute_spans is not None:
                    logs[p.name] = log

            t1 = time.perf_counter()
            got = sess.measure(cfg, on_run=on_run, deadline=deadline, timeline=True)
            prep = sess.prepare(cfg)
            for r in got:
                r.update(shape=sh["name"], budget=frac, **{k: v for k, v in shape_info.items() if k != "shape"})
                if r["source"] == "measured" and r["status"] == "ok":
                    r["link_bw_util"] = (r["gb_moved"] / r["e2e_s"]) / sess.h2d_gbps if sess.h2d_gbps == sess.h2d_gbps else float("nan")
            # the terms of the simulated and measured timelines (last repetition)
            for name, mlog in logs.items():
                p = load_policy(name)
                try:
                    _, (sim, slog) = run_policy(prep, p, int(cfg.seed), timeline=True, plan=sess.plan(cfg, p))
                except Exception as e:  # noqa: BLE001 - the measurement stands without its terms
                    log_line(f"{sh['name']} {name}: simulator timeline failed: {e}")
                    continue
                mt, st = span_terms(mlog), span_terms(slog)
                why = explain(mt, st, mlog.run_time, slog.run_time)
                for r in got:
                    if r["policy"] == name:
                        src = mt if r["source"] == "measured" else st
                        for t in TERMS:
                            r[f"term_{t}_ms"] = src[t] * 1e3
                        r["copy_each_ms"] = src["copy_each"] * 1e3
                        r["explain"] = why
            rows += got
            save_part(rows, part)
            ok = [r for r in got if r["source"] == "measured" and r["status"] == "ok"]
            log_line(f"{sh['name']} {frac:.0%} ({slots} slots): {len(ok)} measured runs in {time.perf_counter() - t1:.1f} s")
        # --- reference: every expert resident (no transfers): the executor's compute floor
        if time.monotonic() < deadline:
            cfg = compose_run(over + [f"cache.slots={total}"])
            prep = sess.prepare(cfg)
            keys = {**base_keys(cfg), "policy": "resident", "eviction": "lru", "prefetch": "none", "predictor": None}
            rc = RunConfig(eviction=EVICTION.create("lru"), prefetch=PREFETCH.create("none"), slots=total,
                           schedule=prep.schedule, decision_delay_s=float(cfg.hardware.decision_delay_s))
            run = sess.om.start_run(rc)
            sess.om.preload(run, range(total))
            replay(sess.om, run, prep.trace, prep.schedule, seed=int(cfg.seed))
            sess.om.end_run()
            from sim.run import bound_for

            log = run_log(run, timeline=False)
            row = measured_row(log, bound_for(prep, prep.schedule, run.cache.pool_of, run.cache.capacity), sess.om, run)
            sch, dd = prep.schedule, float(cfg.hardware.decision_delay_s)
            dec = [i for i, s in enumerate(sch.steps) if s.phase == 1]
            floor = float(np.mean([sch.compute_time(i, dd) for i in dec])) * 1e3 if dec else float("nan")
            rows.append({**keys, "config_id": config_id(keys), "source": "measured", "status": "ok", "reason": "",
                         "repetition": 0, **row, "shape": sh["name"], "budget": 1.0, "sim_compute_floor_tpot_ms": floor,
                         **{k: v for k, v in shape_info.items() if k != "shape"}})
            save_part(rows, part)
            log_line(f"{sh['name']} resident: TPOT {row['tpot_ms']:.2f} ms measured, compute floor {floor:.2f} ms modelled")
        # --- reference: accelerate device_map offload (a sanity check; last: it consumes the offloaded model)
        if args.accelerate and time.monotonic() < deadline - 20:
            rows += accelerate_reference(sess, cfg0, sh, args, shape_info)
    finally:
        try:
            sess.close()
        except Exception:  # noqa: BLE001
            pass
    return rows


def accelerate_reference(sess: Any, cfg: Any, sh: dict[str, Any], args: argparse.Namespace,
                         shape_info: dict[str, Any]) -> list[dict[str, Any]]:
    """Hugging Face accelerate's device_map offload of the same model: the experts modules on "cpu"
    (pageable memory, moved to the GPU at every forward), everything else on the GPU."""
    import torch

    from sim.run import base_keys, config_id, load_policy, run_policy

    keys = {**base_keys(cfg), "policy": "accelerate", "eviction": None, "prefetch": "stream", "predictor": None}
    base = {**keys, "config_id": config_id(keys), "source": "measured", "repetition": 0, "shape": sh["name"],
            "budget": 0.0, **{k: v for k, v in shape_info.items() if k != "shape"}}
    om, model = sess.om, sess.loaded.model
    if om.device.type != "cuda":
        return [{**base, "status": "skipped", "reason": "accelerate's offload is a GPU reference"}]
    try:
        from accelerate import dispatch_model

        om.restore_experts("cpu")
        om.close()
        experts = {id(m) for m in om.modules}
        dm: dict[str, Any] = {}
        for name, mod in model.named_modules():
            if not name:
                continue
            if id(mod) in experts:
                dm[name] = "cpu"
            elif any(True for _ in mod.parameters(recurse=False)) or any(True for _ in mod.buffers(recurse=False)):
                if not any(name.startswith(k + ".") for k, v in dm.items() if v == "cpu"):
                    dm[name] = 0
        dispatch_model(model, device_map=dm, main_device=0)
        from runtime.replay import _forward_kwargs, forward_step, new_cache

        extra = _forward_kwargs(model)
        P, D = 16, int(args.accelerate_tokens)
        ids = torch.randint(3, int(model.config.vocab_size), (1, P), device="cuda")
        pos = torch.arange(P, device="cuda").reshape(1, -1)
        cache = new_cache(model)
        times = []
        with torch.inference_mode():
            torch.cuda.synchronize()
            t = time.perf_counter()
            logits = forward_step(model, ids, pos, cache, extra)
            torch.cuda.synchronize()
            prefill = time.perf_counter() - t
            for i in range(D):
                nxt = logits.argmax(-1).reshape(1, 1)
                t = time.perf_counter()
                logits = forward_step(model, nxt, torch.tensor([[P + i]], device="cuda"), cache, extra)
                torch.cuda.synchronize()
                times.append(time.perf_counter() - t)
        tpot = sum(times) / len(times)
        row = {**base, "status": "ok", "reason": "", "tpot_ms": tpot * 1e3, "tokens_per_s": 1.0 / tpot,
               "ttft_ms": prefill * 1e3, "decode_tokens": D,
               "gb_moved": om.store.total_bytes / 1e9 * (D + 1), "note": "experts on 'cpu' in accelerate's device_map"}
        out = [row]
        # the simulator's whole-layer streaming from pageable memory: the same design
        try:
            scfg = compose_run([f"model={sh['model']}", "hardware=h200", "hardware.host_memory=pageable",
                                f"cache.slots={sess.spec.num_routed_experts_total}", "policy=stream",
                                "trace.requests=1", "trace.prompt_tokens=16", f"trace.decode_tokens={D + 1}"]
                               + ([f"model.layers={sh['layers']}"] if sh.get("layers") else []))
            prep = sess.prepare(scfg)
            p = load_policy("stream")
            srow, _ = run_policy(prep, p, 0, plan=sess.plan(scfg, p))
            k2 = {**base_keys(scfg), "policy": "stream", "eviction": p.eviction, "prefetch": p.prefetch, "predictor": None}
            out.append({**k2, "config_id": config_id(k2), "source": "sim", "status": "ok", "reason": "", "repetition": 0,
                        **srow, "shape": sh["name"], "budget": 0.0, "note": "sim of accelerate's design (stream, pageable)"})
        except Exception as e:  # noqa: BLE001
            log_line(f"{sh['name']}: simulator stream reference failed: {e}")
        log_line(f"{sh['name']} accelerate offload: {tpot * 1e3:.0f} ms/token")
        return out
    except Exception as e:  # noqa: BLE001 - a sanity check must not sink the benchmark
        return [{**base, "status": "failed", "reason": f"{type(e).__name__}: {e}"}]


def preflight(device: str) -> dict[str, Any]:
    """A few seconds' check of the whole offloaded path on this device before the long shapes: a
    tiny Mixtral offloaded with top_k slots (every step copies) against the same model resident,
    eager experts loop (expected equal logits; bf16 tolerance 2e-2 absolute + 2e-2 relative)."""
    t = time.perf_counter()
    try:
        import torch

        from runtime.executor import RunConfig
        from runtime.offloaded import OffloadedModel
        from runtime.models import load_model
        from runtime.replay import live, reference_decode
        from sim.policies import EVICTION, PREFETCH

        prompts = [[5, 9, 17, 33, 2, 8, 11, 40, 3], [40, 41, 7]]
        ref = reference_decode(load_model("tiny-mixtral", device=device, experts_implementation="eager").model, prompts, 6)
        lm = load_model("tiny-mixtral", device=device, experts_implementation="eager")
        om = OffloadedModel(lm, max_slots=lm.shape.num_moe_layers * lm.shape.num_experts)
        run = om.start_run(RunConfig(eviction=EVICTION.create("lru"), prefetch=PREFETCH.create("none"), slots=lm.shape.top_k))
        out = live(om, run, prompts, 6, keep_logits=True)
        om.end_run()
        om.close()
        diff = max(float((a - b).abs().max()) for la, lb in zip(out["logits"], ref["logits"]) for a, b in zip(la, lb))
        close = all(torch.allclose(a, b, atol=2e-2, rtol=2e-2) for la, lb in zip(out["logits"], ref["logits"])
                    for a, b in zip(la, lb))
        return {"ok": bool(close and out["tokens"] == ref["tokens"]), "max_abs_logit_diff": diff,
                "tokens_equal": out["tokens"] == ref["tokens"], "copies": run.copies, "pinned_by": om.store.pinned or None,
                "seconds": time.perf_counter() - t}
    except Exception as e:  # noqa: BLE001 - reported; the shapes run anyway and report their own errors
        return {"ok": False, "error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()[-1500:],
                "seconds": time.perf_counter() - t}


def peak_gb() -> float:
    from runtime.measure import peak_host_bytes

    return peak_host_bytes() / 1e9


# =============================================================================== orchestration
def write_outputs(rows: list[dict[str, Any]], out: Path, meta: dict[str, Any]) -> None:
    import pandas as pd

    from sim.report import write_results
    from traces.atomic import atomic_write

    if not rows:
        return
    df = pd.DataFrame(rows)
    write_results(rows, out, "results")
    text = summary_md(df, meta)

    def dump(tmp: str) -> None:
        Path(tmp).write_text(text)

    atomic_write(out / "summary.md", dump)


def _f(v: Any, fmt: str = "{:.1f}") -> str:
    try:
        if v is None or (isinstance(v, float) and not math.isfinite(v)):
            return "-"
        return fmt.format(v)
    except (TypeError, ValueError):
        return str(v)


def summary_md(df: Any, meta: dict[str, Any]) -> str:
    """The markdown summary: per shape and budget, measured vs simulated vs bound."""
    L = [f"# GPU runtime benchmark{' (smoke)' if meta.get('smoke') else ''}", "",
         f"- date: {meta['date']}", f"- machine: {meta.get('gpu', '-')}; host {meta['host']}; "
         f"python {meta['python']}, torch {meta.get('torch')}, transformers {meta.get('transformers')}",
         f"- command: `{meta['command']}`", f"- wall time: {meta.get('wall_s', float('nan')):.0f} s",
         "- simulator: hardware=h200 preset, no calibration; bound: Belady over the full future, transfers and compute "
         "fully overlapped (docs/metrics.md)",
         f"- preflight (tiny Mixtral, offloaded vs resident, bf16 on the GPU): "
         f"{json.dumps({k: v for k, v in (meta.get('preflight') or {}).items() if k != 'trace'})}",
         "- columns: meas/sim = measured tokens/s over simulated; link util = share of the run the copy stream is busy; "
         "link bytes/s vs pinned = bytes moved / run time / the measured pinned copy bandwidth (the 90% goal); "
         "largest term = the timeline term (attention+router, stall, experts, head) whose measured total differs most "
         "from the simulated one, shown where measured and simulated tokens/s differ by more than 10%", ""]
    if "shape" not in df.columns:
        return "\n".join(L + ["no rows"])
    for shape in dict.fromkeys(df["shape"]):
        d = df[df["shape"] == shape]
        s0 = d.iloc[0]
        L += [f"## {shape}", "",
              f"setup {_f(s0.get('setup_s'))} s (model build {_f(s0.get('load_s'))} s), pinned host store "
              f"{_f(s0.get('host_store_gb'), '{:.2f}')} GB ({s0.get('pinned_by')}), one expert {_f(s0.get('expert_mib'), '{:.2f}')} MiB, "
              f"measured pinned copy bandwidth {_f(s0.get('h2d_gbps_measured'))} GB/s, peak host memory "
              f"{_f(d['peak_host_gb'].max() if 'peak_host_gb' in d else float('nan'))} GB "
              f"(bounds: setup < 60 s {'met' if (s0.get('setup_s') or 1e9) < 60 else 'NOT met'}, "
              f"peak host < 64 GiB {'met' if (d['peak_host_gb'].max() if 'peak_host_gb' in d else 1e9) < 64 * 2**30 / 1e9 else 'NOT met'})", ""]
        lb = d[(d.policy == "lru") & (d.source == "measured") & (d.status == "ok") & (d["budget"] == 0.25)]
        if len(lb) and "link_bw_util" in lb and lb["link_bw_util"].notna().any():
            u = lb["link_bw_util"].mean()
            L += [f"Link while transfer-bound (on-demand LRU, 25% cache): {u:.1%} of the measured pinned bandwidth "
                  f"(goal >= 90%: {'met' if u >= 0.9 else 'not met'}); copy stream busy {lb['link_util'].mean():.1%} of the run, "
                  f"{lb['copy_gbps'].mean():.1f} GB/s while copying.", ""]
        for budget in sorted(b for b in dict.fromkeys(d["budget"]) if 0 < b < 1):
            db = d[d["budget"] == budget]
            L += [f"### cache holds {budget:.0%} of the experts ({int(db['slots'].dropna().iloc[0]) if 'slots' in db and db['slots'].notna().any() else '?'} slots)", "",
                  "| policy | tokens/s measured (mean ± sd, n) | tokens/s sim | tokens/s bound | meas/sim | speed-up over lru meas / sim "
                  "| hit rate meas / sim | link util meas / sim | link bytes/s vs pinned | copy GB/s | stall share meas / sim | largest term (meas - sim) |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
            meas_ok = db[(db.source == "measured") & (db.status == "ok")]
            sims = db[(db.source == "sim") & (db.status == "ok")]
            base_m = meas_ok[meas_ok.policy == "lru"]["tokens_per_s"].mean() if len(meas_ok) else float("nan")
            base_s = sims[sims.policy == "lru"]["tokens_per_s"].mean() if len(sims) else float("nan")
            for pol in dict.fromkeys(db["policy"]):
                m = meas_ok[meas_ok.policy == pol]
                s = sims[sims.policy == pol]
                bad = db[(db.policy == pol) & (db.status != "ok")]
                if m.empty:
                    why = "; ".join(sorted(set(f"{r.source} {r.status}: {r.reason}" for r in bad.itertuples())))
                    L.append(f"| {pol} | {why or '-'} |" + " |" * 10)
                    continue
                tm, sd = m["tokens_per_s"].mean(), m["tokens_per_s"].std(ddof=1) if len(m) > 1 else float("nan")
                ts = s["tokens_per_s"].mean() if len(s) else float("nan")
                tb = 1e3 / m["bound_tpot_ms"].mean() if m["bound_tpot_ms"].mean() > 0 else float("nan")
                ratio = tm / ts if ts == ts and ts > 0 else float("nan")
                flag = " **>10%**" if ratio == ratio and abs(ratio - 1) > 0.10 else ""
                expl = m["explain"].dropna().iloc[0] if "explain" in m and m["explain"].notna().any() else "-"
                L.append(
                    f"| {pol} | {_f(tm)} ± {_f(sd)} ({len(m)}) | {_f(ts)} | {_f(tb)} | {_f(ratio, '{:.2f}')}{flag} | "
                    f"{_f(tm / base_m, '{:.2f}')} / {_f(ts / base_s, '{:.2f}')} | "
                    f"{_f(m['hit_rate'].mean(), '{:.3f}')} / {_f(s['hit_rate'].mean() if len(s) else None, '{:.3f}')} | "
                    f"{_f(m['link_util'].mean(), '{:.2f}')} / {_f(s['link_util'].mean() if len(s) else None, '{:.2f}')} | "
                    f"{_f(m['link_bw_util'].mean() if 'link_bw_util' in m else None, '{:.2f}')} | {_f(m['copy_gbps'].mean())} | "
                    f"{_f(m['stall_share'].mean(), '{:.2f}')} / {_f(s['stall_share'].mean() if len(s) else None, '{:.2f}')} | "
                    f"{expl if flag else '-'} |")
            L.append("")
        ref = d[d["budget"].isin([0.0, 1.0])]
        if len(ref):
            L += ["References:", ""]
            for r in ref.itertuples():
                if r.status != "ok":
                    L.append(f"- {r.policy} ({r.source}): {r.status}: {r.reason}")
                elif r.policy == "resident":
                    L.append(f"- all experts resident (executor's experts path, no transfers): TPOT {_f(r.tpot_ms, '{:.2f}')} ms "
                             f"measured vs compute floor {_f(getattr(r, 'sim_compute_floor_tpot_ms', None), '{:.2f}')} ms modelled")
                elif r.policy == "accelerate":
                    L.append(f"- accelerate device_map offload (experts on 'cpu'): {_f(r.tpot_ms, '{:.0f}')} ms/token, "
                             f"{_f(r.tokens_per_s, '{:.2f}')} tokens/s")
                elif r.policy == "stream":
                    L.append(f"- simulator, whole-layer streaming from pageable memory (accelerate's design): "
                             f"{_f(r.tpot_ms, '{:.0f}')} ms/token")
            L.append("")
    return "\n".join(L)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "gpu_runtime_out"))
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU, seconds")
    ap.add_argument("--budget-s", type=float, default=330.0, help="wall-clock budget of the whole measurement")
    ap.add_argument("--repetitions", type=int, default=3)
    ap.add_argument("--policies", default=",".join(POLICIES))
    ap.add_argument("--fractions", default=",".join(str(f) for f in FRACTIONS))
    ap.add_argument("--shapes", default="", help="comma list of shape names (default: all)")
    ap.add_argument("--warmup-steps", type=int, default=-1, help="-1: a whole unmeasured pass over the trace first")
    ap.add_argument("--no-accelerate", dest="accelerate", action="store_false")
    ap.add_argument("--accelerate-tokens", type=int, default=2)
    ap.add_argument("--tmp", default="/tmp/moe-gpu-runtime")
    ap.add_argument("--job", default=None, help=argparse.SUPPRESS)  # one shape, in a child process
    ap.add_argument("--deadline", type=float, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.policies = [p for p in args.policies.split(",") if p]
    args.fractions = [float(f) for f in args.fractions.split(",") if f]
    out = Path(args.out)
    all_shapes = shapes(args.smoke)
    if args.shapes:
        want = set(args.shapes.split(","))
        all_shapes = [s for s in all_shapes if s["name"] in want]

    if args.job is not None:  # child: one shape, rows as JSON lines to the given file
        sh = next(s for s in all_shapes if s["name"] == args.job)
        if args.smoke:
            import torch

            torch.set_num_threads(1)
        deadline = time.monotonic() + (args.deadline or 1e9)
        part = Path(args.tmp) / f"part-{sh['name']}.json"
        rows = run_shape(sh, args, deadline, part)
        save_part(rows, part)
        return 0

    t_start = time.monotonic()
    out.mkdir(parents=True, exist_ok=True)
    meta = {"date": _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat(), "host": platform.node(),
            "python": platform.python_version(), "smoke": args.smoke,
            "command": " ".join(["python3", "benchmarks/gpu_runtime.py", *(argv if argv is not None else sys.argv[1:])])}
    try:
        import torch
        import transformers

        meta.update(torch=torch.__version__, transformers=transformers.__version__)
        if torch.cuda.is_available():
            meta["gpu"] = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    if not args.smoke and meta.get("gpu") is None:
        print("no CUDA GPU here: use --smoke for the CPU check", file=sys.stderr)
        return 2
    rows: list[dict[str, Any]] = []
    logf = open(out / "run.log", "w")
    meta["preflight"] = preflight("cpu" if args.smoke else "cuda")
    log_line(f"preflight (tiny Mixtral offloaded vs resident): {json.dumps({k: v for k, v in meta['preflight'].items() if k != 'trace'})}")
    if "trace" in meta["preflight"]:
        logf.write(meta["preflight"]["trace"] + "\n")
    for sh in all_shapes:
        left = args.budget_s - (time.monotonic() - t_start)
        if left < 25:
            rows.append({"shape": sh["name"], "source": "measured", "status": "skipped", "reason": "time budget spent"})
            continue
        part = Path(args.tmp) / f"part-{sh['name']}.json"
        part.unlink(missing_ok=True)
        cmd = [sys.executable, str(Path(__file__).resolve()), "--job", sh["name"], "--deadline", f"{left - 20:.1f}",
               "--out", str(out), "--tmp", args.tmp, "--repetitions", str(args.repetitions),
               "--policies", ",".join(args.policies), "--fractions", ",".join(map(str, args.fractions)),
               "--warmup-steps", str(args.warmup_steps), "--accelerate-tokens", str(args.accelerate_tokens)]
        if args.smoke:
            cmd.append("--smoke")
        if not args.accelerate:
            cmd.append("--no-accelerate")
        log_line(f"shape {sh['name']}: {left:.0f} s left")
        try:
            r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=left,
                               env={**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")})
            logf.write(r.stdout)
            logf.flush()
            sys.stdout.write("".join(x + "\n" for x in r.stdout.splitlines() if x.startswith("[")))
            if part.is_file():
                rows += json.loads(part.read_text())
            if r.returncode != 0 or not part.is_file():
                tail = r.stdout.strip().splitlines()[-3:]
                rows.append({"shape": sh["name"], "source": "measured", "status": "failed",
                             "reason": f"exit {r.returncode}: {' | '.join(tail)}"})
        except subprocess.TimeoutExpired as e:
            out_txt = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
            logf.write(out_txt)
            if part.is_file():
                rows += json.loads(part.read_text())
            rows.append({"shape": sh["name"], "source": "measured", "status": "failed", "reason": "timed out"})
        meta["wall_s"] = time.monotonic() - t_start
        write_outputs(rows, out, meta)  # after every shape: whatever finished is kept
    logf.close()
    meta["wall_s"] = time.monotonic() - t_start
    write_outputs(rows, out, meta)
    log_line(f"done in {meta['wall_s']:.0f} s: {out / 'summary.md'}")
    return 0


def _jsonable(v: Any) -> Any:
    if hasattr(v, "tolist"):
        return v.tolist()
    if hasattr(v, "item"):
        return v.item()
    return str(v)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except Exception:  # noqa: BLE001 - the log says why
        traceback.print_exc()
        sys.exit(1)
