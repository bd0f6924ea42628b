"""mode=replay and the `python -m runtime` app on the CPU: the trace's experts exactly, results that
join the simulator's, timelines that validate, live runs that become traces."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from hydra import compose, initialize_config_dir  # noqa: E402

from runtime.__main__ import register_configs, rewrite_args, run_app  # noqa: E402
from runtime.measure import Session  # noqa: E402
from sim.config import register_configs as register_sim  # noqa: E402
from sim.run import load_policy, simulate  # noqa: E402
from sim.presets import conf_dir  # noqa: E402
from traces import read_trace, write_trace  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["trace.requests=2", "trace.prompt_tokens=6", "trace.decode_tokens=10"]


@pytest.fixture(autouse=True)
def _cpu_threads():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def run_cfg(*overrides: str):
    register_configs()
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        return compose(config_name="run", overrides=rewrite_args(["device=cpu", "repetitions=1", *overrides]))


def sim_cfg(*overrides: str):
    register_sim()
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        return compose(config_name="sim", overrides=list(overrides))


def test_replay_executes_exactly_the_traces_experts_in_order():
    """The execution log (every expert computed, per layer-step and wave, with its tokens) is the
    trace's routing, in the trace's order of requests, steps and layers."""
    cfg = run_cfg("model=tiny", *SMALL, "cache.slots=3")
    sess = Session(cfg)
    try:
        prep = sess.prepare(cfg)
        tr = prep.trace
        p = load_policy("lru")
        run = sess.run_config(cfg, p, sess.plan(cfg, p), schedule=prep.schedule, trace=tr, exec_log=True)
    finally:
        sess.close()
    M, E = tr.shape.num_moe_layers, tr.shape.num_experts
    expected = []
    for r in range(tr.num_requests):
        L = int(tr.lengths[r])
        steps = tr.step[r, :L]
        for s in dict.fromkeys(steps.tolist()):
            toks = np.flatnonzero(steps == s)
            for m in range(M):
                ids = tr.expert_ids[r, toks, m]  # (n, k)
                per = {int(e): [i for i, row in enumerate(ids) if e in row] for e in np.unique(ids)}
                expected.append(per)
    got: list[dict[int, list[int]]] = []
    last_g = -1
    waves_seen = 0
    for ent in run.exec_log:
        if ent["g"] != last_g:
            got.append({})
            last_g = ent["g"]
        else:
            waves_seen += 1
        assert ent["experts"] == sorted(ent["experts"])
        for e in ent["experts"]:
            assert e not in got[-1]
            got[-1][e] = ent["tokens"][e]
    assert got == expected
    assert waves_seen > 0  # 3 slots: prefill layers ran in waves
    assert len(got) == prep.schedule.num_layer_steps


def test_app_replay_rows_join_the_simulators(tmp_path):
    over = ["model=tiny", "hardware=h200", *SMALL, "cache.slots=6", "policy=lookahead"]
    cfg = run_cfg(*over, "repetitions=2")
    rows = run_app(cfg, tmp_path)
    df = pd.read_parquet(tmp_path / "results.parquet")
    assert json.loads((tmp_path / "results.json").read_text())[0]["source"] == "measured"
    meas, sim = df[df.source == "measured"], df[df.source == "sim"]
    assert len(meas) == 2 and list(meas.repetition) == [0, 1] and len(sim) == 1
    assert (df.status == "ok").all()
    # the runtime on the CPU: engine null -> eager, random weights in fp32 (part of config_id)
    srows = simulate(sim_cfg(*over, "engine=eager", "dtype=fp32"))
    assert meas.engine.iloc[0] == "eager" and meas.dtype.iloc[0] == "fp32"
    assert srows[0]["config_id"] == meas.config_id.iloc[0] == sim.config_id.iloc[0]
    for col in ("tpot_ms", "ttft_ms", "tokens_per_s", "hit_rate", "gb_moved", "stall_share", "x_bound", "link_util",
                "stall_per_layer_ms", "coverage", "bound_tpot_ms", "copies", "decision_gap_ms", "setup_s"):
        assert col in meas.columns, col
    m0 = meas.iloc[0]
    assert m0.hit_rate + m0.late_rate + m0.miss_rate == pytest.approx(1.0)
    assert m0.tokens_per_s > 0 and m0.copies > 0 and len(m0.stall_per_layer_ms) == 4
    assert rows[0]["model"] == "tiny" and rows[0]["slots"] == 6
    assert srows[0]["tokens_per_s"] == pytest.approx(float(sim.tokens_per_s.iloc[0]))  # the same prediction


def _valid_chrome_trace(path: Path) -> dict:
    obj = json.loads(path.read_text())
    assert isinstance(obj["traceEvents"], list) and obj["traceEvents"]
    for ev in obj["traceEvents"]:
        assert ev["ph"] in ("X", "M", "C") and isinstance(ev["pid"], int) and isinstance(ev["name"], str)
        if ev["ph"] == "X":
            assert isinstance(ev["tid"], int)
            assert isinstance(ev["ts"], (int, float)) and isinstance(ev["dur"], (int, float))
            assert ev["ts"] >= 0 and ev["dur"] >= 0
        elif ev["ph"] == "C":
            assert isinstance(ev["ts"], (int, float)) and isinstance(ev["args"], dict)
        else:
            assert "name" in ev["args"]
    return obj


def test_timeline_is_chrome_trace_json_like_the_simulators(tmp_path):
    tl = tmp_path / "tl.json"
    cfg = run_cfg("model=tiny", *SMALL, "cache.slots=4", "policy=oracle", f"timeline_out={tl}")
    run_app(cfg, tmp_path)
    obj = _valid_chrome_trace(tl)
    evs = obj["traceEvents"]
    names = {ev["args"]["name"] for ev in evs if ev["ph"] == "M"}
    assert {"GPU (measured)", "PCIe H2D (measured)", "expert cache (measured)", "compute stream", "copy stream"} <= names
    compute = sorted((ev for ev in evs if ev["ph"] == "X" and ev["pid"] == 1), key=lambda e: e["ts"])
    assert {e["name"].split()[0] for e in compute} >= {"attn+router", "experts", "head"}
    for a, b in zip(compute, compute[1:]):  # one stream: spans do not overlap
        assert b["ts"] >= a["ts"] + a["dur"] - 1e-3
    copies = [ev for ev in evs if ev["ph"] == "X" and ev["pid"] == 2]
    assert copies and {ev["cat"] for ev in copies} <= {"demand", "prefetch"}
    # the simulator's timeline of the same config has the same structure
    st = tmp_path / "sim.json"
    out = subprocess.run([sys.executable, "-m", "sim", f"hydra.run.dir={tmp_path / 'sim'}", "model=tiny", "hardware=h200",
                          *SMALL, "cache.slots=4", "policy=oracle", f"timeline_out={st}"], capture_output=True, text=True,
                         timeout=300, env=_env())
    assert out.returncode == 0, out.stderr
    sobj = _valid_chrome_trace(st)
    assert {ev["pid"] for ev in sobj["traceEvents"]} == {ev["pid"] for ev in evs}


def test_live_mode_writes_the_executed_routing_as_a_trace(tmp_path):
    cfg = run_cfg("mode=live", "model=tiny-qwen3_moe", "trace.requests=2", "trace.prompt_tokens=5",
                  "trace.decode_tokens=6", "cache.slots=4", "policy=baselines")
    rows = run_app(cfg, tmp_path)
    by = {(r["policy"], r["source"]): r for r in rows}
    for name in ("lru", "lfu", "fifo", "lookahead", "history"):
        assert by[(name, "measured")]["status"] == "ok", by[(name, "measured")]
        assert by[(name, "sim")]["status"] == "ok"
    for name in ("belady", "oracle"):
        assert by[(name, "measured")]["status"] == "unsupported" and "mode=replay" in by[(name, "measured")]["reason"]
    assert by[("lru", "measured")]["trace"].startswith("live:")
    tr = read_trace(tmp_path / "executed_trace.parquet")
    assert tr.num_requests == 2 and list(tr.lengths) == [10, 10]  # 5 prompt tokens + 5 decode steps
    assert tr.shape.moe_layers == (1, 3)
    # the simulator replays it (a config whose model is that checkpoint's shape)
    assert by[("lru", "sim")]["hit_rate"] == pytest.approx(by[("lru", "measured")]["hit_rate"])


def test_replay_of_a_captured_trace(tmp_path):
    """A trace captured from the model's own routing replays offloaded (predictor recorded)."""
    from runtime.capture import CaptureSettings, capture
    from runtime.models import load_model
    from sim.presets import conf_dir as model_conf

    lm = load_model(str(model_conf() / "model" / "tiny.config.json"), device="cpu")
    tr = capture(lm, ["hello world", "a second prompt"], CaptureSettings(max_new_tokens=5, lookahead=1, progress=False))
    tr.shape = type(tr.shape)(**{**tr.shape.to_dict(), "name": "tiny"})
    path = write_trace(tr, tmp_path / "cap.parquet")
    cfg = run_cfg("model=tiny", f"trace.path={path}", "cache.slots=4", "policy=lookahead")
    rows = run_app(cfg, tmp_path)
    assert [r["status"] for r in rows] == ["ok", "ok"]
    assert rows[0]["trace"] == str(path) and rows[0]["decode_tokens"] == int(tr.decode_tokens())


def test_pacing_and_pageable_keys(tmp_path):
    cfg = run_cfg("model=tiny", *SMALL, "cache.slots=4", "host_memory=pageable", "link_pace_gbps=0.5", "predict=false")
    rows = run_app(cfg, tmp_path)
    r = rows[0]
    assert r["host_memory"] == "pageable" and r["link_pace_gbps"] == 0.5 and r["host_memory_kind"] == "pageable"
    # every copy is paced: the link is busy bytes / 0.5 GB/s per copy
    busy = r["link_util"] * r["e2e_s"]
    assert r["copies"] > 0 and 0.5 * 0.9 <= r["gb_moved"] / busy <= 0.5 * 1.05


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}


def test_command_line(tmp_path):
    r = subprocess.run([sys.executable, "-m", "runtime", f"hydra.run.dir={tmp_path}", "device=cpu", "model=tiny-mixtral",
                        "mode=live", "trace.requests=1", "trace.prompt_tokens=4", "trace.decode_tokens=4",
                        "cache.slots=3", "repetitions=1", "warmup_steps=0"], capture_output=True, text=True, timeout=300,
                       env=_env(), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    for col in ("policy", "TPOT ms", "tokens/s", "hit rate", "GB moved", "stall share", "x bound", "source"):
        assert col in r.stdout
    assert (tmp_path / "results.parquet").is_file() and (tmp_path / ".hydra" / "config.yaml").is_file()
    bad = subprocess.run([sys.executable, "-m", "runtime", f"hydra.run.dir={tmp_path / 'b'}", "device=cpu", "mode=live",
                          "trace.path=/nonexistent.parquet"], capture_output=True, text=True, timeout=300, env=_env(),
                         cwd=tmp_path)
    assert bad.returncode == 2 and "error:" in bad.stderr and "trace.path is for mode=replay" in bad.stderr
    bad = subprocess.run([sys.executable, "-m", "runtime", f"hydra.run.dir={tmp_path / 'c'}", "device=cpu",
                          "trace.path=/nonexistent.parquet"], capture_output=True, text=True, timeout=300, env=_env(),
                         cwd=tmp_path)
    assert bad.returncode == 2 and "error:" in bad.stderr


def test_model_top_k_override_builds_that_routing():
    """``model.top_k=3`` on a top-2 preset builds a top-3 transformers model (random weights), so
    the runtime and the simulator run the same what-if shape; the trace is top-3 too."""
    cfg = run_cfg("model=tiny", *SMALL, "model.top_k=3")
    sess = Session(cfg)
    try:
        assert sess.loaded.shape.top_k == 3 and sess.spec.top_k == 3
        prep = sess.prepare(cfg)
        assert prep.trace.shape.top_k == 3
        assert {len(set(row)) for row in prep.trace.expert_ids[0, : int(prep.trace.lengths[0]), 0].tolist()} == {3}
    finally:
        sess.close()
