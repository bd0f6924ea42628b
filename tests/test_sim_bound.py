"""The bound: split per request as the metrics split it, and cold per request with cache.reset=request."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from sim.bound import belady_misses, compute_bound


def bound(needed, step_of_g, compute, request, tokens, R, capacity=(1,), reset="never"):
    return compute_bound(needed, step_of_g, np.asarray(compute, float), np.asarray(request),
                         np.asarray(tokens, np.int64), R, [0] * 16, list(capacity), 1.0, reset=reset)


def test_decode_only_first_token_is_ttft_as_in_the_metrics():
    # one request, three decode steps of one layer-step each; 1 slot, keys 0, 1, 1: misses 1, 1, 0
    b = bound([(0,), (1,), (1,)], [0, 1, 2], [0.5, 0.5, 0.5], [0, 0, 0], [1, 1, 1], 1)
    assert b.ttft_s[0] == pytest.approx(1.0)  # the first step: max(0.5, 1 miss x 1 s)
    assert b.tpot_s[0] == pytest.approx(max(1.0, 1.0) / 2)  # the two later steps, two tokens


def test_prefill_then_decode():
    # prefill (two layer-steps of step 0), then two decode steps
    b = bound([(0,), (1,), (1,), (2,)], [0, 0, 1, 2], [3.0, 0.25, 0.25], [0, 0, 0], [1, 1, 1], 1)
    assert b.ttft_s[0] == pytest.approx(3.0)  # max(3.0, 2 misses)
    assert b.tpot_s[0] == pytest.approx(1.0 / 2)  # max(0.5, 1 miss) over 2 tokens


def test_reset_request_is_cold_and_sees_only_the_request():
    # capacity 2; request 0: a, b, c; request 1: a, b
    needed = [(0,), (1,), (2,), (0,), (1,)]
    warm = bound(needed, [0, 1, 2, 3, 4], [0.1] * 5, [0, 0, 0, 1, 1], [1] * 5, 2, capacity=(2,))
    cold = bound(needed, [0, 1, 2, 3, 4], [0.1] * 5, [0, 0, 0, 1, 1], [1] * 5, 2, capacity=(2,), reset="request")
    assert warm.misses == 4  # c evicts b (a is needed sooner), then a hits and b misses
    assert cold.misses == 5  # 3 + 2 cold misses
    with pytest.raises(ValueError, match="reset"):
        bound(needed, [0, 1, 2, 3, 4], [0.1] * 5, [0, 0, 0, 1, 1], [1] * 5, 2, reset="step")


@given(st.lists(st.lists(st.integers(0, 5), min_size=1, max_size=3, unique=True).map(tuple), min_size=1,
                max_size=30), st.integers(1, 4), st.integers(1, 4))
def test_reset_bound_equals_belady_per_request(needed, cap, R):
    """cache.reset=request: the bound's misses are Belady's from a cold cache on each request alone."""
    n = len(needed)
    req = np.sort(np.arange(n) % R)
    b = bound(needed, list(range(n)), [0.0] * n, req, [1] * n, R, capacity=(max(cap, 3),), reset="request")
    want = sum(int(belady_misses([needed[g] for g in range(n) if req[g] == r], [0] * 16, [max(cap, 3)]).sum())
               for r in range(R))
    assert b.misses == want


def naive_min_misses(needed, pool_of, capacity):
    """MIN as the docstring states it, one access at a time: on a miss in a full pool, evict the
    resident expert whose next access is farthest (never again: above every position, the
    smallest key first)."""
    seq = [(g, key) for g, keys in enumerate(needed) for key in keys]
    resident = [set() for _ in capacity]
    out = [0] * len(needed)
    for i, (g, key) in enumerate(seq):
        pool = resident[pool_of[key]]
        if key in pool:
            continue
        out[g] += 1
        if len(pool) >= capacity[pool_of[key]]:
            def rank(k):
                nxt = next((j for j in range(i + 1, len(seq)) if seq[j][1] == k), None)
                return (nxt, 0) if nxt is not None else (len(seq), -k)
            pool.remove(max(pool, key=rank))
        pool.add(key)
    return out


@given(st.lists(st.lists(st.integers(0, 11), min_size=1, max_size=4, unique=True).map(tuple), min_size=100,
                max_size=300), st.integers(1, 5), st.booleans())
def test_belady_misses_equal_a_naive_min(needed, cap, two_pools):
    """Long runs (the replay drops its heap's passed entries past 4 x slots + 64) with one pool or
    two: the same misses per layer-step as the naive replay."""
    pool_of = [k % 2 if two_pools else 0 for k in range(12)]
    capacity = [cap, cap + 1] if two_pools else [cap]
    assert belady_misses(needed, pool_of, capacity).tolist() == naive_min_misses(needed, pool_of, capacity)
