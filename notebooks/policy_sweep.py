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
# # Policies across hardware and budgets
#
# The simulator's TPOT and ratio to the bound (Belady over the full future with transfers and compute
# fully overlapped; docs/metrics.md) for each policy, hardware preset (and every measured profile under
# conf/hardware/measured/) and expert-cache budget, on one model shape; then MoE-SpeQ's speed-up over
# on-demand LRU at the same cache size against cache size, host-link bandwidth and host overhead per layer.

# %% tags=["parameters"]
model, layers = "phi-3.5-moe", 4  # depth-reduced, shape-faithful
hardware = ["a100-40g-pcie4", "h100-pcie5", "h200"]  # measured profiles are added when present
budgets = [0.125, 0.25, 0.5]  # share of all routed experts the cache holds (cache.slots)
policies = ["lru", "lookahead", "oracle", "speq"]
link_gbps = [8.0, 16.0, 32.0, 55.5]  # h2d plateau swept on the last hardware preset
host_per_layer_s = [0.0, 1e-4, 5e-4, 1e-3]  # needs the engine group (engine.host_per_layer_s)
requests, prompt_tokens, decode_tokens = 2, 16, 64
figures = "notebooks/figures"

# %%
import sys
from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd
import seaborn as sns

ROOT = next(p for p in [Path.cwd(), *Path.cwd().parents] if (p / "pyproject.toml").is_file())
sys.path.insert(0, str(ROOT))
from sim.run import simulate  # noqa: E402
from sim.spec import ModelSpec  # noqa: E402
from sim.experiments.search import compose_sim  # noqa: E402

out = ROOT / figures
out.mkdir(parents=True, exist_ok=True)
sns.set_theme(style="whitegrid", context="notebook")
measured = sorted(p.stem for p in (ROOT / "conf" / "hardware" / "measured").glob("*.yaml"))
hw_list = list(hardware) + [f"measured/{m}" for m in measured]
spec = ModelSpec.from_preset(model, layers=layers)
total = spec.num_routed_experts_total
print(f"{spec.name} x{layers} layers: {total} routed experts; hardware {hw_list}")


def run(policy: str, hw: str, slots: int, extra: list[str] = ()) -> dict:
    over = [f"model={model}", f"model.layers={layers}", f"hardware={hw}", f"policy={policy}", f"cache.slots={slots}",
            f"trace.requests={requests}", f"trace.prompt_tokens={prompt_tokens}", f"trace.decode_tokens={decode_tokens}",
            *extra]
    r = simulate(compose_sim(over))[0]
    return {"policy": policy, "hardware": hw, "slots": slots, "budget": slots / total, "status": r["status"],
            "tpot_ms": r.get("tpot_ms"), "x_bound": r.get("x_bound"), "hit_rate": r.get("hit_rate")}


rows = [run(p, hw, max(spec.top_k, round(b * total))) for hw in hw_list for b in budgets for p in policies]
df = pd.DataFrame(rows)
print(df.pivot_table(index=["hardware", "budget"], columns="policy", values="tpot_ms").round(2).to_string())

# %% [markdown]
# ## TPOT and ratio to the bound

# %%
ok = df[df.status == "ok"]
fig, axes = plt.subplots(2, len(hw_list), figsize=(3.6 * len(hw_list), 6.4), sharex=True, squeeze=False)
for j, hw in enumerate(hw_list):
    d = ok[ok.hardware == hw]
    for i, (col, label) in enumerate((("tpot_ms", "TPOT (ms)"), ("x_bound", "TPOT / bound"))):
        ax = axes[i, j]
        sns.lineplot(data=d, x="budget", y=col, hue="policy", marker="o", ax=ax, legend=(i, j) == (0, 0))
        ax.set(xscale="log", ylabel=label, xlabel="cache (share of experts)", title=hw if i == 0 else None)
        ax.set_xticks(budgets, [f"{b:g}" for b in budgets])
fig.tight_layout()
fig.savefig(out / "policy_sweep.png", dpi=130)

# %% [markdown]
# ## MoE-SpeQ's speed-up over on-demand LRU at the same cache size

# %%
def speedup(rows: list[dict], x: str) -> pd.DataFrame:
    d = pd.DataFrame(rows)
    w = d.pivot_table(index=x, columns="policy", values="tpot_ms")
    return (w["lru"] / w["speq"]).rename("speedup").reset_index()


last = hw_list[len(hardware) - 1] if hardware else hw_list[-1]
mid = max(spec.top_k, round(budgets[len(budgets) // 2] * total))
by_budget = speedup([r for r in rows if r["hardware"] == last and r["policy"] in ("lru", "speq")], "budget")
by_link = speedup([{**run(p, last, mid, [f"hardware.h2d_gbps={g}"]), "link_gbps": g} for g in link_gbps
                   for p in ("lru", "speq")], "link_gbps")
has_engine = (ROOT / "conf" / "engine").is_dir()
by_host = None
if has_engine:
    by_host = speedup([{**run(p, last, mid, ["engine=eager", f"engine.host_per_layer_s={h}"]), "host_per_layer_s": h}
                       for h in host_per_layer_s for p in ("lru", "speq")], "host_per_layer_s")
fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
for ax, (d, x, label) in zip(axes, ((by_budget, "budget", "cache (share of experts)"),
                                    (by_link, "link_gbps", "host-to-device GB/s"),
                                    (by_host, "host_per_layer_s", "host overhead per layer (s)"))):
    if d is None:
        ax.text(0.5, 0.5, "needs the engine config group\n(host overhead per layer)", ha="center", va="center",
                transform=ax.transAxes)
    else:
        ax.plot(d[x], d["speedup"], "o-")
        ax.axhline(1, color="black", lw=1)
    ax.set(xlabel=label, ylabel="TPOT lru / TPOT speq", title=f"{last}, {model} x{layers}")
fig.tight_layout()
fig.savefig(out / "policy_sweep_speedup.png", dpi=130)
print(by_budget.to_string(index=False), by_link.to_string(index=False), sep="\n")
