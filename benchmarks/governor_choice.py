"""How close does the roofline governor come to its best fixed draft length, in the simulator?

The GPU target of speculation on the GPU is "the governor within 5% of the best fixed k". This runs
the same question in the simulator, at the measured runs' settings (benchmarks/gpu_speculative.py:
the 4-layer Phi-3.5-MoE, Qwen1.5-MoE and Mixtral shapes at their MoE-SpeQ slot counts, one request
of 32 + 256 tokens, both decode paths, a measured hardware profile), for MoE-SpeQ with fixed k in
``--ks`` and with the roofline governor under its default settings (the paper as printed: accepted
tokens only, warm-up at the top of the range) and under the settings that count the target's bonus
token (``governor.objective=emitted``) and/or warm up at a moderate k (``governor.warmup_k``). It
tunes nothing: every variant is a documented governor setting, reported side by side.

    python benchmarks/governor_choice.py [--hardware measured/h100-sxm] [--out DIR]

Writes DIR/governor_choice.parquet (one row per shape, engine and variant) and
DIR/governor_choice.md (per shape and engine: the best fixed k and each governor's TPOT against it).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import itertools
import platform
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHAPES = {"phi-3.5-moe-L4": ("phi-3.5-moe", 4, 32), "qwen1.5-moe-L4": ("qwen1.5-moe-a2.7b", 4, 120),
          "mixtral-8x7b-L4": ("mixtral-8x7b", 4, 16)}
VARIANTS = {
    "governor (default)": ["governor=roofline"],
    "governor, emitted": ["governor=roofline", "governor.objective=emitted"],
    "governor, warm-up k=4": ["governor=roofline", "governor.warmup_k=4"],
    "governor, emitted, warm-up k=4": ["governor=roofline", "governor.objective=emitted", "governor.warmup_k=4"],
}


def main(argv: list[str] | None = None) -> int:
    import pandas as pd

    from sim.experiments.search import compose_sim
    from sim.run import simulate

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hardware", default="measured/h100-sxm")
    ap.add_argument("--ks", default="1,2,3,4,6,8", help="fixed draft lengths")
    ap.add_argument("--decode-tokens", type=int, default=256)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "governor_choice"))
    args = ap.parse_args(argv)
    out = Path(args.out)
    if (out / "governor_choice.parquet").exists():
        print(f"{out}/governor_choice.parquet exists: pass another --out", file=sys.stderr)
        return 2
    ks = [int(k) for k in args.ks.split(",")]
    variants = {**VARIANTS, **{f"k={k}": ["governor=fixed", f"governor.k={k}"] for k in ks}}
    rows = []
    for (name, (model, layers, slots)), engine in itertools.product(SHAPES.items(), ("graphed", "eager")):
        for label, over in variants.items():
            cfg = compose_sim([f"model={model}", f"model.layers={layers}", f"hardware={args.hardware}", f"engine={engine}",
                               "policy=speq", f"cache.slots={slots}", "trace.requests=1", "trace.prompt_tokens=32",
                               f"trace.decode_tokens={args.decode_tokens}", "progress=false", *over])
            r = simulate(cfg)[0]
            rows.append({"shape": name, "engine": engine, "variant": label, "tpot_ms": r["tpot_ms"],
                         "mean_k": r.get("mean_k"), "acceptance": r.get("acceptance_rate")})
    df = pd.DataFrame(rows)
    lines = [f"# The roofline governor against its best fixed k, in the simulator ({args.hardware})", "",
             f"`python benchmarks/governor_choice.py --hardware {args.hardware}`; "
             f"{_dt.datetime.now(_dt.timezone.utc):%Y-%m-%d %H:%M UTC}, {platform.node() or 'this machine'} (CPU; "
             f"simulated time, deterministic). One request of 32 + {args.decode_tokens} tokens, MoE-SpeQ at the GPU "
             "runs' slot counts; fixed k in " + ", ".join(map(str, ks)) + ".", "",
             "| shape | engine | best fixed k | " + " | ".join(VARIANTS) + " |", "|---|---|---|" + "---|" * len(VARIANTS)]
    for (s, e), g in df.groupby(["shape", "engine"], sort=False):
        fixed = g[g.variant.str.startswith("k=")]
        best = fixed.loc[fixed.tpot_ms.idxmin()]
        cells = []
        for v in VARIANTS:
            x = g[g.variant == v].iloc[0]
            cells.append(f"{x.tpot_ms / best.tpot_ms - 1:+.1%} (mean k {x.mean_k:.1f})")
        lines.append(f"| {s} | {e} | {best.variant}: {best.tpot_ms:.2f} ms | " + " | ".join(cells) + " |")
    out.mkdir(parents=True, exist_ok=True)
    df.to_parquet(out / "governor_choice.parquet", index=False)
    (out / "governor_choice.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
