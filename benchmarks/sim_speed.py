"""Simulator speed: simulated decode tokens per wall-clock second on one core.

Mixtral-8x7B on the RTX 4090 preset at its memory budget, 4 requests x 512 decode tokens (32-token
prompts): on-demand LRU (the judged scenario: its decisions do not depend on the prefetch
admission rule; printed first as ``e2e: N simulated tokens/s``, schedule and bound included), then
LRU with depth-1 lookahead prefetch (the trace's recorded lookahead_1) with its copy count, and a
speculative policy at a fixed draft length k > 1. In the same process a bare SimPy loop of one
timeout per (step, layer) is the reference. Best of N repeats, each variant interleaved so machine
noise hits both alike; the ratio e2e / bare loop is what to compare.

    python benchmarks/sim_speed.py [--repeats 5] [--policy lookahead] [--decode-tokens 512]

Timed parts: ``run`` = the Simulation's construction and replay; ``+schedule`` adds building the
schedule (compute times per layer-step); ``+bound`` adds the bound's computation (Belady over the
whole run). The trace synthesis is not timed.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time

import simpy
from hydra import compose, initialize_config_dir

from sim.config import register_configs
from sim.engine import Simulation
from sim.policies import EVICTION, PREDICTORS, PREFETCH
from sim.run import bound_for, load_policy, policy_presets, prepare, run_policy
from sim.presets import conf_dir
from sim.schedule import Schedule


def bare_simpy(n_events: int, dt: float = 1e-4) -> float:
    env = simpy.Environment()

    def loop():
        for _ in range(n_events):
            yield env.timeout(dt)

    env.process(loop())
    t = time.perf_counter()
    env.run()
    return time.perf_counter() - t


def time_policy(prep, pcfg, repeats: int) -> tuple[dict[str, float], object]:
    """Best of ``repeats``: the run alone, + building the schedule, + the bound; and the bare loop
    of as many events as layer-steps, interleaved so that machine noise hits both alike."""
    n_ls = prep.schedule.num_layer_steps
    best = {"run": 1e9, "+schedule": 1e9, "+bound": 1e9, "bare": 1e9}
    log = None
    for _ in range(repeats):
        t0 = time.perf_counter()
        sch2 = Schedule(prep.trace, prep.model, prep.cost)
        t1 = time.perf_counter()
        depth = int(pcfg.prefetch_args.get("depth", 1))
        sim = Simulation(
            sch2, prep.model, prep.hw, prep.cost,
            eviction=EVICTION.create(pcfg.eviction), prefetch=PREFETCH.create(pcfg.prefetch, **dict(pcfg.prefetch_args)),
            predictor=PREDICTORS.create(pcfg.predictor) if pcfg.predictor else None,
            slots=None if prep.plan.per_layer else prep.plan.slots, per_layer=prep.plan.per_layer,
            lookahead_depths=tuple(range(1, depth + 1)) if pcfg.predictor else (),
        )
        log = sim.run()
        t2 = time.perf_counter()
        prep.__dict__.pop("_bounds", None)
        bound_for(prep, sch2, sim.cache.pool_of, sim.cache.capacity)
        t3 = time.perf_counter()
        best["run"] = min(best["run"], t2 - t1)
        best["+schedule"] = min(best["+schedule"], t2 - t0)
        best["+bound"] = min(best["+bound"], t3 - t0)
        best["bare"] = min(best["bare"], bare_simpy(n_ls))
    return best, log


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--policy", default="lookahead", help="the prefetching scenario beside the lru one")
    ap.add_argument("--model", default="mixtral-8x7b")
    ap.add_argument("--hardware", default="rtx4090")
    ap.add_argument("--requests", type=int, default=4)
    ap.add_argument("--decode-tokens", type=int, default=512)
    ap.add_argument("--speculative", default="speq", help="speculative policy run beside (empty: none)")
    ap.add_argument("--spec-k", type=int, default=4, help="its draft length (fixed governor)")
    ap.add_argument("--spec-memory-gb", type=float, default=40.0,
                    help="budget for the speculative run (Mixtral's INT4 draft does not fit a 24 GB card)")
    a = ap.parse_args()
    register_configs()
    base = [f"model={a.model}", f"hardware={a.hardware}", f"trace.requests={a.requests}", "trace.prompt_tokens=32",
            f"trace.decode_tokens={a.decode_tokens}"]
    print(f"machine: {platform.processor() or platform.machine()}, Python {platform.python_version()}, simpy {simpy.__version__}")
    for i, policy in enumerate(["lru", a.policy]):
        with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
            cfg = compose(config_name="sim", overrides=[*base, f"policy={policy}"])
        prep = prepare(cfg)
        pcfg = policy_presets(cfg.policy)[0]
        decode_tokens = prep.trace.decode_tokens()
        best, log = time_policy(prep, pcfg, a.repeats)
        e2e, bare = decode_tokens / best["+bound"], decode_tokens / best["bare"]
        if i == 0:  # the judged figure: lru decides the same whatever the admission rule does
            print(f"e2e: {e2e:.0f} simulated tokens/s")
            print(f"  (policy lru, schedule + run + bound; bare SimPy loop {bare:.0f} simulated tokens/s in the same run: "
                  f"ratio {e2e / bare:.3f})")
        hits = log.hits / max(1, log.hits + log.late + log.misses)
        print(f"scenario: {a.model} on {a.hardware}, policy {policy}, {prep.plan.slots} slots ({prep.plan.layout}), "
              f"{a.requests} requests x {a.decode_tokens} decode tokens = {decode_tokens} decode tokens, "
              f"{prep.schedule.num_layer_steps} layer-steps; hit rate {hits:.3f}, late {log.late}, copies {log.copies}")
        for k in ("run", "+schedule", "+bound"):
            print(f"  simulator [{k:9s}] {best[k]:.3f} s  {decode_tokens / best[k]:8.0f} simulated tokens/s")
        print(f"  bare SimPy loop      {best['bare']:.3f} s  {bare:8.0f} simulated tokens/s")
        print(f"  ratio e2e / bare loop: {e2e / bare:.3f}")
    if a.speculative:
        with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
            scfg = compose(config_name="sim", overrides=[
                *base, f"hardware.memory_gb={a.spec_memory_gb}", "governor=fixed", f"governor.k={a.spec_k}"])
        sprep = prepare(scfg)
        spec_best, row = 1e9, None
        for _ in range(a.repeats):
            t0 = time.perf_counter()
            row, _ = run_policy(sprep, load_policy(a.speculative), 0, governor_cfg=scfg.governor, trace_cfg=scfg.trace)
            spec_best = min(spec_best, time.perf_counter() - t0)
        print(f"  speculative {a.speculative} at {a.spec_memory_gb} GB (fixed governor, k {a.spec_k}, mean k "
              f"{row['mean_k']:.2f}, {row['slots']} slots): {spec_best:.3f} s incl. schedule and bound, "
              f"{sprep.trace.decode_tokens() / spec_best:8.0f} simulated tokens/s")


if __name__ == "__main__":
    from traces.cli import run_cli

    sys.exit(run_cli(main))
