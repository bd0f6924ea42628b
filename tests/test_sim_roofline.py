"""Roofline and cycle-timeline figures: the numbers behind them by hand, PNGs on synthetic data,
cycle detection in Chrome traces, the `python -m sim.roofline RUN_DIR` command and bad input."""

from __future__ import annotations

import json
import math
import random
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from sim.errors import SimError
from sim.experiments.roofline import (
    CYCLE_COLUMNS,
    compute_roofs_from_cycles,
    cycle_overlap,
    cycle_timeline_figure,
    cycle_windows,
    main,
    most_chosen_k,
    operating_points,
    roofline_figure,
)
from sim.timeline import chrome_trace

ROOT = Path(__file__).resolve().parent.parent
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def synth_cycles(seed: int = 0) -> list[dict]:
    """Cycles of a toy speculative run: 150 MB experts over a 25 GB/s link, acceptance 0.85."""
    rng = random.Random(seed)
    size, link = 150e6, 25e9
    rows = []
    for k in (1, 2, 3, 4, 6, 8):
        for _ in range(20):
            a = 0
            while a < k and rng.random() < 0.85:
                a += 1
            td, tv = 0.004 + 0.003 * k, 0.02 + 0.002 * (k + 1)
            n_new = int(2 + 1.5 * k + rng.randint(0, 3))
            tp = n_new * size / link
            rows.append(dict(k=k, accepted=a, observed_cycle_s=td + tv + max(0.0, tp - td) + 0.001 * rng.random(),
                             bytes_moved=n_new * size, t_draft=td, t_verify=tv, t_pcie=tp))
    rows.append(dict(k=2, accepted=2, observed_cycle_s=0.03, bytes_moved=0.0, t_draft=0.01, t_verify=0.02, t_pcie=0.0))
    return rows


def synth_trace(cycles: int = 3, k: int = 4, tag: bool = False) -> dict:
    """Prefill, then ``cycles`` cycles: k draft spans (each releasing two prefetches), a stall,
    four verify layers with one demand miss (a stall) after the third."""
    compute, copies, occ = [], [], []
    t = 0.0
    compute.append((t, t + 0.05, "attn+router L0"))
    t += 0.05
    key, link_free, n = 0, 0.0, 10
    for _ in range(cycles):
        for i in range(k):
            compute.append((t, t + 0.003, f"draft {i}"))
            t += 0.003
            for _ in range(2):
                s = max(link_free, t - 0.003)
                copies.append((s, s + 0.006, key, True))
                key, link_free, n = key + 1, s + 0.006, n + 1
                occ.append((link_free, n))
        compute.append((t, t + 0.004, "stall L0"))
        t = max(t + 0.004, link_free)
        for layer in range(4):
            compute.append((t, t + 0.005, f"verify L{layer}"))
            t += 0.005
            if layer == 2:
                copies.append((t, t + 0.006, key, False))
                key += 1
                compute.append((t, t + 0.006, f"stall L{layer + 1}"))
                t += 0.006
        compute.append((t, t + 0.001, "head"))
        t += 0.001
    tr = chrome_trace(compute, copies, occ, num_experts=16, moe_layers=tuple(range(32)))
    if tag:  # the driver's explicit cycle numbers: every span from one draft to the next is one cycle
        c = -1
        for ev in tr["traceEvents"]:
            if ev.get("ph") == "X" and ev["pid"] == 1:
                if ev["name"] == "draft 0":
                    c += 1
                if c >= 0:
                    ev["args"] = {"cycle": c}
    return tr


def assert_png(path: Path, min_bytes: int = 15_000) -> None:
    assert path.is_file()
    assert path.read_bytes()[:8] == PNG_MAGIC
    assert path.stat().st_size > min_bytes


# ------------------------------------------------------------------ numbers
def test_operating_points_by_hand() -> None:
    cyc = [
        dict(k=2, accepted=2, observed_cycle_s=0.1, bytes_moved=1e9, t_draft=0.02, t_verify=0.03, t_pcie=0.04),
        dict(k=2, accepted=0, observed_cycle_s=0.3, bytes_moved=3e9, t_draft=0.02, t_verify=0.03, t_pcie=0.12),
        dict(k=4, accepted=3, observed_cycle_s=0.2, bytes_moved=0.0, t_draft=0.04, t_verify=0.05, t_pcie=0.0),
    ]
    op = operating_points(cyc)
    assert op.loc[2, "cycles"] == 2 and op.loc[2, "tokens"] == 2
    assert op.loc[2, "throughput"] == pytest.approx(2 / 0.4)  # ratio of sums
    assert op.loc[2, "intensity"] == pytest.approx(2 / 4e9)
    assert op.loc[2, "compute_roof"] == pytest.approx(2 / 0.1)
    assert math.isinf(op.loc[4, "intensity"])
    em = operating_points(cyc, tokens="emitted")
    assert em.loc[2, "throughput"] == pytest.approx(4 / 0.4)
    assert compute_roofs_from_cycles(cyc) == pytest.approx({2: 20.0, 4: 3 / 0.09})
    assert most_chosen_k(cyc) == 2
    # the I/O roof bounds every point when bytes_moved fits in the link's time: B * I >= Θ
    b = 50e9
    assert b * op.loc[2, "intensity"] >= op.loc[2, "throughput"]


def test_cycle_windows_inferred_from_names() -> None:
    tr = synth_trace(cycles=3)
    cyc = cycle_windows(tr)
    assert len(cyc) == 3
    # prefill (50 ms) belongs to no cycle; each cycle: 4 drafts + stall + 4 verify + 1 stall, head excluded
    assert cyc[0]["start_us"] == pytest.approx(50_000)
    assert [s["name"] for s in cyc[0]["spans"]][:5] == ["draft 0", "draft 1", "draft 2", "draft 3", "stall L0"]
    assert cyc[0]["spans"][-1]["name"] == "verify L3"
    assert all(a["end_us"] <= b["start_us"] for a, b in zip(cyc, cyc[1:]))


def test_cycle_windows_from_args_cycle() -> None:
    tr = synth_trace(cycles=3, tag=True)
    cyc = cycle_windows(tr)
    assert [c["cycle"] for c in cyc] == [0, 1, 2]
    assert cyc[0]["spans"][-1]["name"] == "head"  # tagged: the driver decides what a cycle holds


def test_cycle_overlap_by_hand() -> None:
    st = cycle_overlap(synth_trace(), 1)
    # drafts 12 ms, then stall 4 ms, link busy until 48 ms (8 prefetches of 6 ms back to back),
    # verify 4 x 5 ms with a 6 ms demand-miss stall; last verify ends at 74 ms
    assert st["cycle_s"] == pytest.approx(0.074)
    assert st["draft_s"] == pytest.approx(0.012)
    assert st["verify_s"] == pytest.approx(0.020)
    assert st["stall_s"] == pytest.approx(0.010)
    assert st["link_busy_s"] == pytest.approx(0.054)
    assert st["link_under_draft_s"] == pytest.approx(0.012)
    assert st["link_under_stall_s"] == pytest.approx(0.010)
    assert st["hidden_share"] == pytest.approx(12 / 54)
    assert st["copies"] == 9


# ------------------------------------------------------------------ figures
def test_roofline_figure_renders(tmp_path: Path) -> None:
    cyc = synth_cycles()
    out = roofline_figure(cyc, link_bytes_per_s=25e9, compute_roofs=compute_roofs_from_cycles(cyc), chosen_k=4,
                          path=tmp_path / "sub" / "roofline.png")
    assert out == tmp_path / "sub" / "roofline.png"
    assert_png(out)
    # a DataFrame, emitted tokens, a chosen k with no cycle and a roof for a k never run
    df = pd.DataFrame(cyc)
    roofs = {**compute_roofs_from_cycles(df, "emitted"), 12: 80.0}
    assert_png(roofline_figure(df, link_bytes_per_s=25e9, compute_roofs=roofs, chosen_k=12,
                               path=tmp_path / "em.png", tokens="emitted"))
    assert not list(tmp_path.glob(".*"))  # no temp file left behind


def test_cycle_timeline_figure_renders(tmp_path: Path) -> None:
    assert_png(cycle_timeline_figure(synth_trace(), 1, tmp_path / "cycle.png"))
    assert_png(cycle_timeline_figure(synth_trace(tag=True), -1, tmp_path / "last.png"))


def test_figure_input_errors(tmp_path: Path) -> None:
    cyc = synth_cycles()
    with pytest.raises(SimError, match="bytes_moved"):
        roofline_figure([{k: v for k, v in c.items() if k != "bytes_moved"} for c in cyc], link_bytes_per_s=1e9,
                        compute_roofs={}, chosen_k=None, path=tmp_path / "x.png")
    bad = [dict(cyc[0], accepted=5, k=2)]
    with pytest.raises(SimError, match="row 0"):
        operating_points(bad)
    with pytest.raises(SimError, match="observed_cycle_s"):
        operating_points([dict(cyc[0], observed_cycle_s=float("nan"))])
    with pytest.raises(SimError, match="link_bytes_per_s"):
        roofline_figure(cyc, link_bytes_per_s=0, compute_roofs={}, chosen_k=None, path=tmp_path / "x.png")
    with pytest.raises(SimError, match="compute_roofs"):
        roofline_figure(cyc, link_bytes_per_s=1e9, compute_roofs={2: -1.0}, chosen_k=None, path=tmp_path / "x.png")
    with pytest.raises(SimError, match="out of range"):
        cycle_timeline_figure(synth_trace(cycles=2), 5, tmp_path / "x.png")
    autoregressive = chrome_trace([(0, 1, "attn+router L0")], [], [], num_experts=4, moe_layers=(0,))
    with pytest.raises(SimError, match="no draft/verify cycle"):
        cycle_timeline_figure(autoregressive, 0, tmp_path / "x.png")
    with pytest.raises(SimError, match="traceEvents"):
        cycle_windows({"events": []})
    assert not (tmp_path / "x.png").exists()


# ------------------------------------------------------------------ command line
def write_run(run: Path, **extra) -> None:
    run.mkdir(parents=True, exist_ok=True)
    df = pd.DataFrame(synth_cycles())
    for k, v in extra.items():
        df[k] = v
    df.to_parquet(run / "cycles.parquet")
    (run / "timeline.json").write_text(json.dumps(synth_trace()))


def test_cli_writes_both_figures(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run = tmp_path / "run"
    write_run(run)
    assert main([str(run), "--link-gbps", "25", "--cycle", "1"]) == 0
    printed = capsys.readouterr().out.split()
    assert printed == [str(run / "roofline.png"), str(run / "cycle_timeline.png")]
    assert_png(run / "roofline.png")
    assert_png(run / "cycle_timeline.png")


def test_cli_link_bandwidth_from_the_resolved_config(tmp_path: Path) -> None:
    from omegaconf import OmegaConf

    from sim.experiments.roofline import link_bandwidth_for_run
    from sim.config import load_group_file

    run = tmp_path / "run"
    write_run(run)
    cfg = {"model": OmegaConf.to_container(load_group_file("model", "phi-3.5-moe")),
           "hardware": OmegaConf.to_container(load_group_file("hardware", "a100-40g-pcie4"))}
    (run / ".hydra").mkdir()
    OmegaConf.save(OmegaConf.create(cfg), run / ".hydra" / "config.yaml")
    bw, src = link_bandwidth_for_run(run, pd.read_parquet(run / "cycles.parquet"))
    assert "a100-40g-pcie4" in src and 5e9 < bw < 40e9
    # no config, no column: estimated from the cycles
    (run / ".hydra" / "config.yaml").unlink()
    bw, src = link_bandwidth_for_run(run, pd.read_parquet(run / "cycles.parquet"))
    assert src.startswith("estimated") and bw == pytest.approx(25e9)


def test_cli_one_figure_per_policy(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    a, b = pd.DataFrame(synth_cycles(0)), pd.DataFrame(synth_cycles(1))
    a["policy"], b["policy"] = "speq", "spec-lru"
    pd.concat([a, b]).to_parquet(run / "cycles.parquet")
    out = tmp_path / "figs"
    assert main([str(run), "--link-gbps", "25", "-o", str(out), "--tokens", "emitted", "--chosen-k", "3"]) == 0
    assert_png(out / "roofline_speq.png")
    assert_png(out / "roofline_spec-lru.png")


def test_cli_errors(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main([str(tmp_path / "nope")]) == 2
    assert "no such run folder" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main([str(tmp_path / "empty")]) == 2
    assert "cycles.parquet" in capsys.readouterr().err
    run = tmp_path / "run"
    write_run(run)
    ar = chrome_trace([(0, 1, "x")], [], [], num_experts=2, moe_layers=(0,))
    (run / "timeline_ar.json").write_text(json.dumps(ar))
    assert main([str(run), "--link-gbps", "25"]) == 0  # a timeline without cycles is skipped, said so
    assert "timeline_ar.json" in capsys.readouterr().err


def test_module_runs_as_a_script(tmp_path: Path) -> None:
    run = tmp_path / "run"
    write_run(run)
    (run / "timeline.json").unlink()
    r = subprocess.run([sys.executable, "-m", "sim.roofline", str(run), "--link-gbps", "25"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert_png(run / "roofline.png")
    assert set(CYCLE_COLUMNS) <= set(pd.read_parquet(run / "cycles.parquet").columns)
