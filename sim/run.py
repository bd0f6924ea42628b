"""From a composed config to results rows: build specs, trace, memory plan, schedule; run each policy.

Everything a run needs is built here from its config alone (no module state), so that sweep jobs
are self-contained and give identical rows under any launcher.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig, OmegaConf

from sim.bound import compute_bound
from sim.costmodel import CostModel, cost_model_for
from sim.engine import Simulation
from sim.errors import InfeasibleError, SimError
from sim.hardware import HardwareSpec
from sim.memory import MemoryPlan, plan_memory
from sim.metrics import results_row
from sim.policies import EVICTION, PREDICTORS, PREFETCH
from sim.schedule import Schedule
from sim.spec import ModelSpec
from traces import Trace, TraceError, read_trace

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


def conf_dir() -> Path:
    """The shipped configs (a source checkout or an installed ``conf`` package)."""
    if CONF_DIR.is_dir():
        return CONF_DIR
    import conf

    return Path(conf.__file__).resolve().parent


# ------------------------------------------------------------------ inputs
def load_trace(tcfg: Any, model: ModelSpec) -> Trace:
    """The trace file of ``trace.path``, or a seeded synthetic trace of the model preset."""
    if tcfg.path:
        trace = read_trace(tcfg.path)
        check_trace_matches(trace, model, str(tcfg.path))
        return trace
    from dataclasses import replace

    from traces.synth import synth_params_for, synthesize

    try:
        params = synth_params_for(model.name)
    except TraceError:
        params = synth_params_for("tiny")  # dials of a generic family; the shape comes from the model
    params = replace(
        params,
        requests=int(tcfg.requests),
        prompt_tokens=int(tcfg.prompt_tokens),
        decode_tokens=int(tcfg.decode_tokens),
        lookahead_depth=int(tcfg.lookahead_depth),
    )
    return synthesize(params, seed=int(tcfg.seed), shape=model.shape_only())


def check_trace_matches(trace: Trace, model: ModelSpec, where: str) -> None:
    """Every routing field of the trace's shape must equal the model's (no silent truncation)."""

    def show(v):
        v = list(v) if isinstance(v, tuple) else v
        if isinstance(v, list) and len(v) > 6:
            return f"{len(v)} layers {v[:3]}...{v[-1:]}"
        return v

    bad = [
        f"'{f}' is {show(getattr(trace.shape, f))} in the trace but {show(getattr(model, f))} in model '{model.name}'"
        for f in ("num_experts", "top_k", "moe_layers")
        if getattr(trace.shape, f) != getattr(model, f)
    ]
    if bad:
        raise TraceError(
            f"{where}: trace does not match the model: {'; '.join(bad)}. Pick the matching model= preset "
            "(or model.layers=N for a depth-reduced trace)"
        )


def policy_presets(pcfg: Any) -> list[DictConfig]:
    """The policy itself, or each member of a suite, validated against the policy schema."""
    from sim.config import PolicyConf

    if not pcfg.get("suite"):
        return [pcfg]
    out = []
    for name in pcfg.suite:
        path = conf_dir() / "policy" / f"{name}.yaml"
        if not path.is_file():
            known = sorted(p.stem for p in (conf_dir() / "policy").glob("*.yaml"))
            raise SimError(f"policy suite '{pcfg.name}' names unknown policy '{name}'; known: {', '.join(known)}")
        raw = OmegaConf.load(path)
        raw.pop("defaults", None)
        out.append(OmegaConf.merge(OmegaConf.structured(PolicyConf), raw))
    return out


def load_plugins(modules: list[str]) -> None:
    """Import user modules that register policies, predictors or eviction policies."""
    import importlib

    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError as e:
            raise SimError(f"plugins: cannot import module '{name}' ({e})") from None


def config_id(keys: dict[str, Any]) -> str:
    """Hash of the keys that the simulator and the runtime share, so their rows join."""
    blob = json.dumps(keys, sort_keys=True, default=str).encode()
    return hashlib.sha1(blob).hexdigest()[:12]


# ------------------------------------------------------------------- runs
@dataclass
class Prepared:
    model: ModelSpec
    hw: HardwareSpec
    trace: Trace
    cost: CostModel
    plan: MemoryPlan
    schedule: Schedule


def prepare(cfg: DictConfig) -> Prepared:
    model = ModelSpec.from_cfg(cfg.model)
    hw = HardwareSpec.from_cfg(cfg.hardware)
    trace = load_trace(cfg.trace, model)
    ctx = cfg.cache.max_context_tokens or int(trace.position.max()) + 1
    plan = plan_memory(model, hw, max_context_tokens=int(ctx), slots=cfg.cache.slots, per_layer=cfg.cache.per_layer)
    cost = cost_model_for(model, hw)
    schedule = Schedule(trace, model, cost)
    return Prepared(model, hw, trace, cost, plan, schedule)


def base_keys(cfg: DictConfig, prep: Prepared | None) -> dict[str, Any]:
    keys = {
        "model": cfg.model.get("name"),
        "model_layers": cfg.model.get("layers"),
        "hardware": cfg.hardware.get("name"),
        "memory_gb": cfg.hardware.get("memory_gb"),
        "h2d_gbps": cfg.hardware.get("h2d_gbps"),
        "host_memory": cfg.hardware.get("host_memory"),
        "link_pace_gbps": cfg.hardware.get("link_pace_gbps"),
        "trace": str(cfg.trace.path) if cfg.trace.path else f"synth:{cfg.model.get('name')}:{cfg.trace.seed}",
        "cache_slots": cfg.cache.slots,
        "cache_per_layer": cfg.cache.per_layer,
        "seed": int(cfg.seed),
    }
    if prep is not None:
        keys["slots"] = prep.plan.slots
        keys["layout"] = prep.plan.layout
    return keys


def run_policy(prep: Prepared, pcfg: DictConfig, seed: int, *, timeline: bool = False) -> tuple[dict[str, Any], Any]:
    if pcfg.decoding != "autoregressive":
        raise SimError(f"policy '{pcfg.name}': decoding '{pcfg.decoding}' is not available yet (autoregressive only)")
    eviction = EVICTION.create(pcfg.eviction, **dict(pcfg.eviction_args))
    prefetch = PREFETCH.create(pcfg.prefetch, **dict(pcfg.prefetch_args))
    predictor = PREDICTORS.create(pcfg.predictor, **dict(pcfg.predictor_args)) if pcfg.predictor else None
    depths: tuple[int, ...] = ()
    if predictor is not None:
        depths = tuple(range(1, int(pcfg.prefetch_args.get("depth", 1)) + 1))
    plan = prep.plan
    t0 = time.perf_counter()
    sim = Simulation(
        prep.schedule, prep.model, prep.hw, prep.cost,
        eviction=eviction, prefetch=prefetch, predictor=predictor,
        slots=None if plan.per_layer else plan.slots, per_layer=plan.per_layer,
        seed=seed, timeline=timeline, lookahead_depths=depths,
    )
    log = sim.run()
    wall = time.perf_counter() - t0
    bound = bound_for(prep, sim.cache.pool_of, sim.cache.capacity)
    row = results_row(log, bound, prep.model.bytes_per_expert(), prep.model.num_moe_layers)
    row["wall_s"] = wall
    return row, (sim, log)



def bound_for(prep: Prepared, pool_of: list[int], capacity: list[int]):
    """Bound of the schedule under a slot layout (memoised per layout within one prepared run)."""
    key = (id(prep.schedule), tuple(capacity))
    hit = prep.__dict__.setdefault("_bounds", {}).get(key)
    if hit is not None:
        return hit
    sch = prep.schedule
    dd = float(prep.hw.decision_delay_s)
    step_compute = np.array([sch.compute_time(i, dd) for i in range(len(sch.steps))])
    b = compute_bound(
        sch.needed, sch.g_step, step_compute,
        np.array([s.request for s in sch.steps]), np.array([s.phase for s in sch.steps]),
        np.ones(len(sch.steps), dtype=np.int64), sch.trace.num_requests,
        pool_of, capacity, prep.cost.h2d(prep.model.bytes_per_expert()),
    )
    prep.__dict__["_bounds"][key] = b
    return b


def simulate(cfg: DictConfig, *, on_policy=None) -> list[dict[str, Any]]:
    """All results rows of one config (one per policy of a suite). Infeasible budgets give a row
    with ``status = infeasible`` and the reason; other errors propagate."""
    load_plugins(cfg.get("plugins") or [])
    presets = policy_presets(cfg.policy)
    try:
        prep = prepare(cfg)
    except InfeasibleError as e:
        keys = base_keys(cfg, None)
        return [
            {**keys, "policy": p.name, "source": "sim", "status": "infeasible", "reason": e.reason,
             "config_id": config_id({**keys, "policy": p.name})}
            for p in presets
        ]
    keys = base_keys(cfg, prep)
    rows = []
    for p in presets:
        row, (sim, log) = run_policy(prep, p, int(cfg.seed), timeline=bool(cfg.timeline_out))
        k = {**keys, "policy": p.name, "eviction": p.eviction, "prefetch": p.prefetch, "predictor": p.predictor}
        rows.append({**k, "source": "sim", "status": "ok", "reason": "", "config_id": config_id(k), "repetition": 0, **row})
        if on_policy is not None:
            on_policy(p, sim, log, rows[-1])
    return rows
