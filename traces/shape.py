"""The routing-relevant shape of an MoE model, shared by traces, the simulator and the runtime."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from traces.errors import TraceError


@dataclass(frozen=True)
class ModelShape:
    """What a routing trace needs to know about its model.

    ``moe_layers`` are decoder-layer indices (not an MoE-layer counter), so sparse layouts
    (first-k dense layers, ``decoder_sparse_step``) keep the model's own numbering.
    """

    name: str = field(default="unknown", metadata={"help": "the model's name (a conf/model preset id)"})
    num_layers: int = field(default=1, metadata={"help": "decoder layers (config.json num_hidden_layers)"})
    moe_layers: tuple[int, ...] = field(default=(0,), metadata={"help": "decoder layers with routed experts"})
    num_experts: int = field(default=8, metadata={"help": "routed experts per MoE layer"})
    top_k: int = field(default=2, metadata={"help": "routed experts each token uses per MoE layer"})
    num_shared_experts: int = field(default=0, metadata={"help": "always-active shared experts per MoE layer"})

    def __post_init__(self) -> None:
        object.__setattr__(self, "moe_layers", tuple(int(x) for x in self.moe_layers))
        if self.num_layers < 1:
            raise TraceError(f"ModelShape.num_layers must be >= 1, got {self.num_layers}")
        if self.num_experts < 1:
            raise TraceError(f"ModelShape.num_experts must be >= 1, got {self.num_experts}")
        if not 1 <= self.top_k <= self.num_experts:
            raise TraceError(
                f"ModelShape.top_k must be in [1, num_experts={self.num_experts}], got {self.top_k}"
            )
        if self.num_shared_experts < 0:
            raise TraceError(f"ModelShape.num_shared_experts must be >= 0, got {self.num_shared_experts}")
        if not self.moe_layers:
            raise TraceError("ModelShape.moe_layers is empty: an MoE model needs at least one MoE layer")
        if list(self.moe_layers) != sorted(set(self.moe_layers)):
            raise TraceError(f"ModelShape.moe_layers must be strictly increasing, got {list(self.moe_layers)}")
        if self.moe_layers[0] < 0 or self.moe_layers[-1] >= self.num_layers:
            raise TraceError(
                f"ModelShape.moe_layers {list(self.moe_layers)} out of range for num_layers={self.num_layers}"
            )

    @property
    def num_moe_layers(self) -> int:
        return len(self.moe_layers)

    def moe_index(self, layer: int) -> int:
        """Ordinal of decoder layer ``layer`` among the MoE layers (the dense arrays' layer axis)."""
        try:
            return self.moe_layers.index(layer)
        except ValueError:
            raise TraceError(f"decoder layer {layer} is not an MoE layer of {self.name}") from None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["moe_layers"] = list(self.moe_layers)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "ModelShape") -> "ModelShape":
        known = {f for f in cls.__dataclass_fields__}
        missing = [f for f in ("num_layers", "moe_layers", "num_experts", "top_k") if f not in d]
        if missing:
            raise TraceError(f"{where}: missing field(s) {missing}")
        return cls(**{k: v for k, v in d.items() if k in known})

    def shape_only(self) -> "ModelShape":
        """Exactly the ModelShape part (drops a subclass's extra fields)."""
        return ModelShape(
            name=self.name,
            num_layers=self.num_layers,
            moe_layers=self.moe_layers,
            num_experts=self.num_experts,
            top_k=self.top_k,
            num_shared_experts=self.num_shared_experts,
        )
