"""Every figure the project draws shows data in every panel, and no title is cut off.

The experiments' sweep figures are drawn from rows shaped exactly as their sweeps produce them
(every job's config composed, its config keys as the sweep writes them; metric values made up:
these tests check layout, not numbers). The roofline and cycle figures, and the notebooks' figures,
are checked where they are drawn (sim.experiments.roofline._save_png; tests/test_notebooks.py)."""

from __future__ import annotations

import itertools
import zlib
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from sim.experiments.figures import clipped_texts, empty_axes, sweep_figure  # noqa: E402
from sim.presets import conf_dir  # noqa: E402

EXPERIMENTS = sorted(p.stem for p in (conf_dir() / "experiment").glob("*.yaml")
                     if "aggregate:" in p.read_text() and "figure:" in p.read_text())


def sweep_rows(name: str) -> tuple[pd.DataFrame, dict]:
    """One row per (job, policy) of experiment ``name``, with the keys its jobs would write."""
    from hydra import compose, initialize_config_dir

    from sim.config import register_configs
    from sim.run import base_keys, policy_presets

    register_configs()
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        base = compose(config_name="sim", overrides=[f"experiment={name}"], return_hydra_config=True)
    # the first and last value of each swept key: the same keys vary as in the full sweep (which
    # decides the figure's panels), at a fraction of the compositions
    params = {k: [v.split(",")[0], v.split(",")[-1]] if "," in v else [v]
              for k, v in ((k, str(v)) for k, v in (base.hydra.sweeper.params or {}).items())}
    params = {k: list(dict.fromkeys(v)) for k, v in params.items()}
    spec = OmegaConf.to_container(base.hydra.callbacks.aggregate.get("figure"), resolve=True)
    rows = []
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        for values in itertools.product(*params.values()):
            ovr = [f"experiment={name}", *(f"{k}={v}" for k, v in zip(params, values))]
            cfg = compose(config_name="sim", overrides=ovr)
            for p in policy_presets(cfg.policy):
                key = {**base_keys(cfg), "policy": p.name, "eviction": p.eviction, "prefetch": p.prefetch,
                       "predictor": p.predictor}
                made_up = 1 + zlib.crc32(repr(sorted(key.items())).encode()) % 1000 / 10
                rows.append({**key, "status": "ok", "tpot_ms": made_up, "hit_rate": made_up / 101,
                             "tokens_per_s": 1000 / made_up, "x_bound": made_up / 10})
    return pd.DataFrame(rows), spec


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_figures_have_data_in_every_panel(name):
    rows, spec = sweep_rows(name)
    g = sweep_figure(rows, spec)
    try:
        assert g is not None
        panels = list(g.axes.flat)
        hidden = [ax.get_title() for ax in panels if not ax.get_visible()]
        assert not hidden, f"{name}: {len(hidden)} of {len(panels)} panels would be empty: {hidden}"
        assert not empty_axes(g.figure)
    finally:
        plt.close(g.figure)


def test_a_key_the_x_value_determines_is_not_a_facet():
    """memory_gb beside x=memory_gib (or each model's own budgets) must not multiply the panels."""
    rows = pd.DataFrame([{"model": m, "memory_gib": g, "memory_gb": g * 1.073741824, "policy": p, "status": "ok",
                          "tpot_ms": g + i} for m in ("a", "b") for g in (12, 16) for i, p in enumerate(("x", "y"))])
    g = sweep_figure(rows, {"x": "memory_gib", "y": "tpot_ms", "hue": "policy", "col": "model"})
    try:
        assert len(g.axes.flat) == 2 and all(ax.get_visible() for ax in g.axes.flat)
    finally:
        plt.close(g.figure)


def test_empty_axes_and_clipped_titles_are_detected():
    fig, (a, b) = plt.subplots(1, 2, figsize=(3, 2))
    a.plot([0, 1], [0, 1])
    b.set_title("nothing here")
    a.set_title("a title much longer than this small figure is wide, so it runs off its edge " * 2)
    try:
        assert empty_axes(fig) == ["nothing here"]
        assert clipped_texts(fig) and clipped_texts(fig)[0].startswith("a title")
    finally:
        plt.close(fig)


def test_roofline_figures_are_checked_when_saved(tmp_path):
    from sim.experiments.roofline import _save_png

    fig, ax = plt.subplots()
    ax.set_title("an empty roofline")
    with pytest.raises(AssertionError, match="empty panels"):
        _save_png(fig, tmp_path / "r.png")
    assert not list(Path(tmp_path).iterdir())
    plt.close(fig)
