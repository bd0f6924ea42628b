"""The small-MoE training script: a CPU smoke run end to end, deterministic."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from runtime import train_small_moe as tsm  # noqa: E402
from runtime.models import load_model  # noqa: E402
from traces import read_trace  # noqa: E402


def load_cpu(*args, **kwargs):
    """Tests compare fp32 results on the CPU, also on a machine with a GPU."""
    return load_model(*args, device="cpu", **kwargs)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    a = tmp_path_factory.mktemp("a")
    b = tmp_path_factory.mktemp("b")
    return a, tsm.main(["--out", str(a), "--smoke"]), b, tsm.main(["--out", str(b), "--smoke"])


def test_smoke_run_writes_checkpoint_prompts_trace_and_log(runs):
    out, log, _, _ = runs
    ckpt = out / "checkpoint"
    for name in ("config.json", "model.safetensors", "README.md", "generation_config.json"):
        assert (ckpt / name).is_file(), name
    assert log["data"]["license"].startswith("PSF-2.0")
    assert log["data"]["train_files"] > 0 and log["data"]["heldout_files"] > 0
    assert len(log["loss_curve"]) == 4 and np.isfinite(log["final_heldout_loss"])
    assert 0 <= log["draft_agreement"] <= 1 and 0 <= log["acceptance"] <= 1
    saved = json.loads((out / "train_log.json").read_text())
    assert saved["final_heldout_loss"] == log["final_heldout_loss"]
    prompts = [json.loads(x) for x in (out / "prompts.jsonl").read_text().splitlines()]
    assert len(prompts) == 3 and all({"text", "file", "line"} <= set(p) for p in prompts)
    tr = read_trace(out / "small-moe.parquet")
    assert tr.shape.name == "small-moe" and tr.shape.num_experts == 4 and tr.shape.top_k == 2
    assert tr.lookahead_depths == [1, 2] and tr.draft is not None and tr.num_requests == 3
    assert tr.meta["prompts"]["origin"] == "heldout-stdlib"


def test_prompts_come_from_heldout_files_only(runs):
    out, log, _, _ = runs
    s = tsm.smoke_settings(str(out))
    corpus = tsm.read_corpus(s)
    held = {rel for rel, _ in corpus["heldout"]}
    train = {rel for rel, _ in corpus["train"]}
    assert not held & train
    for p in (json.loads(x) for x in (out / "prompts.jsonl").read_text().splitlines()):
        assert p["file"] in held


def test_checkpoint_loads_with_its_tokenizer(runs):
    out, _, _, _ = runs
    lm = load_cpu(out / "checkpoint")
    assert lm.family.model_type == "phimoe" and lm.shape.num_experts == 4
    if lm.tokenizer is not None:  # tokenizers present: BOS first, like the training documents
        assert lm.tokenizer("def f():")["input_ids"][0] == tsm.BOS


def test_deterministic(runs):
    a, la, b, lb = runs
    assert (a / "checkpoint" / "model.safetensors").read_bytes() == (b / "checkpoint" / "model.safetensors").read_bytes()
    assert la["loss_curve"] == lb["loss_curve"] and la["evals"] == lb["evals"]
    ta, tb = read_trace(a / "small-moe.parquet"), read_trace(b / "small-moe.parquet")
    for name in ("expert_ids", "gate_weights", "draft", "draft_match"):
        assert np.array_equal(getattr(ta, name), getattr(tb, name), equal_nan=True), name
