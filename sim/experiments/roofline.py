"""Pictures of speculative decoding: the Amortization Roofline and one draft/verify cycle.

``roofline_figure`` draws MoE-SpeQ's Amortization Roofline (arXiv 2511.14102, Sec. 3.2, Fig. 8)
for a run: effective throughput Θ (tokens per second) against amortization intensity

    I = tokens / bytes moved over the host link            (Eq. 1 with S_token = 1)

both summed over the cycles of one draft length k (ratios of sums, so a k's point is the run's
long-run rate at that k). Roofs: the I/O roof Θ = B_link * I (a cycle cannot move more bytes than
the link carries in its time) and one compute roof per k, Θ = tokens / (T_draft + T_verify) (the
cycle is never shorter than its compute). Axes are log-log, x in tokens per GB (1e9 bytes).
"tokens" are the accepted draft tokens (the paper's Θ) or, with ``tokens="emitted"``, accepted + 1
(the target's bonus token: the throughput a user sees).

``cycle_timeline_figure`` draws one cycle from a Chrome trace (sim/timeline.py's format): the
compute stream (draft, verify, stall spans), the copy stream(s) and cache occupancy, on one time
axis, with how much of the link time hid under drafting.

``python -m sim.roofline RUN_DIR`` reads RUN_DIR/cycles.parquet (columns: ``CYCLE_COLUMNS``) and
RUN_DIR/timeline*.json; docs/governor.md documents both. Matplotlib (Agg) and seaborn are imported
only when a figure is drawn.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from sim.errors import SimError
from sim.timeline import PID_CACHE, PID_GPU, PID_LINK
from traces.atomic import atomic_write, check_output_dir

CYCLE_COLUMNS = ("k", "accepted", "observed_cycle_s", "bytes_moved", "t_draft", "t_verify", "t_pcie")
GB = 1e9

SPAN_KINDS = ("draft", "verify", "stall", "other")
COLORS = {"draft": "#4C72B0", "verify": "#55A868", "stall": "#C44E52", "other": "#8C8C8C",
          "prefetch": "#8172B3", "demand": "#DD8452"}


# ---------------------------------------------------------------------------- cycle records
def cycles_frame(cycles: Any, where: str = "cycles") -> Any:
    """A validated DataFrame of cycle records (a DataFrame or an iterable of dicts) with at least
    ``CYCLE_COLUMNS``; errors name the column and row."""
    import numpy as np
    import pandas as pd

    df = cycles.copy() if isinstance(cycles, pd.DataFrame) else pd.DataFrame(list(cycles))
    if df.empty:
        raise SimError(f"{where}: no cycle records")
    missing = [c for c in CYCLE_COLUMNS if c not in df.columns]
    if missing:
        raise SimError(f"{where}: missing column(s) {missing}; expected at least {list(CYCLE_COLUMNS)}")
    for c in CYCLE_COLUMNS:
        col = pd.to_numeric(df[c], errors="coerce")
        bad = ~np.isfinite(col.to_numpy(dtype=float)) | (col.to_numpy(dtype=float) < 0)
        if bad.any():
            i = int(bad.nonzero()[0][0])
            raise SimError(f"{where}: row {i}: column '{c}' must be a finite number >= 0, got {df[c].iloc[i]!r}")
        df[c] = col
    over = df["accepted"] > df["k"]
    if over.any():
        i = int(over.to_numpy().nonzero()[0][0])
        raise SimError(f"{where}: row {i}: accepted ({df['accepted'].iloc[i]}) > k ({df['k'].iloc[i]})")
    df["k"] = df["k"].astype(int)
    return df


def _tokens(df: Any, tokens: str) -> Any:
    if tokens == "accepted":
        return df["accepted"]
    if tokens == "emitted":
        return df["accepted"] + 1
    raise SimError(f"tokens must be 'accepted' or 'emitted', got {tokens!r}")


def operating_points(cycles: Any, tokens: str = "accepted") -> Any:
    """Per k: cycles, tokens, time_s, bytes, compute_s (sum of t_draft + t_verify), throughput
    (tokens / time_s), intensity (tokens / bytes; inf where no byte moved) and compute_roof
    (tokens / compute_s)."""
    df = cycles_frame(cycles)
    df = df.assign(_tok=_tokens(df, tokens), _comp=df["t_draft"] + df["t_verify"])
    g = df.groupby("k", sort=True).agg(
        cycles=("k", "size"), tokens=("_tok", "sum"), time_s=("observed_cycle_s", "sum"),
        bytes=("bytes_moved", "sum"), compute_s=("_comp", "sum"),
    )
    g["throughput"] = [t / s if s > 0 else math.nan for t, s in zip(g["tokens"], g["time_s"])]
    g["intensity"] = [t / b if b > 0 else math.inf for t, b in zip(g["tokens"], g["bytes"])]
    g["compute_roof"] = [t / c if c > 0 else math.inf for t, c in zip(g["tokens"], g["compute_s"])]
    return g


def compute_roofs_from_cycles(cycles: Any, tokens: str = "accepted") -> dict[int, float]:
    """k -> tokens / (T_draft + T_verify) summed over the run's cycles at that k (tokens/s)."""
    op = operating_points(cycles, tokens)
    return {int(k): float(v) for k, v in op["compute_roof"].items() if math.isfinite(v) and v > 0}


def most_chosen_k(cycles: Any) -> int:
    """The k the run used most often (ties: the smaller k)."""
    counts = cycles_frame(cycles)["k"].value_counts()
    top = counts.max()
    return int(min(k for k, n in counts.items() if n == top))


# ---------------------------------------------------------------------------- drawing helpers
def _new_figure(figsize: tuple[float, float], nrows: int = 1, height_ratios: Sequence[float] | None = None):
    # a bare Figure (no pyplot): renders with Agg whatever the session's backend, no global state
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, layout="constrained")
    kw = {"height_ratios": list(height_ratios)} if height_ratios else {}
    axes = fig.subplots(nrows, 1, sharex=nrows > 1, gridspec_kw=kw or None, squeeze=False)[:, 0]
    return fig, axes


def _style():
    import seaborn as sns

    return sns.axes_style("whitegrid"), sns.plotting_context("notebook", font_scale=0.9)


def _save_png(fig: Any, path: str | os.PathLike) -> Path:
    """Save with the whole title inside the image; a figure with an empty panel is a bug."""
    from sim.experiments.figures import empty_axes

    assert not empty_axes(fig), f"{path}: empty panels {empty_axes(fig)}"
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=130, bbox_inches="tight"))


# ---------------------------------------------------------------------------- the roofline
def roofline_figure(
    cycles: Any,
    *,
    link_bytes_per_s: float,
    compute_roofs: Mapping[int, float],
    chosen_k: int | None,
    path: str | os.PathLike,
    tokens: str = "accepted",
    title: str | None = None,
) -> Path:
    """Draw the Amortization Roofline of a run as a PNG at ``path`` (written atomically).

    ``cycles``: cycle records (``CYCLE_COLUMNS``); ``link_bytes_per_s``: B_link, the slope of the
    I/O roof; ``compute_roofs``: k -> tokens/s with every transfer hidden (e.g.
    ``compute_roofs_from_cycles`` or the governor's predictions); ``chosen_k``: the k to mark
    (None: no mark). Each k's roofline is min(B_link * I, compute roof of k); each k's operating
    point is its ratio of sums, single cycles are the faint dots.
    """
    if not (link_bytes_per_s and link_bytes_per_s > 0 and math.isfinite(link_bytes_per_s)):
        raise SimError(f"roofline: link_bytes_per_s must be > 0, got {link_bytes_per_s!r}")
    roofs = {int(k): float(v) for k, v in compute_roofs.items()}
    bad = {k: v for k, v in roofs.items() if not (v > 0 and math.isfinite(v))}
    if bad:
        raise SimError(f"roofline: compute_roofs must be finite and > 0 tokens/s, got {bad}")
    df = cycles_frame(cycles)
    op = operating_points(df, tokens)
    b_gb = link_bytes_per_s / GB  # tokens/s = B[GB/s] * I[tokens/GB]

    per = df.assign(_tok=_tokens(df, tokens))
    per = per[(per["observed_cycle_s"] > 0) & (per["bytes_moved"] > 0) & (per["_tok"] > 0)]
    x_lo, x_hi, y_lo, y_hi = _roofline_limits(op, per, roofs, b_gb)

    ks = sorted(set(roofs) | set(int(k) for k in op.index))
    import seaborn as sns

    palette = dict(zip(ks, sns.color_palette("viridis", n_colors=max(len(ks), 1))))
    ax_style, ctx = _style()
    with ax_style, ctx:
        fig, (ax,) = _new_figure((7.5, 5.2))
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.plot([x_lo, x_hi], [b_gb * x_lo, b_gb * x_hi], color="black", ls="--", lw=1.4,
                label=f"I/O roof: B_link = {b_gb:.3g} GB/s")
        for k in ks:
            if k in roofs:  # the flat part of k's roofline, from its knee on (left of it: the I/O roof)
                ax.plot([roofs[k] / b_gb, x_hi], [roofs[k], roofs[k]], color=palette[k], lw=1.3, alpha=0.9)
                if k not in op.index:
                    ax.plot([], [], color=palette[k], lw=1.3, label=f"k={k}: roof {roofs[k]:.3g} tok/s (no cycle)")
        for k, row in op.iterrows():
            k = int(k)
            sub = per[per["k"] == k]
            if len(sub):
                ax.scatter(sub["_tok"] / sub["bytes_moved"] * GB, sub["_tok"] / sub["observed_cycle_s"],
                           s=6, color=palette[k], alpha=0.25, linewidths=0)
            thr = row["throughput"]
            if not (thr > 0 and math.isfinite(thr)):
                continue  # no token at this k (accepted mode, nothing accepted): nothing on a log axis
            x = row["intensity"] * GB
            clipped = not math.isfinite(x)
            x = x_hi / 1.5 if clipped else x
            is_chosen = chosen_k is not None and k == int(chosen_k)
            ax.scatter([x], [thr], s=160 if is_chosen else 55, marker="*" if is_chosen else (">" if clipped else "o"),
                       color=palette[k], edgecolors="black", linewidths=0.8, zorder=5,
                       label=f"k={k}: {thr:.3g} tok/s, {int(row['cycles'])} cycles"
                       + (f"; roof {roofs[k]:.3g}" if k in roofs else "") + (" (no bytes moved)" if clipped else ""))
            if is_chosen:
                ax.annotate(f"chosen k = {k}", (x, thr), xytext=(8, -14), textcoords="offset points", fontsize=9,
                            fontweight="bold")
        if chosen_k is not None and int(chosen_k) not in set(int(k) for k in op.index):
            ax.plot([], [], " ", label=f"chosen k = {chosen_k} (no cycle recorded)")
        ax.set_xlim(x_lo, x_hi)
        ax.set_ylim(y_lo, y_hi)
        ax.set_xlabel(f"amortization intensity I = {tokens} tokens / GB moved")
        ax.set_ylabel(f"effective throughput Θ ({tokens} tokens / s)")
        ax.set_title(title or "Amortization Roofline (one compute roof per draft length k)")
        ax.legend(fontsize=7, loc="lower right", framealpha=0.9)
        return _save_png(fig, path)


def _roofline_limits(op: Any, per: Any, roofs: Mapping[int, float], b_gb: float) -> tuple[float, float, float, float]:
    """Log-axis limits that hold every operating point, every cycle, and every roof's knee."""
    pts_x = [v * GB for v in op["intensity"] if math.isfinite(v) and v > 0]
    pts_x += list(per["_tok"] / per["bytes_moved"] * GB)
    pts_y = [v for v in op["throughput"] if v > 0 and math.isfinite(v)]
    pts_y += list(per["_tok"] / per["observed_cycle_s"])
    xs = pts_x + [r / b_gb for r in roofs.values()] or [1.0]
    x_lo, x_hi = min(xs) / 8, max(xs) * 8
    ys = pts_y + list(roofs.values()) or [b_gb * x_lo, b_gb * x_hi]
    return x_lo, x_hi, min(ys) / 5, max(ys) * 3


# ---------------------------------------------------------------------------- Chrome traces
def span_kind(name: str) -> str:
    """draft | verify | stall | other, from a compute span's name prefix."""
    low = name.lower()
    for kind in ("draft", "verify", "stall"):
        if low.startswith(kind):
            return kind
    return "other"


def _x_events(trace: Mapping[str, Any], pid: int) -> list[dict]:
    if not isinstance(trace, Mapping) or "traceEvents" not in trace:
        raise SimError("chrome trace: expected a dict with 'traceEvents'")
    out = []
    for i, ev in enumerate(trace["traceEvents"]):
        if not isinstance(ev, Mapping):
            raise SimError(f"chrome trace: traceEvents[{i}] is not an object")
        if ev.get("ph") == "X" and ev.get("pid") == pid:
            try:
                t0, dur = float(ev["ts"]), float(ev.get("dur", 0.0))
            except (KeyError, TypeError, ValueError):
                raise SimError(f"chrome trace: traceEvents[{i}] needs numeric 'ts' and 'dur'") from None
            out.append({**ev, "ts": t0, "dur": dur, "end": t0 + dur})
    out.sort(key=lambda e: (e["ts"], e["end"]))
    return out


def cycle_windows(trace: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The draft/verify cycles of a Chrome trace, in time order: dicts with ``start_us``,
    ``end_us`` and the cycle's compute spans (``spans``).

    If compute events (pid 1) carry ``args.cycle``, a cycle is every compute event with one value
    (ordered by value). Otherwise cycles are inferred from span names: a cycle starts at a
    ``draft ...`` span that follows a non-draft span (or is the first) and ends with its last
    ``verify ...`` span before the next draft; spans outside (prefill, between requests) belong
    to no cycle, and a draft group without a verify span is dropped. Consecutive k = 0 cycles have
    no draft span and cannot be told apart this way: write ``args.cycle`` for them.
    """
    spans = _x_events(trace, PID_GPU)
    tagged = [s for s in spans if isinstance(s.get("args"), Mapping) and "cycle" in s["args"]]
    out: list[dict[str, Any]] = []
    if tagged:
        groups: dict[Any, list[dict]] = {}
        for s in tagged:
            groups.setdefault(s["args"]["cycle"], []).append(s)
        for c in sorted(groups, key=lambda v: (float(v) if isinstance(v, (int, float)) else math.inf, str(v))):
            g = groups[c]
            out.append({"cycle": c, "start_us": min(s["ts"] for s in g), "end_us": max(s["end"] for s in g),
                        "spans": g})
        return out
    cur: list[dict] | None = None
    prev_kind = None

    def close(group: list[dict] | None) -> None:
        if not group:
            return
        last_v = max((i for i, s in enumerate(group) if span_kind(s["name"]) == "verify"), default=None)
        if last_v is None:
            return
        g = group[: last_v + 1]
        out.append({"cycle": len(out), "start_us": g[0]["ts"], "end_us": max(s["end"] for s in g), "spans": g})

    for s in spans:
        kind = span_kind(str(s.get("name", "")))
        if kind == "draft" and prev_kind not in ("draft", None) and cur is not None and any(
                span_kind(x["name"]) == "verify" for x in cur):
            close(cur)
            cur = None
        if kind == "draft" and cur is None:
            cur = []
        if cur is not None:
            cur.append(s)
        if kind != "stall":
            prev_kind = kind
    close(cur)
    return out


def _union(intervals: Iterable[tuple[float, float]]) -> list[tuple[float, float]]:
    out: list[list[float]] = []
    for a, b in sorted(intervals):
        if b <= a:
            continue
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return [(a, b) for a, b in out]


def _length(iv: Sequence[tuple[float, float]]) -> float:
    return sum(b - a for a, b in iv)


def _intersect(x: Sequence[tuple[float, float]], y: Sequence[tuple[float, float]]) -> float:
    i = j = 0
    tot = 0.0
    while i < len(x) and j < len(y):
        a, b = max(x[i][0], y[j][0]), min(x[i][1], y[j][1])
        if b > a:
            tot += b - a
        if x[i][1] < y[j][1]:
            i += 1
        else:
            j += 1
    return tot


def cycle_overlap(trace: Mapping[str, Any], cycle_index: int) -> dict[str, float]:
    """Times (seconds) inside one cycle's window: ``cycle_s``, ``draft_s``, ``verify_s``,
    ``stall_s``, ``link_busy_s`` (union of copy spans, clipped to the window),
    ``link_under_draft_s`` / ``link_under_verify_s`` / ``link_under_stall_s`` (overlap of the link
    with those spans), ``hidden_share`` = link_under_draft_s / link_busy_s, ``copies``."""
    cyc = _pick_cycle(trace, cycle_index)
    t0, t1 = cyc["start_us"], cyc["end_us"]
    by_kind = {k: _union((s["ts"], s["end"]) for s in cyc["spans"] if span_kind(s["name"]) == k) for k in SPAN_KINDS}
    copies = [c for c in _x_events(trace, PID_LINK) if c["end"] > t0 and c["ts"] < t1]
    link = _union((max(c["ts"], t0), min(c["end"], t1)) for c in copies)
    busy = _length(link)
    us = 1e-6
    return {
        "cycle_s": (t1 - t0) * us,
        "draft_s": _length(by_kind["draft"]) * us,
        "verify_s": _length(by_kind["verify"]) * us,
        "stall_s": _length(by_kind["stall"]) * us,
        "link_busy_s": busy * us,
        "link_under_draft_s": _intersect(link, by_kind["draft"]) * us,
        "link_under_verify_s": _intersect(link, by_kind["verify"]) * us,
        "link_under_stall_s": _intersect(link, by_kind["stall"]) * us,
        "hidden_share": _intersect(link, by_kind["draft"]) / busy if busy > 0 else math.nan,
        "copies": float(len(copies)),
    }


def _pick_cycle(trace: Mapping[str, Any], cycle_index: int) -> dict[str, Any]:
    cycles = cycle_windows(trace)
    if not cycles:
        raise SimError(
            "chrome trace: no draft/verify cycle found (compute spans on pid 1 must be named 'draft ...' / "
            "'verify ...' or carry args.cycle)"
        )
    i = int(cycle_index)
    if not -len(cycles) <= i < len(cycles):
        raise SimError(f"chrome trace: cycle_index {cycle_index} out of range: the trace has {len(cycles)} cycles")
    return cycles[i]


def cycle_timeline_figure(chrome_trace: Mapping[str, Any], cycle_index: int, path: str | os.PathLike) -> Path:
    """Draw cycle ``cycle_index`` (0-based, in time order; negative counts from the end) of a
    Chrome trace as a PNG: compute stream (draft / verify / stall / other spans), the copy
    stream(s) on pid 2 (prefetch vs demand) and the cache occupancy counter on pid 3, on one time
    axis in ms from the cycle's start, with a 5% margin either side."""
    cyc = _pick_cycle(chrome_trace, cycle_index)
    stats = cycle_overlap(chrome_trace, cycle_index)
    t0, t1 = cyc["start_us"], cyc["end_us"]
    pad = max((t1 - t0) * 0.05, 1e-3)
    lo, hi = t0 - pad, t1 + pad
    ms = 1e-3

    gpu = [s for s in _x_events(chrome_trace, PID_GPU) if s["end"] > lo and s["ts"] < hi]
    copies = [c for c in _x_events(chrome_trace, PID_LINK) if c["end"] > lo and c["ts"] < hi]
    counters = sorted(
        (float(ev["ts"]), _counter_value(ev)) for ev in chrome_trace["traceEvents"]
        if isinstance(ev, Mapping) and ev.get("ph") == "C" and ev.get("pid") == PID_CACHE and "ts" in ev
    )
    counters = [(t, v) for t, v in counters if v is not None]
    before = [(t, v) for t, v in counters if t <= lo]
    occ = ([(lo, before[-1][1])] if before else []) + [(t, v) for t, v in counters if lo < t < hi]

    def rel(t: float) -> float:
        return (max(min(t, hi), lo) - t0) * ms

    ax_style, ctx = _style()
    with ax_style, ctx:
        fig, (ax_c, ax_l, ax_o) = _new_figure((10, 5.2), 3, (1.2, 1.2, 1.0))
        in_cycle = {(s["ts"], s["end"], s.get("name")) for s in cyc["spans"]}
        for s in gpu:
            kind = span_kind(s["name"])
            a, b = rel(s["ts"]), rel(s["end"])
            inside = (s["ts"], s["end"], s.get("name")) in in_cycle  # spans of other cycles are faded
            ax_c.broken_barh([(a, max(b - a, 1e-9))], (0, 1), facecolors=COLORS[kind],
                             edgecolors="white", linewidth=0.3, alpha=1.0 if inside else 0.35)
        ax_c.set_yticks([0.5], ["compute"])
        ax_c.set_ylim(0, 1)
        from matplotlib.patches import Patch

        ax_c.legend(handles=[Patch(color=COLORS[k], label=k) for k in SPAN_KINDS], ncols=4, fontsize=7,
                    loc="upper right", bbox_to_anchor=(1, 1.45), frameon=False)
        lanes = sorted({int(c.get("tid", 0)) for c in copies}) or [0]
        for c in copies:
            kind = "prefetch" if c.get("cat") == "prefetch" else "demand"
            lane = lanes.index(int(c.get("tid", 0)))
            a, b = rel(c["ts"]), rel(c["end"])
            ax_l.broken_barh([(a, max(b - a, 1e-9))], (lane, 0.8), facecolors=COLORS[kind], edgecolors="white",
                             linewidth=0.3)
        ax_l.set_yticks([i + 0.4 for i in range(len(lanes))], [f"copy {t}" for t in lanes])
        ax_l.set_ylim(-0.1, len(lanes))
        ax_l.legend(handles=[Patch(color=COLORS[k], label=k) for k in ("prefetch", "demand")], ncols=2, fontsize=7,
                    loc="upper right", bbox_to_anchor=(1, 1.3), frameon=False)
        if occ:
            xs = [rel(t) for t, _ in occ] + [rel(hi)]
            ys = [v for _, v in occ] + [occ[-1][1]]
            ax_o.step(xs, ys, where="post", color="#4C4C4C", lw=1.2)
            ax_o.fill_between(xs, ys, step="post", alpha=0.15, color="#4C4C4C")
        else:
            ax_o.text(0.5, 0.5, "no cache occupancy counter (pid 3)", transform=ax_o.transAxes, ha="center",
                      va="center", fontsize=8, color="grey")
        ax_o.set_ylabel("resident\nslots")
        for ax in (ax_c, ax_l, ax_o):
            ax.axvline(0, color="black", lw=0.8, ls=":")
            ax.axvline((t1 - t0) * ms, color="black", lw=0.8, ls=":")
            ax.grid(axis="y", visible=False)
        ax_o.set_xlim(rel(lo), rel(hi))
        ax_o.set_xlabel("ms from the cycle's start")
        share = stats["hidden_share"]
        share_s = "n/a" if math.isnan(share) else f"{100 * share:.0f}%"
        fig.suptitle(
            f"cycle {cycle_index}: {stats['cycle_s'] * 1e3:.3g} ms (draft {stats['draft_s'] * 1e3:.3g}, verify "
            f"{stats['verify_s'] * 1e3:.3g}, stall {stats['stall_s'] * 1e3:.3g} ms); link busy "
            f"{stats['link_busy_s'] * 1e3:.3g} ms, {share_s} of it under drafting",
            fontsize=9,
        )
        return _save_png(fig, path)


def _counter_value(ev: Mapping[str, Any]) -> float | None:
    args = ev.get("args")
    if not isinstance(args, Mapping):
        return None
    for v in args.values():
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return float(v)
    return None


# ---------------------------------------------------------------------------- command line
def link_bandwidth_for_run(run_dir: Path, cycles: Any | None = None) -> tuple[float, str]:
    """B_link (bytes/s) of a run and where it came from: a ``link_bytes_per_s`` column of the
    cycles; else the run's resolved config (RUN_DIR/.hydra/config.yaml or RUN_DIR/config.yaml:
    the hardware's host-to-device bandwidth at one expert's size); else the largest observed
    bytes_moved / t_pcie over the cycles."""
    import pandas as pd

    if cycles is not None and isinstance(cycles, pd.DataFrame) and "link_bytes_per_s" in cycles.columns:
        v = pd.to_numeric(cycles["link_bytes_per_s"], errors="coerce").dropna()
        if len(v) and (v > 0).all():
            return float(v.median()), "cycles.parquet column link_bytes_per_s"
    for cfg_path in (run_dir / ".hydra" / "config.yaml", run_dir / "config.yaml"):
        if cfg_path.is_file():
            try:
                from omegaconf import OmegaConf

                from sim.hardware import HardwareSpec
                from sim.spec import ModelSpec

                cfg = OmegaConf.load(cfg_path)
                hw = HardwareSpec.from_cfg(cfg.hardware)
                nbytes = ModelSpec.from_cfg(cfg.model).bytes_per_expert()
                return hw.h2d_bandwidth(nbytes), f"{cfg_path} (hardware '{hw.name}', one expert's copy)"
            except Exception as e:  # noqa: BLE001 - fall through to the estimate, saying why
                print(f"note: could not read the link bandwidth from {cfg_path}: {e}", file=sys.stderr)
    if cycles is not None:
        df = cycles_frame(cycles)
        ok = df[(df["t_pcie"] > 0) & (df["bytes_moved"] > 0)]
        if len(ok):
            return float((ok["bytes_moved"] / ok["t_pcie"]).max()), "estimated: max bytes_moved / t_pcie"
    raise SimError(f"{run_dir}: cannot tell the link bandwidth; pass --link-gbps")


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m sim.roofline",
        description="Draw the Amortization Roofline (RUN_DIR/cycles.parquet) and one draft/verify cycle "
                    "(RUN_DIR/timeline*.json) of a speculative run as PNG files.",
    )
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("-o", "--out", type=Path, default=None, help="output folder (default: RUN_DIR)")
    ap.add_argument("--link-gbps", type=float, default=None, help="B_link in GB/s (default: from the run)")
    ap.add_argument("--tokens", choices=("accepted", "emitted"), default="accepted")
    ap.add_argument("--chosen-k", type=int, default=None, help="k to mark (default: the most used k)")
    ap.add_argument("--cycle", type=int, default=0, help="cycle of the timeline figure (0-based)")
    from traces.cli import run_cli

    def go() -> int:
        for p in _run(ap.parse_args(argv)):
            print(p)
        return 0

    return run_cli(go)


def _run(a: argparse.Namespace) -> list[Path]:
    import pandas as pd

    run_dir: Path = a.run_dir
    if not run_dir.is_dir():
        raise SimError(f"{run_dir}: no such run folder")
    out = check_output_dir(a.out or run_dir, "-o")
    written: list[Path] = []
    cyc_path = run_dir / "cycles.parquet"
    if not cyc_path.is_file():
        raise SimError(f"{cyc_path}: not found (a speculative run writes its cycle records there)")
    try:
        df = pd.read_parquet(cyc_path)
    except Exception as e:  # noqa: BLE001
        raise SimError(f"{cyc_path}: not a readable Parquet file: {e}") from None
    if a.link_gbps is not None:
        if not a.link_gbps > 0:
            raise SimError(f"--link-gbps must be > 0, got {a.link_gbps}")
        bw, src = a.link_gbps * GB, "--link-gbps"
    else:
        bw, src = link_bandwidth_for_run(run_dir, df)
    groups = [(None, df)]
    if "policy" in df.columns and df["policy"].nunique() > 1:
        groups = [(str(p), g) for p, g in df.groupby("policy", sort=True)]
    for name, g in groups:
        cyc = cycles_frame(g, where=f"{cyc_path}" + (f" (policy {name})" if name else ""))
        chosen = a.chosen_k if a.chosen_k is not None else most_chosen_k(cyc)
        label = "chosen" if a.chosen_k is not None else "most used"
        title = f"Amortization Roofline{' - ' + name if name else ''} ({label} k = {chosen}; B_link from {src})"
        written.append(roofline_figure(
            cyc, link_bytes_per_s=bw, compute_roofs=compute_roofs_from_cycles(cyc, a.tokens), chosen_k=chosen,
            path=out / (f"roofline_{name}.png" if name else "roofline.png"), tokens=a.tokens, title=title,
        ))
    for tl in sorted(run_dir.glob("timeline*.json")):
        try:
            trace = json.loads(tl.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise SimError(f"{tl}: not a readable Chrome trace: {e}") from None
        try:
            written.append(cycle_timeline_figure(trace, a.cycle, out / f"cycle_{tl.stem}.png"))
        except SimError as e:
            print(f"note: {tl.name}: {e}; no cycle figure", file=sys.stderr)
    return written


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
