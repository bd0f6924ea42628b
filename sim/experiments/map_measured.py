"""Measured runs as points on the speculation map (``experiment.map.measured``): every MoE-SpeQ
governor row (policy speq, k = governor) of a results table written by benchmarks/gpu_speculative.py,
for the shapes ``experiment.map.measured_shapes`` maps to map models, placed at

- x = the draft's measured per-token acceptance, ``acceptance_by_position[0]`` (P(a cycle's first
  draft token is accepted); every drafting cycle counts). The map's x is the trace's stationary
  P(a draft token is accepted) (``trace.acceptance``); a run's ``acceptance`` column is accepted /
  drafted tokens, which a cycle's stop at its first rejection pulls far below it at large k (Phi
  at k = 8: 0.56 for a draft whose tokens are accepted 88% of the time), so it is not the axis;
- y = the host overhead the simulator charges a decode step of the row's engine on the map's
  hardware, per target layer (``host_y``): the cost model's ``host_layer(layer, top_k)`` (per-layer
  and per-launch terms) and the top-k experts' host dispatch (``host_experts``) beyond the kernels
  it overlaps, averaged over the decoder layers, plus ``host_head()`` (the head's launches) / layers. The map charges y per layer and
  nothing per launch or expert, so a verify pass's larger expert union costs its launches more
  on the GPU engine than at the point, and the draft pays the map's ``draft_host_per_layer_ms``,
  not the engine's;
- in the facet of its map model whose budget gives MoE-SpeQ the run's slots, the link facet at the
  hardware's own link (``links: {NAME: null}``), the agreement row nearest the draft's set agreement
  (measured in live runs; a replay run's trace was drawn at the model preset's dial).

The point's map value is a run of the map's own cell at exactly (x, y): LRU and MoE-SpeQ at the
same memory, on the map's trace length and seeds.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import pandas as pd

from sim.errors import SimError

NEEDED = ("model", "engine", "policy", "k", "status", "slots", "speedup_measured", "acceptance",
          "acceptance_by_position")
ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class MeasuredPoint:
    shape: str  # the table's model column (a depth-reduced shape, e.g. phi-3.5-moe-L4)
    model: str  # the map model it is drawn on
    engine: str
    x: float  # acceptance_by_position[0]
    acceptance_rate: float  # the row's accepted / drafted
    y_ms: float  # y_layer_ms + y_expert_ms + y_head_ms
    y_layer_ms: float  # mean over layers of host_layer(layer, top_k)
    y_expert_ms: float  # the top-k experts' host dispatch beyond their kernels, per layer
    y_head_ms: float  # host_head() / layers
    host_source: str  # hardware (the profile's measured engine values) | config (the engine preset's)
    agreement: float
    agreement_source: str  # measured | replay dial
    agreement_row: float
    slots: int  # MoE-SpeQ's slots in the run
    lru_slots: float  # the run's lru at the same memory (NaN: no such row)
    speedup_measured: float
    speedup_run_sim: float  # the run's own simulated speed-up (the table's speedup_sim)
    card: str


def table_path(spec: Any) -> Path:
    p = Path(spec.measured)
    return p if p.is_absolute() else ROOT / p


def read_table(spec: Any) -> pd.DataFrame:
    path = table_path(spec)
    if not path.is_file():
        raise SimError(f"experiment.map.measured: no results table at {path}")
    try:
        df = pd.read_parquet(path)
    except Exception as e:  # noqa: BLE001 - any unreadable file gets one line
        raise SimError(f"experiment.map.measured: {path} is not a readable Parquet table ({e})") from None
    missing = [c for c in NEEDED if c not in df.columns]
    if missing:
        raise SimError(f"experiment.map.measured: {path} lacks column(s) {missing} (a benchmarks/gpu_speculative.py "
                       "results table has them)")
    return df


def governor_rows(df: pd.DataFrame) -> pd.DataFrame:
    k = df["k"].astype(object)
    gov = k.isna() | (k.astype(str) == "governor")
    return df[(df["policy"] == "speq") & gov & (df["status"] == "ok")]


def _first_position(v: Any, where: str) -> float:
    if isinstance(v, str):
        v = json.loads(v)
    vals = [float(a) for a in (v if v is not None else [])]
    if not vals or not math.isfinite(vals[0]):
        raise SimError(f"experiment.map.measured: {where} has no acceptance_by_position[0]")
    return vals[0]


def host_y(model: Any, hw: Any, engine: str) -> tuple[float, float, float, str]:
    """(per-layer part, per-expert part, head part, source) of y in seconds: the host time the cost
    model adds to one decode step of ``engine`` (conf/engine/ENGINE.yaml, the hardware profile's
    measured values where it has them), per target decoder layer. Per layer: ``host_layer(layer,
    top_k)`` (the layer's term and its launches); per expert: what the host's dispatch of the top-k
    experts (``host_experts``) takes beyond their kernels, which it overlaps (sim.schedule); the
    head's launches (``host_head``) spread over the layers."""
    from sim.config import load_group_file
    from sim.costmodel import HostOverhead, cost_model_for

    host = HostOverhead.from_cfg(load_group_file("engine", engine), hw)
    cost = cost_model_for(model, hw, host=host)
    k, layers = model.top_k, model.num_layers
    per_layer = sum(cost.host_layer(layer, k) for layer in range(layers)) / layers
    per_expert = 0.0
    for layer in model.moe_layers:
        per_expert += max(0.0, cost.host_experts(layer, k) - cost.decode_experts(layer, k))
    return per_layer, per_expert / layers, cost.host_head() / layers, host.source


def measured_points(spec: Any) -> tuple[list[MeasuredPoint], list[str]]:
    """The table's MoE-SpeQ governor rows of the mapped shapes as points, and the shapes it has
    that the map does not. Refuses (SimError) a mapped shape without such a row or whose expert
    size is not the map model's."""
    from traces.synth import synth_params_for

    from sim.experiments.speculation_map import model_entry, model_spec

    df = read_table(spec)
    rows = governor_rows(df)
    hw = spec.hardware_spec()
    where = table_path(spec).name
    points = []
    for shape, entry in spec.measured_shapes.items():
        mine = rows[rows["model"] == shape]
        if mine.empty:
            raise SimError(f"experiment.map.measured_shapes: '{shape}' has no MoE-SpeQ governor row (policy speq, "
                           f"k governor, status ok) in {where}; its shapes: {sorted(rows['model'].unique())}")
        model = model_spec(entry)
        for _, r in mine.iterrows():
            what = f"{where}: {shape} ({r['engine']})"
            if "expert_bytes" in r and pd.notna(r["expert_bytes"]) and int(r["expert_bytes"]) != model.bytes_per_expert():
                raise SimError(f"experiment.map.measured_shapes: {what} has experts of {int(r['expert_bytes'])} B but "
                               f"map model '{entry}' has {model.bytes_per_expert()} B: not the same shape")
            ag = r.get("draft_agreement")
            if ag is not None and pd.notna(ag):
                agreement, source = float(ag), "measured"
            elif r.get("mode") == "replay":
                agreement, source = float(synth_params_for(model_entry(entry)[0]).draft_agreement), "replay dial"
            else:
                raise SimError(f"experiment.map.measured: {what} has no draft_agreement and is not a replay run")
            y_layer, y_expert, y_head, host_source = host_y(model, hw, str(r["engine"]))
            lru = df[(df["model"] == shape) & (df["engine"] == r["engine"]) & (df["policy"] == "lru")
                     & (df.get("memory", pd.Series("same_memory", index=df.index)) == "same_memory")
                     & (df["status"] == "ok")]
            points.append(MeasuredPoint(
                shape=shape, model=entry, engine=str(r["engine"]),
                x=_first_position(r["acceptance_by_position"], what), acceptance_rate=float(r["acceptance"]),
                y_ms=(y_layer + y_expert + y_head) * 1e3, y_layer_ms=y_layer * 1e3, y_expert_ms=y_expert * 1e3,
                y_head_ms=y_head * 1e3,
                host_source=host_source, agreement=agreement, agreement_source=source,
                agreement_row=min(spec.agreement, key=lambda a: abs(a - agreement)),
                slots=int(r["slots"]), lru_slots=float(lru["slots"].iloc[0]) if len(lru) else math.nan,
                speedup_measured=float(r["speedup_measured"]),
                speedup_run_sim=float(r["speedup_sim"]) if "speedup_sim" in r else math.nan,
                card=str(r.get("card", "")),
            ))
    others = sorted(set(rows["model"]) - set(spec.measured_shapes))
    return points, others


def point_cells(spec: Any, points: list[MeasuredPoint], memory: Mapping[tuple[str, str], Mapping[str, Any]]
                ) -> list[tuple[MeasuredPoint, dict[str, Any]]]:
    """Each point's map cells (one per link facet and seed): its model's budget with MoE-SpeQ at
    the run's slots, the link facet at the hardware's own link; refused where the map has neither."""
    own = spec.hardware_spec().h2d_gbps
    links = [name for name, v in spec.links.items() if v is None or v == own]
    if points and not links:
        raise SimError(f"experiment.map.measured: the points were measured on {spec.hardware}'s own link "
                       f"({own:g} GB/s); experiment.map.links {dict(spec.links)} has no facet for it (add NAME: null)")
    out = []
    for p in points:
        budgets = [b for b in spec.budgets[p.model] if memory[(p.model, b)]["speq_slots"] == p.slots]
        if not budgets:
            have = {b: memory[(p.model, b)]["speq_slots"] for b in spec.budgets[p.model]}
            raise SimError(f"experiment.map.measured: {p.shape} ({p.engine}) ran MoE-SpeQ with {p.slots} slots, but "
                           f"no budget of '{p.model}' gives it that many (MoE-SpeQ slots per budget: {have}); add "
                           f"{{speq_slots: {p.slots}}}")
        b = budgets[0]
        out += [(p, dict(model=p.model, link=link, h2d_gbps=own, budget=b, memory_gib=memory[(p.model, b)]["memory_gib"],
                         host_per_layer_ms=p.y_ms, seed=seed)) for link in links for seed in spec.seeds]
    return out


def run_points(base: Sequence[str], spec: Any, cells: list[tuple[MeasuredPoint, dict[str, Any]]]) -> pd.DataFrame:
    """Each point's map value: the map's cell at exactly (x, y), LRU and MoE-SpeQ (mean over seeds)."""
    from sim.experiments.search import compose_sim
    from sim.experiments.speculation_map import run_cell

    out = []
    for p, c in cells:
        (row,) = run_cell(compose_sim([*base, *spec.overrides(c)]), c, [p.agreement_row], [p.x])
        out.append({**asdict(p), "link": c["link"], "budget": c["budget"], "memory_gib": c["memory_gib"],
                    "seed": c["seed"], "status": row["status"], "speedup_map": row.get("speedup", math.nan),
                    "lru_slots_sim": row.get("lru_slots", math.nan), "speq_slots_sim": row.get("speq_slots", math.nan),
                    "lru_tpot_ms": row.get("lru_tpot_ms", math.nan), "speq_tpot_ms": row.get("speq_tpot_ms", math.nan)})
    df = pd.DataFrame(out)
    if df.empty:
        return df
    per_seed = ["seed", "status", "speedup_map", "lru_tpot_ms", "speq_tpot_ms"]
    keys = [c for c in df.columns if c not in per_seed]
    agg = df.groupby(keys, sort=False, dropna=False).agg(
        speedup_map=("speedup_map", "mean"), lru_tpot_ms=("lru_tpot_ms", "mean"), speq_tpot_ms=("speq_tpot_ms", "mean"),
        status=("status", lambda s: "ok" if (s == "ok").all() else "infeasible"), seeds=("seed", "size")).reset_index()
    agg["difference"] = agg["speedup_measured"] - agg["speedup_map"]
    return agg


def points_md(df: pd.DataFrame, spec: Any, others: list[str]) -> list[str]:
    """The summary's section: each point with both values and their difference."""
    lines = ["", f"## Measured points ({spec.measured})", "",
             "x = the draft's measured per-token acceptance (acceptance_by_position[0]; the run's accepted / drafted "
             "beside it), y = the host overhead the simulator charges a decode step of the row's engine on "
             f"{spec.hardware} per target layer (host_layer at top-k experts + the experts' host dispatch beyond "
             "their kernels, averaged over layers, + the head's launches / layers); map = the map's cell run at exactly (x, y) in the facet of the run's MoE-SpeQ "
             "slots and the nearest agreement row; run sim = the run's own simulated speed-up (its engine's full "
             "host model, its own trace). Engine (profile): the hardware profile's measured engine values; "
             "(preset): conf/engine's placeholders, the profile has none for it.", "",
             "| shape | engine | facet | x (rate) | y ms (layer + experts + head) | agreement (row) | slots MoE-SpeQ / LRU: "
             "run, map | measured | map | measured - map | run sim |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for _, r in df.iterrows():
        rel = r["speedup_measured"] / r["speedup_map"] - 1 if r["speedup_map"] else math.nan
        lru = "-" if pd.isna(r["lru_slots"]) else f"{int(r['lru_slots'])}"
        source = "profile" if r["host_source"] == "hardware" else "preset"
        lines.append(
            f"| {r['shape']} | {r['engine']} ({source}) | {r['model']} · {r['budget']} {r['memory_gib']:.4g} GiB · "
            f"{r['link']} | {r['x']:.3f} ({r['acceptance_rate']:.3f}) | "
            f"{r['y_ms']:.3f} ({r['y_layer_ms']:.3f} + {r['y_expert_ms']:.3f} + {r['y_head_ms']:.3f}) | "
            f"{r['agreement']:.3f} {r['agreement_source']} ({r['agreement_row']:g}) | {r['slots']} / {lru}, "
            f"{int(r['speq_slots_sim'])} / {int(r['lru_slots_sim'])} | {r['speedup_measured']:.2f}x | "
            f"{r['speedup_map']:.2f}x | {r['difference']:+.2f}x ({rel:+.0%}) | {r['speedup_run_sim']:.2f}x |")
    if others:
        lines += ["", f"Rows of shapes the map does not have (not placed): {', '.join(others)}."]
    return lines


def draw(ax: Any, pts: pd.DataFrame, norm: Any) -> None:
    """The points of one facet: markers coloured by the measured speed-up, annotated with both values."""
    marker = {"graphed": "o", "eager": "s"}
    for i, (_, r) in enumerate(pts.iterrows()):
        ax.scatter([r["x"]], [r["y_ms"]], c=[r["speedup_measured"]], cmap="RdBu", norm=norm,
                   marker=marker.get(r["engine"], "D"), s=70, edgecolors="black", linewidths=1.2, zorder=6,
                   clip_on=False)
        ax.annotate(f"{r['shape']} {r['engine']}\nmeasured {r['speedup_measured']:.2f}x / sim {r['speedup_map']:.2f}x",
                    (r["x"], r["y_ms"]), xytext=(0.03, 0.05 + 0.2 * i), textcoords="axes fraction", fontsize=6,
                    arrowprops=dict(arrowstyle="-", lw=0.5), bbox=dict(boxstyle="round", fc="white", alpha=0.8, lw=0.3))
