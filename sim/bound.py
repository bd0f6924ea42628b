"""The bound no policy beats (docs/metrics.md, The bound).

Same trace, decoding mode and acceptance sequence; Belady (MIN) eviction over the full future with
the run's slot layout (the request's future only, from a cold cache, with ``cache.reset=request``);
every miss fetched as early as the link allows; compute and transfers fully overlapped. Per request,
for its first token and for the rest, the bound time is ``max(compute, misses x transfer time)``.

Belady here serves the layer-step's experts one after another (no "in use together" pinning), which
can only lower its miss count, so the bound stays a bound for every grouped policy.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

import numpy as np

NEVER = 1 << 62
#: cache.reset: 'never' (warm across requests) or 'request' (cold at each request's start)
RESETS = ("never", "request")


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
    step_tokens: np.ndarray,
    num_requests: int,
    pool_of: list[int],
    capacity: list[int],
    transfer_s: float,
    *,
    reset: str = "never",
) -> Bound:
    """Bound per request, split as the metrics split a request: TTFT over its first step (the
    prefill, or the first decode step of a decode-only trace) = max(compute, misses x transfer);
    TPOT likewise over the remaining steps, divided by the tokens they emit. With
    ``reset='request'`` the cache is cold at each request's start and Belady's future ends with
    the request."""
    if reset not in RESETS:
        raise ValueError(f"cache reset must be one of {RESETS}, got {reset!r}")
    step_of_g_a = np.asarray(step_of_g, dtype=np.int64)
    if reset == "request":
        g_req = np.asarray(step_request, dtype=np.int64)[step_of_g_a]
        cuts = np.flatnonzero(np.r_[True, g_req[1:] != g_req[:-1], True])
        miss_g = np.concatenate([belady_misses(needed[a:b], pool_of, capacity)
                                 for a, b in zip(cuts[:-1], cuts[1:])]) if len(needed) else np.zeros(0, np.int64)
    else:
        miss_g = belady_misses(needed, pool_of, capacity)
    miss_step = np.bincount(step_of_g_a, weights=miss_g, minlength=len(step_compute))
    ttft = np.zeros(num_requests)
    tpot = np.full(num_requests, np.nan)
    for r in range(num_requests):
        idx = np.flatnonzero(step_request == r)
        if not idx.size:
            continue
        first, rest = idx[:1], idx[1:]
        ttft[r] = max(step_compute[first].sum(), miss_step[first].sum() * transfer_s)
        ntok = step_tokens[rest].sum()
        if ntok > 0:
            tpot[r] = max(step_compute[rest].sum(), miss_step[rest].sum() * transfer_s) / ntok
    total = max(float(step_compute.sum()), float(miss_g.sum()) * transfer_s)
    return Bound(ttft, tpot, total, int(miss_g.sum()), float(step_compute.sum()))
