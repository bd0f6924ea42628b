"""Aggregate a sweep: every job's results into one table; failed, unfinished and never-started jobs
are listed beside it, never dropped silently.

Runs at the end of a Hydra multirun (the ``AggregateSweep`` callback of conf/sim.yaml) and on its own
over any sweep directory, partial ones included::

    python -m sim.aggregate MULTIRUN_DIR

Writes into the sweep dir: ``results_all.parquet`` / ``.json`` (every job's rows, plus one row with
``status = failed`` per failed job), ``jobs.csv`` (one line per job: ok, failed, unfinished, not
started, stale), and, where the experiment config asks for them (``hydra.callbacks.aggregate.table``
and ``.figure``), ``summary.csv`` / ``summary.txt`` (a pivot) and ``figure.png`` (seaborn).

A job's state comes from the record it leaves (sim/experiments/jobs.py; docs/sweeps.md). A job dir
whose config was rewritten by a later launch that did not finish is ``unfinished``, not silently
reported with the old results. The list of jobs a sweep should have comes from its ``multirun.yaml`` (basic sweeper),
so jobs that never started are listed too.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import pandas as pd
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from sim.experiments.figures import plot_sweep, varying_keys
from sim.experiments.jobs import config_fingerprint, file_sha, index_job, read_marker, write_marker
from sim.report import format_table, write_results
from traces.atomic import atomic_write, write_text_atomic
from traces.cli import run_cli
from traces.errors import UsageError

BASIC_SWEEPER = "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"

#: job states, in the order they are reported
JOB_STATES = ("ok", "failed", "unfinished", "not started", "stale")


def _job_key(name: str) -> tuple:
    return (0, int(name), "") if name.isdigit() else (1, 0, name)


# ------------------------------------------------------------------ what the sweep should contain
def expected_jobs(sweep_dir: str | os.PathLike) -> list[list[str]] | None:
    """The override lists of every job of the sweep, in launch order, recomputed from its
    ``multirun.yaml`` the way Hydra's basic sweeper builds them; None if that cannot be known
    (another sweeper, no multirun.yaml)."""
    mr = Path(sweep_dir) / "multirun.yaml"
    if not mr.is_file():
        return None
    try:
        from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
        from hydra.core.override_parser.overrides_parser import OverridesParser

        cfg = OmegaConf.load(mr)
        sweeper = OmegaConf.to_container(cfg.hydra.sweeper, resolve=False)
        if sweeper.get("_target_") != BASIC_SWEEPER:
            return None
        params = sweeper.get("params") or {}
        args = [f"{k}={v}" for k, v in params.items()]
        args += [str(a) for a in OmegaConf.to_container(cfg.hydra.overrides.task, resolve=False)]
        loader = _config_loader() if any("glob(" in a for a in args) else None
        overrides = OverridesParser.create(config_loader=loader).parse_overrides(args)
        batches = BasicSweeper.split_arguments(overrides, None)
        return [list(map(str, o)) for o in batches[0]]
    except Exception:  # an unusual multirun.yaml: report what is on disk instead
        return None


def _config_loader():
    """A config loader over the shipped configs (needed to expand ``glob()`` sweeps)."""
    from hydra._internal.config_loader_impl import ConfigLoaderImpl
    from hydra._internal.utils import create_config_search_path

    from sim.presets import conf_dir

    return ConfigLoaderImpl(config_search_path=create_config_search_path(str(conf_dir())))


def aggregate_spec(sweep_dir: str | os.PathLike) -> dict[str, Any]:
    """``figure`` and ``table`` of the sweep's AggregateSweep callback config (from multirun.yaml)."""
    mr = Path(sweep_dir) / "multirun.yaml"
    if not mr.is_file():
        return {}
    try:
        cb = OmegaConf.to_container(OmegaConf.load(mr).hydra.callbacks, resolve=False) or {}
    except Exception:
        return {}
    for v in cb.values():
        if isinstance(v, dict) and str(v.get("_target_", "")).endswith("AggregateSweep"):
            return {k: v[k] for k in ("figure", "table") if v.get(k)}
    return {}


# ------------------------------------------------------------------ scanning a sweep dir
@dataclass
class SweepScan:
    """What a sweep dir holds: the rows of finished jobs and the state of every job."""

    sweep_dir: Path
    rows: pd.DataFrame
    jobs: pd.DataFrame  # job, status, overrides, rows, reused, error
    expected: int | None  # jobs the sweep should have (None: unknown)

    def names(self, *states: str) -> list[str]:
        if self.jobs.empty:
            return []
        return self.jobs.loc[self.jobs.status.isin(states), "job"].tolist()

    @property
    def failed(self) -> list[str]:
        return self.names("failed")

    @property
    def incomplete(self) -> list[str]:
        """Jobs of the sweep without current results: failed, unfinished or never started (dirs of
        an earlier, different sweep in the same dir are ``stale`` and not counted)."""
        return self.names("failed", "unfinished", "not started")


def _read_overrides(job: Path) -> list[str] | None:
    try:
        return [str(o) for o in OmegaConf.to_container(OmegaConf.load(job / ".hydra" / "overrides.yaml"))]
    except Exception:
        return None


def _job_state(job: Path, name: str) -> tuple[str, dict[str, Any]]:
    """(state, marker) of one job dir, from its marker and files."""
    res = job / f"{name}.parquet"
    cfg_yaml = job / ".hydra" / "config.yaml"
    marker = read_marker(job)
    if marker is not None and marker.get("config_sha") not in (None, file_sha(cfg_yaml)):
        marker = None  # a later launch rewrote the config: the marker belongs to an older run
        if res.is_file():
            return "unfinished", {"error": "config was rewritten by a later launch that did not finish"}
    if marker is not None:
        if marker.get("status") == "failed":
            return "failed", marker
        if marker.get("status") == "ok" and res.is_file():
            return "ok", marker
    if res.is_file():
        # no marker (e.g. written by an older app): trust results written after the config
        if not cfg_yaml.is_file() or res.stat().st_mtime >= cfg_yaml.stat().st_mtime:
            return "ok", {}
        return "unfinished", {"error": "results are older than the job's config"}
    return "unfinished", {"error": "no results (still running, killed, or exited without a record)"}


def _failed_row(job: Path, marker: Mapping[str, Any]) -> dict[str, Any]:
    """A results row for a failed job: the config keys it would have had, status and reason."""
    row: dict[str, Any] = {}
    try:
        from sim.run import base_keys

        cfg = OmegaConf.load(job / ".hydra" / "config.yaml")
        row.update(base_keys(cfg))
        row["policy"] = cfg.policy.get("name")
    except Exception:
        pass
    row.update({"source": "sim", "status": "failed", "reason": str(marker.get("error") or "failed")})
    return row


def scan_sweep(sweep_dir: str | os.PathLike, name: str = "results") -> SweepScan:
    """Every job dir of a sweep (direct children holding ``.hydra/``), with its state and rows."""
    sweep = Path(sweep_dir)
    if not sweep.is_dir():
        raise FileNotFoundError(f"{sweep}: no such sweep directory")
    dirs = sorted((p for p in sweep.iterdir() if p.is_dir() and (p / ".hydra").is_dir()),
                  key=lambda p: _job_key(p.name))
    expected = expected_jobs(sweep)
    if expected is not None:
        by_num = {str(i): o for i, o in enumerate(expected)}
        by_ovr = {tuple(o): str(i) for i, o in enumerate(expected)}
        numbered = all(p.name.isdigit() for p in dirs)
    frames: list[pd.DataFrame] = []
    jobs: list[dict[str, Any]] = []
    seen: set[str] = set()
    for job in dirs:
        ovr = _read_overrides(job)
        state, marker = _job_state(job, name)
        if expected is not None:
            # a dir of an earlier, different sweep in the same sweep dir is stale, not a result
            if numbered:  # hydra.sweep.subdir is the job number (Hydra's default)
                current = job.name in by_num and ovr == by_num[job.name]
            else:
                current = ovr is not None and tuple(ovr) in by_ovr
            if current:
                seen.add(job.name if numbered else by_ovr[tuple(ovr)])
            else:
                state, marker = "stale", {"error": "job dir of an earlier sweep with other overrides"}
        info = {"job": job.name, "status": state, "overrides": " ".join(ovr or []), "rows": 0,
                "reused": bool(marker.get("reused_from")), "error": str(marker.get("error") or "")}
        if state == "ok":
            try:
                df = pd.read_parquet(job / f"{name}.parquet")
            except Exception as e:  # unreadable results count as unfinished, named
                info.update(status="unfinished", error=f"{name}.parquet unreadable: {e}")
            else:
                df.insert(0, "job", job.name)
                df.insert(1, "overrides", info["overrides"])
                frames.append(df)
                info["rows"] = len(df)
        elif state == "failed":
            row = {"job": job.name, "overrides": info["overrides"], **_failed_row(job, marker)}
            frames.append(pd.DataFrame([row]))
            info["rows"] = 1
        jobs.append(info)
    if expected is not None:
        for i, o in enumerate(expected):
            if str(i) not in seen:
                jobs.append({"job": str(i), "status": "not started", "overrides": " ".join(o), "rows": 0,
                             "reused": False, "error": ""})
    frames = [f for f in frames if not f.empty]
    rows = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    jobs_df = pd.DataFrame(jobs, columns=["job", "status", "overrides", "rows", "reused", "error"])
    if not jobs_df.empty:
        jobs_df = jobs_df.sort_values("job", key=lambda s: s.map(_job_key), kind="stable").reset_index(drop=True)
    return SweepScan(sweep, rows, jobs_df, None if expected is None else len(expected))


# ------------------------------------------------------------------ writing the aggregate
def aggregate_dir(sweep_dir: str | Path, name: str = "results") -> tuple[pd.DataFrame, list[str]]:
    """Every job's rows (a failed job gives one ``status = failed`` row) and the names of the jobs
    without current results (failed, unfinished, never started)."""
    scan = scan_sweep(sweep_dir, name)
    return scan.rows, scan.incomplete


def write_scan(sweep_dir: str | Path, name: str = "results", *, figure: Mapping[str, Any] | None = None,
               table: Mapping[str, Any] | None = None) -> SweepScan:
    """Scan, then write ``<name>_all``, ``jobs.csv`` and the summary table and figure if asked for."""
    scan = scan_sweep(sweep_dir, name)
    sweep = Path(sweep_dir)
    if not scan.rows.empty:
        write_results(scan.rows.to_dict("records"), sweep, f"{name}_all")
    _write_csv_atomic(scan.jobs, sweep / "jobs.csv")
    if table and not scan.rows.empty:
        text, numeric = summary_table(scan.rows, table)
        _write_csv_atomic(numeric, sweep / "summary.csv", index=True)
        _write_text_atomic(text + "\n", sweep / "summary.txt")
    if figure and not scan.rows.empty:
        plot_sweep(scan.rows, figure, sweep / "figure.png")
    return scan


def _write_csv_atomic(df: pd.DataFrame, path: Path, index: bool = False) -> None:
    atomic_write(path, lambda tmp: df.to_csv(tmp, index=index))


def _write_text_atomic(text: str, path: Path) -> None:
    write_text_atomic(path, text)


# ------------------------------------------------------------------ summary table
def _as_list(v: Any) -> list[str]:
    if v is None:
        return []
    return [str(x) for x in v] if isinstance(v, (list, tuple)) else [str(v)]


def _determined(rows: pd.DataFrame, by: Sequence[str], col: str) -> bool:
    """Whether ``col`` takes one value in every group of ``by`` (it adds nothing to them as a key)."""
    if not by:
        return False
    keys = rows[list(by)].astype(str)
    return bool((rows[col].astype(str).groupby([keys[c] for c in by]).nunique(dropna=False) <= 1).all())


def summary_table(rows: pd.DataFrame, spec: Mapping[str, Any]) -> tuple[str, pd.DataFrame]:
    """A pivot of ``values`` (default tpot_ms) over ``index`` x ``columns`` (default policy).

    Returns the printed text (cells of infeasible or failed configs say so) and the numeric pivot
    (NaN where no ok value exists)."""
    values = str(spec.get("values", "tpot_ms"))
    columns = _as_list(spec.get("columns", "policy"))
    index = [c for c in _as_list(spec.get("index")) if c in rows.columns and c not in columns]
    columns = [c for c in columns if c in rows.columns]
    ok_rows = rows[rows["status"] == "ok"] if "status" in rows.columns else rows
    # keys the spec does not name but the sweep varied go into the index (policy-derived columns
    # such as eviction follow the policy and are left out when policy is already a dimension)
    derived = {"eviction", "prefetch", "predictor", "governor", "governor_k"} if "policy" in index + columns else set()
    named = index + columns
    base = ok_rows if len(ok_rows) else rows
    # a varying key that the named ones determine (memory_gb by memory_gib, a policy's own engine or
    # host memory) would only split rows: it stays out of the index
    index += [c for c in varying_keys(base, named) if c not in derived and not _determined(base, named, c)]
    if not index:
        index = ["job"]
    df = rows.copy()
    if values not in df.columns:
        df[values] = float("nan")
    ok = df["status"] == "ok" if "status" in df.columns else pd.Series(True, index=df.index)
    fmt = str(spec.get("format", "{:.2f}"))

    def cell(i: int) -> str:
        v = df.at[i, values]
        if not ok.iloc[i]:
            return str(df.at[i, "status"])
        return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else fmt.format(v)

    df["_cell"] = [cell(i) for i in range(len(df))]
    df["_num"] = pd.to_numeric(df[values].where(ok), errors="coerce")
    for c in index + columns:  # keep missing keys (None) as their own label
        df[c] = df[c].astype(object).where(df[c].notna(), "-")
    if columns:
        text_p = df.pivot_table(index=index, columns=columns, values="_cell", aggfunc="first", sort=False)
        num_p = df.pivot_table(index=index, columns=columns, values="_num", aggfunc="first", dropna=False, sort=False)
    else:
        text_p = df.set_index(index)[["_cell"]].rename(columns={"_cell": values})
        num_p = df.set_index(index)[["_num"]].rename(columns={"_num": values})
    text_p = text_p.fillna("-")
    title = f"{values} by {', '.join(index)}" + (f" x {', '.join(columns)}" if columns else "")
    return f"{title}\n{text_p.to_string()}", num_p


# ------------------------------------------------------------------ printing
def report(scan: SweepScan, *, table: Mapping[str, Any] | None = None, name: str = "results") -> str:
    """The text printed at the end of a sweep and by ``python -m sim.aggregate``."""
    out: list[str] = []
    df = scan.rows
    if not df.empty:
        if table:
            out.append(summary_table(df, table)[0])
        else:
            keys = ("model", "hardware", "memory_gb", "h2d_gbps", "cache_slots", "cache_per_layer", "trace")
            extra = [c for c in keys if c in df.columns and df[c].astype(str).nunique() > 1]
            out.append(format_table(df.to_dict("records"), extra=["job"] + extra))
        out.append(f"aggregated {len(df)} rows: {scan.sweep_dir / (name + '_all.parquet')}")
    counts = scan.jobs.status.value_counts().to_dict() if not scan.jobs.empty else {}
    total = sum(n for s, n in counts.items() if s != "stale")
    parts = [f"{counts[s]} {s}" for s in JOB_STATES if counts.get(s) and s != "stale"]
    reused = int(scan.jobs.reused.sum()) if not scan.jobs.empty else 0
    out.append(f"jobs: {total}" + (f" ({', '.join(parts)})" if parts else "") +
               (f"; {reused} reused from an earlier run" if reused else ""))
    for state in ("failed", "unfinished", "not started"):
        sel = scan.jobs[scan.jobs.status == state] if not scan.jobs.empty else scan.jobs
        if len(sel):
            out.append(f"{state} jobs:")
            for _, j in sel.iterrows():
                why = f": {j.error}" if j.error else ""
                out.append(f"  {j.job} [{j.overrides}]{why}")
    if counts.get("stale"):
        stale = scan.names("stale")
        out.append(f"ignored {len(stale)} job dir(s) of an earlier sweep with other overrides: {', '.join(stale)}")
    return "\n".join(out)


#: the scan of the last sweep aggregated in this process (the sweep app reads it for its exit code)
LAST_SCAN: SweepScan | None = None
#: the sweep dir of the multirun running in this process (the sweep app's Ctrl-C line names it)
SWEEP_DIR: Path | None = None


def check_sweep_args(argv: list[str]) -> None:
    """Before Hydra starts a multirun (it writes multirun.yaml first): an explicit
    ``hydra.sweep.dir=`` must not hold another sweep unless ``resume=true`` (the default dir is unique)."""
    if not any(a in ("-m", "--multirun") for a in argv):
        return
    dirs = [a.split("=", 1)[1] for a in argv if a.lstrip("+").startswith("hydra.sweep.dir=")]
    resume = [a.split("=", 1)[1].strip().lower() for a in argv if a.lstrip("+").startswith("resume=")]
    if dirs:
        check_sweep_dir(dirs[-1], bool(resume) and resume[-1] == "true")


def check_sweep_dir(sweep_dir: str | os.PathLike, resume: bool) -> None:
    """Refuse, before any job, a sweep dir that already holds another sweep's jobs unless the sweep
    resumes it (``resume=true`` reuses and extends it; nothing else writes into another run's dir)."""
    from traces.atomic import check_output_dir

    sweep = check_output_dir(sweep_dir, "hydra.sweep.dir")
    if resume or not sweep.is_dir():
        return
    if (sweep / "multirun.yaml").is_file() or any((d / ".hydra").is_dir() for d in sweep.iterdir() if d.is_dir()):
        raise UsageError(f"{sweep} already holds a sweep's results; pass resume=true to reuse and extend "
                         "them, or give this sweep its own hydra.sweep.dir")


class AggregateSweep(Callback):
    """Hydra callback: records each job's end (a marker in its dir, so failed jobs are listed and
    finished ones can be resumed), and writes one aggregated table (and figure) at the end."""

    def __init__(self, figure: Any = None, table: Any = None) -> None:
        def plain(v: Any) -> Any:
            return OmegaConf.to_container(v, resolve=True) if isinstance(v, DictConfig) else v

        self.figure = plain(figure)
        self.table = plain(table)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        global SWEEP_DIR
        SWEEP_DIR = Path(config.hydra.sweep.dir)

    def on_job_end(self, config: DictConfig, job_return: Any = None, **kwargs: Any) -> None:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        try:
            if HydraConfig.get().mode != RunMode.MULTIRUN:
                return
            out = Path(config.hydra.runtime.output_dir)
        except Exception:
            return
        cfg_sha = file_sha(out / ".hydra" / "config.yaml")
        m = read_marker(out)
        if m is not None and m.get("config_sha") == cfg_sha:
            return  # the job recorded itself (python -m sim.sweep)
        from hydra.core.utils import JobStatus

        name = config.get("results_name", "results")
        status = getattr(job_return, "status", None)
        if status == JobStatus.FAILED:
            err = job_return._return_value
            write_marker(out, {"status": "failed", "error": f"{type(err).__name__}: {err}"})
        elif status == JobStatus.COMPLETED and (out / f"{name}.parquet").is_file():
            try:
                task_cfg = OmegaConf.masked_copy(config, [k for k in config.keys() if k != "hydra"])
                fp = config_fingerprint(task_cfg)
            except Exception:
                fp = None
            write_marker(out, {"status": "ok", "fingerprint": fp})
            if fp:
                index_job(config.hydra.sweep.dir, fp, out, name)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        global LAST_SCAN
        sweep_dir = config.hydra.sweep.dir
        name = config.get("results_name", "results")
        scan = write_scan(sweep_dir, name, figure=self.figure, table=self.table)
        LAST_SCAN = scan
        print(report(scan, table=self.table, name=name))
        if self.figure and (Path(sweep_dir) / "figure.png").is_file():
            print(f"figure: {Path(sweep_dir) / 'figure.png'}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m sim.aggregate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sweep_dir")
    p.add_argument("--name", default="results", help="results file stem of the jobs (results_name)")
    p.add_argument("--no-figure", action="store_true", help="skip the figure even if the sweep asks for one")
    p.add_argument("--strict", action="store_true", help="exit 2 if any job has no current results")

    def go() -> int:
        a = p.parse_args(argv)
        sweep = Path(a.sweep_dir)
        if not sweep.is_dir():
            raise UsageError(f"{sweep}: no such sweep directory")
        if scan_sweep(sweep, a.name).jobs.empty:  # before anything is written there
            raise UsageError(f"{sweep}: holds no sweep (no multirun.yaml, no job directories with .hydra/)")
        spec = aggregate_spec(sweep)
        scan = write_scan(sweep, a.name, figure=None if a.no_figure else spec.get("figure"), table=spec.get("table"))
        print(report(scan, table=spec.get("table"), name=a.name))
        if a.strict and scan.incomplete:
            raise UsageError(f"--strict: {len(scan.incomplete)} job(s) without current results: "
                             + ", ".join(scan.incomplete))
        return 0

    return run_cli(go)


if __name__ == "__main__":
    sys.exit(main())
