"""Sweeps that scale: self-contained, resumable jobs, and policy search with Optuna.

``python -m sim.sweep [OVERRIDES]`` is the simulator app (the same config, conf/sim.yaml, and the
same rows as ``python -m sim``) made for sweeps:

- a job that fails (a bad config, a bug) is recorded in its dir (``sweep_job.json``: status, error,
  traceback) and the sweep goes on; the aggregated table at the end lists it, and the command exits
  with status 1;
- ``resume=true``: a job whose results for the same resolved config (and the same simulator code,
  policy presets and trace file) already exist, in its own dir or anywhere in the sweep dir, reuses
  them instead of simulating. With a fixed ``hydra.sweep.dir=DIR``, re-running an interrupted or
  extended sweep recomputes only what is missing.

``python -m sim.sweep search [OVERRIDES]`` (= ``experiment=search``) searches policy parameters for
the lowest TPOT of one model and hardware with Optuna's seeded TPE sampler, building each trial's
config with Hydra's compose API, and reports the best configuration against the default.

Everything a job needs comes from its config: nothing is shared between jobs in one process, so the
rows are the same, bit for bit, under the basic, joblib, submitit and Ray launchers.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import pandas as pd
from omegaconf import DictConfig, OmegaConf

from sim.experiments.jobs import MARKER, config_fingerprint, index_job, indexed_results, read_marker, write_marker
from sim.config import register_configs
from sim.errors import SimError
from traces import TraceError
from traces.atomic import write_bytes_atomic, write_json_atomic, write_text_atomic

register_configs()

# ------------------------------------------------------------------ one job
@dataclass
class JobResult:
    status: str  # ok | failed
    rows: list[dict[str, Any]] = field(default_factory=list)
    reused_from: str | None = None
    error: str | None = None


def _result_files(job_dir: Path, name: str) -> list[Path]:
    return [job_dir / f"{name}.parquet", job_dir / f"{name}.json"]


def find_reusable(fp: str, job_dir: Path, sweep_dir: Path | None, name: str) -> tuple[str, dict[str, bytes]] | None:
    """Results of the same fingerprint: in the job's own dir first (its marker says so), then in the
    sweep's index (results kept by fingerprint: job numbers change when a sweep is extended or
    reordered, and a job dir may since hold another config)."""
    m = read_marker(job_dir)
    if m and m.get("status") == "ok" and m.get("fingerprint") == fp:
        try:
            return "self", {p.name: p.read_bytes() for p in _result_files(job_dir, name)}
        except FileNotFoundError:
            pass
    entry = indexed_results(sweep_dir, fp)
    if entry is None:
        return None
    try:
        src = json.loads((entry / "entry.json").read_text()).get("job", "?")
        blobs = {f"{name}.parquet": (entry / "results.parquet").read_bytes(),
                 f"{name}.json": (entry / "results.json").read_bytes()}
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    return f"index (first run as job {src})", blobs


def run_job(cfg: DictConfig, out_dir: str | os.PathLike, *, sweep_dir: str | os.PathLike | None = None,
            resume: bool | None = None) -> JobResult:
    """Simulate one config into ``out_dir`` (results + marker), or reuse earlier results of the same
    fingerprint when resuming. Errors become a failed marker, never an exception: one bad config
    must not stop a sweep (KeyboardInterrupt still does)."""
    from sim.report import write_results
    from sim.run import simulate

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sweep = Path(sweep_dir) if sweep_dir is not None else None
    name = str(cfg.get("results_name") or "results")
    resume = bool(cfg.get("resume", False)) if resume is None else resume
    t0 = time.perf_counter()
    try:
        fp = config_fingerprint(cfg)
    except Exception as e:
        return _fail(out, None, e, t0)
    if resume:
        found = find_reusable(fp, out, sweep, name)
        if found is not None:
            where, blobs = found
            if where != "self":
                (out / MARKER).unlink(missing_ok=True)
                for fname, data in blobs.items():
                    write_bytes_atomic(out / fname, data)
            rows = pd.read_parquet(out / f"{name}.parquet").to_dict("records")
            write_marker(out, {"status": "ok", "fingerprint": fp, "rows": len(rows), "reused_from": where,
                               "wall_s": time.perf_counter() - t0})
            index_job(sweep, fp, out, name)
            return JobResult("ok", rows, reused_from=where)
    # a fresh run: results of an earlier run in this dir must not outlive a crash of this one
    (out / MARKER).unlink(missing_ok=True)
    for p in _result_files(out, name):
        p.unlink(missing_ok=True)
    runs: list[tuple[str, Any, Any]] = []
    on_policy = (lambda p, s, log, row: runs.append((p.name, s, log))) if cfg.get("timeline_out") else None
    try:
        rows = simulate(cfg, on_policy=on_policy)
        if runs:
            _timelines(runs, Path(str(cfg.timeline_out)).name, out)
        write_results(rows, out, name)
    except Exception as e:
        return _fail(out, fp, e, t0)
    write_marker(out, {"status": "ok", "fingerprint": fp, "rows": len(rows), "reused_from": None,
                       "wall_s": time.perf_counter() - t0})
    index_job(sweep, fp, out, name)
    return JobResult("ok", rows)


def _fail(out: Path, fp: str | None, e: BaseException, t0: float) -> JobResult:
    kind = "" if isinstance(e, (SimError, TraceError)) else f"{type(e).__name__}: "
    err = f"{kind}{e}"
    write_marker(out, {"status": "failed", "fingerprint": fp, "error": err,
                       "traceback": traceback.format_exc(), "wall_s": time.perf_counter() - t0})
    return JobResult("failed", error=err)


def _timelines(runs: list[tuple[str, Any, Any]], base: str, out: Path) -> None:
    """In a sweep every job writes its timeline(s) into its own dir, under timeline_out's file name."""
    from sim.timeline import chrome_trace

    for pname, s, log in runs:
        path = out / base
        if len(runs) > 1:
            path = path.with_name(f"{path.stem}.{pname}{path.suffix or '.json'}")
        write_json_atomic(path, chrome_trace(log.compute_spans, log.copy_spans, log.occupancy,
                                             num_experts=s.model.num_experts, moe_layers=s.model.moe_layers),
                          indent=None)


# ------------------------------------------------------------------ policy search
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
    from sim.presets import conf_dir

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

    from sim.presets import conf_dir

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
    dflt: dict[str, Any] = {}
    for p in params:
        if _active(p, dflt):
            v = _default_value(default_cfg, p)
            if _valid(p, v):
                dflt[p.name] = v
    if dflt and all(p.name in dflt for p in params if _active(p, dflt)):
        study.enqueue_trial(dflt)  # trial 0 is the default (when the space holds it)
    study.optimize(objective, n_trials=n_trials)

    default_row = {"config": "default", "overrides": " ".join(default_ovr) or "(base)", **evaluate(list(default_ovr))}
    trials = pd.DataFrame(records)
    finite = trials[[math.isfinite(float(v)) for v in trials[metric]]] if not trials.empty else trials
    if finite.empty:
        best_row = {"config": "best", "overrides": "-", "status": "failed", metric: math.inf,
                    "reason": "no feasible configuration found"}
    else:
        b = finite.loc[finite[metric].astype(float).idxmin()]
        best_row = {"config": "best", **{k: _py(b[k]) for k in b.index if k not in ("trial", "cached")},
                    "trial": int(b["trial"])}
    table = _search_table(base, default_row, best_row, metric, n_trials, len(memo))
    if out_dir is not None:
        _write_search(Path(out_dir), trials, default_row, best_row, base, table)
    return SearchResult(trials, default_row, best_row, table)


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


# ------------------------------------------------------------------ the Hydra app
def task(cfg: DictConfig) -> float:
    """One job of the sweep app (also what ``python -m sim`` hands multiruns, resume and search to)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from sim.report import format_table

    hc = HydraConfig.get()
    out = Path(hc.runtime.output_dir)
    multirun = hc.mode == RunMode.MULTIRUN
    exp = cfg.get("experiment")
    if isinstance(exp, DictConfig) and exp.get("search") is not None:
        if multirun:
            print("error: experiment=search runs its own trials; do not combine it with a multirun", file=sys.stderr)
            sys.exit(2)
        base = [str(o) for o in hc.overrides.task]
        spec = OmegaConf.to_container(exp.search, resolve=True)
        try:
            res = run_search(base, spec, out)
        except (SimError, TraceError) as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
        print(res.table)
        print(f"search results: {out}")
        return float(res.best.get(str(spec.get("metric", "tpot_ms")), math.inf))

    if isinstance(exp, DictConfig) and exp.get("map") is not None:
        return _map_task(cfg, [str(o) for o in hc.overrides.task], out, multirun)

    res = run_job(cfg, out, sweep_dir=Path(hc.sweep.dir) if multirun else None)
    if res.status == "failed":
        print(f"error: {res.error}", file=sys.stderr)
        if not multirun:
            sys.exit(2)
        return math.inf
    print(format_table(res.rows))
    note = f" (reused from {res.reused_from})" if res.reused_from else ""
    print(f"results: {out / (str(cfg.results_name) + '.parquet')}{note}")
    ok = [r["tpot_ms"] for r in res.rows if r.get("status") == "ok"]
    return float(min(ok)) if ok else math.inf


def _map_task(cfg: DictConfig, overrides: list[str], out: Path, multirun: bool) -> float:
    """``experiment=speculation-map``: the whole grid in this one job (sim/experiments/speculation_map.py)."""
    from sim.experiments.speculation_map import MapSpec, run_map

    if multirun:
        print("error: experiment=speculation-map runs its own grid; do not combine it with a multirun", file=sys.stderr)
        sys.exit(2)
    base = [o for o in overrides if not o.lstrip("+~").startswith("experiment")]
    try:
        spec = MapSpec.from_cfg(OmegaConf.to_container(cfg.experiment, resolve=True))
        res = run_map(base, spec, out)
    except (SimError, TraceError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(res.summary)
    print(f"speculation map: {out / 'speculation_map.png'} (table: speculation_map.parquet)")
    ok = res.table[res.table["status"] == "ok"]
    return float(ok["speedup"].max()) if len(ok) else math.inf


def _app() -> None:
    import hydra

    hydra.main(version_base="1.3", config_path="pkg://conf", config_name="sim")(task)()


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m sim.sweep [search] [OVERRIDES]`` (also ``moe-sweep``)."""
    from sim.experiments import aggregate

    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] == "search":
        args = args[1:]
        if not any(a.startswith("experiment=") for a in args):
            args.insert(0, "experiment=search")
    sys.argv = [sys.argv[0], *args]
    aggregate.LAST_SCAN = None
    _app()
    scan = aggregate.LAST_SCAN
    if scan is not None and scan.incomplete:
        sys.exit(1)


if __name__ == "__main__":
    # run the imported module, not this __main__ copy: jobs then pickle ``task`` by reference
    # (joblib, submitit, Ray workers import it instead of receiving a copy)
    from sim.experiments.sweep import main as _main

    _main()
