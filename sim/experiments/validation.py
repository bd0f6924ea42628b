"""Simulated against measured: the join of the two kinds of rows and the error metrics (torch-free).

A validation table (benchmarks/validation/<card>/validation.parquet, written by ``python -m
runtime.validate``) holds one row per config, level and source: ``source = measured`` rows are the
runtime's runs (one per repetition), ``source = sim`` the simulator's prediction of the same
config (same ``config_id``) under the measured profile of the same card. ``level`` is ``replayed``
(the simulator replays the runtime's decisions) or ``closed`` (each side runs its own policies).

- ``join``: one measured row per (level, card, date, config_id) (repetitions reduced: mean TPOT,
  TTFT, hit rate, stall share; per-token latencies pooled) beside one sim row, reduced the same
  way (level ``replayed`` has a sim row per measured repetition, each replaying that repetition's
  decisions; ``closed`` one); the sim row gets ``tpot_rel_err = (sim - measured) / measured`` and
  the same for the per-token percentiles.
- ``ks_statistic``: the two-sample Kolmogorov-Smirnov statistic of per-token latencies.
- ``summary``: per level, median and maximum |TPOT error|, the same for p50/p90/p99, the median KS
  statistic, and whether the targets (``TARGETS``) are met.
- ``timeline_errors`` / ``level1``: level 1, per transfer and per layer, from the two timelines of
  a config (``timelines/<config_id>.measured.json`` against ``.replayed.json`` or ``.sim.json``):
  each copy and each compute span matched by name and occurrence (the n-th copy of expert L3.E5 on
  both sides; the n-th ``experts L3``), the relative error of each matched duration, and how many
  found a partner.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from sim.errors import SimError
from sim.timeline import PID_GPU, PID_LINK

LEVELS = ("replayed", "closed")
SOURCES = ("measured", "sim")
#: targets on |relative TPOT error| per level: (median, maximum)
TARGETS = {"replayed": (0.03, 0.08), "closed": (0.05, 0.10)}
#: columns every validation row has (sim rows add the error columns)
COLUMNS = ["level", "config_id", "card", "date", "engine", "link", "policy", "source", "model", "budget",
           "repetition", "tpot_s", "p50_token_s", "p90_token_s", "p99_token_s", "ttft_s", "hit_rate",
           "stall_share", "k", "token_gaps_s"]
KEYS = ["level", "card", "date", "config_id"]
PERCENTILES = ("p50", "p90", "p99")


def check_rows(df: Any, where: str = "validation table") -> None:
    """A clear error for a table that lacks columns or has unknown levels or sources."""
    missing = [c for c in COLUMNS if c not in df.columns]
    if missing:
        raise SimError(f"{where}: missing column(s) {missing}")
    for col, known in (("level", LEVELS), ("source", SOURCES)):
        bad = sorted(set(df[col].dropna()) - set(known))
        if bad:
            raise SimError(f"{where}: column '{col}' has unknown value(s) {bad}; known: {list(known)}")


def _pool(gaps: Iterable[Any]) -> np.ndarray:
    parts = [np.asarray(g, dtype=np.float64) for g in gaps if g is not None and len(g)]
    return np.concatenate(parts) if parts else np.zeros(0)


def join(df: Any) -> Any:
    """One measured and one sim row per (level, card, date, config_id), errors on the sim rows.

    Configs with only one side are dropped (a run still in progress, a failed config)."""
    import pandas as pd

    check_rows(df)
    first = ["engine", "link", "policy", "model", "budget"]
    out = []
    for key, g in df.groupby(KEYS, sort=True, dropna=False):
        m, s = g[g["source"] == "measured"], g[g["source"] == "sim"]
        if m.empty or s.empty:
            continue
        base = dict(zip(KEYS, key)) | {c: g[c].iloc[0] for c in first}
        rows = {}
        for src, part in (("measured", m), ("sim", s)):
            gaps = _pool(part["token_gaps_s"])
            r = {**base, "source": src, "repetitions": len(part),
                 "tpot_s": float(part["tpot_s"].mean()), "tpot_sd_s": float(part["tpot_s"].std(ddof=1)) if len(part) > 1 else 0.0,
                 "ttft_s": float(part["ttft_s"].mean()), "hit_rate": float(part["hit_rate"].mean()),
                 "stall_share": float(part["stall_share"].mean()), "k": float(part["k"].mean()),
                 "token_gaps_s": gaps}
            for p in PERCENTILES:
                q = float(p[1:])
                r[f"{p}_token_s"] = float(np.percentile(gaps, q)) if gaps.size else float(part[f"{p}_token_s"].mean())
            rows[src] = r
        meas, sim = rows["measured"], rows["sim"]
        sim["tpot_rel_err"] = rel_err(sim["tpot_s"], meas["tpot_s"])
        for p in PERCENTILES:
            sim[f"{p}_rel_err"] = rel_err(sim[f"{p}_token_s"], meas[f"{p}_token_s"])
        sim["ks"] = ks_statistic(sim["token_gaps_s"], meas["token_gaps_s"])
        out += [meas, sim]
    cols = ["level", "card", "date", "config_id", "engine", "link", "policy", "model", "budget", "source",
            "repetitions", "tpot_s", "tpot_sd_s", "p50_token_s", "p90_token_s", "p99_token_s", "ttft_s", "hit_rate",
            "stall_share", "k", "tpot_rel_err", "p50_rel_err", "p90_rel_err", "p99_rel_err", "ks", "token_gaps_s"]
    return pd.DataFrame(out, columns=cols)


def rel_err(sim: float, measured: float) -> float:
    """(sim - measured) / measured; NaN where the measurement is 0 or missing."""
    if not measured or measured != measured:
        return float("nan")
    return (sim - measured) / measured


def ks_statistic(a: Sequence[float], b: Sequence[float]) -> float:
    """Two-sample Kolmogorov-Smirnov statistic: the largest gap between the two empirical CDFs."""
    x, y = np.sort(np.asarray(a, dtype=np.float64)), np.sort(np.asarray(b, dtype=np.float64))
    if x.size == 0 or y.size == 0:
        return float("nan")
    grid = np.concatenate([x, y])
    fx = np.searchsorted(x, grid, side="right") / x.size
    fy = np.searchsorted(y, grid, side="right") / y.size
    return float(np.max(np.abs(fx - fy)))


def summary(joined: Any, by: Sequence[str] = ("level",)) -> Any:
    """Per group (default: level): configs, median and max |error| of TPOT and the per-token
    percentiles, median KS, and the targets met (``TARGETS``, by level)."""
    import pandas as pd

    sim = joined[joined["source"] == "sim"]
    out = []
    for key, g in sim.groupby(list(by), sort=True):
        key = key if isinstance(key, tuple) else (key,)
        r = dict(zip(by, key)) | {"configs": len(g)}
        for col in ["tpot_rel_err"] + [f"{p}_rel_err" for p in PERCENTILES]:
            a = g[col].abs().dropna()
            name = col.replace("_rel_err", "")
            r[f"{name}_median_abs_err"] = float(a.median()) if len(a) else float("nan")
            r[f"{name}_max_abs_err"] = float(a.max()) if len(a) else float("nan")
        r["ks_median"] = float(g["ks"].median())
        level = r.get("level")
        if level in TARGETS:
            med, mx = TARGETS[level]
            r["target_median"], r["target_max"] = med, mx
            r["meets_target"] = bool(r["tpot_median_abs_err"] <= med and r["tpot_max_abs_err"] <= mx)
        out.append(r)
    return pd.DataFrame(out)


def from_results(df: Any, *, card: str, date: str, engine: str = "eager", level: str = "closed") -> Any:
    """A results table of ``python -m runtime`` or benchmarks/gpu_runtime.py (measured and sim rows
    joined by config_id, times in ms) in the validation table's columns; per-token latencies are
    not in such tables, so ``token_gaps_s`` is empty (the KS statistic is then NaN)."""
    import pandas as pd

    ok = df[(df["status"] == "ok") & df["source"].isin(SOURCES)]
    out = pd.DataFrame({
        "level": level, "config_id": ok["config_id"], "card": card, "date": date, "engine": engine,
        "link": np.where(ok["link_pace_gbps"].notna(), "paced", "pinned"), "policy": ok["policy"],
        "source": ok["source"],
        "model": ok["shape"] if "shape" in ok else ok["model"],
        "budget": ok["budget"] if "budget" in ok else np.nan,
        "repetition": ok["repetition"], "tpot_s": ok["tpot_ms"] / 1e3,
        **{f"{p}_token_s": ok[f"{p}_token_ms"] / 1e3 for p in PERCENTILES},
        "ttft_s": ok["ttft_ms"] / 1e3, "hit_rate": ok["hit_rate"], "stall_share": ok["stall_share"],
        "k": ok["mean_k"] if "mean_k" in ok else 0.0,
    })
    out["token_gaps_s"] = [[] for _ in range(len(out))]
    return out.reset_index(drop=True)


# ------------------------------------------------------------------ level 1: per transfer, per layer
#: compute spans compared one by one (a stall has no partner by name: one side may not stall at all,
#: so stalls are compared in total)
SPAN_KINDS = ("attn+router", "experts")
#: timeline file suffix of the simulated side per level (runtime.validate writes them)
TIMELINE_SIDE = {"replayed": "replayed", "closed": "sim"}


def _timeline_spans(trace: Mapping[str, Any], where: str) -> tuple[dict[str, list[float]], dict[str, list[float]], float]:
    """(copies, compute, stall seconds): durations per span name in time order (seconds)."""
    events = trace.get("traceEvents") if isinstance(trace, Mapping) else None
    if not isinstance(events, list):
        raise SimError(f"{where}: not a trace-event timeline (no 'traceEvents' list)")
    copies: dict[str, list[float]] = {}
    compute: dict[str, list[float]] = {}
    stall = 0.0
    spans = []
    for i, ev in enumerate(events):
        if not isinstance(ev, Mapping) or ev.get("ph") != "X":
            continue
        try:
            spans.append((float(ev["ts"]), int(ev["pid"]), str(ev["name"]), float(ev["dur"]) / 1e6))
        except (KeyError, TypeError, ValueError):
            raise SimError(f"{where}: event {i} lacks a numeric ts/dur, a pid or a name: {dict(ev)}") from None
    for _, pid, name, dur in sorted(spans, key=lambda x: x[0]):
        if pid == PID_LINK:
            copies.setdefault(name, []).append(dur)
        elif pid == PID_GPU:
            if name.startswith("stall"):
                stall += dur
            else:
                compute.setdefault(name, []).append(dur)
    return copies, compute, stall


def _matched(a: Mapping[str, list[float]], b: Mapping[str, list[float]], keep=lambda name: True) -> tuple[np.ndarray, np.ndarray]:
    """Durations paired by (name, occurrence): the n-th span of a name on both sides."""
    xa, xb = [], []
    for name, da in a.items():
        db = b.get(name)
        if db and keep(name):
            n = min(len(da), len(db))
            xa += da[:n]
            xb += db[:n]
    return np.asarray(xa, dtype=np.float64), np.asarray(xb, dtype=np.float64)


def _abs_rel(sim: np.ndarray, measured: np.ndarray) -> np.ndarray:
    ok = measured > 0
    return np.abs(sim[ok] - measured[ok]) / measured[ok]


def _kind(name: str) -> str:
    """'verify experts L3' -> 'experts' (the span's kind, without the pass kind and the layer)."""
    return name.removeprefix("verify ").rsplit(" ", 1)[0]


def timeline_errors(measured: Mapping[str, Any], simulated: Mapping[str, Any], *,
                    names: tuple[str, str] = ("measured timeline", "simulated timeline")) -> dict[str, float]:
    """Level 1 of one config: the simulator's copies and layer spans against the runtime's.

    Copies: counts on both sides, the share of measured copies with a partner (same expert, same
    occurrence), the median and p90 |relative error| of the matched durations and the error of the
    mean copy duration. Per span kind (``SPAN_KINDS``): the median |relative error| of the matched
    spans and the relative error of their total; stalls: the relative error of the total stall."""
    mc, mk, ms = _timeline_spans(measured, names[0])
    sc, sk, ss = _timeline_spans(simulated, names[1])
    n_meas = sum(map(len, mc.values()))
    out: dict[str, float] = {"copies_measured": float(n_meas), "copies_sim": float(sum(map(len, sc.values())))}
    a, b = _matched(mc, sc)
    err = _abs_rel(b, a)
    out["copies_matched_share"] = len(a) / n_meas if n_meas else math.nan
    out["copy_median_abs_err"] = float(np.median(err)) if err.size else math.nan
    out["copy_p90_abs_err"] = float(np.quantile(err, 0.9)) if err.size else math.nan
    out["copy_mean_rel_err"] = rel_err(float(b.mean()), float(a.mean())) if a.size else math.nan
    for kind in SPAN_KINDS:
        a, b = _matched(mk, sk, keep=lambda name, kind=kind: _kind(name) == kind)
        err = _abs_rel(b, a)
        col = kind.replace("+", "_")
        out[f"{col}_spans"] = float(len(a))
        out[f"{col}_median_abs_err"] = float(np.median(err)) if err.size else math.nan
        out[f"{col}_total_rel_err"] = rel_err(float(b.sum()), float(a.sum())) if a.size else math.nan
    out["stall_total_s_measured"], out["stall_total_s_sim"] = ms, ss
    out["stall_total_rel_err"] = rel_err(ss, ms)
    return out


def read_timeline(path: Path) -> Mapping[str, Any]:
    """A Chrome-trace timeline, plain or gzipped (``.json.gz``: how the repository keeps them)."""
    try:
        if path.suffix == ".gz":
            import gzip

            with gzip.open(path, "rt") as f:
                return json.load(f)
        return json.loads(path.read_text())
    except (OSError, ValueError, EOFError) as e:
        raise SimError(f"{path}: cannot read the timeline ({e})") from None


def timeline_path(tdir: Path, stem: str) -> Path | None:
    """``<stem>.json`` (as runtime.validate writes it), else ``<stem>.json.gz``."""
    for name in (f"{stem}.json", f"{stem}.json.gz"):
        if (tdir / name).is_file():
            return tdir / name
    return None


def level1(timeline_dir: str | Path) -> Any:
    """Level 1 of every config with both timelines in ``timeline_dir`` (runtime.validate's
    ``timelines/`` beside the table): one row per (config_id, level)."""
    import pandas as pd

    tdir = Path(timeline_dir)
    if not tdir.is_dir():
        raise SimError(f"{tdir}: no timeline folder (runtime.validate writes timelines/ beside the table)")
    rows = []
    ids = sorted({p.name.split(".measured.json")[0] for p in tdir.glob("*.measured.json*")})
    for cid in ids:
        mpath = timeline_path(tdir, f"{cid}.measured")
        for level, side in TIMELINE_SIDE.items():
            spath = timeline_path(tdir, f"{cid}.{side}")
            if mpath is not None and spath is not None:
                rows.append({"config_id": cid, "level": level, **timeline_errors(
                    read_timeline(mpath), read_timeline(spath), names=(str(mpath), str(spath)))})
    return pd.DataFrame(rows)
