"""Loading MoE models for capture and execution, offline only.

A model comes from one of:

- a local Hugging Face checkpoint directory (``config.json`` + safetensors, transformers 5.x);
- a hub name (``org/name``) that already has a local copy in the Hugging Face cache (never
  downloaded: a name without a local copy is a clear error);
- a preset id of conf/model/ (its shipped ``<id>.config.json``) or any ``config.json`` file: a
  shape-faithful model with random weights;
- ``tiny-<family>``: a tiny random model of a supported family (tests, examples).

Any of them can be depth-reduced (``layers``: keep the first N decoder layers; same experts and
sizes) and is built directly in its target dtype. Random weights are deterministic per seed (on
the CPU; a GPU build draws from the GPU's generator).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from runtime.errors import ModelLoadError
from runtime.routing import LayerHandles, layer_handles
from sim.presets import conf_dir
from sim.spec import ModelSpec
from traces.errors import MoeOffloadError
from traces.shape import ModelShape


@dataclass(frozen=True)
class Family:
    """How one transformers model family exposes its MoE routing (see runtime.routing)."""

    model_type: str
    router_attr: str
    tiny: dict[str, Any]
    notes: str = ""


_TINY_BASE: dict[str, Any] = dict(
    vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
    pad_token_id=0, bos_token_id=2, eos_token_id=1, tie_word_embeddings=False,
    rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
)
_MLA = dict(kv_lora_rank=16, q_lora_rank=24, qk_rope_head_dim=4, qk_nope_head_dim=8, v_head_dim=8,
            num_key_value_heads=4, head_dim=4)

FAMILIES: dict[str, Family] = {
    f.model_type: f
    for f in [
        Family("mixtral", "gate", dict(num_local_experts=4, num_experts_per_tok=2),
               "softmax over all experts, top-k, renormalised"),
        Family("qwen2_moe", "gate",
               dict(num_experts=6, num_experts_per_tok=2, moe_intermediate_size=32,
                    shared_expert_intermediate_size=48, mlp_only_layers=[1], norm_topk_prob=False),
               "softmax top-k (norm_topk_prob), one gated shared expert, mlp_only_layers / decoder_sparse_step"),
        Family("qwen3_moe", "gate",
               dict(num_experts=6, num_experts_per_tok=2, moe_intermediate_size=32, decoder_sparse_step=2,
                    num_hidden_layers=4, norm_topk_prob=True, head_dim=8),
               "softmax top-k, renormalised; decoder_sparse_step / mlp_only_layers"),
        Family("olmoe", "gate", dict(num_experts=6, num_experts_per_tok=2),
               "softmax top-k (norm_topk_prob)"),
        Family("phimoe", "router", dict(num_local_experts=4, num_experts_per_tok=2),
               "sparsemixer top-2 (weights from two masked softmaxes; reordered by weight)"),
        Family("deepseek_v2", "gate",
               dict(n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, n_shared_experts=1,
                    first_k_dense_replace=1, topk_method="group_limited_greedy", n_group=2, topk_group=1,
                    **{**_MLA, "q_lora_rank": None}),
               "softmax, greedy or group-limited top-k (unsorted), x routed_scaling_factor; first_k_dense_replace; shared experts"),
        Family("deepseek_v3", "gate",
               dict(n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, n_shared_experts=1,
                    first_k_dense_replace=1, n_group=2, topk_group=1, **_MLA),
               "sigmoid + e_score_correction_bias, group-limited top-k, renormalised, x routed_scaling_factor"),
        Family("gpt_oss", "router",
               dict(num_local_experts=4, num_experts_per_tok=2, head_dim=8, sliding_window=4,
                    layer_types=["sliding_attention", "full_attention", "sliding_attention"]),
               "top-k on logits (with bias), softmax over the k; experts transposed with biases"),
    ]
}
TINY_PREFIX = "tiny-"
_EXPERT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts", "num_experts_per_tok")


# ------------------------------------------------------------------------------ configs
def tiny_config(family: str, **overrides: Any):
    """A tiny random config of a supported family (hidden 32, a few experts), for tests and examples."""
    from transformers import AutoConfig

    if family not in FAMILIES:
        raise ModelLoadError(f"unknown family {family!r}; supported: {sorted(FAMILIES)}")
    kw = {**_TINY_BASE, **FAMILIES[family].tiny, **overrides}
    n = kw["num_hidden_layers"]
    if "layer_types" in kw and len(kw["layer_types"]) != n:
        lt = FAMILIES[family].tiny.get("layer_types") or ["full_attention"]
        kw["layer_types"] = [lt[i % len(lt)] for i in range(n)]
    return AutoConfig.for_model(family, **kw)


def preset_config_path(preset: str) -> Path:
    return conf_dir() / "model" / f"{preset}.config.json"


def reduce_depth(config: Any, layers: int | None) -> Any:
    """Keep the first ``layers`` decoder layers (same shapes); per-layer lists are cut to match."""
    if layers is None:
        return config
    n = int(config.num_hidden_layers)
    if not 1 <= layers <= n:
        raise ModelLoadError(f"layers={layers} out of range: the model has {n} decoder layers")
    config.num_hidden_layers = layers
    lt = getattr(config, "layer_types", None)
    if isinstance(lt, (list, tuple)) and len(lt) >= layers:
        config.layer_types = list(lt[:layers])
    mol = getattr(config, "mlp_only_layers", None)
    if isinstance(mol, (list, tuple)):
        config.mlp_only_layers = [i for i in mol if i < layers]
    return config


def hf_config_dict(config: Any) -> dict[str, Any]:
    """``config.to_dict()`` plus the attribute-map aliases (transformers renames some keys between
    versions, e.g. qwen3_moe's num_experts -> num_local_experts in 5.24), so readers of config.json
    keys find theirs."""
    d = config.to_dict()
    for alias in getattr(config, "attribute_map", {}) or {}:
        if alias not in d:
            try:
                v = getattr(config, alias)
            except AttributeError:
                continue
            if v is not None:
                d[alias] = v
    d.setdefault("model_type", getattr(config, "model_type", None))
    return d


def spec_from_hf_config(config: Any, name: str) -> tuple[ModelShape, Any]:
    """(routing shape, full ModelSpec) of a transformers config: sim.spec.ModelSpec.from_hf_config,
    the one reader of config.json for the simulator and the runtime."""
    try:
        spec = ModelSpec.from_hf_config(hf_config_dict(config), name=name)
    except MoeOffloadError as e:  # SimError / TraceError of a config the simulator cannot read
        raise ModelLoadError(f"{name}: {e}") from None
    return spec.shape_only(), spec


def family_of(config: Any, where: str) -> Family:
    mt = getattr(config, "model_type", None)
    if mt in FAMILIES:
        return FAMILIES[mt]
    d = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    if not any(d.get(k) for k in _EXPERT_KEYS):
        raise ModelLoadError(
            f"{where}: model_type {mt!r} is a dense (non-MoE) model: no routed experts to trace"
        )
    raise ModelLoadError(f"{where}: MoE family {mt!r} is not supported; supported: {sorted(FAMILIES)}")


# ------------------------------------------------------------------------------ sources
@dataclass
class Source:
    """Where a model comes from, resolved before anything is built."""

    kind: str  # checkpoint | hub-cache | preset | config | tiny
    name: str
    path: Path | None = None
    revision: str | None = None
    config: Any = None


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def resolve_source(spec: str | os.PathLike, revision: str | None = None) -> Source:
    """Decide what ``spec`` names; never touches the network."""
    s = str(spec)
    p = Path(s).expanduser()
    if s.startswith(TINY_PREFIX) and s[len(TINY_PREFIX):] in FAMILIES:
        return Source("tiny", s)
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise ModelLoadError(f"{p}: directory has no config.json (not a Hugging Face checkpoint)")
        rev = revision
        if rev is None and p.parent.name == "snapshots":
            rev = p.name
        return Source("checkpoint", p.resolve().name if p.name else str(p), p.resolve(), rev)
    if p.suffix == ".json":
        if not p.is_file():
            raise ModelLoadError(f"{p}: no such config file")
        return Source("config", p.stem.removesuffix(".config"), p.resolve())
    if re.fullmatch(r"[A-Za-z0-9._-]+", s):
        cp = preset_config_path(s)
        if cp.is_file():
            return Source("preset", s, cp)
        known = sorted(x.name.removesuffix(".config.json") for x in cp.parent.glob("*.config.json")) if cp.parent.is_dir() else []
        raise ModelLoadError(
            f"model {s!r}: not a directory, not a preset with a config.json (known: {known}), "
            f"not {TINY_PREFIX}<family> (families: {sorted(FAMILIES)})"
        )
    if re.fullmatch(r"[A-Za-z0-9._-]+/[A-Za-z0-9._-]+", s) and not s.startswith((".", "/")):
        try:
            from huggingface_hub import snapshot_download

            local = snapshot_download(s, revision=revision, local_files_only=True)
        except Exception:  # noqa: BLE001 - any failure means: no usable local copy
            raise ModelLoadError(
                f"model {s!r}: no such directory and no local copy in the Hugging Face cache; this tool never "
                f"downloads (fetch it yourself, e.g. `hf download {s}`, then pass the directory)"
            ) from None
        lp = Path(local)
        return Source("hub-cache", s, lp, revision or lp.name)
    raise ModelLoadError(f"model {s!r}: no such directory or config file")


# ------------------------------------------------------------------------------ loading
def resolve_device(device: str | torch.device | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    d = torch.device(device)
    if d.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"device={device}: CUDA is not available here")
    return d


_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


def resolve_dtype(dtype: str | torch.dtype | None, config: Any, device: torch.device, random_weights: bool) -> torch.dtype:
    """``auto``: a checkpoint's own dtype; random weights: bf16 on a GPU, fp32 on the CPU."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        if not random_weights:
            d = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
            if isinstance(d, torch.dtype):
                return d
            if isinstance(d, str) and d in _DTYPES:
                return _DTYPES[d]
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in _DTYPES:
        raise ModelLoadError(f"dtype={dtype!r}: use one of auto, {sorted(_DTYPES)}")
    return _DTYPES[dtype]


@dataclass
class LoadedModel:
    """A loaded model with what capture needs about it."""

    model: nn.Module
    family: Family
    shape: ModelShape
    handles: list[LayerHandles]
    device: torch.device
    dtype: torch.dtype
    tokenizer: Any = None
    provenance: dict[str, Any] = field(default_factory=dict)
    spec: Any = None  # sim.spec.ModelSpec when the simulator package is present

    @property
    def config(self) -> Any:
        return self.model.config

    @property
    def moe_handles(self) -> list[LayerHandles]:
        return [h for h in self.handles if h.is_moe]

    @property
    def offloaded(self) -> bool:
        """Whether accelerate keeps some weights off the compute device."""
        dm = getattr(self.model, "hf_device_map", None) or {}
        off = ("disk",) if self.device.type == "cpu" else ("disk", "cpu")
        return any(str(v) in off for v in dm.values())


def _parse_bytes(cap: str | int) -> int:
    if isinstance(cap, int):
        return cap
    m = re.fullmatch(r"\s*([0-9.]+)\s*([KMGT]i?B|B)?\s*", str(cap), re.IGNORECASE)
    if not m:
        raise ModelLoadError(f"max_memory={cap!r}: expected a size like 512MiB, 2GB or a byte count")
    unit = (m.group(2) or "B").upper()
    mult = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
            "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}[unit]
    return int(float(m.group(1)) * mult)


def load_model(
    source: str | os.PathLike,
    *,
    layers: int | None = None,
    dtype: str | torch.dtype | None = "auto",
    device: str | torch.device | None = "auto",
    seed: int = 0,
    revision: str | None = None,
    max_memory: str | int | None = None,
    offload_folder: str | os.PathLike | None = None,
    experts_implementation: str | None = None,
    attn_implementation: str | None = None,
    config_overrides: dict[str, Any] | None = None,
) -> LoadedModel:
    """Load (or build with random weights) a supported MoE model, offline, in eval mode.

    ``max_memory`` caps the compute device's share of a checkpoint's weights; the rest is
    offloaded by accelerate (to host memory beside a GPU; to ``offload_folder`` on disk when
    the compute device is the CPU).
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    src = resolve_source(source, revision)
    dev = resolve_device(device)
    where = str(source)
    random_weights = src.kind in ("tiny", "preset", "config")

    if src.kind == "tiny":
        config = tiny_config(src.name[len(TINY_PREFIX):])
    elif src.kind in ("preset", "config"):
        try:
            d = json.loads(src.path.read_text())
        except json.JSONDecodeError as e:
            raise ModelLoadError(f"{src.path}: not valid JSON ({e})") from None
        if "model_type" not in d:
            raise ModelLoadError(f"{src.path}: config has no model_type")
        d = {k: v for k, v in d.items() if k not in ("auto_map", "architectures", "quantization_config")}
        mt = d.pop("model_type")
        try:
            config = AutoConfig.for_model(mt, **d)
        except ValueError as e:
            raise ModelLoadError(f"{src.path}: model_type {mt!r} unknown to this transformers ({e})") from None
    else:
        try:
            config = AutoConfig.from_pretrained(src.path, local_files_only=True, trust_remote_code=False)
        except ValueError as e:
            raise ModelLoadError(f"{src.path}: cannot read config.json ({e})") from None
    family = family_of(config, where)
    for k, v in (config_overrides or {}).items():
        setattr(config, k, v)
    reduce_depth(config, layers)
    dt = resolve_dtype(dtype, config, dev, random_weights)
    extra: dict[str, Any] = {}
    if experts_implementation:
        extra["experts_implementation"] = experts_implementation
    if attn_implementation:
        extra["attn_implementation"] = attn_implementation

    tokenizer = None
    if random_weights:
        if max_memory is not None:
            raise ModelLoadError(f"{where}: max_memory (offloaded capture) needs a checkpoint directory, not random weights")
        torch.manual_seed(seed)
        with torch.device(dev):
            model = AutoModelForCausalLM.from_config(config, dtype=dt, **extra)
    else:
        kw: dict[str, Any] = dict(config=config, dtype=dt, local_files_only=True, trust_remote_code=False, **extra)
        if max_memory is not None:
            cap = _parse_bytes(max_memory)
            if dev.type == "cuda":
                kw["max_memory"] = {dev.index or 0: cap, "cpu": _parse_bytes("1TiB")}
            else:
                kw["max_memory"] = {"cpu": cap}
                if offload_folder is None:
                    import tempfile

                    offload_folder = tempfile.mkdtemp(prefix="moe-offload-")
            kw["device_map"] = "auto"
            if offload_folder is not None:
                kw["offload_folder"] = str(offload_folder)
        else:
            kw["device_map"] = {"": dev.index or 0} if dev.type == "cuda" else {"": "cpu"}
        try:
            model = AutoModelForCausalLM.from_pretrained(src.path, **kw)
        except OSError as e:
            raise ModelLoadError(f"{src.path}: cannot load the checkpoint ({e})") from None
        try:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(src.path, local_files_only=True)
        except Exception:  # noqa: BLE001 - no tokenizer files: capture falls back to bytes
            tokenizer = None
    model.eval()
    model.requires_grad_(False)

    handles = layer_handles(model, family.router_attr)
    moe_found = tuple(h.index for h in handles if h.is_moe)
    name = src.name
    shape, spec = spec_from_hf_config(model.config, name)
    if tuple(shape.moe_layers) != moe_found or shape.num_layers != len(handles):
        raise ModelLoadError(
            f"{where}: MoE layers from the config {list(shape.moe_layers)} differ from the built model's {list(moe_found)}"
        )
    e0 = handles[moe_found[0]]
    if int(e0.experts.num_experts) != shape.num_experts or int(e0.router.top_k) != shape.top_k:
        raise ModelLoadError(
            f"{where}: experts/top_k from the config ({shape.num_experts}/{shape.top_k}) differ from the built model's "
            f"({int(e0.experts.num_experts)}/{int(e0.router.top_k)})"
        )

    prov: dict[str, Any] = {
        "source": str(source),
        "kind": src.kind,
        "model_type": family.model_type,
        "revision": src.revision or getattr(model.config, "_commit_hash", None),
        "weights": "random" if random_weights else "checkpoint",
        "layers": layers,
        "num_hidden_layers": int(model.config.num_hidden_layers),
        "dtype": str(dt).removeprefix("torch."),
        "experts_implementation": getattr(model.config, "_experts_implementation", None),
    }
    if random_weights:
        prov["seed"] = seed
        prov["init_device"] = dev.type
    if src.path is not None:
        cfg_file = src.path if src.path.is_file() else src.path / "config.json"
        prov["config_sha256"] = _sha256(cfg_file)
        if src.path.is_dir():
            prov["weight_files"] = [
                {"name": f.name, "bytes": f.stat().st_size} for f in sorted(src.path.glob("*.safetensors"))
            ]
    if max_memory is not None:
        prov["max_memory"] = str(max_memory)
        prov["device_map"] = {k: str(v) for k, v in (getattr(model, "hf_device_map", None) or {}).items()}
    return LoadedModel(model, family, shape, handles, dev, dt, tokenizer, prov, spec)
