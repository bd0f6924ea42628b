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
from omegaconf import DictConfig, OmegaConf

from sim.bound import RESETS, compute_bound
from sim.config import TraceConf
from sim.costmodel import CostModel, HostOverhead, cost_model_for
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
from traces.errors import MoeOffloadError

# ------------------------------------------------------------------ inputs
DRAFT_DIALS = ("draft_agreement", "draft_wrong_ids", "acceptance", "acceptance_corr")


def draft_dials(tcfg: Any) -> dict[str, float]:
    """The draft-quality dials set in the trace config (null ones are left to the model preset)."""
    out = {}
    for f in DRAFT_DIALS:
        v = getattr(tcfg, f, None)
        if v is None:
            continue
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise SimError(f"trace.{f} must be a number, got {v!r}")
        out[f] = float(v)
    return out


def synth_params(model: ModelSpec, tcfg: Any):
    """The model preset's synthetic-trace dials with the trace config's overrides."""
    from dataclasses import replace

    from traces.synth import synth_params_for

    try:
        params = synth_params_for(model.name)
    except TraceError:
        params = synth_params_for("tiny")  # dials of a generic family; the shape comes from the model
    return replace(
        params,
        requests=int(tcfg.requests),
        prompt_tokens=int(tcfg.prompt_tokens),
        decode_tokens=int(tcfg.decode_tokens),
        lookahead_depth=int(tcfg.lookahead_depth),
        **draft_dials(tcfg),
    )


def _check_dials(params: Any, model: ModelSpec) -> None:
    """Range checks of the draft dials, worded for the sim config (trace.NAME)."""
    try:
        params.validate(model.shape_only())
    except TraceError as e:
        msg = str(e)
        for f in DRAFT_DIALS:
            if msg.startswith(f"SynthParams.{f} "):
                raise SimError("trace." + msg[len("SynthParams."):]) from None
        raise


def load_trace(tcfg: Any, model: ModelSpec) -> Trace:
    """The trace file of ``trace.path``, or a seeded synthetic trace of the model preset. A trace
    file with its own draft columns refuses the draft dials (its columns win); one without gets a
    stand-in draft from them when a speculative policy asks (``speculative_trace``)."""
    params = synth_params(model, tcfg)
    _check_dials(params, model)
    if tcfg.path:
        trace = read_trace(tcfg.path)
        check_trace_matches(trace, model, str(tcfg.path))
        dials = draft_dials(tcfg)
        if trace.draft is not None and dials:
            names = ", ".join(f"trace.{f}={v:g}" for f, v in dials.items())
            raise SimError(f"{tcfg.path}: {names} cannot apply: the trace carries its own draft columns, "
                           "which win; unset them")
        return trace
    from traces.synth import synthesize

    return synthesize(params, seed=int(tcfg.seed or 0), shape=model.shape_only())


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


def resolve_trace_seed(cfg: DictConfig) -> int:
    """``trace.seed`` null means the run's ``seed``: written into the config (idempotent) so that
    the trace, its stand-in draft, the config keys and the saved config all show the seed used."""
    from omegaconf import open_dict

    if cfg.trace.get("seed") is None:
        with open_dict(cfg):
            cfg.trace.seed = int(cfg.get("seed", 0) or 0)
    return int(cfg.trace.seed)


def run_dtype(cfg: DictConfig, model: ModelSpec | None = None) -> str:
    """The run's float dtype: ``dtype=``, or with ``auto`` the model preset's (bf16; bf16 beside
    quantized experts). The runtime writes the dtype it actually loaded into ``dtype`` first."""
    from sim.spec import FLOAT_BYTES

    d = str(cfg.get("dtype", "auto") or "auto")
    if d == "auto":
        exp = (model.expert_dtype if model is not None else cfg.model.get("expert_dtype")) or "bf16"
        return exp if exp in FLOAT_BYTES else "bf16"
    if d not in FLOAT_BYTES:
        raise SimError(f"dtype must be auto, {', '.join(FLOAT_BYTES)}; got {d!r}")
    return d


def model_for(cfg: DictConfig) -> ModelSpec:
    """The model spec at the run's dtype (quantized experts keep theirs)."""
    from sim.spec import FLOAT_BYTES

    model = ModelSpec.from_cfg(cfg.model)
    d = run_dtype(cfg, model)
    return model.with_expert_dtype(d) if model.expert_dtype in FLOAT_BYTES and d != model.expert_dtype else model


def prepare(cfg: DictConfig, trace: Trace | None = None) -> Prepared:
    """Specs, trace (``trace``, else ``cfg.trace``'s), cost model, schedule and memory plan of a config."""
    resolve_trace_seed(cfg)
    model = model_for(cfg)
    hw = HardwareSpec.from_cfg(cfg.hardware)
    if trace is None:
        trace = load_trace(cfg.trace, model)
    mct = cfg.cache.max_context_tokens
    if mct is not None and int(mct) < 1:
        raise SimError(f"cache.max_context_tokens must be >= 1 (or null: the trace's longest request), got {mct}")
    ctx = int(mct or int(trace.position.max()) + 1)
    cost = cost_model_for(model, hw, host=HostOverhead.from_cfg(cfg.get("engine"), hw))
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


def with_engine(prep: Prepared, name: str | None) -> Prepared:
    """``prep`` with the host overhead of conf/engine/NAME.yaml (a policy's own ``engine``): the same
    trace and budget, another cost model and schedule. Memoised per name."""
    if not name or name == prep.cost.host.name:
        return prep
    variants = prep.__dict__.setdefault("_engines", {})
    if name not in variants:
        from dataclasses import replace

        from sim.config import load_group_file

        host = HostOverhead.from_cfg(load_group_file("engine", name), prep.hw)
        cost = cost_model_for(prep.model, prep.hw, host=host)
        variants[name] = replace(prep, cost=cost, schedule=Schedule(prep.trace, prep.model, cost))
    return variants[name]


def plan_for(prep: Prepared, *, speculative: bool, streaming: bool = False) -> MemoryPlan:
    """The memory plan of one policy: a speculative one keeps its INT4 draft experts resident;
    whole-layer streaming keeps whole layers resident and streams the rest through one layer's slots."""
    return plan_memory(prep.model, prep.hw, max_context_tokens=prep.context_tokens, slots=prep.slots,
                       per_layer=prep.per_layer, draft_resident=speculative, streaming=streaming)


def policy_plan(prep: Prepared, pcfg: DictConfig) -> MemoryPlan:
    """The policy's memory plan. ``cache_as`` lends it the slot count of the other decoding mode at
    this budget, in the same layout: ``speculative`` for an autoregressive policy (the paper's "same
    cache"; the draft's memory idles), ``autoregressive`` for a speculative one (as if its draft took
    no memory). ``layout: per_layer`` splits the slots evenly over the MoE layers."""
    from dataclasses import replace

    if pcfg.decoding not in ("autoregressive", "speculative"):
        raise SimError(f"policy '{pcfg.name}': decoding must be 'autoregressive' or 'speculative', got '{pcfg.decoding}'")
    other = {"autoregressive": "speculative", "speculative": "autoregressive"}[pcfg.decoding]
    cache_as = pcfg.get("cache_as")
    if cache_as not in (None, other):
        raise SimError(f"policy '{pcfg.name}': cache_as must be null or '{other}' for a {pcfg.decoding} policy, "
                       f"got '{cache_as}'")
    layout = pcfg.get("layout")
    if layout not in (None, "per_layer"):
        raise SimError(f"policy '{pcfg.name}': layout must be null or 'per_layer', got '{layout}'")
    streaming = (pcfg.decoding == "autoregressive" and not PREFETCH.get(pcfg.prefetch).keeps_cache
                 and prep.per_layer is None and not cache_as and not layout)
    own = plan_for(prep, speculative=pcfg.decoding == "speculative", streaming=streaming)
    if cache_as:
        lent = plan_for(prep, speculative=cache_as == "speculative")
        own = replace(own, slots=lent.slots, per_layer=lent.per_layer, layout=lent.layout)
    if layout == "per_layer" and own.per_layer is None:
        per = own.slots // prep.model.num_moe_layers
        if per < 1:
            raise InfeasibleError(f"policy '{pcfg.name}': {own.slots} slots leave none per MoE layer "
                                  f"({prep.model.num_moe_layers} layers)")
        own = replace(own, slots=per * prep.model.num_moe_layers, per_layer=per, layout="per_layer")
    return own


def engine_name(cfg: DictConfig) -> str:
    """The host-overhead regime of a config: ``engine.name`` (the simulator's group node) or
    ``engine`` (a plain name: the GPU runtime's engine=graphed|eager, which then puts the resolved
    one in its keys); ``ideal`` when absent."""
    e = cfg.get("engine") if "engine" in cfg else None
    if e is None:
        return "ideal"
    return str(e) if isinstance(e, str) else str(e.get("name", "ideal"))


def memory_gb(hcfg: Any) -> float | None:
    """The budget in GB (1e9 B): ``memory_gib`` x 2^30 / 1e9 when set, else ``memory_gb``."""
    gib = hcfg.get("memory_gib")
    return float(gib) * 2**30 / 1e9 if gib is not None else hcfg.get("memory_gb")


def base_keys(cfg: DictConfig) -> dict[str, Any]:
    resolve_trace_seed(cfg)
    return {
        "model": cfg.model.get("name"),
        "model_layers": cfg.model.get("layers"),
        "hardware": cfg.hardware.get("name"),
        "memory_gb": memory_gb(cfg.hardware),
        "memory_gib": cfg.hardware.get("memory_gib"),
        "engine": engine_name(cfg),
        "h2d_gbps": cfg.hardware.get("h2d_gbps"),
        "host_memory": cfg.hardware.get("host_memory"),
        "link_pace_gbps": cfg.hardware.get("link_pace_gbps"),
        "trace": str(cfg.trace.path) if cfg.trace.path else f"synth:{cfg.model.get('name')}:{cfg.trace.seed}",
        "cache_slots": cfg.cache.slots,
        "cache_per_layer": cfg.cache.per_layer,
        "cache_reset": str(cfg.cache.get("reset", "never")),
        "seed": int(cfg.seed),
        "dtype": run_dtype(cfg),
    }


def run_policy(prep: Prepared, pcfg: DictConfig, seed: int, *, timeline: bool = False, governor_cfg: Any = None,
               trace_cfg: Any = None, plan: MemoryPlan | None = None, progress: bool = False,
               decisions: Any = None, record: bool = False) -> tuple[dict[str, Any], Any]:
    """One policy on a prepared config: its results row (without config keys) and (sim, log).

    ``decisions`` (a sim.decisions.DecisionLog): replay a recorded run's decisions instead of the
    policy's own: its prefetches (sim.policies.replay.ReplayPrefetch) beside the policy's eviction
    (its recorded victims where the eviction follows the prefetch policy's predictions:
    ReplayEviction), and, speculative, its k per cycle (sim.governor.PlaybackGovernor).
    ``record``: record this run's decisions (the simulation's ``recorder``)."""
    from sim.governor import PlaybackGovernor, build_governor
    from sim.speculative import DraftSource

    plan = plan or policy_plan(prep, pcfg)
    eviction = EVICTION.create(pcfg.eviction, **dict(pcfg.eviction_args))
    if decisions is None and pcfg.prefetch == "replay":  # the command line: a decisions file
        from sim.decisions import DecisionLog

        path = pcfg.prefetch_args.get("decisions")
        if not path:
            raise SimError("policy.prefetch=replay needs +policy.prefetch_args.decisions=<decisions file>")
        decisions = DecisionLog.load(path)
    if decisions is not None:
        from sim.policies.replay import ReplayEviction

        prefetch = PREFETCH.create("replay", decisions=decisions)
        if getattr(eviction, "follows_prefetch", False):
            eviction = ReplayEviction(eviction, decisions)
    else:
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
        if decisions is not None:
            governor = PlaybackGovernor(decisions.ks())
        else:
            governor = build_governor(governor_cfg if governor_cfg is not None else {"name": "roofline"})
        draft = DraftSource(speculative_trace(prep, trace_cfg))
        schedule = Schedule(prep.trace, prep.model, prep.cost, build=False)
    bar = None
    if progress:  # quiet when output is not a terminal (tqdm's disable=None), or TQDM_DISABLE=1
        from tqdm import tqdm

        bar = tqdm(total=prep.trace.num_requests, desc=f"{pcfg.name}", unit="request", disable=None, leave=False)
    t0 = time.perf_counter()
    hw, cost = policy_link(prep.model, prep.hw, prep.cost, prefetch)
    host_memory = getattr(prefetch, "host_memory", None)
    sim = Simulation(
        schedule, prep.model, hw, cost,
        eviction=eviction, prefetch=prefetch, predictor=predictor,
        slots=None if plan.per_layer else plan.slots, per_layer=plan.per_layer,
        seed=seed, timeline=timeline, lookahead_depths=depths, governor=governor, draft=draft, progress=bar,
        reset=prep.reset, admission=bool(pcfg.get("admission", True)), record_decisions=record,
    )
    log = sim.run()
    wall = time.perf_counter() - t0
    if bar is not None:
        bar.close()
    bound = bound_for(prep, schedule, sim.cache.pool_of, sim.cache.capacity)
    row = results_row(log, bound, prep.model.bytes_per_expert(), prep.model.num_moe_layers)
    row["wall_s"] = wall
    row.update(prep.cost.host.columns())
    row.update(prefetch.summary())
    row["prefetches_refused"] = sim.cache.refused
    row["engine_values"] = prep.cost.host.source
    row["slots"], row["layout"] = plan.slots, plan.layout
    if plan.resident_layers is not None:
        row["resident_layers"] = plan.resident_layers
    if host_memory:
        row["host_memory"] = host_memory
    row["prefetches_refused"] = sim.copy.refused
    row["decoding"] = pcfg.decoding
    if speculative:
        stand_in = draft.trace.meta.get("draft_stand_in")
        row["draft_source"] = "trace" if stand_in is None else "stand-in({})".format(
            ", ".join(f"{f}={stand_in[f]:g}" for f in DRAFT_DIALS))
        row["governor"] = governor.name
        if decisions is not None:
            row["replay_k_capped"] = governor.capped
            row["replay_cycles_unreached"] = len(governor.ks) - governor.i
    if decisions is not None and hasattr(eviction, "fallbacks"):
        row["replay_eviction_fallbacks"] = eviction.fallbacks
    return row, (sim, log)


def speculative_trace(prep: Prepared, tcfg: Any) -> Trace:
    """The trace with draft columns: its own, or (once per prepared config) a stand-in drawn with
    the draft dials (the model preset's where the trace config leaves them null)."""
    if prep.trace.draft is not None:
        return prep.trace
    cached = prep.__dict__.get("_draft_trace")
    if cached is None:
        from traces.synth import with_draft

        tcfg = tcfg if tcfg is not None else TraceConf()
        cached = prep.__dict__["_draft_trace"] = with_draft(prep.trace, synth_params(prep.model, tcfg), int(tcfg.seed or 0))
    return cached


def policy_link(model: ModelSpec, hw: HardwareSpec, cost: CostModel, prefetch: Any) -> tuple[HardwareSpec, CostModel]:
    """The hardware and cost model a policy's copies see: a policy that copies from its own kind
    of host memory (whole-layer streaming: pageable, as accelerate's offload) gets that curve."""
    host_memory = getattr(prefetch, "host_memory", None)
    if not host_memory or host_memory == hw.host_memory:
        return hw, cost
    from dataclasses import replace

    hw = replace(hw, host_memory=host_memory)
    return hw, cost_model_for(model, hw)


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


def policy_governor(cfg: DictConfig, p: DictConfig) -> Any:
    """The governor a policy runs with: the config's, merged with the policy preset's own keys."""
    gov = cfg.get("governor")
    if p.get("governor"):
        gov = OmegaConf.merge(gov, p.governor) if gov is not None else OmegaConf.create(dict(p.governor))
    return gov


def policy_keys(keys: dict[str, Any], p: DictConfig, gov: Any, engine: str) -> dict[str, Any]:
    """The config keys of one policy's row (what its ``config_id`` hashes)."""
    k = {**keys, "policy": p.name, "eviction": p.eviction, "prefetch": p.prefetch, "predictor": p.predictor,
         "engine": engine}
    if p.decoding == "speculative":
        k["governor"] = gov.get("name")
        k["governor_k"] = gov.get("k")
    return k


def refused_row(k: dict[str, Any], e: MoeOffloadError) -> dict[str, Any]:
    """The row of a policy that did not run: its status (infeasible, unsupported, failed) and reason."""
    return {**k, "source": "sim", "status": e.status, "reason": e.reason, "config_id": config_id(k), "repetition": 0}


def simulate(cfg: DictConfig, *, on_policy=None, on_row=None, strict: bool = False) -> list[dict[str, Any]]:
    """All results rows of one config (one per policy of a suite), ``on_row(row)`` as each finishes.

    A policy that cannot run gives a row with its ``status`` and ``reason``: infeasible (its memory
    budget), unsupported (e.g. a trace column it needs), or, in a suite, failed (any other
    :class:`MoeOffloadError`, such as a bad argument); a single policy's bad argument propagates, as
    do bugs. ``strict`` (the CLI): refuse before any work when no policy can run, and let a single
    named policy's error of any status propagate instead of becoming a row.
    """
    load_plugins(cfg.get("plugins") or [])
    presets = policy_presets(cfg.policy)
    keys = base_keys(cfg)
    base = prepare(cfg)
    single = not cfg.policy.get("suite")

    def recorded(e: MoeOffloadError) -> bool:
        return not single or (not strict and e.status != "failed")

    plans: list[tuple[DictConfig, Prepared, Any, dict[str, Any], Any]] = []
    for p in presets:
        prep = with_engine(base, p.get("engine"))
        gov = policy_governor(cfg, p)
        k = policy_keys(keys, p, gov, prep.cost.host.name)
        try:
            plans.append((p, prep, gov, k, policy_plan(prep, p)))
        except MoeOffloadError as e:
            if not recorded(e):
                raise
            plans.append((p, prep, gov, k, e))
    if strict and all(isinstance(plan, MoeOffloadError) for *_, plan in plans):
        by_reason: dict[str, list[str]] = {}
        for p, *_, plan in plans:
            by_reason.setdefault(plan.reason, []).append(p.name)
        raise SimError(f"no policy of suite '{cfg.policy.get('name')}' can run: "
                       + "; ".join(f"{', '.join(names)}: {why}" for why, names in by_reason.items()))
    rows = []
    for p, prep, gov, k, plan in plans:
        if isinstance(plan, MoeOffloadError):
            rows.append(refused_row(k, plan))
        else:
            try:
                row, (sim, log) = run_policy(prep, p, int(cfg.seed), timeline=bool(cfg.timeline_out),
                                             governor_cfg=gov, trace_cfg=cfg.trace, plan=plan,
                                             progress=bool(cfg.get("progress", False)))
            except MoeOffloadError as e:
                if not recorded(e):
                    raise
                rows.append(refused_row(k, e))
            else:
                rows.append({**k, "source": "sim", "status": "ok", "reason": "", "config_id": config_id(k),
                             "repetition": 0, **row})
                if on_policy is not None:
                    on_policy(p, sim, log, rows[-1])
        if on_row is not None:
            on_row(rows[-1])
    return rows
