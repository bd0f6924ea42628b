"""The model spec: every shape the simulator, the memory budget and the runtime need.

``ModelSpec`` extends ``traces.ModelShape`` (the routing part) with widths, the attention shape and
the expert storage dtype, and derives bytes per expert, non-expert bytes and KV-cache bytes from
them. It is built from a Hydra model preset (conf/model/<id>.yaml, ``ModelSpec.from_cfg``) or from
any Hugging Face ``config.json`` of a supported family (``ModelSpec.from_hf_config``); every real
preset ships its config.json beside its yaml and the two must give the same spec (tested).

Conventions: MoE and dense layers are named by decoder-layer index; an expert is a gated (SwiGLU)
FFN of three matrices, gate and up (hidden x inter) and down (inter x hidden); non-expert weights
are bf16; bytes are exact integers.
"""

from __future__ import annotations

import json
import math
from dataclasses import MISSING as MISSING_FACTORY, dataclass, fields
from pathlib import Path
from typing import Any, Mapping, Optional

from sim.errors import SimError
from sim.presets import hydra_schema, load_preset, setting, spec_from_dict, to_plain
from traces.errors import TraceError
from traces.shape import ModelShape

EXPERT_DTYPES = ("bf16", "fp16", "fp32", "int4", "mxfp4")
#: bytes per weight of the unquantized dtypes (a run's ``dtype=``: the weights, and the KV cache)
FLOAT_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
ATTENTION_KINDS = ("gqa", "mla")
QK_NORMS = ("none", "head", "full")
NORMS = ("rmsnorm", "layernorm")
INT4_GROUP = 128  # int4: one bf16 scale per 128 weights along each row's input dimension
MXFP4_BLOCK = 32  # mxfp4 (as GPT-OSS ships): 4-bit E2M1 values + one uint8 E8M0 scale per 32 weights
BF16_BYTES = 2

#: ModelShape's fields have placeholder defaults; a model spec must set them
REQUIRED_FIELDS = ("name", "num_layers", "moe_layers", "num_experts", "top_k")

SUPPORTED_FAMILIES = (
    "mixtral", "phimoe", "qwen2_moe", "qwen3_moe", "deepseek_v2", "deepseek_v3", "olmoe", "gpt_oss",
)


def _rows_groups(rows: int, cols: int, group: int) -> int:
    """Scale groups of a (rows x cols) matrix grouped along its input dimension ``cols``."""
    return rows * math.ceil(cols / group)


@dataclass(frozen=True)
class ModelSpec(ModelShape):
    """Shapes of one MoE model (see the module docstring for conventions).

    Attention: ``attention="gqa"`` uses num_attention_heads / num_key_value_heads / head_dim;
    ``"mla"`` (DeepSeek) uses q_lora_rank (0 = plain q projection), kv_lora_rank, qk_nope_head_dim,
    qk_rope_head_dim and v_head_dim, and ``head_dim`` is the query-key head dim (nope + rope).
    ``sliding_layers`` (decoder indices) attend to at most ``sliding_window`` keys and keep at most
    that many tokens of KV cache (GPT-OSS alternates sliding and full layers).
    """

    family: str = setting("", "Hugging Face model_type (mixtral, qwen3_moe, ...)")
    hidden_size: int = setting(0, "residual stream width (config.json hidden_size)", required=True)
    expert_intermediate_size: int = setting(0, "FFN width of one routed expert", required=True)
    shared_intermediate_size: int = setting(0, "FFN width of one shared expert; 0 if none")
    dense_intermediate_size: int = setting(0, "FFN width of the dense (non-MoE) decoder layers; 0 if none")
    num_attention_heads: int = setting(0, "query heads", required=True)
    num_key_value_heads: int = setting(0, "key/value heads (gqa)", required=True)
    head_dim: int = setting(0, "query-key head dim (mla: qk_nope_head_dim + qk_rope_head_dim)", required=True)
    attention: str = setting("gqa", "gqa | mla (DeepSeek's multi-head latent attention)")
    q_lora_rank: int = setting(0, "mla: rank of the query down-projection; 0 = a plain q projection")
    kv_lora_rank: int = setting(0, "mla: rank of the compressed key/value latent (what the KV cache holds)")
    qk_nope_head_dim: int = setting(0, "mla: per-head query-key dims without rotary embedding")
    qk_rope_head_dim: int = setting(0, "mla: per-head query-key dims with rotary embedding (shared key)")
    v_head_dim: int = setting(0, "mla: per-head value dim")
    qkv_bias: bool = setting(False, "biases on the q/k/v projections (mla: on q_a and kv_a)")
    o_bias: bool = setting(False, "bias on the attention output projection")
    qk_norm: str = setting("none", "none | head (Qwen3: RMSNorm over head_dim) | full (OLMoE: over all heads)")
    attention_sinks: bool = setting(False, "GPT-OSS: one learned sink logit per head")
    sliding_window: int = setting(0, "keys a sliding-window layer attends to (and keeps in its KV cache)")
    sliding_layers: tuple[int, ...] = setting((), "decoder layers with sliding-window attention")
    norm: str = setting("rmsnorm", "rmsnorm (weight) | layernorm (weight + bias, Phi-3.5-MoE)")
    vocab_size: int = setting(0, "vocabulary size", required=True)
    tie_word_embeddings: bool = setting(False, "the lm head shares the embedding matrix")
    lm_head_bias: bool = setting(False, "bias on the lm head")
    max_position_embeddings: int = setting(0, "longest context the model supports (0: unknown)")
    expert_dtype: str = setting("bf16", "how the routed experts are stored and moved: bf16 | fp16 | fp32 | int4 | mxfp4 "
                                        "(a float dtype also sets the other weights' and the KV cache's; run dtype= sets it)")
    expert_bias: bool = setting(False, "GPT-OSS: biases on gate_up (2*inter) and down (hidden), kept bf16")
    router_bias: bool = setting(False, "the router has a bias (GPT-OSS)")
    shared_expert_gate: bool = setting(False, "Qwen2-MoE: sigmoid gate (hidden -> 1) on the shared expert")

    # ------------------------------------------------------------------ validation
    def __post_init__(self) -> None:
        _check_field_types(self)
        try:
            super().__post_init__()
        except TraceError as e:
            raise SimError(f"model '{self.name}': {e}") from None
        object.__setattr__(self, "sliding_layers", tuple(int(x) for x in self.sliding_layers))
        where = f"model '{self.name}'"
        positive = ["hidden_size", "expert_intermediate_size", "num_attention_heads", "head_dim", "vocab_size"]
        if self.attention == "gqa":
            positive.append("num_key_value_heads")
        for f in positive:
            if int(getattr(self, f)) <= 0:
                raise SimError(f"{where}: field '{f}' must be > 0, got {getattr(self, f)!r}")
        for f in ("shared_intermediate_size", "dense_intermediate_size", "q_lora_rank", "sliding_window",
                  "max_position_embeddings"):
            if int(getattr(self, f)) < 0:
                raise SimError(f"{where}: field '{f}' must be >= 0, got {getattr(self, f)!r}")
        if self.expert_dtype not in EXPERT_DTYPES:
            raise SimError(f"{where}: expert_dtype must be one of {list(EXPERT_DTYPES)}, got {self.expert_dtype!r}")
        if self.attention not in ATTENTION_KINDS:
            raise SimError(f"{where}: attention must be one of {list(ATTENTION_KINDS)}, got {self.attention!r}")
        if self.qk_norm not in QK_NORMS:
            raise SimError(f"{where}: qk_norm must be one of {list(QK_NORMS)}, got {self.qk_norm!r}")
        if self.norm not in NORMS:
            raise SimError(f"{where}: norm must be one of {list(NORMS)}, got {self.norm!r}")
        if self.attention == "gqa" and self.num_attention_heads % self.num_key_value_heads:
            raise SimError(
                f"{where}: num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        if self.attention == "mla":
            for f in ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
                if int(getattr(self, f)) <= 0:
                    raise SimError(f"{where}: attention 'mla' needs field '{f}' > 0, got {getattr(self, f)!r}")
            if self.head_dim != self.qk_nope_head_dim + self.qk_rope_head_dim:
                raise SimError(
                    f"{where}: for attention 'mla' head_dim must be qk_nope_head_dim + qk_rope_head_dim = "
                    f"{self.qk_nope_head_dim + self.qk_rope_head_dim}, got {self.head_dim}"
                )
        if (self.num_shared_experts > 0) != (self.shared_intermediate_size > 0):
            raise SimError(
                f"{where}: num_shared_experts={self.num_shared_experts} and shared_intermediate_size="
                f"{self.shared_intermediate_size} disagree (both 0 or both > 0)"
            )
        if self.shared_expert_gate and self.num_shared_experts == 0:
            raise SimError(f"{where}: shared_expert_gate needs num_shared_experts > 0")
        if self.dense_layers and self.dense_intermediate_size <= 0:
            raise SimError(
                f"{where}: decoder layers {list(self.dense_layers)} are dense, so dense_intermediate_size must be > 0"
            )
        if self.sliding_layers:
            if self.sliding_window <= 0:
                raise SimError(f"{where}: sliding_layers given but sliding_window is {self.sliding_window}")
            bad = [x for x in self.sliding_layers if not 0 <= x < self.num_layers]
            if bad or list(self.sliding_layers) != sorted(set(self.sliding_layers)):
                raise SimError(
                    f"{where}: sliding_layers {list(self.sliding_layers)} must be strictly increasing decoder "
                    f"indices in [0, {self.num_layers})"
                )

    # ------------------------------------------------------------------ layers
    @property
    def dense_layers(self) -> tuple[int, ...]:
        """Decoder layers with a dense FFN instead of experts."""
        moe = set(self.moe_layers)
        return tuple(i for i in range(self.num_layers) if i not in moe)

    def is_moe_layer(self, layer: int) -> bool:
        return layer in self._moe_set

    @property
    def _moe_set(self) -> frozenset[int]:
        s = self.__dict__.get("_moe_set_cache")
        if s is None:
            s = frozenset(self.moe_layers)
            object.__setattr__(self, "_moe_set_cache", s)
        return s

    def is_sliding_layer(self, layer: int) -> bool:
        return layer in self.sliding_layers

    def check_layer(self, layer: int) -> None:
        if not 0 <= int(layer) < self.num_layers:
            raise SimError(f"model '{self.name}': decoder layer {layer} out of range [0, {self.num_layers})")

    # ------------------------------------------------------------------ experts
    @property
    def expert_params(self) -> int:
        """Weights of one routed expert (gate, up, down), biases excluded."""
        return 3 * self.hidden_size * self.expert_intermediate_size

    @property
    def expert_bias_params(self) -> int:
        """Bias values of one routed expert (GPT-OSS: 2*inter for gate_up + hidden for down)."""
        return (2 * self.expert_intermediate_size + self.hidden_size) if self.expert_bias else 0

    def bytes_per_expert(self, dtype: str | None = None) -> int:
        """Bytes of one routed expert stored in ``dtype`` (default: the spec's expert_dtype).

        bf16: 2 bytes per weight. int4: 4-bit weights + one bf16 scale per 128 weights along each
        row's input dimension, a row padded to whole groups (the layout of runtime.quant, what the
        INT4 draft keeps resident). mxfp4: 4-bit values + one byte scale per 32 weights (4.25
        bits/weight, as GPT-OSS ships). Biases stay bf16.
        """
        dtype = self.expert_dtype if dtype is None else dtype
        h, i = self.hidden_size, self.expert_intermediate_size
        bias = BF16_BYTES * self.expert_bias_params
        if dtype in FLOAT_BYTES:
            return FLOAT_BYTES[dtype] * self.expert_params + bias
        if dtype in ("int4", "mxfp4"):
            g = INT4_GROUP if dtype == "int4" else MXFP4_BLOCK
            scale_bytes = BF16_BYTES if dtype == "int4" else 1
            groups = 2 * _rows_groups(i, h, g) + _rows_groups(h, i, g)  # gate and up (i x h), down (h x i)
            return groups * (g // 2 + scale_bytes) + bias  # g 4-bit values + one scale per group
        raise SimError(f"model '{self.name}': unknown expert dtype {dtype!r}; known: {list(EXPERT_DTYPES)}")

    @property
    def num_routed_experts_total(self) -> int:
        """Routed experts over all MoE layers (the most slots a cache can usefully have)."""
        return self.num_moe_layers * self.num_experts

    def routed_expert_bytes_total(self, dtype: str | None = None) -> int:
        """All routed experts of all MoE layers, in ``dtype`` (default: expert_dtype)."""
        return self.num_routed_experts_total * self.bytes_per_expert(dtype)

    # ------------------------------------------------------------------ non-expert weights
    @property
    def attention_params(self) -> int:
        """Parameters of one layer's attention block (projections, their biases, q/k norms, sinks)."""
        h, nh = self.hidden_size, self.num_attention_heads
        if self.attention == "gqa":
            hd, nkv = self.head_dim, self.num_key_value_heads
            p = h * nh * hd + 2 * h * nkv * hd + nh * hd * h
            if self.qkv_bias:
                p += nh * hd + 2 * nkv * hd
            if self.qk_norm == "head":
                p += 2 * hd
            elif self.qk_norm == "full":
                p += nh * hd + nkv * hd
        else:
            qk = self.qk_nope_head_dim + self.qk_rope_head_dim
            kvl, rope = self.kv_lora_rank, self.qk_rope_head_dim
            if self.q_lora_rank:
                ql = self.q_lora_rank
                p = h * ql + ql + ql * nh * qk + (ql if self.qkv_bias else 0)
            else:
                p = h * nh * qk
            p += h * (kvl + rope) + ((kvl + rope) if self.qkv_bias else 0)  # kv_a_proj_with_mqa
            p += kvl  # kv_a_layernorm
            p += kvl * nh * (self.qk_nope_head_dim + self.v_head_dim)  # kv_b_proj
            p += nh * self.v_head_dim * h  # o_proj
        if self.o_bias:
            p += h
        if self.attention_sinks:
            p += nh
        return p

    @property
    def norm_params(self) -> int:
        """Parameters of one normalisation over hidden_size (weight, plus bias for layernorm)."""
        return self.hidden_size * (2 if self.norm == "layernorm" else 1)

    @property
    def router_params(self) -> int:
        return self.num_experts * self.hidden_size + (self.num_experts if self.router_bias else 0)

    @property
    def shared_params(self) -> int:
        """Shared experts of one MoE layer, with the Qwen sigmoid gate."""
        p = self.num_shared_experts * 3 * self.hidden_size * self.shared_intermediate_size
        return p + (self.hidden_size if self.shared_expert_gate else 0)

    @property
    def dense_ffn_params(self) -> int:
        return 3 * self.hidden_size * self.dense_intermediate_size

    def non_expert_params_breakdown(self) -> dict[str, int]:
        """Every non-expert parameter, by component (all layers summed)."""
        v, h = self.vocab_size, self.hidden_size
        return {
            "embed": v * h,
            "lm_head": 0 if self.tie_word_embeddings else v * h + (v if self.lm_head_bias else 0),
            "attention": self.num_layers * self.attention_params,
            "norms": (2 * self.num_layers + 1) * self.norm_params,
            "routers": self.num_moe_layers * self.router_params,
            "shared_experts": self.num_moe_layers * self.shared_params,
            "dense_ffn": len(self.dense_layers) * self.dense_ffn_params,
        }

    @property
    def weight_bytes(self) -> int:
        """Bytes per unquantized weight (and KV entry): the experts' float dtype (bf16, fp16 or
        fp32, a run's ``dtype=``); bf16 beside int4/mxfp4 experts."""
        return FLOAT_BYTES.get(self.expert_dtype, BF16_BYTES)

    @property
    def non_expert_params(self) -> int:
        return sum(self.non_expert_params_breakdown().values())

    @property
    def non_expert_bytes(self) -> int:
        """Bytes of everything but the routed experts (embeddings, lm head unless tied, attention,
        norms, routers, shared experts, dense FFNs), at ``weight_bytes`` each: always resident on the GPU."""
        return self.weight_bytes * self.non_expert_params

    @property
    def total_bytes(self) -> int:
        """The whole model at its expert dtype (non-expert weights bf16)."""
        return self.non_expert_bytes + self.routed_expert_bytes_total()

    # ------------------------------------------------------------------ KV cache
    @property
    def kv_bytes_per_token_layer(self) -> int:
        """KV-cache bytes one token adds at one attention layer (``weight_bytes`` per entry). MLA caches the compressed
        latent (kv_lora_rank) plus the shared rope key, as transformers 5 does."""
        if self.attention == "mla":
            return self.weight_bytes * (self.kv_lora_rank + self.qk_rope_head_dim)
        return self.weight_bytes * 2 * self.num_key_value_heads * self.head_dim

    @property
    def kv_bytes_per_token(self) -> int:
        """KV-cache bytes per token over all layers, ignoring sliding-window caps (an upper bound)."""
        return self.num_layers * self.kv_bytes_per_token_layer

    def kv_bytes(self, context_tokens: int) -> int:
        """KV-cache bytes of one request of ``context_tokens`` tokens; sliding layers keep at most
        ``sliding_window`` tokens."""
        n = int(context_tokens)
        if n < 0:
            raise SimError(f"model '{self.name}': context_tokens must be >= 0, got {context_tokens}")
        sliding = len(self.sliding_layers)
        tokens = (self.num_layers - sliding) * n + sliding * min(n, self.sliding_window)
        return tokens * self.kv_bytes_per_token_layer

    # ------------------------------------------------------------------ variants
    def with_layers(self, n: int) -> "ModelSpec":
        """Depth-reduced, shape-faithful variant: the first ``n`` decoder layers, same per-layer
        shapes (same name; num_layers says the depth)."""
        n = int(n)
        if not 1 <= n <= self.num_layers:
            raise SimError(f"model '{self.name}': layers={n} must be in [1, {self.num_layers}]")
        moe = tuple(x for x in self.moe_layers if x < n)
        if not moe:
            raise SimError(
                f"model '{self.name}': layers={n} keeps no MoE layer (the first MoE layer is decoder layer "
                f"{self.moe_layers[0]}); use layers >= {self.moe_layers[0] + 1}"
            )
        dense_left = any(x not in moe for x in range(n))
        return _replace(
            self,
            num_layers=n,
            moe_layers=moe,
            sliding_layers=tuple(x for x in self.sliding_layers if x < n),
            dense_intermediate_size=self.dense_intermediate_size if dense_left else 0,
        )

    def with_expert_dtype(self, dtype: str) -> "ModelSpec":
        return _replace(self, expert_dtype=dtype)

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["moe_layers"] = list(self.moe_layers)
        d["sliding_layers"] = list(self.sliding_layers)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str = "ModelSpec") -> "ModelSpec":
        return spec_from_dict(cls, d, where, REQUIRED_FIELDS)

    # ------------------------------------------------------------------ Hydra
    @classmethod
    def from_cfg(cls, cfg: Any) -> "ModelSpec":
        """Spec from a composed ``model`` group node (or a plain mapping with the same keys).

        ``layers`` (if set) gives the depth-reduced variant; ``hf_config`` is informational here
        (the runtime uses it to build the model)."""
        d = to_plain(cfg)
        layers = d.pop("layers", None)
        d.pop("hf_config", None)
        spec = cls.from_dict(d, where=f"model '{d.get('name', '?')}'")
        return spec.with_layers(layers) if layers is not None else spec

    @classmethod
    def from_preset(cls, model_id: str, layers: int | None = None, root: Path | None = None) -> "ModelSpec":
        """Spec of preset conf/model/<model_id>.yaml without Hydra (composed with the schema)."""
        cfg = load_preset("model", model_id, ModelConf, root)
        if layers is not None:
            cfg["layers"] = int(layers)
        return cls.from_cfg(cfg)

    # ------------------------------------------------------------------ Hugging Face
    @classmethod
    def from_hf_config(cls, path_or_dict: str | Path | Mapping[str, Any], name: str | None = None) -> "ModelSpec":
        """Spec from a transformers ``config.json`` (a file, a checkpoint directory or a dict) of a
        supported family: mixtral, phimoe, qwen2_moe, qwen3_moe, deepseek_v2, deepseek_v3, olmoe, gpt_oss.

        MoE layers come from first_k_dense_replace (DeepSeek), decoder_sparse_step / mlp_only_layers
        (Qwen), all layers otherwise; keyed by decoder index. Experts quantized with MXFP4 (GPT-OSS's
        quantization_config) give expert_dtype 'mxfp4'. A non-MoE config or a missing field is a
        SimError that names the field.
        """
        d, where = _read_hf(path_or_dict)
        return _spec_from_hf(d, where, name)

    def shape_summary(self) -> str:
        """One line for logs and reports."""
        return (
            f"{self.name}: {self.num_layers} layers ({self.num_moe_layers} MoE), {self.num_experts} experts top-{self.top_k}"
            f", {self.bytes_per_expert() / 2**20:.2f} MiB/expert ({self.expert_dtype}),"
            f" non-expert {self.non_expert_bytes / 1e9:.2f} GB"
        )


def _check_field_types(obj: Any) -> None:
    """Coerce integer-like values to int and reject wrong types, naming the field (specs come from
    YAML, JSON and command lines)."""
    import operator

    where = f"{type(obj).__name__} '{getattr(obj, 'name', '?')}'"
    for f in fields(obj):
        v = getattr(obj, f.name)
        default = f.default if f.default_factory is MISSING_FACTORY else f.default_factory()
        if isinstance(default, bool):
            if not isinstance(v, bool):
                raise SimError(f"{where}: field '{f.name}' must be true/false, got {v!r}")
        elif isinstance(default, int):
            if isinstance(v, bool):
                raise SimError(f"{where}: field '{f.name}' must be an integer, got {v!r}")
            try:
                object.__setattr__(obj, f.name, operator.index(v))
            except TypeError:
                raise SimError(f"{where}: field '{f.name}' must be an integer, got {v!r}") from None
        elif isinstance(default, str):
            if not isinstance(v, str):
                raise SimError(f"{where}: field '{f.name}' must be a string, got {v!r}")
        elif isinstance(default, tuple):
            if isinstance(v, (str, bytes)) or not hasattr(v, "__iter__"):
                raise SimError(f"{where}: field '{f.name}' must be a list of integers, got {v!r}")
            try:
                object.__setattr__(obj, f.name, tuple(operator.index(x) for x in v))
            except TypeError:
                raise SimError(f"{where}: field '{f.name}' must be a list of integers, got {v!r}") from None


def _replace(spec: ModelSpec, **changes: Any) -> ModelSpec:
    d = spec.to_dict()
    d.update(changes)
    return ModelSpec(**d)


# ---------------------------------------------------------------------------- Hugging Face parsing
def _read_hf(path_or_dict: str | Path | Mapping[str, Any]) -> tuple[dict[str, Any], str]:
    if isinstance(path_or_dict, Mapping):
        return dict(path_or_dict), "config dict"
    p = Path(path_or_dict)
    if p.is_dir():
        p = p / "config.json"
    if not p.is_file():
        raise SimError(f"{p}: no such config.json")
    try:
        d = json.loads(p.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise SimError(f"{p}: not a readable JSON config: {e}") from None
    if not isinstance(d, dict):
        raise SimError(f"{p}: config.json must hold a JSON object")
    return d, str(p)


class _Fields:
    """Typed access to a config.json with errors that name the field."""

    def __init__(self, d: Mapping[str, Any], where: str, family: str) -> None:
        self.d, self.where, self.family = d, where, family

    def _check(self, key: str, v: Any, kind: type) -> Any:
        if kind is int and (isinstance(v, bool) or not isinstance(v, int)):
            if isinstance(v, float) and v.is_integer():
                return int(v)
            raise SimError(f"{self.where}: field '{key}' must be an integer, got {v!r}")
        if kind is bool and not isinstance(v, bool):
            raise SimError(f"{self.where}: field '{key}' must be true/false, got {v!r}")
        return v

    def req(self, key: str, kind: type = int, alt: tuple[str, ...] = ()) -> Any:
        for k in (key, *alt):
            v = self.d.get(k)
            if v is not None:
                return self._check(k, v, kind)
        also = f" (or an alias: {', '.join(repr(k) for k in alt)})" if alt else ""
        raise SimError(f"{self.where}: missing field '{key}'{also}, needed for model_type '{self.family}'")

    def opt(self, key: str, default: Any, kind: type = int) -> Any:
        v = self.d.get(key)
        return default if v is None else self._check(key, v, kind)


def _spec_from_hf(d: Mapping[str, Any], where: str, name: str | None) -> ModelSpec:
    family = d.get("model_type")
    if family is None:
        raise SimError(f"{where}: missing field 'model_type'")
    if family not in SUPPORTED_FAMILIES:
        raise SimError(
            f"{where}: model_type '{family}' is not a supported MoE family (field 'model_type'); "
            f"supported: {', '.join(SUPPORTED_FAMILIES)}"
        )
    f = _Fields(d, where, family)
    kw = _hf_common(f, name)
    kw.update(_HF_FAMILY[family](f, kw["num_layers"]))
    kw.update(_hf_quantization(d, where))
    return ModelSpec(**kw)


def _hf_common(f: _Fields, name: str | None) -> dict[str, Any]:
    """Fields every family names alike, and the routed experts (whose count key varies)."""
    d, where, family = f.d, f.where, f.family
    h = f.req("hidden_size")
    layers = f.req("num_hidden_layers")
    heads = f.req("num_attention_heads")
    kv_heads = f.opt("num_key_value_heads", heads)
    vocab = f.req("vocab_size")
    kw: dict[str, Any] = dict(
        name=name or str(d.get("_name_or_path") or family),
        family=family,
        num_layers=layers,
        hidden_size=h,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=f.opt("head_dim", h // heads if heads else 0),
        vocab_size=vocab,
        tie_word_embeddings=f.opt("tie_word_embeddings", False, bool),
        max_position_embeddings=f.opt("max_position_embeddings", 0),
    )
    experts_key = {"mixtral": "num_local_experts", "phimoe": "num_local_experts", "gpt_oss": "num_local_experts",
                   "qwen2_moe": "num_experts", "qwen3_moe": "num_experts", "olmoe": "num_experts",
                   "deepseek_v2": "n_routed_experts", "deepseek_v3": "n_routed_experts"}[family]
    # transformers renames some keys between versions (5.24 saves qwen3_moe's num_experts as
    # num_local_experts): accept the other families' names as aliases
    aliases = tuple(k for k in ("num_local_experts", "num_experts", "n_routed_experts") if k != experts_key)
    experts = f.req(experts_key, alt=aliases)
    if experts <= 0:
        raise SimError(f"{where}: field '{experts_key}' is {experts}: not an MoE config")
    top_k = f.req("num_experts_per_tok", alt=("experts_per_token",) if family == "gpt_oss" else ())
    kw.update(num_experts=experts, top_k=top_k)
    return kw


def _hf_mixtral(f: _Fields, layers: int) -> dict[str, Any]:
    """mixtral, phimoe: every layer sparse; Phi-3.5-MoE adds biases and layernorm."""
    kw: dict[str, Any] = dict(moe_layers=tuple(range(layers)), expert_intermediate_size=f.req("intermediate_size"))
    if f.family == "phimoe":
        bias = f.opt("attention_bias", False, bool)
        kw.update(qkv_bias=bias, o_bias=bias, norm="layernorm", lm_head_bias=f.opt("lm_head_bias", False, bool))
    return kw


def _hf_qwen(f: _Fields, layers: int) -> dict[str, Any]:
    """qwen2_moe, qwen3_moe: MoE layers from decoder_sparse_step and mlp_only_layers."""
    step = f.opt("decoder_sparse_step", 1)
    if step < 1:
        raise SimError(f"{f.where}: field 'decoder_sparse_step' must be >= 1, got {step}")
    only = set(f.d.get("mlp_only_layers") or [])
    moe = tuple(i for i in range(layers) if i not in only and (i + 1) % step == 0)
    kw: dict[str, Any] = dict(moe_layers=moe, expert_intermediate_size=f.req("moe_intermediate_size"))
    if len(moe) < layers:
        kw["dense_intermediate_size"] = f.req("intermediate_size")
    if f.family == "qwen2_moe":
        shared = f.opt("shared_expert_intermediate_size", 0)
        kw.update(qkv_bias=f.opt("qkv_bias", True, bool))
        if shared > 0:
            kw.update(num_shared_experts=1, shared_intermediate_size=shared, shared_expert_gate=True)
    else:
        bias = f.opt("attention_bias", False, bool)
        kw.update(qkv_bias=bias, o_bias=bias, qk_norm="head")
    return kw


def _hf_deepseek(f: _Fields, layers: int) -> dict[str, Any]:
    """deepseek_v2, deepseek_v3: MoE from first_k_dense_replace every moe_layer_freq layers; MLA."""
    first = f.opt("first_k_dense_replace", 0)
    freq = f.opt("moe_layer_freq", 1)
    if freq < 1:
        raise SimError(f"{f.where}: field 'moe_layer_freq' must be >= 1, got {freq}")
    moe = tuple(i for i in range(layers) if i >= first and i % freq == 0)
    inter = f.req("moe_intermediate_size")
    shared = f.opt("n_shared_experts", 0)
    bias = f.opt("attention_bias", False, bool)
    nope, rope = f.req("qk_nope_head_dim"), f.req("qk_rope_head_dim")
    kw: dict[str, Any] = dict(
        moe_layers=moe,
        expert_intermediate_size=inter,
        num_shared_experts=shared,
        shared_intermediate_size=inter if shared else 0,
        attention="mla",
        q_lora_rank=f.opt("q_lora_rank", 0),
        kv_lora_rank=f.req("kv_lora_rank"),
        qk_nope_head_dim=nope,
        qk_rope_head_dim=rope,
        v_head_dim=f.req("v_head_dim"),
        head_dim=nope + rope,
        qkv_bias=bias,
        o_bias=bias,
    )
    if len(moe) < layers:
        kw["dense_intermediate_size"] = f.req("intermediate_size")
    return kw


def _hf_olmoe(f: _Fields, layers: int) -> dict[str, Any]:
    bias = f.opt("attention_bias", False, bool)
    return dict(moe_layers=tuple(range(layers)), expert_intermediate_size=f.req("intermediate_size"),
                qkv_bias=bias, o_bias=bias, qk_norm="full")


def _hf_gpt_oss(f: _Fields, layers: int) -> dict[str, Any]:
    """gpt_oss: sliding and full attention layers alternate (layer_types); sinks and biases."""
    bias = f.opt("attention_bias", True, bool)
    types = f.d.get("layer_types") or []
    if types and len(types) != layers:
        raise SimError(f"{f.where}: field 'layer_types' has {len(types)} entries for num_hidden_layers={layers}")
    sliding = tuple(i for i, t in enumerate(types) if t == "sliding_attention")
    return dict(
        moe_layers=tuple(range(layers)),
        expert_intermediate_size=f.req("intermediate_size"),
        head_dim=f.opt("head_dim", 64),
        qkv_bias=bias,
        o_bias=bias,
        attention_sinks=True,
        sliding_layers=sliding,
        sliding_window=f.opt("sliding_window", 0) if sliding else 0,
        expert_bias=True,
        router_bias=True,
    )


_HF_FAMILY = {"mixtral": _hf_mixtral, "phimoe": _hf_mixtral, "qwen2_moe": _hf_qwen, "qwen3_moe": _hf_qwen,
              "deepseek_v2": _hf_deepseek, "deepseek_v3": _hf_deepseek, "olmoe": _hf_olmoe, "gpt_oss": _hf_gpt_oss}


def _hf_quantization(d: Mapping[str, Any], where: str) -> dict[str, Any]:
    """Experts quantized with MXFP4 (GPT-OSS as shipped) are moved as mxfp4; other methods are refused."""
    q = d.get("quantization_config")
    if not q:
        return {}
    method = q.get("quant_method") if isinstance(q, Mapping) else None
    if method != "mxfp4":
        raise SimError(
            f"{where}: field 'quantization_config.quant_method' is {method!r}; only 'mxfp4' "
            "(GPT-OSS as shipped) is understood: give the unquantized config"
        )
    return {"expert_dtype": "mxfp4"}


# ---------------------------------------------------------------------------- Hydra schema
#: the ``model`` group's schema: ModelSpec's fields, plus what only the config has
ModelConf = hydra_schema(
    ModelSpec, "ModelConf", required=REQUIRED_FIELDS,
    extra=[
        ("layers", Optional[int], setting(None, "depth reduction: keep the first N decoder layers (same shapes)")),
        ("hf_config", Optional[str], setting(None, "the Hugging Face config.json shipped beside the preset "
                                               "(relative to conf/model/); presets and config.json agree (tested)")),
    ],
)
