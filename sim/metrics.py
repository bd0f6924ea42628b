"""Metrics of a run, defined once (docs/metrics.md) and computed the same way from simulated and
measured event logs: per request first, then averaged over requests."""

from __future__ import annotations

from typing import Any

import numpy as np

from sim.bound import Bound
from sim.runlog import RunLog

GB = 1e9

#: the columns every results row has, in the printed table's order first
TABLE_COLUMNS = ["policy", "tpot_ms", "tokens_per_s", "hit_rate", "gb_moved", "stall_share", "x_bound"]


def _mean(x: list[float] | np.ndarray) -> float:
    a = np.asarray(x, dtype=np.float64)
    a = a[~np.isnan(a)]
    return float(a.mean()) if a.size else float("nan")


def per_request(log: RunLog) -> dict[str, np.ndarray]:
    """TTFT, TPOT and decode time per request."""
    R = len(log.request_start)
    ttft = np.full(R, np.nan)
    tpot = np.full(R, np.nan)
    dec_time = np.zeros(R)
    dec_tok = np.zeros(R, dtype=np.int64)
    gaps: list[float] = []
    for r, (t0, times) in enumerate(zip(log.request_start, log.token_times)):
        if not times:
            continue
        ttft[r] = times[0] - t0
        if len(times) > 1:
            dec_time[r] = times[-1] - times[0]
            dec_tok[r] = len(times) - 1
            tpot[r] = dec_time[r] / dec_tok[r]
            gaps.extend(np.diff(times).tolist())
    return {"ttft": ttft, "tpot": tpot, "decode_time": dec_time, "decode_tokens": dec_tok, "gaps": np.asarray(gaps)}


K_HIST = 16  #: k_hist_0 .. k_hist_16 always exist in a speculative row (the default k_max); larger k add columns


def speculative_metrics(cycles: list[dict[str, Any]]) -> dict[str, Any]:
    """Acceptance and draft length over a run's draft/verify cycles (empty if autoregressive)."""
    if not cycles:
        return {}
    k = np.array([c["k"] for c in cycles])
    a = np.array([c["accepted"] for c in cycles])
    drafted = int(k.sum())
    hist = np.bincount(k, minlength=K_HIST + 1) / len(k)
    drafting = [c for c in cycles if c["k"] > 0 and "elb_hits" in c]
    need = sum(c["verify_experts"] for c in drafting)
    return {
        "cycles": len(cycles),
        "drafted_tokens": drafted,
        "emitted_tokens": int((a + 1).sum()),
        "acceptance_rate": float(a.sum() / drafted) if drafted else float("nan"),
        "mean_accepted": float(a.mean()),
        "mean_k": float(k.mean()),
        "tokens_per_cycle": float((a + 1).mean()),
        **{f"k_hist_{i}": float(x) for i, x in enumerate(hist)},
        "verify_coverage": float(np.mean([c["coverage"] for c in cycles])),
        "elb_recall": sum(c["elb_hits"] for c in drafting) / need if need else float("nan"),
        "k_per_cycle": k.tolist(),
    }


def results_row(log: RunLog, bound: Bound, expert_bytes: int, num_layers: int) -> dict[str, Any]:
    pr = per_request(log)
    needed = log.hits + log.late + log.misses
    tpot = _mean(pr["tpot"])
    bound_tpot = _mean(bound.tpot_s)
    dec_time = float(pr["decode_time"].sum())
    gaps = pr["gaps"]
    pct = np.percentile(gaps, [50, 90, 99]) * 1e3 if gaps.size else [float("nan")] * 3
    stall_layer = log.stall_per_layer if log.stall_per_layer is not None else np.zeros(num_layers)
    return {
        "ttft_ms": _mean(pr["ttft"]) * 1e3,
        "tpot_ms": tpot * 1e3,
        "tokens_per_s": float(pr["decode_tokens"].sum()) / dec_time if dec_time > 0 else float("nan"),
        "p50_token_ms": float(pct[0]),
        "p90_token_ms": float(pct[1]),
        "p99_token_ms": float(pct[2]),
        "e2e_s": log.run_time,
        "requests": len(log.request_start),
        "decode_tokens": int(pr["decode_tokens"].sum()),
        "hit_rate": log.hits / needed if needed else float("nan"),
        "late_rate": log.late / needed if needed else float("nan"),
        "miss_rate": log.misses / needed if needed else float("nan"),
        "late_wait_ms": log.late_wait * 1e3,
        "coverage": _mean(log.coverage),
        "coverage_ready": log.coverage_ready_sum / log.coverage_layers if log.coverage_layers else float("nan"),
        "coverage_requested": (log.coverage_requested_sum / log.coverage_layers if log.coverage_layers
                               else float("nan")),
        "experts_per_token": ((log.copies - log.prefill_copies) / int(pr["decode_tokens"].sum())
                              if pr["decode_tokens"].sum() else float("nan")),
        "gb_moved": log.bytes_moved / GB,
        "copies": log.copies,
        "evictions": log.evictions,
        "useful_prefetch_gb": log.useful_prefetch_bytes / GB,
        "wasted_prefetch_gb": log.wasted_prefetch_bytes / GB,
        "link_util": log.link_busy / log.run_time if log.run_time > 0 else 0.0,
        "stall_s": log.stall,
        "stall_share": log.stall / log.run_time if log.run_time > 0 else 0.0,
        "stall_per_layer_ms": [float(x) * 1e3 for x in stall_layer],
        "bound_ttft_ms": _mean(bound.ttft_s) * 1e3,
        "bound_tpot_ms": bound_tpot * 1e3,
        "x_bound": tpot / bound_tpot if bound_tpot > 0 else float("nan"),
        "x_bound_e2e": log.run_time / bound.total_s if bound.total_s > 0 else float("nan"),
        "bound_misses": bound.misses,
        **speculative_metrics(log.cycles),
    }
