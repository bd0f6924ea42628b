"""Prefetching must not cost more than it saves: TPOT of the autoregressive prefetchers
(lookahead, history) against on-demand LRU with the same eviction, on the quick-start setting
(`python -m sim`: Mixtral-8x7B, RTX 4090 at its budget) and at every link of
`experiment=link-sweep` (Mixtral-8x7B, H100 PCIe5 preset, 64 GB, 2 requests x (32 + 64) tokens).

Targets (issue "Baselines as users run them"): prefetcher TPOT <= 1.02x LRU everywhere; lookahead
at 450 GB/s <= 0.87x LRU. Simulated times are deterministic, so one run each; this is a results
benchmark, not a speed benchmark.

    python benchmarks/prefetch_admission.py [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from hydra import compose, initialize_config_dir

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sim.config import register_configs  # noqa: E402
from sim.presets import conf_dir  # noqa: E402
from sim.run import simulate  # noqa: E402

POLICIES = ["lru", "lookahead", "history"]
LINK_SWEEP = ["model=mixtral-8x7b", "hardware=h100-pcie5", "hardware.memory_gb=64", "trace.requests=2",
              "trace.prompt_tokens=32", "trace.decode_tokens=64"]
LINKS = [12, 24, 55, 120, 450]


def rows(overrides: list[str]) -> dict[str, dict]:
    out = {}
    for p in POLICIES:
        with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
            cfg = compose(config_name="sim", overrides=[*overrides, f"policy={p}", "progress=false"])
        out[p] = simulate(cfg)[0]
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None, help="write every row as JSON here")
    args = ap.parse_args()
    register_configs()
    settings = [("quick-start", [])] + [(f"link-sweep {g} GB/s", [*LINK_SWEEP, f"hardware.h2d_gbps={g}"]) for g in LINKS]
    table, dump = [], {}
    for name, ov in settings:
        r = rows(ov)
        dump[name] = r
        lru = r["lru"]["tpot_ms"]
        for p in POLICIES:
            x = r[p]
            table.append((name, p, x["tpot_ms"], x["tpot_ms"] / lru, x.get("useful_prefetch_gb", 0.0),
                          x.get("wasted_prefetch_gb", 0.0), x["gb_moved"]))
    print(f"{'setting':22} {'policy':10} {'TPOT ms':>9} {'x LRU':>6} {'useful GB':>9} {'wasted GB':>9} {'GB moved':>9}")
    for name, p, tpot, ratio, useful, wasted, moved in table:
        print(f"{name:22} {p:10} {tpot:9.2f} {ratio:6.3f} {useful:9.2f} {wasted:9.2f} {moved:9.2f}")
    worst = max(t[3] for t in table if t[1] != "lru")
    la450 = next(t[3] for t in table if t[0] == "link-sweep 450 GB/s" and t[1] == "lookahead")
    print(f"worst prefetcher / LRU: {worst:.3f} (target <= 1.02); lookahead / LRU at 450 GB/s: {la450:.3f} "
          "(target <= 0.87)")
    if args.out:
        Path(args.out).write_text(json.dumps(dump, indent=1, default=str))
    return 0


if __name__ == "__main__":
    from traces.cli import run_cli

    sys.exit(run_cli(main))
