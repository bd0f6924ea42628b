"""Model loading: sources, depth reduction, dtype, shapes, and clear errors for bad inputs."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from runtime.capture import CaptureSettings, capture  # noqa: E402
from runtime.models import FAMILIES, ModelLoadError, load_model, resolve_source, tiny_config  # noqa: E402
from traces import TraceError  # noqa: E402


def load_cpu(*args, **kwargs):
    """Tests compare fp32 results on the CPU, also on a machine with a GPU."""
    return load_model(*args, device="cpu", **kwargs)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A saved tiny deepseek_v2 checkpoint (sparse layout, shared experts)."""
    from transformers import AutoModelForCausalLM

    d = tmp_path_factory.mktemp("ckpt") / "tiny-ds2"
    torch.manual_seed(0)
    cfg = tiny_config("deepseek_v2", num_hidden_layers=4)
    AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).save_pretrained(d)
    return d


def test_checkpoint_directory_loads_and_reduces_depth(checkpoint):
    lm = load_cpu(checkpoint)
    assert lm.shape.num_layers == 4 and lm.shape.moe_layers == (1, 2, 3)
    assert lm.provenance["kind"] == "checkpoint" and lm.provenance["weights"] == "checkpoint"
    assert lm.provenance["weight_files"][0]["name"].endswith(".safetensors")
    small = load_cpu(checkpoint, layers=2)
    assert small.shape.num_layers == 2 and small.shape.moe_layers == (1,)
    # the kept layers are the checkpoint's own weights
    a = lm.handles[1].experts.gate_up_proj
    b = small.handles[1].experts.gate_up_proj
    assert torch.equal(a, b)


def test_checkpoint_dtype_auto_and_explicit(checkpoint):
    assert load_cpu(checkpoint).dtype == torch.float32  # the checkpoint's own
    lm = load_cpu(checkpoint, dtype="bfloat16")
    assert lm.dtype == torch.bfloat16
    assert lm.handles[1].experts.gate_up_proj.dtype == torch.bfloat16


@pytest.mark.parametrize("preset", ["tiny", "mixtral-8x7b", "phi-3.5-moe", "qwen3-30b-a3b", "deepseek-v2-lite",
                                    "olmoe-1b-7b", "qwen1.5-moe-a2.7b", "gpt-oss-20b"])
def test_presets_resolve_to_their_shipped_config(preset):
    from runtime.models import preset_config_path

    if not preset_config_path(preset).is_file():
        pytest.skip(f"conf/model/{preset}.config.json not in this checkout")
    src = resolve_source(preset)
    assert src.kind == "preset" and src.path.name == f"{preset}.config.json"
    from transformers import AutoConfig

    d = json.loads(src.path.read_text())
    assert d["model_type"] in FAMILIES


def test_tiny_preset_builds_in_target_dtype_deterministically():
    from runtime.models import preset_config_path

    if not preset_config_path("tiny").is_file():
        pytest.skip("conf/model/tiny.config.json not in this checkout")
    a = load_cpu("tiny", dtype="bfloat16", layers=2, seed=3)
    assert a.shape.num_layers == 2 and a.dtype == torch.bfloat16
    assert all(p.dtype == torch.bfloat16 for n, p in a.model.named_parameters() if "e_score" not in n)
    b = load_cpu("tiny", dtype="bfloat16", layers=2, seed=3)
    for (n, p), (_, q) in zip(a.model.named_parameters(), b.model.named_parameters()):
        assert torch.equal(p, q), n
    c = load_cpu("tiny", dtype="bfloat16", layers=2, seed=4)
    assert not torch.equal(a.handles[0].experts.gate_up_proj, c.handles[0].experts.gate_up_proj)


def test_config_json_file_source(tmp_path):
    cfg = tiny_config("olmoe")
    p = tmp_path / "olmoe.config.json"
    p.write_text(cfg.to_json_string())
    lm = load_cpu(p)
    assert lm.family.model_type == "olmoe" and lm.provenance["kind"] == "config"
    assert lm.provenance["config_sha256"]


def test_missing_directory_is_a_clear_error(tmp_path):
    with pytest.raises(ModelLoadError, match="no such directory"):
        load_cpu(tmp_path / "nope")
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_cpu(tmp_path)


def test_hub_name_without_local_copy_is_a_clear_error(monkeypatch, tmp_path):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(ModelLoadError, match="never downloads"):
        load_cpu("someorg/some-moe-model")


def test_hub_name_with_a_local_copy_loads_offline(monkeypatch, tmp_path, checkpoint):
    import shutil

    from huggingface_hub import constants

    sha = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "models--someorg--tiny-ds2"
    shutil.copytree(checkpoint, repo / "snapshots" / sha)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(sha)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    lm = load_cpu("someorg/tiny-ds2")
    assert lm.provenance["kind"] == "hub-cache" and lm.provenance["revision"] == sha
    assert lm.shape.moe_layers == (1, 2, 3)


def test_unknown_preset_lists_known_ones():
    with pytest.raises(ModelLoadError, match="not a preset"):
        load_cpu("no-such-preset")


def test_dense_model_is_rejected(tmp_path):
    from transformers import LlamaConfig

    d = tmp_path / "dense"
    d.mkdir()
    LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4).save_pretrained(d)
    with pytest.raises(ModelLoadError, match="dense"):
        load_cpu(d)


def test_unsupported_moe_family_is_named(tmp_path):
    from transformers import AutoConfig

    d = tmp_path / "granite"
    d.mkdir()
    AutoConfig.for_model("granitemoe", vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         num_local_experts=4, num_experts_per_tok=2).save_pretrained(d)
    with pytest.raises(ModelLoadError, match="granitemoe.*not supported"):
        load_cpu(d)


def test_depth_out_of_range_and_below_first_moe_layer():
    with pytest.raises(ModelLoadError, match="out of range"):
        load_cpu("tiny-mixtral", layers=9)
    with pytest.raises(ModelLoadError, match="MoE"):
        load_cpu("tiny-deepseek_v2", layers=1)  # layer 0 is dense


def test_runtime_errors_are_project_errors_not_trace_errors():
    from runtime.errors import OffloadRuntimeError
    from traces.errors import MoeOffloadError

    assert issubclass(ModelLoadError, OffloadRuntimeError) and issubclass(ModelLoadError, MoeOffloadError)
    assert not issubclass(ModelLoadError, TraceError)


def test_gpt_oss_layer_types_cut_with_depth():
    lm = load_cpu("tiny-gpt_oss", layers=2)
    assert lm.config.layer_types == ["sliding_attention", "full_attention"]


def test_capped_memory_capture_equals_uncapped(checkpoint, tmp_path):
    """accelerate device_map offload with a memory cap (here: to disk, compute on the CPU)."""
    pytest.importorskip("accelerate")
    s = CaptureSettings(max_new_tokens=4, batch_size=2, lookahead=2, draft=True, progress=False)
    prompts = ["hello world", "abc", "the quick brown fox"]
    full = load_cpu(checkpoint)
    capped = load_cpu(checkpoint, max_memory="20KB", offload_folder=tmp_path / "off")
    assert capped.offloaded
    assert any(v == "disk" for v in capped.provenance["device_map"].values())
    a = capture(full, prompts, s, created="x")
    b = capture(capped, prompts, s, created="x")
    for name in ("lengths", "position", "step", "phase", "expert_ids", "gate_weights", "draft", "draft_match"):
        assert np.array_equal(getattr(a, name), getattr(b, name), equal_nan=name == "gate_weights"), name
    for d in a.lookahead:
        assert np.array_equal(a.lookahead[d], b.lookahead[d])
    with pytest.raises(ModelLoadError, match="checkpoint directory"):
        load_cpu("tiny-mixtral", max_memory="1MB")
