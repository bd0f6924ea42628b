"""Policy search (experiment=search): Optuna TPE, seeded and deterministic, on a tiny problem."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pandas as pd
import pytest

from sim.errors import SimError
from sim.experiments.search import parse_space, run_search

BASE = ["model=tiny", "trace.requests=1", "trace.prompt_tokens=4", "trace.decode_tokens=8",
        "hardware.workspace_gb=0", "hardware.memory_gb=0.001", "policy=lookahead"]  # 16 of 32 experts fit
SPEC = {
    "trials": 8,
    "seed": 3,
    "metric": "tpot_ms",
    "params": {
        "policy": {"choices": ["lookahead", "lru", "history"]},
        "policy.prefetch_args.depth": {"int": [1, 3], "when": {"policy": "lookahead"}},
        "policy.prefetch_args.layers_ahead": {"int": [1, 3], "when": {"policy": "history"}},
        "eviction": {"key": "policy.eviction", "choices": ["lru", "fifo"], "when": {"policy": "lru"}},
        "cache.layout": {"choices": ["global", "per_layer"]},
    },
}


def test_search_is_deterministic_and_never_worse_than_the_default(tmp_path):
    a = run_search(BASE, SPEC, tmp_path / "a")
    b = run_search(BASE, SPEC, tmp_path / "b")
    pd.testing.assert_frame_equal(a.trials, b.trials, check_exact=True)
    assert len(a.trials) == 8
    # trial 0 is the default: lookahead, its preset depth and eviction, the budget's global pool
    t0 = json.loads(a.trials.params[0])
    assert t0 == {"policy": "lookahead", "policy.prefetch_args.depth": 1, "cache.layout": "global"}
    assert a.trials.tpot_ms[0] == a.default["tpot_ms"]
    # then the baseline presets of the space, as users run them (suite order: lru, lookahead, history)
    assert a.trials.baseline[:3].tolist() == ["default", "policy=lru", "policy=history"]
    assert json.loads(a.trials.params[1]) == {"policy": "lru", "eviction": "lru", "cache.layout": "global"}
    assert a.trials.overrides.is_unique  # a repeated proposal is skipped, not counted as a trial
    assert a.best["tpot_ms"] <= min(a.default["tpot_ms"], a.baseline["tpot_ms"])
    assert a.baseline["tpot_ms"] == a.trials.tpot_ms[:3].min()
    assert math.isfinite(a.best["tpot_ms"])
    assert "default" in a.table and "best baseline" in a.table and "% lower" in a.table
    if a.baseline["baseline"] == "default":
        assert "vs default (the best baseline)" in a.table
    else:
        assert f"vs best baseline (policy={a.baseline['policy']})" in a.table
    # conditional parameters appear only under their condition
    for p in a.trials.params.map(json.loads):
        assert ("policy.prefetch_args.depth" in p) == (p["policy"] == "lookahead")
        assert ("eviction" in p) == (p["policy"] == "lru")
    files = {p.name for p in (tmp_path / "a").iterdir()}
    assert {"search_trials.parquet", "search_trials.json", "search_best.json", "search_report.txt"} <= files
    best = json.loads((tmp_path / "a" / "search_best.json").read_text())
    assert best["command"].startswith("python -m sim ") and best["best"]["tpot_ms"] == a.best["tpot_ms"]


def test_per_layer_layout_splits_the_budget_pool():
    spec = {"trials": 6, "seed": 0, "params": {"cache.layout": {"choices": ["per_layer", "global"]}}}
    res = run_search(BASE, spec)
    per_layer = res.trials[res.trials.overrides.str.contains("per_layer")]
    assert len(per_layer) >= 1
    row = per_layer.iloc[0]
    assert row.layout == "per_layer" and row.slots % 4 == 0  # tiny: 4 MoE layers


def test_infeasible_points_score_infinity_not_an_error():
    spec = {"trials": 3, "seed": 0, "params": {"hardware.memory_gb": {"choices": [0.0001, 0.001]}}}
    res = run_search([b for b in BASE if not b.startswith("hardware.memory_gb")], spec)
    bad = res.trials[res.trials.overrides.str.contains("0.0001")]
    assert (bad.status == "infeasible").all() and (bad.tpot_ms == math.inf).all()
    assert math.isfinite(res.best["tpot_ms"])


@pytest.mark.parametrize("bad, msg", [
    ({"x": 3}, "expected a mapping"),
    ({"x": {"int": [3, 1]}}, "is empty"),
    ({"x": {"nope": 1}}, "give choices"),
    ({"x": {"choices": [1]}, "y": {"int": [1, 2], "when": {"z": 1}}}, "not an earlier parameter"),
])
def test_bad_search_spaces_are_clear_errors(bad, msg):
    with pytest.raises(SimError, match=msg):
        parse_space(bad)


def test_search_command(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "sim.sweep", "search", *BASE, "experiment.search.trials=4", f"hydra.run.dir={tmp_path}"],
        capture_output=True, text=True, timeout=300, env={**os.environ, "MPLBACKEND": "Agg"})
    assert out.returncode == 0, out.stderr[-3000:]
    assert "policy search over 4 distinct configurations" in out.stdout and "best" in out.stdout
    assert (tmp_path / "search_report.txt").read_text().startswith("policy search over 4 distinct configurations")
    assert len(pd.read_parquet(tmp_path / "search_trials.parquet")) == 4


def test_a_space_smaller_than_trials_ends_early_without_repeats():
    spec = {"trials": 10, "seed": 0, "params": {"policy": {"choices": ["lru", "history"]}}}
    res = run_search(BASE, spec)
    assert sorted(res.trials.overrides) == ["policy=history", "policy=lru"]
    assert "2 distinct configurations (the space holds no more; 10 asked)" in res.table


@pytest.mark.parametrize("spec, msg", [
    ({"trials": 0, "params": {"policy": {"choices": ["lru"]}}}, "trials must be >= 1, got 0"),
    ({"trials": 2, "metric": "tpot", "params": {"policy": {"choices": ["lru"]}}}, "'tpot' is not a numeric results column"),
])
def test_bad_search_settings_are_refused(spec, msg):
    from traces.errors import UsageError

    with pytest.raises(UsageError, match=msg):
        run_search(BASE, spec)
