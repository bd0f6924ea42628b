"""Policy search: Optuna's seeded TPE sampler over policy parameters for the lowest TPOT (or another
metric) of one model and hardware, each trial's config built with Hydra's compose API; the best
configuration is reported against the default and the best baseline preset
(docs/sweeps.md#policy-search).

``python -m sim.sweep search [OVERRIDES]`` (= ``experiment=search``; conf/experiment/search.yaml
holds the space) runs it. Deterministic: one process, trials in sequence, a seeded sampler and a
deterministic simulator.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import pandas as pd
from omegaconf import DictConfig, OmegaConf

from sim.errors import SimError
from sim.presets import conf_dir
from sim.experiments.jobs import config_fingerprint
from traces.atomic import write_json_atomic, write_text_atomic
from traces.errors import MoeOffloadError, UsageError


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
    trials: pd.DataFrame  # one row per distinct trial: number, params, overrides, status, metrics, baseline
    default: dict[str, Any]  # the default's row (overrides, metrics)
    best: dict[str, Any]
    table: str  # the printed comparison
    baseline: dict[str, Any] = field(default_factory=dict)  # the best plain preset's row (the bar to beat)
    duplicates: int = 0  # configurations the sampler proposed again (skipped: not counted as trials)


#: the policy presets a search tries first, as users run them (conf/policy/baselines.yaml's suite)
def baseline_presets() -> list[str]:
    from sim.run import load_policy

    return [str(n) for n in load_policy("baselines").suite]


def _preset_point(cfg: DictConfig, params: Sequence[Param]) -> dict[str, Any] | None:
    """The space's point of a composed config (its preset's own values), or None if the space does
    not hold it (a value out of range, an active parameter without a valid value)."""
    point: dict[str, Any] = {}
    for p in params:
        if _active(p, point):
            v = _default_value(cfg, p)
            if not _valid(p, v):
                return None
            point[p.name] = v
    return point or None


def run_search(base: Sequence[str], spec: Mapping[str, Any], out_dir: str | os.PathLike | None = None) -> SearchResult:
    """Optuna (seeded TPE) over ``spec['params']`` on top of the ``base`` overrides, minimising
    ``spec['metric']`` (tpot_ms); the default (``base`` + ``spec['default']``) is trial 0.

    The baseline presets in the space (``policy`` choices of the ``baselines`` suite, each with its
    preset's values) are the next trials, so the best is never worse than plain ``policy=lru``, and
    the report gives the best's margin over the best baseline. ``trials`` counts distinct
    configurations: a point the sampler proposes again is skipped (the sampler still learns its
    score). Deterministic: one process, trials in sequence, a seeded sampler and a deterministic
    simulator. Infeasible or failing points score +inf (their reason is kept)."""
    import optuna

    from sim.run import prepare, simulate

    params = parse_space(spec.get("params") or {})
    metric = str(spec.get("metric", "tpot_ms"))
    try:
        n_trials = int(spec.get("trials", 30))
        seed = int(spec.get("seed", 0))
    except (TypeError, ValueError):
        raise UsageError(f"experiment.search.trials and .seed must be integers, got {spec.get('trials')!r}, "
                         f"{spec.get('seed')!r}") from None
    if n_trials < 1:
        raise UsageError(f"experiment.search.trials must be >= 1, got {n_trials}")
    base = [o for o in base if not o.lstrip("+~").startswith("hydra")]
    default_ovr = [str(o) for o in (spec.get("default") or [])]
    default_cfg = compose_sim([*base, *default_ovr])

    slots: dict[bool, int | None] = {False: None, True: None}
    if any(p.key == "cache.layout" for p in params):
        try:
            slots = layout_slots(prepare(default_cfg))
        except Exception:
            pass

    memo: dict[str, dict[str, Any]] = {}  # config fingerprint (or the overrides) -> result

    composed: dict[tuple[str, ...], tuple[str, Any]] = {}

    def identify(ovr: list[str]) -> tuple[str, Any]:
        """(key, composed config): equal configurations share a key however their overrides read."""
        if tuple(ovr) not in composed:
            try:
                cfg = compose_sim([*base, *ovr])
                composed[tuple(ovr)] = (config_fingerprint(cfg), cfg)
            except Exception as e:
                if not type(e).__module__.startswith(("hydra.", "omegaconf.")):
                    raise
                composed[tuple(ovr)] = (" ".join(ovr), e)
        return composed[tuple(ovr)]

    def evaluate(ovr: list[str]) -> dict[str, Any]:
        key, cfg = identify(ovr)
        if key in memo:
            return memo[key]
        res: dict[str, Any] = {"status": "failed", "reason": "", metric: math.inf}
        try:
            if isinstance(cfg, Exception):
                raise cfg
            rows = simulate(cfg)
            if len(rows) != 1:
                raise SimError(f"a search point must be one policy, got a suite of {len(rows)}")
            r = rows[0]
            if r["status"] == "ok" and not columns:
                columns.update(k for k, v in r.items() if isinstance(v, (int, float)) and not isinstance(v, bool))
            res = {k: r.get(k) for k in dict.fromkeys(["policy", "slots", "layout", *SHOWN, metric])}
            res["status"], res["reason"] = r["status"], r.get("reason", "")
            if r["status"] != "ok" or not math.isfinite(float(r.get(metric, math.nan))):
                res[metric] = math.inf
        except MoeOffloadError as e:
            res["status"], res["reason"] = e.status, str(e)
        except Exception as e:
            if not type(e).__module__.startswith(("hydra.", "omegaconf.")):
                raise  # a bug is never a +inf point
            res["reason"] = f"{type(e).__name__}: {e}"  # a point Hydra cannot compose
        memo[key] = res
        return res

    columns: set[str] = set()  # numeric columns of a results row, from the first one that ran
    default_row = {"config": "default", "overrides": " ".join(default_ovr) or "(base)", **evaluate(list(default_ovr))}
    if columns and metric not in columns:  # checked on the default, before any trial
        raise UsageError(f"experiment.search.metric={metric!r} is not a numeric results column; "
                         f"columns: {', '.join(sorted(columns))}")

    records: list[dict[str, Any]] = []
    labels: dict[int, str] = {}  # trial number -> "default" / the baseline preset it runs
    duplicates = 0

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
        nonlocal duplicates
        values = {p.key: chosen[p.name] for p in params if p.name in chosen}
        ovr = default_ovr + overrides_of(values)
        try:
            if "cache.layout" in values:
                ovr += layout_overrides(str(values["cache.layout"]), compose_sim([*base, *ovr]), slots)
        except MoeOffloadError as e:
            res = {"status": e.status, "reason": str(e), metric: math.inf}
        else:
            key = identify(ovr)[0]
            if key in seen:  # proposed again: skipped, not a trial (the sampler learns its score)
                duplicates += 1
                repeats[0] += 1
                return float(memo[key][metric])
            repeats[0] = 0
            seen.add(key)
            res = evaluate(ovr)
        records.append({"trial": len(records), "params": json.dumps(chosen, sort_keys=True, default=str),
                        "overrides": " ".join(ovr), "baseline": labels.get(trial.number, ""), **res})
        return float(res[metric])

    seen: set[str] = set()
    repeats = [0]  # proposals in a row that repeated an earlier configuration

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="minimize", sampler=optuna.samplers.TPESampler(seed=seed))
    # first trials: the default, then each baseline preset in the space (as users run them)
    seeds: list[tuple[str, dict[str, Any]]] = []
    point = _preset_point(default_cfg, params)
    if point is not None:
        seeds.append(("default", point))
    policy_param = next((p for p in params if p.key == "policy" and p.kind == "choices" and not p.when), None)
    if policy_param is not None:
        for name in baseline_presets():
            if name in policy_param.choices:
                point = _preset_point(compose_sim([*base, *default_ovr, f"policy={name}"]), params)
                if point is not None and point not in [pt for _, pt in seeds]:
                    seeds.append((f"policy={name}", point))
    for n, (label, point) in enumerate(seeds):
        labels[n] = label
        study.enqueue_trial(point)
    # a space smaller than `trials` ends the search: 50 proposals in a row found nothing new
    while len(records) < n_trials and repeats[0] < 50:
        study.optimize(objective, n_trials=1)

    trials = pd.DataFrame(records)
    best_row = _best(trials, metric, "best")
    presets = set(baseline_presets())
    is_base = [lab.startswith("policy=") or (lab == "default" and pol in presets)
               for lab, pol in zip(trials.get("baseline", []), trials.get("policy", []))]
    baseline_row = _best(trials[is_base], metric, "best baseline") if any(is_base) else {}
    table = _search_table(base, default_row, best_row, metric, n_trials, len(records), baseline=baseline_row,
                          duplicates=duplicates)
    if out_dir is not None:
        _write_search(Path(out_dir), trials, default_row, best_row, base, table, baseline_row)
    return SearchResult(trials, default_row, best_row, table, baseline_row, duplicates)


def _best(trials: pd.DataFrame, metric: str, config: str) -> dict[str, Any]:
    """The lowest-``metric`` trial as a row labelled ``config`` (a failed row when none is finite)."""
    finite = trials[[math.isfinite(float(v)) for v in trials[metric]]] if not trials.empty else trials
    if finite.empty:
        return {"config": config, "overrides": "-", "status": "failed", metric: math.inf,
                "reason": "no feasible configuration found"}
    b = finite.loc[finite[metric].astype(float).idxmin()]
    return {"config": config, **{k: _py(b[k]) for k in b.index if k != "trial"}, "trial": int(b["trial"])}


def _py(v: Any) -> Any:
    """A numpy scalar as the Python value (JSON and the printed table stay plain)."""
    return v.item() if hasattr(v, "item") and not isinstance(v, (str, bytes)) else v


def _search_table(base: Sequence[str], default: Mapping[str, Any], best: Mapping[str, Any], metric: str,
                  n_trials: int, distinct: int, *, baseline: Mapping[str, Any] | None = None,
                  duplicates: int = 0) -> str:
    from sim.report import format_table

    if baseline and baseline.get("baseline") == "default":  # the default is the best baseline: one row
        baseline, default = None, {**default, "config": "default = best baseline"}
    rows = []
    for r in (default, *([baseline] if baseline else []), best):
        rows.append({"config": r["config"], **{k: r.get(k) for k in SHOWN}, "status": r.get("status"),
                     "overrides": r.get("overrides")})
    for r in rows:  # format_table prints only known columns; keep the overrides readable beside it
        for k in SHOWN:
            if r[k] is None:
                r[k] = float("nan")
    text = format_table([{k: v for k, v in r.items() if k != "overrides"} for r in rows], extra=["config"])
    head = f"policy search over {distinct} distinct configurations"
    if distinct < n_trials:
        head += f" (the space holds no more; {n_trials} asked)"
    if duplicates:
        head += f", {duplicates} repeated proposals skipped"
    lines = [f"{head}, minimising {metric}",
             f"base: {' '.join(base) or '(sim.yaml defaults)'}", text]
    for r in rows:
        lines.append(f"  {r['config']}: {r['overrides']}")
    b = float(best.get(metric, math.inf))
    for ref in (default, baseline):
        if not ref:
            continue
        what = (f"best baseline (policy={ref.get('policy')})" if ref is baseline
                else "default (the best baseline)" if ref["config"] != "default" else "default")
        r = float(ref.get(metric, math.inf))
        if math.isfinite(r) and math.isfinite(b) and r > 0:
            lines.append(f"best {metric} {b:.4g} vs {what} {r:.4g}: {100 * (r - b) / r:.1f}% lower")
        elif math.isfinite(b):
            lines.append(f"best {metric} {b:.4g}; the {what} is infeasible or failed ({ref.get('reason')})")
    if baseline and best.get("trial") is not None and best.get("trial") == baseline.get("trial"):
        lines.append(f"the best is a baseline preset (policy={baseline.get('policy')}): "
                     "no searched configuration beats it")
    return "\n".join(lines)


def _write_search(out: Path, trials: pd.DataFrame, default: Mapping[str, Any], best: Mapping[str, Any],
                  base: Sequence[str], table: str, baseline: Mapping[str, Any] | None = None) -> None:
    from sim.report import write_results

    out.mkdir(parents=True, exist_ok=True)
    if not trials.empty:
        write_results(trials.to_dict("records"), out, "search_trials")
    cmd = "python -m sim " + " ".join([*base, *(str(best.get("overrides", "")).split())])
    write_json_atomic(out / "search_best.json",
                      {"default": dict(default), "best_baseline": dict(baseline or {}), "best": dict(best),
                       "base": list(base), "command": cmd})
    write_text_atomic(out / "search_report.txt", table + f"\nreproduce the best: {cmd}\n")
