"""Predictors of future routing: oracle, recorded trace columns, and noisy oracles.

A predictor answers ``lookahead(g, d)``: the keys that decoder layer ``l + d`` will need in the
step of layer-step ``g`` (whose MoE layer is ``l``), as a next-layer-gate predictor running at
layer ``l`` would see them. Empty where ``l + d`` is dense or past the last layer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from sim.policies.errors import PolicyError, PolicyUnsupported
from sim.policies.base import PREDICTORS
from traces import Trace


@dataclass(frozen=True)
class LayerSteps:
    """Where each layer-step of a run sits in its trace: the one input a trace-backed predictor
    needs besides the trace (the simulator's schedule provides it, ``Schedule.layer_steps``)."""

    request: np.ndarray  # (G,) request ordinal of layer-step g
    t0: np.ndarray  # (G,) first trace row of its step
    t1: np.ndarray  # (G,) one past its step's last row
    m: np.ndarray  # (G,) its MoE-layer ordinal


class Predictor:
    """Base: reads an (R, T, M, k) array of predicted ids per depth, indexed at the source layer."""

    name = "base"

    def attach(self, trace: Trace, steps: LayerSteps, depths: Sequence[int], seed: int) -> None:
        """Precompute, for every layer-step and depth, the predicted keys (one list read per query)."""
        self.trace, self.E = trace, trace.shape.num_experts
        self.depths = list(depths)
        E = self.E
        req, t0, t1, m = steps.request, steps.t0, steps.t1, steps.m
        multi = t1 - t0 > 1
        self._table: dict[int, list[tuple[int, ...]]] = {}
        for d in self.depths:
            arr = self._array(d, seed)
            tm = trace.lookahead_target(d)[m]  # (G,) target MoE ordinal, -1 if none
            ids = arr[req, t0, m].astype(np.int64)  # (G, k) for single-token steps
            keys = np.where((ids >= 0) & (tm[:, None] >= 0), tm[:, None] * E + ids, -1)
            table = list(map(tuple, keys.tolist()))
            for g in np.flatnonzero((keys < 0).any(axis=1)):  # no target layer, or fewer ids
                table[g] = tuple(int(x) for x in keys[g] if x >= 0)
            for g in np.flatnonzero(multi & (tm >= 0)):  # prefill: the union over the step's tokens
                u = np.unique(arr[req[g], t0[g]:t1[g], m[g]])
                table[g] = tuple(int(tm[g]) * E + int(x) for x in u if x >= 0)
            self._table[d] = table

    def _array(self, d: int, seed: int) -> np.ndarray:  # pragma: no cover - interface
        raise NotImplementedError

    def lookahead(self, g: int, d: int) -> tuple[int, ...]:
        return self._table[d][g]


def _shift_truth(trace: Trace, d: int) -> np.ndarray:
    """Truth of layer l+d placed on the row of source layer l (-1 where l+d is not MoE)."""
    target = trace.lookahead_target(d)
    out = np.full_like(trace.expert_ids, -1)
    for m, tm in enumerate(target):
        if tm >= 0:
            out[:, :, m] = trace.expert_ids[:, :, tm]
    return out


@PREDICTORS.register("oracle")
class OraclePredictor(Predictor):
    """Perfect knowledge of the target layer's routing (an upper bound for lookahead)."""

    def _array(self, d: int, seed: int) -> np.ndarray:
        return _shift_truth(self.trace, d)


@PREDICTORS.register("recorded")
class RecordedPredictor(Predictor):
    """The trace's own ``lookahead_<d>`` columns, as captured from the live model."""

    def _array(self, d: int, seed: int) -> np.ndarray:
        if d not in self.trace.lookahead:
            have = [f"lookahead_{x}" for x in self.trace.lookahead_depths] or "none"
            raise PolicyUnsupported(
                f"predictor 'recorded' needs column lookahead_{d}, the trace has {have}; "
                "use a shallower depth or predictor=noisy"
            )
        return self.trace.lookahead[d]


def noisy_sets(truth: np.ndarray, num_experts: int, recall: float, rng: np.random.Generator) -> np.ndarray:
    """Predicted top-k sets with expected set recall |pred ∩ true| / k equal to ``recall``.

    Each row keeps floor(recall*k) true ids plus one more with the fractional probability (chosen
    at random), and fills the rest with random experts outside the true set. Rows of -1 stay -1.
    """
    if not 0.0 <= recall <= 1.0:
        raise PolicyError(f"noisy predictor recall must be in [0, 1], got {recall}")
    shape = truth.shape
    k = shape[-1]
    flat = truth.reshape(-1, k).astype(np.int64)
    n = flat.shape[0]
    base = int(np.floor(recall * k))
    keep = base + (rng.random(n) < recall * k - base)
    # random order of true ids; keep the first `keep`
    order = np.argsort(rng.random((n, k)), axis=1)
    shuffled = np.take_along_axis(flat, order, axis=1)
    # random replacement ids outside the true set: random permutation scores, true ids masked
    scores = rng.random((n, num_experts))
    rows = np.arange(n)[:, None]
    valid_truth = np.where(flat >= 0, flat, 0)
    scores[rows, valid_truth] = 2.0
    fillers = np.argsort(scores, axis=1)[:, :k]
    out = np.where(np.arange(k)[None, :] < keep[:, None], shuffled, fillers)
    out[(flat < 0).any(axis=1)] = -1
    return out.reshape(shape).astype(np.int16)


@PREDICTORS.register("noisy")
class NoisyOraclePredictor(Predictor):
    """Truth degraded to a set recall per depth (``recall[d-1]``; the last value repeats)."""

    def __init__(self, recall: Sequence[float] | float = (0.9, 0.8, 0.7, 0.6)) -> None:
        self.recall = [float(recall)] if isinstance(recall, (int, float)) else [float(x) for x in recall]
        if not self.recall:
            raise PolicyError("noisy predictor needs at least one recall value")

    def _array(self, d: int, seed: int) -> np.ndarray:
        rec = self.recall[min(d, len(self.recall)) - 1]
        rng = np.random.default_rng([seed, 7919, d])
        return noisy_sets(_shift_truth(self.trace, d), self.E, rec, rng)
