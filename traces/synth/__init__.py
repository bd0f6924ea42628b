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
* **Draft** (dials ``draft_agreement``, ``draft_wrong_ids``): ``draft`` is the INT4 draft's
  routing of the same (token, layer). ``draft_agreement`` is *exact top-k set agreement* (the
  metric of MoE-SpeQ, arXiv 2511.14102, Sec. 4: 90.9% for its INT4 draft): a row equals the truth
  with that probability; a disagreeing row has j = 1 + Binomial(k-1, (w-1)/(k-1)) wrong ids
  (mean w = ``draft_wrong_ids``), the j lowest-weight ones (the borderline experts flip first),
  replaced by ids outside the true set. Per-id recall follows: 1 - (1 - agreement) * w / k.
* **Acceptance** (dials ``acceptance``, ``acceptance_corr``): ``draft_match`` is a two-state
  Markov chain over each request's positions with stationary P(match) = ``acceptance`` and lag-1
  correlation ``acceptance_corr`` (P(match | match) = a + rho (1 - a), P(match | mismatch) =
  a (1 - rho)); rho = 0 is i.i.d. The project's captured small-moe trace measures rho = 0.07.
* **Gate weights**: the top k of E standard-normal router logits scaled by
  ``gate_temperature`` (drawn directly as order statistics), softmaxed over the top k
  (``gate_renormalize``, Mixtral/Qwen3 style) or over all E (the E-k tail mass in closed form).
  The order of experts within a row is a uniform permutation of the routed set.

Stages, one module each: ``params`` (dials, presets), ``routing`` (layout, structure, hot sets,
reuse chains, gate weights), ``predictors`` (lookahead, draft, acceptance), ``cli``. Every
component draws from its own stream (``SeedSequence(seed, spawn_key=(component, ...))``),
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

from dataclasses import dataclass

import numpy as np

from traces.errors import TraceError
from traces.presets import shape_for
from traces.provenance import project_version
from traces.shape import ModelShape
from traces.synth.cli import add_arguments, run
from traces.synth.params import (
    Profile, SynthParams, depth_profile, hot_set_size, lookahead_recall_at, synth_params_for,
)
from traces.synth.predictors import draft_rows, markov_matches, noisy_copy
from traces.synth.routing import chains, gate_weights, hot_sets, layout, structure
from traces.synth.streams import _ACCEPT, _DRAFT, _LOOKAHEAD, _rng
from traces.trace import Trace

SYNTH_VERSION = 2  # 2: draft_agreement is exact top-k set agreement; draft_match a Markov chain


@dataclass
class SynthInternals:
    """The latent state behind a synthetic trace (for tests and diagnostics, not saved)."""

    hot: np.ndarray  # (R, M, S, E) bool: hot set of each request, layer and segment
    clusters: np.ndarray  # (R, T) latent cluster per token
    preferred: np.ndarray  # (M, C, E) bool: preferred experts of each layer and cluster
    reuse: np.ndarray  # (M,) dialled reuse per MoE layer
    hot_share: np.ndarray  # (M,) dialled hot share per MoE layer
    lookahead_recall: dict[int, float]


def synthesize(params: SynthParams, seed: int, shape: ModelShape | None = None) -> Trace:
    """A seeded synthetic trace for ``params`` (``shape`` overrides the preset's routing shape)."""
    return synthesize_with_internals(params, seed, shape)[0]


def synthesize_with_internals(
    params: SynthParams, seed: int, shape: ModelShape | None = None
) -> tuple[Trace, SynthInternals]:
    """``synthesize`` plus the latent state that produced it: the stages in order."""
    shape = shape_for(params.model) if shape is None else shape
    params.validate(shape)
    if int(seed) < 0:
        raise TraceError(f"synthetic trace seed must be >= 0, got {seed}")
    R, M, E, k = params.requests, shape.num_moe_layers, shape.num_experts, shape.top_k
    lay = layout(params, seed)
    T, valid = lay.T, lay.valid
    st = structure(params, seed, R, T, M, E)
    hot = hot_sets(params, seed, st, T, E)
    expert_ids = chains(params, seed, st, hot, T, k)
    weights = gate_weights(params, seed, R, T, M, E, k)

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
            pred = noisy_copy(_rng(seed, _LOOKAHEAD, d), truth, recall_at[d], E)
            a[:, :, src] = pred.reshape(R, T, len(src), k)
        lookahead[d] = a

    # --- padding
    pad = ~valid
    expert_ids = expert_ids.astype(np.int16)
    expert_ids[pad] = -1
    weights[pad] = np.nan
    for d, a in lookahead.items():
        a[pad] = -1
        lookahead[d] = a.astype(np.int16)
    draft = draft_match = None
    if params.draft:  # from the padded routing, exactly as with_draft draws it for any trace
        draft, draft_match = _draft_columns(expert_ids, weights, valid, params, seed, E)

    reuse, hot_share = depth_profile(params.reuse, M), depth_profile(params.hot_share, M)
    derived = {
        "reuse_per_layer": [float(x) for x in reuse],
        "hot_share_per_layer": [float(x) for x in hot_share],
        "hot_set_size": hot_set_size(E),
        "lookahead_recall": {str(d): r for d, r in recall_at.items()},
        "chance": k / E,
        "draft_recall": 1 - (1 - params.draft_agreement) * params.draft_wrong_ids / k,
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
        lengths=lay.lengths,
        position=lay.position,
        step=lay.step,
        phase=lay.phase,
        expert_ids=expert_ids,
        gate_weights=weights,
        lookahead=lookahead,
        draft=draft,
        draft_match=draft_match,
        meta=meta,
    )
    internals = SynthInternals(
        hot=hot, clusters=st.clusters, preferred=st.preferred, reuse=reuse, hot_share=hot_share,
        lookahead_recall=recall_at,
    )
    return trace, internals


def with_draft(trace: Trace, params: SynthParams, seed: int) -> Trace:
    """``trace`` (captured or imported, without draft columns) with ``draft`` and ``draft_match``
    drawn by the generator's draft model from its own routing and gate weights, using the draft
    dials of ``params`` (``draft_agreement``, ``draft_wrong_ids``, ``acceptance``,
    ``acceptance_corr``). The routing is unchanged; the seed's draft streams are the generator's."""
    import dataclasses

    if trace.draft is not None:
        raise TraceError("with_draft: the trace already carries draft columns")
    params.validate(trace.shape)
    draft, match = _draft_columns(trace.expert_ids, trace.gate_weights, trace.valid_mask(), params, seed,
                                  trace.shape.num_experts)
    meta = dict(trace.meta)
    meta["draft_stand_in"] = {"seed": int(seed), "generator_version": SYNTH_VERSION, **{
        f: getattr(params, f) for f in ("draft_agreement", "draft_wrong_ids", "acceptance", "acceptance_corr")}}
    return dataclasses.replace(trace, draft=draft, draft_match=match, meta=meta)


def _draft_columns(expert_ids: np.ndarray, weights: np.ndarray | None, valid: np.ndarray, params: SynthParams,
                   seed: int, E: int) -> tuple[np.ndarray, np.ndarray]:
    """(draft (R, T, M, k) int16, draft_match (R, T) bool) from padded routing (-1 / NaN on pads)."""
    R, T, M, k = expert_ids.shape
    truth = np.where(expert_ids >= 0, expert_ids, 0).astype(np.int64).reshape(-1, k)
    w = None if weights is None else weights.reshape(-1, k)
    draft = draft_rows(_rng(seed, _DRAFT), truth, w, params.draft_agreement, params.draft_wrong_ids, E)
    draft = draft.reshape(R, T, M, k)
    draft[~valid] = -1
    match = markov_matches(_rng(seed, _ACCEPT), (R, T), params.acceptance, params.acceptance_corr) & valid
    return draft.astype(np.int16), match


__all__ = [
    "SYNTH_VERSION", "Profile", "SynthInternals", "SynthParams", "add_arguments", "depth_profile", "hot_set_size",
    "lookahead_recall_at", "run", "synth_params_for", "synthesize", "synthesize_with_internals", "with_draft",
]
