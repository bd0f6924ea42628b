"""The `python -m sim` app: configs compose, results are written, bad input gets a clear error."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hydra import compose, initialize_config_dir

from sim.config import register_configs
from sim.errors import InfeasibleError
from sim.policies.errors import PolicyError
from sim.presets import conf_dir
from sim.run import simulate
from traces import TraceError, write_trace

register_configs()
SMALL = ["trace.requests=2", "trace.prompt_tokens=4", "trace.decode_tokens=12"]


def cfg_of(*overrides: str):
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        return compose(config_name="sim", overrides=list(overrides))


def run_app(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "sim", f"hydra.run.dir={tmp_path}", *args],
        capture_output=True, text=True, timeout=300,
    )


def test_main_job_writes_table_results_and_config(tmp_path):
    out = run_app(tmp_path, "model=tiny", *SMALL)
    assert out.returncode == 0, out.stderr
    for col in ("policy", "TPOT ms", "tokens/s", "hit rate", "GB moved", "stall share", "x bound"):
        assert col in out.stdout
    df = pd.read_parquet(tmp_path / "results.parquet")
    assert list(df.policy) == ["stream", "lru", "lfu", "fifo", "belady", "lookahead", "history", "oracle"]
    assert (df.status == "ok").all() and (df.source == "sim").all()
    assert (df.x_bound >= 1 - 1e-9).all()
    assert json.loads((tmp_path / "results.json").read_text())[0]["policy"] == "stream"
    assert (tmp_path / ".hydra" / "config.yaml").is_file()


def test_same_config_same_rows_bit_for_bit():
    cfg = cfg_of("model=tiny", "policy=baselines", *SMALL)
    a, b = simulate(cfg), simulate(cfg)
    for ra, rb in zip(a, b):
        ra.pop("wall_s"), rb.pop("wall_s")
        assert ra == rb


def test_bound_is_at_most_every_policy_end_to_end():
    rows = simulate(cfg_of("model=mixtral-8x7b", "model.layers=4", "policy=baselines", *SMALL))
    for r in rows:
        assert r["x_bound_e2e"] >= 1 - 1e-9, r["policy"]


def test_timeline_out_is_chrome_trace(tmp_path):
    out = run_app(tmp_path, "model=tiny", "policy=lookahead", f"timeline_out={tmp_path}/tl.json", *SMALL)
    assert out.returncode == 0, out.stderr
    ev = json.loads((tmp_path / "tl.json").read_text())["traceEvents"]
    pids = {e["pid"] for e in ev}
    assert {1, 2, 3} <= pids
    assert any(e.get("cat") == "prefetch" for e in ev)
    assert all(e["dur"] >= 0 for e in ev if e["ph"] == "X")


def test_unknown_preset_is_an_error(tmp_path):
    out = run_app(tmp_path, "hardware=rtx9090")
    assert out.returncode != 0
    assert "rtx9090" in out.stderr and "hardware" in out.stderr


def test_impossible_budget_says_by_how_much(tmp_path):
    from sim.run import plan_for, prepare

    prep = prepare(cfg_of("model=mixtral-8x7b", "hardware.memory_gb=3", *SMALL))
    assert prep.plan is None
    with pytest.raises(InfeasibleError, match=r"GB"):
        plan_for(prep, speculative=False)
    out = run_app(tmp_path, "model=mixtral-8x7b", "hardware.memory_gb=3", "policy=lru", *SMALL)
    # the one named policy cannot run: refused before the work, one line with the shortfall, exit 2
    assert out.returncode == 2, out.stderr
    assert out.stderr.startswith("error: ") and len(out.stderr.strip().splitlines()) == 1
    assert "short by 0.21 GB" in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "results.parquet").exists()


def test_trace_that_contradicts_the_model_is_an_error(tmp_path):
    from dataclasses import replace

    from traces.synth import synth_params_for, synthesize

    t = synthesize(replace(synth_params_for("tiny"), requests=1, prompt_tokens=2, decode_tokens=3), seed=0)
    path = tmp_path / "tiny.parquet"
    write_trace(t, path)
    with pytest.raises(TraceError, match="moe_layers.*4 layers|does not match"):
        simulate(cfg_of("model=mixtral-8x7b", f"trace.path={path}", "policy=lru"))
    rows = simulate(cfg_of("model=tiny", f"trace.path={path}", "policy=lru"))
    assert rows[0]["status"] == "ok" and rows[0]["trace"] == str(path)
    out = run_app(tmp_path / "run", "model=mixtral-8x7b", f"trace.path={path}", "policy=lru")
    assert out.returncode == 2 and "does not match the model" in out.stderr


def test_malformed_trace_file_is_an_error(tmp_path):
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"not parquet")
    with pytest.raises(TraceError, match="bad.parquet"):
        simulate(cfg_of("model=tiny", f"trace.path={bad}", "policy=lru"))


def test_unknown_policy_in_config_is_an_error():
    with pytest.raises(PolicyError, match="unknown eviction policy"):
        simulate(cfg_of("model=tiny", "policy=lru", "policy.eviction=nope", *SMALL))


def test_cache_layouts_and_hypothetical_link():
    base = simulate(cfg_of("model=tiny", "policy=lru", "cache.per_layer=4", *SMALL))[0]
    assert base["layout"] == "per_layer" and base["slots"] == 4 * 4
    slow = simulate(cfg_of("model=tiny", "policy=lru", "cache.per_layer=4", "hardware.h2d_gbps=1", *SMALL))[0]
    assert slow["tpot_ms"] > base["tpot_ms"]
    g = simulate(cfg_of("model=tiny", "policy=lru", "cache.slots=5", *SMALL))[0]
    assert g["layout"] == "global" and g["slots"] == 5


def test_depth_reduced_model_runs():
    rows = simulate(cfg_of("model=qwen3-30b-a3b", "model.layers=3", "policy=lookahead", *SMALL))
    assert rows[0]["status"] == "ok" and np.isfinite(rows[0]["tpot_ms"])


def test_progress_counts_requests_and_is_quiet_without_a_terminal(capsys):
    from sim.run import plan_for, prepare, run_policy, load_policy

    cfg = cfg_of("model=tiny", "policy=lru", *SMALL)
    prep = prepare(cfg)
    run_policy(prep, load_policy("lru"), 0, progress=True)  # stderr is not a tty here: no bar
    assert "request" not in capsys.readouterr().err

    class Counter:
        n = 0

        def update(self, k):
            self.n += k

    from sim.engine import Simulation
    from sim.policies import EVICTION, PREFETCH

    bar = Counter()
    plan = plan_for(prep, speculative=False)
    Simulation(prep.schedule, prep.model, prep.hw, prep.cost, eviction=EVICTION.create("lru"),
               prefetch=PREFETCH.create("none"), slots=plan.slots, progress=bar).run()
    assert bar.n == prep.trace.num_requests


@pytest.mark.parametrize("policy", ["history", "lookahead", "oracle"])
def test_regression_copies_issued_at_a_release_retire_in_order(policy):
    """A release that frees a slot lets a queued copy issue; if that copy ends before the next
    decision, it must be retired before the stream's clock passes it (found by the runtime's
    executor tests: 'copy stream asked to go back')."""
    for slots in (6, 8):
        rows = simulate(cfg_of("model=tiny", "hardware=h200", f"cache.slots={slots}", f"policy={policy}",
                               "trace.requests=2", "trace.decode_tokens=40"))
        assert rows[0]["status"] == "ok" and rows[0]["x_bound_e2e"] >= 1 - 1e-9


def test_engine_group_ideal_is_todays_result_and_eager_is_slower():
    base = ["model=tiny", "policy=lru", *SMALL]
    (ideal,) = simulate(cfg_of(*base))
    cfg = cfg_of(*base)
    cfg.engine = None  # no engine at all: the cost model without host overhead
    (none,) = simulate(cfg)
    (eager,) = simulate(cfg_of(*base, "engine=eager"))
    assert ideal["engine"] == "ideal" and ideal["host_per_layer_s"] == 0.0
    assert ideal["tpot_ms"] == none["tpot_ms"]
    assert (eager["engine"], eager["host_per_layer_s"], eager["draft_host_per_layer_s"], eager["host_per_launch_s"]) == (
        "eager", 100e-6, 60e-6, 8e-6)
    assert eager["tpot_ms"] > ideal["tpot_ms"] and eager["config_id"] != ideal["config_id"]
    (gib,) = simulate(cfg_of(*base, "hardware.memory_gib=24"))
    assert gib["memory_gb"] == pytest.approx(24 * 2**30 / 1e9) and gib["memory_gib"] == 24
