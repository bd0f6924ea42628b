"""Policy search: Optuna's seeded TPE sampler over policy parameters for the lowest TPOT (or another
metric) of one model and hardware, each trial's config built with Hydra's compose API; the best
configuration is reported against the default (docs/sweeps.md#policy-search).

``python -m sim.sweep search [OVERRIDES]`` (= ``experiment=search``; conf/experiment/search.yaml
holds the space) runs it. Deterministic: one process, trials in sequence, a seeded sampler and a
deterministic simulator.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import pandas as pd
from omegaconf import DictConfig, OmegaConf

from sim.errors import SimError
from sim.presets import conf_dir
from traces import TraceError
from traces.atomic import write_json_atomic, write_text_atomic


@dataclass(frozen=True)
class Param:
    """One search dimension: ``choices`` (categorical), ``int`` or ``float`` [low, high]; ``when``
    makes it conditional on earlier parameters' values (e.g. depth only for policy=lookahead).
    ``name`` is Optuna's parameter name and ``key`` the config key it sets (the same unless the
    spec gives ``key:``, so that one key can have different ranges under different conditions)."""

    name: str
    kind: str
    key: str = ""
    choices: tuple[Any, ...] = ()
    low: float = 0
    high: float = 0
    step: float | None = None
    log: bool = False
    when: tuple[tuple[str, Any], ...] = ()


def parse_space(params: Mapping[str, Any]) -> list[Param]:
    """``{name: {choices: [...]} | {int: [lo, hi], step?, log?} | {float: [lo, hi], step?, log?},
    when?: {earlier_name: value}, key?: config.key}``."""
    out: list[Param] = []
    for name, spec in params.items():
        if not isinstance(spec, Mapping):
            raise SimError(f"search.params.{name}: expected a mapping with choices, int or float, got {spec!r}")
        key = str(spec.get("key") or name)
        when = tuple((str(k), v) for k, v in (spec.get("when") or {}).items())
        for k, _ in when:
            if k not in [p.name for p in out]:
                raise SimError(f"search.params.{name}: 'when' names '{k}', which is not an earlier parameter")
        if "choices" in spec:
            ch = tuple(spec["choices"])
            if not ch:
                raise SimError(f"search.params.{name}: empty choices")
            out.append(Param(str(name), "choices", key, choices=ch, when=when))
        elif "int" in spec or "float" in spec:
            kind = "int" if "int" in spec else "float"
            try:
                lo, hi = spec[kind]
            except (TypeError, ValueError):
                raise SimError(f"search.params.{name}: {kind} must be [low, high], got {spec[kind]!r}") from None
            if not lo <= hi:
                raise SimError(f"search.params.{name}: {kind} range [{lo}, {hi}] is empty")
            out.append(Param(str(name), kind, key, low=lo, high=hi, step=spec.get("step"),
                             log=bool(spec.get("log", False)), when=when))
        else:
            raise SimError(f"search.params.{name}: give choices: [...], int: [low, high] or float: [low, high]")
    return out


def _is_group(key: str) -> bool:
    return "." not in key and (conf_dir() / key).is_dir()


def _fmt(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, float):
        return f"{v:.10g}"  # 0.30000000000000004 -> 0.3
    return str(v)


def overrides_of(values: Mapping[str, Any]) -> list[str]:
    """Hydra overrides of one point of the space: config groups first (``policy=history``), then
    values (``++policy.prefetch_args.depth=3``). ``cache.layout`` is not a config key: see
    ``layout_overrides``."""
    groups, values_ = [], []
    for key, v in values.items():
        if key == "cache.layout":
            continue
        if _is_group(key):
            groups.append(f"{key}={_fmt(v)}")
        else:
            values_.append(f"++{key}={_fmt(v)}")
    return groups + values_


def layout_slots(prep: Any) -> dict[bool, int | None]:
    """Slots per layer when the budget's global pool (autoregressive, or beside a speculative
    policy's resident INT4 draft) is split evenly across the MoE layers (rounded down)."""
    from sim.errors import InfeasibleError
    from sim.run import plan_for

    out: dict[bool, int | None] = {}
    for spec in (False, True):
        try:
            plan = plan_for(prep, speculative=spec)
            n = min(prep.model.num_experts, plan.slots // prep.model.num_moe_layers)
            out[spec] = n if n >= 1 else None
        except (InfeasibleError, AttributeError, TypeError):
            out[spec] = None
    return out


def layout_overrides(layout: str, cfg: DictConfig, slots: Mapping[bool, int | None]) -> list[str]:
    """``cache.layout``: global = the budget's pool (no override); per_layer = that pool split per
    layer, for the trial's own decoding mode (a speculative policy's draft takes its share)."""
    if layout == "global":
        return []
    if layout != "per_layer":
        raise SimError(f"cache.layout must be global or per_layer, got {layout!r}")
    n = slots.get(cfg.policy.get("decoding") == "speculative")
    if n is None:
        raise SimError("cache.layout=per_layer: the budget leaves no slot per layer for this policy")
    return [f"++cache.per_layer={n}", "++cache.slots=null"]


def compose_sim(overrides: Sequence[str]) -> DictConfig:
    """The simulator's config for ``overrides``, through Hydra's compose API (inside a running Hydra
    app its config search path is used; otherwise the shipped conf/)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from sim.config import register_configs

    register_configs()
    if GlobalHydra.instance().is_initialized():
        return compose(config_name="sim", overrides=list(overrides))
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        return compose(config_name="sim", overrides=list(overrides))


def _default_value(cfg: DictConfig, p: Param) -> Any:
    if p.key == "cache.layout":
        return "per_layer" if cfg.cache.get("per_layer") else "global"
    if _is_group(p.key):
        return cfg[p.key].get("name")
    return OmegaConf.select(cfg, p.key)


def _active(p: Param, chosen: Mapping[str, Any]) -> bool:
    return all(k in chosen and chosen[k] == v for k, v in p.when)


def _valid(p: Param, v: Any) -> bool:
    if p.kind == "choices":
        return v in p.choices
    try:
        return v is not None and p.low <= float(v) <= p.high
    except (TypeError, ValueError):
        return False


SHOWN = ["tpot_ms", "tokens_per_s", "hit_rate", "gb_moved", "stall_share", "x_bound"]


@dataclass
class SearchResult:
    trials: pd.DataFrame  # one row per trial: number, params, overrides, status, metrics
    default: dict[str, Any]  # the default's row (overrides, metrics)
    best: dict[str, Any]
    table: str  # the printed comparison


def run_search(base: Sequence[str], spec: Mapping[str, Any], out_dir: str | os.PathLike | None = None) -> SearchResult:
    """Optuna (seeded TPE) over ``spec['params']`` on top of the ``base`` overrides, minimising
    ``spec['metric']`` (tpot_ms); the default (``base`` + ``spec['default']``) is trial 0.

    Deterministic: one process, trials in sequence, a seeded sampler and a deterministic simulator;
    configs already simulated are looked up, not re-run. Infeasible or failing points score +inf."""
    import optuna

    from sim.run import prepare, simulate

    params = parse_space(spec.get("params") or {})
    metric = str(spec.get("metric", "tpot_ms"))
    n_trials = int(spec.get("trials", 30))
    seed = int(spec.get("seed", 0))
    base = [o for o in base if not o.lstrip("+~").startswith("hydra")]
    default_ovr = [str(o) for o in (spec.get("default") or [])]
    default_cfg = compose_sim([*base, *default_ovr])

    slots: dict[bool, int | None] = {False: None, True: None}
    if any(p.key == "cache.layout" for p in params):
        try:
            slots = layout_slots(prepare(default_cfg))
        except Exception:
            pass

    memo: dict[tuple[str, ...], dict[str, Any]] = {}

    def evaluate(ovr: list[str]) -> dict[str, Any]:
        key = tuple(ovr)
        if key in memo:
            return memo[key]
        res: dict[str, Any] = {"status": "failed", "reason": "", metric: math.inf}
        try:
            rows = simulate(compose_sim([*base, *ovr]))
            if len(rows) != 1:
                raise SimError(f"a search point must be one policy, got a suite of {len(rows)}")
            r = rows[0]
            res = {k: r.get(k) for k in dict.fromkeys(["policy", "slots", "layout", *SHOWN, metric])}
            res["status"], res["reason"] = r["status"], r.get("reason", "")
            if r["status"] != "ok" or not math.isfinite(float(r.get(metric, math.nan))):
                res[metric] = math.inf
        except (SimError, TraceError) as e:
            res["reason"] = str(e)
        except Exception as e:  # a config that Hydra cannot compose, a bug: the point scores +inf
            res["reason"] = f"{type(e).__name__}: {e}"
        memo[key] = res
        return res

    records: list[dict[str, Any]] = []

    def objective(trial: "optuna.trial.Trial") -> float:
        chosen: dict[str, Any] = {}
        for p in params:
            if not _active(p, chosen):
                continue
            if p.kind == "choices":
                chosen[p.name] = trial.suggest_categorical(p.name, list(p.choices))
            elif p.kind == "int":
                chosen[p.name] = trial.suggest_int(p.name, int(p.low), int(p.high), step=int(p.step or 1), log=p.log)
            else:
                chosen[p.name] = trial.suggest_float(p.name, float(p.low), float(p.high), step=p.step, log=p.log)
        values = {p.key: chosen[p.name] for p in params if p.name in chosen}
        ovr = default_ovr + overrides_of(values)
        try:
            if "cache.layout" in values:
                ovr += layout_overrides(str(values["cache.layout"]), compose_sim([*base, *ovr]), slots)
        except Exception as e:
            res = {"status": "failed", "reason": str(e), metric: math.inf}
        else:
            cached = tuple(ovr) in memo
            res = evaluate(ovr)
            res = {**res, "cached": cached}
        records.append({"trial": trial.number, "params": json.dumps(chosen, sort_keys=True, default=str),
                        "overrides": " ".join(ovr), **res})
        return float(res[metric])

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="minimize", sampler=optuna.samplers.TPESampler(seed=seed))
    dflt = _default_point(params, default_cfg)
    if dflt:
        study.enqueue_trial(dflt)  # trial 0 is the default (when the space holds it)
    study.optimize(objective, n_trials=n_trials)

    default_row = {"config": "default", "overrides": " ".join(default_ovr) or "(base)", **evaluate(list(default_ovr))}
    trials = pd.DataFrame(records)
    best_row = _best(trials, metric)
    table = _search_table(base, default_row, best_row, metric, n_trials, len(memo))
    if out_dir is not None:
        _write_search(Path(out_dir), trials, default_row, best_row, base, table)
    return SearchResult(trials, default_row, best_row, table)


def _default_point(params: Sequence[Param], default_cfg: DictConfig) -> dict[str, Any]:
    """The default config as a point of the space ({} when the space does not hold it)."""
    dflt: dict[str, Any] = {}
    for p in params:
        if _active(p, dflt):
            v = _default_value(default_cfg, p)
            if _valid(p, v):
                dflt[p.name] = v
    return dflt if dflt and all(p.name in dflt for p in params if _active(p, dflt)) else {}


def _best(trials: pd.DataFrame, metric: str) -> dict[str, Any]:
    """The row of the trial with the lowest finite ``metric`` (a failed row if none)."""
    finite = trials[[math.isfinite(float(v)) for v in trials[metric]]] if not trials.empty else trials
    if finite.empty:
        return {"config": "best", "overrides": "-", "status": "failed", metric: math.inf,
                "reason": "no feasible configuration found"}
    b = finite.loc[finite[metric].astype(float).idxmin()]
    return {"config": "best", **{k: _py(b[k]) for k in b.index if k not in ("trial", "cached")},
            "trial": int(b["trial"])}


def _py(v: Any) -> Any:
    """A numpy scalar as the Python value (JSON and the printed table stay plain)."""
    return v.item() if hasattr(v, "item") and not isinstance(v, (str, bytes)) else v


def _search_table(base: Sequence[str], default: Mapping[str, Any], best: Mapping[str, Any], metric: str,
                  n_trials: int, distinct: int) -> str:
    from sim.report import format_table

    rows = []
    for r in (default, best):
        rows.append({"config": r["config"], **{k: r.get(k) for k in SHOWN}, "status": r.get("status"),
                     "overrides": r.get("overrides")})
    for r in rows:  # format_table prints only known columns; keep the overrides readable beside it
        for k in SHOWN:
            if r[k] is None:
                r[k] = float("nan")
    text = format_table([{k: v for k, v in r.items() if k != "overrides"} for r in rows], extra=["config"])
    lines = [f"policy search over {n_trials} trials ({distinct} distinct configs), minimising {metric}",
             f"base: {' '.join(base) or '(sim.yaml defaults)'}", text]
    for r in rows:
        lines.append(f"  {r['config']}: {r['overrides']}")
    d, b = float(default.get(metric, math.inf)), float(best.get(metric, math.inf))
    if math.isfinite(d) and math.isfinite(b) and d > 0:
        lines.append(f"best {metric} {b:.4g} vs default {d:.4g}: {100 * (d - b) / d:.1f}% lower")
    elif math.isfinite(b):
        lines.append(f"best {metric} {b:.4g}; the default is infeasible or failed ({default.get('reason')})")
    return "\n".join(lines)


def _write_search(out: Path, trials: pd.DataFrame, default: Mapping[str, Any], best: Mapping[str, Any],
                  base: Sequence[str], table: str) -> None:
    from sim.report import write_results

    out.mkdir(parents=True, exist_ok=True)
    if not trials.empty:
        write_results(trials.to_dict("records"), out, "search_trials")
    cmd = "python -m sim " + " ".join([*base, *(str(best.get("overrides", "")).split())])
    write_json_atomic(out / "search_best.json",
                      {"default": dict(default), "best": dict(best), "base": list(base), "command": cmd})
    write_text_atomic(out / "search_report.txt", table + f"\nreproduce the best: {cmd}\n")
