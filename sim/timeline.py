"""Chrome/Perfetto trace-event JSON of a run: the compute stream, each link, cache occupancy.

The runtime writes the same format from CUDA event timestamps, so the two open side by side in
https://ui.perfetto.dev or chrome://tracing.
"""

from __future__ import annotations

from typing import Iterable

PID_GPU, PID_LINK, PID_CACHE = 1, 2, 3


def _meta(pid: int, name: str, tid: int | None = None, tname: str | None = None) -> list[dict]:
    ev = [{"ph": "M", "pid": pid, "name": "process_name", "args": {"name": name}}]
    if tid is not None:
        ev.append({"ph": "M", "pid": pid, "tid": tid, "name": "thread_name", "args": {"name": tname}})
    return ev


def chrome_trace(
    compute: Iterable[tuple[float, float, str]],
    copies: Iterable[tuple[float, float, int, bool]],
    occupancy: Iterable[tuple[float, int]],
    *,
    num_experts: int,
    moe_layers: tuple[int, ...],
    source: str = "sim",
    link_name: str = "PCIe H2D",
) -> dict:
    """Trace events (times in seconds in, microseconds out)."""
    us = 1e6
    ev: list[dict] = []
    ev += _meta(PID_GPU, f"GPU ({source})", 0, "compute stream")
    ev += _meta(PID_LINK, f"{link_name} ({source})", 0, "copy stream")
    ev += _meta(PID_CACHE, f"expert cache ({source})")
    for t0, t1, name in compute:
        cat = "stall" if name.startswith("stall") else "compute"
        ev.append({"ph": "X", "pid": PID_GPU, "tid": 0, "name": name, "cat": cat, "ts": t0 * us, "dur": (t1 - t0) * us})
    for t0, t1, key, is_prefetch in copies:
        m, e = divmod(int(key), num_experts)
        ev.append({
            "ph": "X", "pid": PID_LINK, "tid": 0, "ts": t0 * us, "dur": (t1 - t0) * us,
            "name": f"L{moe_layers[m]}.E{e}", "cat": "prefetch" if is_prefetch else "demand",
        })
    for t, n in occupancy:
        ev.append({"ph": "C", "pid": PID_CACHE, "name": "resident slots", "ts": t * us, "args": {"slots": n}})
    return {"traceEvents": ev, "displayTimeUnit": "ms"}
