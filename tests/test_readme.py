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
    # the 'add a preset file' step, with the YAML the README shows
    preset = re.search(r"```yaml\n(defaults: \[/schema/policy@_here_, _self_\]\n.*?)```", README.read_text(), re.S)
    (conf / "policy" / "mru.yaml").write_text(preset.group(1))
    register_configs()
    runs = [
        ["policy=lru", "policy.eviction=mru-demo"],
        ["policy=lru", "policy.prefetch=same-experts-next-layer-demo"],
        ["policy=lookahead", "policy.predictor=first-experts-demo"],
        ["policy=mru"],
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


def readme_commands(prefix: str) -> list[str]:
    """The README's command lines starting with ``prefix`` (the bare command included)."""
    lines = [ln.split("  #")[0].strip() for ln in README.read_text().splitlines()]
    return [ln for ln in lines if ln == prefix.strip() or ln.startswith(prefix)]


def test_every_simulator_example_can_run_as_written():
    """No `python -m sim` example of the README prints "infeasible": every policy it names has a
    memory plan at its settings and its trace exists (checked without simulating, to stay fast)."""
    import shlex

    from sim.run import policy_plan, policy_presets, prepare

    register_configs()
    cmds = [c for c in readme_commands("python -m sim ")
            if " -m " not in c[len("python -m sim"):] and "plugins=" not in c and "trace.path=mine.parquet" not in c]
    assert len(cmds) >= 5
    for cmd in dict.fromkeys(cmds):
        args = shlex.split(cmd)[3:]
        if any("memory_gb=4" == a.split(".")[-1] for a in args):
            continue  # the README's refusal example (test below)
        with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
            cfg = compose(config_name="sim", overrides=args)
        prep = prepare(cfg)
        for p in policy_presets(cfg.policy):
            policy_plan(prep, p)  # InfeasibleError would name the example


def test_the_refusal_example_prints_what_the_readme_shows(tmp_path):
    import subprocess

    text = README.read_text()
    block = text[text.index("$ python -m sim policy=lru hardware.memory_gb=4"):]
    cmd, shown, code = block.splitlines()[:3]
    out = subprocess.run([sys.executable, *cmd[2:].split(";")[0].split()[1:]], capture_output=True, text=True, cwd=tmp_path, timeout=120,
                         env={**__import__("os").environ, "PYTHONPATH": str(README.parent)})
    assert out.stderr.strip() == shown and code == f"exit {out.returncode}" == "exit 2"
