"""Speculation governors: choose the draft length k of each draft/verify cycle.

A governor is a plain object (no clock, no SimPy, no torch) so the simulator's decode driver and
the GPU runtime host the very same object. The host calls, once per cycle::

    d = gov.decide(costs)          # CycleCosts: what the host knows before drafting
    ... draft d.k tokens, verify d.k + 1 positions, accept a prefix of a tokens ...
    gov.observe(k, a, cycle_s)     # k actually drafted, a = leading matches (0..k), measured time

Two governors are registered in ``GOVERNORS``:

- ``fixed``: always ``k`` (k = 0 is autoregressive decoding). It still tracks acceptance and
  predicts its cycle time, so a fixed-k sweep validates the cycle model.
- ``roofline``: MoE-SpeQ's Amortization Roofline governor (arXiv 2511.14102, Sec. 3.2),
  k* = argmax_{k in [k_min, min(k_max, k_SLO)]} Θ(k), Θ(k) = k_accept(k) / T_cycle(k), with

  - k_accept(k) = sum_{i<=k} prod_{j<=i} p_j, p_j = P(draft token j accepted | tokens < j
    accepted), tracked per draft position (see ``AcceptanceTracker``);
  - T_cycle(k) = max(T_draft(k), T_pcie_init) + T_pcie_new(k) + T_verify(k+1),
    T_pcie_new(k) = T_overhead + |E_new(k)| * S_expert / B_link (reading ``pcie_new="exposed"``);
  - k_SLO = the largest k in [k_min, k_max] whose predicted latency fits ``latency_budget_ms``
    (none by default; ``slo="ttft"``: the paper's offline TTFT budget, computed once).

Where the paper is ambiguous the reading is a config field (docs/governor.md explains each):
``objective`` ("accepted" as printed | "emitted": + the target's bonus token), ``pcie_new``
("exposed" as printed | "overlapped": new experts stream while drafting), ``slo`` ("ttft": the
paper's TTFT budget, k_SLO fixed once at the first decision | "cycle": the wait between two
emissions, every cycle | "per_token": the cycle's time shared by its emitted tokens),
``acceptance`` ("per_position" | "shared": one p for every position).

Every decision is logged (``log()``) with both cycle-time readings, so one run says which
reading predicts the observed cycle times better (``cycle_model_error``).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Callable, Mapping, Optional, Sequence

from sim.errors import SimError
from sim.policies.base import Registry
from sim.presets import setting

GOVERNORS = Registry("governor", SimError)

OBJECTIVES = ("accepted", "emitted")
PCIE_NEW = ("exposed", "overlapped")
SLO_KINDS = ("ttft", "cycle", "per_token")
ACCEPTANCE_MODELS = ("per_position", "shared")


# ---------------------------------------------------------------------------- config
@dataclass
class GovernorConf:
    """Schema of the ``governor`` config group (presets: conf/governor/fixed.yaml, roofline.yaml).

    Fields the paper does not report (k range, warm-up, EMA factor, prior) have documented
    defaults here; see docs/governor.md.
    """

    name: str = setting("fixed", "fixed | roofline (GOVERNORS registry)")
    k: int = setting(4, "fixed: the draft length (0 = autoregressive)")
    k_min: int = setting(1, "roofline: lower end of the search range [k_min, k_max]")
    k_max: int = setting(16, "roofline: upper end of the search range")
    latency_budget_ms: Optional[float] = setting(None, "roofline: k_SLO cap on the predicted latency; null = no cap")
    ema_alpha: float = setting(0.2, "weight of the newest observation, in (0, 1]")
    warmup_cycles: int = setting(4, "cycles (with k >= 1) whose plain mean seeds the EMA")
    prior_accept: float = setting(0.8, "p_j before any observation of position j")
    warmup_k: Optional[int] = setting(None, "roofline: k during warm-up; null = the top of the allowed range")
    objective: str = setting("accepted", "accepted (the paper as printed) | emitted (+1: the target's bonus token)")
    pcie_new: str = setting("exposed", "exposed (the paper as printed) | overlapped (new experts stream "
                                       "while drafting)")
    slo: str = setting("ttft", "ttft: T_prefill + T_cycle(k) <= budget, decided once at the first decision (the "
                               "paper's offline TTFT cap) | cycle: T_cycle <= budget every cycle | per_token: "
                               "T_cycle / (k_accept + 1) <= budget every cycle")
    acceptance: str = setting("per_position", "per_position p_j | shared (one p for all positions)")


#: a governor's settings and their defaults (GovernorConf's fields less the name)
_SETTINGS = {k: v for k, v in asdict(GovernorConf()).items() if k != "name"}


def build_governor(cfg: Any) -> "Governor":
    """A governor from a composed ``governor`` node, a ``GovernorConf`` or a plain mapping."""
    if isinstance(cfg, GovernorConf):
        d = asdict(cfg)
    else:
        try:
            from omegaconf import DictConfig, OmegaConf

            if isinstance(cfg, DictConfig):
                cfg = OmegaConf.to_container(cfg, resolve=True)
        except ImportError:  # pragma: no cover - omegaconf is a dependency
            pass
        if not isinstance(cfg, Mapping):
            raise SimError(f"governor config must be a mapping, got {type(cfg).__name__}")
        d = dict(cfg)
    name = d.pop("name", GovernorConf.name)
    return GOVERNORS.create(str(name), **d)


# ---------------------------------------------------------------------------- interface types
@dataclass
class CycleCosts:
    """What the host knows when it picks k for the next cycle (seconds).

    ``t_draft(k)``: drafting k tokens (the governor never asks for k = 0: no draft, 0 s).
    ``t_verify(n)``: one target pass over n positions, all experts resident.
    ``t_pcie_init``: link time already queued or in flight when the cycle starts.
    ``t_overhead``: fixed per-cycle PCIe overhead. ``expert_transfer_s``: S_expert / B_link.
    ``new_experts(k)``: |E_new(k)|, the distinct experts a cycle of draft length k is expected to
    need that are neither resident nor loading (called for k = 0 .. k_max; should not decrease
    with k; a decrease is treated as 0 new experts for that draft token).
    ``k_limit``: optional cap from the host (tokens left in the request, say); k never exceeds it.
    ``expert_bytes``: optional, S_expert, only logged (predicted bytes of the cycle).
    ``t_prefill``: the request's prefill time, for ``slo="ttft"`` (predicted TTFT(k) = t_prefill +
    T_cycle(k) at the first decision).
    """

    t_draft: Callable[[int], float]
    t_verify: Callable[[int], float]
    t_pcie_init: float
    t_overhead: float
    expert_transfer_s: float
    new_experts: Callable[[int], int]
    k_limit: Optional[int] = None
    expert_bytes: int = 0
    t_prefill: float = 0.0


@dataclass
class Prediction:
    """The cycle model at one k (both T_cycle readings, whichever the governor uses)."""

    k: int
    t_draft: float
    t_verify: float
    new_experts: int
    t_pcie_new: float  # T_overhead + |E_new(k)| * S_expert / B_link
    cycle_exposed_s: float
    cycle_overlapped_s: float
    cycle_s: float  # the reading in use
    accept: float  # k_accept(k): expected accepted draft tokens
    throughput: float  # objective / cycle_s (tokens per second)
    slo_latency_s: float  # what the SLO compares with the budget


@dataclass
class Decision:
    """The k for the next cycle and what the model predicts for it."""

    k: int
    predicted_cycle_s: float
    predicted_accept: float
    k_slo: int  # largest k in [k_min, k_max] meeting the budget (k_min if none does, see slo_met)
    phase: str = "ema"  # warmup | ema | fixed
    slo_met: bool = True
    predicted_throughput: float = 0.0
    predicted_cycle_exposed_s: float = 0.0
    predicted_cycle_overlapped_s: float = 0.0
    t_draft: float = 0.0
    t_verify: float = 0.0
    t_pcie_init: float = 0.0
    t_pcie_new: float = 0.0
    new_experts: int = 0
    p: tuple[float, ...] = ()  # acceptance estimates p_1.. at decision time
    candidates: tuple[Prediction, ...] = ()  # every k evaluated


# ---------------------------------------------------------------------------- acceptance
class AcceptanceTracker:
    """Per-position conditional acceptance p_j, j = 1..positions.

    A cycle that drafted k tokens and accepted the leading a observes positions 1..min(a+1, k):
    positions 1..a accepted, position a+1 rejected (if a < k); positions past a+1 are censored
    (not observed, left unchanged). The first ``warmup_cycles`` cycles with k >= 1 are averaged
    (p_j = accepted / observed, the prior where unobserved); after them each observation x moves
    p_j <- (1 - alpha) p_j + alpha x. ``shared=True`` pools every position into one p (updated
    once per observed position, in position order).
    """

    def __init__(self, positions: int, alpha: float, warmup_cycles: int, prior: float, shared: bool = False) -> None:
        self.positions = max(1, int(positions))
        self.alpha = float(alpha)
        self.warmup_cycles = int(warmup_cycles)
        self.prior = float(prior)
        self.shared = bool(shared)
        n = 1 if self.shared else self.positions
        self._acc = [0] * n
        self._obs = [0] * n
        self._p = [self.prior] * n
        self.cycles = 0  # observed cycles with k >= 1

    @property
    def in_warmup(self) -> bool:
        return self.cycles < self.warmup_cycles

    def _grow(self, k: int) -> None:
        if not self.shared and k > len(self._p):
            extra = k - len(self._p)
            self._acc += [0] * extra
            self._obs += [0] * extra
            self._p += [self.prior] * extra
            self.positions = k

    def update(self, k: int, accepted: int) -> None:
        if k <= 0:
            return
        self._grow(k)
        warm = self.in_warmup
        for j in range(min(accepted + 1, k)):
            x = 1 if j < accepted else 0
            i = 0 if self.shared else j
            if warm:
                self._acc[i] += x
                self._obs[i] += 1
            else:
                self._p[i] += self.alpha * (x - self._p[i])
        self.cycles += 1
        if warm and not self.in_warmup:  # warm-up just ended: its means seed the EMA
            self._p = [a / o if o else self.prior for a, o in zip(self._acc, self._obs)]

    def estimates(self, n: int | None = None) -> list[float]:
        """p_1..p_n (default: every tracked position)."""
        n = self.positions if n is None else int(n)
        if self.in_warmup:
            base = [a / o if o else self.prior for a, o in zip(self._acc, self._obs)]
        else:
            base = list(self._p)
        if self.shared:
            return base * n
        return (base + [self.prior] * max(0, n - len(base)))[:n]


def expected_accepted(p: Sequence[float], k: int) -> float:
    """k_accept(k) = sum_{i=1..k} prod_{j=1..i} p_j (accepted draft tokens, bonus token excluded)."""
    total, prod = 0.0, 1.0
    for j in range(k):
        prod *= p[j]
        total += prod
    return total


# ---------------------------------------------------------------------------- governors
def _check_int(name: str, v: Any, lo: int | None = None) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        if isinstance(v, float) and v.is_integer():
            v = int(v)
        else:
            raise SimError(f"governor.{name} must be an integer, got {v!r}")
    if lo is not None and v < lo:
        raise SimError(f"governor.{name} must be >= {lo}, got {v}")
    return int(v)


def _check_choice(name: str, v: Any, choices: Sequence[str]) -> str:
    if v not in choices:
        raise SimError(f"governor.{name} must be one of {list(choices)}, got {v!r}")
    return str(v)


class Governor:
    """Shared machinery: config checks, acceptance tracking, the cycle model and the log.

    Subclasses implement ``_choose``. All config fields are accepted by every governor (a preset
    may carry fields that only the other governor reads); they are checked either way.
    """

    name = "base"

    def __init__(self, **settings: Any) -> None:
        """Keyword settings are ``GovernorConf``'s fields (its defaults for the ones not given)."""
        unknown = sorted(set(settings) - set(_SETTINGS))
        if unknown:
            raise SimError(f"governor: unknown field(s) {unknown}; known: {sorted(_SETTINGS)}")
        c = {**_SETTINGS, **settings}
        k, k_min, k_max, warmup_k = c["k"], c["k_min"], c["k_max"], c["warmup_k"]
        latency_budget_ms, ema_alpha, prior_accept = c["latency_budget_ms"], c["ema_alpha"], c["prior_accept"]
        warmup_cycles, objective, pcie_new = c["warmup_cycles"], c["objective"], c["pcie_new"]
        slo, acceptance = c["slo"], c["acceptance"]
        self.k = _check_int("k", k, 0)
        self.k_min = _check_int("k_min", k_min, 0)
        self.k_max = _check_int("k_max", k_max, 0)
        if self.k_min > self.k_max:
            raise SimError(f"governor.k_min ({self.k_min}) must be <= governor.k_max ({self.k_max})")
        if latency_budget_ms is not None:
            try:
                latency_budget_ms = float(latency_budget_ms)
            except (TypeError, ValueError):
                raise SimError(
                    f"governor.latency_budget_ms must be a number or null, got {latency_budget_ms!r}"
                ) from None
            if not latency_budget_ms > 0:
                raise SimError(f"governor.latency_budget_ms must be > 0 (or null for no cap), got {latency_budget_ms}")
        self.latency_budget_ms = latency_budget_ms
        try:
            alpha = float(ema_alpha)
        except (TypeError, ValueError):
            raise SimError(f"governor.ema_alpha must be a number in (0, 1], got {ema_alpha!r}") from None
        if not 0 < alpha <= 1:
            raise SimError(f"governor.ema_alpha must be in (0, 1], got {ema_alpha}")
        self.ema_alpha = alpha
        self.warmup_cycles = _check_int("warmup_cycles", warmup_cycles, 0)
        try:
            prior = float(prior_accept)
        except (TypeError, ValueError):
            raise SimError(f"governor.prior_accept must be a number in [0, 1], got {prior_accept!r}") from None
        if not 0 <= prior <= 1:
            raise SimError(f"governor.prior_accept must be in [0, 1], got {prior_accept}")
        self.prior_accept = prior
        self.warmup_k = None if warmup_k is None else _check_int("warmup_k", warmup_k, 0)
        if self.warmup_k is not None and not self.k_min <= self.warmup_k <= self.k_max:
            raise SimError(
                f"governor.warmup_k ({self.warmup_k}) must be in [k_min, k_max] = [{self.k_min}, {self.k_max}]"
            )
        self.objective = _check_choice("objective", objective, OBJECTIVES)
        self.pcie_new = _check_choice("pcie_new", pcie_new, PCIE_NEW)
        self.slo = _check_choice("slo", slo, SLO_KINDS)
        self.acceptance = _check_choice("acceptance", acceptance, ACCEPTANCE_MODELS)
        self.tracker = AcceptanceTracker(
            max(self.k_max, self.k, 1), self.ema_alpha, self.warmup_cycles, self.prior_accept,
            shared=self.acceptance == "shared",
        )
        self._log: list[dict[str, Any]] = []
        self._pending: dict[str, Any] | None = None
        self._k_slo_once: tuple[int, bool] | None = None  # slo="ttft": (k_SLO, met), fixed at the first decision

    # ------------------------------------------------------------------ the cycle model
    def predict(self, costs: CycleCosts, ks: Sequence[int], p: Sequence[float] | None = None) -> list[Prediction]:
        """The cycle model at each k of ``ks`` (p: acceptance estimates; default the tracker's).

        exposed:    max(T_draft(k), T_init) + T_overhead + n(k) * x + T_verify(k+1)
        overlapped: max(T_draft(k), L_k) + T_verify(k+1), with the link free at
                    L_0 = T_init + T_overhead + n(0) * x and L_i = max(L_{i-1}, T_draft(i)) +
                    max(0, n(i) - n(i-1)) * x: draft token i's new experts are known when it has
                    been drafted and stream while later tokens are drafted.
        """
        ks = list(ks)
        if not ks:
            return []
        top = max(ks)
        if p is None:
            p = self.tracker.estimates(max(top, 1))
        init = _cost("t_pcie_init", costs.t_pcie_init)
        ovh = _cost("t_overhead", costs.t_overhead)
        x = _cost("expert_transfer_s", costs.expert_transfer_s)
        td = [0.0] + [_cost(f"t_draft({i})", costs.t_draft(i)) for i in range(1, top + 1)]
        n = [_count(f"new_experts({i})", costs.new_experts(i)) for i in range(top + 1)]
        # link-free time after each draft token, for the overlapped reading
        link = [init + ovh + n[0] * x]
        for i in range(1, top + 1):
            link.append(max(link[-1], td[i]) + max(0, n[i] - n[i - 1]) * x)
        out = []
        for k in ks:
            tv = _cost(f"t_verify({k + 1})", costs.t_verify(k + 1))
            t_new = ovh + n[k] * x
            exposed = max(td[k], init) + t_new + tv
            overlapped = max(td[k], link[k]) + tv
            cyc = exposed if self.pcie_new == "exposed" else overlapped
            acc = expected_accepted(p, k)
            tokens = acc + (1.0 if self.objective == "emitted" else 0.0)
            thr = tokens / cyc if cyc > 0 else (math.inf if tokens > 0 else 0.0)
            if self.slo == "ttft":
                lat = _cost("t_prefill", costs.t_prefill) + cyc
            else:
                lat = cyc if self.slo == "cycle" else cyc / (acc + 1.0)
            out.append(Prediction(k, td[k], tv, n[k], t_new, exposed, overlapped, cyc, acc, thr, lat))
        return out

    def _meets(self, pr: Prediction) -> bool:
        return self.latency_budget_ms is None or pr.slo_latency_s <= self.latency_budget_ms / 1e3

    def _k_slo(self, cands: Sequence[Prediction], lo: int) -> tuple[int, bool]:
        """(k_SLO, whether any k met the budget). ``slo="ttft"`` computes it at the first decision
        and keeps it (the paper's offline cap); the others recompute it every cycle."""
        if self.slo == "ttft" and self._k_slo_once is not None:
            return self._k_slo_once
        ok = [c.k for c in cands if self._meets(c)]
        out = (max(ok), True) if ok else (lo, False)
        if self.slo == "ttft":
            self._k_slo_once = out
        return out

    # ------------------------------------------------------------------ interface
    def decide(self, costs: CycleCosts) -> Decision:
        """The draft length of the next cycle, with its predicted cycle time and acceptance."""
        if self._pending is not None:  # decided again without observing: keep the record
            self._log.append(self._pending)
            self._pending = None
        d = self._choose(costs)
        self._pending = _log_entry(len(self._log), d)
        return d

    def observe(self, k: int, accepted: int, observed_cycle_s: float) -> None:
        """What the cycle did: ``k`` tokens drafted, the leading ``accepted`` matched (0..k), and
        it took ``observed_cycle_s`` seconds (end of the previous verify to end of this one)."""
        k = _check_int("observe: k", k, 0)
        if isinstance(accepted, bool) or not isinstance(accepted, int) or not 0 <= accepted <= k:
            raise SimError(f"governor observe: accepted must be an integer in [0, k={k}], got {accepted!r}")
        try:
            t = float(observed_cycle_s)
        except (TypeError, ValueError):
            raise SimError(f"governor observe: observed_cycle_s must be a number, got {observed_cycle_s!r}") from None
        if not (t >= 0 and math.isfinite(t)):
            raise SimError(f"governor observe: observed_cycle_s must be finite and >= 0, got {observed_cycle_s!r}")
        self.tracker.update(k, accepted)
        e = self._pending if self._pending is not None else _log_entry(len(self._log), None)
        self._pending = None
        e.update(observed_k=k, accepted=accepted, observed_cycle_s=t)
        self._log.append(e)

    def log(self) -> list[dict[str, Any]]:
        """Every decision (and any observation without one), oldest first, as flat dicts: cycle,
        phase, k, k_slo, slo_met, predicted_cycle_s (the reading in use),
        predicted_cycle_exposed_s, predicted_cycle_overlapped_s, predicted_accept,
        predicted_throughput, the terms (t_draft, t_verify, t_pcie_init, t_pcie_new,
        new_experts), p (estimates at decision time), candidate_k / candidate_cycle_s /
        candidate_throughput, and observed_k, accepted, observed_cycle_s (None until observed)."""
        out = [dict(e) for e in self._log]
        if self._pending is not None:
            out.append(dict(self._pending))
        return out

    # ------------------------------------------------------------------ helpers for subclasses
    def _range(self, costs: CycleCosts) -> tuple[int, int]:
        lo, hi = self.k_min, self.k_max
        if costs.k_limit is not None:
            lim = _check_int("CycleCosts.k_limit", costs.k_limit, 0)
            hi = min(hi, lim)
            lo = min(lo, hi)
        return lo, hi

    def _choose(self, costs: CycleCosts) -> Decision:  # pragma: no cover - interface
        raise NotImplementedError

    def _decision(self, pr: Prediction, k_slo: int, phase: str, slo_met: bool, costs: CycleCosts,
                  p: Sequence[float], cands: Sequence[Prediction]) -> Decision:
        return Decision(
            k=pr.k, predicted_cycle_s=pr.cycle_s, predicted_accept=pr.accept, k_slo=k_slo, phase=phase,
            slo_met=slo_met, predicted_throughput=pr.throughput, predicted_cycle_exposed_s=pr.cycle_exposed_s,
            predicted_cycle_overlapped_s=pr.cycle_overlapped_s, t_draft=pr.t_draft, t_verify=pr.t_verify,
            t_pcie_init=float(costs.t_pcie_init), t_pcie_new=pr.t_pcie_new, new_experts=pr.new_experts,
            p=tuple(p), candidates=tuple(cands),
        )


@GOVERNORS.register("fixed")
class FixedGovernor(Governor):
    """Always ``k`` (capped by the host's ``k_limit``); predicts its cycle for validation."""

    def _choose(self, costs: CycleCosts) -> Decision:
        k = self.k
        if costs.k_limit is not None:
            k = min(k, _check_int("CycleCosts.k_limit", costs.k_limit, 0))
        p = self.tracker.estimates(max(k, 1))
        (pr,) = self.predict(costs, [k], p)
        return self._decision(pr, k, "fixed", self._meets(pr), costs, p, [pr])


@GOVERNORS.register("roofline")
class RooflineGovernor(Governor):
    """MoE-SpeQ's Amortization Roofline governor (see the module docstring and docs/governor.md).

    During warm-up it drafts ``warmup_k`` (default: the top of the allowed range, so that every
    position it may later use is observed); afterwards it evaluates every k in range. Ties go to
    the smaller k (less speculative work).
    """

    def _choose(self, costs: CycleCosts) -> Decision:
        lo, hi = self._range(costs)
        p = self.tracker.estimates(max(hi, 1))
        cands = self.predict(costs, range(lo, hi + 1), p)
        if self.slo == "ttft" and self._k_slo_once is None and hi < self.k_max and self.latency_budget_ms is not None:
            # the offline cap is over the whole range, whatever this first request allows
            full = self.predict(costs, range(self.k_min, self.k_max + 1), self.tracker.estimates(self.k_max))
            k_slo, slo_met = self._k_slo(full, self.k_min)
        else:
            k_slo, slo_met = self._k_slo(cands, lo)
        k_slo = max(lo, min(k_slo, hi))  # the host's k_limit may have shrunk the range since
        allowed = [c for c in cands if c.k <= k_slo]
        if self.tracker.in_warmup:
            want = k_slo if self.warmup_k is None else min(self.warmup_k, k_slo)
            best = next(c for c in allowed if c.k == max(lo, want))
            phase = "warmup"
        else:
            best = allowed[0]
            for c in allowed[1:]:
                if c.throughput > best.throughput:
                    best = c
            phase = "ema"
        met = slo_met if self.slo == "ttft" else slo_met and self._meets(best)
        return self._decision(best, k_slo, phase, met, costs, p, cands)


class PlaybackGovernor(Governor):
    """The recorded k of each cycle, in run order (``ks``: DecisionLog.ks()). Its predictions are
    the cycle model's at that k, as the fixed governor's. A run with more cycles than the log is
    refused; a recorded k above the host's limit (the simulated request has fewer tokens left) is
    capped and counted in ``capped``."""

    name = "playback"

    def __init__(self, ks: Sequence[int], where: str = "replayed decisions") -> None:
        super().__init__()
        self.ks = [int(k) for k in ks]
        self.where = where
        self.i = 0
        self.capped = 0

    def _choose(self, costs: CycleCosts) -> Decision:
        if self.i >= len(self.ks):
            raise SimError(f"{self.where}: the simulated run reached cycle {self.i + 1}, the log has {len(self.ks)}")
        k = self.ks[self.i]
        self.i += 1
        if costs.k_limit is not None and k > costs.k_limit:
            k = int(costs.k_limit)
            self.capped += 1
        p = self.tracker.estimates(max(k, 1))
        (pr,) = self.predict(costs, [k], p)
        return self._decision(pr, k, "replayed", self._meets(pr), costs, p, [pr])


# ---------------------------------------------------------------------------- log analysis
def cycle_model_error(log: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, float]]:
    """How well each T_cycle reading predicted the observed cycle times, over log entries whose
    observed k equals the decided k: per reading, ``n``, ``mape`` (mean |pred - obs| / obs),
    ``bias`` (mean (pred - obs) / obs, > 0 = the model is pessimistic) and ``mae_s``."""
    out: dict[str, dict[str, float]] = {}
    rows = [
        e for e in log
        if e.get("observed_cycle_s") is not None and e.get("k") is not None and e.get("observed_k") == e.get("k")
        and e["observed_cycle_s"] > 0
    ]
    for reading in PCIE_NEW:
        col = f"predicted_cycle_{reading}_s"
        rel = [(e[col] - e["observed_cycle_s"]) / e["observed_cycle_s"] for e in rows]
        ab = [abs(e[col] - e["observed_cycle_s"]) for e in rows]
        n = len(rel)
        out[reading] = {
            "n": float(n),
            "mape": sum(abs(r) for r in rel) / n if n else math.nan,
            "bias": sum(rel) / n if n else math.nan,
            "mae_s": sum(ab) / n if n else math.nan,
        }
    return out


# ---------------------------------------------------------------------------- internals
def _cost(name: str, v: Any) -> float:
    try:
        f = float(v)
    except (TypeError, ValueError):
        raise SimError(f"governor: CycleCosts.{name} must be a number of seconds, got {v!r}") from None
    if not (f >= 0 and math.isfinite(f)):
        raise SimError(f"governor: CycleCosts.{name} must be finite and >= 0 seconds, got {v!r}")
    return f


def _count(name: str, v: Any) -> int:
    if isinstance(v, bool):
        raise SimError(f"governor: CycleCosts.{name} must be a count >= 0, got {v!r}")
    try:
        i = int(v)
    except (TypeError, ValueError):
        raise SimError(f"governor: CycleCosts.{name} must be a count >= 0, got {v!r}") from None
    if i != v or i < 0:
        raise SimError(f"governor: CycleCosts.{name} must be a count >= 0, got {v!r}")
    return i


def _log_entry(cycle: int, d: Decision | None) -> dict[str, Any]:
    e: dict[str, Any] = {"cycle": cycle}
    if d is None:
        e.update(phase=None, k=None, k_slo=None, slo_met=None, predicted_cycle_s=None, predicted_cycle_exposed_s=None,
                 predicted_cycle_overlapped_s=None, predicted_accept=None, predicted_throughput=None, t_draft=None,
                 t_verify=None, t_pcie_init=None, t_pcie_new=None, new_experts=None, p=None, candidate_k=None,
                 candidate_cycle_s=None, candidate_throughput=None)
    else:
        e.update(
            phase=d.phase, k=d.k, k_slo=d.k_slo, slo_met=d.slo_met, predicted_cycle_s=d.predicted_cycle_s,
            predicted_cycle_exposed_s=d.predicted_cycle_exposed_s,
            predicted_cycle_overlapped_s=d.predicted_cycle_overlapped_s, predicted_accept=d.predicted_accept,
            predicted_throughput=d.predicted_throughput, t_draft=d.t_draft, t_verify=d.t_verify,
            t_pcie_init=d.t_pcie_init, t_pcie_new=d.t_pcie_new, new_experts=d.new_experts, p=list(d.p),
            candidate_k=[c.k for c in d.candidates], candidate_cycle_s=[c.cycle_s for c in d.candidates],
            candidate_throughput=[c.throughput for c in d.candidates],
        )
    e.update(observed_k=None, accepted=None, observed_cycle_s=None)
    return e


__all__ = [
    "ACCEPTANCE_MODELS", "GOVERNORS", "OBJECTIVES", "PCIE_NEW", "SLO_KINDS", "AcceptanceTracker", "CycleCosts",
    "Decision", "FixedGovernor", "Governor", "GovernorConf", "PlaybackGovernor", "Prediction", "RooflineGovernor",
    "build_governor", "cycle_model_error", "expected_accepted",
]
