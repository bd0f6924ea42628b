"""Every notebook in notebooks/ runs end to end, headless, with tiny parameters, and draws its figures."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
jupytext = pytest.importorskip("jupytext")
nbclient = pytest.importorskip("nbclient")


def tiny_speculative(tmp: Path) -> Path:
    """The rows benchmarks/gpu_speculative.py writes, for one shape and engine (made-up values)."""
    import pandas as pd

    rows = [dict(card="toy card", model="toy-L2", engine="graphed", label=label, policy=policy, k=k, status="ok",
                 tpot_measured_s=t, speedup_measured=0.010 / t, speedup_sim=s, link_util=0.9, acceptance=0.8, mean_k=2.0)
            for label, policy, k, t, s in (("lru", "lru", "-", 0.010, 1.0), ("speq", "speq", "governor", 0.008, 1.3),
                                           ("speq-k2", "speq", 2, 0.0085, 1.2), ("spec-lru", "spec-lru", "governor", 0.012, 0.8))]
    path = tmp / "gs" / "results.parquet"
    path.parent.mkdir(parents=True)
    pd.DataFrame(rows).astype({"k": str}).to_parquet(path)  # as the script writes it
    return path


def tiny_validation(tmp: Path) -> Path:
    """A two-config validation table with per-token latencies and both timelines of one config."""
    import pandas as pd

    from sim.timeline import chrome_trace
    from sim.experiments.validation import COLUMNS

    rows = []
    for cid, m, s in (("c1", 0.010, 0.0104), ("c2", 0.020, 0.019)):
        for src, tpot, reps in (("measured", m, 2), ("sim", s, 1)):
            for rep in range(reps):
                gaps = [tpot * f for f in (0.9, 1.0, 1.1, 1.0)]
                rows.append({c: None for c in COLUMNS} | dict(
                    level="closed", config_id=cid, card="toy", date="2026-12-07", engine="eager", link="pinned",
                    policy="lru" if cid == "c1" else "oracle", source=src, model="tiny", budget=0.5, repetition=rep,
                    tpot_s=tpot, p50_token_s=tpot, p90_token_s=tpot * 1.1, p99_token_s=tpot * 1.1, ttft_s=0.05,
                    hit_rate=0.5, stall_share=0.1, k=0.0, token_gaps_s=gaps))
    path = tmp / "toy" / "validation.parquet"
    path.parent.mkdir(parents=True)
    pd.DataFrame(rows).to_parquet(path)
    for src in ("measured", "sim"):
        tl = chrome_trace([(0.0, 0.001, "attn+router L0"), (0.001, 0.002, "stall L0"), (0.002, 0.003, "experts L0")],
                          [(0.0005, 0.0019, 3, False)], [(0.002, 4)], num_experts=4, moe_layers=(0,), source=src)
        for cid in ("c1", "c2"):
            (path.parent / "timelines").mkdir(exist_ok=True)
            (path.parent / "timelines" / f"{cid}.{src}.json").write_text(json.dumps(tl))
    return path


PARAMS = {
    "sim_vs_measured": lambda tmp: {"validation": str(tiny_validation(tmp))},
    "trace_analysis": lambda tmp: {"synthetic": ["tiny"], "requests": 1, "prompt_tokens": 4, "decode_tokens": 12,
                                   "max_window": 3},
    "policy_sweep": lambda tmp: {"model": "tiny", "layers": 2, "hardware": ["h200"], "budgets": [0.5],
                                 "policies": ["lru", "speq"], "link_gbps": [16.0], "host_per_layer_s": [0.0, 1e-4],
                                 "requests": 1, "prompt_tokens": 4, "decode_tokens": 24},
    "governor": lambda tmp: {"model": "tiny", "layers": 2, "fixed_k": [1, 2], "requests": 1, "prompt_tokens": 4,
                             "decode_tokens": 16, "speculative": str(tiny_speculative(tmp))},
}
FIGURES = {
    "sim_vs_measured": ["sim_vs_measured_parity.png", "sim_vs_measured_errors.png", "sim_vs_measured_ecdf.png",
                        "sim_vs_measured_timelines.png", "sim_vs_measured_level1.png"],
    "trace_analysis": ["trace_analysis.png", "trace_draft_agreement.png"],
    "policy_sweep": ["policy_sweep.png", "policy_sweep_speedup.png"],
    "governor": ["governor_roofline.png", "governor_cycle_prediction.png", "governor_speculative_parity.png"],
}


def test_every_notebook_is_tested() -> None:
    assert sorted(p.stem for p in (ROOT / "notebooks").glob("*.py")) == sorted(PARAMS)


@pytest.mark.parametrize("name", sorted(PARAMS))
def test_notebook_runs_with_tiny_parameters(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    nb = jupytext.read(ROOT / "notebooks" / f"{name}.py")
    idx = [i for i, c in enumerate(nb.cells) if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(idx) == 1, "one cell tagged 'parameters'"
    params = {**PARAMS[name](tmp_path), "figures": str(tmp_path / "figures")}
    src = "\n".join(f"{k} = {v!r}" for k, v in params.items())
    nb.cells.insert(idx[0] + 1, nbformat_cell(src))
    nb.cells.append(nbformat_cell(EVERY_PANEL_HAS_DATA))
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    nbclient.NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}).execute()
    for fig in FIGURES[name]:
        assert (tmp_path / "figures" / fig).stat().st_size > 1000, fig


def test_governor_notebook_draws_measured_cycles(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With a gpu_speculative cycles table (here the script's CPU smoke run: real cycles of the tiny
    model, eager), the governor notebook draws the measured cycles, not the simulator's."""
    from benchmarks.gpu_speculative import main

    assert main(["--smoke", "--out", str(tmp_path / "gs"), "--ks", "2", "--reps", "1"]) == 0
    nb = jupytext.read(ROOT / "notebooks" / "governor.py")
    idx = [i for i, c in enumerate(nb.cells) if "parameters" in c.get("metadata", {}).get("tags", [])][0]
    params = {"model": "tiny", "layers": None, "engine": "eager", "cycles": str(tmp_path / "gs" / "cycles.parquet"),
              "speculative": str(tmp_path / "gs" / "results.parquet"), "figures": str(tmp_path / "figures")}
    nb.cells.insert(idx + 1, nbformat_cell("\n".join(f"{k} = {v!r}" for k, v in params.items())))
    nb.cells.append(nbformat_cell("assert source.startswith('measured on the GPU'), source\n"
                                  "assert len(gov) and set(fixed.run) == {'fixed k=2', 'fixed k=4'}, (len(gov), set(fixed.run))"))
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    nbclient.NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}).execute()
    assert (tmp_path / "figures" / "governor_cycle_prediction.png").stat().st_size > 1000


#: appended to each notebook: every figure it drew has data in every visible panel
EVERY_PANEL_HAS_DATA = """
import matplotlib.pyplot as plt
from sim.experiments.figures import empty_axes
_empty = {n: empty_axes(plt.figure(n)) for n in plt.get_fignums()}
assert plt.get_fignums() and not any(_empty.values()), _empty
"""


def nbformat_cell(src: str):
    import nbformat

    return nbformat.v4.new_code_cell(src)
