"""Seeded synthetic routing traces with the routing statistics the literature reports as dials.

``python -m traces synth --model NAME -o FILE [...]`` or, from Python::

    params = synth_params_for("qwen3-30b-a3b")
    trace = synthesize(dataclasses.replace(params, decode_tokens=128), seed=0)

The generative model (per request r, MoE layer m, token t; chains run over prefill and decode
tokens in position order):

* **Reuse** (dial ``reuse``, a depth profile): each of the previous token's k experts at the same
  layer is kept independently with probability ``reuse[m]``; the rest of the row is drawn fresh
  from the experts the previous token did *not* use. So the share of a token's experts that the
  previous token also used (what ``traces stats`` reports as ``reuse_next``) has expectation
  exactly ``reuse[m]``. Chance level is about k/E; the presets start there at the first MoE layer,
  peak over the middle third and fall off towards the last layer.
* **Short-window popularity skew** (dial ``hot_share``, a depth profile): every (request, layer)
  has a hot set of ceil(E/4) experts (the "top quarter" that ``traces stats`` measures); each
  segment of ``segment_tokens`` tokens a share ``drift`` of it is swapped for other experts. A
  fresh pick comes from the hot set with probability ``hot_share[m]`` and from the rest
  otherwise, so (reuse preserving class) each selection lies in the current hot set with
  probability ``hot_share[m]``, exactly (with ``drift`` = 0; right after a segment boundary the
  kept experts lag for a few tokens), whenever both classes hold at least 2k experts
  (ceil(E/4) >= 2k and E - ceil(E/4) >= 2k). Where they do not (8 experts, top-2: Mixtral,
  ``tiny``), a hot pick that finds no hot expert left after the reuse exclusion falls back to
  a cold one and the realised share lies below the dial (Mixtral preset: 0.30 for a dial of
  0.34). ``traces stats``' top-quarter share is at least the hot set's share (the empirical top
  quarter is chosen after the fact, and popular cold experts can enter it).
* **Long-window popularity** (dial ``global_skew``): one Dirichlet(1/global_skew) popularity per
  layer, shared by all requests, weights picks inside a class (0 = uniform).
* **Inter-layer affinity** (dials ``affinity``, ``clusters``, ``cluster_size``,
  ``cluster_persistence``, ``topic_alpha``): each token carries a latent cluster, a Markov chain
  over tokens that keeps its cluster with probability ``cluster_persistence`` and otherwise draws
  one from its request's cluster mix (Dirichlet(``topic_alpha``) per request). Each (layer,
  cluster) prefers ``cluster_size`` experts (default E / clusters: a random partition per layer,
  so clusters add no long-window popularity), whose pick weight is multiplied by
  1 + ``affinity``; the hot sets are drawn with the same boost, weighted by the request's mix.
  Experts of consecutive layers thus co-occur through the token's cluster, the way a slowly
  changing hidden state couples consecutive routers, and short-window skew and affinity share a
  cause (the request's topics). This dial is emergent, not exact: the co-occurrence recall of
  ``traces stats`` over chance k/E, mean of seeds 0-4 at the default size (4 x (64 + 512)):
  qwen3 5.0x, qwen1.5 4.1x, deepseek-v2-lite 3.2x, olmoe 2.3x, gpt-oss 2.3x, phi 1.6x,
  mixtral 1.2x (the fitted predictor sees only two requests there; more requests raise it).
* **Fresh picks** are weighted sampling without replacement (the top k of weight / Exp(1), i.e.
  Gumbel top-k) of the weights above within the chosen class.
* **Lookahead** ``lookahead_<d>`` (d = 1..``lookahead_depth``), on the source layer's row: each
  of the target layer's true ids is kept (in place) with probability
  r_d = k/E + (``lookahead_recall`` - k/E) * ``lookahead_decay``**(d-1) and otherwise replaced
  by a uniformly drawn expert outside the true set, so |pred ∩ true|/k has expectation r_d
  exactly. Null exactly where layer l+d is not an MoE layer.
* **Draft**: ``draft`` is built the same way from the same layer's truth with keep probability
  ``draft_agreement``; ``draft_match`` is an independent Bernoulli(``acceptance``) per token.
* **Gate weights**: the top k of E standard-normal router logits scaled by
  ``gate_temperature`` (drawn directly as order statistics), softmaxed over the top k
  (``gate_renormalize``, Mixtral/Qwen3 style) or over all E (the E-k tail mass in closed form).
  The order of experts within a row is a uniform permutation of the routed set.

Every component draws from its own stream (``SeedSequence(seed, spawn_key=(component, ...))``),
so e.g. changing ``acceptance`` leaves the routing unchanged. The same params and seed give a
bit-identical trace; no wall-clock date is recorded. Dials, seed and the derived per-layer and
per-depth targets are recorded in ``meta["synth"]``.

The family presets (``synth_params_for``) are plausible values guided by the literature ranges
(e.g. one-layer lookahead recall 80-97%: Eliseev & Mazur, arXiv 2312.17238, and Fate, arXiv
2502.12224; INT4 draft set agreement ~91% and acceptance ~90%: MoE-SpeQ, arXiv 2511.14102, Sec. 4;
reuse near chance at the first layer: Mixtral, arXiv 2401.04088, Sec. 5); they are not fitted to
captured traces.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from traces.errors import TraceError
from traces.presets import PRESETS, shape_for
from traces.provenance import project_version
from traces.shape import ModelShape
from traces.stats import top_quarter_size
from traces.trace import DECODE, PREFILL, Trace

SYNTH_VERSION = 1

Profile = tuple[float, float, float]

# component ids of the random streams (never renumber: it would change every trace)
_LENGTHS, _STRUCTURE, _HOT, _CHAIN, _GATES, _ORDER, _LOOKAHEAD, _DRAFT, _ACCEPT = range(9)


def hot_set_size(num_experts: int) -> int:
    """Size of the hot set: the "top quarter" ceil(E/4) that ``traces stats`` measures."""
    return top_quarter_size(num_experts)


def depth_profile(profile: Profile | float, num_moe_layers: int) -> np.ndarray:
    """(M,) values of a (first, peak, last) profile over MoE-layer depth.

    Linear from ``first`` at the first MoE layer to ``peak`` at a third of the depth, flat over
    the middle third, linear to ``last`` at the last MoE layer.
    """
    if isinstance(profile, (int, float)):
        profile = (float(profile),) * 3
    first, peak, last = (float(x) for x in profile)
    M = num_moe_layers
    x = np.arange(M) / (M - 1) if M > 1 else np.zeros(1)
    out = np.where(
        x <= 1 / 3,
        first + (peak - first) * np.clip(3 * x, 0, 1),
        np.where(x < 2 / 3, peak, peak + (last - peak) * np.clip(3 * x - 2, 0, 1)),
    )
    return out.astype(np.float64)


def _help(text: str) -> dict[str, str]:
    return {"help": text}


@dataclass(frozen=True)
class SynthParams:
    """Every dial of the generator (see the module docstring for what each one does)."""

    model: str = field(default="tiny", metadata=_help("model preset id (routing shape)"))
    requests: int = field(default=4, metadata=_help("number of requests"))
    prompt_tokens: int = field(default=64, metadata=_help("prefill tokens per request (step 0)"))
    decode_tokens: int = field(default=512, metadata=_help("decode tokens per request (steps 1..)"))
    length_jitter: float = field(
        default=0.0, metadata=_help("each request's prompt/decode length uniform in [(1-j)L, L]")
    )
    reuse: Profile = field(
        default=(0.25, 0.45, 0.35),
        metadata=_help("P(each of the previous token's experts is reused), first,peak,last over depth"),
    )
    hot_share: Profile = field(
        default=(0.35, 0.35, 0.35),
        metadata=_help("share of selections from the window's hot quarter, first,peak,last over depth"),
    )
    segment_tokens: int = field(default=64, metadata=_help("tokens per popularity segment"))
    drift: float = field(default=0.25, metadata=_help("share of the hot set replaced at each segment"))
    global_skew: float = field(
        default=0.2, metadata=_help("per-layer long-window popularity ~ Dirichlet(1/global_skew); 0 = uniform")
    )
    affinity: float = field(
        default=30.0, metadata=_help("pick-weight boost of the latent cluster's preferred experts")
    )
    clusters: int = field(default=8, metadata=_help("number of latent token clusters"))
    cluster_size: int = field(
        default=0, metadata=_help("preferred experts per (layer, cluster); 0 = E // clusters (a partition)")
    )
    cluster_persistence: float = field(
        default=0.5, metadata=_help("P(a token keeps the previous token's cluster)")
    )
    topic_alpha: float = field(
        default=1.0, metadata=_help("each request's cluster mix ~ Dirichlet(topic_alpha); 0 = uniform")
    )
    lookahead_depth: int = field(default=2, metadata=_help("lookahead_<d> columns for d = 1..D (0: none)"))
    lookahead_recall: float = field(default=0.85, metadata=_help("set recall of lookahead_1"))
    lookahead_decay: float = field(
        default=0.7, metadata=_help("recall excess over chance shrinks by this factor per extra layer")
    )
    draft: bool = field(default=True, metadata=_help("write the draft and draft_match columns"))
    draft_agreement: float = field(default=0.9, metadata=_help("set agreement of draft with the truth"))
    acceptance: float = field(default=0.85, metadata=_help("P(draft_match) per token"))
    gate_temperature: float = field(default=1.5, metadata=_help("scale of the normal router logits"))
    gate_renormalize: bool = field(default=True, metadata=_help("softmax over the top k (else over all E)"))

    # ------------------------------------------------------------------ checks
    def validate(self, shape: ModelShape) -> None:
        """Raise TraceError naming the first impossible dial."""
        E, k = shape.num_experts, shape.top_k

        def bad(name: str, msg: str) -> TraceError:
            return TraceError(f"SynthParams.{name} = {getattr(self, name)!r}: {msg}")

        for name in ("requests", "prompt_tokens", "segment_tokens", "clusters"):
            if int(getattr(self, name)) < 1:
                raise bad(name, "must be >= 1")
        for name in ("decode_tokens", "lookahead_depth", "cluster_size"):
            if int(getattr(self, name)) < 0:
                raise bad(name, "must be >= 0")
        for name in ("reuse", "hot_share"):
            v = getattr(self, name)
            if len(v) != 3 or not all(0.0 <= float(x) <= 1.0 for x in v):
                raise bad(name, "must be three probabilities (first, peak, last) in [0, 1]")
        for name in (
            "length_jitter", "drift", "cluster_persistence", "lookahead_recall", "lookahead_decay",
            "draft_agreement", "acceptance",
        ):
            if not 0.0 <= float(getattr(self, name)) <= 1.0:
                raise bad(name, "must be in [0, 1]")
        for name in ("global_skew", "affinity", "topic_alpha"):
            if not float(getattr(self, name)) >= 0.0:
                raise bad(name, "must be >= 0")
        if not float(self.gate_temperature) > 0.0:
            raise bad("gate_temperature", "must be > 0")
        if self.cluster_size > E:
            raise bad("cluster_size", f"exceeds the {E} experts of {shape.name}")
        if E < 2 * k:
            raise TraceError(
                f"synthetic traces need num_experts >= 2 * top_k (reuse draws fresh experts outside the "
                f"previous token's set); {shape.name} has {E} experts, top-{k}"
            )

    def to_meta(self) -> dict[str, Any]:
        """JSON-safe dict (tuples as lists) that survives a Parquet round trip unchanged."""
        d = dataclasses.asdict(self)
        for name in ("reuse", "hot_share"):
            d[name] = [float(x) for x in d[name]]
        return d


def lookahead_recall_at(params: SynthParams, d: int, shape: ModelShape) -> float:
    """Dialled set recall of ``lookahead_<d>``: decays from ``lookahead_recall`` towards chance k/E."""
    chance = shape.top_k / shape.num_experts
    return float(chance + (params.lookahead_recall - chance) * params.lookahead_decay ** (d - 1))


# ---------------------------------------------------------------- family presets
_FAMILY: dict[str, dict[str, Any]] = {
    # coarse, no shared experts: strong middle-layer locality (Mixtral paper: ~2x chance top-1
    # repetition mid-depth), next-layer-gate recall 80-90% (Eliseev & Mazur).
    "mixtral-8x7b": dict(
        reuse=(0.25, 0.5, 0.4), hot_share=(0.3, 0.35, 0.35), global_skew=0.3, affinity=30.0, clusters=4,
        lookahead_recall=0.85, lookahead_decay=0.7, draft_agreement=0.92, acceptance=0.88,
        gate_temperature=1.5, gate_renormalize=True,
    ),
    "phi-3.5-moe": dict(
        reuse=(0.125, 0.4, 0.3), hot_share=(0.35, 0.45, 0.4), global_skew=0.3, affinity=30.0, clusters=4,
        lookahead_recall=0.85, lookahead_decay=0.7, draft_agreement=0.91, acceptance=0.88,
        gate_temperature=1.5, gate_renormalize=True,
    ),
    # shared expert and fine-grained, load-balanced: lower locality (Liang et al. 2025), but a
    # strong next-layer predictor (Fate, ~97%); MoE-SpeQ: 90.9% INT4 set agreement.
    "qwen1.5-moe-a2.7b": dict(
        reuse=(0.07, 0.25, 0.2), hot_share=(0.4, 0.5, 0.45), global_skew=0.15, affinity=100.0, clusters=8,
        lookahead_recall=0.9, lookahead_decay=0.75, draft_agreement=0.909, acceptance=0.9,
        gate_temperature=1.2, gate_renormalize=False,
    ),
    "qwen3-30b-a3b": dict(
        reuse=(0.07, 0.35, 0.28), hot_share=(0.45, 0.55, 0.5), global_skew=0.15, affinity=100.0, clusters=8,
        lookahead_recall=0.88, lookahead_decay=0.75, draft_agreement=0.9, acceptance=0.88,
        gate_temperature=1.2, gate_renormalize=True,
    ),
    "deepseek-v2-lite": dict(
        reuse=(0.1, 0.28, 0.22), hot_share=(0.4, 0.5, 0.45), global_skew=0.15, affinity=100.0, clusters=8,
        lookahead_recall=0.88, lookahead_decay=0.75, draft_agreement=0.9, acceptance=0.88,
        gate_temperature=1.2, gate_renormalize=False,
    ),
    # MoE in every layer, no shared experts: the most local (SpecMD, Liang et al.).
    "olmoe-1b-7b": dict(
        reuse=(0.13, 0.45, 0.35), hot_share=(0.45, 0.6, 0.55), global_skew=0.2, affinity=100.0, clusters=4,
        cluster_persistence=0.8,
        lookahead_recall=0.85, lookahead_decay=0.7, draft_agreement=0.9, acceptance=0.88,
        gate_temperature=1.2, gate_renormalize=False,
    ),
    "gpt-oss-20b": dict(
        reuse=(0.125, 0.35, 0.28), hot_share=(0.4, 0.5, 0.45), global_skew=0.2, affinity=100.0, clusters=4,
        cluster_persistence=0.8,
        lookahead_recall=0.85, lookahead_decay=0.7, draft_agreement=0.9, acceptance=0.88,
        gate_temperature=1.5, gate_renormalize=True,
    ),
}
_FAMILY["tiny"] = dict(_FAMILY["mixtral-8x7b"])


def synth_params_for(model: str) -> SynthParams:
    """The family dial preset of a model preset id (unknown ids get a clear error)."""
    shape_for(model)  # raises with the list of known ids
    return SynthParams(model=model, **_FAMILY.get(model, {}))


# --------------------------------------------------------------------- helpers
def _rng(seed: int, *key: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(int(seed), spawn_key=tuple(key)))


def _top_desc(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest entries per row, largest first."""
    E = scores.shape[1]
    if E <= 4 * k or E <= 32:
        return np.argsort(-scores, axis=1, kind="stable")[:, :k]
    part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    order = np.argsort(-np.take_along_axis(scores, part, axis=1), axis=1, kind="stable")
    return np.take_along_axis(part, order, axis=1)


def _noisy_copy(rng: np.random.Generator, truth: np.ndarray, p_keep: float, E: int) -> np.ndarray:
    """Keep each true id in place with probability ``p_keep``; replace the others by ids drawn
    uniformly from outside the row's true set, distinct within the row (rejection sampling)."""
    N, k = truth.shape
    keep = rng.random((N, k)) < p_keep
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


def _gate_weights(rng: np.random.Generator, n: int, E: int, k: int, tau: float, renorm: bool) -> np.ndarray:
    """(n, k) descending softmax weights of the top k of E N(0,1) logits scaled by ``tau``."""
    from scipy.special import log_ndtr, ndtri

    u = np.clip(rng.random((n, k)), 1e-12, 1 - 1e-12)
    # top-k order statistics of E uniforms: V1 = U1^(1/E), Vj = V(j-1) * Uj^(1/(E-j+1))
    v = np.exp(np.cumsum(np.log(u) / (E - np.arange(k)), axis=1))
    z = ndtri(np.clip(v, 1e-300, 1 - 1e-16))
    logits = tau * z
    if not renorm and E > k:
        zk = z[:, -1]
        # log of the E-k tail mass: (E-k) * E[exp(tau Z) | Z < z_k]
        rest = math.log(E - k) + tau * tau / 2 + log_ndtr(zk - tau) - log_ndtr(zk)
        logits = np.concatenate([logits, rest[:, None]], axis=1)
    logits = logits - logits.max(axis=1, keepdims=True)
    w = np.exp(logits)
    w = (w / w.sum(axis=1, keepdims=True))[:, :k]
    w = w.astype(np.float32)
    return np.minimum.accumulate(w, axis=1)  # float32 rounding may never break the order


@dataclass
class SynthInternals:
    """The latent state behind a synthetic trace (for tests and diagnostics, not saved)."""

    hot: np.ndarray  # (R, M, S, E) bool: hot set of each request, layer and segment
    clusters: np.ndarray  # (R, T) latent cluster per token
    preferred: np.ndarray  # (M, C, E) bool: preferred experts of each layer and cluster
    reuse: np.ndarray  # (M,) dialled reuse per MoE layer
    hot_share: np.ndarray  # (M,) dialled hot share per MoE layer
    lookahead_recall: dict[int, float]


# ------------------------------------------------------------------ generator
def synthesize(params: SynthParams, seed: int, shape: ModelShape | None = None) -> Trace:
    """A seeded synthetic trace for ``params`` (``shape`` overrides the preset's routing shape)."""
    return synthesize_with_internals(params, seed, shape)[0]


def synthesize_with_internals(
    params: SynthParams, seed: int, shape: ModelShape | None = None
) -> tuple[Trace, SynthInternals]:
    """``synthesize`` plus the latent state that produced it."""
    shape = shape_for(params.model) if shape is None else shape
    params.validate(shape)
    if int(seed) < 0:
        raise TraceError(f"synthetic trace seed must be >= 0, got {seed}")
    R, M, E, k = params.requests, shape.num_moe_layers, shape.num_experts, shape.top_k

    # --- lengths, positions, steps, phases
    P = np.full(R, params.prompt_tokens, dtype=np.int64)
    D = np.full(R, params.decode_tokens, dtype=np.int64)
    if params.length_jitter > 0:
        g = _rng(seed, _LENGTHS)
        j = params.length_jitter
        P = g.integers(np.maximum(1, np.ceil((1 - j) * P)).astype(np.int64), P + 1)
        D = g.integers(np.ceil((1 - j) * D).astype(np.int64), D + 1)
    lengths = (P + D).astype(np.int32)
    T = int(lengths.max())
    t_idx = np.arange(T)[None, :]
    valid = t_idx < lengths[:, None]
    position = np.where(valid, t_idx, -1).astype(np.int32)
    is_prefill = t_idx < P[:, None]
    phase = np.where(valid, np.where(is_prefill, PREFILL, DECODE), -1).astype(np.int8)
    step = np.where(valid, np.where(is_prefill, 0, t_idx - P[:, None] + 1), -1).astype(np.int32)

    # --- structure shared by all requests: long-window popularity, clusters' preferred experts
    g = _rng(seed, _STRUCTURE)
    if params.global_skew > 0:
        base = g.dirichlet(np.full(E, 1.0 / params.global_skew), size=M)
        base = np.maximum(base, 1e-300)
    else:
        base = np.ones((M, E))
    C = params.clusters
    csize = params.cluster_size or max(1, E // C)
    # balanced: per layer a random permutation dealt round-robin, so every expert is preferred by
    # (about) C * csize / E clusters and the clusters add no long-window popularity of their own
    perm = np.argsort(g.random((M, E)), axis=1)
    slots = (np.arange(C)[:, None] * csize + np.arange(csize)[None, :]) % E  # (C, csize)
    preferred = np.zeros((M, C, E), dtype=bool)
    np.put_along_axis(preferred, perm[:, slots.reshape(-1)].reshape(M, C, csize), True, axis=2)
    # each request's mix over clusters (its "topics"), then the tokens' cluster chain
    if params.topic_alpha > 0:
        mix = g.dirichlet(np.full(C, params.topic_alpha), size=R)
    else:
        mix = np.full((R, C), 1.0 / C)
    switch = g.random((R, T)) >= params.cluster_persistence
    switch[:, 0] = True
    seg_id = np.cumsum(switch.reshape(-1)) - 1
    seg_req = np.repeat(np.arange(R), T)[switch.reshape(-1)]
    u = g.random(seg_req.size)
    cdf = np.cumsum(mix, axis=1)
    seg_cluster = np.minimum((u[:, None] >= cdf[seg_req]).sum(1), C - 1)
    clusters = seg_cluster[seg_id].reshape(R, T)

    # --- hot sets per request, layer and popularity segment (drifting), drawn towards the
    # preferred experts of the request's clusters (so skew and affinity share a cause)
    g = _rng(seed, _HOT)
    q = hot_set_size(E)
    S = (T + params.segment_tokens - 1) // params.segment_tokens
    hot_logw = np.log1p(params.affinity * np.einsum("rc,mce->rme", mix, preferred.astype(np.float64)))
    hot = np.zeros((R, M, S, E), dtype=bool)
    for s in range(S):
        keys = hot_logw + g.gumbel(size=(R, M, E))
        if s:
            prev = hot[:, :, s - 1]
            stay = prev & (g.random((R, M, E)) >= params.drift)
            keys = np.where(stay, np.inf, np.where(prev, -np.inf, keys))
        idx = np.argsort(-keys, axis=-1, kind="stable")[..., :q]
        np.put_along_axis(hot[:, :, s], idx, True, axis=-1)

    # --- the routing chains: n = R*M independent (request, layer) chains over tokens
    reuse = depth_profile(params.reuse, M)
    hot_share = depth_profile(params.hot_share, M)
    n = R * M
    m_of = np.tile(np.arange(M), R)
    r_of = np.repeat(np.arange(R), M)
    rows = np.arange(n)
    # pick weight of every expert for each (layer, cluster); a fresh pick is weighted sampling
    # without replacement: the top of weight / Exp(1) (the exponential form of Gumbel top-k)
    weight = base[:, None, :] * (1.0 + params.affinity * preferred)  # (M, C, E)
    hot_rows = hot.reshape(n, S, E)
    reuse_rows = reuse[m_of][:, None]
    hot_share_rows = hot_share[m_of][:, None]
    col = np.arange(k)[None, :]
    g = _rng(seed, _CHAIN)
    ids = np.empty((T, n, k), dtype=np.int64)
    prev = np.zeros((n, k), dtype=np.int64)
    for t in range(T):
        keep = g.random((n, k)) < reuse_rows if t else np.zeros((n, k), dtype=bool)
        want_hot = g.random((n, k)) < hot_share_rows
        score = weight[m_of, clusters[r_of, t]] / g.standard_exponential(size=(n, E))
        if t:
            score[rows[:, None], prev] = -1.0  # fresh picks avoid the previous token's experts
        is_hot = hot_rows[:, t // params.segment_tokens]
        s_hot = np.where(is_hot, score, -1.0)
        s_cold = np.where(is_hot, -1.0, score)
        top_hot, top_cold = _top_desc(s_hot, k), _top_desc(s_cold, k)
        avail_hot = (s_hot >= 0).sum(1)
        avail_cold = (s_cold >= 0).sum(1)
        dropped = ~keep
        n_fresh = dropped.sum(1)
        n_hot = np.minimum((want_hot & dropped).sum(1), avail_hot)
        n_cold = n_fresh - n_hot
        over = np.maximum(n_cold - avail_cold, 0)
        n_cold, n_hot = n_cold - over, n_hot + over
        cand = np.concatenate([top_hot, top_cold], axis=1)
        ok = np.concatenate([col < n_hot[:, None], col < n_cold[:, None]], axis=1)
        fresh = np.take_along_axis(cand, np.argsort(~ok, axis=1, kind="stable"), axis=1)
        rank = np.maximum(np.cumsum(dropped, axis=1) - 1, 0)
        cur = np.where(keep, prev, np.take_along_axis(fresh, rank, axis=1))
        ids[t] = cur
        prev = cur
    expert_ids = ids.reshape(T, R, M, k).transpose(1, 0, 2, 3)
    # order within a row: a uniform permutation of the routed set, weights descending
    g = _rng(seed, _ORDER)
    perm = np.argsort(g.random(expert_ids.shape), axis=-1)
    expert_ids = np.take_along_axis(expert_ids, perm, axis=-1)

    weights = _gate_weights(
        _rng(seed, _GATES), R * T * M, E, k, float(params.gate_temperature), bool(params.gate_renormalize)
    ).reshape(R, T, M, k)

    # --- recorded predictors
    lookahead: dict[int, np.ndarray] = {}
    recall_at: dict[int, float] = {}
    moe_pos = {layer: i for i, layer in enumerate(shape.moe_layers)}
    for d in range(1, params.lookahead_depth + 1):
        recall_at[d] = lookahead_recall_at(params, d, shape)
        a = np.full((R, T, M, k), -1, dtype=np.int64)
        src = [m for m, layer in enumerate(shape.moe_layers) if layer + d in moe_pos]
        if src:
            tgt = [moe_pos[shape.moe_layers[m] + d] for m in src]
            truth = expert_ids[:, :, tgt].reshape(-1, k)
            pred = _noisy_copy(_rng(seed, _LOOKAHEAD, d), truth, recall_at[d], E)
            a[:, :, src] = pred.reshape(R, T, len(src), k)
        lookahead[d] = a
    draft = draft_match = None
    if params.draft:
        draft = _noisy_copy(_rng(seed, _DRAFT), expert_ids.reshape(-1, k), params.draft_agreement, E)
        draft = draft.reshape(R, T, M, k)
        draft_match = _rng(seed, _ACCEPT).random((R, T)) < params.acceptance

    # --- padding
    pad = ~valid
    expert_ids = expert_ids.astype(np.int16)
    expert_ids[pad] = -1
    weights[pad] = np.nan
    for d, a in lookahead.items():
        a[pad] = -1
        lookahead[d] = a.astype(np.int16)
    if draft is not None:
        draft[pad] = -1
        draft = draft.astype(np.int16)
        draft_match &= valid

    derived = {
        "reuse_per_layer": [float(x) for x in reuse],
        "hot_share_per_layer": [float(x) for x in hot_share],
        "hot_set_size": q,
        "lookahead_recall": {str(d): r for d, r in recall_at.items()},
        "chance": k / E,
    }
    meta = {
        "source": "synthetic",
        "tool": "traces.synth",
        "model": shape.name,
        "synth": {"seed": int(seed), "params": params.to_meta(), "derived": derived},
        "provenance": {
            "generator": "traces.synth",
            "generator_version": SYNTH_VERSION,
            "package_version": project_version(),
            "numpy": np.__version__,
            "date": None,  # deliberately none: the same params and seed give the same file
        },
    }
    trace = Trace(
        shape=shape,
        request_ids=np.arange(R, dtype=np.int64),
        lengths=lengths,
        position=position,
        step=step,
        phase=phase,
        expert_ids=expert_ids,
        gate_weights=weights,
        lookahead=lookahead,
        draft=draft,
        draft_match=draft_match,
        meta=meta,
    )
    internals = SynthInternals(
        hot=hot, clusters=clusters, preferred=preferred, reuse=reuse, hot_share=hot_share,
        lookahead_recall=recall_at,
    )
    return trace, internals


# ------------------------------------------------------------------------ CLI
def _profile(text: str) -> tuple[float, float, float]:
    parts = [float(x) for x in text.split(",")]
    if len(parts) == 1:
        parts *= 3
    if len(parts) != 3:
        raise argparse.ArgumentTypeError(f"expected one value or first,peak,last; got {text!r}")
    return (parts[0], parts[1], parts[2])


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help=f"model preset id: {', '.join(PRESETS)}")
    p.add_argument("-o", "--output", required=True, help="trace file to write (.parquet)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    g = p.add_argument_group("dials (default: the model family's preset, see traces/synth.py)")
    for f in dataclasses.fields(SynthParams):
        if f.name == "model":
            continue
        opt = "--" + f.name.replace("_", "-")
        help_ = f.metadata.get("help", "")
        if f.type in ("bool", bool):
            g.add_argument(opt, action=argparse.BooleanOptionalAction, default=None, help=help_)
        elif f.name in ("reuse", "hot_share"):
            g.add_argument(opt, type=_profile, default=None, metavar="P|FIRST,PEAK,LAST", help=help_)
        else:
            typ = int if f.type in ("int", int) else float
            g.add_argument(opt, type=typ, default=None, help=help_)


def run(args: argparse.Namespace) -> int:
    from traces.io import write_trace

    params = synth_params_for(args.model)
    overrides = {
        f.name: getattr(args, f.name)
        for f in dataclasses.fields(SynthParams)
        if f.name != "model" and getattr(args, f.name, None) is not None
    }
    params = dataclasses.replace(params, **overrides)
    t0 = time.perf_counter()
    trace = synthesize(params, args.seed)
    t1 = time.perf_counter()
    path = write_trace(trace, args.output)
    t2 = time.perf_counter()
    print(
        f"{path}: synthetic {trace.shape.name} trace, seed {args.seed}, {trace.num_requests} requests, "
        f"{int(trace.lengths.sum())} tokens, {trace.num_rows} rows "
        f"(generated in {t1 - t0:.2f} s, written in {t2 - t1:.2f} s)"
    )
    return 0
