"""Per-family routing seams of transformers 5.x MoE models.

Every supported family (runtime.models.FAMILIES) has, per decoder layer ``i``:
``model.model.layers[i].mlp`` (the MoE block on MoE layers, a dense MLP otherwise),
``mlp.<router_attr>`` (``gate`` or ``router``) returning ``(logits, top_k_weights, top_k_index)``,
``mlp.experts`` (a fused experts module whose forward receives ``(hidden, top_k_index,
top_k_weights)``: exactly what the experts compute with) and ``post_attention_layernorm``
(the norm in front of the block; its input is the residual stream after attention).

Those are the seams used here: the experts' input is the ground truth of routing, and the
router of layer ``l+d`` applied to ``post_attention_layernorm_{l+d}(residual_l)`` is the
lookahead prediction (the next-layer gate of Pre-gated MoE, arXiv 2308.12066). Ids are always reported ordered by gate weight
(descending; DeepSeek's routers return them unsorted).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


@dataclass(frozen=True)
class LayerHandles:
    """The modules of one decoder layer that routing capture touches (router/experts None if dense)."""

    index: int
    layer: nn.Module
    block: nn.Module
    post_norm: nn.Module
    router: nn.Module | None
    experts: nn.Module | None

    @property
    def is_moe(self) -> bool:
        return self.experts is not None


def base_model(model: nn.Module) -> nn.Module:
    """The decoder stack under a *ForCausalLM (``model.model`` for every supported family)."""
    prefix = getattr(model, "base_model_prefix", "model")
    inner = getattr(model, prefix, None)
    if inner is None or not hasattr(inner, "layers"):
        raise TypeError(f"{type(model).__name__}: no decoder stack at .{prefix}.layers")
    return inner


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    return base_model(model).layers


def layer_handles(model: nn.Module, router_attr: str, block_attr: str = "mlp",
                  experts_attr: str = "experts", norm_attr: str = "post_attention_layernorm") -> list[LayerHandles]:
    """Handles for every decoder layer, keyed by decoder index (sparse layouts keep their numbering)."""
    out = []
    for i, layer in enumerate(decoder_layers(model)):
        block = getattr(layer, block_attr)
        experts = getattr(block, experts_attr, None)
        router = getattr(block, router_attr, None) if experts is not None else None
        if experts is not None and router is None:
            raise TypeError(f"layer {i}: {type(block).__name__} has experts but no .{router_attr} router")
        out.append(LayerHandles(i, layer, block, getattr(layer, norm_attr), router, experts))
    return out


def sort_by_weight(weights: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Order each row's top-k by gate weight, descending (stable: ties keep the router's order)."""
    w, order = torch.sort(weights.float(), dim=-1, descending=True, stable=True)
    return w, torch.gather(ids, -1, order)


def route(router: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Run a router on ``x`` ([N, H]); returns (weights float32, ids int64), ordered by weight."""
    out: Any = router(x.reshape(-1, x.shape[-1]))
    if not (isinstance(out, tuple) and len(out) == 3):
        raise TypeError(
            f"{type(router).__name__} returned {type(out).__name__}; expected (logits, weights, indices) (transformers 5.x)"
        )
    _, w, ids = out
    return sort_by_weight(w, ids)


def lookahead_route(target: LayerHandles, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Layer ``target``'s routing of another layer's post-attention residual (normalised by target's norm)."""
    if target.router is None:
        raise ValueError(f"layer {target.index} is dense: no router to look ahead with")
    w_dev = next(iter(target.post_norm.parameters()), None)
    if w_dev is not None and w_dev.device.type != "meta":
        residual = residual.to(w_dev.device)
    return route(target.router, target.post_norm(residual))


def experts_call_args(args: tuple, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(hidden, top_k_index, top_k_weights) from an experts forward call, positional or keyword."""
    vals = list(args)
    names = (("hidden_states",), ("top_k_index", "router_indices"), ("top_k_weights", "routing_weights"))
    for pos, keys in enumerate(names):
        if len(vals) <= pos:
            for k in keys:
                if k in kwargs:
                    vals.append(kwargs[k])
                    break
            else:
                raise TypeError(f"experts forward called without {keys[0]}")
    return vals[0], vals[1], vals[2]
