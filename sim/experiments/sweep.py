"""Sweeps that scale: self-contained, resumable jobs (and the entry of the policy search).

``python -m sim.sweep [OVERRIDES]`` is the simulator app (the same config, conf/sim.yaml, and the
same rows as ``python -m sim``) made for sweeps:

- a job that fails (a bad config, a bug) is recorded in its dir (``sweep_job.json``: status, error,
  traceback) and the sweep goes on; the aggregated table at the end lists it, and the command exits
  with status 1;
- ``resume=true``: a job whose results for the same resolved config (and the same simulator code,
  policy presets and trace file) already exist, in its own dir or anywhere in the sweep dir, reuses
  them instead of simulating. With a fixed ``hydra.sweep.dir=DIR``, re-running an interrupted or
  extended sweep recomputes only what is missing.

``python -m sim.sweep search [OVERRIDES]`` (= ``experiment=search``) runs the policy search
(sim/experiments/search.py).

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
from typing import Any, Sequence

import pandas as pd
from omegaconf import DictConfig, OmegaConf

from sim.config import register_configs
from sim.errors import SimError
from sim.experiments.jobs import MARKER, config_fingerprint, index_job, indexed_results, read_marker, write_marker
from sim.experiments.search import run_search
from traces.atomic import write_bytes_atomic, write_json_atomic
from traces.cli import hydra_task
from traces.errors import MoeOffloadError, UsageError

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
    fingerprint when resuming. A project error (MoeOffloadError) becomes a failed marker: one bad
    config must not stop a sweep; a bug is recorded too but raised (as is KeyboardInterrupt)."""
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
    except MoeOffloadError as e:
        return _fail(out, fp, e, t0)
    except Exception as e:  # a bug: recorded (resume reruns the job), then it stops the sweep
        _fail(out, fp, e, t0)
        raise
    write_marker(out, {"status": "ok", "fingerprint": fp, "rows": len(rows), "reused_from": None,
                       "wall_s": time.perf_counter() - t0})
    index_job(sweep, fp, out, name)
    return JobResult("ok", rows)


def _fail(out: Path, fp: str | None, e: BaseException, t0: float) -> JobResult:
    kind = "" if isinstance(e, MoeOffloadError) else f"{type(e).__name__}: "
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
            raise UsageError("experiment=search runs its own trials; do not combine it with a multirun (-m)")
        base = [str(o) for o in hc.overrides.task]
        spec = OmegaConf.to_container(exp.search, resolve=True)
        res = run_search(base, spec, out)
        print(res.table)
        print(f"search results: {out}")
        return float(res.best.get(str(spec.get("metric", "tpot_ms")), math.inf))

    if isinstance(exp, DictConfig) and exp.get("map") is not None:
        return _map_task(cfg, [str(o) for o in hc.overrides.task], out, multirun)

    res = run_job(cfg, out, sweep_dir=Path(hc.sweep.dir) if multirun else None)
    if res.status == "failed":
        if not multirun:
            raise SimError(res.error)
        print(f"error: job {hc.job.num}: {res.error}", file=sys.stderr)
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
        raise UsageError("experiment=speculation-map runs its own grid; do not combine it with a multirun (-m)")
    base = [o for o in overrides if not o.lstrip("+~").startswith("experiment")]
    spec = MapSpec.from_cfg(OmegaConf.to_container(cfg.experiment, resolve=True))
    res = run_map(base, spec, out, command=" ".join(["python -m sim.sweep", *sys.argv[1:]]))
    print(res.summary)
    print(f"speculation map: {out / 'speculation_map.png'} (table: speculation_map.parquet)")
    ok = res.table[res.table["status"] == "ok"]
    return float(ok["speedup"].max()) if len(ok) else math.inf


def _app() -> None:
    import hydra

    hydra.main(version_base="1.3", config_path="pkg://conf", config_name="sim")(hydra_task(task))()


def check_sweep_outcome(scan: Any) -> None:
    """A sweep in which no job ran a policy (every row infeasible, unsupported or failed) is refused
    (exit 2); one in which at least one job ran succeeds, its other jobs staying rows with their
    ``status`` and ``reason``."""
    if scan is None:
        return
    ran = not scan.rows.empty and "status" in scan.rows.columns and (scan.rows["status"] == "ok").any()
    if not ran:
        raise SimError(f"no job of the sweep ran (see the job table above); rows and jobs.csv in {scan.sweep_dir}")


def main(argv: Sequence[str] | None = None) -> int:
    """Exit code of ``python -m sim.sweep [search] [OVERRIDES]`` (also ``moe-sweep``; traces.cli)."""
    from sim.experiments import aggregate
    from traces.cli import Interrupted, run_cli

    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] == "search":
        args = args[1:]
        if not any(a.startswith("experiment=") for a in args):
            args.insert(0, "experiment=search")
    sys.argv = [sys.argv[0], *args]

    def go() -> int:
        aggregate.LAST_SCAN = aggregate.SWEEP_DIR = None
        aggregate.check_sweep_args(args)
        try:
            _app()
        except KeyboardInterrupt:
            where = aggregate.SWEEP_DIR
            if where is None:
                raise
            raise Interrupted(f"finished jobs are in {where}; finish the sweep with the same overrides "
                              f"plus hydra.sweep.dir={where} resume=true") from None
        check_sweep_outcome(aggregate.LAST_SCAN)
        return 0

    return run_cli(go)


if __name__ == "__main__":
    # run the imported module, not this __main__ copy: jobs then pickle ``task`` by reference
    # (joblib, submitit, Ray workers import it instead of receiving a copy)
    from sim.experiments.sweep import main as _main

    sys.exit(_main())
