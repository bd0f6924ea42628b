# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Simulated against measured
#
# Reads a validation table (`python -m runtime.validate` writes `benchmarks/validation/<card>/validation.parquet`;
# docs/validation.md) and shows how far the simulator's prediction of each config is from the runtime's
# measurement: a parity plot of TPOT, the errors per policy, shape, link and decode path, the per-token
# latency distributions of one config (ECDF, KS statistic), the two timelines of that config side by side,
# and the error table against the targets (median |TPOT error| <= 3% replayed / 5% closed, max <= 8% / 10%).
#
# Without a validation table in the repository it reads the committed GPU runtime benchmark instead
# (`benchmarks/results/gpu_runtime-h200-2026-11-28.parquet`: closed loop, simulated with the *preset*
# `hardware=h200`, no measured profile, no per-token latencies), and says so below.

# %% tags=["parameters"]
validation = None  # a validation.parquet; None: the newest under benchmarks/validation/ (a card's newest
#                   resimulated/ table when it has one: its measured rows, predicted by today's simulator), else `fallback`
fallback = "benchmarks/results/gpu_runtime-h200-2026-11-28.parquet"
fallback_card, fallback_date = "NVIDIA H200", "2026-11-28"
config = None  # config_id shown in the ECDF and the timelines; None: the config with the median |error|
figures = "notebooks/figures"  # where the PNGs go

# %%
import sys
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns

ROOT = next(p for p in [Path.cwd(), *Path.cwd().parents] if (p / "pyproject.toml").is_file())
sys.path.insert(0, str(ROOT))
from sim.experiments.validation import TARGETS, from_results, join, read_timeline, summary, timeline_path  # noqa: E402

out = ROOT / figures
out.mkdir(parents=True, exist_ok=True)
sns.set_theme(style="whitegrid", context="notebook")

if validation is None:
    found = sorted((ROOT / "benchmarks" / "validation").glob("*/validation.parquet"), key=lambda p: p.stat().st_mtime)
    if found:
        resim = sorted((found[-1].parent / "resimulated").glob("*.parquet"))
        validation = (resim or found)[-1]
if validation is not None:
    table, source_note = pd.read_parquet(ROOT / validation), f"validation table {validation}"
else:
    table = from_results(pd.read_parquet(ROOT / fallback), card=fallback_card, date=fallback_date)
    source_note = (f"no validation table yet: the committed GPU runtime benchmark {fallback} "
                   "(closed loop, simulator under the h200 preset, no measured profile)")
joined = join(table)
sim = joined[joined.source == "sim"].copy()
meas = joined[joined.source == "measured"].set_index(["level", "card", "date", "config_id"])
sim["measured_tpot_s"] = [meas.loc[tuple(k), "tpot_s"] for k in sim[["level", "card", "date", "config_id"]].values]
print(source_note)
print(f"{len(sim)} configs; cards {sorted(sim.card.unique())}; levels {sorted(sim.level.unique())}")

# %% [markdown]
# ## Parity: simulated against measured TPOT

# %%
from matplotlib.ticker import NullFormatter, ScalarFormatter  # noqa: E402

fig, ax = plt.subplots(figsize=(6.2, 5.6))
par = sim.assign(measured_ms=sim.measured_tpot_s * 1e3, sim_ms=sim.tpot_s * 1e3)
sns.scatterplot(data=par, x="measured_ms", y="sim_ms", hue="model", style="engine", s=70, ax=ax)
lo = 0.8 * min(par.measured_ms.min(), par.sim_ms.min())
hi = 1.25 * max(par.measured_ms.max(), par.sim_ms.max())
xs = np.geomspace(lo, hi, 50)
ax.plot(xs, xs, color="black", lw=1, label="simulated = measured")
ax.fill_between(xs, xs * 0.9, xs * 1.1, color="grey", alpha=0.15, label="+-10%")
ax.set(xscale="log", yscale="log", xlim=(lo, hi), ylim=(lo, hi), xlabel="measured TPOT (ms)", ylabel="simulated TPOT (ms)",
       title=f"TPOT per config ({sim.card.iloc[0]})")
ticks = [t for t in (0.1, 0.2, 0.5, 1, 2, 3, 5, 10, 20, 30, 50, 100, 200, 500, 1000) if lo <= t <= hi]
for axis in (ax.xaxis, ax.yaxis):
    axis.set_ticks(ticks)
    axis.set_major_formatter(ScalarFormatter())
    axis.set_minor_formatter(NullFormatter())
ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
fig.tight_layout()
fig.savefig(out / "sim_vs_measured_parity.png", dpi=130)

# %% [markdown]
# ## Errors per policy, shape, link and decode path

# %%
factors = [f for f in ("policy", "model", "link", "engine") if sim[f].nunique() >= 1]
fig, axes = plt.subplots(1, len(factors), figsize=(3.4 * len(factors), 3.6), sharey=True)
for ax, f in zip(np.atleast_1d(axes), factors):
    sns.stripplot(data=sim, x=f, y="tpot_rel_err", hue="level", dodge=False, ax=ax, size=6, legend=ax is axes[0])
    ax.axhline(0, color="black", lw=1)
    for lv, (_, mx) in TARGETS.items():
        ax.axhspan(-mx, mx, color="green", alpha=0.06)
    ax.set(xlabel=f, ylabel="(sim - measured) / measured TPOT")
    ax.tick_params(axis="x", rotation=30)
fig.tight_layout()
fig.savefig(out / "sim_vs_measured_errors.png", dpi=130)

# %% [markdown]
# ## Per-token latency of one config

# %%
pick = sim.iloc[(sim.tpot_rel_err.abs() - sim.tpot_rel_err.abs().median()).abs().argmin()] if config is None \
    else sim[sim.config_id == config].iloc[0]
cid = pick.config_id
m_row = joined[(joined.config_id == cid) & (joined.source == "measured") & (joined.level == pick.level)].iloc[0]
print(f"config {cid}: {pick.model}, {pick.policy}, budget {pick.budget}, link {pick.link}, engine {pick.engine}; "
      f"TPOT error {pick.tpot_rel_err:+.1%}, KS {pick.ks:.3f}")
fig, ax = plt.subplots(figsize=(6, 3.6))
if len(m_row.token_gaps_s) and len(pick.token_gaps_s):
    for label, gaps in (("measured", m_row.token_gaps_s), ("simulated", pick.token_gaps_s)):
        g = np.sort(np.asarray(gaps)) * 1e3
        ax.step(g, np.arange(1, g.size + 1) / g.size, where="post", label=label)
    ax.set(title=f"ECDF of per-token latency, KS = {pick.ks:.3f}")
else:  # tables without per-token latencies: the three percentiles
    for label, r in (("measured", m_row), ("simulated", pick)):
        ax.plot([r.p50_token_s * 1e3, r.p90_token_s * 1e3, r.p99_token_s * 1e3], [0.5, 0.9, 0.99], "o-", label=label)
    ax.set(title="per-token latency percentiles (this table has no per-token latencies)")
ax.set(xlabel="per-token latency (ms)", ylabel="share of tokens")
ax.legend()
fig.tight_layout()
fig.savefig(out / "sim_vs_measured_ecdf.png", dpi=130)

# %% [markdown]
# ## The two timelines of that config
# Compute spans (attention+router, stalls, experts, head) and copies (demand, prefetch) as the runtime
# recorded them (CUDA events) and as the simulator scheduled them.

# %%
def spans(trace: dict) -> tuple[list, list]:
    ev = [e for e in trace["traceEvents"] if e.get("ph") == "X"]
    comp = [(e["ts"] / 1e3, e["dur"] / 1e3, e["name"]) for e in ev if e["pid"] == 1]
    copy = [(e["ts"] / 1e3, e["dur"] / 1e3, e.get("cat", "")) for e in ev if e["pid"] == 2]
    return comp, copy


COL = {"attn+router": "#4C72B0", "stall": "#C44E52", "experts": "#55A868", "head": "#8C8C8C",
       "demand": "#DD8452", "prefetch": "#8172B3"}
# the timelines sit beside the table (a resimulated table: beside the table it was made from)
tdir = next((d / "timelines" for d in (ROOT / validation).parents if (d / "timelines").is_dir()), None) \
    if validation is not None else None
sim_side = "sim" if pick.level == "closed" else "replayed"  # level replayed: the simulator's replay
files = {s: timeline_path(tdir, f"{cid}.{s}") for s in ("measured", sim_side)} if tdir is not None else {}
if files and all(p is not None for p in files.values()):
    fig, axes = plt.subplots(2, 1, figsize=(11, 3.8), sharex=True)
    for ax, (src, p) in zip(axes, files.items()):
        comp, copy = spans(read_timeline(p))
        for t0, d, name in comp:
            ax.broken_barh([(t0, d)], (1, 0.8), color=COL.get(name.replace("verify ", "").split(" ")[0], "#999999"))
        for t0, d, cat in copy:
            ax.broken_barh([(t0, d)], (0, 0.8), color=COL.get(cat, "#999999"))
        ax.set(yticks=[0.4, 1.4], yticklabels=["copies", "compute"], title=src)
    axes[-1].set(xlabel="time (ms)")
    fig.tight_layout()
    fig.savefig(out / "sim_vs_measured_timelines.png", dpi=130)
else:
    print("no timelines recorded for this table (runtime.validate writes them beside the validation table)")

# %% [markdown]
# ## Level 1: per transfer and per layer
# Every config whose two timelines were recorded: each copy and each layer span of the runtime paired
# with the simulator's (same expert or layer, same occurrence), the median |relative error| of the
# paired durations, and the share of measured copies that found a partner (1 where both sides made
# the same copies; level `replayed` against the replay, `closed` against the simulator's own run).

# %%
from sim.experiments.validation import level1  # noqa: E402

if tdir is not None and tdir.is_dir() and any(tdir.glob("*.measured.json*")):
    l1 = level1(tdir)
    cols1 = ["level", "copies_matched_share", "copy_median_abs_err", "copy_p90_abs_err", "attn_router_median_abs_err",
             "experts_median_abs_err", "stall_total_rel_err"]
    print(l1.groupby("level")[cols1[1:]].median().to_string(float_format=lambda x: f"{x:.3g}"))
    fig, ax = plt.subplots(figsize=(6, 3.4))
    long = l1.melt(id_vars=["level"], value_vars=["copy_median_abs_err", "attn_router_median_abs_err",
                                                   "experts_median_abs_err"], var_name="term", value_name="err")
    long["term"] = long["term"].str.replace("_median_abs_err", "")
    sns.stripplot(data=long, x="term", y="err", hue="level", dodge=True, ax=ax)
    ax.set(ylabel="median |relative error| per config", xlabel="", title="Level 1: per copy and per layer span")
    fig.tight_layout()
    fig.savefig(out / "sim_vs_measured_level1.png", dpi=130)
else:
    print("no timelines recorded for this table: level 1 needs runtime.validate's timelines/")

# %% [markdown]
# ## Error table

# %%
s = summary(joined, by=("level",))
print(s.T.to_string())
cols = ["level", "model", "policy", "budget", "link", "engine", "measured_tpot_s", "tpot_s", "tpot_rel_err", "p99_rel_err", "ks"]
print(sim.sort_values("tpot_rel_err")[cols].to_string(index=False, float_format=lambda x: f"{x:.4g}"))
