"""The bound no policy beats (docs/metrics.md, The bound).

Same trace, decoding mode and acceptance sequence; Belady (MIN) eviction over the full future with
the run's slot layout; every miss fetched as early as the link allows; compute and transfers fully
overlapped. Per request and phase the bound time is ``max(compute, misses x transfer time)``.

Belady here serves the layer-step's experts one after another (no "in use together" pinning), which
can only lower its miss count, so the bound stays a bound for every grouped policy.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

import numpy as np

NEVER = 1 << 62


def belady_misses(needed: list[tuple[int, ...]], pool_of: list[int], capacity: list[int]) -> np.ndarray:
    """Misses per layer-step of MIN eviction (cold start) on the access sequence ``needed``."""
    seq = [key for keys in needed for key in keys]
    owner = np.repeat(np.arange(len(needed)), [len(k) for k in needed])
    n = len(seq)
    nxt = [NEVER] * n
    last: dict[int, int] = {}
    for i in range(n - 1, -1, -1):
        key = seq[i]
        nxt[i] = last.get(key, NEVER)
        last[key] = i
    resident: list[dict[int, int]] = [dict() for _ in capacity]  # key -> its current next use
    heaps: list[list[tuple[int, int]]] = [[] for _ in capacity]
    misses = np.zeros(len(needed), dtype=np.int64)
    for i, key in enumerate(seq):
        p = pool_of[key]
        res, heap = resident[p], heaps[p]
        if key not in res:
            misses[owner[i]] += 1
            if len(res) >= capacity[p]:
                while True:
                    neg, victim = heapq.heappop(heap)
                    if res.get(victim) == -neg:
                        del res[victim]
                        break
        res[key] = nxt[i]
        heapq.heappush(heap, (-nxt[i], key))
    return misses


@dataclass
class Bound:
    ttft_s: np.ndarray  # per request
    tpot_s: np.ndarray  # per request (NaN where a request has < 2 emitted tokens)
    total_s: float  # whole run: max(total compute, total transfer)
    misses: int
    compute_s: float


def compute_bound(
    needed: list[tuple[int, ...]],
    step_of_g: list[int],
    step_compute: np.ndarray,
    step_request: np.ndarray,
    step_phase: np.ndarray,
    step_tokens: np.ndarray,
    num_requests: int,
    pool_of: list[int],
    capacity: list[int],
    transfer_s: float,
) -> Bound:
    """Bound per request: TTFT = max(prefill compute, prefill misses x transfer); TPOT likewise over
    decode steps, divided by the tokens they emit after the first."""
    miss_g = belady_misses(needed, pool_of, capacity)
    miss_step = np.bincount(np.asarray(step_of_g, dtype=np.int64), weights=miss_g, minlength=len(step_compute))
    ttft = np.zeros(num_requests)
    tpot = np.full(num_requests, np.nan)
    for r in range(num_requests):
        sel = step_request == r
        pre = sel & (step_phase == 0)
        dec = sel & (step_phase != 0)
        ttft[r] = max(step_compute[pre].sum(), miss_step[pre].sum() * transfer_s)
        ntok = step_tokens[dec].sum()
        if ntok > 0:
            tpot[r] = max(step_compute[dec].sum(), miss_step[dec].sum() * transfer_s) / ntok
    total = max(float(step_compute.sum()), float(miss_g.sum()) * transfer_s)
    return Bound(ttft, tpot, total, int(miss_g.sum()), float(step_compute.sum()))
