"""Routing statistics of a trace, per MoE layer and overall: the measures the offloading
literature reports (token-to-token reuse: Mixtral, arXiv 2401.04088 Sec. 5; per-layer LRU hit rates:
Eliseev & Mazur, arXiv 2312.17238; inter-layer affinity: ExFlow, arXiv 2401.08383).

``python -m traces stats FILE [--window W --skew-window W --cache-sizes 1,2,4 --phase decode --json]``
or, from a notebook, ``compute_stats(trace)`` (a ``TraceStats`` with a per-layer DataFrame) and the
single measures below. The same numbers describe captured and synthetic traces.

Tokens: by default only decode tokens count (``phase="decode"``; also ``"prefill"`` or ``"all"``).
Within each request the selected tokens are taken in position order; "the previous token" is the
previous selected token of the same request (the first selected token of a request has none).
Layers are MoE layers, reported by decoder index.

Definitions (k = top-k, E = routed experts):

* ``reuse_next``: mean over tokens with a previous token of |S_t ∩ S_(t-1)| / k at the same layer,
  the share of a token's experts that the previous token also used. Chance is about k/E.
* ``reuse_w<W>``: mean over tokens with W previous tokens of |S_t ∩ (S_(t-1) ∪ ... ∪ S_(t-W))| / k.
* ``lru_c<c>``: hit rate of a per-layer LRU cache of c >= k expert slots. Per request and per
  layer the cache starts empty at the request's first selected token (cold start, the simulator's
  ``cache.reset=request``; prefill is not replayed into it unless ``phase`` selects it); tokens
  are processed one by one, in order; an expert is a hit if it is resident when its token
  arrives; a token's own experts never evict each other; then its k experts become the most
  recently used, touched in the simulator's order (docs/metrics.md, "LRU order"): the resident
  ones first, then the ones fetched on demand, each group in gate-weight order (highest first),
  so the lowest-weight fetched expert is the most recent. Hit rate = hits / (k x tokens), cold
  misses included. (An LRU cache holds exactly the c most recently used distinct experts, so a
  hit is a stack distance < c.)
* ``top_quarter_window`` / ``top_quarter_global``: share of selections taken by the ceil(E/4) most
  selected experts, within non-overlapping windows of ``skew_window`` tokens of one request (a
  trailing partial window is dropped unless it is the request's only window; mean over windows),
  and over all selected tokens of all requests. Uniform routing gives about 1/4 (more on short
  windows: the top quarter is chosen after the fact).
* ``entropy_window`` / ``entropy_global``: entropy of the expert selection counts divided by log E
  (1 = uniform), over the same windows / globally.
* ``cooc_recall``: an inter-layer co-occurrence predictor. Requests at even index fit
  P(j at the next MoE layer | i at this layer) by counting (i, j) pairs of the same token; on the
  odd-index requests it scores each j by the sum of P(j | i) over the token's experts i at this
  layer (ties broken by the fitted popularity of j, then by id), predicts the top k for the next
  MoE layer and scores |pred ∩ true| / k. Reported at the predicted (next) layer; NaN with fewer
  than two requests. ``popularity_recall`` is the same with the fitted popularity alone, and
  ``chance`` = k/E is a random predictor's expectation.
* ``lookahead_<d>_recall``: mean |lookahead_<d> ∩ truth at layer l+d| / k over rows whose target
  exists, reported at the source layer l (where the column is recorded).
* ``draft_set_agreement``: share of (token, layer) rows whose draft top-k set equals the target's
  exactly (MoE-SpeQ's agreement metric); ``draft_recall``: mean |draft ∩ expert_ids| / k at the
  same layer (per-id recall). Scalars: ``draft_wrong_ids``, the mean number of wrong ids in a
  disagreeing row; ``acceptance``, the mean of ``draft_match`` over the selected tokens;
  ``acceptance_corr``, the lag-1 correlation of ``draft_match`` between consecutive selected
  tokens of a request (what the generator's two-state Markov dial sets).

Overall values pool all (token, layer) rows for rates and recalls, and average the per-layer values
for the popularity measures (expert identities differ between layers).
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from traces.errors import TraceError
from traces.trace import DECODE, PREFILL, Trace
from traces.atomic import write_text_atomic

PHASE_CHOICES = ("decode", "prefill", "all")


def top_quarter_size(num_experts: int) -> int:
    """ceil(E/4), at least 1: the "top quarter" of experts."""
    return max(1, math.ceil(num_experts / 4))


@dataclass
class Rate:
    """Per-layer sums and counts of a mean (pool them for the overall value)."""

    num: np.ndarray  # (M,) float64: sum of the per-row values
    den: np.ndarray  # (M,) int64: rows counted

    @property
    def per_layer(self) -> np.ndarray:
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(self.den > 0, self.num / np.maximum(self.den, 1), np.nan)

    @property
    def overall(self) -> float:
        d = int(self.den.sum())
        return float(self.num.sum() / d) if d else float("nan")


# ------------------------------------------------------------------ selection
@dataclass
class Selected:
    """The selected tokens of a trace, left-aligned per request (position order kept)."""

    trace: Trace
    phase: str
    lengths: np.ndarray  # (R,)
    valid: np.ndarray  # (R, T') bool
    ids: np.ndarray  # (R, T', M, k) int64, -1 padding
    gate_weights: np.ndarray | None
    lookahead: dict[int, np.ndarray] = field(default_factory=dict)
    draft: np.ndarray | None = None
    draft_match: np.ndarray | None = None

    @property
    def tokens(self) -> int:
        return int(self.lengths.sum())


def select_tokens(trace: Trace, phase: str = "decode") -> Selected:
    """Keep the tokens of ``phase`` ("decode", "prefill" or "all"), left-aligned per request."""
    if phase not in PHASE_CHOICES:
        raise TraceError(f"stats: phase must be one of {PHASE_CHOICES}, got {phase!r}")
    mask = trace.valid_mask()
    if phase == "decode":
        mask &= trace.phase == DECODE
    elif phase == "prefill":
        mask &= trace.phase == PREFILL
    lengths = mask.sum(axis=1).astype(np.int64)
    T = int(lengths.max(initial=0))
    order = np.argsort(~mask, axis=1, kind="stable")[:, :T]
    valid = np.arange(T)[None, :] < lengths[:, None]

    def take(a: np.ndarray | None, fill: Any) -> np.ndarray | None:
        if a is None:
            return None
        idx = order.reshape(order.shape + (1,) * (a.ndim - 2))
        out = np.take_along_axis(a, idx, axis=1)
        if np.issubdtype(out.dtype, np.integer):
            out = out.astype(np.int64)
        out[~valid] = fill
        return out

    return Selected(
        trace=trace,
        phase=phase,
        lengths=lengths,
        valid=valid,
        ids=take(trace.expert_ids, -1),
        gate_weights=take(trace.gate_weights, np.nan),
        lookahead={d: take(a, -1) for d, a in trace.lookahead.items()},
        draft=take(trace.draft, -1),
        draft_match=take(trace.draft_match, False),
    )


def _sel(trace: Trace | Selected, phase: str) -> Selected:
    return trace if isinstance(trace, Selected) else select_tokens(trace, phase)


def _overlap(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """|a ∩ b| per row of two (..., k) id arrays with distinct ids per row."""
    return (a[..., :, None] == b[..., None, :]).any(-1).sum(-1)


# ----------------------------------------------------------------- measures
def reuse(trace: Trace | Selected, window: int = 1, phase: str = "decode") -> Rate:
    """Share of a token's experts used by any of the previous ``window`` tokens at that layer."""
    s = _sel(trace, phase)
    if window < 1:
        raise TraceError(f"stats: reuse window must be >= 1, got {window}")
    R, T, M, k = s.ids.shape
    E = s.trace.shape.num_experts
    num = np.zeros(M)
    den = np.zeros(M, dtype=np.int64)
    if T <= window:
        return Rate(num, den)
    counted = s.valid & (np.arange(T)[None, :] >= window)
    for m in range(M):
        ids = s.ids[:, :, m]
        if window == 1:
            hits = _overlap(ids[:, 1:], ids[:, :-1])
            num[m] = hits[counted[:, 1:]].sum() / k
        else:
            pres = np.zeros((R, T + 1, E), dtype=np.int32)
            safe = np.where(ids >= 0, ids, 0)
            np.put_along_axis(pres[:, 1:], safe, (ids >= 0).astype(np.int32), axis=2)
            cum = np.cumsum(pres, axis=1)  # cum[:, t] = uses over tokens < t
            lo = np.maximum(np.arange(T) - window, 0)
            union = (cum[:, np.arange(T)] - cum[:, lo]) > 0  # (R, T, E) used in [t-w, t)
            hits = np.take_along_axis(union, safe, axis=2).sum(-1)
            num[m] = hits[counted].sum() / k
        den[m] = int(counted.sum())
    return Rate(num, den)


def lru_hit_rates(
    trace: Trace | Selected, cache_sizes: list[int] | tuple[int, ...], phase: str = "decode"
) -> dict[int, Rate]:
    """Per-layer LRU hit rate for each cache size (see the module docstring for the exact rules)."""
    s = _sel(trace, phase)
    R, T, M, k = s.ids.shape
    E = s.trace.shape.num_experts
    sizes = [int(c) for c in cache_sizes]
    if any(c < k for c in sizes):
        raise TraceError(f"stats: LRU cache sizes must be >= top_k = {k} (a token's experts are resident together), "
                         f"got {sizes}")
    n = R * M
    chains = s.ids.transpose(0, 2, 1, 3).reshape(n, T, k)  # (request, layer) chains
    live = np.repeat(s.valid, M, axis=0)  # (n, T)
    rows = np.arange(n)[:, None]
    col = np.arange(k)[None, :]
    den = np.full(M, s.tokens, dtype=np.int64)
    out: dict[int, Rate] = {}
    for c in sizes:
        # the touch order depends on which experts hit, so each size keeps its own recency stamps
        last = np.full((n, E), -1, dtype=np.int64)
        hits = np.zeros(n)
        for t in range(T):
            on = live[:, t]
            if not on.any():
                break
            ids = np.where(on[:, None], chains[:, t], 0)
            lu = last[rows, ids]  # (n, k)
            dist = (last[:, None, :] > lu[:, :, None]).sum(-1)  # stack distance
            hit = (lu >= 0) & (dist < c) & on[:, None]
            hits += hit.sum(1)
            # resident experts are touched first, then the fetched ones, each in gate-weight order
            rank = np.argsort(np.argsort(np.where(hit, 0, k) + col, axis=1, kind="stable"), axis=1)
            last[rows, ids] = np.where(on[:, None], t * k + rank, lu)
        out[c] = Rate(hits.reshape(R, M).sum(0) / k, den.copy())
    return out


def _windows(s: Selected, w: int) -> tuple[np.ndarray, np.ndarray]:
    """Window index (R, T) of each selected token (-1: not counted) and the number of windows."""
    R, T = s.valid.shape
    t = np.arange(T)[None, :]
    nfull = s.lengths // w
    win = np.where(t // w < nfull[:, None], t // w, -1)
    only = (nfull == 0) & (s.lengths > 0)  # a request shorter than a window is one window
    win = np.where(only[:, None] & s.valid, 0, win)
    nwin = np.maximum(nfull, only.astype(np.int64))
    offset = np.r_[0, np.cumsum(nwin)[:-1]]
    gid = np.where(win >= 0, win + offset[:, None], -1)
    return gid, int(nwin.sum())


def _norm_entropy(counts: np.ndarray, E: int) -> np.ndarray:
    tot = counts.sum(-1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        p = counts / tot
        h = -np.where(p > 0, p * np.log(p), 0.0).sum(-1)
    return h / math.log(E) if E > 1 else np.ones_like(h)


def popularity(trace: Trace | Selected, skew_window: int = 64, phase: str = "decode") -> dict[str, np.ndarray]:
    """Per-layer top-quarter shares and normalised entropies, per window and global."""
    s = _sel(trace, phase)
    R, T, M, k = s.ids.shape
    E = s.trace.shape.num_experts
    q = top_quarter_size(E)
    if skew_window < 1:
        raise TraceError(f"stats: skew window must be >= 1, got {skew_window}")
    gid, nw = _windows(s, skew_window)
    out = {key: np.full(M, np.nan) for key in ("top_quarter_window", "top_quarter_global", "entropy_window", "entropy_global")}
    if s.tokens == 0:
        return out
    for m in range(M):
        ids = s.ids[:, :, m]
        glob = np.bincount(ids[s.valid].reshape(-1), minlength=E).astype(np.float64)
        out["top_quarter_global"][m] = np.sort(glob)[::-1][:q].sum() / glob.sum()
        out["entropy_global"][m] = _norm_entropy(glob, E)
        use = gid >= 0
        flat = (gid[use][:, None] * E + ids[use]).reshape(-1)
        cw = np.bincount(flat, minlength=nw * E).reshape(nw, E).astype(np.float64)
        tot = cw.sum(1)
        keep = tot > 0
        top = -np.sort(-cw[keep], axis=1)[:, :q].sum(1) / tot[keep]
        out["top_quarter_window"][m] = top.mean()
        out["entropy_window"][m] = _norm_entropy(cw[keep], E).mean()
    return out


def cooccurrence_recall(trace: Trace | Selected, phase: str = "decode") -> tuple[Rate, Rate]:
    """Recall of the fitted co-occurrence predictor and of the popularity baseline, per target layer."""
    s = _sel(trace, phase)
    R, T, M, k = s.ids.shape
    E = s.trace.shape.num_experts
    num, den = np.zeros(M), np.zeros(M, dtype=np.int64)
    pnum = np.zeros(M)
    fit_req = np.arange(R) % 2 == 0
    fit = s.valid & fit_req[:, None]
    ev = s.valid & ~fit_req[:, None]
    if R < 2 or not fit.any() or not ev.any():
        return Rate(num, den), Rate(pnum, den.copy())

    # integer counting and gathers, no BLAS: exact, deterministic and fast on a busy machine
    for m in range(M - 1):
        a_fit, b_fit = s.ids[:, :, m][fit], s.ids[:, :, m + 1][fit]  # (N, k) each
        pairs = (a_fit[:, :, None] * E + b_fit[:, None, :]).reshape(-1)
        counts = np.bincount(pairs, minlength=E * E).reshape(E, E).astype(np.float64)
        seen = np.bincount(a_fit.reshape(-1), minlength=E).astype(np.float64)
        pop = np.bincount(b_fit.reshape(-1), minlength=E) / a_fit.shape[0]
        cond = counts / np.maximum(seen, 1.0)[:, None]  # P(j at m+1 | i at m)
        a_ev, truth = s.ids[:, :, m][ev], s.ids[:, :, m + 1][ev]
        score = cond[a_ev[:, 0]].copy()
        for j in range(1, k):
            score += cond[a_ev[:, j]]
        # rank by score, then popularity, then id: a stable sort of the columns in popularity order
        pop_order = np.lexsort((np.arange(E), -pop))
        score = score[:, pop_order]
        pred = pop_order[np.argsort(-score, axis=1, kind="stable")[:, :k]]
        num[m + 1] = _overlap(pred, truth).sum() / k
        pop_pred = pop_order[:k]
        pnum[m + 1] = _overlap(np.broadcast_to(pop_pred, truth.shape), truth).sum() / k
        den[m + 1] = truth.shape[0]
    return Rate(num, den), Rate(pnum, den.copy())


def predictor_recall(trace: Trace | Selected, phase: str = "decode") -> dict[str, Rate]:
    """Recall of each recorded predictor column: ``lookahead_<d>`` (at the source layer), ``draft``."""
    s = _sel(trace, phase)
    R, T, M, k = s.ids.shape
    out: dict[str, Rate] = {}
    for d in sorted(s.lookahead):
        target = s.trace.lookahead_target(d)
        num, den = np.zeros(M), np.zeros(M, dtype=np.int64)
        for m, tm in enumerate(target):
            if tm < 0:
                continue
            hits = _overlap(s.lookahead[d][:, :, m], s.ids[:, :, tm])
            num[m] = hits[s.valid].sum() / k
            den[m] = int(s.valid.sum())
        out[f"lookahead_{d}"] = Rate(num, den)
    if s.draft is not None:
        hits = _overlap(s.draft, s.ids)  # (R, T, M)
        out["draft"] = Rate(hits[s.valid].sum(0) / k, np.full(M, int(s.valid.sum()), dtype=np.int64))
    return out


def draft_agreement(trace: Trace | Selected, phase: str = "decode") -> tuple[Rate, float]:
    """(exact top-k set agreement of ``draft`` per layer, mean wrong ids in a disagreeing row);
    (empty Rate, NaN) without a draft column."""
    s = _sel(trace, phase)
    R, T, M, k = s.ids.shape
    if s.draft is None:
        return Rate(np.zeros(M), np.zeros(M, dtype=np.int64)), float("nan")
    hits = _overlap(s.draft, s.ids)[s.valid]  # (N, M) correct ids per row
    same = hits == k
    wrong = k - hits[~same]
    return (Rate(same.sum(0).astype(np.float64), np.full(M, hits.shape[0], dtype=np.int64)),
            float(wrong.mean()) if wrong.size else float("nan"))


def acceptance_corr(trace: Trace | Selected, phase: str = "decode") -> float:
    """Lag-1 correlation of ``draft_match`` between consecutive selected tokens of each request
    (NaN without a draft column, with fewer than 3 pairs or a constant column)."""
    s = _sel(trace, phase)
    if s.draft_match is None:
        return float("nan")
    pair = s.valid[:, 1:] & s.valid[:, :-1]
    x, y = s.draft_match[:, :-1][pair].astype(float), s.draft_match[:, 1:][pair].astype(float)
    if x.size < 3 or x.std() == 0 or y.std() == 0:
        return float("nan")
    return float(np.corrcoef(x, y)[0, 1])


def acceptance(trace: Trace | Selected, phase: str = "decode") -> float:
    """Mean ``draft_match`` over the selected tokens (NaN without a draft column)."""
    s = _sel(trace, phase)
    if s.draft_match is None or s.tokens == 0:
        return float("nan")
    return float(s.draft_match[s.valid].mean())


# -------------------------------------------------------------- all together
@dataclass
class TraceStats:
    """All measures of one trace: ``per_layer`` (a DataFrame indexed by decoder layer, with an
    ``all`` row for the overall values) and scalars."""

    per_layer: Any  # pandas.DataFrame
    scalars: dict[str, Any]
    settings: dict[str, Any]

    def overall(self) -> dict[str, float]:
        return {c: float(v) for c, v in self.per_layer.loc["all"].items()}

    def to_dict(self) -> dict[str, Any]:
        def clean(v: Any) -> Any:
            if isinstance(v, float) and not math.isfinite(v):
                return None
            return v

        df = self.per_layer
        layers = df.drop(index="all")
        return {
            "settings": self.settings,
            **{k: clean(v) for k, v in self.scalars.items()},
            "overall": {c: clean(float(v)) for c, v in df.loc["all"].items()},
            "per_layer": {
                "layer": [int(x) for x in layers.index],
                **{c: [clean(float(v)) for v in layers[c]] for c in layers.columns},
            },
        }

    def to_text(self) -> str:
        sc = self.scalars
        head = [
            f"model {sc['model']}: {sc['num_experts']} experts, top-{sc['top_k']}, chance k/E = {sc['chance']:.3f}",
            f"{sc['tokens']} {self.settings['phase']} tokens in {sc['requests']} requests; "
            + (
                "no draft column" if not sc["has_draft"]
                else f"draft set agreement {sc['draft_set_agreement']:.3f}, per-id recall {sc['draft_recall']:.3f}, "
                f"acceptance (mean draft_match) {sc['acceptance']:.3f}, lag-1 correlation {sc['acceptance_corr']:.3f}"
                if math.isfinite(sc["acceptance"])
                else "acceptance n/a (no tokens)"
            ),
            f"reuse window {self.settings['window']}, skew window {self.settings['skew_window']}, "
            f"LRU cache sizes {self.settings['cache_sizes']} (per layer, cold at request start)",
        ]
        body = self.per_layer.to_string(float_format=lambda x: f"{x:.3f}", na_rep="-")
        return "\n".join(head) + "\n" + body


def default_cache_sizes(num_experts: int, top_k: int) -> list[int]:
    """k, 2k and 4k slots per layer, capped at E (about 2x the active experts is the usual sweet spot)."""
    return sorted({min(c, num_experts) for c in (top_k, 2 * top_k, 4 * top_k)})


def compute_stats(
    trace: Trace,
    window: int = 8,
    skew_window: int = 64,
    cache_sizes: list[int] | tuple[int, ...] | None = None,
    phase: str = "decode",
) -> TraceStats:
    """Every measure of the module docstring, per layer and overall."""
    import pandas as pd

    shape = trace.shape
    E, k = shape.num_experts, shape.top_k
    sizes = list(cache_sizes) if cache_sizes else default_cache_sizes(E, k)
    s = select_tokens(trace, phase)
    cols: dict[str, Rate | np.ndarray] = {}
    cols["reuse_next"] = reuse(s, 1)
    cols[f"reuse_w{window}"] = reuse(s, window)
    for c, r in lru_hit_rates(s, sizes).items():
        cols[f"lru_c{c}"] = r
    cols.update(popularity(s, skew_window))
    co, popr = cooccurrence_recall(s)
    cols["cooc_recall"], cols["popularity_recall"] = co, popr
    for name, r in predictor_recall(s).items():
        cols[f"{name}_recall" if name.startswith("lookahead") else "draft_recall"] = r
    agree, wrong_ids = draft_agreement(s)
    if trace.draft is not None:
        cols["draft_set_agreement"] = agree
    data, overall = {}, {}
    for name, v in cols.items():
        if isinstance(v, Rate):
            data[name], overall[name] = v.per_layer, v.overall
        else:
            data[name] = v
            overall[name] = float(np.nanmean(v)) if np.isfinite(v).any() else float("nan")
    df = pd.DataFrame(data, index=pd.Index(list(shape.moe_layers), name="layer"))
    df.loc["all"] = pd.Series(overall)
    scalars = {
        "model": shape.name,
        "num_experts": E,
        "top_k": k,
        "chance": k / E,
        "requests": trace.num_requests,
        "tokens": s.tokens,
        "acceptance": acceptance(s),
        "acceptance_corr": acceptance_corr(s),
        "draft_set_agreement": agree.overall if trace.draft is not None else float("nan"),
        "draft_recall": float(cols["draft_recall"].overall) if trace.draft is not None else float("nan"),
        "draft_wrong_ids": wrong_ids,
        "has_draft": trace.draft is not None,
    }
    settings = {"phase": phase, "window": window, "skew_window": skew_window, "cache_sizes": sizes}
    return TraceStats(per_layer=df, scalars=scalars, settings=settings)


# ------------------------------------------------------------------------ CLI
def _sizes(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated slot counts, got {text!r}") from None


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", help="trace file (.parquet)")
    p.add_argument("--window", type=int, default=8, help="reuse window in tokens (default 8)")
    p.add_argument("--skew-window", type=int, default=64, help="popularity window in tokens (default 64)")
    p.add_argument(
        "--cache-sizes", type=_sizes, default=None,
        help="LRU slots per layer, comma-separated (default: k,2k,4k capped at E)",
    )
    p.add_argument("--phase", choices=PHASE_CHOICES, default=None,
                   help="which tokens count (default: decode; prefill when the trace has no decode token)")
    p.add_argument("--json", action="store_true", help="print JSON instead of the table")
    p.add_argument("-o", "--output", default=None, help="also write the JSON to this file")


def run(args: argparse.Namespace) -> int:
    from traces.io import read_trace

    trace = read_trace(args.path)
    phase, note = args.phase, None
    valid = trace.valid_mask()
    has_decode = bool((valid & (trace.phase == DECODE)).any())
    if not has_decode and phase in (None, "decode"):
        if phase == "decode":
            raise TraceError(f"{args.path}: no decode token in this trace (a prefill-only log); "
                             "--phase prefill gives its prefill statistics")
        phase = "prefill"
        note = "prefill-only trace (no decode token): prefill statistics, prompt tokens in position order"
    st = compute_stats(
        trace, window=args.window, skew_window=args.skew_window, cache_sizes=args.cache_sizes, phase=phase or "decode"
    )
    d = {"file": str(args.path), **({"note": note} if note else {}), **st.to_dict()}
    text = json.dumps(d, indent=2, sort_keys=False)
    if args.output:
        write_text_atomic(args.output, text + "\n")
    if args.json:
        print(text)
    else:
        print(f"{args.path}")
        if note:
            print(note)
        print(st.to_text())
    return 0
