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


def empty_axes(fig: Any) -> list[str]:
    """Visible axes of ``fig`` that show no data (no line, collection, patch or image), by title:
    a facet with no rows, a panel a plot call never reached. Every figure the project draws is
    checked with it (and tests/test_figures.py checks them all)."""
    out = []
    for i, ax in enumerate(fig.axes):
        if not ax.get_visible() or getattr(ax, "_colorbar", None) is not None:
            continue
        drawn = [a for a in (*ax.lines, *ax.collections, *ax.patches, *ax.images) if a.get_visible()]
        if not drawn:
            out.append(ax.get_title() or f"axes {i}")
    return out


def clipped_texts(fig: Any) -> list[str]:
    """Titles and suptitles that reach outside the figure (drawn at its saved size)."""
    fig.canvas.draw()
    box = fig.bbox
    out = []
    texts = [ax.title for ax in fig.axes if ax.get_visible()] + ([fig._suptitle] if fig._suptitle else [])
    for t in texts:
        if t.get_text() and t.get_visible():
            e = t.get_window_extent()
            if e.x0 < box.x0 - 1 or e.x1 > box.x1 + 1 or e.y1 > box.y1 + 1:
                out.append(t.get_text())
    return out


def plot_sweep(rows: pd.DataFrame, spec: Mapping[str, Any], path: str | os.PathLike) -> Path | None:
    """A seaborn figure of the ok rows (PNG, written atomically); None when there is nothing to draw.

    spec: ``x``, ``y`` (default tpot_ms), ``hue``, ``col``, ``row``, ``style``, ``kind`` (line,
    scatter, bar, point), ``logx``, ``logy``, ``title``. Infeasible and failed configs are left out
    and counted in the title."""
    import matplotlib.pyplot as plt

    path = Path(path)
    g = sweep_figure(rows, spec)
    if g is None:
        return None
    try:
        atomic_write(path, lambda tmp: g.savefig(tmp, format="png", dpi=int(spec.get("dpi", 110)),
                                                 bbox_inches="tight"))
    finally:
        plt.close(g.figure)
    return path


def sweep_figure(rows: pd.DataFrame, spec: Mapping[str, Any]) -> Any:
    """The seaborn grid of :func:`plot_sweep` (not saved; close its ``figure``), or None."""
    import matplotlib

    matplotlib.use("Agg")
    import seaborn as sns

    y = str(spec.get("y", "tpot_ms"))
    x = spec.get("x")
    kind = str(spec.get("kind", "line"))
    ok = rows[rows["status"] == "ok"] if "status" in rows.columns else rows
    if x is None or x not in rows.columns or y not in rows.columns or ok.empty:
        return None
    dims = {k: spec.get(k) for k in ("hue", "col", "row", "style") if spec.get(k) in rows.columns}
    # a key the sweep varied that the spec does not place gets a free facet, not a silent average
    derived = {"eviction", "prefetch", "predictor", "governor", "governor_k"} if "policy" in dims.values() else set()
    # a key that the x value (with the placed facets) determines adds no panel: e.g. memory_gb
    # beside x=memory_gib, or each model's own budgets: a facet for it would be mostly empty
    placed = [x, *dims.values()]
    determined = {c for c in varying_keys(ok, placed)
                  if (ok.astype({k: str for k in placed}).groupby(placed, dropna=False)[c].nunique(dropna=False) <= 1).all()}
    # synthetic traces that differ only in their seed are replicates: averaged (seaborn's mean and
    # 95% interval), said in the title, not one panel per seed
    seeds = 0
    if "trace" in ok.columns and ok["trace"].astype(str).str.startswith("synth:").all():
        family = ok["trace"].astype(str).str.rsplit(":", n=1).str[0]
        by = ok.assign(_family=family).astype({k: str for k in placed}).groupby(placed, dropna=False)["_family"]
        if (by.nunique() <= 1).all():
            derived = derived | {"trace", "seed"} if ok["seed"].nunique() <= 1 else derived | {"trace"}
            seeds = int(ok["trace"].nunique() // max(family.nunique(), 1))
    for extra in [c for c in varying_keys(ok, placed) if c not in derived and c not in determined]:
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
    if seeds > 1:
        title += f" (mean of {seeds} trace seeds, 95% interval)"
    if title.strip():
        g.figure.suptitle(title.strip(), y=1.02)
    for ax in g.axes.flat:  # a facet combination with no rows (a sparse grid) is left out, not drawn empty
        if ax.get_visible() and not (ax.lines or ax.collections or ax.patches):
            ax.set_visible(False)
    return g
