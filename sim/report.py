"""Results tables: one tidy row per run, written as Parquet and JSON, and the printed table."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Sequence

import pandas as pd

from sim.metrics import TABLE_COLUMNS
from traces.atomic import atomic_write
from traces.errors import UsageError

_AFTER = TABLE_COLUMNS.index("gb_moved") + 1
PRINTED = TABLE_COLUMNS[:_AFTER] + ["useful_prefetch_gb", "wasted_prefetch_gb"] + TABLE_COLUMNS[_AFTER:] + ["status"]
#: what each cache.reset means, said under a printed table (docs/metrics.md)
CACHE_RESET = {"never": "warm across requests", "request": "cold at each request's start"}
#: the metric that ranks policies, said under every printed table (docs/metrics.md, "Ranking")
RANKING = ("ranking: TPOT ms, the mean over requests of each request's time per output token; tokens/s pools all "
           "decode tokens, so long requests weigh more and it can order policies differently")


def to_frame(rows: Sequence[dict[str, Any]]) -> pd.DataFrame:
    return pd.DataFrame(list(rows))


def write_results(rows: Sequence[dict[str, Any]], out_dir: str | os.PathLike, name: str = "results", *,
                  overwrite: bool = True) -> tuple[Path, Path]:
    """``<name>.parquet`` and ``<name>.json`` in ``out_dir``, each written atomically
    (``overwrite=False``: FileExistsError rather than replace an existing file)."""
    out = Path(out_dir)
    df = to_frame(rows)
    pq_path = atomic_write(out / f"{name}.parquet", lambda tmp: df.to_parquet(tmp, index=False), overwrite=overwrite)

    def dump(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump([_jsonable(r) for r in rows], f, indent=1, default=str)

    return pq_path, atomic_write(out / f"{name}.json", dump, overwrite=overwrite)


def reasons(rows: Sequence[dict[str, Any]]) -> str:
    """The lines printed under a table: each non-ok row's status and reason."""
    out = []
    for r in rows:
        if r.get("status", "ok") != "ok":
            who = r.get("policy", "?") + (f" ({r['source']})" if r.get("source") not in (None, "sim") else "")
            out.append(f"  {who}: {r['status']}: {r.get('reason') or 'no reason recorded'}")
    return "\n".join(out)


class ResultsWriter:
    """The results file of one run, rewritten (atomically) each time a policy finishes, so that an
    interrupted suite keeps its finished rows. It refuses, before any work, a directory that already
    holds results of another run, and its first write never replaces a file that appeared meanwhile
    (two runs that were given the same directory); ``resume=True`` adds to its own earlier rows."""

    def __init__(self, out_dir: str | os.PathLike, name: str = "results", *, resume: bool = False) -> None:
        from traces.atomic import check_output_dir

        self.out_dir = check_output_dir(out_dir, "results directory")
        self.name = name
        self.parquet = self.out_dir / f"{name}.parquet"
        self.json = self.out_dir / f"{name}.json"
        self.rows: list[dict[str, Any]] = []
        self._another_run = False  # another run's results appeared in the directory meanwhile
        self._attempted = self._wrote = False
        if not resume:
            for path in (self.parquet, self.json):
                if path.exists():
                    raise UsageError(f"{path} already exists (another run's results); "
                                     "give this run its own directory (hydra.run.dir=...)")
        self._resume = resume

    def add(self, row: dict[str, Any]) -> None:
        """Write the rows with ``row`` added; ``rows`` holds it once it is on disk."""
        self.write(self.rows + [row])
        self.rows.append(row)

    def write(self, rows: Sequence[dict[str, Any]] | None = None) -> None:
        rows = self.rows if rows is None else rows
        if not rows:
            return
        self._attempted = True
        try:
            write_results(rows, self.out_dir, self.name, overwrite=self._resume or self._wrote)
            self._wrote = True
        except FileExistsError:
            self._another_run = True
            raise UsageError(f"{self.parquet}: another run wrote results into this directory meanwhile; "
                             "this run's rows were not written") from None

    def where(self) -> str:
        """One line for an interrupted run: where its finished rows are, counted in the file (an
        interrupt can land after the file took a row and before ``rows`` did)."""
        status = [r.get("status") for r in self.rows]
        if self._attempted and not self._another_run and not self._resume:
            try:
                status = list(pd.read_parquet(self.parquet, columns=["status"])["status"])
            except Exception:  # noqa: BLE001 - unreadable: what this run knows it wrote
                pass
        if not status:
            return "no policy had finished; nothing was written"
        ok = status.count("ok")
        return f"{ok} finished row{'s' if ok != 1 else ''} ({len(status)} in all) in {self.parquet}"


def _jsonable(row: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for k, v in row.items():
        if isinstance(v, float) and not math.isfinite(v):
            v = None
        elif hasattr(v, "tolist"):
            v = v.tolist()
        out[k] = v
    return out


def format_table(rows: Sequence[dict[str, Any]], extra: Sequence[str] = (), *, ranking: bool = True) -> str:
    """policy, TPOT ms, tokens/s, hit rate, GB moved (useful and wasted prefetches among them),
    stall share, x bound (+ ``extra`` columns), and the line that names the ranking metric."""
    df = to_frame(rows)
    cols = [c for c in list(extra) + PRINTED if c in df.columns]
    df = df[cols].copy()
    fmt = {"tpot_ms": "{:.2f}", "tokens_per_s": "{:.2f}", "hit_rate": "{:.3f}", "gb_moved": "{:.2f}",
           "useful_prefetch_gb": "{:.2f}", "wasted_prefetch_gb": "{:.2f}", "stall_share": "{:.3f}", "x_bound": "{:.2f}"}
    for c, f in fmt.items():
        if c in df.columns:
            df[c] = [("-" if (v is None or (isinstance(v, float) and math.isnan(v))) else f.format(v)) for v in df[c]]
    df = df.rename(columns={"tpot_ms": "TPOT ms", "tokens_per_s": "tokens/s", "hit_rate": "hit rate",
                            "gb_moved": "GB moved", "useful_prefetch_gb": "useful GB", "wasted_prefetch_gb": "wasted GB",
                            "stall_share": "stall share", "x_bound": "x bound"})
    text = df.to_string(index=False)
    if not ranking or "tpot_ms" not in cols:
        return text
    resets = sorted({str(r["cache_reset"]) for r in rows if r.get("cache_reset")})
    cache = f"; cache.reset={'/'.join(resets)} ({CACHE_RESET.get(resets[0], '')})" if len(resets) == 1 else ""
    return text + "\n" + RANKING + cache


SPECULATIVE_PRINTED = ["acceptance_rate", "mean_k", "tokens_per_cycle", "coverage_ready", "coverage_requested",
                       "elb_recall", "experts_per_token"]


def format_speculative(rows: Sequence[dict[str, Any]]) -> str:
    """The speculative rows' acceptance, mean k, tokens per cycle and coverage, then the share of
    cycles at each k (the k that any row used); empty when no row is speculative."""
    spec = [r for r in rows if r.get("status") == "ok" and r.get("decoding") == "speculative"]
    if not spec:
        return ""
    df = to_frame(spec)
    cols = ["policy"] + [c for c in SPECULATIVE_PRINTED if c in df.columns]
    top = df[cols].to_string(index=False, float_format=lambda v: f"{v:.3f}")
    ks = sorted({int(c[7:]) for c in df.columns if c.startswith("k_hist_")})
    ks = [k for k in ks if df[f"k_hist_{k}"].fillna(0).gt(0).any()]
    hist = df[["policy"] + [f"k_hist_{k}" for k in ks]].rename(columns={f"k_hist_{k}": f"k={k}" for k in ks})
    return (top + "\nshare of cycles at each draft length k:\n"
            + hist.to_string(index=False, float_format=lambda v: f"{v:.2f}"))
