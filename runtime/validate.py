"""`python -m runtime.validate`: the validation grid, measured on this machine and simulated under
the measured profile of the same card, into benchmarks/validation/<card>/validation.parquet.

For every config of the grid (shape x cache budget x link x decode engine x policy) the runtime
replays the same trace ``repetitions`` times (``source = measured``, one row per repetition) and the
simulator predicts it with ``hardware=measured/<card>`` (``source = sim``); both rows carry the
same ``config_id`` (sim.run.config_id), the level, card and date, and the per-token latencies
(``token_gaps_s``) for the distribution comparison. Both timelines of every config (the last
measured repetition and the simulator's) go to ``timelines/<config_id>.{measured,sim}.json``
beside the table (Chrome/Perfetto format). ``sim.experiments.validation`` joins the two and computes
the errors. Level ``closed``: each side runs its own policies (and governor). Level ``replayed``:
each measured repetition records its decisions (sim.decisions: the prefetches it issued, where they
were decided, its evictions, the k of each cycle) to ``decisions/<date>/<config_id>.r<N>.parquet``
beside the table (the row's ``decisions`` column), and the simulator replays them
(sim.policies.replay) on the same trace and config: one sim row per repetition. With both levels
the same measured runs serve both (their rows are written once per level).

The plan (configs, repetitions, estimated device seconds from the simulator's own prediction of
each run) is printed before any work; ``dry_run=true`` stops there. ``budget_s`` bounds the run:
configs not started in time are left for the next call. The table is appended per (shape, budget,
link, engine) group, atomically, and configs already in it for this card, level and date are
skipped, so a call after a cut-off resumes; a later day adds its own rows (``date`` column).
``fraction`` < 1 runs a stated subset of the grid that still covers every level of every factor.
``resimulate=true`` measures nothing: the simulator predicts the table's measured configs again into
``resimulated/<UTC time>.parquet`` beside it (``resimulate``), to judge a fix of the model offline.
"""

from __future__ import annotations

import datetime as _dt
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from omegaconf import MISSING

from sim.errors import SimError
from sim.experiments.validation import COLUMNS
from sim.presets import setting



@dataclass
class ShapeConf:
    name: str = setting(MISSING, "the shape's name in the tables")
    model: str = setting(MISSING, "a conf/model preset (random weights)")
    layers: Optional[int] = setting(None, "depth reduction: the first N decoder layers")
    trace: Optional[str] = setting(None, "a trace file (the project's own); null: the preset's synthetic trace")
    requests: int = setting(2, "synthetic trace: requests")
    prompt_tokens: int = setting(16, "synthetic trace: prompt tokens per request")
    decode_tokens: int = setting(24, "synthetic trace: decoded tokens per request")


#: the grid's links: pinned copies, pinned copies paced to ``pace_gbps``, copies from pageable memory
LINKS = ("pinned", "paced", "pageable")

#: the default grid's shapes: depth-reduced and shape-faithful
GRID = [ShapeConf("mixtral-8x7b-L4", "mixtral-8x7b", 4), ShapeConf("phi-3.5-moe-L4", "phi-3.5-moe", 4),
        ShapeConf("qwen3-30b-a3b-L8", "qwen3-30b-a3b", 8)]


@dataclass
class ValidateConf:
    """Structured config of `python -m runtime.validate` (ConfigStore name ``validate_schema``)."""

    card: Optional[str] = setting(None, "measured profile name (hardware=measured/<card>); default: the card this "
                                        "runs on (h100-sxm, h200, ...); \"cpu\" on the CPU")
    profile: Optional[str] = setting(None, "the simulator's hardware preset; default: measured/<card>")
    shapes: list[ShapeConf] = setting(GRID, "the grid's model shapes")
    budgets: list[float] = setting([0.25, 0.5, 0.75], "share of all routed experts the slot pool holds")
    policies: list[str] = setting(["lru", "lookahead", "history", "oracle"], "policy presets run together per config")
    links: list[str] = setting(["pinned", "paced"], "paced: pinned copies paced to pace_gbps (a slower link on the "
                                                    "same machine); pageable: copies from pageable host memory, "
                                                    "which hold the host until they land")
    pace_gbps: float = setting(16.0, "the paced link's bandwidth (link_pace_gbps)")
    engines: list[str] = setting(["graphed", "eager"], "runtime.lean's CUDA graphs between routing reads | "
                                                       "transformers' forward")
    levels: list[str] = setting(["closed"], "replayed (the simulator replays the runtime's logged decisions) | "
                                            "closed (each side runs its own policies)")
    repetitions: int = setting(3, "measured repetitions per config")
    fraction: float = setting(1.0, "< 1: a covering subset of the grid (stated in the plan)")
    budget_s: float = setting(540.0, "device seconds for this call; the rest waits for the next")
    out: str = setting("benchmarks/validation", "tables go to <out>/<card>/validation.parquet")
    dry_run: bool = setting(False, "the plan and its estimated device time only")
    resimulate: bool = setting(False, "no measurement: the simulator predicts every measured config of the card's "
                                      "table again (level replayed from its stored decisions) into "
                                      "<out>/<card>/resimulated/<UTC time>.parquet, errors before and after")
    device: str = setting("auto", "auto: cuda if present, else cpu")
    cpu_backend: str = setting("sync", "on the CPU: sync | thread | virtual (deterministic virtual time with the "
                                       "simulator's durations: a check of the pipeline, not a measurement)")
    seed: int = setting(0, "seed of random weights and traces")


def grid(cfg: Any) -> list[dict[str, Any]]:
    """Every config group of the grid (one group = one shape, budget, link and engine; its
    policies run together), reduced to ``fraction`` by a covering selection."""
    for e in cfg.engines:
        if e not in ("graphed", "eager"):
            raise SimError(f"engines: unknown decode path {e!r}; known: graphed, eager")
    if not cfg.levels:
        raise SimError("levels: empty; known: replayed, closed")
    for lv in cfg.levels:
        if lv not in ("closed", "replayed"):
            raise SimError(f"levels: unknown level {lv!r}; known: replayed, closed")
    for ln in cfg.links:
        if ln not in LINKS:
            raise SimError(f"links: unknown link {ln!r}; known: {', '.join(LINKS)}")
    if not cfg.shapes:
        raise SimError("shapes: empty grid")
    cells = [(dict(s), float(b)) for s in cfg.shapes for b in cfg.budgets]
    combos = [(ln, e) for ln in cfg.links for e in cfg.engines]
    # cell c's j-th group takes the (link, engine) combination c + j (mod their number): a fraction
    # keeps the first layers j of every cell, so the combinations rotate over shapes and budgets
    # (a Latin square at fraction 1 / combinations) instead of falling on one of them
    ranked = sorted(((j, c, {"shape": shape, "budget": b, "link": combos[(c + j) % len(combos)][0],
                             "engine": combos[(c + j) % len(combos)][1]})
                     for c, (shape, b) in enumerate(cells) for j in range(len(combos))), key=lambda x: (x[0], x[1]))
    groups = [g for _, _, g in ranked]
    f = float(cfg.fraction)
    if not 0 < f <= 1:
        raise SimError(f"fraction must be in (0, 1], got {f}")
    if f < 1:
        # every level of every factor keeps at least one group
        chosen = groups[:max(1, math.ceil(len(groups) * f))]
        for factor in ("budget", "link", "engine"):
            for v in {str(g[factor]) for g in groups} - {str(g[factor]) for g in chosen}:
                chosen.append(next(g for g in groups if str(g[factor]) == v))
        for name in {g["shape"]["name"] for g in groups} - {g["shape"]["name"] for g in chosen}:
            chosen.append(next(g for g in groups if g["shape"]["name"] == name))
        groups = chosen
    return groups


def overrides(cfg: Any, g: dict[str, Any], slots: int | None, hardware: str, policies: list[str] | None = None) -> list[str]:
    s = g["shape"]
    over = [f"model={s['model']}", f"hardware={hardware}", f"device={cfg.device}", f"cpu_backend={cfg.cpu_backend}",
            f"repetitions={int(cfg.repetitions)}",
            f"engine={g['engine']}",
            "policy=baselines", f"policy.suite=[{','.join(policies or cfg.policies)}]", f"seed={int(cfg.seed)}", "predict=false"]
    if s.get("layers"):
        over.append(f"model.layers={int(s['layers'])}")
    if s.get("trace"):
        over.append(f"trace.path={s['trace']}")
    else:
        over += [f"trace.requests={int(s['requests'])}", f"trace.prompt_tokens={int(s['prompt_tokens'])}",
                 f"trace.decode_tokens={int(s['decode_tokens'])}"]
    if g["link"] == "paced":
        over.append(f"link_pace_gbps={float(cfg.pace_gbps)}")
    elif g["link"] == "pageable":
        over.append("host_memory=pageable")
    if slots is not None:
        over.append(f"cache.slots={slots}")
    return over


def _compose(over: list[str]) -> Any:
    from runtime.measure import apply_overrides
    from runtime.profile import _compose_run

    c = _compose_run(over)
    apply_overrides(c)  # link_pace_gbps= into hardware: config id, prediction and run all see it
    return c


def validation_row(base: dict[str, Any], row: dict[str, Any], gaps: list[float], **extra: Any) -> dict[str, Any]:
    """A results row (measured or sim) in the validation table's columns."""
    return {
        **base, **extra,
        "tpot_s": row.get("tpot_ms", math.nan) / 1e3,
        "p50_token_s": row.get("p50_token_ms", math.nan) / 1e3,
        "p90_token_s": row.get("p90_token_ms", math.nan) / 1e3,
        "p99_token_s": row.get("p99_token_ms", math.nan) / 1e3,
        "ttft_s": row.get("ttft_ms", math.nan) / 1e3,
        "hit_rate": row.get("hit_rate", math.nan),
        "stall_share": row.get("stall_share", math.nan),
        "k": float(row.get("mean_k", 0.0) or 0.0),
        "token_gaps_s": [float(x) for x in gaps],
        "gb_moved": row.get("gb_moved", math.nan),
        "link_util": row.get("link_util", math.nan),
    }


def gaps_of(log: Any) -> list[float]:
    return [b - a for times in log.token_times for a, b in zip(times, times[1:])]


def _existing_table(path: Path) -> tuple[Any, set[tuple[Any, ...]]]:
    """Stage 1: the card's table so far, so a call resumes it: a (level, date, config, source) row
    already there is not measured again. A file that is not a validation table is refused before
    any work."""
    import pandas as pd

    old = pd.read_parquet(path) if path.is_file() else None
    if old is not None:
        missing = [c for c in COLUMNS if c not in old.columns]
        if missing:
            raise SimError(f"{path}: not a validation table (missing column(s) {missing})")
    done = set() if old is None else set(zip(old["level"], old["date"], old["config_id"], old["source"]))
    return old, done


def _plan(cfg: Any, groups: list[dict[str, Any]], hardware: str) -> tuple[list[dict[str, Any]], float]:
    """Stage 2: each group's slot count, composed config and estimated device seconds (the
    simulator's prediction of its runs), so the device time is known before the device is used."""
    from sim.run import load_policy, prepare, run_policy
    from sim.spec import ModelSpec

    plan, total_s = [], 0.0
    for g in groups:
        cfg0 = _compose(overrides(cfg, g, None, hardware))
        spec = ModelSpec.from_cfg(cfg0.model)
        slots = max(spec.top_k, int(round(g["budget"] * spec.num_routed_experts_total)))
        c = _compose(overrides(cfg, g, slots, hardware))
        prep = prepare(c)
        est = 0.0
        for p in cfg.policies:
            srow, _ = run_policy(prep, load_policy(p), int(cfg.seed), plan=None)
            est += (int(cfg.repetitions) + 1) * float(srow.get("e2e_s", 0.0))
        g.update(slots=slots, est_s=est, cfg=c)
        plan.append(g)
        total_s += est
    return plan, total_s


def _log_plan(cfg: Any, plan: list[dict[str, Any]], total_s: float, card: str, hardware: str, log: Any) -> None:
    """Stage 3: the plan and its estimated device time, shown before the measurement (or instead of
    it, with ``dry_run``) so a call can be sized to the budget."""
    shapes = {g["shape"]["name"] for g in plan}
    setup = 20.0 * len(shapes)
    n_cfg = len(plan) * len(cfg.policies)
    log(f"plan: {n_cfg} configs ({len(plan)} groups of {len(cfg.policies)} policies; fraction {cfg.fraction}) x "
        f"{cfg.repetitions} repetitions x levels {list(cfg.levels)} on {card}, sim under hardware={hardware}; "
        f"estimated device time {total_s + setup:.0f} s (runs {total_s:.0f} s + setup ~{setup:.0f} s); budget {cfg.budget_s:.0f} s")
    for g in plan:
        log(f"  {g['shape']['name']:>22} budget {g['budget']:.2f} ({g['slots']} slots) link {g['link']:>6} "
            f"engine {g['engine']}: ~{g['est_s']:.1f} s")


def _pending(cfg: Any, c: Any, engine: str, today: str, done: set[tuple[Any, ...]]) -> dict[str, list[str]]:
    """The config's policies with no measured row today at some level (keyed as runtime.measure
    keys its rows), each with the levels it lacks: only they are measured, and only those levels'
    rows are written, so a repeated call adds nothing twice."""
    from runtime.models import resolve_device
    from sim.run import base_keys, config_id, load_policy

    keys = {**base_keys(c), "engine": engine}  # as runtime.measure keys its rows
    if str(c.get("dtype", "auto") or "auto") == "auto" and not c.get("source"):
        # the session keys rows by the dtype it built: random weights are bf16 on a GPU, fp32 on the
        # CPU (runtime.models.resolve_dtype)
        keys["dtype"] = "bf16" if resolve_device(c.get("device", "auto")).type == "cuda" else "fp32"
    cids = {}
    for p in cfg.policies:
        pc = load_policy(p)
        cids[p] = config_id({**keys, "policy": pc.name, "eviction": pc.eviction, "prefetch": pc.prefetch,
                             "predictor": pc.predictor})
    need = {p: [lv for lv in cfg.levels if (lv, today, cids[p], "measured") not in done] for p in cfg.policies}
    return {p: lvs for p, lvs in need.items() if lvs}


def _measured_rows(got: list[dict[str, Any]], gaps: dict[str, list[list[float]]], g: dict[str, Any], name: str,
                   pending: dict[str, list[str]], decided: dict[tuple[str, int], str], card: str, today: str,
                   log: Any) -> list[dict[str, Any]]:
    """Stage 4a: the session's ok measured rows in the table's columns, one per level the policy
    lacks, each repetition with its own token gaps (and its decisions file, when recorded); a run
    that did not finish ok is logged and left out."""
    new = []
    seen: dict[str, int] = {}
    for r in got:
        if r["source"] != "measured" or r.get("status") != "ok":
            log(f"  {r['policy']}: {r.get('status')} {r.get('reason', '')}")
            continue
        i = seen.get(r["policy"], 0)
        seen[r["policy"]] = i + 1
        rep = int(r.get("repetition", i))
        for level in pending[r["policy"]]:
            base = {"level": level, "config_id": r["config_id"], "card": card, "date": today,
                    "engine": g["engine"], "link": g["link"], "policy": r["policy"], "source": "measured",
                    "model": name, "budget": g["budget"], "repetition": rep, "dtype": r.get("dtype")}
            extra = {"decisions": decided[(r["policy"], rep)]} if (r["policy"], rep) in decided else {}
            new.append(validation_row(base, r, gaps[r["policy"]][i], **extra))
    return new


def _add_sim_rows(new: list[dict[str, Any]], cfg: Any, pending: dict[str, list[str]], prep: Any,
                  logs: dict[str, Any], sess: Any, path: Path, g: dict[str, Any], name: str, engine: str,
                  log: Any) -> None:
    """Stage 4b (level closed): appends to ``new`` the simulator's row of each measured policy, with
    its TPOT error against the mean measured TPOT, and writes both timelines where the run recorded
    one."""
    from runtime.measure import timeline_json
    from sim.run import load_policy, run_policy
    from sim.timeline import chrome_trace
    from traces.atomic import write_json_atomic

    for p in pending:
        ms = [x for x in new if x["policy"] == p and x["level"] == "closed"]
        if not ms:
            continue
        srow, (sobj, slog) = run_policy(prep, load_policy(p), int(cfg.seed), timeline=p in logs)
        if p in logs:  # both timelines of the config (last measured repetition)
            tdir = path.parent / "timelines"
            cid = ms[0]["config_id"]
            write_json_atomic(tdir / f"{cid}.measured.json", timeline_json(logs[p], sess.om), indent=None)
            write_json_atomic(tdir / f"{cid}.sim.json", chrome_trace(
                slog.compute_spans, slog.copy_spans, slog.occupancy, num_experts=sobj.model.num_experts,
                moe_layers=sobj.model.moe_layers), indent=None)
        base = {**{k: ms[0].get(k) for k in ("level", "config_id", "card", "date", "engine", "link", "model", "budget",
                                             "dtype")}, "policy": p, "source": "sim", "repetition": 0}
        s = validation_row(base, srow, gaps_of(slog))
        m_tpot = sum(x["tpot_s"] for x in ms) / len(ms)
        s["tpot_rel_err"] = (s["tpot_s"] - m_tpot) / m_tpot if m_tpot else math.nan
        new.append(s)
        log(f"  {name} b{g['budget']:.2f} {g['link']:>6} {engine:>7} {p:>10}: TPOT measured {m_tpot * 1e3:.2f} ms, "
            f"sim {s['tpot_s'] * 1e3:.2f} ms ({s['tpot_rel_err']:+.1%})")


def _add_replayed_rows(new: list[dict[str, Any]], cfg: Any, pending: dict[str, list[str]], prep: Any,
                       path: Path, name: str, g: dict[str, Any], log: Any, timelines: bool = True) -> None:
    """Stage 4c (level replayed): appends to ``new`` one simulator row per measured repetition,
    replaying that repetition's decisions file (read back from disk, as a resimulation does), with
    its TPOT error against that repetition; writes the replay's timeline of the last repetition
    beside the measured one (``timelines``)."""
    from sim.decisions import DecisionLog, agreement
    from sim.run import load_policy, run_policy
    from sim.timeline import chrome_trace
    from traces.atomic import write_json_atomic

    for p in pending:
        ms = sorted((x for x in new if x["policy"] == p and x["level"] == "replayed"), key=lambda x: x["repetition"])
        if not ms:
            continue
        errs = []
        for x in ms:
            decisions = DecisionLog.load(path.parent / x["decisions"])
            last = timelines and x is ms[-1]
            srow, (sobj, slog) = run_policy(prep, load_policy(p), int(cfg.seed), timeline=last, decisions=decisions,
                                            record=True)
            if last:
                write_json_atomic(path.parent / "timelines" / f"{x['config_id']}.replayed.json", chrome_trace(
                    slog.compute_spans, slog.copy_spans, slog.occupancy, num_experts=sobj.model.num_experts,
                    moe_layers=sobj.model.moe_layers), indent=None)
            base = {**{k: x.get(k) for k in ("level", "config_id", "card", "date", "engine", "link", "model", "budget",
                                             "repetition", "dtype")}, "policy": p, "source": "sim"}
            s = validation_row(base, srow, gaps_of(slog), decisions=x["decisions"],
                               replay_unreached=int(srow.get("replay_unreached", 0)),
                               **agreement(decisions, sobj.recorder.decisions(slog.cycles)))
            s["tpot_rel_err"] = (s["tpot_s"] - x["tpot_s"]) / x["tpot_s"] if x["tpot_s"] else math.nan
            errs.append(s["tpot_rel_err"])
            new.append(s)
            if s["replay_unreached"]:
                log(f"  {p} repetition {x['repetition']}: {s['replay_unreached']} logged prefetches at decision points "
                    "the simulated run never reached")
        log(f"  {name} b{g['budget']:.2f} {g['link']:>6} {g['engine']:>7} {p:>10}: replayed, TPOT error per repetition "
            + " ".join(f"{e:+.1%}" for e in errs))


def _save_decisions(run: Any, lg: Any, row: dict[str, Any], table_dir: Path, today: str) -> str:
    """A measured run's decisions to ``decisions/<date>/<config_id>.r<N>.parquet`` under the table's
    folder; returns that path relative to it (the row's ``decisions`` column). A file there that
    the table does not reference is a leftover of an interrupted call: it is replaced."""
    rel = Path("decisions") / today / f"{row['config_id']}.r{int(row['repetition'])}.parquet"
    run.recorder.decisions(lg.cycles, policy=row["policy"], config_id=row["config_id"],
                           repetition=int(row["repetition"]), date=today).save(table_dir / rel)
    return rel.as_posix()


def resimulate(cfg: Any, path: Path, hardware: str, log: Any = print) -> Path:
    """The simulator's rows of every measured config in the table at ``path`` again, under the
    model as it is now (after a fix of a term, say), with no device: closed from the policy, replayed
    from each repetition's stored decisions. The measured rows and the new sim rows go to
    ``resimulated/<UTC time>.parquet`` beside the table (the same columns: ``join`` reads it); the
    table itself is never changed. Shapes are looked up by name in ``shapes``."""
    import pandas as pd

    from sim.experiments.validation import join, summary
    from sim.run import prepare
    from sim.spec import ModelSpec
    from traces.atomic import atomic_write

    old, _ = _existing_table(path)
    if old is None:
        raise SimError(f"resimulate: no validation table at {path}")
    shapes = {str(s["name"]): dict(s) for s in cfg.shapes}
    measured = old[old.source == "measured"]
    unknown = sorted(set(measured.model) - set(shapes))
    if unknown:
        raise SimError(f"resimulate: {path} has model shape(s) {unknown} that shapes= does not name; known: {sorted(shapes)}")
    rows: list[dict[str, Any]] = []
    preps: dict[tuple[Any, ...], Any] = {}
    for (date, cid), ms in measured.groupby(["date", "config_id"], sort=True):
        first = ms.iloc[0]
        g = {"shape": shapes[first.model], "budget": float(first.budget), "link": str(first.link),
             "engine": str(first.engine)}
        dtype = first.get("dtype")  # the measured run's (tables before this column: the preset's)
        dtype = [f"dtype={dtype}"] if isinstance(dtype, str) and dtype else []
        key = (first.model, g["budget"], g["link"], g["engine"], *dtype)
        if key not in preps:
            spec = ModelSpec.from_cfg(_compose(overrides(cfg, g, None, hardware)).model)
            slots = max(spec.top_k, int(round(g["budget"] * spec.num_routed_experts_total)))
            preps[key] = prepare(_compose(overrides(cfg, g, slots, hardware, [str(first.policy)]) + dtype))
        new = ms.to_dict("records")
        pending = {str(first.policy): sorted(set(ms.level))}
        _add_sim_rows(new, cfg, pending, preps[key], {}, None, path, g, str(first.model), g["engine"], log)
        _add_replayed_rows(new, cfg, pending, preps[key], path, str(first.model), g, log, timelines=False)
        rows += new
    df = pd.DataFrame(rows)
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H%M%S")
    out = path.parent / "resimulated" / f"{stamp}.parquet"
    atomic_write(out, lambda tmp: df.to_parquet(tmp, index=False), overwrite=False)
    before, after = summary(join(old)).set_index("level"), summary(join(df)).set_index("level")
    for level in after.index:
        b = before.loc[level] if level in before.index else None
        a = after.loc[level]
        log(f"{level}: median |TPOT error| {'' if b is None else f'{b.tpot_median_abs_err:.1%} -> '}"
            f"{a.tpot_median_abs_err:.1%}, max {'' if b is None else f'{b.tpot_max_abs_err:.1%} -> '}"
            f"{a.tpot_max_abs_err:.1%} ({int(a.configs)} configs)")
    log(f"resimulated table: {out} ({len(df)} rows)")
    return out


def run_validate(cfg: Any, log: Any = print) -> Path:
    import pandas as pd
    from omegaconf import open_dict

    from runtime.measure import Session
    from runtime.models import resolve_device
    from runtime.profile import card_info, card_name
    from sim.run import prepare
    from traces.atomic import atomic_write

    device = resolve_device(cfg.device)
    info = card_info(device)
    card = cfg.card or (card_name(info["card"]) if device.type == "cuda" else "cpu")
    hardware = cfg.profile or f"measured/{card}"
    groups = grid(cfg)  # bad grids fail before any work
    today = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d")
    path = Path(cfg.out) / card / "validation.parquet"
    if cfg.resimulate:
        return resimulate(cfg, path, hardware, log)
    old, done = _existing_table(path)

    # ---- the plan: configs and estimated device seconds (the simulator's prediction of each run)
    plan, total_s = _plan(cfg, groups, hardware)
    _log_plan(cfg, plan, total_s, info["card"], hardware, log)
    if cfg.dry_run:
        return path

    deadline = time.monotonic() + float(cfg.budget_s)
    rows_all = [] if old is None else old.to_dict("records")
    # one session per shape, engine and host memory (the session's store is pinned or pageable)
    for name, engine, pageable in sorted({(g["shape"]["name"], g["engine"], g["link"] == "pageable") for g in plan}):
        todo = [g for g in plan if g["shape"]["name"] == name and g["engine"] == engine
                and (g["link"] == "pageable") == pageable]
        if time.monotonic() > deadline:
            break
        sess, built = None, None
        try:
            for g in todo:
                c = g["cfg"]
                if time.monotonic() + g["est_s"] > deadline:
                    log(f"{name} {g['budget']} {g['link']}: left for the next call (budget)")
                    continue
                pending = _pending(cfg, c, engine, today, done)
                if not pending:
                    continue
                if len(pending) < len(cfg.policies):
                    c = _compose(overrides(cfg, g, g["slots"], hardware, list(pending)))
                record = any("replayed" in lvs for lvs in pending.values())
                if sess is None:
                    sess = Session(c, max_slots=max(x["slots"] for x in todo))
                    built = str(c.dtype)  # the dtype the session built its model in (it writes it into c)
                    if sess.om.device.type == "cuda" and any(x["link"] == "paced" for x in todo):
                        sess.om.backend.calibrate_sleep()  # copy pacing sleeps on the copy stream
                with open_dict(c):  # every group of the session: the measured run's dtype, in its keys and bytes
                    c.dtype = built
                prep = prepare(c)  # the simulator's side: sim.run.prepare (cost model with the engine's host overhead)
                gaps: dict[str, list[list[float]]] = {}
                logs: dict[str, Any] = {}
                decided: dict[tuple[str, int], str] = {}

                def on_run(p, run, lg, row, gaps=gaps, logs=logs, decided=decided):
                    gaps.setdefault(p.name, []).append(gaps_of(lg))
                    if lg.compute_spans is not None:
                        logs[p.name] = lg
                    if run.recorder is not None:
                        decided[(p.name, int(row["repetition"]))] = _save_decisions(run, lg, row, path.parent, today)

                got = sess.measure(c, on_run=on_run, deadline=deadline, timeline=True, decisions=record)
                new = _measured_rows(got, gaps, g, name, pending, decided, info["card"], today, log)
                _add_sim_rows(new, cfg, pending, prep, logs, sess, path, g, name, engine, log)
                _add_replayed_rows(new, cfg, pending, prep, path, name, g, log)
                rows_all += new
                done |= {(x["level"], x["date"], x["config_id"], x["source"]) for x in new}
                df = pd.DataFrame(rows_all)
                atomic_write(path, lambda tmp, df=df: df.to_parquet(tmp, index=False))
        finally:
            if sess is not None:
                sess.close()
    log(f"validation table: {path} ({len(rows_all)} rows)")
    _log_level1(path.parent / "timelines", log)
    return path


def _log_level1(tdir: Path, log: Any) -> None:
    """Level 1 (per copy, per layer span) over the timelines written so far, median per level."""
    from sim.experiments.validation import level1

    if not tdir.is_dir():
        return
    l1 = level1(tdir)
    for level, g in l1.groupby("level"):
        log(f"level 1, {level} ({len(g)} configs, medians): copies paired {g.copies_matched_share.median():.0%}, "
            f"|copy duration error| {g.copy_median_abs_err.median():.1%}, |attn+router error| "
            f"{g.attn_router_median_abs_err.median():.1%}, |experts error| {g.experts_median_abs_err.median():.1%}")


def register_configs() -> None:
    from hydra.core.config_store import ConfigStore

    from runtime.__main__ import register_configs as register_run

    register_run()
    ConfigStore.instance().store(name="validate_schema", node=ValidateConf)


def _app(cfg: Any) -> None:
    run_validate(cfg)


def main(argv: list[str] | None = None) -> int:
    """Exit code of `python -m runtime.validate key=value ...` (traces.cli: errors print one line)."""
    import hydra

    from traces.cli import hydra_task, run_cli

    register_configs()
    if argv is not None:
        sys.argv = [sys.argv[0]] + list(argv)
    return run_cli(hydra.main(version_base="1.3", config_path="pkg://conf", config_name="validate")(hydra_task(_app)))


if __name__ == "__main__":
    sys.exit(main())
