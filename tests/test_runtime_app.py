"""`python -m runtime.capture`: Hydra composition, prompts sources, determinism, clear errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from hydra import compose, initialize_config_module  # noqa: E402

from runtime.capture import register_configs, rewrite_model_args, run_capture  # noqa: E402
from runtime.prompts import BUILTIN_PROMPTS, load_prompts  # noqa: E402
from traces import read_trace  # noqa: E402
from traces.errors import MoeOffloadError  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def cfg_for(*overrides: str):
    register_configs()
    with initialize_config_module(config_module="conf", version_base="1.3"):
        return compose("capture", overrides=rewrite_model_args(["device=cpu", *overrides]))


def test_rewrite_model_args(tmp_path):
    assert rewrite_model_args(["model=tiny", "model.layers=2"]) == ["model=tiny", "model.layers=2"]
    assert rewrite_model_args([f"model={tmp_path}", "model.layers=2", "x=1"]) == [
        "~model", f"source={tmp_path}", "layers=2", "x=1"]
    assert rewrite_model_args(["model=tiny-olmoe"]) == ["~model", "source=tiny-olmoe"]


def test_default_config_is_the_tiny_preset():
    cfg = cfg_for()
    assert cfg.model.name == "tiny" and cfg.source is None
    assert cfg.lookahead == 2 and cfg.draft.enabled is False


def test_jsonl_prompts_and_preset_depth(tmp_path):
    p = tmp_path / "p.jsonl"
    p.write_text("\n".join(json.dumps({"q": t, "other": 1}) for t in ["first prompt", "second one", "third"]) + "\n")
    out = tmp_path / "t.parquet"
    cfg = cfg_for("model=tiny", "model.layers=2", f"prompts.path={p}", "prompts.field=q", "max_new_tokens=3",
                  f"out={out}", "draft.enabled=true", "lookahead=1", "created=2026-01-01")
    run_capture(cfg)
    tr = read_trace(out)
    assert tr.shape.name == "tiny" and tr.shape.num_layers == 2
    assert tr.num_requests == 3 and tr.lookahead_depths == [1] and tr.draft is not None
    assert tr.meta["prompts"]["origin"] == "jsonl" and tr.meta["prompts"]["field"] == "q"
    assert tr.meta["model"]["preset"] == "tiny" and tr.meta["model"]["source"] == "conf/model/tiny.config.json"


def test_deterministic_bytes(tmp_path):
    out = tmp_path / "t.parquet"
    cfg = cfg_for("model=tiny-qwen2_moe", "prompts.limit=3", "max_new_tokens=3", f"out={out}",
                  "created=2026-01-01T00:00:00Z", "draft.enabled=true")
    run_capture(cfg)
    first = out.read_bytes()
    run_capture(cfg)
    assert out.read_bytes() == first


def test_builtin_and_text_prompts(tmp_path):
    b = load_prompts()
    assert b.texts == list(BUILTIN_PROMPTS) and b.origin["origin"] == "builtin"
    p = tmp_path / "p.txt"
    p.write_text("one\n\n  \ntwo\n")
    t = load_prompts(p)
    assert t.texts == ["one", "two"] and t.origin["origin"] == "text" and t.origin["sha256"]


@pytest.mark.parametrize("content,suffix,match", [
    ("", ".txt", "no prompts"),
    ("\n \n", ".txt", "no prompts"),
    ('{"text": "a"}\nnot json\n', ".jsonl", r"p\.jsonl:2: not valid JSON"),
    ('{"prompt": "a"}\n', ".jsonl", "no field 'text'"),
    ('{"text": 3}\n', ".jsonl", "int, expected a string"),
])
def test_bad_prompt_files(tmp_path, content, suffix, match):
    p = tmp_path / f"p{suffix}"
    p.write_text(content)
    with pytest.raises(MoeOffloadError, match=match):
        load_prompts(p)
    with pytest.raises(MoeOffloadError, match="not found"):
        load_prompts(tmp_path / "missing.txt")


def test_bad_model_inputs_through_the_app(tmp_path):
    with pytest.raises(MoeOffloadError, match="no such directory"):
        run_capture(cfg_for(f"model={tmp_path / 'missing'}"))
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(MoeOffloadError, match="no prompts"):
        run_capture(cfg_for("model=tiny-mixtral", f"prompts.path={empty}"))


def _run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, "-m", "runtime.capture", "device=cpu", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_command_line(tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("hello there\nsecond prompt\n")
    out = tmp_path / "cli.parquet"
    r = _run_cli("model=tiny-gpt_oss", f"prompts.path={prompts}", "max_new_tokens=3", f"out={out}",
                 "lookahead=2", "draft.enabled=true", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "trace:" in r.stdout
    tr = read_trace(out)
    assert tr.num_requests == 2 and tr.meta["prompts"]["origin"] == "text"
    assert (tmp_path / "run" / ".hydra" / "config.yaml").is_file()
    bad = _run_cli("model=someorg/missing-model", f"hydra.run.dir={tmp_path / 'run2'}", cwd=tmp_path)
    assert bad.returncode == 2
    assert "error:" in bad.stderr and "never downloads" in bad.stderr


def test_captured_trace_replays_in_the_simulator(tmp_path):
    """The issue's contract: a captured trace loads in `python -m sim trace.path=...` and replays."""
    pytest.importorskip("simpy")
    from hydra import initialize_config_dir

    from sim.config import register_configs as register_sim
    from sim.run import simulate

    from sim.presets import conf_dir

    out = tmp_path / "tiny.parquet"
    run_capture(cfg_for("model=tiny", "prompts.limit=2", "max_new_tokens=6", "lookahead=2", "draft.enabled=true",
                        f"out={out}"))
    register_sim()
    for policy in ("lru", "lookahead"):
        with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
            cfg = compose(config_name="sim", overrides=["model=tiny", f"trace.path={out}", f"policy={policy}"])
        rows = simulate(cfg)
        assert rows and all(r["status"] == "ok" for r in rows), rows
