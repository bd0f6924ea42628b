"""The routing itself: request layout, shared structure (popularity, clusters), drifting hot sets,
the per-(request, layer) reuse chains over tokens, and the gate weights. Each stage is one
function of the dials and the seed (its own random stream, traces/synth/streams.py)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from traces.synth.params import SynthParams, depth_profile, hot_set_size
from traces.synth.streams import _CHAIN, _GATES, _HOT, _LENGTHS, _ORDER, _STRUCTURE, _rng
from traces.trace import DECODE, PREFILL


@dataclass
class Layout:
    """Token layout of the requests: (R,) lengths, (R, T) position, phase, step and validity."""

    prompt: np.ndarray
    lengths: np.ndarray
    position: np.ndarray
    phase: np.ndarray
    step: np.ndarray
    valid: np.ndarray

    @property
    def T(self) -> int:
        return self.position.shape[1]


@dataclass
class Structure:
    """What every request shares (long-window popularity, the clusters' preferred experts) and each
    request's cluster mix and token cluster chain."""

    base: np.ndarray  # (M, E) long-window popularity
    preferred: np.ndarray  # (M, C, E) bool
    mix: np.ndarray  # (R, C)
    clusters: np.ndarray  # (R, T)


def layout(params: SynthParams, seed: int) -> Layout:
    """Prompt and decode lengths (jittered if asked), positions, steps and phases."""
    R = params.requests
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
    return Layout(P, lengths, position, phase, step, valid)


def structure(params: SynthParams, seed: int, R: int, T: int, M: int, E: int) -> Structure:
    """Long-window popularity per layer, the clusters' preferred experts (a balanced partition per
    layer), each request's cluster mix and its tokens' cluster chain."""
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
    return Structure(base, preferred, mix, clusters)


def hot_sets(params: SynthParams, seed: int, st: Structure, T: int, E: int) -> np.ndarray:
    """(R, M, S, E) hot set of each request, layer and popularity segment, drifting between
    segments and drawn towards the preferred experts of the request's clusters."""
    R, M = st.mix.shape[0], st.base.shape[0]
    mix, preferred = st.mix, st.preferred
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
    return hot


def chains(params: SynthParams, seed: int, st: Structure, hot: np.ndarray, T: int, k: int) -> np.ndarray:
    """(R, T, M, k) expert ids: n = R*M independent (request, layer) reuse chains over tokens,
    rows in a uniform order."""
    R, M, S, E = hot.shape
    base, preferred, clusters = st.base, st.preferred, st.clusters
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
    return expert_ids


def _top_desc(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest entries per row, largest first."""
    E = scores.shape[1]
    if E <= 4 * k or E <= 32:
        return np.argsort(-scores, axis=1, kind="stable")[:, :k]
    part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    order = np.argsort(-np.take_along_axis(scores, part, axis=1), axis=1, kind="stable")
    return np.take_along_axis(part, order, axis=1)


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



def gate_weights(params: SynthParams, seed: int, R: int, T: int, M: int, E: int, k: int) -> np.ndarray:
    """(R, T, M, k) gate weights, descending within a row."""
    return _gate_weights(
        _rng(seed, _GATES), R * T * M, E, k, float(params.gate_temperature), bool(params.gate_renormalize)
    ).reshape(R, T, M, k)
