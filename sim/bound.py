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
from itertools import chain, count

import numpy as np

NEVER = 1 << 62
#: cache.reset: 'never' (warm across requests) or 'request' (cold at each request's start)
RESETS = ("never", "request")


def belady_misses(needed: list[tuple[int, ...]], pool_of: list[int], capacity: list[int]) -> np.ndarray:
    """Misses per layer-step of MIN eviction (cold start) on the access sequence ``needed``.

    Pools share nothing, so each pool's accesses are replayed on their own. An expert's priority
    is the position of its next access; never used again, it ranks above every position, the
    smallest key first (so ties are deterministic). Priorities are unique, so the heap holds plain
    ints and a popped priority names its key."""
    lens = np.fromiter(map(len, needed), dtype=np.int64, count=len(needed))
    n, num_keys = int(lens.sum()), len(pool_of)
    # 16-bit keys sort by radix (stable, linear): each key's accesses in time order
    seq = np.fromiter(chain.from_iterable(needed), dtype=np.uint16 if num_keys <= 1 << 16 else np.int64, count=n)
    order = np.argsort(seq, kind="stable")
    nxt = np.empty(n, dtype=np.int64)
    nxt[order[:-1]] = np.where(seq[order[1:]] == seq[order[:-1]], order[1:], -1)
    if n:
        nxt[order[-1]] = -1
    never = nxt < 0
    nxt[never] = n + (num_keys - 1 - seq[never].astype(np.int64))
    keys = seq.tolist()
    key_of = keys + list(range(num_keys - 1, -1, -1))  # priority -> key
    if len(capacity) == 1:
        missed = _min_misses(keys, (-nxt).tolist(), capacity[0], key_of, num_keys)
    else:
        pools = np.asarray(pool_of, dtype=np.int64)[seq]
        missed = np.zeros(n, dtype=bool)
        for p, cap in enumerate(capacity):
            at = np.flatnonzero(pools == p)
            missed[at[_min_misses(seq[at].tolist(), (-nxt[at]).tolist(), cap, key_of, num_keys)]] = True
    owner = np.repeat(np.arange(len(needed)), lens)
    return np.bincount(owner[missed], minlength=len(needed)).astype(np.int64)


def _min_misses(keys: list[int], neg_prio: list[int], cap: int, key_of: list[int], num_keys: int) -> list[int]:
    """Indices of the misses of MIN on one pool of ``cap`` slots (``neg_prio``: each access's next
    use, negated for the min-heap).

    The heap keeps the priorities pushed since it was last rebuilt. A resident key's latest one is
    a position still ahead (or a never-used-again rank); any other entry is a position already
    passed, so the heap's top at a miss is always the resident key to evict: no staleness checks.
    Passed entries only deepen the heap, so past ``limit`` entries it keeps only those still ahead
    (the residents' latest: unique, so the top is the same)."""
    resident = bytearray(num_keys)
    heap: list[int] = []
    push, replace = heapq.heappush, heapq.heapreplace
    misses = []
    miss = misses.append
    size = 0
    limit = 4 * cap + 64
    for i, key, v in zip(count(), keys, neg_prio):
        if resident[key]:
            push(heap, v)
            if len(heap) > limit:
                heap = [x for x in heap if x < -i]  # priorities (negated) of positions after i
                heapq.heapify(heap)
            continue
        miss(i)
        if size < cap:
            size += 1
            push(heap, v)
        else:
            resident[key_of[-replace(heap, v)]] = 0
        resident[key] = 1
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
