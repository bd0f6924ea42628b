"""MoE-SpeQ's speculative decoding measured on the lent GPU, beside the simulator's prediction.

One command, on whichever card is lent (the hardware preset follows the card's name):

    . .gpu/prelude.sh; python3 benchmarks/gpu_speculative.py --out $OUT

Per shape (each in its own process; bf16, built on the GPU; live mode: the model decodes its own
prompts greedily, the runtime's ``python -m runtime`` measurement path, runtime/measure.py):

- the project's trained small-moe (real acceptance), then Phi-3.5-MoE depth-reduced to 4 layers
  (random weights: its acceptance is that of a random model's INT4 draft, stated, not chosen),
  then Qwen1.5-MoE and Mixtral (4 layers) as the budget allows;
- one budget: a global slot pool of ``--budget`` x all routed experts (cache.slots);
- policies: MoE-SpeQ (``speq``) with the roofline governor, with fixed k in ``--ks``; ``spec-lru``
  and ``spmoe`` with the governor; autoregressive ``lru`` at the same cache size and at the same
  GPU memory (its pool grows by the INT4 draft's bytes / one expert's bytes);
- engines: ``graphed`` (lean path; ``--engines graphed,eager`` adds transformers' forward);
- repetitions: ``--reps`` for the governor and lru, one for the fixed-k runs;
- each measured config has the simulator's prediction of the same config beside it (its
  ``source = sim`` row: the executed routing as the trace, the draft's ELB rows and acceptance as
  its draft columns, the card's preset).

Rows (results.jsonl, then results.parquet; summary.md) carry card, model, engine, policy, budget,
k (or ``governor``), tpot_measured_s, tpot_sim_s, speedup_measured, speedup_sim (over on-demand
LRU at the same GPU memory), tpot_bound_s, acceptance, mean k, tokens per cycle, the draft's routing
agreement, acceptance per draft position, and token_mismatch_share (tokens of the speculative
output that differ from lru's non-speculative greedy output, in the card's bf16). cycles.jsonl, then
cycles.parquet: every measured draft/verify cycle (model, engine, label, repetition, k, accepted, the
governor's predicted cycle time and the observed one; notebooks/governor.py). Live mode: each
config's executed routing, traces/<shape>-<engine>-<label>.parquet (``--resimulate`` replays it). A rerun with the
same --out skips shapes whose rows exist (resumable). ``--smoke``: the tiny preset on the CPU.
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
    from .card import identify  # noqa: F401
else:  # run as a script: benchmarks/ is on sys.path
    from card import identify  # noqa: F401 (benchmarks/card.py)

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# mode: live = the model decodes its prompts (real acceptance: the trained checkpoint only);
# replay = the synthetic trace's routing and draft columns (acceptance and agreement at the model
# preset's stated dials), so the GPU and the simulator see the same cycles. matrix: full (every
# policy of the matrix) or reduced (governor, fixed k = 4, spec-lru, lru).
SHAPES = [
    {"name": "phi-3.5-moe-L4", "model": "phi-3.5-moe", "layers": 4, "mode": "replay", "matrix": "full",
     "engines": ("graphed", "eager"), "est_s": 260},
    {"name": "small-moe", "model": "small-moe", "source": "models/small-moe", "layers": None, "mode": "live",
     "matrix": "reduced", "engines": ("graphed",), "est_s": 60},
    {"name": "qwen1.5-moe-L4", "model": "qwen1.5-moe-a2.7b", "layers": 4, "mode": "replay", "matrix": "reduced",
     "engines": ("graphed",), "est_s": 60},
    {"name": "mixtral-8x7b-L4", "model": "mixtral-8x7b", "layers": 4, "mode": "replay", "matrix": "reduced",
     "engines": ("graphed",), "est_s": 70},
]
SMOKE = [{"name": "tiny", "model": "tiny", "layers": None, "mode": "live", "matrix": "full", "engines": ("eager",),
          "est_s": 60}]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def compose(overrides: list[str]) -> Any:
    from hydra import compose as _compose, initialize_config_dir

    from runtime.__main__ import register_configs, rewrite_args
    from sim.presets import conf_dir

    register_configs()
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        return _compose(config_name="run", overrides=rewrite_args(list(overrides)))


def _num(v: Any) -> float:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return float("nan")
    return f


# =============================================================================== one shape
def plan_runs(matrix: str, ks: list[int], reps: int, slots: int, same_mem: int) -> list[dict[str, Any]]:
    """The configs of one shape and engine (label, policy, k, overrides, repetitions, memory), the
    comparison that matters first: a call that runs out of time still has lru, the governor,
    spec-lru and k = 4 (a rerun with the same --out does not redo a shape that has rows)."""
    def run(label: str, policy: str, k: Any, over: list[str], n: int = 1, memory: str | None = None) -> dict[str, Any]:
        return {"label": label, "policy": policy, "k": k, "over": over, "reps": n, "memory": memory}

    gov = ["governor=roofline"]
    fixed = lambda k: run(f"speq-k{k}", "speq", k, ["governor=fixed", f"governor.k={k}"])  # noqa: E731
    runs = [run("lru", "lru", None, [f"cache.slots={same_mem}"], reps, "same_memory"),
            run("speq", "speq", "governor", gov, reps),
            run("spec-lru", "spec-lru", "governor", gov),
            fixed(4),
            run("lru-same-cache", "lru", None, [f"cache.slots={slots}"], 1, "same_cache")]
    if matrix == "full":
        for pol in ("lookahead", "oracle"):
            runs.append(run(pol, pol, None, [f"cache.slots={same_mem}"], 1, "same_memory"))
            runs.append(run(f"{pol}-same-cache", pol, None, [f"cache.slots={slots}"], 1, "same_cache"))
        runs += [fixed(k) for k in ks if k != 4]
        runs.append(run("spmoe", "spmoe", "governor", gov))
    return runs


def run_shape(sh: dict[str, Any], args: argparse.Namespace, rows_path: Path, meta: dict[str, Any]) -> None:
    engines = args.engines or sh["engines"]
    deadline = time.monotonic() + args.shape_budget_s
    for i, engine in enumerate(engines):
        # the shape's time shared by its engines; an engine left over gets what the others left
        share = (deadline - time.monotonic()) / (len(engines) - i)
        run_engine(sh, engine, args, rows_path, meta, time.monotonic() + share)


def run_engine(sh: dict[str, Any], engine: str, args: argparse.Namespace, rows_path: Path, meta: dict[str, Any],
               deadline: float) -> None:
    from runtime.measure import Session
    from sim.spec import ModelSpec
    from traces.io import write_trace

    dev = "cpu" if args.smoke else "cuda"
    R, P, D = (1, 6, 14) if args.smoke else (1, 32, args.decode_tokens)
    base = [f"hardware={meta['hardware']}", f"device={dev}", f"mode={sh['mode']}", f"engine={engine}",
            f"trace.requests={R}",
            f"trace.prompt_tokens={P}", f"trace.decode_tokens={D}", "warmup_steps=-1"]
    if sh.get("source"):
        base.append(f"source={ROOT / sh['source']}")
        base.append(f"model={sh['model']}")
    else:
        base.append(f"model={sh['model']}")
    if sh.get("layers"):
        base.append(f"model.layers={sh['layers']}")
    base.append("dtype=fp32" if args.smoke else "dtype=bf16")
    spec = ModelSpec.from_cfg(compose(base).model)
    total = spec.num_routed_experts_total
    slots = max(spec.top_k, int(round(args.budget * total)))
    t0 = time.perf_counter()
    # one session: the pool holds the largest pool any config asks for (lru at the same memory)
    cfg0 = compose(base + [f"cache.slots={slots}", "policy=speq", "repetitions=1", "governor=roofline"])
    sess = Session(cfg0, max_slots=total)
    draft_bytes = sess.draft[2]
    extra = int(draft_bytes // sess.om.nbytes)
    same_mem = min(total, slots + extra)
    log(f"{sh['name']}: setup {time.perf_counter() - t0:.1f} s, {slots} slots ({args.budget:.0%} of {total}); "
        f"INT4 draft {draft_bytes / 2**20:.1f} MiB ({sess.draft[1]}) = {extra} experts -> lru at the same memory: "
        f"{same_mem} slots; engine {sess.engine}; link {sess.h2d_gbps:.1f} GB/s")
    runs = plan_runs(sh["matrix"], args.ks, args.reps, slots, same_mem)
    tokens: dict[str, list[list[int]]] = {}
    out: list[dict[str, Any]] = []
    cyc: list[dict[str, Any]] = []
    try:
        for x in runs:
            if time.monotonic() > deadline:
                log(f"{sh['name']} {x['label']}: skipped (shape budget spent)")
                continue
            over = base + [f"policy={x['policy']}", f"repetitions={x['reps']}"] + x["over"]
            if not any(o.startswith("cache.slots=") for o in x["over"]):
                over.append(f"cache.slots={slots}")
            cfg = compose(over)

            def on_run(p, run, lg, row, label=x["label"]):
                tokens[label] = (getattr(run, "live_out", None) or {}).get("tokens")  # live mode only
                if sh["mode"] == "live" and int(row.get("repetition", 0)) == 0:  # the routing the GPU executed
                    write_trace(sess.live_trace, rows_path.parent / "traces" / f"{sh['name']}-{sess.engine}-{label}.parquet")
                cyc.extend({"model": sh["name"], "engine": sess.engine, "label": label, **c}
                           for c in sess.cycle_records(p.name, row, lg))

            t1 = time.perf_counter()
            got = sess.measure(cfg, on_run=on_run)
            meas = [r for r in got if r["source"] == "measured"]
            sim = next((r for r in got if r["source"] == "sim" and r["status"] == "ok"), None)
            ok = [r for r in meas if r["status"] == "ok"]
            if not ok:
                log(f"{sh['name']} {x['label']}: {meas[0]['status'] if meas else 'no row'}: "
                    f"{meas[0].get('reason') if meas else ''}")
                out.append({"label": x["label"], "policy": x["policy"], "k": x["k"], "memory": x.get("memory"),
                            "status": meas[0]["status"] if meas else "failed",
                            "reason": meas[0].get("reason") if meas else ""})
                continue
            tp = [r["tpot_ms"] / 1e3 for r in ok]
            r0 = ok[-1]
            out.append({
                "label": x["label"], "status": "ok", "policy": x["policy"], "k": x["k"], "memory": x.get("memory"),
                "slots": r0.get("slots"), "repetitions": len(ok),
                "tpot_measured_s": sum(tp) / len(tp), "tpot_measured_min_s": min(tp), "tpot_measured_max_s": max(tp),
                "tpot_sim_s": _num(sim["tpot_ms"]) / 1e3 if sim else float("nan"),
                "tpot_bound_s": _num(r0.get("bound_tpot_ms")) / 1e3,
                "hit_rate": r0.get("hit_rate"), "gb_moved": r0.get("gb_moved"), "stall_share": r0.get("stall_share"),
                "link_util": r0.get("link_util"),
                "acceptance": r0.get("acceptance_rate"), "mean_k": r0.get("mean_k"),
                "tokens_per_cycle": r0.get("tokens_per_cycle"), "draft_agreement": r0.get("draft_agreement"),
                "acceptance_by_position": r0.get("acceptance_by_position"),
                "sim_acceptance": sim.get("acceptance_rate") if sim else None, "sim_mean_k": sim.get("mean_k") if sim else None,
            })
            log(f"{sh['name']} {x['label']}: TPOT {out[-1]['tpot_measured_s'] * 1e3:.2f} ms measured, "
                f"{out[-1]['tpot_sim_s'] * 1e3:.2f} ms simulated ({time.perf_counter() - t1:.1f} s)")
    finally:
        sess.close()
    with (rows_path.parent / "cycles.jsonl").open("a") as f:
        for c in cyc:
            f.write(json.dumps({"card": meta["card"], "date": meta["date"], **c}, default=str) + "\n")
    ref = next((r for r in out if r.get("label") == "lru" and r["status"] == "ok"), None)
    ref_tok = tokens.get("lru")
    with rows_path.open("a") as f:
        for r in out:
            row = {"card": meta["card"], "hardware": meta["hardware"], "date": meta["date"], "model": sh["name"],
                   "engine": sess.engine, "mode": sh["mode"], "budget": args.budget, "budget_slots": slots, "draft_bytes": draft_bytes,
                   "expert_bytes": sess.om.nbytes, "h2d_gbps_measured": sess.h2d_gbps, "decode_tokens": D,
                   "dtype": "fp32" if args.smoke else "bf16", **r}
            if r["status"] == "ok" and ref is not None:
                row["speedup_measured"] = ref["tpot_measured_s"] / r["tpot_measured_s"]
                row["speedup_sim"] = ref["tpot_sim_s"] / r["tpot_sim_s"]
            if r["status"] == "ok" and ref_tok and tokens.get(r["label"]):
                a = [t for seq in ref_tok for t in seq]
                b = [t for seq in tokens[r["label"]] for t in seq]
                n = min(len(a), len(b))
                row["token_mismatch_share"] = sum(x != y for x, y in zip(a[:n], b[:n])) / n if n else float("nan")
                row["first_mismatch"] = next((i for i in range(n) if a[i] != b[i]), None)
            f.write(json.dumps(row, default=str) + "\n")


# =============================================================================== summary
def summary(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    import pandas as pd

    lines = [f"# MoE-SpeQ speculative decoding on {meta['card']} ({meta['date']})", "",
             f"command: `{meta['command']}`; hardware preset {meta['hardware']}; torch {meta['torch']}", ""]
    if not rows:
        return "\n".join(lines + ["no rows"])
    df = pd.DataFrame(rows)
    if "speedup_measured" in df:
        df["speedup_err"] = (df["speedup_measured"] - df["speedup_sim"]) / df["speedup_sim"]
    cols = ["model", "engine", "label", "policy", "k", "slots", "tpot_measured_s", "tpot_sim_s", "speedup_measured", "speedup_sim",
            "speedup_err", "link_util",
            "acceptance", "sim_acceptance", "mean_k", "sim_mean_k", "tokens_per_cycle", "draft_agreement",
            "token_mismatch_share", "status"]
    df = df[[c for c in cols if c in df.columns]]
    lines.append(df.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    lines.append("")
    for (model, engine), g in df.groupby(["model", "engine"]):
        s = g[(g["label"] == "speq") & (g["status"] == "ok")]
        if len(s) and "speedup_measured" in s:
            sm, ss = float(s["speedup_measured"].iloc[0]), float(s["speedup_sim"].iloc[0])
            lines.append(f"- {model} ({engine}): MoE-SpeQ (governor) vs LRU at the same GPU memory: "
                         f"{sm:.2f}x measured, {ss:.2f}x simulated (speed-up error {sm / ss - 1:+.1%}, target "
                         f"within 10%) -> {'beats' if sm > 1 else 'does not beat'} LRU on this card")
            fixed = g[(g["policy"] == "speq") & (g["k"] != "governor") & (g["status"] == "ok")]
            if len(fixed):
                best = fixed.loc[fixed["tpot_measured_s"].idxmin()]
                gov = float(s["tpot_measured_s"].iloc[0])
                lines.append(f"  governor {gov * 1e3:.2f} ms vs best fixed k = {best['k']} "
                             f"{best['tpot_measured_s'] * 1e3:.2f} ms: {gov / best['tpot_measured_s'] - 1:+.1%} "
                             f"(target within 5%)")
    return "\n".join(lines) + "\n"


# =============================================================================== resimulation
def resimulate(out: Path, hardware: str) -> int:
    """No device: the simulator predicts every row of ``out``'s results again under ``hardware``
    (e.g. the card's measured profile, committed after the run), from the same config (shape,
    engine, policy, governor or k, slots, trace: replay rows the shape's synthetic trace, live rows
    the routing the GPU executed, ``traces/<shape>-<engine>-<label>.parquet``); writes
    ``resimulated-<hardware>.parquet`` and ``.md`` beside the results and prints the speed-up errors
    before and after. Live rows of runs that stored no executed trace keep their prediction."""
    import pandas as pd

    from sim.experiments.search import compose_sim
    from sim.run import simulate

    src = out / "results.jsonl"
    if not src.is_file():
        print(f"{src}: no results to resimulate", file=sys.stderr)
        return 2
    rows = [json.loads(x) for x in src.read_text().splitlines()]
    shapes = {s["name"]: s for s in SHAPES + SMOKE}
    new = []
    for r in rows:
        r = dict(r)
        sh = shapes.get(r["model"])
        live = out / "traces" / f"{r['model']}-{r.get('engine')}-{r.get('label')}.parquet"
        if r.get("status") == "ok" and sh is not None and (r.get("mode") == "replay" or live.is_file()):
            trace = ([f"trace.path={live}"] if r.get("mode") == "live" else
                     ["trace.requests=1", "trace.prompt_tokens=32", f"trace.decode_tokens={int(r['decode_tokens'])}"])
            over = [f"model={sh['model']}", f"hardware={hardware}", f"engine={r['engine']}", *trace,
                    f"cache.slots={int(r['slots'])}", f"policy={r['policy']}", "progress=false",
                    *([f"dtype={r['dtype']}"] if r.get("dtype") else [])]
            if sh.get("layers"):
                over.append(f"model.layers={sh['layers']}")
            if r["policy"] in ("speq", "spec-lru", "spmoe"):
                over += ["governor=roofline"] if str(r["k"]) == "governor" else ["governor=fixed", f"governor.k={r['k']}"]
            got = [x for x in simulate(compose_sim(over)) if x.get("status") == "ok"]
            if got:
                r["tpot_sim_before_s"] = r.get("tpot_sim_s")
                r["tpot_sim_s"] = float(got[0]["tpot_ms"]) / 1e3
                r["sim_mean_k"] = got[0].get("mean_k", r.get("sim_mean_k"))
                r["sim_acceptance"] = got[0].get("acceptance_rate", r.get("sim_acceptance"))
        r["hardware"] = hardware if r.get("mode") == "replay" or live.is_file() else r.get("hardware")
        new.append(r)
    for r in new:  # speed-ups over lru at the same memory, per (model, engine)
        ref = next((x for x in new if x["model"] == r["model"] and x["engine"] == r["engine"] and x.get("label") == "lru"
                    and x.get("status") == "ok"), None)
        if ref is not None and r.get("status") == "ok":
            r["speedup_sim"] = ref["tpot_sim_s"] / r["tpot_sim_s"]
    name = hardware.replace("/", "-")
    meta = {"card": new[0].get("card") if new else "?", "date": new[0].get("date") if new else "?",
            "hardware": f"{hardware} (resimulated; live rows without a stored trace: their own prediction)",
            "torch": "(none: no device)",
            "command": f"python benchmarks/gpu_speculative.py --resimulate {out} --hardware {hardware}"}
    text = summary(new, meta)
    (out / f"resimulated-{name}.md").write_text(text)
    pd.DataFrame(new).astype({"k": str}).to_parquet(out / f"resimulated-{name}.parquet")
    print(text)
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "gpu_speculative_out"))
    ap.add_argument("--smoke", action="store_true", help="the tiny preset on the CPU, about a minute")
    ap.add_argument("--shapes", default="", help="comma list of shape names (default: all)")
    ap.add_argument("--hardware", default=None, help="hardware preset (default: the card's measured profile, measured/NAME, if committed, else its preset)")
    ap.add_argument("--budget", type=float, default=0.5, help="slot pool as a share of all routed experts")
    ap.add_argument("--ks", default="1,2,4,8,16", help="fixed draft lengths")
    ap.add_argument("--reps", type=int, default=3, help="repetitions of the governor and lru runs")
    ap.add_argument("--engines", default="", help="comma list of engines (graphed, eager) for every shape; "
                    "default: the shape's own (Phi-3.5-MoE both, the others graphed)")
    ap.add_argument("--decode-tokens", type=int, default=256)
    ap.add_argument("--budget-s", type=float, default=390.0, help="stop starting shapes after this many seconds")
    ap.add_argument("--shape-budget-s", type=float, default=150.0, help="stop starting configs of a shape after this")
    ap.add_argument("--resimulate", default=None, metavar="DIR",
                    help="no device: predict DIR's replay-mode rows again under --hardware (e.g. measured/h100-sxm)")
    ap.add_argument("--job", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--meta", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    try:
        args.ks = [int(k) for k in str(args.ks).split(",") if k]
    except ValueError:
        print(f"--ks {args.ks!r}: a comma list of integers", file=sys.stderr)
        return 2
    args.engines = [e for e in str(args.engines).split(",") if e]
    if set(args.engines) - {"graphed", "eager"}:
        print(f"--engines {','.join(args.engines)}: use graphed and/or eager", file=sys.stderr)
        return 2
    if not 0 < args.budget <= 1:
        print(f"--budget {args.budget}: must be in (0, 1]", file=sys.stderr)
        return 2
    if args.resimulate:
        if not args.hardware:
            print("--resimulate needs --hardware (the profile to predict under)", file=sys.stderr)
            return 2
        return resimulate(Path(args.resimulate), args.hardware)
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
        meta = json.loads(args.meta)
        sh = next(s for s in shapes if s["name"] == args.job)
        try:
            run_shape(sh, args, rows_path, meta)
        except Exception:  # noqa: BLE001 - the parent reports the shape's failure
            traceback.print_exc()
            return 1
        return 0

    import torch
    import transformers

    meta: dict[str, Any] = {"date": _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat(),
                            "host": platform.node(), "torch": torch.__version__, "transformers": transformers.__version__,
                            "command": " ".join(["python3", "benchmarks/gpu_speculative.py",
                                                 *(argv if argv is not None else sys.argv[1:])])}
    code = identify(meta, args.smoke, args.hardware, prefer_measured=True)  # targets judged under the card's profile
    if code:
        return code
    # resumable per (shape, engine): a rerun measures only the engines a shape has no rows for yet
    have = set()
    if rows_path.is_file():
        have = {(r["model"], r.get("engine")) for r in map(json.loads, rows_path.read_text().splitlines())
                if r.get("card") == meta["card"]}
    engines_left = {s["name"]: [e for e in (args.engines or s["engines"]) if (s["name"], e) not in have] for s in shapes}
    todo = [s for s in shapes if engines_left[s["name"]]]
    log(f"card {meta['card']} -> hardware={meta['hardware']}; planned: ~{sum(s['est_s'] for s in todo)} s for "
        f"{[(s['name'], engines_left[s['name']]) for s in todo]} (skipping {sorted(have)}: rows exist)")
    t_start = time.monotonic()
    for sh in todo:
        left = args.budget_s - (time.monotonic() - t_start)
        if left < sh["est_s"] * 0.6:
            log(f"{sh['name']}: skipped ({left:.0f} s left of the budget; a rerun picks it up)")
            continue
        cmd = [sys.executable, str(Path(__file__).resolve()), "--job", sh["name"], "--out", str(out),
               "--meta", json.dumps(meta), "--budget", str(args.budget), "--ks", ",".join(map(str, args.ks)),
               "--reps", str(args.reps), "--decode-tokens", str(args.decode_tokens), "--engines", ",".join(engines_left[sh["name"]]),
               "--shape-budget-s", str(min(args.shape_budget_s, max(30.0, left - 40)))]
        if args.smoke:
            cmd.append("--smoke")
        try:
            r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=max(60, left),
                               env={**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")})
            text, rc = r.stdout, r.returncode
        except subprocess.TimeoutExpired as e:
            text, rc = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or ""), 124
        (out / f"log-{sh['name']}.txt").write_text(text)
        sys.stdout.write("".join(x + "\n" for x in text.splitlines() if x.startswith("[")))
        if rc != 0:
            log(f"{sh['name']}: exit {rc}: " + " | ".join(text.strip().splitlines()[-4:]))
    rows = [json.loads(x) for x in rows_path.read_text().splitlines()] if rows_path.is_file() else []
    rows = [r for r in rows if r.get("card") == meta["card"]]
    (out / "meta.json").write_text(json.dumps(meta, indent=1, default=str))
    text = summary(rows, meta)
    (out / "summary.md").write_text(text)
    try:
        import pandas as pd

        if rows:
            pd.DataFrame(rows).astype({"k": str}).to_parquet(out / "results.parquet")
        cyc_path = out / "cycles.jsonl"
        if cyc_path.is_file():  # python -m sim.roofline reads the columns it knows; notebooks/governor.py draws them
            pd.DataFrame([json.loads(x) for x in cyc_path.read_text().splitlines()]).to_parquet(out / "cycles.parquet")
    except Exception as e:  # noqa: BLE001
        log(f"parquet: {e}")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
