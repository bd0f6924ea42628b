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
# # Routing traces: the project's captured trace beside the synthetic presets
#
# What an offloading policy can exploit in a routing trace (traces/stats.py defines each measure):
# reuse of a token's experts by the previous tokens, LRU hit rate against per-layer capacity, how many
# distinct experts n consecutive tokens touch, how well the gate lookahead predicts layers ahead, and how
# often the INT4 draft's top-k set agrees exactly with the target's (per layer). The captured trace is
# `traces/data/small-moe.parquet` (the project's own model, with lookahead and draft columns); the
# synthetic ones are the simulator's presets (`trace=synth`, each model's routing statistics).

# %% tags=["parameters"]
captured = "traces/data/small-moe.parquet"
synthetic = ["phi-3.5-moe", "mixtral-8x7b", "qwen3-30b-a3b"]
requests, prompt_tokens, decode_tokens = 8, 16, 128  # size of each synthetic trace
max_window = 16  # reuse windows and union spans 1..max_window tokens
figures = "notebooks/figures"

# %%
import sys
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns

ROOT = next(p for p in [Path.cwd(), *Path.cwd().parents] if (p / "pyproject.toml").is_file())
sys.path.insert(0, str(ROOT))
from sim.run import load_trace  # noqa: E402
from sim.spec import ModelSpec  # noqa: E402
from sim.experiments.search import compose_sim  # noqa: E402
from traces import read_trace  # noqa: E402
from traces.stats import lru_hit_rates, predictor_recall, reuse, select_tokens  # noqa: E402

out = ROOT / figures
out.mkdir(parents=True, exist_ok=True)
sns.set_theme(style="whitegrid", context="notebook")

traces = {f"{Path(captured).stem} (captured)": read_trace(ROOT / captured)}
for name in synthetic:
    cfg = compose_sim([f"model={name}", f"trace.requests={requests}", f"trace.prompt_tokens={prompt_tokens}",
                       f"trace.decode_tokens={decode_tokens}"])
    traces[f"{name} (synthetic)"] = load_trace(cfg.trace, ModelSpec.from_cfg(cfg.model))
for name, t in traces.items():
    print(f"{name}: {t.num_requests} requests, {t.shape.num_experts} experts top-{t.shape.top_k}, "
          f"{len(t.shape.moe_layers)} MoE layers, lookahead depths {t.lookahead_depths}, draft {t.draft is not None}")

# %%
def union_share(t, n: int) -> float:
    """Mean distinct experts touched by n consecutive decode tokens at one layer, as a share of E."""
    s = select_tokens(t, "decode")
    R, T, M, k = s.ids.shape
    E = t.shape.num_experts
    vals = []
    for r in range(R):
        L = int(s.lengths[r])
        for t0 in range(0, L - n + 1, n):
            ids = s.ids[r, t0:t0 + n]  # (n, M, k)
            for m in range(M):
                vals.append(len(np.unique(ids[:, m][ids[:, m] >= 0])) / E)
    return float(np.mean(vals)) if vals else float("nan")


rows = []
for name, t in traces.items():
    E, k = t.shape.num_experts, t.shape.top_k
    for w in range(1, max_window + 1):
        rows.append({"trace": name, "measure": "reuse", "x": w, "value": reuse(t, w).overall})
        rows.append({"trace": name, "measure": "union", "x": w, "value": union_share(t, w)})
    for c in sorted({c for c in (k, 2 * k, 3 * k, 4 * k, E // 4, E // 2, E) if 1 <= c <= E}):
        rows.append({"trace": name, "measure": "lru", "x": c / E, "value": lru_hit_rates(t, [c])[c].overall})
    for key, rate in predictor_recall(t).items():
        if key.startswith("lookahead_"):
            rows.append({"trace": name, "measure": "lookahead", "x": int(key.split("_")[1]), "value": rate.overall})
df = pd.DataFrame(rows)

# %% [markdown]
# ## Reuse, LRU hit rate, union of experts, lookahead recall

# %%
fig, axes = plt.subplots(1, 4, figsize=(17, 3.8))
spec = [("reuse", "previous tokens (window)", "share of a token's experts reused"),
        ("lru", "capacity per layer (share of experts)", "LRU hit rate"),
        ("union", "consecutive tokens n", "distinct experts / E"),
        ("lookahead", "lookahead distance (layers)", "recall")]
for ax, (m, xl, yl) in zip(axes, spec):
    d = df[df.measure == m]
    if d.empty:
        ax.text(0.5, 0.5, "no trace has this column", ha="center", transform=ax.transAxes)
    else:
        sns.lineplot(data=d, x="x", y="value", hue="trace", marker="o", ax=ax, legend=ax is axes[0])
    ax.set(xlabel=xl, ylabel=yl, ylim=(0, 1.02))
axes[0].legend(fontsize=7)
fig.tight_layout()
fig.savefig(out / "trace_analysis.png", dpi=130)

# %% [markdown]
# ## Draft set agreement by layer
# Exact top-k *set* agreement between the INT4 draft's routing and the target's, per (token, layer):
# what MoE-SpeQ's Expert Lookahead Buffer relies on.

# %%
agree = []
for name, t in traces.items():
    s = select_tokens(t, "decode")
    if s.draft is None:
        continue
    same = (np.sort(s.draft, -1) == np.sort(s.ids, -1)).all(-1)  # (R, T, M)
    for m, layer in enumerate(t.shape.moe_layers):
        agree.append({"trace": name, "layer": layer, "set_agreement": float(same[:, :, m][s.valid].mean())})
agree = pd.DataFrame(agree)
fig, ax = plt.subplots(figsize=(6, 3.5))
if agree.empty:
    ax.text(0.5, 0.5, "no trace with a draft column", ha="center", transform=ax.transAxes)
else:
    sns.barplot(data=agree, x="layer", y="set_agreement", hue="trace", ax=ax)
ax.set(ylim=(0, 1), ylabel="exact top-k set agreement")
fig.tight_layout()
fig.savefig(out / "trace_draft_agreement.png", dpi=130)
print(agree.groupby("trace").set_agreement.mean() if not agree.empty else "no draft columns")
