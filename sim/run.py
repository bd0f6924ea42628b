"""From a composed config to results rows: build specs, trace, memory plan, schedule; run each policy.

Everything a run needs is built here from its config alone (no module state), so that sweep jobs
are self-contained and give identical rows under any launcher.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
from omegaconf import DictConfig

from sim.bound import RESETS, compute_bound
from sim.costmodel import CostModel, cost_model_for
from sim.engine import Simulation
from sim.errors import InfeasibleError, SimError
from sim.hardware import HardwareSpec
from sim.memory import MemoryPlan, plan_memory
from sim.metrics import results_row
from sim.policies import EVICTION, PREDICTORS, PREFETCH
from sim.presets import load_preset
from sim.schedule import Schedule
from sim.spec import ModelSpec
from traces import Trace, TraceError, read_trace

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


def load_policy(name: str, where: str = "policy") -> DictConfig:
    """A policy preset file (conf/policy/NAME.yaml) validated against the policy schema."""
    from sim.config import PolicyConf

    try:
        return load_preset("policy", name, PolicyConf)
    except SimError as e:
        raise SimError(f"{where}: {e}") from None


def policy_presets(pcfg: Any) -> list[DictConfig]:
    """The policy itself, or each member of a suite."""
    if not pcfg.get("suite"):
        return [pcfg]
    return [load_policy(name, f"policy suite '{pcfg.name}'") for name in pcfg.suite]


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
    # keys added after results were published hash only when set, so earlier ids stay valid
    keys = {k: v for k, v in keys.items() if not (k == "cache_reset" and v == "never")}
    blob = json.dumps(keys, sort_keys=True, default=str).encode()
    return hashlib.sha1(blob).hexdigest()[:12]


# ------------------------------------------------------------------- runs
@dataclass
class Prepared:
    model: ModelSpec
    hw: HardwareSpec
    trace: Trace
    cost: CostModel
    schedule: Schedule  # the autoregressive plan (speculative runs build their own as they go)
    context_tokens: int
    slots: int | None = None
    per_layer: int | None = None
    plan: MemoryPlan | None = None  # the autoregressive plan at this budget (None: infeasible)
    reset: str = "never"  # cache.reset: 'never' (warm across requests) or 'request' (cold at each start)


def prepare(cfg: DictConfig) -> Prepared:
    model = ModelSpec.from_cfg(cfg.model)
    hw = HardwareSpec.from_cfg(cfg.hardware)
    trace = load_trace(cfg.trace, model)
    ctx = int(cfg.cache.max_context_tokens or int(trace.position.max()) + 1)
    cost = cost_model_for(model, hw)
    reset = str(cfg.cache.get("reset", "never"))
    if reset not in RESETS:
        raise SimError(f"cache.reset must be one of {list(RESETS)}, got '{reset}'")
    prep = Prepared(model, hw, trace, cost, Schedule(trace, model, cost), ctx, cfg.cache.slots, cfg.cache.per_layer,
                    reset=reset)
    try:
        prep.plan = plan_for(prep, speculative=False)
    except InfeasibleError:
        pass
    return prep


def plan_for(prep: Prepared, *, speculative: bool, streaming: bool = False) -> MemoryPlan:
    """The memory plan of one policy: a speculative one keeps its INT4 draft experts resident;
    whole-layer streaming keeps whole layers resident and streams the rest through one layer's slots."""
    return plan_memory(prep.model, prep.hw, max_context_tokens=prep.context_tokens, slots=prep.slots,
                       per_layer=prep.per_layer, draft_resident=speculative, streaming=streaming)


def policy_plan(prep: Prepared, pcfg: DictConfig) -> MemoryPlan:
    """``cache_as: speculative`` gives an autoregressive policy the slot count a speculative policy
    has at this budget, in the same layout (the paper's "same cache"; the draft's memory idles)."""
    if pcfg.decoding not in ("autoregressive", "speculative"):
        raise SimError(f"policy '{pcfg.name}': decoding must be 'autoregressive' or 'speculative', got '{pcfg.decoding}'")
    if pcfg.decoding == "speculative":
        return plan_for(prep, speculative=True)
    if pcfg.get("cache_as") == "speculative":
        spec = plan_for(prep, speculative=True)
        own = plan_for(prep, speculative=False)
        from dataclasses import replace

        return replace(own, slots=spec.slots, per_layer=spec.per_layer, layout=spec.layout)
    if pcfg.get("cache_as"):
        raise SimError(f"policy '{pcfg.name}': cache_as must be null or 'speculative', got '{pcfg.cache_as}'")
    streaming = not PREFETCH.get(pcfg.prefetch).keeps_cache and prep.per_layer is None
    return plan_for(prep, speculative=False, streaming=streaming)


def base_keys(cfg: DictConfig) -> dict[str, Any]:
    return {
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
        "cache_reset": str(cfg.cache.get("reset", "never")),
        "seed": int(cfg.seed),
        # the host-overhead regime: runtime engine=graphed|eager (the simulator's engine group, a name
        # or a node with one); None where the config names none
        "engine": (lambda e: e if e is None or isinstance(e, str) else e.get("name"))(cfg.get("engine")),
    }


def run_policy(prep: Prepared, pcfg: DictConfig, seed: int, *, timeline: bool = False, governor_cfg: Any = None,
               trace_cfg: Any = None, plan: MemoryPlan | None = None, progress: bool = False) -> tuple[dict[str, Any], Any]:
    """One policy on a prepared config: its results row (without config keys) and (sim, log)."""
    from sim.config import TraceConf
    from sim.governor import build_governor
    from sim.speculative import DraftSource

    plan = plan or policy_plan(prep, pcfg)
    eviction = EVICTION.create(pcfg.eviction, **dict(pcfg.eviction_args))
    prefetch = PREFETCH.create(pcfg.prefetch, **dict(pcfg.prefetch_args))
    speculative = pcfg.decoding == "speculative"
    predictor = PREDICTORS.create(pcfg.predictor, **dict(pcfg.predictor_args)) if pcfg.predictor else None
    if speculative and (predictor is not None or pcfg.eviction in ("belady",) or pcfg.prefetch in ("oracle", "history", "lookahead")):
        raise SimError(f"policy '{pcfg.name}': speculative decoding runs with ELB-driven policies "
                       "(prefetch speq, spmoe or none; eviction lru, lfu, fifo or lookahead)")
    depths: tuple[int, ...] = ()
    if predictor is not None:
        depths = tuple(range(1, int(pcfg.prefetch_args.get("depth", 1)) + 1))
    governor = draft = None
    schedule = prep.schedule
    if speculative:
        governor = build_governor(governor_cfg if governor_cfg is not None else {"name": "roofline"})
        tc = trace_cfg if trace_cfg is not None else TraceConf()
        draft = DraftSource(prep.trace, agreement=float(tc.draft_agreement), acceptance=float(tc.acceptance), seed=seed)
        schedule = Schedule(prep.trace, prep.model, prep.cost, build=False)
    bar = None
    if progress:  # quiet when output is not a terminal (tqdm's disable=None), or TQDM_DISABLE=1
        from tqdm import tqdm

        bar = tqdm(total=prep.trace.num_requests, desc=f"{pcfg.name}", unit="request", disable=None, leave=False)
    t0 = time.perf_counter()
    hw, cost = prep.hw, prep.cost
    host_memory = getattr(prefetch, "host_memory", None)  # a policy that copies from its own host memory
    if host_memory and host_memory != hw.host_memory:
        from dataclasses import replace

        hw = replace(hw, host_memory=host_memory)
        cost = cost_model_for(prep.model, hw)
    sim = Simulation(
        schedule, prep.model, hw, cost,
        eviction=eviction, prefetch=prefetch, predictor=predictor,
        slots=None if plan.per_layer else plan.slots, per_layer=plan.per_layer,
        seed=seed, timeline=timeline, lookahead_depths=depths, governor=governor, draft=draft, progress=bar,
        reset=prep.reset,
    )
    log = sim.run()
    wall = time.perf_counter() - t0
    if bar is not None:
        bar.close()
    bound = bound_for(prep, schedule, sim.cache.pool_of, sim.cache.capacity)
    row = results_row(log, bound, prep.model.bytes_per_expert(), prep.model.num_moe_layers)
    row["wall_s"] = wall
    row["slots"], row["layout"] = plan.slots, plan.layout
    if plan.resident_layers is not None:
        row["resident_layers"] = plan.resident_layers
    if host_memory:
        row["host_memory"] = host_memory
    row["prefetches_refused"] = sim.copy.refused
    row["decoding"] = pcfg.decoding
    if speculative:
        row["draft_source"] = draft.source
        row["governor"] = governor.name
    return row, (sim, log)


def bound_for(prep: Prepared, schedule: Schedule, pool_of: list[int], capacity: list[int]):
    """Bound of a (realized) schedule under a slot layout, memoised per schedule and layout."""
    key = (id(schedule), len(schedule.steps), tuple(capacity), tuple(pool_of[:1]), prep.reset)
    bounds = prep.__dict__.setdefault("_bounds", {})
    if key in bounds:
        return bounds[key]
    sch = schedule
    dd = float(prep.hw.decision_delay_s)
    steps = sch.steps
    b = compute_bound(
        sch.needed, sch.g_step, np.array([sch.compute_time(i, dd) for i in range(len(steps))]),
        np.array([s.request for s in steps]), np.array([s.emitted for s in steps], dtype=np.int64),
        sch.trace.num_requests, pool_of, capacity, prep.cost.h2d(prep.model.bytes_per_expert()),
        reset=prep.reset,
    )
    bounds[key] = b
    return b


def simulate(cfg: DictConfig, *, on_policy=None) -> list[dict[str, Any]]:
    """All results rows of one config (one per policy of a suite). A policy whose memory budget
    cannot run gives a row with ``status = infeasible`` and the reason; other errors propagate."""
    load_plugins(cfg.get("plugins") or [])
    presets = policy_presets(cfg.policy)
    keys = base_keys(cfg)
    prep = prepare(cfg)
    rows = []
    for p in presets:
        k = {**keys, "policy": p.name, "eviction": p.eviction, "prefetch": p.prefetch, "predictor": p.predictor}
        if p.decoding == "speculative":
            k["governor"] = cfg.governor.get("name")
            k["governor_k"] = cfg.governor.get("k")
        try:
            plan = policy_plan(prep, p)
        except InfeasibleError as e:
            rows.append({**k, "source": "sim", "status": "infeasible", "reason": e.reason,
                         "config_id": config_id(k), "repetition": 0})
            continue
        row, (sim, log) = run_policy(prep, p, int(cfg.seed), timeline=bool(cfg.timeline_out),
                                     governor_cfg=cfg.get("governor"), trace_cfg=cfg.trace, plan=plan,
                                     progress=bool(cfg.get("progress", False)))
        rows.append({**k, "source": "sim", "status": "ok", "reason": "", "config_id": config_id(k), "repetition": 0, **row})
        if on_policy is not None:
            on_policy(p, sim, log, rows[-1])
    return rows
