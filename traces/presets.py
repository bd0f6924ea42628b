"""Routing shapes of the model presets shared by every part of the project.

Only the routing part (``ModelShape``): layers, which of them are MoE, routed experts, top-k and
shared experts. The simulator's ``ModelSpec`` presets (conf/model/) extend these with hidden
sizes, attention shape and dtypes; the values here must agree with them. Sources:
each model's config.json on the Hugging Face Hub (shipped beside the conf/model/ presets).
"""

from __future__ import annotations

from traces.errors import TraceError
from traces.shape import ModelShape


def _shape(name: str, layers: int, experts: int, top_k: int, shared: int = 0, first_dense: int = 0) -> ModelShape:
    return ModelShape(
        name=name,
        num_layers=layers,
        moe_layers=tuple(range(first_dense, layers)),
        num_experts=experts,
        top_k=top_k,
        num_shared_experts=shared,
    )


PRESETS: dict[str, ModelShape] = {
    s.name: s
    for s in (
        _shape("mixtral-8x7b", 32, 8, 2),
        _shape("phi-3.5-moe", 32, 16, 2),
        _shape("qwen1.5-moe-a2.7b", 24, 60, 4, shared=1),
        _shape("qwen3-30b-a3b", 48, 128, 8),
        # layer 0 is a dense FFN (first_k_dense_replace = 1): MoE layers are decoder layers 1..26
        _shape("deepseek-v2-lite", 27, 64, 6, shared=2, first_dense=1),
        _shape("olmoe-1b-7b", 16, 64, 8),
        _shape("gpt-oss-20b", 24, 32, 4),
        _shape("tiny", 4, 8, 2),  # for tests and examples
    )
}


def preset_names() -> list[str]:
    """The known model preset ids, in a stable order."""
    return list(PRESETS)


def shape_for(name: str) -> ModelShape:
    """The routing shape of model preset ``name``; a clear error lists the known ids."""
    try:
        return PRESETS[name]
    except (KeyError, TypeError):
        raise TraceError(f"unknown model preset {name!r}; known presets: {', '.join(PRESETS)}") from None
