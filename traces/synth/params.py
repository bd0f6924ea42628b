"""The generator's dials (``SynthParams``), their depth profiles and the model-family presets."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from traces.errors import TraceError
from traces.presets import shape_for
from traces.shape import ModelShape
from traces.stats import top_quarter_size

Profile = tuple[float, float, float]


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
    draft_agreement: float = field(
        default=0.9, metadata=_help("P(the draft's top-k set equals the target's) per (token, layer)")
    )
    draft_wrong_ids: float = field(
        default=1.0, metadata=_help("mean wrong ids in a draft row that disagrees, in [1, top_k]")
    )
    acceptance: float = field(default=0.85, metadata=_help("P(draft_match) per token (stationary)"))
    acceptance_corr: float = field(
        default=0.0, metadata=_help("lag-1 correlation of draft_match between consecutive tokens, in [0, 1]")
    )
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
            "draft_agreement", "acceptance", "acceptance_corr",
        ):
            if not 0.0 <= float(getattr(self, name)) <= 1.0:
                raise bad(name, "must be in [0, 1]")
        for name in ("global_skew", "affinity", "topic_alpha"):
            if not float(getattr(self, name)) >= 0.0:
                raise bad(name, "must be >= 0")
        if not float(self.gate_temperature) > 0.0:
            raise bad("gate_temperature", "must be > 0")
        if not 1.0 <= float(self.draft_wrong_ids) <= k:
            raise bad("draft_wrong_ids", f"must be in [1, top_k = {k}]")
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

