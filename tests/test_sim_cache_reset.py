"""cache.reset=request: hit rates of the simulator equal a straightforward, independent cache
implementation, and traces stats' LRU equals the simulator's LRU (one touch-order convention)."""

from __future__ import annotations

import numpy as np
import pytest
from hydra import compose, initialize_config_dir

from sim.config import register_configs
from sim.presets import conf_dir
from sim.run import prepare, simulate
from traces import Trace
from traces.stats import lru_hit_rates

NEVER = 1 << 62


def step_keys(trace: Trace, r: int, a: int, b: int, m: int) -> list[int]:
    """The experts a step over tokens [a, b) needs at MoE ordinal m: a single token's in gate-weight
    order; several tokens' (a prefill) each once, by id."""
    ids = trace.expert_ids[r, a:b, m].reshape(-1).tolist()
    return ids if b - a == 1 else sorted(set(ids))


def reference_hits(trace: Trace, policy: str, c: int) -> tuple[int, int]:
    """Hits and needed experts of on-demand fetching into per-layer caches of c slots, cold at each
    request: the resident experts are hits, the others are fetched one by one, each evicting (when
    the layer's cache is full) a resident expert the step does not need; recency (LRU) and LFU's
    tie-break count the hits as touched first, then the fetched ones, in the step's order."""
    hits = needed = 0
    M = trace.shape.num_moe_layers
    for r in range(trace.num_requests):
        L = int(trace.lengths[r])
        steps = trace.step[r, :L]
        bounds = np.flatnonzero(np.r_[True, steps[1:] != steps[:-1], True])
        spans = list(zip(bounds[:-1].tolist(), bounds[1:].tolist()))
        for m in range(M):
            seq = [step_keys(trace, r, a, b, m) for a, b in spans]
            cache: list[int] = []  # LRU: least recent first; FIFO: oldest first
            count: dict[int, int] = {}
            last: dict[int, int] = {}
            tick = 0
            for i, keys in enumerate(seq):
                needed += len(keys)
                hit = [e for e in keys if e in cache]
                miss = [e for e in keys if e not in cache]
                hits += len(hit)
                for e in miss:
                    if len(cache) >= c:
                        free = [x for x in cache if x not in keys]
                        if policy in ("lru", "fifo"):
                            victim = free[0]
                        elif policy == "lfu":
                            victim = min(free, key=lambda x: (count.get(x, 0), last[x]))
                        else:  # belady: farthest next use within the request, ties to the smallest id
                            def nxt(x: int) -> int:
                                return next((j for j in range(i + 1, len(seq)) if x in seq[j]), NEVER)
                            victim = max(free, key=lambda x: (nxt(x), -x))
                        cache.remove(victim)
                    cache.append(e)
                for e in hit + miss:
                    if policy == "lru":
                        cache.remove(e)
                        cache.append(e)
                    count[e] = count.get(e, 0) + 1
                    tick += 1
                    last[e] = tick
    return hits, needed


def run(overrides: list[str]) -> tuple[dict, Trace]:
    register_configs()
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        cfg = compose(config_name="sim", overrides=[*overrides, "progress=false", "hardware=h200"])
    return simulate(cfg)[0], prepare(cfg).trace


@pytest.mark.parametrize("policy", ["lru", "fifo", "lfu", "belady"])
@pytest.mark.parametrize(("seed", "c", "prompt"), [(0, 2, 1), (1, 3, 1), (2, 4, 2)])
def test_hit_rates_equal_an_independent_implementation(policy: str, seed: int, c: int, prompt: int) -> None:
    row, trace = run(["model=tiny", f"policy={policy}", f"cache.per_layer={c}", "cache.reset=request",
                      "trace.requests=3", f"trace.prompt_tokens={prompt}", "trace.decode_tokens=24",
                      f"trace.seed={seed}"])
    hits, needed = reference_hits(trace, policy, c)
    assert row["status"] == "ok" and row["cache_reset"] == "request"
    assert row["hit_rate"] == hits / needed, (policy, row["hit_rate"], hits / needed)


def test_warm_cache_differs_from_cold():
    """The default (never) keeps the cache across requests: more hits than cold starts."""
    common = ["model=tiny", "policy=lru", "cache.per_layer=4", "trace.requests=4", "trace.decode_tokens=16"]
    warm, _ = run(common)
    cold, _ = run([*common, "cache.reset=request"])
    assert warm["cache_reset"] == "never" and warm["hit_rate"] > cold["hit_rate"]
    assert warm["config_id"] != cold["config_id"]


def decode_only(trace: Trace) -> Trace:
    """The trace's decode tokens alone (positions and steps renumbered from the first)."""
    from traces.stats import select_tokens

    s = select_tokens(trace, "decode")
    R, T = s.valid.shape
    t = np.where(s.valid, np.arange(T)[None, :], -1)
    ids = np.where(s.valid[..., None, None], s.ids, -1).astype(trace.expert_ids.dtype)
    gw = None if s.gate_weights is None else s.gate_weights.astype(np.float32)
    return Trace(shape=trace.shape, request_ids=trace.request_ids.copy(), lengths=s.lengths.astype(np.int32),
                 position=t.astype(np.int32), step=np.where(s.valid, t + 1, -1).astype(np.int32),
                 phase=np.where(s.valid, 1, -1).astype(np.int8), expert_ids=ids, gate_weights=gw)


@pytest.mark.parametrize("c", [2, 3, 5])
def test_traces_stats_lru_equals_the_simulators(c: int, tmp_path) -> None:
    """On a decode-only trace, per-layer LRU of c slots, cold at each request: one convention."""
    from traces import write_trace

    common = ["model=tiny", "policy=lru", f"cache.per_layer={c}", "cache.reset=request"]
    _, synth = run([*common, "trace.requests=3", "trace.decode_tokens=40"])
    path = write_trace(decode_only(synth), tmp_path / "decode.parquet")
    row, trace = run([*common, f"trace.path={path}"])
    assert (trace.phase[trace.valid_mask()] == 1).all()
    assert row["hit_rate"] == pytest.approx(lru_hit_rates(trace, [c])[c].overall, abs=1e-12)
