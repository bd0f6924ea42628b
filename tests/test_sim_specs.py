"""ModelSpec and HardwareSpec: presets compose, config.json round-trips, sizes match the hand-derived ones."""

from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path

import pytest

from sim.errors import SimError
from sim.config import register_configs
from sim.hardware import HardwareConf, HardwareSpec
from sim.presets import conf_dir
from sim.spec import ModelConf, ModelSpec

CONF = conf_dir()
MODELS = ["mixtral-8x7b", "phi-3.5-moe", "qwen1.5-moe-a2.7b", "qwen3-30b-a3b", "deepseek-v2-lite",
          "olmoe-1b-7b", "gpt-oss-20b", "tiny", "small-moe"]
REAL = [m for m in MODELS if m not in ("tiny", "small-moe")]
# the project's own trained model: its config.json lives with its checkpoint
HF_CONFIG = {m: f"{m}.config.json" for m in MODELS} | {"small-moe": "../../models/small-moe/config.json"}
HARDWARE = ["rtx3090", "rtx4090", "l4", "a100-40g-pcie4", "h100-pcie5", "h100-sxm", "h200"]

# From each model's config.json on the Hugging Face Hub, by hand: (params per expert = 3 x hidden x
# expert intermediate, bytes per expert bf16, routed experts / layer, top-k, MoE layers, total layers)
ANCHORS = {
    "mixtral-8x7b": (176_160_768, 352_321_536, 8, 2, 32, 32),
    "phi-3.5-moe": (78_643_200, 157_286_400, 16, 2, 32, 32),
    "qwen1.5-moe-a2.7b": (8_650_752, 17_301_504, 60, 4, 24, 24),
    "qwen3-30b-a3b": (4_718_592, 9_437_184, 128, 8, 48, 48),
    "deepseek-v2-lite": (8_650_752, 17_301_504, 64, 6, 26, 27),
    "olmoe-1b-7b": (6_291_456, 12_582_912, 64, 8, 16, 16),
    "gpt-oss-20b": (24_883_200, 49_783_680, 32, 4, 24, 24),
}
# Published total parameter counts (billions), a check on non_expert_bytes.
TOTAL_B = {"mixtral-8x7b": 46.7, "phi-3.5-moe": 41.9, "qwen1.5-moe-a2.7b": 14.3, "qwen3-30b-a3b": 30.5,
           "deepseek-v2-lite": 15.7, "olmoe-1b-7b": 6.9, "gpt-oss-20b": 20.9}


@pytest.fixture(scope="module")
def hydra_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny primary config in tmp that finds the shipped groups through hydra.searchpath, plus a
    measured hardware profile fixture under hardware/measured/."""
    d = tmp_path_factory.mktemp("hydra")
    (d / "config.yaml").write_text(
        "defaults:\n  - model: tiny\n  - hardware: rtx4090\n  - _self_\n"
        f"hydra:\n  searchpath:\n    - file://{CONF}\n"
    )
    (d / "hardware" / "measured").mkdir(parents=True)
    (d / "hardware" / "measured" / "fixture.yaml").write_text(MEASURED_YAML)
    return d


MEASURED_YAML = """\
defaults:
  - /schema/hardware@_here_
  - _self_
name: measured/fixture
memory_gb: 24.0
flops_bf16: 1.0e+14
hbm_bandwidth: 9.0e+11
launch_overhead_s: 3.0e-6
workspace_gb: 1.0
h2d_gbps: 20.0
d2h_gbps: 21.0
pageable_h2d_gbps: 10.0
pageable_d2h_gbps: 11.0
pinned_curve: [[1048576, 0.9], [67108864, 1.0]]
copy_latency_s: 5.0e-6
profile_table: fixture.parquet
"""


def compose(hydra_dir: Path, overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    register_configs()
    register_configs()  # idempotent
    with initialize_config_dir(config_dir=str(hydra_dir), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=overrides)


# ------------------------------------------------------------------ composition
@pytest.mark.parametrize("model_id", MODELS)
def test_every_model_preset_composes_through_hydra(hydra_dir: Path, model_id: str) -> None:
    from omegaconf import OmegaConf

    cfg = compose(hydra_dir, [f"model={model_id}"])
    assert OmegaConf.missing_keys(cfg.model) == set()
    spec = ModelSpec.from_cfg(cfg.model)
    assert spec.name == model_id
    assert spec == ModelSpec.from_preset(model_id)
    assert cfg.model.hf_config == HF_CONFIG[model_id]
    assert (CONF / "model" / cfg.model.hf_config).is_file()


@pytest.mark.parametrize("hw_id", HARDWARE)
def test_every_hardware_preset_composes_through_hydra(hydra_dir: Path, hw_id: str) -> None:
    from omegaconf import OmegaConf

    cfg = compose(hydra_dir, [f"hardware={hw_id}"])
    assert OmegaConf.missing_keys(cfg.hardware) == set()
    hw = HardwareSpec.from_cfg(cfg.hardware)
    assert hw.name == hw_id
    assert hw == HardwareSpec.from_preset(hw_id)


def test_every_shipped_preset_is_tested() -> None:
    assert sorted(p.stem for p in (CONF / "model").glob("*.yaml")) == sorted(MODELS)
    assert sorted(p.stem for p in (CONF / "hardware").glob("*.yaml")) == sorted(HARDWARE)
    assert sorted(p.name.removesuffix(".config.json") for p in (CONF / "model").glob("*.config.json")) == sorted(
        m for m in MODELS if m != "small-moe")


def test_overrides_from_the_command_line(hydra_dir: Path) -> None:
    cfg = compose(hydra_dir, ["model=deepseek-v2-lite", "model.layers=3", "hardware=h200", "hardware.h2d_gbps=25",
                              "hardware.host_memory=pageable", "hardware.link_pace_gbps=8"])
    spec = ModelSpec.from_cfg(cfg.model)
    assert (spec.num_layers, spec.moe_layers) == (3, (1, 2))
    hw = HardwareSpec.from_cfg(cfg.hardware)
    assert (hw.h2d_gbps, hw.host_memory, hw.link_pace_gbps) == (25.0, "pageable", 8.0)


@pytest.mark.parametrize("override", ["model.hidden_size=oops", "model.nonexistent=1", "hardware.memory_gb=big",
                                      "hardware.copy_engines=1.5"])
def test_bad_overrides_are_rejected(hydra_dir: Path, override: str) -> None:
    with pytest.raises(Exception):
        compose(hydra_dir, [override])


def test_bad_values_in_a_composed_config_name_the_field(hydra_dir: Path) -> None:
    cfg = compose(hydra_dir, ["hardware.host_memory=cxl"])
    with pytest.raises(SimError, match="host_memory"):
        HardwareSpec.from_cfg(cfg.hardware)
    cfg = compose(hydra_dir, ["model.expert_dtype=fp8"])
    with pytest.raises(SimError, match="expert_dtype"):
        ModelSpec.from_cfg(cfg.model)
    cfg = compose(hydra_dir, ["model.layers=9"])
    with pytest.raises(SimError, match="layers=9"):
        ModelSpec.from_cfg(cfg.model)


def test_measured_profile_composes_and_loads(hydra_dir: Path) -> None:
    cfg = compose(hydra_dir, ["hardware=measured/fixture"])
    hw = HardwareSpec.from_cfg(cfg.hardware)
    assert hw.name == "measured/fixture" and hw.d2h_gbps == 21.0
    base = hydra_dir / "hardware" / "measured"
    assert hw.profile_table_path(base) == base / "fixture.parquet"
    # without Hydra: the relative table path is resolved against the YAML's folder
    hw2 = HardwareSpec.from_preset("measured/fixture", root=hydra_dir)
    assert Path(hw2.profile_table) == (base / "fixture.parquet").resolve()
    assert hw2.replace(profile_table=hw.profile_table) == hw


def test_unknown_preset_lists_the_known_ones(tmp_path: Path) -> None:
    with pytest.raises(SimError, match="unknown model preset 'mixtral'.*mixtral-8x7b"):
        ModelSpec.from_preset("mixtral")
    with pytest.raises(SimError, match="unknown hardware preset 'a100'.*a100-40g-pcie4"):
        HardwareSpec.from_preset("a100")


def test_schemas_mirror_the_specs() -> None:
    assert [f.name for f in fields(ModelConf)] == [f.name for f in fields(ModelSpec)] + ["layers", "hf_config"]
    assert [f.name for f in fields(HardwareConf)] == [f.name for f in fields(HardwareSpec)]


def test_memory_gib_gives_the_budget() -> None:
    d = HardwareSpec.from_preset("a100-40g-pcie4").to_dict()
    assert d["memory_gb"] == 40 * 2**30 / 1e9  # the A100-40GB preset: 40 GiB
    d["memory_gib"] = 24
    assert HardwareSpec.from_dict(d).memory_gb == pytest.approx(25.769803776)
    d["memory_gib"] = 0
    with pytest.raises(SimError, match="'memory_gib' must be a number > 0"):
        HardwareSpec.from_dict(d)


# ------------------------------------------------------------------ config.json
@pytest.mark.parametrize("model_id", MODELS)
def test_config_json_round_trips_into_the_preset_spec(model_id: str) -> None:
    path = (CONF / "model" / HF_CONFIG[model_id]).resolve()
    assert ModelSpec.from_hf_config(path, name=model_id) == ModelSpec.from_preset(model_id)
    assert ModelSpec.from_hf_config(json.loads(path.read_text()), name=model_id) == ModelSpec.from_preset(model_id)


def test_from_hf_config_accepts_a_checkpoint_directory(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text((CONF / "model" / "qwen3-30b-a3b.config.json").read_text())
    assert ModelSpec.from_hf_config(tmp_path, name="qwen3-30b-a3b") == ModelSpec.from_preset("qwen3-30b-a3b")
    assert ModelSpec.from_hf_config(tmp_path).name == "qwen3_moe"


def _hf(model_id: str) -> dict:
    return json.loads((CONF / "model" / HF_CONFIG[model_id]).read_text())


def test_from_hf_config_sparse_layouts() -> None:
    d = _hf("qwen3-30b-a3b") | {"num_hidden_layers": 6, "decoder_sparse_step": 2, "mlp_only_layers": [3]}
    s = ModelSpec.from_hf_config(d)
    assert s.moe_layers == (1, 5) and s.dense_layers == (0, 2, 3, 4) and s.dense_intermediate_size == 6144
    d = _hf("deepseek-v2-lite") | {"first_k_dense_replace": 3}
    assert ModelSpec.from_hf_config(d).moe_layers == tuple(range(3, 27))
    assert ModelSpec.from_hf_config(_hf("gpt-oss-20b")).sliding_layers == tuple(range(0, 24, 2))


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"model_type": "llama"}, "model_type 'llama' is not a supported MoE family"),
        ({"model_type": None}, "missing field 'model_type'"),
        ({"num_local_experts": 0}, "field 'num_local_experts' is 0: not an MoE config"),
        ({"num_local_experts": None}, "missing field 'num_local_experts' .or an alias: 'num_experts'"),
        ({"hidden_size": None}, "missing field 'hidden_size'"),
        ({"hidden_size": "4096"}, "field 'hidden_size' must be an integer"),
        ({"num_experts_per_tok": 9}, "top_k"),
        ({"quantization_config": {"quant_method": "gptq"}}, "quantization_config.quant_method"),
    ],
)
def test_from_hf_config_errors_name_the_field(change: dict, match: str) -> None:
    d = _hf("mixtral-8x7b")
    for k, v in change.items():
        if v is None:
            d.pop(k)
        else:
            d[k] = v
    with pytest.raises(SimError, match=match):
        ModelSpec.from_hf_config(d)


def test_from_hf_config_bad_files(tmp_path: Path) -> None:
    with pytest.raises(SimError, match="no such config.json"):
        ModelSpec.from_hf_config(tmp_path / "nope.json")
    bad = tmp_path / "config.json"
    bad.write_text("{not json")
    with pytest.raises(SimError, match="not a readable JSON config"):
        ModelSpec.from_hf_config(bad)
    d = _hf("deepseek-v2-lite")
    d.pop("kv_lora_rank")
    with pytest.raises(SimError, match="missing field 'kv_lora_rank', needed for model_type 'deepseek_v2'"):
        ModelSpec.from_hf_config(d)


# ------------------------------------------------------------------ sizes
@pytest.mark.parametrize("model_id", REAL)
def test_bytes_per_expert_match_the_hand_derived_sizes(model_id: str) -> None:
    params, bf16, experts, top_k, moe_layers, layers = ANCHORS[model_id]
    s = ModelSpec.from_preset(model_id)
    assert s.expert_params == params
    assert s.bytes_per_expert("bf16") == bf16
    assert (s.num_experts, s.top_k, s.num_moe_layers, s.num_layers) == (experts, top_k, moe_layers, layers)
    total_b = (s.non_expert_params + s.num_routed_experts_total * (s.expert_params + s.expert_bias_params)) / 1e9
    assert total_b == pytest.approx(TOTAL_B[model_id], abs=0.06)


def test_expert_dtypes() -> None:
    mix = ModelSpec.from_preset("mixtral-8x7b")
    # int4: 4-bit weights + one bf16 scale per 128 weights (4096 and 14336 are multiples of 128)
    assert mix.bytes_per_expert("int4") == 176_160_768 // 2 + 2 * 176_160_768 // 128 == 90_832_896
    assert mix.bytes_per_expert() == mix.bytes_per_expert("bf16")
    oss = ModelSpec.from_preset("gpt-oss-20b")
    assert oss.expert_dtype == "mxfp4"
    # MXFP4 as shipped: 4.25 bits per weight + bf16 biases (2*2880 + 2880 values)
    assert oss.bytes_per_expert() == 24_883_200 * 17 // 32 + 2 * 8640 == 13_236_480
    assert oss.bytes_per_expert("bf16") == 49_783_680
    # int4 with a partial last group: 2880 = 22.5 groups of 128 -> 23 groups per row, padded (runtime.quant)
    assert oss.bytes_per_expert("int4") == 3 * 2880 * 23 * (64 + 2) + 2 * 8640
    tiny = ModelSpec.from_preset("tiny")  # hidden 64 < 128: one padded group per gate/up row
    assert tiny.bytes_per_expert("int4") == (2 * 128 * 1 + 64 * 1) * (64 + 2)
    assert oss.routed_expert_bytes_total() == 24 * 32 * 13_236_480
    with pytest.raises(SimError, match="unknown expert dtype"):
        mix.bytes_per_expert("fp8")


def test_non_expert_bytes_by_hand() -> None:
    s = ModelSpec.from_preset("mixtral-8x7b")
    attention = 4096 * 4096 * 2 + 4096 * 1024 * 2  # q, o + k, v
    params = 2 * 32000 * 4096 + 32 * (attention + 2 * 4096 + 8 * 4096) + 4096
    assert s.non_expert_bytes == 2 * params == 3_211_272_192
    q = ModelSpec.from_preset("qwen1.5-moe-a2.7b")
    shared = 3 * 2048 * 5632 + 2048  # shared expert + its sigmoid gate
    assert q.non_expert_params_breakdown()["shared_experts"] == 24 * shared
    d = ModelSpec.from_preset("deepseek-v2-lite")
    assert d.non_expert_params_breakdown()["dense_ffn"] == 3 * 2048 * 10944
    mla = 2048 * 16 * 192 + 2048 * 576 + 512 + 512 * 16 * 256 + 16 * 128 * 2048
    assert d.attention_params == mla


def test_kv_bytes() -> None:
    mix = ModelSpec.from_preset("mixtral-8x7b")
    assert mix.kv_bytes_per_token == 32 * 2 * 8 * 128 * 2 == 131_072
    assert mix.kv_bytes(4096) == 4096 * 131_072
    ds = ModelSpec.from_preset("deepseek-v2-lite")
    assert ds.kv_bytes_per_token == 27 * (512 + 64) * 2  # compressed MLA latent + rope key
    oss = ModelSpec.from_preset("gpt-oss-20b")
    per = 2 * 8 * 64 * 2
    assert oss.kv_bytes(100) == 24 * 100 * per
    assert oss.kv_bytes(4096) == (12 * 4096 + 12 * 128) * per  # sliding layers keep 128 tokens
    with pytest.raises(SimError, match="context_tokens"):
        oss.kv_bytes(-1)


def test_routing_shapes_agree_with_traces_presets() -> None:
    presets = pytest.importorskip("traces.presets")
    for model_id in MODELS:
        if model_id == "small-moe":  # a trained checkpoint, not a synthetic-trace family
            continue
        assert ModelSpec.from_preset(model_id).shape_only() == presets.shape_for(model_id)


# ------------------------------------------------------------------ depth reduction
def test_with_layers_is_shape_faithful() -> None:
    full = ModelSpec.from_preset("deepseek-v2-lite")
    small = full.with_layers(3)
    assert (small.num_layers, small.moe_layers, small.dense_layers) == (3, (1, 2), (0,))
    assert small.bytes_per_expert() == full.bytes_per_expert()
    assert small.attention_params == full.attention_params
    assert small.kv_bytes_per_token_layer == full.kv_bytes_per_token_layer
    assert small.non_expert_params_breakdown()["embed"] == full.non_expert_params_breakdown()["embed"]
    assert small.name == full.name
    assert ModelSpec.from_preset("deepseek-v2-lite", layers=3) == small
    assert full.with_layers(27) == full
    oss = ModelSpec.from_preset("gpt-oss-20b").with_layers(5)
    assert oss.sliding_layers == (0, 2, 4)
    q = ModelSpec.from_hf_config(_hf("qwen3-30b-a3b") | {"num_hidden_layers": 4, "mlp_only_layers": [2, 3]})
    assert q.with_layers(2).dense_intermediate_size == 0  # no dense layer left


@pytest.mark.parametrize(("n", "match"), [(0, r"layers=0 must be in \[1, 27\]"), (28, "layers=28"),
                                          (1, "keeps no MoE layer")])
def test_with_layers_errors(n: int, match: str) -> None:
    with pytest.raises(SimError, match=match):
        ModelSpec.from_preset("deepseek-v2-lite").with_layers(n)


# ------------------------------------------------------------------ validation
@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"hidden_size": 0}, "hidden_size"),
        ({"num_key_value_heads": 5}, "not a multiple of num_key_value_heads"),
        ({"expert_dtype": "fp8"}, "expert_dtype"),
        ({"attention": "mqa"}, "attention"),
        ({"num_shared_experts": 1}, "disagree"),
        ({"top_k": 9}, "top_k"),
        ({"moe_layers": [0, 0]}, "strictly increasing"),
        ({"moe_layers": [1, 2, 3]}, "dense_intermediate_size"),
        ({"sliding_layers": [1]}, "sliding_window"),
        ({"hidden_size": "64"}, "must be an integer"),
        ({"qkv_bias": 1}, "true/false"),
    ],
)
def test_model_spec_validation(change: dict, match: str) -> None:
    d = ModelSpec.from_preset("tiny").to_dict() | change
    with pytest.raises(SimError, match=match):
        ModelSpec.from_dict(d)


def test_model_spec_dict_round_trip() -> None:
    for model_id in MODELS:
        s = ModelSpec.from_preset(model_id)
        assert ModelSpec.from_dict(json.loads(json.dumps(s.to_dict()))) == s
    with pytest.raises(SimError, match="unknown field"):
        ModelSpec.from_dict(ModelSpec.from_preset("tiny").to_dict() | {"hiden_size": 3})


# ------------------------------------------------------------------ transformers (runtime extras)
def _shrink(d: dict, layers: int = 3) -> dict:
    """A depth- and width-reduced copy of a config.json that keeps every structural feature."""
    d = json.loads(json.dumps(d))
    mt = d["model_type"]
    d.update(num_hidden_layers=layers, hidden_size=64, vocab_size=128, num_attention_heads=4)
    d["num_key_value_heads"] = 2 if d.get("num_key_value_heads", 4) < d.get("num_attention_heads", 4) else 4
    if "head_dim" in d:
        d["head_dim"] = 16
    sizes = {"intermediate_size": 96, "moe_intermediate_size": 32, "shared_expert_intermediate_size": 48}
    d.update({k: v for k, v in sizes.items() if k in d})
    if mt in ("mixtral", "phimoe", "olmoe", "gpt_oss"):
        d["intermediate_size"] = 32  # the expert width in these families
    for k in ("num_local_experts", "num_experts", "n_routed_experts"):
        if k in d:
            d[k] = 8
    for k in ("num_experts_per_tok", "experts_per_token"):
        if k in d:
            d[k] = 2
    if mt.startswith("deepseek"):
        d.update(kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, num_key_value_heads=4)
    if "layer_types" in d:
        d["layer_types"] = d["layer_types"][:layers]
    if d.get("sliding_window"):
        d["sliding_window"] = min(d["sliding_window"], 8)
    rope = d.get("rope_parameters") or {}
    for k in ("short_factor", "long_factor"):
        if k in rope:
            rope[k] = rope[k][: 64 // 4 // 2]
    for k in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if k in d:
            d[k] = 1
    return d


@pytest.mark.parametrize("model_id", MODELS)
def test_config_json_loads_and_a_reduced_copy_runs_in_transformers(model_id: str, tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    full = _hf(model_id)
    # the shipped file loads into its config class, from a dict and from a checkpoint directory
    cfg = transformers.AutoConfig.for_model(**full)
    assert type(cfg).model_type == full["model_type"]
    (tmp_path / "config.json").write_text(json.dumps(full))
    cfg2 = transformers.AutoConfig.from_pretrained(tmp_path)
    assert cfg2.to_dict()["rope_parameters"] == cfg.to_dict()["rope_parameters"]
    assert cfg.num_hidden_layers == ModelSpec.from_preset(model_id).num_layers
    # what transformers writes back (to_dict / save_pretrained: renamed keys) reads into the same spec
    assert ModelSpec.from_hf_config(cfg.to_dict(), name=model_id) == ModelSpec.from_preset(model_id)
    # a depth- and width-reduced copy instantiates and runs; its parameter count is the spec's
    small = _shrink(full)
    model = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(**small)).eval()
    with torch.no_grad():
        logits = model(torch.randint(0, 128, (1, 6))).logits
    assert tuple(logits.shape) == (1, 6, 128)
    spec = ModelSpec.from_hf_config(small)
    experts = sum(p.numel() for n, p in model.named_parameters() if ".mlp.experts." in n)
    total = sum(p.numel() for p in model.parameters())
    assert experts == spec.num_routed_experts_total * (spec.expert_params + spec.expert_bias_params)
    assert total - experts == spec.non_expert_params


@pytest.mark.parametrize(("hidden", "inter"), [(64, 128), (2880, 2880), (128, 256)])
def test_int4_bytes_match_the_runtime_quantizer(hidden: int, inter: int) -> None:
    """bytes_per_expert('int4') is what runtime.quant keeps resident for one expert."""
    torch = pytest.importorskip("torch")
    quant = pytest.importorskip("runtime.quant")
    spec = ModelSpec.from_preset("tiny").to_dict() | {"hidden_size": hidden, "expert_intermediate_size": inter}
    spec = ModelSpec.from_dict(spec)
    gate_up = quant.quantize(torch.randn(2 * inter, hidden), bits=4, group_size=128)  # reduction over hidden
    down = quant.quantize(torch.randn(hidden, inter), bits=4, group_size=128)  # reduction over inter
    assert spec.bytes_per_expert("int4") == gate_up.nbytes + down.nbytes
