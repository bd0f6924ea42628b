"""The simulator app's config, defined once: the schemas of the groups without a spec of their own
(policy, trace, cache) and of the app itself, registered in Hydra's ConfigStore with the model,
hardware and governor schemas (``ModelConf``, ``HardwareConf`` are derived from the specs; see
sim/presets.py).

Schemas live in the ConfigStore group ``schema``, so that ``policy=glob(*)`` never sweeps a schema;
presets pull theirs in with ``defaults: [/schema/<group>@_here_, _self_]``. ``python -m sim.config``
prints every key with its default and help.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from sim.errors import SimError
from sim.governor import GovernorConf
from sim.hardware import HardwareConf
from sim.presets import help_of, load_preset, setting
from sim.spec import ModelConf


@dataclass
class PolicyConf:
    """A policy preset bundles eviction, prefetch, predictor and decoding mode (docs/architecture.md)."""

    name: str = setting(MISSING, "the preset's name (results column policy)")
    eviction: str = setting("lru", "eviction policy (EVICTION registry: lru, lfu, fifo, belady, lookahead, ...)")
    eviction_args: dict[str, Any] = setting({}, "keyword arguments of the eviction policy")
    prefetch: str = setting("none", "prefetch policy (PREFETCH registry: none, oracle, history, lookahead, speq, ...)")
    prefetch_args: dict[str, Any] = setting({}, "keyword arguments of the prefetch policy (depth, ...)")
    predictor: Optional[str] = setting(None, "routing predictor (PREDICTORS registry: recorded | noisy | oracle)")
    predictor_args: dict[str, Any] = setting({}, "keyword arguments of the predictor")
    decoding: str = setting("autoregressive", "autoregressive | speculative (draft/verify cycles, a governor picks k)")
    cache_as: Optional[str] = setting(
        None, "speculative: an autoregressive policy given the expert-cache slots a speculative policy has at this "
              "budget (the draft's memory left unused): the 'same cache' comparison; autoregressive: a speculative "
              "policy given the slots an autoregressive one has (as if its draft took no memory)")
    layout: Optional[str] = setting(
        None, "per_layer: the budget's expert slots split evenly over the MoE layers (a per-layer cache, as "
              "offloading stacks keep one per layer); null: cache.slots / cache.per_layer / one global pool")
    governor: Optional[dict[str, Any]] = setting(
        None, "speculative: governor settings for this policy only, over the run's governor= ({name: fixed, k: 4})")
    engine: Optional[str] = setting(None, "a conf/engine preset for this policy only (the paper-like baseline: eager)")
    admission: bool = setting(
        True, "the host's prefetch admission rule (docs/metrics.md): a prefetch goes out only when it pays for "
        "itself; false: every prefetch goes out (an ablation)")
    suite: list[str] = setting([], "non-empty: run each named preset instead (one results row each)")


@dataclass
class TraceConf:
    """``path`` replays a trace file; without it a seeded synthetic trace of the model is built."""

    path: Optional[str] = setting(None, "a trace file (Parquet) to replay; its shape must match the model")
    requests: int = setting(4, "synthetic trace: requests")
    prompt_tokens: int = setting(32, "synthetic trace: prompt tokens per request")
    decode_tokens: int = setting(128, "synthetic trace: decoded tokens per request")
    seed: Optional[int] = setting(None, "synthetic trace (and stand-in draft): seed; null: the run's seed=, so "
                                        "seed= alone changes the trace too")
    lookahead_depth: int = setting(4, "synthetic trace: layers of lookahead routing recorded per step")
    # The draft-quality dials of traces.synth (null: the model preset's value). They shape the
    # synthetic trace's draft columns, or the stand-in draft of a trace file without draft columns;
    # a trace file with its own draft columns refuses them (its columns win). docs/speculation.md.
    draft_agreement: Optional[float] = setting(
        None, "draft quality: P(the draft's top-k set equals the target's) per (token, layer); null: the model "
              "preset's (0.9-0.92)")
    draft_wrong_ids: Optional[float] = setting(
        None, "draft quality: mean wrong ids in a disagreeing draft row, in [1, top_k]; null: the preset's (1)")
    acceptance: Optional[float] = setting(
        None, "draft quality: stationary P(a draft token is accepted); null: the model preset's (0.88 or 0.9)")
    acceptance_corr: Optional[float] = setting(
        None, "draft quality: lag-1 correlation of acceptance between consecutive tokens (two-state Markov), "
              "in [0, 1]; null: the preset's (0: i.i.d.)")


@dataclass
class EngineConf:
    """Host overhead of the decode path (docs/engine.md): ``ideal`` (none), ``graphed``, ``eager``."""

    name: str = setting("ideal", "ideal | graphed | eager: the decode path (the GPU runtime's engine= switch too)")
    host_per_layer_s: float = setting(0.0, "host time the GPU waits for per target decoder layer, s")
    draft_host_per_layer_s: float = setting(0.0, "host time the GPU waits for per draft decoder layer, s")
    host_per_launch_s: float = setting(0.0, "host time per kernel launch (target and draft), s")
    host_per_expert_s: float = setting(
        0.0, "host time per routed expert a target layer runs, after the routing read (the executor's "
             "per-expert dispatch); the experts phase lasts the longer of their kernels and this x experts, s")
    from_hardware: bool = setting(
        False, "take the four values from the hardware profile's engine.<name> where it has them (measured)")


@dataclass
class CacheConf:
    """Expert slots: from the memory budget (both null), one global pool of ``slots``, or
    ``per_layer`` slots in each MoE layer's own partition."""

    slots: Optional[int] = setting(None, "one global pool of this many expert slots; null: from the memory budget")
    per_layer: Optional[int] = setting(None, "this many slots in each MoE layer's own partition")
    max_context_tokens: Optional[int] = setting(
        None, "the KV cache is sized for this context; null: the trace's longest request")
    reset: str = setting(
        "never", "'never': the cache stays warm across requests (as a server runs them); 'request': cold at each "
        "request's start, every policy's state cleared and Belady's future ending with the request (as trace "
        "studies count hit rates)")


@dataclass
class RunBase:
    """What every app that runs policies shares (``python -m sim``, ``python -m runtime``)."""

    model: Any = setting(MISSING, "a conf/model preset (model=mixtral-8x7b; model.layers=N: the first N layers)")
    hardware: Any = setting(MISSING, "a conf/hardware preset (hardware=h200; hardware.memory_gb=40: the budget)")
    policy: Any = setting(MISSING, "a conf/policy preset or suite")
    trace: Any = setting(MISSING, "conf/trace/synth.yaml, or trace.path=FILE")
    governor: Any = setting(MISSING, "speculative policies: conf/governor preset (roofline | fixed)")
    cache: CacheConf = setting(CacheConf(), "expert-cache layout (default: from the memory budget)")
    dtype: str = setting("auto", "weights' dtype, part of config_id: auto (the simulator: the model preset's, bf16; "
                                 "the runtime: bf16 on a GPU, fp32 on the CPU, a checkpoint's own) | bf16 | fp16 | fp32")
    seed: int = setting(0, "the run's seed: the synthetic trace's (unless trace.seed= is set), noisy predictors', "
                           "draft acceptance's")
    timeline_out: Optional[str] = setting(None, "Chrome/Perfetto trace JSON of the run (one per policy of a suite)")
    results_name: str = setting("results", "results file stem (<name>.parquet / .json in the run dir)")
    plugins: list[str] = setting([], "modules to import first: they register your own policies and predictors")
    experiment: Any = setting(None, "a conf/experiment preset (sweeps, search)")


@dataclass
class SimConf(RunBase):
    """The simulator app, ``python -m sim`` (ConfigStore name ``sim_schema``)."""

    engine: Any = setting(MISSING, "conf/engine preset: host overhead of the decode path (ideal | graphed | eager)")
    progress: bool = setting(True, "a progress bar per policy (on a terminal)")
    resume: bool = setting(False, "sweeps: reuse the results of finished jobs (docs/sweeps.md)")


#: group -> schema, as registered under ``schema/<group>``
GROUP_SCHEMAS: dict[str, type] = {
    "model": ModelConf, "hardware": HardwareConf, "policy": PolicyConf, "trace": TraceConf, "governor": GovernorConf,
    "engine": EngineConf,
}


def register_configs() -> None:
    """Idempotent: every app and test calls it before composing."""
    cs = ConfigStore.instance()
    for group, schema in GROUP_SCHEMAS.items():
        cs.store(group="schema", name=group, node=schema)
    cs.store(name="sim_schema", node=SimConf)


def load_group_file(group: str, option: str, root: Path | None = None) -> Any:
    """conf/<group>/<option>.yaml composed with its schema, without Hydra (a DictConfig)."""
    if group not in GROUP_SCHEMAS:
        raise SimError(f"no schema for config group '{group}'; known: {sorted(GROUP_SCHEMAS)}")
    return load_preset(group, option, GROUP_SCHEMAS[group], root)


def describe(schema: type, prefix: str = "") -> list[tuple[str, str, str]]:
    """(key, default, help) of every field of a schema, nested dataclasses flattened."""
    out = []
    for f in dataclasses.fields(schema):
        if f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = f.default
        if dataclasses.is_dataclass(default):
            out += describe(type(default), f"{prefix}{f.name}.")
            continue
        out.append((prefix + f.name, _yaml(default), help_of(f)))
    return out


def _yaml(v: Any) -> str:
    """A default as it is written in YAML (``(required)``: a preset or the command line sets it)."""
    if isinstance(v, str):
        return "(required)" if v == MISSING else (v or '""')
    return json.dumps(v)


def reference() -> str:
    """Markdown: every config group's keys, defaults and help (docs/config.md is this text)."""
    lines = ["# Config reference", "",
             "Generated by `python -m sim.config` from the schemas (sim/config.py, sim/spec.py, sim/hardware.py,",
             "sim/governor.py); a test keeps this page current. Override any key on the command line",
             "(`hardware.memory_gb=40`); a preset (conf/<group>/NAME.yaml) sets the required ones.", ""]
    groups = [("the app (`python -m sim`)", SimConf, "")] + [(f"`{g}`", s, f"{g}.") for g, s in GROUP_SCHEMAS.items()]
    for title, schema, prefix in groups:
        lines += [f"## {title}", "", "| key | default | meaning |", "|---|---|---|"]
        for key, default, text in describe(schema, prefix):
            if schema is SimConf and key in GROUP_SCHEMAS:
                continue
            lines.append(f"| `{key}` | `{default}` | {text.replace('|', '/')} |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.stdout.write(reference())
