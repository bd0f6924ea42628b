"""The raw observations of one run, simulated or measured: what ``sim.metrics.results_row`` reads.

Its own module so that the runtime builds one without importing the simulator's SimPy engine."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class RunLog:
    """Raw observations of one run; sim/metrics.py turns them into the results row."""

    request_start: list[float] = field(default_factory=list)
    token_times: list[list[float]] = field(default_factory=list)  # per request: emission times
    run_time: float = 0.0
    hits: int = 0
    late: int = 0
    misses: int = 0
    late_wait: float = 0.0
    stall: float = 0.0
    stall_per_layer: np.ndarray | None = None
    coverage: list[float] = field(default_factory=list)  # per step
    # per decode/verify layer-step, summed (docs/metrics.md): share of the layer's experts ready /
    # requested (resident, loading or queued as a prefetch) when its routing is known
    coverage_ready_sum: float = 0.0
    coverage_requested_sum: float = 0.0
    coverage_layers: int = 0
    prefill_copies: int = 0  # copies issued during prefill passes
    bytes_moved: int = 0
    copies: int = 0
    link_busy: float = 0.0
    useful_prefetch_bytes: int = 0
    wasted_prefetch_bytes: int = 0
    evictions: int = 0
    compute_spans: list[tuple[float, float, str]] | None = None
    copy_spans: list[tuple[float, float, int, bool]] | None = None
    occupancy: list[tuple[float, int]] | None = None
    cycles: list[dict] = field(default_factory=list)  # speculative: one record per draft/verify cycle
