"""Where a speculative run's draft comes from: the trace's draft columns (recorded, synthetic or a stand-in).

Rule (docs/speculation.md): with t the last emitted token's position, the draft processes
positions t..t+k-1 (its ELB rows are the ``draft`` ids of those rows) and proposes t+1..t+k; the
verify pass processes t..t+k and needs the target's ``expert_ids`` of those rows; the accepted
length a is the number of leading true ``draft_match`` flags among rows t..t+k-1; the cycle emits
a + 1 tokens and the next one starts at t + a + 1. Positions past the first mismatch are drafted
and verified but not emitted: the trace's routing of those rows stands in for the routing of the
wrong tokens (an approximation). With k = 0 a cycle is one autoregressive step.
"""

from __future__ import annotations

import numpy as np

from sim.errors import SimError
from traces import Trace


class DraftSource:
    """ELB rows and acceptance per token position, from the trace's draft columns (a trace without
    them gets a stand-in first: ``sim.run.speculative_trace``, the generator's draft model)."""

    def __init__(self, trace: Trace) -> None:
        if trace.draft is None or trace.draft_match is None:
            raise SimError("speculative decoding needs a trace with draft columns (draft, draft_match)")
        self.trace = trace
        E, M = trace.shape.num_experts, trace.shape.num_moe_layers
        draft, match = trace.draft, trace.draft_match
        offsets = (np.arange(M, dtype=np.int64) * E)[None, None, :, None]
        keys = np.where(draft >= 0, draft.astype(np.int64) + offsets, -1)
        self._rows = keys.tolist()  # [r][t][m] -> ids as keys
        self._match = match.tolist()

    def elb_row(self, r: int, t: int) -> tuple[tuple[int, ...], ...]:
        """Keys the draft's router picks at each MoE layer for token t of request r."""
        return tuple(tuple(x for x in ids if x >= 0) for ids in self._rows[r][t])

    def accepted(self, r: int, t: int, k: int) -> int:
        """Leading draft tokens accepted among positions t..t+k-1."""
        flags = self._match[r]
        a = 0
        while a < k and flags[t + a]:
            a += 1
        return a
