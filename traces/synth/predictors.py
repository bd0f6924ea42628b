"""The recorded predictor columns: ``lookahead_<d>``, the speculative draft's routing (``draft``)
and its acceptance (``draft_match``). Also used by the simulator to give a trace without draft
columns a stand-in draft with the same dials (sim/speculative.py)."""

from __future__ import annotations

import numpy as np


def replace_ids(rng: np.random.Generator, truth: np.ndarray, keep: np.ndarray, E: int) -> np.ndarray:
    """``truth`` (N, k) with every id where ``keep`` is False replaced by an id drawn uniformly from
    outside the row's true set, distinct within the row (rejection sampling)."""
    N, k = truth.shape
    out = truth.astype(np.int64, copy=True)
    r, c = np.nonzero(~keep)
    out[r, c] = rng.integers(0, E, size=r.size)
    rows = np.flatnonzero((~keep).any(1))
    lower = np.tril(np.ones((k, k), dtype=bool), -1)
    for _ in range(10_000):
        if rows.size == 0:
            return out
        w, t, drop = out[rows], truth[rows], ~keep[rows]
        bad = drop & (
            (w[:, :, None] == t[:, None, :]).any(2) | ((w[:, :, None] == w[:, None, :]) & lower).any(2)
        )
        hit = bad.any(1)
        rows, bad = rows[hit], bad[hit]
        rr, cc = np.nonzero(bad)
        out[rows[rr], cc] = rng.integers(0, E, size=rr.size)
    raise RuntimeError("rejection sampling of wrong ids did not converge")  # pragma: no cover


def noisy_copy(rng: np.random.Generator, truth: np.ndarray, p_keep: float, E: int) -> np.ndarray:
    """Keep each true id in place with probability ``p_keep``, replace the others (per-id recall
    ``p_keep`` exactly in expectation): the lookahead columns."""
    return replace_ids(rng, truth, rng.random(truth.shape) < p_keep, E)


def draft_rows(rng: np.random.Generator, truth: np.ndarray, weights: np.ndarray | None, set_agreement: float,
               wrong_ids: float, E: int) -> np.ndarray:
    """The draft's routing of each (token, layer) row of ``truth`` (N, k).

    A row agrees exactly (same top-k set) with probability ``set_agreement``; otherwise
    j = 1 + Binomial(k - 1, (wrong_ids - 1) / (k - 1)) of its ids are wrong (mean ``wrong_ids``),
    and they are the j with the lowest gate weights (a quantised router flips the borderline
    experts first; without weights, the last columns). Per-id recall is therefore
    1 - (1 - set_agreement) * wrong_ids / k in expectation."""
    N, k = truth.shape
    disagree = rng.random(N) >= set_agreement
    j = np.ones(N, dtype=np.int64)
    if k > 1 and wrong_ids > 1:
        j += rng.binomial(k - 1, (wrong_ids - 1) / (k - 1), size=N)
    if weights is None:
        rank = np.broadcast_to(np.arange(k)[::-1], (N, k))  # last column = lowest weight
    else:
        w = np.nan_to_num(np.asarray(weights, dtype=np.float64), nan=0.0)
        rank = np.argsort(np.argsort(w, axis=1, kind="stable"), axis=1)  # 0 = lowest weight
    wrong = disagree[:, None] & (rank < j[:, None])
    return replace_ids(rng, truth, ~wrong, E)


def markov_matches(rng: np.random.Generator, shape: tuple[int, int], acceptance: float, corr: float) -> np.ndarray:
    """(R, T) ``draft_match`` flags: per request a two-state Markov chain over token positions with
    stationary P(match) = ``acceptance`` and lag-1 correlation ``corr``:
    P(match | previous match) = a + corr (1 - a), P(match | previous mismatch) = a (1 - corr).
    corr = 0 is i.i.d. Bernoulli(a); corr = 1 repeats the first token's outcome."""
    a, rho = float(acceptance), float(corr)
    u = rng.random(shape)
    out = np.empty(shape, dtype=bool)
    if shape[1] == 0:
        return out
    out[:, 0] = u[:, 0] < a
    p11, p01 = a + rho * (1 - a), a * (1 - rho)
    for t in range(1, shape[1]):
        out[:, t] = u[:, t] < np.where(out[:, t - 1], p11, p01)
    return out
