"""The figure of a sweep: a seaborn plot of its aggregated rows, laid out by the experiment config
(``hydra.callbacks.aggregate.figure``; docs/sweeps.md), with every key the sweep varied shown."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import pandas as pd

from traces.atomic import atomic_write

#: results columns that are config keys (sim.run.base_keys and the policy's), for grouping
KEY_COLUMNS = ("model", "model_layers", "hardware", "memory_gb", "memory_gib", "engine", "h2d_gbps", "host_memory", "link_pace_gbps",
               "trace", "cache_slots", "cache_per_layer", "seed", "policy", "eviction", "prefetch", "predictor",
               "governor", "governor_k")


def varying_keys(rows: pd.DataFrame, used: Sequence[str] = ()) -> list[str]:
    """Config-key columns that take more than one value and are not in ``used``: a table or figure
    that ignored them would silently mix configs (a sweep scaled from the command line)."""
    return [c for c in KEY_COLUMNS if c in rows.columns and c not in used
            and rows[c].astype(str).nunique(dropna=False) > 1]


def plot_sweep(rows: pd.DataFrame, spec: Mapping[str, Any], path: str | os.PathLike) -> Path | None:
    """A seaborn figure of the ok rows (PNG, written atomically).

    spec: ``x``, ``y`` (default tpot_ms), ``hue``, ``col``, ``row``, ``style``, ``kind`` (line,
    scatter, bar, point), ``logx``, ``logy``, ``title``. Infeasible and failed configs are left out
    and counted in the title."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import seaborn as sns

    path = Path(path)
    y = str(spec.get("y", "tpot_ms"))
    x = spec.get("x")
    kind = str(spec.get("kind", "line"))
    ok = rows[rows["status"] == "ok"] if "status" in rows.columns else rows
    if x is None or x not in rows.columns or y not in rows.columns or ok.empty:
        return None
    dims = {k: spec.get(k) for k in ("hue", "col", "row", "style") if spec.get(k) in rows.columns}
    # a key the sweep varied that the spec does not place gets a free facet, not a silent average
    derived = {"eviction", "prefetch", "predictor", "governor", "governor_k"} if "policy" in dims.values() else set()
    for extra in [c for c in varying_keys(ok, [x, *dims.values()]) if c not in derived]:
        free = next((k for k in ("col", "row", "style", "hue") if k not in dims), None)
        if free is None:
            break
        dims[free] = extra
    data = ok.copy()
    for c in dims.values():
        data[c] = data[c].astype(str)
    if kind in ("line", "scatter"):
        kw = dict(dims)
        g = sns.relplot(data=data, x=x, y=y, kind=kind, facet_kws={"sharey": bool(spec.get("sharey", False))},
                        height=float(spec.get("height", 3.2)), aspect=float(spec.get("aspect", 1.3)),
                        **({"marker": "o"} if kind == "line" else {}), **kw)
    else:
        kw = {k: v for k, v in dims.items() if k != "style"}
        g = sns.catplot(data=data, x=x, y=y, kind=kind, sharey=bool(spec.get("sharey", False)),
                        height=float(spec.get("height", 3.2)), aspect=float(spec.get("aspect", 1.3)), **kw)
    if "row" in dims and "col" in dims:
        g.set_titles("{row_name} | {col_name}")
    elif "row" in dims:
        g.set_titles("{row_name}")
    elif "col" in dims:
        g.set_titles("{col_name}")
    if spec.get("logx"):
        g.set(xscale="log")
        xs = sorted(pd.to_numeric(data[x], errors="coerce").dropna().unique())
        if 0 < len(xs) <= 12:  # label the swept values themselves, not log-scale minor ticks
            from matplotlib.ticker import NullFormatter

            for ax in g.axes.flat:
                ax.set_xticks(xs, [f"{v:g}" for v in xs])
                ax.xaxis.set_minor_formatter(NullFormatter())
    if spec.get("logy"):
        g.set(yscale="log")
    left_out = len(rows) - len(ok)
    title = str(spec.get("title", "")) + (f" ({left_out} infeasible/failed configs not shown)" if left_out else "")
    if title.strip():
        g.figure.suptitle(title.strip(), y=1.02)
    try:
        atomic_write(path, lambda tmp: g.savefig(tmp, format="png", dpi=int(spec.get("dpi", 110)),
                                                 bbox_inches="tight"))
    finally:
        plt.close(g.figure)
    return path
