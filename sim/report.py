"""Results tables: one tidy row per run, written as Parquet and JSON, and the printed table."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Sequence

import pandas as pd

from sim.metrics import TABLE_COLUMNS
from traces.atomic import atomic_write

_AFTER = TABLE_COLUMNS.index("gb_moved") + 1
PRINTED = TABLE_COLUMNS[:_AFTER] + ["useful_prefetch_gb", "wasted_prefetch_gb"] + TABLE_COLUMNS[_AFTER:] + ["status"]
#: what each cache.reset means, said under a printed table (docs/metrics.md)
CACHE_RESET = {"never": "warm across requests", "request": "cold at each request's start"}
#: the metric that ranks policies, said under every printed table (docs/metrics.md, "Ranking")
RANKING = ("ranking: TPOT ms, the mean over requests of each request's time per output token; tokens/s pools all "
           "decode tokens, so long requests weigh more and it can order policies differently")


def to_frame(rows: Sequence[dict[str, Any]]) -> pd.DataFrame:
    return pd.DataFrame(list(rows))


def write_results(rows: Sequence[dict[str, Any]], out_dir: str | os.PathLike, name: str = "results") -> tuple[Path, Path]:
    """``<name>.parquet`` and ``<name>.json`` in ``out_dir``, each written atomically."""
    out = Path(out_dir)
    df = to_frame(rows)
    pq_path = atomic_write(out / f"{name}.parquet", lambda tmp: df.to_parquet(tmp, index=False))

    def dump(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump([_jsonable(r) for r in rows], f, indent=1, default=str)

    return pq_path, atomic_write(out / f"{name}.json", dump)


def _jsonable(row: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for k, v in row.items():
        if isinstance(v, float) and not math.isfinite(v):
            v = None
        elif hasattr(v, "tolist"):
            v = v.tolist()
        out[k] = v
    return out


def format_table(rows: Sequence[dict[str, Any]], extra: Sequence[str] = (), *, ranking: bool = True) -> str:
    """policy, TPOT ms, tokens/s, hit rate, GB moved (useful and wasted prefetches among them),
    stall share, x bound (+ ``extra`` columns), and the line that names the ranking metric."""
    df = to_frame(rows)
    cols = [c for c in list(extra) + PRINTED if c in df.columns]
    df = df[cols].copy()
    fmt = {"tpot_ms": "{:.2f}", "tokens_per_s": "{:.2f}", "hit_rate": "{:.3f}", "gb_moved": "{:.2f}",
           "useful_prefetch_gb": "{:.2f}", "wasted_prefetch_gb": "{:.2f}", "stall_share": "{:.3f}", "x_bound": "{:.2f}"}
    for c, f in fmt.items():
        if c in df.columns:
            df[c] = [("-" if (v is None or (isinstance(v, float) and math.isnan(v))) else f.format(v)) for v in df[c]]
    df = df.rename(columns={"tpot_ms": "TPOT ms", "tokens_per_s": "tokens/s", "hit_rate": "hit rate",
                            "gb_moved": "GB moved", "useful_prefetch_gb": "useful GB", "wasted_prefetch_gb": "wasted GB",
                            "stall_share": "stall share", "x_bound": "x bound"})
    text = df.to_string(index=False)
    if not ranking or "tpot_ms" not in cols:
        return text
    resets = sorted({str(r["cache_reset"]) for r in rows if r.get("cache_reset")})
    cache = f"; cache.reset={'/'.join(resets)} ({CACHE_RESET.get(resets[0], '')})" if len(resets) == 1 else ""
    return text + "\n" + RANKING + cache


SPECULATIVE_PRINTED = ["acceptance_rate", "mean_k", "tokens_per_cycle", "coverage_ready", "coverage_requested",
                       "elb_recall", "experts_per_token"]


def format_speculative(rows: Sequence[dict[str, Any]]) -> str:
    """The speculative rows' acceptance, mean k, tokens per cycle and coverage, then the share of
    cycles at each k (the k that any row used); empty when no row is speculative."""
    spec = [r for r in rows if r.get("status") == "ok" and r.get("decoding") == "speculative"]
    if not spec:
        return ""
    df = to_frame(spec)
    cols = ["policy"] + [c for c in SPECULATIVE_PRINTED if c in df.columns]
    top = df[cols].to_string(index=False, float_format=lambda v: f"{v:.3f}")
    ks = sorted({int(c[7:]) for c in df.columns if c.startswith("k_hist_")})
    ks = [k for k in ks if df[f"k_hist_{k}"].fillna(0).gt(0).any()]
    hist = df[["policy"] + [f"k_hist_{k}" for k in ks]].rename(columns={f"k_hist_{k}": f"k={k}" for k in ks})
    return (top + "\nshare of cycles at each draft length k:\n"
            + hist.to_string(index=False, float_format=lambda v: f"{v:.2f}"))
