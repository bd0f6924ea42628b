"""The map of where speculation pays: the speed-up of MoE-SpeQ (roofline governor) over on-demand
LRU **at the same GPU memory**, over draft acceptance (x) and host overhead per layer (y), faceted
by model x host link, with draft set agreement and the memory budget as further rows.

``python -m sim.sweep experiment=speculation-map [experiment.scale=smoke]`` (conf/experiment/
speculation-map.yaml holds the grid; speculation-map-measured.yaml the same map at a measured GPU's
setting). A map model is a preset or ``PRESET@N`` (its first N layers); a budget is GiB or
``{speq_slots: N}`` (the memory at which MoE-SpeQ holds N slots; LRU gets the same memory); a link
of ``null`` is the hardware preset's own; ``measured`` + ``measured_shapes`` draw a GPU run's
MoE-SpeQ governor rows on the map (sim/experiments/map_measured.py).

One *cell* is (model, link, budget, host overhead, seed):
its trace is synthesised once and LRU runs once; MoE-SpeQ then runs at every (set agreement,
acceptance), the draft columns redrawn from the same routing by the generator's own draft stage
(``traces.synth.with_draft``), so a point equals ``python -m sim policy=speq trace.acceptance=...``
bit for bit. Host overhead y is charged per decoder layer to the target (``engine.host_per_layer_s``;
no per-launch term); the draft pays ``draft_host_per_layer_ms`` (default 0: the INT4 draft is
fully resident, so no step of it waits on a host decision and it can run as one CUDA graph; set it
to y's values to see a draft that pays as much as the target).

Writes into the run dir: ``speculation_map.parquet`` / ``.csv`` (one row per point: the keys,
both TPOTs, the speed-up, speq's mean k, acceptance rate, hit rates), ``speculation_map.png`` (a
seaborn FacetGrid, filled contours of the speed-up and the speed-up = 1 contour drawn with
matplotlib ``contour``; the project's own captured model and any measured points marked) and
``speculation_map.md`` (the command, date and CPU; per facet: the acceptance where the speed-up
first reaches 1 at each host overhead, the best speed-up, and the run time; each measured point with
the map's value there), with measured points also ``speculation_map_measured.parquet``.
docs/speculation.md reads the map (section 6: the measured setting).
"""

from __future__ import annotations

import itertools
import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np
import pandas as pd

from sim.errors import SimError

if TYPE_CHECKING:
    from sim.hardware import HardwareSpec
    from sim.spec import ModelSpec

SCALES = ("full", "smoke")


def model_entry(entry: str) -> tuple[str, int | None]:
    """A map model: a conf/model preset, or ``PRESET@N`` for its first N decoder layers (the
    depth-reduced shape a GPU run measures; ``model.layers=N``). A SimError names a bad entry."""
    name, at, depth = str(entry).partition("@")
    if not name:
        raise SimError(f"experiment.map.models: '{entry}' names no model preset")
    if not at:
        return name, None
    try:
        n = int(depth)
    except ValueError:
        n = 0
    if n < 1 or str(n) != depth:
        raise SimError(f"experiment.map.models: '{entry}': the depth after '@' must be an integer >= 1, got '{depth}'")
    return name, n


def model_spec(entry: str) -> "ModelSpec":
    """The ModelSpec of a map model entry (preset and depth checked; the SimError names the entry)."""
    from sim.spec import ModelSpec

    name, layers = model_entry(entry)
    try:
        return ModelSpec.from_preset(name, layers)
    except SimError as e:
        raise SimError(f"experiment.map.models: '{entry}': {e}") from None


@dataclass(frozen=True)
class SlotBudget:
    """A budget given as MoE-SpeQ's cache (``{speq_slots: N}``): the GPU memory at which its pool holds
    N slots beside its INT4 draft, by the simulator's memory model (sim.memory.budget_for_slots);
    LRU gets the same memory, so N + the draft's bytes // one expert's bytes slots."""

    speq_slots: int


def _budget(model: str, name: str, v: Any) -> float | SlotBudget:
    where = f"experiment.map.budgets.{model}.{name}"
    if isinstance(v, Mapping):
        if set(v) != {"speq_slots"}:
            raise SimError(f"{where}: a budget is GiB or {{speq_slots: N}}, got keys {sorted(map(str, v))}")
        n = v["speq_slots"]
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise SimError(f"{where}.speq_slots must be an integer >= 1, got {n!r}")
        return SlotBudget(n)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
        raise SimError(f"{where} must be GiB > 0 or {{speq_slots: N}}, got {v!r}")
    return float(v)


@dataclass(frozen=True)
class MapSpec:
    """The grid (conf/experiment/speculation-map.yaml, ``experiment.map``; ``experiment.smoke``
    overrides it at ``experiment.scale=smoke``)."""

    models: tuple[str, ...]  # conf/model presets, or PRESET@N (its first N layers)
    links: Mapping[str, float | None]  # label -> pinned h2d plateau (GB/s); null: the hardware preset's own
    budgets: Mapping[str, Mapping[str, float | SlotBudget]]  # model -> {name: GiB | {speq_slots: N}}
    acceptance: tuple[float, ...]
    host_per_layer_ms: tuple[float, ...]
    agreement: tuple[float, ...]
    hardware: str = "a100-40g-pcie4"
    seeds: tuple[int, ...] = (0,)
    requests: int = 1
    prompt_tokens: int = 32
    decode_tokens: int = 128
    workers: int = 1
    draft_host_per_layer_ms: float = 0.0
    own_trace: str | None = None  # a captured trace with draft columns: the project's model as a point
    measured: str | None = None  # a gpu_speculative results table: its MoE-SpeQ governor rows as points
    measured_shapes: Mapping[str, str] = field(default_factory=dict)  # the table's shape -> a map model
    extra: tuple[str, ...] = field(default=())  # more overrides for every point

    @classmethod
    def from_cfg(cls, exp: Mapping[str, Any]) -> "MapSpec":
        scale = str(exp.get("scale", "full"))
        if scale not in SCALES:
            raise SimError(f"experiment.scale must be one of {list(SCALES)}, got '{scale}'")
        d = dict(exp.get("map") or {})
        if scale == "smoke":
            d.update(exp.get("smoke") or {})
        known = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(d) - known)
        if unknown:
            raise SimError(f"experiment.map: unknown key(s) {unknown}; known: {sorted(known)}")
        nested = ("models", "links", "budgets", "acceptance", "host_per_layer_ms", "agreement", "measured_shapes")
        try:
            spec = cls(
                models=tuple(str(m) for m in d["models"]),
                links={str(k): None if v is None else float(v) for k, v in d["links"].items()},
                budgets={str(m): {str(k): _budget(str(m), str(k), v) for k, v in b.items()}
                         for m, b in d["budgets"].items()},
                acceptance=tuple(float(x) for x in d["acceptance"]),
                host_per_layer_ms=tuple(float(x) for x in d["host_per_layer_ms"]),
                agreement=tuple(float(x) for x in d["agreement"]),
                measured_shapes={str(k): str(v) for k, v in (d.get("measured_shapes") or {}).items()},
                **{k: (tuple(v) if isinstance(v, (list, tuple)) else v) for k, v in d.items() if k not in nested},
            )
        except KeyError as e:
            raise SimError(f"experiment.map: missing key {e}") from None
        spec.check()
        return spec

    def check(self) -> None:
        for m in self.models:
            model_spec(m)
            if m not in self.budgets or not self.budgets[m]:
                raise SimError(f"experiment.map.budgets: no budget for model '{m}'")
        for name, vals, lo, hi in (("acceptance", self.acceptance, 0, 1), ("agreement", self.agreement, 0, 1),
                                   ("host_per_layer_ms", self.host_per_layer_ms, 0, math.inf)):
            if not vals or any(not lo <= v <= hi for v in vals):
                raise SimError(f"experiment.map.{name} must be a non-empty list of values in [{lo}, {hi}], got {list(vals)}")
        if not 0 <= self.draft_host_per_layer_ms < math.inf:
            raise SimError(f"experiment.map.draft_host_per_layer_ms must be >= 0, got {self.draft_host_per_layer_ms}")
        if any(v is not None and v <= 0 for v in self.links.values()):
            raise SimError(f"experiment.map.links: bandwidths must be > 0 GB/s (or null: the hardware's own), "
                           f"got {dict(self.links)}")
        bad = {k: v for k, v in self.measured_shapes.items() if v not in self.models}
        if bad:
            raise SimError(f"experiment.map.measured_shapes: {bad} map to no model of experiment.map.models "
                           f"{list(self.models)}")
        if bool(self.measured_shapes) != bool(self.measured):
            raise SimError("experiment.map.measured (a gpu_speculative results table) and experiment.map.measured_shapes "
                           "(its shape names -> map models) go together: set both or neither")

    def hardware_spec(self) -> "HardwareSpec":
        from sim.hardware import HardwareSpec

        return HardwareSpec.from_preset(self.hardware)

    def cells(self, memory: Mapping[tuple[str, str], float] | None = None) -> list[dict[str, Any]]:
        """Units of work, in a fixed order: (model, link, budget, host overhead, seed). ``memory``:
        GiB of each (model, budget) given as slots ({speq_slots: N}; ``budget_memory``)."""
        own = self.hardware_spec().h2d_gbps if None in self.links.values() else None
        out = []
        for m, (lname, gbps), y, seed in itertools.product(self.models, self.links.items(), self.host_per_layer_ms,
                                                            self.seeds):
            for bname, b in self.budgets[m].items():
                if isinstance(b, SlotBudget):
                    if memory is None or (m, bname) not in memory:
                        raise SimError(f"experiment.map.budgets.{m}.{bname}: a budget in slots needs its memory "
                                       "resolved first (budget_memory)")
                    b = memory[(m, bname)]
                out.append(dict(model=m, link=lname, h2d_gbps=own if gbps is None else gbps, budget=bname,
                                memory_gib=b, host_per_layer_ms=y, seed=seed))
        return out

    def overrides(self, c: Mapping[str, Any]) -> list[str]:
        y = c["host_per_layer_ms"] / 1e3
        yd = self.draft_host_per_layer_ms / 1e3
        name, layers = model_entry(c["model"])
        model = [f"model={name}"] + ([f"model.layers={layers}"] if layers else [])
        link = [] if self.links[c["link"]] is None else [f"hardware.h2d_gbps={c['h2d_gbps']}"]
        return [*model, f"hardware={self.hardware}", *link,
                f"hardware.memory_gib={c['memory_gib']}", "engine=ideal", "engine.name=per-layer",
                f"engine.host_per_layer_s={y}", f"engine.draft_host_per_layer_s={yd}", "engine.host_per_launch_s=0.0",
                f"trace.requests={self.requests}", f"trace.prompt_tokens={self.prompt_tokens}",
                f"trace.decode_tokens={self.decode_tokens}", f"trace.seed={c['seed']}", "progress=false",
                *self.extra]


def budget_memory(base: Sequence[str], spec: MapSpec) -> dict[tuple[str, str], dict[str, Any]]:
    """Per (model, budget): the GPU memory (GiB) and the slots MoE-SpeQ and LRU get there by the
    simulator's memory model (sim.memory), a budget in slots resolved to the memory at which
    MoE-SpeQ's pool holds exactly that many (``budget_for_slots``). Before any work: a budget that
    cannot run is refused here."""
    from dataclasses import replace as _replace

    from sim.errors import InfeasibleError
    from sim.experiments.search import compose_sim
    from sim.memory import budget_for_slots, plan_memory
    from sim.run import prepare

    out = {}
    for m in spec.models:
        for bname, b in spec.budgets[m].items():
            slots = isinstance(b, SlotBudget)
            cell = dict(model=m, link=next(iter(spec.links)), h2d_gbps=next(iter(spec.links.values())),
                        budget=bname, memory_gib=1.0 if slots else b, host_per_layer_ms=0.0, seed=spec.seeds[0])
            prep = prepare(compose_sim([*base, *spec.overrides(cell)]))
            hw, ctx = prep.hw, prep.context_tokens
            if slots:
                nbytes = budget_for_slots(prep.model, hw, max_context_tokens=ctx, slots=b.speq_slots)
                hw = _replace(hw, memory_gib=nbytes / 2**30)
            try:
                speq = plan_memory(prep.model, hw, max_context_tokens=ctx, draft_resident=True).slots
                lru = plan_memory(prep.model, hw, max_context_tokens=ctx).slots
            except InfeasibleError as e:
                if slots:  # pragma: no cover - budget_for_slots builds a feasible budget
                    raise SimError(f"experiment.map.budgets.{m}.{bname}: {e}") from None
                speq = lru = None  # a GiB budget that cannot run: its rows say so (run_cell)
            if slots and speq != b.speq_slots:  # pragma: no cover - budget_for_slots' contract
                raise SimError(f"experiment.map.budgets.{m}.{bname}: {hw.memory_gib} GiB gives MoE-SpeQ {speq} "
                               f"slots, not {b.speq_slots}")
            out[(m, bname)] = {"memory_gib": hw.memory_gib if slots else b, "speq_slots": speq, "lru_slots": lru}
    return out


def run_cell(cfg: Any, cell: Mapping[str, Any], agreement: Sequence[float], acceptance: Sequence[float]) -> list[dict]:
    """LRU once, then MoE-SpeQ at every (set agreement, acceptance) on the cell's routing."""
    from sim.config import register_configs
    from sim.run import load_policy, prepare, run_policy, synth_params
    from traces.synth import with_draft

    register_configs()
    prep = prepare(cfg)
    lru, speq = load_policy("lru"), load_policy("speq")
    key = {k: cell[k] for k in ("model", "link", "h2d_gbps", "budget", "memory_gib", "host_per_layer_ms", "seed")}
    try:
        lru_row, _ = run_policy(prep, lru, int(cfg.seed))
    except SimError as e:  # pragma: no cover - an infeasible budget: every point of the cell says so
        return [{**key, "agreement": a, "acceptance": x, "status": "infeasible", "reason": str(e)}
                for a in agreement for x in acceptance]
    bare = replace(prep.trace, draft=None, draft_match=None)
    rows = []
    for a, x in itertools.product(agreement, acceptance):
        cfg.trace.draft_agreement, cfg.trace.acceptance = float(a), float(x)
        trace = with_draft(bare, synth_params(prep.model, cfg.trace), int(cfg.trace.seed))
        p = replace(prep, trace=trace)
        try:
            row, _ = run_policy(p, speq, int(cfg.seed), governor_cfg=cfg.governor, trace_cfg=cfg.trace)
        except SimError as e:
            rows.append({**key, "agreement": a, "acceptance": x, "status": "infeasible", "reason": str(e)})
            continue
        rows.append({
            **key, "agreement": a, "acceptance": x, "status": "ok", "reason": "",
            "lru_tpot_ms": lru_row["tpot_ms"], "speq_tpot_ms": row["tpot_ms"],
            "speedup": lru_row["tpot_ms"] / row["tpot_ms"],
            "lru_slots": lru_row["slots"], "speq_slots": row["slots"],
            "lru_hit_rate": lru_row["hit_rate"], "speq_hit_rate": row["hit_rate"],
            "speq_mean_k": row["mean_k"], "speq_acceptance_rate": row["acceptance_rate"],
            "speq_tokens_per_cycle": row["tokens_per_cycle"],
        })
    return rows


@dataclass
class MapResult:
    table: pd.DataFrame
    summary: str
    wall_s: float
    own: dict[str, Any] | None
    points: pd.DataFrame | None = None  # measured points with the map's value at each (experiment.map.measured)


def machine() -> str:
    """This CPU, for the summary (the map's run time depends on it)."""
    import os
    import platform

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} logical cores ({platform.system()} {platform.machine()})"


def run_map(base: Sequence[str], spec: MapSpec, out_dir: str | Path, command: str = "") -> MapResult:
    """Every cell of the grid (``spec.workers`` processes), then the measured points (if any), the
    table, figure and summary. Every input is checked before the first run."""
    from sim.experiments.map_measured import measured_points, point_cells, run_points
    from sim.experiments.search import compose_sim

    t0 = time.perf_counter()
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    own = own_point(spec)
    slot_budgets = any(isinstance(b, SlotBudget) for bs in spec.budgets.values() for b in bs.values())
    memory = budget_memory(base, spec) if slot_budgets or spec.measured else {}
    points, others = measured_points(spec) if spec.measured else ([], [])
    pcells = point_cells(spec, points, memory)
    cells = spec.cells({k: v["memory_gib"] for k, v in memory.items()})
    cfgs = [compose_sim([*base, *spec.overrides(c)]) for c in cells]
    args = [(cfg, c, spec.agreement, spec.acceptance) for cfg, c in zip(cfgs, cells)]
    if spec.workers > 1:
        from joblib import Parallel, delayed

        parts = Parallel(n_jobs=spec.workers)(delayed(run_cell)(*a) for a in args)
    else:
        parts = [run_cell(*a) for a in args]
    df = pd.DataFrame([r for p in parts for r in p])
    keys = ["model", "link", "budget", "agreement", "host_per_layer_ms", "acceptance", "seed"]
    df = df.sort_values(keys, kind="stable").reset_index(drop=True)
    pts = run_points(base, spec, pcells) if spec.measured else None
    wall = time.perf_counter() - t0
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    from traces.atomic import atomic_write

    atomic_write(out / "speculation_map.parquet", lambda tmp: df.to_parquet(tmp, index=False))
    atomic_write(out / "speculation_map.csv", lambda tmp: df.to_csv(tmp, index=False))
    if pts is not None:
        atomic_write(out / "speculation_map_measured.parquet", lambda tmp: pts.to_parquet(tmp, index=False))
    summary = summarize(df, spec, own, wall, pts, others,
                        run=f"{command or 'run_map'}; {started}; {machine()}")
    atomic_write(out / "speculation_map.md", lambda tmp: Path(tmp).write_text(summary))
    figure(df, spec, own, out / "speculation_map.png", pts)
    return MapResult(df, summary, wall, own, pts)


# ------------------------------------------------------------------ the project's own model
def own_point(spec: MapSpec) -> dict[str, Any] | None:
    """Acceptance and set agreement measured on the captured trace, and the map model nearest its
    routing shape (log distance over experts, top-k and MoE layers)."""
    if not spec.own_trace:
        return None
    from traces import read_trace, stats
    from traces.presets import shape_for

    path = Path(spec.own_trace)
    if not path.is_absolute():
        path = Path(__file__).resolve().parents[2] / path
    tr = read_trace(path)
    if tr.draft is None:
        raise SimError(f"experiment.map.own_trace: {path} has no draft columns")
    s = tr.shape

    def dist(m: str) -> float:
        name, layers = model_entry(m)
        o = shape_for(name) if layers is None else model_spec(m)
        return sum(abs(math.log(a / b)) for a, b in ((s.num_experts, o.num_experts), (s.top_k, o.top_k),
                                                      (s.num_moe_layers, o.num_moe_layers)))

    nearest = min(spec.models, key=dist)
    agree, _ = stats.draft_agreement(tr)
    return {"model": s.name, "trace": str(spec.own_trace), "acceptance": stats.acceptance(tr),
            "agreement": agree.overall, "nearest": nearest,
            "agreement_row": min(spec.agreement, key=lambda a: abs(a - agree.overall))}


# ------------------------------------------------------------------ reading the map
def crossing(sub: pd.DataFrame) -> float:
    """The smallest acceptance from which the speed-up stays >= 1 (NaN: never; the grid's lowest
    acceptance when it pays everywhere), on the rows of one (facet, host overhead)."""
    sub = sub.sort_values("acceptance")
    ok = sub["speedup"].to_numpy() >= 1
    if not ok.any():
        return math.nan
    idx = len(ok) - int(np.argmin(ok[::-1])) if not ok.all() else 0
    return float(sub["acceptance"].iloc[idx]) if idx < len(ok) else math.nan


def summarize(df: pd.DataFrame, spec: MapSpec, own: dict[str, Any] | None, wall: float,
              points: pd.DataFrame | None = None, others: Sequence[str] = (), run: str = "") -> str:
    lines = ["# Speculation map: speed-up of MoE-SpeQ (governor) over on-demand LRU at the same GPU memory", "",
             *([f"Run: {run}.", ""] if run else []),
             f"{len(df)} points, {df['status'].eq('ok').sum()} ok; run time {wall:.1f} s "
             f"({spec.workers} worker(s)); grid: {len(spec.models)} models x {len(spec.links)} links x budgets "
             f"x {len(spec.agreement)} agreements x {len(spec.host_per_layer_ms)} host overheads x "
             f"{len(spec.acceptance)} acceptances; {spec.requests} request(s) x {spec.decode_tokens} decode tokens, "
             f"seeds {list(spec.seeds)}; the draft's host overhead {spec.draft_host_per_layer_ms:g} ms per layer.", "",
             "Per facet and host overhead y (ms per layer): the acceptance from which speculation pays "
             "(speed-up >= 1; '-' = nowhere on the grid) and the best speed-up on the row.", ""]
    ok = df[df["status"] == "ok"]
    ys = sorted(ok["host_per_layer_ms"].unique())
    head = "| model | budget | agreement | link | " + " | ".join(f"y={y:g}" for y in ys) + " | best |"
    lines += [head, "|" + "---|" * (5 + len(ys))]
    for (m, b, a, link), f in ok.groupby(["model", "budget", "agreement", "link"], sort=False):
        cells = []
        for y in ys:
            sub = f[f["host_per_layer_ms"] == y]
            c = crossing(sub)
            cells.append(f"{c:.2f} ({sub['speedup'].max():.2f}x)" if not math.isnan(c) else f"- ({sub['speedup'].max():.2f}x)")
        lines.append(f"| {m} | {b} | {a:g} | {link} | " + " | ".join(cells) + f" | {f['speedup'].max():.2f}x |")
    if own is not None:
        lines += ["", f"The project's own model ({own['model']}, {own['trace']}): acceptance {own['acceptance']:.3f}, "
                      f"draft set agreement {own['agreement']:.3f}; placed in the facets of the preset nearest its "
                      f"shape ({own['nearest']}), agreement row {own['agreement_row']:g}, at y = 0 (its host "
                      "overhead is not measured here)."]
    if points is not None:
        from sim.experiments.map_measured import points_md

        lines += points_md(points, spec, list(others))
    return "\n".join(lines) + "\n"


def facet_name(model: str, budget: str, gib: float, agreement: float) -> str:
    return f"{model} · {budget} {gib:.4g} GiB · agreement {agreement:g}"


def figure(df: pd.DataFrame, spec: MapSpec, own: dict[str, Any] | None, path: Path,
           points: pd.DataFrame | None = None) -> None:
    """Filled contours of the speed-up per facet, the speed-up = 1 contour in black; measured
    points as markers coloured by their measured speed-up on the same scale."""
    import warnings

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import seaborn as sns
    from matplotlib.colors import TwoSlopeNorm

    ok = df[df["status"] == "ok"].copy()
    if ok.empty:
        return
    ok["facet"] = [facet_name(m, b, g, a) for m, b, g, a in zip(ok["model"], ok["budget"], ok["memory_gib"], ok["agreement"])]
    mean = ok.groupby(["facet", "link", "host_per_layer_ms", "acceptance"], sort=False)["speedup"].mean().reset_index()
    vmax = max(2.0, float(np.nanmax(mean["speedup"])))
    if points is not None and not points.empty:
        vmax = max(vmax, float(np.nanmax(points["speedup_measured"].to_numpy(float))))
    levels = np.unique(np.concatenate([np.linspace(0, 1, 6), np.linspace(1, vmax, 6)]))
    norm = TwoSlopeNorm(vmin=0.0, vcenter=1.0, vmax=vmax)  # white at 1x: red loses, blue pays
    row_order = list(dict.fromkeys(ok.sort_values(["model", "budget", "agreement"])["facet"]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # tight_layout and a tall grid
        if len(spec.links) == 1:  # one link (a measured card): the facets wrap two a row
            g = sns.FacetGrid(mean, col="facet", col_wrap=min(2, len(row_order)), col_order=row_order,
                              height=2.6, aspect=1.3, sharex=True, sharey=True)
        else:
            g = sns.FacetGrid(mean, row="facet", col="link", row_order=row_order, col_order=list(spec.links),
                              height=2.4, aspect=1.3, margin_titles=False, sharex=True, sharey=True)
    link1 = next(iter(spec.links))
    axes = {(k, link1) if isinstance(k, str) else k: ax for k, ax in g.axes_dict.items()}  # (facet, link) -> ax

    def draw(data: pd.DataFrame, **_: Any) -> None:
        ax = plt.gca()
        piv = data.pivot_table(index="host_per_layer_ms", columns="acceptance", values="speedup")
        if piv.shape[0] < 2 or piv.shape[1] < 2:
            ax.scatter(data["acceptance"], data["host_per_layer_ms"], c=data["speedup"], cmap="RdBu", norm=norm)
            return
        X, Y = np.meshgrid(piv.columns.to_numpy(float), piv.index.to_numpy(float))
        ax.contourf(X, Y, piv.to_numpy(), levels=levels, cmap="RdBu", norm=norm)
        if np.nanmin(piv.to_numpy()) < 1 < np.nanmax(piv.to_numpy()):
            cs = ax.contour(X, Y, piv.to_numpy(), levels=[1.0], colors="black", linewidths=2)
            ax.clabel(cs, fmt={1.0: "1x"}, fontsize=7)

    g.map_dataframe(draw)
    if own is not None:
        for (facet, link), ax in axes.items():
            if facet.startswith(own["nearest"] + " ") and facet.endswith(f"agreement {own['agreement_row']:g}"):
                ax.plot([own["acceptance"]], [0.0], marker="*", markersize=12, color="gold", markeredgecolor="black",
                        clip_on=False, zorder=5)
                ax.annotate(f"{own['model']} (captured;\nshape ~ {own['nearest']})", (own["acceptance"], 0.0),
                            xytext=(-60, 12), textcoords="offset points", fontsize=6)
    if points is not None and not points.empty:
        from sim.experiments.map_measured import draw

        where = [facet_name(m, b, g, a) for m, b, g, a in
                 zip(points["model"], points["budget"], points["memory_gib"], points["agreement_row"])]
        for (facet, link), pts in points.assign(facet=where).groupby(["facet", "link"], sort=False):
            if (facet, link) in axes:
                draw(axes[(facet, link)], pts, norm)
    g.set_axis_labels("draft acceptance", "host overhead per layer (ms)")
    if len(spec.links) == 1:
        for facet, ax in g.axes_dict.items():
            ax.set_title(f"{facet} · {link1}".replace(" · agreement", "\nagreement"), size=6)
    else:
        g.set_titles(template="{row_name} · {col_name}", size=6)
    fig = g.figure
    fig.subplots_adjust(right=0.86, top=1 - 0.75 / fig.get_figheight(), hspace=0.4)
    cax = fig.add_axes([0.89, 0.25, 0.015, 0.5])
    fig.colorbar(plt.cm.ScalarMappable(cmap="RdBu", norm=norm), cax=cax,
                 label="speed-up over LRU at the same memory")
    fig.suptitle("Where speculation pays: MoE-SpeQ / on-demand LRU at the same GPU memory (black: speed-up = 1)",
                 y=1 - 0.1 / fig.get_figheight(), fontsize=8)
    from traces.atomic import atomic_write

    atomic_write(path, lambda tmp: g.figure.savefig(tmp, dpi=110, bbox_inches="tight", format="png"))
    plt.close(g.figure)
