"""`python -m traces info FILE`: validate a trace and describe it."""

from __future__ import annotations

import argparse
import json

from traces.io import read_trace


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", help="trace file (.parquet)")


def run(args: argparse.Namespace) -> int:
    t = read_trace(args.path)
    s = t.shape
    print(f"{args.path}: valid trace")
    print(
        f"  model {s.name}: {s.num_layers} layers, MoE layers {list(s.moe_layers)}, "
        f"{s.num_experts} experts, top-{s.top_k}, {s.num_shared_experts} shared"
    )
    print(
        f"  {t.num_requests} requests, {int(t.lengths.sum())} tokens "
        f"({int(t.prefill_lengths().sum())} prefill, {t.decode_tokens()} decode), {t.num_rows} rows"
    )
    cols = ["gate_weights"] if t.gate_weights is not None else []
    cols += [f"lookahead_{d}" for d in t.lookahead_depths]
    cols += ["draft", "draft_match"] if t.draft is not None else []
    print(f"  optional columns: {', '.join(cols) or 'none'}")
    if t.meta:
        print("  metadata: " + json.dumps(t.meta, sort_keys=True, default=str))
    return 0
