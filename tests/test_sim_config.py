"""The config is defined once: one schema per group, with help text, from which the specs are built;
presets set only what differs from the schema; the reference page is generated from the schemas."""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from sim.config import GROUP_SCHEMAS, SimConf, describe, reference
from sim.governor import GovernorConf, RooflineGovernor
from sim.presets import conf_dir

ROOT = Path(__file__).resolve().parents[1]


def test_the_reference_page_is_current() -> None:
    """docs/config.md is `python -m sim.config`'s output: regenerate it when a schema changes."""
    assert (ROOT / "docs" / "config.md").read_text() == reference()


@pytest.mark.parametrize("schema", [SimConf, *GROUP_SCHEMAS.values()], ids=lambda s: s.__name__)
def test_every_key_has_help(schema: type) -> None:
    missing = [key for key, _, text in describe(schema) if not text.strip()]
    assert missing == []


@pytest.mark.parametrize("group", ["governor", "trace"])
def test_presets_set_only_what_differs_from_the_schema(group: str) -> None:
    """A default is written in the schema, not again in a preset."""
    defaults = OmegaConf.to_container(OmegaConf.structured(GROUP_SCHEMAS[group]))
    for path in sorted((conf_dir() / group).glob("*.yaml")):
        raw = OmegaConf.to_container(OmegaConf.load(path))
        raw.pop("defaults", None)
        restated = {k: v for k, v in raw.items() if k != "name" and defaults.get(k) == v}
        assert restated == {}, f"{path.name} restates schema defaults"


def test_a_governor_built_without_settings_has_the_schema_defaults() -> None:
    gov = RooflineGovernor()
    for f in dataclasses.fields(GovernorConf):
        if f.name != "name":
            assert getattr(gov, f.name) == getattr(GovernorConf(), f.name), f.name


def _imports(module: Path) -> set[str]:
    tree = ast.parse(module.read_text())
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return out


def test_specs_do_not_import_each_other_or_the_app_config() -> None:
    """sim.presets <- sim.spec, sim.hardware, sim.governor <- sim.config: no cycle, even a lazy one."""
    for name in ("spec", "hardware", "governor", "presets"):
        imported = _imports(ROOT / "sim" / f"{name}.py")
        assert "sim.config" not in imported, name
    assert "sim.hardware" not in _imports(ROOT / "sim" / "spec.py")
    assert "sim.spec" not in _imports(ROOT / "sim" / "hardware.py")


@pytest.mark.parametrize("app", ["sim", "run", "capture", "validate", "profile"])
def test_app_configs_hold_only_their_defaults_lists(app: str) -> None:
    """An app's keys and defaults are its schema's (SimConf, RunConf, CaptureConf, ValidateConf, ProfileConf)."""
    raw = OmegaConf.to_container(OmegaConf.load(conf_dir() / f"{app}.yaml"))
    assert set(raw) <= {"defaults", "hydra"}
