"""What the host prices a speculative cycle with: the draft's and the verify pass's times.

The host controller (sim/host.py) asks one of these for ``t_draft(k)`` and ``t_verify(n)`` when it
builds the governor's ``CycleCosts``; the link terms (time already committed on the copy stream,
the new experts a cycle of length k brings) it computes itself from its own copy stream, the same
way in the simulator and in the runtime.

- ``ModelledCosts``: the cost model's prices (sim.schedule: a draft token's time at its context
  length, a verify pass before its routing is known). The simulator's host uses it, and so does
  the runtime on the virtual-time backend, where compute takes exactly these times.
- ``MeasuredCosts``: measured draft-token and verify-pass times (an EMA per verify size), as the
  runtime on real hardware knows them.
"""

from __future__ import annotations

from typing import Any


class CycleCostSource:
    """The interface: ``at`` names the cycle about to be priced, ``t_draft``/``t_verify`` price it,
    ``observe`` takes what a cycle measured. ``expert_transfer_s`` is one expert's copy time and
    ``overhead_s`` the fixed per-cycle link overhead (copy latency + the host's decision delay)."""

    expert_transfer_s: float
    overhead_s: float

    def at(self, r: int, t: int, L: int) -> None:
        """The next cycle: request ``r`` (``L`` tokens), its last emitted token at position ``t``."""

    def t_draft(self, k: int) -> float:
        raise NotImplementedError

    def t_verify(self, n: int) -> float:
        raise NotImplementedError

    def observe(self, k: int, draft_s: float, verify_s: float) -> None:
        """A cycle of draft length ``k`` took ``draft_s`` drafting and ``verify_s`` verifying."""


class ModelledCosts(CycleCostSource):
    """The cost model's prices of the cycle at (r, t): ``t_draft(k)`` sums the draft's per-token
    times over positions t..t+k-1 (never past the request's last token), ``t_verify(n)`` prices a
    pass over t..t+n-1 (a pass longer than the request, the TTFT cap's offline range, extends the
    context past the last position, one key per token). Memoised per cycle."""

    def __init__(self, schedule: Any, decision_delay_s: float, expert_transfer_s: float,
                 copy_latency_s: float = 0.0) -> None:
        self.schedule, self.dd = schedule, float(decision_delay_s)
        self.expert_transfer_s = float(expert_transfer_s)
        self.overhead_s = float(copy_latency_s) + self.dd
        self._position = schedule.trace.position
        self.r = self.t = self.L = 0
        self._memo: dict[int, float] = {}

    def at(self, r: int, t: int, L: int) -> None:
        self.r, self.t, self.L = r, t, L
        self._memo = {}

    def t_draft(self, k: int) -> float:
        memo = self._memo
        if k not in memo:
            r, t, dt = self.r, self.t, self.schedule.draft_token_time
            memo[k] = sum(dt(r, t + i) for i in range(min(k, self.L - 1 - t)))
        return memo[k]

    def t_verify(self, n: int) -> float:
        r, t, L = self.r, self.t, self.L
        kv = int(self._position[r, min(t + n, L) - 1]) + 1 + max(0, t + n - L)
        return self.schedule.verify_estimate(n, kv, self.dd)


class MeasuredCosts(CycleCostSource):
    """Measured draft-token and verify-pass times (an EMA per verify size, weight ``alpha``) and
    the per-expert transfer time measured at the session's start; nothing is known before the
    first cycle (t_draft = t_verify = 0 then)."""

    def __init__(self, expert_transfer_s: float, copy_latency_s: float = 0.0, alpha: float = 0.3) -> None:
        self.expert_transfer_s = float(expert_transfer_s)
        self.overhead_s = float(copy_latency_s)
        self.alpha = float(alpha)
        self.draft_s: float | None = None  # per draft token
        self.verify: dict[int, float] = {}

    def _ema(self, old: float | None, new: float) -> float:
        return new if old is None else (1 - self.alpha) * old + self.alpha * new

    def observe(self, k: int, draft_s: float, verify_s: float) -> None:
        if k:
            self.draft_s = self._ema(self.draft_s, draft_s / k)
        self.verify[k + 1] = self._ema(self.verify.get(k + 1), verify_s)

    def t_draft(self, k: int) -> float:
        return k * (self.draft_s if self.draft_s is not None else 0.0)

    def t_verify(self, n: int) -> float:
        """Measured at n when seen; else linear through the two nearest measured sizes (one: flat)."""
        if n in self.verify:
            return self.verify[n]
        if not self.verify:
            return 0.0
        xs = sorted(self.verify, key=lambda x: (abs(x - n), x))[:2]
        if len(xs) == 1:
            return self.verify[xs[0]]
        (a, b) = sorted(xs)
        slope = (self.verify[b] - self.verify[a]) / (b - a)
        return max(0.0, self.verify[a] + slope * (n - a))
