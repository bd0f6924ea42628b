"""Simulated against measured: the join of the two kinds of rows and the error metrics (hand-computed),
the profiler and the validation grid end to end on the CPU (tiny model)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from sim.errors import SimError
from sim.decisions import DecisionLog
from sim.experiments.validation import COLUMNS, join, ks_statistic, level1, summary, timeline_errors
from sim.timeline import chrome_trace

ROOT = Path(__file__).resolve().parents[1]


def row(cid: str, source: str, tpot: float, gaps: list[float], level: str = "closed", rep: int = 0, **kw) -> dict:
    r = {c: None for c in COLUMNS}
    r.update(level=level, config_id=cid, card="toy", date="2026-12-07", engine="eager", link="pinned", policy="lru",
             source=source, model="m", budget=0.5, repetition=rep, tpot_s=tpot, ttft_s=0.1, hit_rate=0.5,
             stall_share=0.2, k=0.0, token_gaps_s=gaps, p50_token_s=float(np.median(gaps)),
             p90_token_s=float(np.percentile(gaps, 90)), p99_token_s=float(np.percentile(gaps, 99)))
    r.update(kw)
    return r


def table():
    import pandas as pd

    return pd.DataFrame([
        row("a", "measured", 0.010, [0.010, 0.010], rep=0),
        row("a", "measured", 0.012, [0.012, 0.012], rep=1),
        row("a", "sim", 0.0121, [0.0121, 0.0121]),
        row("b", "measured", 0.020, [0.020, 0.020]),
        row("b", "sim", 0.018, [0.018, 0.018]),
        row("c", "measured", 0.030, [0.030]),  # no sim row: dropped
        row("a", "measured", 0.010, [0.010], level="replayed"),
        row("a", "sim", 0.0103, [0.0103], level="replayed"),
    ])


def test_join_pairs_rows_and_computes_errors() -> None:
    j = join(table())
    assert len(j) == 6 and set(j["config_id"]) == {"a", "b"}
    a = j[(j.config_id == "a") & (j.level == "closed")].set_index("source")
    assert a.loc["measured", "tpot_s"] == pytest.approx(0.011) and a.loc["measured", "repetitions"] == 2
    assert a.loc["sim", "tpot_rel_err"] == pytest.approx(0.1)  # (0.0121 - 0.011) / 0.011
    assert a.loc["measured", "p50_token_s"] == pytest.approx(0.011)  # pooled over repetitions
    assert a.loc["sim", "p50_rel_err"] == pytest.approx(0.1)
    assert a.loc["sim", "ks"] == 1.0  # every simulated gap above every measured one
    b = j[(j.config_id == "b")].set_index("source")
    assert b.loc["sim", "tpot_rel_err"] == pytest.approx(-0.1)


def test_summary_per_level_and_targets() -> None:
    s = summary(join(table())).set_index("level")
    assert s.loc["closed", "configs"] == 2
    assert s.loc["closed", "tpot_median_abs_err"] == pytest.approx(0.1)
    assert s.loc["closed", "tpot_max_abs_err"] == pytest.approx(0.1)
    assert not s.loc["closed", "meets_target"]  # 10% median > 5%
    assert s.loc["replayed", "tpot_max_abs_err"] == pytest.approx(0.03)
    assert s.loc["replayed", "meets_target"]  # 3% <= 3% median and <= 8% max


def test_bad_tables_are_refused() -> None:
    t = table()
    with pytest.raises(SimError, match=r"missing column\(s\) \['k'\]"):
        join(t.drop(columns=["k"]))
    t.loc[0, "level"] = "open"
    with pytest.raises(SimError, match="column 'level' has unknown value"):
        join(t)


@given(st.lists(st.floats(0, 1), min_size=1, max_size=30), st.lists(st.floats(0, 1), min_size=1, max_size=30))
def test_ks_statistic_matches_scipy(a: list[float], b: list[float]) -> None:
    scipy_stats = pytest.importorskip("scipy.stats")
    assert ks_statistic(a, b) == pytest.approx(scipy_stats.ks_2samp(a, b).statistic)
    assert ks_statistic(a, a) == 0.0


# ------------------------------------------------------------------ end to end on the CPU
def run(module: str, *args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, capture_output=True, text=True, timeout=600,
                          env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})


def test_profiler_smoke_writes_a_profile_the_simulator_loads(tmp_path: Path) -> None:
    import pandas as pd

    from sim.hardware import HardwareSpec

    out = tmp_path / "hardware" / "measured"
    r = run("runtime.profile", "smoke=true", f"out={out}", "shapes=[tiny]", "engine_shape=tiny", "engine_top_k_low=1",
            "name=smoke")
    assert r.returncode == 0, r.stderr
    hw = HardwareSpec.from_preset("measured/smoke", root=tmp_path)
    assert Path(hw.profile_table) == (out / "smoke.parquet").resolve()
    for path in ("graphed", "eager"):
        assert set(hw.engine_values(path)) == {"host_per_layer_s", "draft_host_per_layer_s", "host_per_launch_s",
                                               "host_per_expert_s"}
    assert "L3 top-1" in dict(hw.provenance)["engine_raw"]  # the executor measured at a second top-k
    prov = dict(hw.provenance)
    assert {"card", "driver", "torch", "date", "notes"} <= set(prov)
    df = pd.read_parquet(out / "smoke.parquet")
    assert {"h2d", "d2h", "attention", "router", "expert_ffn", "embed_and_head"} <= set(df["op"])
    assert set(df.loc[df.op == "h2d", "host_memory"]) == {"pinned", "pageable"}
    assert {"card", "driver", "torch", "date"} <= set(df.columns)
    # never overwritten without overwrite=true; a grid shape is refused as the engine shape
    before = (out / "smoke.yaml").read_text()
    again = run("runtime.profile", "smoke=true", f"out={out}", "shapes=[tiny]", "engine_shape=tiny", "engine_top_k_low=1",
                "name=smoke")
    assert again.returncode == 2 and "exists" in again.stderr and (out / "smoke.yaml").read_text() == before
    bad = run("runtime.profile", "smoke=true", f"out={tmp_path / 'x'}", "engine_shape=mixtral-8x7b")
    assert bad.returncode == 2 and "validation-grid shape" in bad.stderr and not (tmp_path / "x").exists()
    bad = run("runtime.profile", "smoke=true", f"out={tmp_path / 'x'}", "shapes=[tiny]", "engine_shape=tiny")
    assert bad.returncode == 2 and "engine_top_k_low=2" in bad.stderr and not (tmp_path / "x").exists()


def test_engine_values_split_per_layer_and_per_expert_by_hand() -> None:
    """derive_engine on measurements made from the simulator's model with known values (OLMoE,
    top-8, a low top-2 at 3 layers; one expert's kernels 10 us): graphed 100 us per layer and 50 us
    per expert; eager 200 us per layer, 5 us per launch and 20 us per expert beyond its 5 launches.
    The split is recovered exactly; without the low top-k the per-layer value holds the top-8
    experts' phase beyond their kernels, as profiles before the per-expert term had it."""
    from runtime.profile import derive_engine
    from sim.costmodel import RooflineCostModel
    from sim.hardware import HardwareSpec
    from sim.spec import ModelSpec

    spec = ModelSpec.from_preset("olmoe-1b-7b")
    launches = RooflineCostModel(spec, HardwareSpec.from_preset("h200")).layer_launches
    lay, c = spec.moe_layers[0], 10e-6

    def point(L: int, k: int, with_draft: bool = True) -> dict[str, float]:
        v = {"moe_layers": float(L), "top_k": float(k), "floor_step_s": 200e-6 + (40e-6 + c * k) * L,
             "executor_graphed_step_s": 250e-6 + (40e-6 + 100e-6 + max(c, 50e-6) * k) * L,
             "executor_eager_step_s": 280e-6 + (40e-6 + 200e-6 + 5e-6 * launches(lay, k) + max(c, 20e-6) * k) * L}
        if with_draft:
            v |= {"transformers_step_s": 290e-6 + (40e-6 + c * k + 150e-6 + 5e-6 * launches(lay, k)) * L,
                  "draft_call_host_s": 30e-6 + 1e-6 * L}
        return v

    at = {1: point(1, 8), 3: point(3, 8)}
    got = derive_engine(at, spec, 5e-6, point(3, 2, with_draft=False))
    assert got["graphed"] == pytest.approx({"host_per_layer_s": 100e-6, "draft_host_per_layer_s": 1e-6,
                                            "host_per_launch_s": 0.0, "host_per_expert_s": 50e-6})
    assert got["eager"] == pytest.approx({"host_per_layer_s": 200e-6, "draft_host_per_layer_s": 150e-6,
                                          "host_per_launch_s": 5e-6, "host_per_expert_s": 20e-6})
    old = derive_engine(at, spec, 5e-6)
    assert old["graphed"]["host_per_expert_s"] == 0.0
    assert old["graphed"]["host_per_layer_s"] == pytest.approx(100e-6 + 8 * (50e-6 - c))


def test_validate_grid_on_the_cpu_is_resumable(tmp_path: Path) -> None:
    import pandas as pd

    from sim.experiments.validation import join

    args = ["profile=h200", f"out={tmp_path}", "shapes=[{name: tiny, model: tiny, requests: 1, prompt_tokens: 4, decode_tokens: 4}]",
            "budgets=[0.5]", "links=[pinned]", "policies=[lru,oracle]", "repetitions=2"]
    dry = run("runtime.validate", *args, "dry_run=true")
    assert dry.returncode == 0, dry.stderr
    assert "plan: 4 configs" in dry.stdout and not (tmp_path / "cpu").exists()  # 2 policies x 2 engines
    r = run("runtime.validate", *args)
    assert r.returncode == 0, r.stderr
    df = pd.read_parquet(tmp_path / "cpu" / "validation.parquet")
    assert set(COLUMNS) <= set(df.columns)
    assert (df.source == "measured").sum() == 8 and (df.source == "sim").sum() == 4
    assert df.loc[df.source == "sim", "tpot_rel_err"].notna().all()
    assert len(join(df)) == 8 and df.config_id.nunique() == 4  # the engine is part of config_id
    sim = df[df.source == "sim"].set_index(["policy", "engine"]).tpot_s
    assert sim["lru", "eager"] > sim["lru", "graphed"]  # the simulator prices each engine's host overhead
    again = run("runtime.validate", *args)  # same day: nothing left to run
    assert again.returncode == 0 and len(pd.read_parquet(tmp_path / "cpu" / "validation.parquet")) == len(df)
    bad = run("runtime.validate", *args, "levels=[replayed,open]")
    assert bad.returncode == 2 and "levels: unknown level 'open'" in bad.stderr

    # level replayed added on the same day: closed is done, so only the replayed rows are written,
    # from new measured runs that log their decisions; one replayed sim row per repetition
    both = run("runtime.validate", *args, "levels=[replayed,closed]")
    assert both.returncode == 0, both.stderr
    df2 = pd.read_parquet(tmp_path / "cpu" / "validation.parquet")
    assert len(df2[df2.level == "closed"]) == len(df)
    rep = df2[df2.level == "replayed"]
    assert (rep.source == "measured").sum() == 8 and (rep.source == "sim").sum() == 8
    assert set(rep.config_id) == set(df.config_id)
    for _, r in rep.iterrows():  # every replayed row names the decisions file it came from, and it loads
        assert DecisionLog.load(tmp_path / "cpu" / r["decisions"]).meta["config_id"] == r["config_id"]
    assert rep.loc[rep.source == "sim", "tpot_rel_err"].notna().all() and (rep.replay_unreached.dropna() == 0).all()
    j = join(df2)
    assert set(j.level) == {"closed", "replayed"} and len(j) == 16
    assert set(summary(j).level) == {"closed", "replayed"}
    # oracle prefetches: its replayed decisions are not empty
    oracle = rep[(rep.policy == "oracle") & (rep.source == "measured")].iloc[0]
    assert DecisionLog.load(tmp_path / "cpu" / oracle["decisions"]).prefetches

    # resimulation (no device): the same model predicts every sim row again, bit for bit, into a
    # new file beside the table, which is left as it was
    resim = run("runtime.validate", *args, "levels=[replayed,closed]", "resimulate=true")
    assert resim.returncode == 0, resim.stderr
    assert "replayed: median |TPOT error|" in resim.stdout and "closed: median |TPOT error|" in resim.stdout
    (out,) = (tmp_path / "cpu" / "resimulated").glob("*.parquet")
    new = pd.read_parquet(out)
    assert pd.read_parquet(tmp_path / "cpu" / "validation.parquet").equals(df2)
    key = ["level", "config_id", "source", "repetition"]
    old_sim, new_sim = (t[t.source == "sim"].set_index(key).sort_index() for t in (df2, new))
    assert len(new) == len(df2) and new_sim.index.equals(old_sim.index)
    assert (new_sim.tpot_s == old_sim.tpot_s).all() and (new_sim.tpot_rel_err == old_sim.tpot_rel_err).all()
    bad = run("runtime.validate", *args, "resimulate=true", "shapes=[{name: other, model: tiny}]")
    assert bad.returncode == 2 and "shape(s) ['tiny'] that shapes= does not name" in bad.stderr
    none = run("runtime.validate", *args, "resimulate=true", f"out={tmp_path / 'empty'}")
    assert none.returncode == 2 and "no validation table" in none.stderr


@pytest.mark.parametrize("link", ["pinned", "pageable"])
def test_validate_on_the_virtual_time_backend_has_no_error_at_either_level(tmp_path: Path, link: str) -> None:
    """The whole pipeline (measured runs logging their decisions, files written and read back, the
    replay, the join) where both sides are the same model: the runtime on the deterministic
    virtual-time backend under the profile the simulator uses. Every error is floating-point
    rounding, at both levels, also where pageable copies hold the host."""
    import pandas as pd

    r = run("runtime.validate", "profile=h200", f"out={tmp_path}", "cpu_backend=virtual", "engines=[eager]",
            "shapes=[{name: tiny, model: tiny, requests: 2, prompt_tokens: 4, decode_tokens: 8}]", "budgets=[0.25]",
            f"links=[{link}]", "policies=[lru,lookahead,oracle]", "repetitions=1", "levels=[replayed,closed]")
    assert r.returncode == 0, r.stderr
    df = pd.read_parquet(tmp_path / "cpu" / "validation.parquet")
    sim = df[df.source == "sim"]
    assert sorted(sim.level) == ["closed"] * 3 + ["replayed"] * 3
    assert (sim.tpot_rel_err.abs() < 1e-9).all()
    rep = sim[sim.level == "replayed"].set_index("policy")
    assert (rep.replay_eviction_agreement == 1.0).all()  # the replay made the runtime's every eviction
    assert (rep.loc[["lookahead", "oracle"], "replay_issue_agreement"] == 1.0).all()  # and every prefetch, as timed
    assert (df[(df.policy == "lru") & (df.source == "measured")].stall_share > 0).all()  # the copies matter here
    s = summary(join(df)).set_index("level")
    assert s.loc["replayed", "meets_target"] and s.loc["closed", "meets_target"]
    l1 = level1(tmp_path / "cpu" / "timelines")  # level 1: every copy and layer span has its partner, same length
    assert sorted(l1.level) == ["closed"] * 3 + ["replayed"] * 3
    assert (l1.copies_matched_share == 1.0).all() and (l1.copies_measured > 0).any()
    errs = l1[[c for c in l1.columns if c.endswith("_abs_err") or c.endswith("_rel_err")]]
    assert (errs.abs().fillna(0.0) < 1e-6).all().all(), errs.to_string()
    assert (l1.experts_spans > 0).all()


def test_a_bad_decisions_file_in_the_table_folder_is_one_line(tmp_path: Path) -> None:
    """The replay reads each decisions file back from disk: a damaged one stops the call with one
    line naming it (here: written over by a text file before the replay reads it)."""
    from runtime.validate import _add_replayed_rows

    (tmp_path / "decisions").mkdir()
    (tmp_path / "decisions" / "x.r0.parquet").write_text("oops")
    m = {"level": "replayed", "config_id": "x", "card": "cpu", "date": "d", "engine": "eager", "link": "pinned",
         "model": "tiny", "budget": 0.5, "repetition": 0, "policy": "lru", "source": "measured", "tpot_s": 0.01,
         "decisions": "decisions/x.r0.parquet"}
    with pytest.raises(SimError, match=r"decisions file .*x\.r0\.parquet: not a Parquet file"):
        _add_replayed_rows([m], None, {"lru": ["replayed"]}, None, tmp_path / "validation.parquet", "tiny",
                           {"budget": 0.5, "link": "pinned", "engine": "eager"}, print)


def _timeline(copies, compute):
    return chrome_trace(compute, copies, [], num_experts=4, moe_layers=(0, 1))


def test_level1_pairs_copies_and_spans_by_name_and_occurrence() -> None:
    """Hand-made timelines: the simulator's copies 10% longer, one measured copy without partner,
    its expert spans 20% shorter, attention exact, and 1 ms of stall against 2 ms measured."""
    meas = _timeline(
        copies=[(0.0, 1.0, 0, False), (1.0, 2.0, 5, True), (3.0, 4.0, 0, False), (4.0, 5.0, 3, False)],
        compute=[(0.0, 0.5, "attn+router L0"), (0.5, 2.5, "stall L0"), (2.5, 3.5, "experts L0"),
                 (3.5, 4.0, "verify attn+router L1"), (4.0, 5.0, "verify experts L1")])
    sim = _timeline(
        copies=[(0.0, 1.1, 0, False), (1.1, 2.2, 5, True), (3.0, 4.1, 0, False)],
        compute=[(0.0, 0.5, "attn+router L0"), (0.5, 1.5, "stall L0"), (1.5, 2.3, "experts L0"),
                 (3.5, 4.0, "verify attn+router L1"), (4.0, 4.8, "verify experts L1")])
    e = timeline_errors(meas, sim)
    assert (e["copies_measured"], e["copies_sim"]) == (4, 3)
    assert e["copies_matched_share"] == pytest.approx(0.75)  # L1.E3 has no partner
    assert e["copy_median_abs_err"] == pytest.approx(0.1) and e["copy_mean_rel_err"] == pytest.approx(0.1)
    assert e["experts_spans"] == 2 and e["experts_median_abs_err"] == pytest.approx(0.2)
    assert e["experts_total_rel_err"] == pytest.approx(-0.2)
    assert e["attn_router_median_abs_err"] == pytest.approx(0.0) and e["attn_router_spans"] == 2
    assert e["stall_total_rel_err"] == pytest.approx(-0.5)


def test_level1_refuses_a_damaged_timeline(tmp_path: Path) -> None:
    (tmp_path / "x.measured.json").write_text('{"traceEvents": [{"ph": "X", "pid": 2, "name": "L0.E1"}]}')
    (tmp_path / "x.sim.json").write_text('{"traceEvents": []}')
    with pytest.raises(SimError, match=r"x.measured.json: event 0 lacks a numeric ts/dur"):
        level1(tmp_path)
    (tmp_path / "x.measured.json").write_text("not json")
    with pytest.raises(SimError, match="x.measured.json: cannot read the timeline"):
        level1(tmp_path)
    with pytest.raises(SimError, match="no timeline folder"):
        level1(tmp_path / "missing")


def test_a_grid_fraction_rotates_link_and_engine_over_shapes_and_budgets() -> None:
    """fraction=0.25 of 3 shapes x 3 budgets x 2 links x 2 engines: one group per (shape, budget),
    the four (link, engine) pairs rotating over them (none left out, none taking every cell);
    fraction=1: the whole product, each group once."""
    from collections import Counter

    from omegaconf import OmegaConf

    from runtime.validate import grid

    cfg = OmegaConf.create({"engines": ["graphed", "eager"], "levels": ["closed"], "links": ["pinned", "paced"],
                            "shapes": [{"name": n, "model": n} for n in ("a", "b", "c")],
                            "budgets": [0.25, 0.5, 0.75], "fraction": 0.25})
    g = grid(cfg)
    assert len(g) == 9
    assert Counter((x["shape"]["name"], x["budget"]) for x in g) == Counter(
        {(n, b): 1 for n in "abc" for b in (0.25, 0.5, 0.75)})
    pairs = Counter((x["link"], x["engine"]) for x in g)
    assert len(pairs) == 4 and min(pairs.values()) >= 2
    cfg.fraction = 1.0
    full = grid(cfg)
    assert len({(x["shape"]["name"], x["budget"], x["link"], x["engine"]) for x in full}) == len(full) == 36
