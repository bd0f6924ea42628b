"""The hardware spec: GPU compute and memory, and the host link.

Units: ``memory_gb`` and ``workspace_gb`` in GB (1e9 bytes; ``memory_gib`` in GiB, 2^30 bytes, gives the
budget instead when set), ``flops_bf16`` in FLOP/s and
``hbm_bandwidth`` in bytes/s (both *achieved*, not datasheet peaks), link bandwidths in GB/s
(1e9 bytes/s), times in seconds.

Host link model. Each direction and host-memory kind has a plateau bandwidth (``h2d_gbps``,
``d2h_gbps`` for pinned memory, ``pageable_h2d_gbps``, ``pageable_d2h_gbps``) and each memory kind
a *normalised* bandwidth-vs-size curve (``pinned_curve``, ``pageable_curve``: [bytes, fraction of
the plateau] points, interpolated linearly in log(size), flat beyond the ends). The bandwidth of a
copy of n bytes is plateau * curve(n), capped at ``link_pace_gbps`` when copies are paced. Because
the curve is normalised, overriding a scalar on the command line (``hardware.h2d_gbps=25``) scales
the whole curve. A copy takes ``copy_latency_s + n / bandwidth(n)`` on the link; issuing it costs
the host ``copy_issue_overhead_s``; ``decision_delay_s`` is the time from a layer's routing being
known on the GPU to the host acting on it.

Presets live in conf/hardware/<id>.yaml; measured profiles (same schema, written by
``python -m runtime.profile``; docs/profile.md) in conf/hardware/measured/NAME.yaml, optionally
pointing at a Parquet table of measured times (``profile_table``) that
``sim.costmodel.cost_model_for`` uses in place of the roofline. A measured profile may also carry
the host overhead of each decode path,

    engine: {graphed: {host_per_layer_s: ..., draft_host_per_layer_s: ..., host_per_launch_s: ...,
                       host_per_expert_s: ...}, eager: {...}}

which ``engine=graphed|eager`` takes in place of its placeholders (``engine_values``), and a
``provenance`` mapping (card, driver, torch version, date, command, notes) that nothing computes with.
"""

from __future__ import annotations

import math
from bisect import bisect_right
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from sim.errors import SimError
from sim.presets import conf_dir, hydra_schema, load_preset, setting, spec_from_dict, to_plain

HOST_MEMORY = ("pinned", "pageable")
ENGINE_PATHS = ("graphed", "eager")  # decode paths a measured profile may carry host overheads for
ENGINE_KEYS = ("host_per_layer_s", "draft_host_per_layer_s", "host_per_launch_s", "host_per_expert_s")
# keys a profile may leave out (profiles written before the key existed): they read as 0
ENGINE_OPTIONAL = ("host_per_expert_s",)
GB = 1e9
GIB = 2**30


def _curve(points: Any, where: str) -> tuple[tuple[float, float], ...]:
    """Validate a [[bytes, fraction], ...] curve: sizes > 0 strictly increasing, 0 < fraction <= 1."""
    try:
        pts = tuple((float(p[0]), float(p[1])) for p in points)
        if any(len(p) != 2 for p in points):
            raise ValueError
    except (TypeError, ValueError, IndexError):
        raise SimError(f"{where}: must be a list of [bytes, fraction] pairs, got {points!r}") from None
    if not pts:
        raise SimError(f"{where}: needs at least one [bytes, fraction] point")
    for (b, f) in pts:
        if not b > 0 or not math.isfinite(b):
            raise SimError(f"{where}: sizes must be > 0 bytes, got {b}")
        if not 0 < f <= 1:
            raise SimError(f"{where}: fractions of the plateau must be in (0, 1], got {f}")
    if any(b2 <= b1 for (b1, _), (b2, _) in zip(pts, pts[1:])):
        raise SimError(f"{where}: sizes must be strictly increasing, got {[p[0] for p in pts]}")
    return pts


def _engine(d: Any, where: str) -> tuple[tuple[str, tuple[tuple[str, float], ...]], ...]:
    """Validate ``engine: {path: {key: seconds}}`` into a hashable tuple form."""
    if not isinstance(d, Mapping):
        raise SimError(f"{where}: engine must be a mapping {{graphed|eager: {{{', '.join(ENGINE_KEYS)}}}}}, got {d!r}")
    out = []
    for path, vals in d.items():
        if path not in ENGINE_PATHS:
            raise SimError(f"{where}: engine.{path}: unknown decode path; known: {', '.join(ENGINE_PATHS)}")
        if not isinstance(vals, Mapping):
            raise SimError(f"{where}: engine.{path} must be a mapping of {', '.join(ENGINE_KEYS)}, got {vals!r}")
        unknown = sorted(set(vals) - set(ENGINE_KEYS))
        if unknown:
            raise SimError(f"{where}: engine.{path}: unknown key(s) {unknown}; known: {', '.join(ENGINE_KEYS)}")
        missing = [k for k in ENGINE_KEYS if k not in vals and k not in ENGINE_OPTIONAL]
        if missing:
            raise SimError(f"{where}: engine.{path}: missing key(s) {missing}")
        items = []
        for k in ENGINE_KEYS:
            v = vals.get(k, 0.0)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0 or not math.isfinite(v):
                raise SimError(f"{where}: engine.{path}.{k} must be a number >= 0 (seconds), got {v!r}")
            items.append((k, float(v)))
        out.append((str(path), tuple(items)))
    return tuple(out)


def curve_fraction(curve: Sequence[tuple[float, float]], nbytes: float) -> float:
    """The curve's fraction at ``nbytes``: linear in log(size) between points, flat outside."""
    if nbytes <= curve[0][0]:
        return curve[0][1]
    if nbytes >= curve[-1][0]:
        return curve[-1][1]
    i = bisect_right([p[0] for p in curve], nbytes)
    (b0, f0), (b1, f1) = curve[i - 1], curve[i]
    t = (math.log(nbytes) - math.log(b0)) / (math.log(b1) - math.log(b0))
    return f0 + t * (f1 - f0)


@dataclass(frozen=True)
class HardwareSpec:
    """One GPU and its host link (see the module docstring for units and the link model)."""

    name: str = setting(help="the preset's id")
    memory_gb: float = setting(help="the budget: GPU memory in GB (1e9 bytes)")
    flops_bf16: float = setting(help="achieved dense bf16 FLOP/s (not the datasheet peak)")
    hbm_bandwidth: float = setting(help="achieved GPU memory bandwidth, bytes/s")
    launch_overhead_s: float = setting(help="fixed cost per kernel on the GPU stream, s")
    workspace_gb: float = setting(help="CUDA context, activations, library workspaces, allocator slack, GB")
    h2d_gbps: float = setting(help="pinned host -> device plateau, GB/s (overriding it scales its whole curve)")
    d2h_gbps: float = setting(help="pinned device -> host plateau, GB/s")
    pageable_h2d_gbps: float = setting(help="pageable host -> device plateau, GB/s")
    pageable_d2h_gbps: float = setting(help="pageable device -> host plateau, GB/s")
    pinned_curve: tuple[tuple[float, float], ...] = setting(
        ((1.0, 1.0),), "pinned bandwidth vs copy size: [bytes, fraction of the plateau] points")
    pageable_curve: tuple[tuple[float, float], ...] = setting(
        ((1.0, 1.0),), "pageable bandwidth vs copy size: [bytes, fraction of the plateau] points")
    host_memory: str = setting("pinned", "pinned | pageable: the host memory the experts are copied from (pageable copies "
                                         "are slower and hold the host until they land)")
    link_pace_gbps: Optional[float] = setting(None, "copies paced to at most this bandwidth, GB/s; null: unpaced")
    copy_latency_s: float = setting(0.0, "fixed link time per copy, s")
    copy_issue_overhead_s: float = setting(0.0, "host time to issue one copy, s")
    copy_engines: int = setting(1, "copy engines per direction")
    copies_in_flight: int = setting(4, "issued but unfinished copies, in total")
    decision_delay_s: float = setting(0.0, "routing known on the GPU -> host decision, s")
    profile_table: Optional[str] = setting(None, "measured profiles: Parquet table of measured times")
    memory_gib: Optional[float] = setting(
        None, "the budget in GiB (2^30 bytes) instead of memory_gb (GB, 1e9 bytes); when set it wins")
    engine: Any = setting(None, "measured profiles: host overhead per decode path, "
                                "{graphed|eager: {host_per_layer_s, draft_host_per_layer_s, host_per_launch_s, "
                                "host_per_expert_s (optional, 0)}} "
                                "(docs/engine.md)")
    provenance: Any = setting(None, "measured profiles: card, driver, torch, date, command, notes")

    def __post_init__(self) -> None:
        where = f"hardware '{self.name}'"
        if self.memory_gib is not None:
            v = self.memory_gib
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0 or not math.isfinite(v):
                raise SimError(f"{where}: field 'memory_gib' must be a number > 0 or null, got {v!r}")
            object.__setattr__(self, "memory_gib", float(v))
            object.__setattr__(self, "memory_gb", float(v) * GIB / GB)
        for f in ("memory_gb", "flops_bf16", "hbm_bandwidth", "h2d_gbps", "d2h_gbps",
                  "pageable_h2d_gbps", "pageable_d2h_gbps"):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0 or not math.isfinite(v):
                raise SimError(f"{where}: field '{f}' must be a number > 0, got {v!r}")
            object.__setattr__(self, f, float(v))
        for f in ("launch_overhead_s", "workspace_gb", "copy_latency_s", "copy_issue_overhead_s", "decision_delay_s"):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0 or not math.isfinite(v):
                raise SimError(f"{where}: field '{f}' must be a number >= 0, got {v!r}")
            object.__setattr__(self, f, float(v))
        for f in ("copy_engines", "copies_in_flight"):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise SimError(f"{where}: field '{f}' must be an integer >= 1, got {v!r}")
        if self.host_memory not in HOST_MEMORY:
            raise SimError(f"{where}: host_memory must be one of {list(HOST_MEMORY)}, got {self.host_memory!r}")
        if self.link_pace_gbps is not None:
            v = self.link_pace_gbps
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
                raise SimError(f"{where}: link_pace_gbps must be a number > 0 or null, got {v!r}")
            object.__setattr__(self, "link_pace_gbps", float(v))
        object.__setattr__(self, "pinned_curve", _curve(self.pinned_curve, f"{where}: pinned_curve"))
        object.__setattr__(self, "pageable_curve", _curve(self.pageable_curve, f"{where}: pageable_curve"))
        if self.engine is not None and not isinstance(self.engine, tuple):
            object.__setattr__(self, "engine", _engine(self.engine, where) or None)
        if self.provenance is not None and not isinstance(self.provenance, tuple):
            if not isinstance(self.provenance, Mapping):
                raise SimError(f"{where}: provenance must be a mapping, got {self.provenance!r}")
            object.__setattr__(self, "provenance", tuple((str(k), str(v)) for k, v in self.provenance.items()) or None)

    # ------------------------------------------------------------------ measured host overheads
    def engine_values(self, path: str) -> dict[str, float] | None:
        """The measured host overheads of decode path ``path`` (graphed | eager), or None when this
        spec carries none for it (presets: the engine group's placeholders apply)."""
        for p, vals in self.engine or ():
            if p == path:
                return dict(vals)
        return None

    # ------------------------------------------------------------------ budget
    @property
    def memory_bytes(self) -> int:
        return int(round(self.memory_gb * GB))

    @property
    def workspace_bytes(self) -> int:
        return int(round(self.workspace_gb * GB))

    # ------------------------------------------------------------------ link
    def _bandwidth(self, nbytes: float, pinned_gbps: float, pageable_gbps: float) -> float:
        if self.host_memory == "pinned":
            bw = pinned_gbps * GB * curve_fraction(self.pinned_curve, nbytes)
        else:
            bw = pageable_gbps * GB * curve_fraction(self.pageable_curve, nbytes)
        if self.link_pace_gbps is not None:
            bw = min(bw, self.link_pace_gbps * GB)
        return bw

    def h2d_bandwidth(self, nbytes: float) -> float:
        """Host-to-device bandwidth (bytes/s) of one copy of ``nbytes``, for this spec's host memory
        kind, capped by ``link_pace_gbps``."""
        return self._bandwidth(nbytes, self.h2d_gbps, self.pageable_h2d_gbps)

    def d2h_bandwidth(self, nbytes: float) -> float:
        """Device-to-host bandwidth (bytes/s) of one copy of ``nbytes`` (same curves as h2d)."""
        return self._bandwidth(nbytes, self.d2h_gbps, self.pageable_d2h_gbps)

    def h2d_time(self, nbytes: float) -> float:
        """Link time of one host-to-device copy: per-copy latency + bytes / bandwidth(bytes)."""
        return self.copy_latency_s + (nbytes / self.h2d_bandwidth(nbytes) if nbytes > 0 else 0.0)

    def d2h_time(self, nbytes: float) -> float:
        return self.copy_latency_s + (nbytes / self.d2h_bandwidth(nbytes) if nbytes > 0 else 0.0)

    # ------------------------------------------------------------------ measured profile
    def profile_table_path(self, base: Path | None = None) -> Path | None:
        """The measured table as a path: absolute as given, a relative one against ``base``
        (default: conf/hardware/measured/, where the profiler writes)."""
        if not self.profile_table:
            return None
        p = Path(self.profile_table)
        if p.is_absolute():
            return p
        if base is None:
            base = conf_dir() / "hardware" / "measured"
        return Path(base) / p

    # ------------------------------------------------------------------ construction
    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["pinned_curve"] = [list(p) for p in self.pinned_curve]
        d["pageable_curve"] = [list(p) for p in self.pageable_curve]
        d["engine"] = None if self.engine is None else {p: dict(v) for p, v in self.engine}
        d["provenance"] = None if self.provenance is None else dict(self.provenance)
        return d

    def replace(self, **changes: Any) -> "HardwareSpec":
        d = self.to_dict()
        unknown = sorted(set(changes) - set(d))
        if unknown:
            raise SimError(f"hardware '{self.name}': unknown field(s) {unknown}")
        d.update(changes)
        return HardwareSpec(**d)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str = "HardwareSpec") -> "HardwareSpec":
        return spec_from_dict(cls, d, where)

    @classmethod
    def from_cfg(cls, cfg: Any) -> "HardwareSpec":
        """Spec from a composed ``hardware`` group node (or a plain mapping with the same keys)."""
        d = to_plain(cfg)
        return cls.from_dict(d, where=f"hardware '{d.get('name', '?')}'")

    @classmethod
    def from_preset(cls, hw_id: str, root: Path | None = None) -> "HardwareSpec":
        """Spec of conf/hardware/<hw_id>.yaml without Hydra; ``measured/NAME`` loads a measured
        profile, whose relative ``profile_table`` is resolved against the YAML file's folder."""
        cfg = load_preset("hardware", hw_id, HardwareConf, root)
        try:
            spec = cls.from_cfg(cfg)
        except SimError as e:
            path = (Path(root) if root is not None else conf_dir()) / "hardware" / f"{hw_id}.yaml"
            raise SimError(f"{path}: {e}") from None
        if spec.profile_table and not Path(spec.profile_table).is_absolute():
            folder = (Path(root) if root is not None else conf_dir()) / "hardware" / Path(hw_id).parent
            spec = spec.replace(profile_table=str((folder / spec.profile_table).resolve()))
        return spec


#: the ``hardware`` group's schema: HardwareSpec's fields
HardwareConf = hydra_schema(HardwareSpec, "HardwareConf")
