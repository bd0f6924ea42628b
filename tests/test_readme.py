"""The README's extension example runs as written: a policy, a predictor and a hardware preset."""

from __future__ import annotations

import re
import shutil
import sys
from pathlib import Path

from hydra import compose, initialize_config_dir

from sim.config import register_configs
from sim.run import simulate

from sim.presets import conf_dir

README = Path(__file__).resolve().parent.parent / "README.md"
SMALL = ["model=tiny", "trace.requests=1", "trace.prompt_tokens=4", "trace.decode_tokens=10"]


def extension_block() -> str:
    text = README.read_text()
    start = text.index("## Extending")
    return re.search(r"```python\n(.*?)```", text[start:], re.S).group(1)


def test_readme_extension_example(tmp_path, monkeypatch):
    (tmp_path / "readme_policies.py").write_text(extension_block())
    monkeypatch.syspath_prepend(str(tmp_path))
    conf = tmp_path / "conf"
    shutil.copytree(conf_dir(), conf)
    h200 = (conf / "hardware" / "h200.yaml").read_text()
    (conf / "hardware" / "my-gpu.yaml").write_text(re.sub(r"(?m)^name: .*$", "name: my-gpu", h200))
    register_configs()
    runs = [
        ["policy=lru", "policy.eviction=mru-demo"],
        ["policy=lru", "policy.prefetch=same-experts-next-layer-demo"],
        ["policy=lookahead", "policy.predictor=first-experts-demo"],
        ["policy=lru", "hardware=my-gpu"],
    ]
    for extra in runs:
        with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
            cfg = compose(config_name="sim", overrides=["plugins=[readme_policies]", *SMALL, *extra])
        row = simulate(cfg)[0]
        assert row["status"] == "ok", extra
    assert row["hardware"] == "my-gpu"
    sys.modules.pop("readme_policies", None)


def test_readme_import_example_runs_as_written(tmp_path, monkeypatch):
    """The Traces section's import and replay lines, from a directory where the repository's
    traces/ is visible, as a user runs them after cloning."""
    import shlex

    from traces.__main__ import main as traces_main

    lines = [ln.split("#")[0].strip() for ln in README.read_text().splitlines()]
    imp = next(ln for ln in lines if ln.startswith("python -m traces import "))
    replay = next(ln for ln in lines if ln.startswith("python -m sim ") and "trace.path=mine.parquet" in ln)
    (tmp_path / "traces").symlink_to(README.parent / "traces")
    monkeypatch.chdir(tmp_path)
    assert traces_main(shlex.split(imp)[3:]) == 0
    register_configs()
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        cfg = compose(config_name="sim", overrides=[*shlex.split(replay)[3:], "progress=false"])
    rows = simulate(cfg)
    assert rows and all(r["status"] == "ok" for r in rows)
