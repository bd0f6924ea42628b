"""Aggregate a sweep: every job's results into one table; failed or unfinished jobs are listed.

Runs at the end of a Hydra multirun (a Hydra callback) and on its own over any sweep directory,
partial ones included: ``python -m sim.aggregate MULTIRUN_DIR``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import pandas as pd
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from sim.report import format_table, write_results


def aggregate_dir(sweep_dir: str | Path, name: str = "results") -> tuple[pd.DataFrame, list[str]]:
    """Concatenate ``<job>/<name>.parquet`` of every job dir; list job dirs without results."""
    sweep = Path(sweep_dir)
    if not sweep.is_dir():
        raise FileNotFoundError(f"{sweep}: no such sweep directory")
    frames, missing = [], []
    jobs = sorted((p for p in sweep.iterdir() if p.is_dir() and (p / ".hydra").is_dir()),
                  key=lambda p: (len(p.name), p.name))
    for job in jobs:
        f = job / f"{name}.parquet"
        if f.is_file():
            df = pd.read_parquet(f)
            df.insert(0, "job", job.name)
            frames.append(df)
        else:
            missing.append(job.name)
    df = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    return df, missing


def write_aggregate(sweep_dir: str | Path, name: str = "results") -> tuple[pd.DataFrame, list[str]]:
    df, missing = aggregate_dir(sweep_dir, name)
    if not df.empty:
        write_results(df.to_dict("records"), sweep_dir, f"{name}_all")
    return df, missing


def _print(df: pd.DataFrame, missing: list[str], sweep_dir: Any) -> None:
    if not df.empty:
        extra = [c for c in ("job", "model", "hardware", "memory_gb") if c in df.columns and df[c].nunique() > 1]
        print(format_table(df.to_dict("records"), extra=["job"] + [c for c in extra if c != "job"]))
        print(f"aggregated {len(df)} rows: {Path(sweep_dir) / 'results_all.parquet'}")
    if missing:
        print(f"jobs without results (failed or unfinished): {', '.join(missing)}")


class AggregateSweep(Callback):
    """Hydra callback: one aggregated table at the end of a multirun."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = config.hydra.sweep.dir
        name = config.get("results_name", "results")
        df, missing = write_aggregate(sweep_dir, name)
        _print(df, missing, sweep_dir)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m sim.aggregate", description=__doc__)
    p.add_argument("sweep_dir")
    p.add_argument("--name", default="results")
    a = p.parse_args(argv)
    try:
        df, missing = write_aggregate(a.sweep_dir, a.name)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    _print(df, missing, a.sweep_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
