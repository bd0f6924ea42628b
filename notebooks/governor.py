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
# # The governor on the Amortization Roofline
#
# MoE-SpeQ's governor picks the draft length k of each cycle from the Amortization Roofline
# (sim/experiments/roofline.py; docs/governor.md): throughput against tokens per byte moved over the host link, an
# I/O roof (the link's bandwidth) and one compute roof per k. This notebook draws the roofline of a
# MoE-SpeQ run with its operating points (the governor's run and fixed-k runs), and the governor's
# predicted cycle time against the observed one; and each measured speculative config's speed-up over
# LRU against the simulator's prediction (`benchmarks/gpu_speculative.py` on a GPU).
#
# **What the cycles are.** Measured, where `benchmarks/gpu_speculative.py` committed the cycles of the
# shape `{model}-L{layers}` (`{model}` when `layers` is None) on decode path `engine` (its `cycles.parquet`: every draft/verify cycle the
# GPU ran, the governor's predicted cycle time beside the observed wall time); otherwise, or with
# `cycles = "simulate"`, the *simulator's* cycles under the card's measured profile
# (`hardware=measured/<card>`, when one is committed; else the `h200` preset), where "observed" is the
# simulated cycle time. The title of each figure says which.

# %% tags=["parameters"]
model, layers = "phi-3.5-moe", 4
hardware = None  # None: the first measured profile under conf/hardware/measured/, else "h200"
budget = 0.25  # share of routed experts the cache holds
fixed_k = [1, 2, 4, 8]
requests, prompt_tokens, decode_tokens = 2, 16, 128
engine = "graphed"  # the decode path of the measured cycles
cycles = None  # a cycles.parquet (runtime or gpu_speculative); None: the newest committed measured one; "simulate"
speculative = None  # benchmarks/gpu_speculative.py's results.parquet; None: the newest committed one, if any
figures = "notebooks/figures"

# %%
import sys
from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd
import seaborn as sns

ROOT = next(p for p in [Path.cwd(), *Path.cwd().parents] if (p / "pyproject.toml").is_file())
sys.path.insert(0, str(ROOT))
from sim.hardware import HardwareSpec  # noqa: E402
from sim.experiments.roofline import compute_roofs_from_cycles, cycles_frame, most_chosen_k, operating_points, roofline_figure  # noqa: E402
from sim.run import simulate  # noqa: E402
from sim.spec import ModelSpec  # noqa: E402
from sim.experiments.search import compose_sim  # noqa: E402

out = ROOT / figures
out.mkdir(parents=True, exist_ok=True)
sns.set_theme(style="whitegrid", context="notebook")
if hardware is None:
    found = sorted(p.stem for p in (ROOT / "conf" / "hardware" / "measured").glob("*.yaml"))
    hardware = f"measured/{found[0]}" if found else "h200"
hw = HardwareSpec.from_preset(hardware)
spec = ModelSpec.from_preset(model, layers=layers)
slots = max(spec.top_k, round(budget * spec.num_routed_experts_total))
link = hw.h2d_bandwidth(spec.bytes_per_expert())
print(f"{spec.name} x{layers}, {slots} slots, hardware {hardware}: B_link {link / 1e9:.1f} GB/s at one expert's copy")


def run(governor: list[str]) -> pd.DataFrame:
    got = {}
    cfg = compose_sim([f"model={model}", f"model.layers={layers}", f"hardware={hardware}", "policy=speq",
                       f"cache.slots={slots}", f"trace.requests={requests}", f"trace.prompt_tokens={prompt_tokens}",
                       f"trace.decode_tokens={decode_tokens}", *governor])
    row = simulate(cfg, on_policy=lambda p, s, log, r: got.update(log=log))[0]
    df = pd.DataFrame(got["log"].cycles)
    df["run"] = governor[0].split("=")[1] + (f" k={governor[1].split('=')[1]}" if len(governor) > 1 else "")
    print(f"{df.run.iloc[0]}: TPOT {row['tpot_ms']:.2f} ms, mean k {row.get('mean_k', float('nan')):.2f}, "
          f"acceptance {row.get('acceptance_rate', float('nan')):.2f}")
    return df


def measured_cycles(path) -> tuple[pd.DataFrame, pd.DataFrame] | None:
    """The governor's cycles and the fixed-k ones of this shape and engine in a measured cycles table."""
    c = pd.read_parquet(ROOT / path)
    if "label" in c:  # gpu_speculative: every config of every shape
        c = c[(c.model == (f"{model}-L{layers}" if layers else model)) & (c.engine == engine) & (c.policy == "speq")]
        if c.empty:
            return None
        g, f = c[c.label == "speq"].copy(), c[c.label.str.fullmatch(r"speq-k\d+")].copy()
        g["run"], f["run"] = "roofline", f.label.str.replace("speq-k", "fixed k=", regex=False)
        return g, f
    return c.assign(run=c.get("policy", "measured")), c.iloc[0:0]


got = None
if cycles is None:
    found = sorted((ROOT / "benchmarks" / "results").glob("gpu_speculative*/cycles.parquet"), key=lambda p: p.stat().st_mtime)
    for path in reversed(found):
        got = measured_cycles(path)
        if got is not None:
            cycles = path.relative_to(ROOT)
            break
elif cycles != "simulate":
    got = measured_cycles(cycles)
if got is None:
    source = f"simulated under {hardware}"
    gov = run(["governor=roofline"])
    fixed = pd.concat([run(["governor=fixed", f"governor.k={k}"]) for k in fixed_k], ignore_index=True)
else:
    gov, fixed = got
    source = f"measured on the GPU, {engine} ({cycles})"
    if gov.get("link_bytes_per_s") is not None and gov.link_bytes_per_s.notna().any():
        link = float(gov.link_bytes_per_s.median())  # the link the runtime measured at its start
    print(f"{source}: {len(gov)} governor cycles, {len(fixed)} fixed-k cycles")

# %% [markdown]
# ## The roofline, with the governor's cycles and the fixed-k operating points

# %%
allc = cycles_frame(pd.concat([gov, fixed], ignore_index=True))
roofline_figure(cycles_frame(gov), link_bytes_per_s=link, compute_roofs=compute_roofs_from_cycles(allc),
                chosen_k=most_chosen_k(gov), path=out / "governor_roofline.png",
                title=f"Amortization Roofline, governor cycles ({source})")
print(operating_points(allc).round(4).to_string())
fig, ax = plt.subplots(figsize=(6, 4))
ax.imshow(plt.imread(out / "governor_roofline.png"))
ax.axis("off")

# %% [markdown]
# ## Predicted against observed cycle time

# %%
d = pd.concat([gov, fixed], ignore_index=True)
fig, ax = plt.subplots(figsize=(5.4, 4.6))
sns.scatterplot(data=d, x="observed_cycle_s", y="predicted_cycle_s", hue="run", s=25, ax=ax)
hi = 1.05 * max(d.observed_cycle_s.max(), d.predicted_cycle_s.max())
ax.plot([0, hi], [0, hi], color="black", lw=1)
ax.set(xlim=(0, hi), ylim=(0, hi), xlabel=f"observed cycle (s, {source.split(' (')[0]})", ylabel="governor's prediction (s)")
fig.tight_layout()
fig.savefig(out / "governor_cycle_prediction.png", dpi=130)
err = (d.predicted_cycle_s - d.observed_cycle_s) / d.observed_cycle_s
print(f"cycle-time prediction error: median {err.median():+.1%}, |error| p90 {err.abs().quantile(0.9):.1%} over {len(d)} cycles")

# %% [markdown]
# ## Measured speculative runs: speed-up over LRU, simulated against measured
# The rows of `benchmarks/gpu_speculative.py` (docs: benchmarks/gpu_speculative.md): each speculative
# config's speed-up over on-demand LRU at the same GPU memory, measured on the card and predicted by
# the simulator for the same config. The targets: within 10% of each other (the band), and
# the governor within 5% of the best fixed k.

# %%
if speculative is None:
    found = sorted((ROOT / "benchmarks" / "results").glob("gpu_speculative*/results.parquet"), key=lambda p: p.stat().st_mtime)
    speculative = found[-1] if found else None
if speculative is None:
    print("no measured speculative runs committed yet (benchmarks/gpu_speculative.py on the lent GPU writes them)")
else:
    sr = pd.read_parquet(ROOT / speculative)
    ok = sr[(sr.status == "ok") & sr.speedup_measured.notna() & sr.speedup_sim.notna() & (sr.label != "lru")].copy()
    ok["run"] = ok.label.astype(str)
    fig, ax = plt.subplots(figsize=(5.8, 4.6))
    sns.scatterplot(data=ok, x="speedup_sim", y="speedup_measured", hue="model", style="engine", s=45, ax=ax)
    lo = 0.95 * min(ok.speedup_sim.min(), ok.speedup_measured.min())
    hi = 1.05 * max(ok.speedup_sim.max(), ok.speedup_measured.max())
    for f, ls in ((1.0, "-"), (1.1, ":"), (0.9, ":")):
        ax.plot([lo, hi], [lo * f, hi * f], color="black", lw=1, ls=ls)
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set(xlim=(lo, hi), ylim=(lo, hi), xlabel="speed-up over LRU, simulated", ylabel="speed-up over LRU, measured")
    ax.set_title(f"{sr.card.iloc[0]}\n{Path(speculative).parent.name}", fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "governor_speculative_parity.png", dpi=130)
    ok["speedup_err"] = ok.speedup_measured / ok.speedup_sim - 1
    cols = [c for c in ("model", "engine", "run", "k", "speedup_measured", "speedup_sim", "speedup_err", "link_util",
                        "acceptance", "mean_k") if c in ok]
    print(ok[cols].to_string(index=False, float_format=lambda v: f"{v:.3g}"))
    print(f"|speed-up error| median {ok.speedup_err.abs().median():.1%}, max {ok.speedup_err.abs().max():.1%} "
          f"over {len(ok)} configs (target: each within 10%)")
    for (m, e), g in ok.groupby(["model", "engine"]):
        gov = g[(g.policy == "speq") & (g.k.astype(str) == "governor")]
        fixed_rows = g[(g.policy == "speq") & (g.k.astype(str) != "governor")]
        if len(gov) and len(fixed_rows):
            best = fixed_rows.loc[fixed_rows.tpot_measured_s.idxmin()]
            print(f"{m} ({e}): governor {gov.tpot_measured_s.iloc[0] * 1e3:.2f} ms vs best fixed k = {best.k} "
                  f"{best.tpot_measured_s * 1e3:.2f} ms ({gov.tpot_measured_s.iloc[0] / best.tpot_measured_s - 1:+.1%}; "
                  "target within 5%)")
