"""Hydra structured configs of the simulator app (schemas live in the ConfigStore group ``schema``,
so that ``policy=glob(*)`` never sweeps a schema; ecosystem.md §1.4)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING


@dataclass
class PolicyConf:
    """A policy preset bundles eviction, prefetch, predictor and decoding mode (DESIGN.md §3)."""

    name: str = MISSING
    eviction: str = "lru"
    eviction_args: dict[str, Any] = field(default_factory=dict)
    prefetch: str = "none"
    prefetch_args: dict[str, Any] = field(default_factory=dict)
    predictor: Optional[str] = None  # recorded | noisy | oracle
    predictor_args: dict[str, Any] = field(default_factory=dict)
    decoding: str = "autoregressive"  # autoregressive | speculative
    # "speculative": an autoregressive policy given the expert-cache slots a speculative policy has
    # at this budget (the draft's memory left unused): the paper's "same cache" comparison
    cache_as: Optional[str] = None
    suite: list[str] = field(default_factory=list)  # non-empty: run each named preset instead


@dataclass
class TraceConf:
    """``path`` replays a trace file; without it a seeded synthetic trace of the model is built."""

    path: Optional[str] = None
    requests: int = 4
    prompt_tokens: int = 32
    decode_tokens: int = 128
    seed: int = 0
    lookahead_depth: int = 4
    # The draft-quality dials of traces.synth (null: the model preset's value, e.g. acceptance 0.88
    # for Phi-3.5-MoE, 0.9 for Qwen1.5-MoE). They shape the synthetic trace's draft columns, or the
    # stand-in draft of a trace file without draft columns; a trace file with its own draft columns
    # refuses them (its columns win). docs/speculation.md.
    draft_agreement: Optional[float] = None  # P(draft top-k set == target's) per (token, layer)
    draft_wrong_ids: Optional[float] = None  # mean wrong ids in a disagreeing row, in [1, top_k]
    acceptance: Optional[float] = None  # stationary P(draft token accepted)
    acceptance_corr: Optional[float] = None  # lag-1 correlation of acceptance between consecutive tokens


@dataclass
class EngineConf:
    """Host overhead of the decode path (docs/engine.md): ``ideal`` (none), ``graphed``, ``eager``.
    Seconds of host work the GPU waits for, per decoder layer (target and draft separately) and per
    kernel launch. With ``from_hardware``, a hardware profile's ``engine: {NAME: {...}}`` values
    replace these (measured profiles carry them)."""

    name: str = "ideal"
    host_per_layer_s: float = 0.0
    draft_host_per_layer_s: float = 0.0
    host_per_launch_s: float = 0.0
    from_hardware: bool = False


@dataclass
class CacheConf:
    """Expert slots: from the memory budget (both null), one global pool of ``slots``, or
    ``per_layer`` slots in each MoE layer's own partition."""

    slots: Optional[int] = None
    per_layer: Optional[int] = None
    max_context_tokens: Optional[int] = None  # KV cache sized for this; default: the trace's longest request


@dataclass
class SimConf:
    model: Any = MISSING
    hardware: Any = MISSING
    policy: Any = MISSING
    trace: Any = MISSING
    governor: Any = MISSING
    engine: Any = MISSING
    cache: CacheConf = field(default_factory=CacheConf)
    seed: int = 0
    timeline_out: Optional[str] = None
    results_name: str = "results"
    progress: bool = True
    plugins: list[str] = field(default_factory=list)  # modules to import first (they register policies)
    resume: bool = False  # sweeps: reuse the results of finished jobs (docs/sweeps.md)
    experiment: Any = None


def register_configs() -> None:
    """Idempotent: every app and test calls it before composing."""
    from sim.governor import register_governor_schema
    from sim.spec import register_schemas

    register_schemas()
    register_governor_schema()
    cs = ConfigStore.instance()
    cs.store(name="sim_schema", node=SimConf)
    cs.store(group="schema", name="policy", node=PolicyConf)
    cs.store(group="schema", name="trace", node=TraceConf)
    cs.store(group="schema", name="engine", node=EngineConf)
