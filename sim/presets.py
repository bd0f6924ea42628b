"""Where the shipped configs live and how one is read: ``conf_dir()``, ``load_preset()``, and the
Hydra schema of a spec dataclass (``hydra_schema``).

Every config group is defined once, by a dataclass whose fields carry their help text
(``setting(default, "help")``); the specs (``ModelSpec``, ``HardwareSpec``) are those dataclasses,
and their Hydra schemas are derived from them here, so a preset, the command line, the simulator
and the runtime read the same fields. ``python -m sim.config`` prints every group's keys with their
defaults and help (docs/config.md).
"""

from __future__ import annotations

import copy
import dataclasses
import typing
from dataclasses import MISSING as NO_DEFAULT, Field
from pathlib import Path
from typing import Any, Collection, List, Mapping, Optional, Sequence

from omegaconf import MISSING

from sim.errors import SimError

REQUIRED = "required"  # metadata key: the field has a placeholder default but a preset must set it


def conf_dir() -> Path:
    """The shipped Hydra configs: conf/ of a source checkout, or the installed ``conf`` package."""
    here = Path(__file__).resolve().parent.parent / "conf"
    if here.is_dir():
        return here
    import conf  # installed as package data (pyproject: packages conf*)

    return Path(conf.__file__).resolve().parent


def setting(default: Any = NO_DEFAULT, help: str = "", *, required: bool = False) -> Any:
    """A dataclass field with its help text; ``required``: a preset must set it (the spec's own
    default only exists so that dataclass field order works)."""
    meta = {"help": help, REQUIRED: required}
    if type(default).__hash__ is None:  # a list, dict or dataclass: each instance gets its own copy
        return dataclasses.field(default_factory=lambda: copy.deepcopy(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def help_of(f: Field) -> str:
    return str(f.metadata.get("help", ""))


def _schema_type(tp: Any) -> Any:
    """The OmegaConf-compatible type of a spec field's type (tuples become lists)."""
    origin = typing.get_origin(tp)
    if origin is tuple:
        args = typing.get_args(tp)
        return List[int] if args and args[0] is int else List[Any]
    if origin is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return Optional[_schema_type(args[0])]
    return tp


def _as_lists(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_as_lists(v) for v in value]
    return value


def hydra_schema(spec_cls: type, name: str, *, required: Collection[str] = (),
                 extra: Sequence[tuple[str, Any, Any]] = ()) -> type:
    """A Hydra structured-config dataclass with the fields of ``spec_cls`` (lists for tuples; a
    field with no default, marked required, or named in ``required`` is MISSING: a preset must set
    it) plus ``extra`` (name, type, field) entries that only the config has."""
    hints = typing.get_type_hints(spec_cls)
    out = []
    for f in dataclasses.fields(spec_cls):
        meta = dict(f.metadata)
        tp = _schema_type(hints[f.name])
        no_default = f.default is NO_DEFAULT and f.default_factory is NO_DEFAULT
        if f.name in required or f.metadata.get(REQUIRED) or no_default:
            fld = dataclasses.field(default=MISSING, metadata=meta)
        else:
            value = _as_lists(f.default if f.default is not NO_DEFAULT else f.default_factory())
            if isinstance(value, (list, dict)):
                fld = dataclasses.field(default_factory=lambda v=value: copy.deepcopy(v), metadata=meta)
            else:
                fld = dataclasses.field(default=value, metadata=meta)
        out.append((f.name, tp, fld))
    schema = dataclasses.make_dataclass(name, [*out, *extra])
    schema.__doc__ = f"Hydra schema of {spec_cls.__name__} (derived: sim.presets.hydra_schema)."
    schema.__module__ = spec_cls.__module__
    return schema


def to_plain(cfg: Any) -> dict[str, Any]:
    """A mutable plain dict from a DictConfig or mapping (missing values kept as ``MISSING``)."""
    from omegaconf import DictConfig, OmegaConf

    if isinstance(cfg, DictConfig):
        return dict(OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False))
    if not isinstance(cfg, Mapping):
        raise SimError(f"expected a mapping for the config node, got {type(cfg).__name__}")
    return dict(cfg)


def missing_keys(d: Mapping[str, Any]) -> list[str]:
    """Keys of a plain config dict left MISSING (a preset that did not set a required field)."""
    return [k for k, v in d.items() if isinstance(v, str) and v == MISSING]


def spec_from_dict(cls: type, d: Mapping[str, Any], where: str, required: Collection[str] = ()) -> Any:
    """``cls(**d)`` once ``d`` names only fields of ``cls`` and sets every required one (those
    without a default, those in ``required``, none left MISSING); errors name the fields."""
    names = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - set(names))
    if unknown:
        raise SimError(f"{where}: unknown field(s) {unknown}")
    needed = set(required) | {n for n, f in names.items()
                              if f.default is NO_DEFAULT and f.default_factory is NO_DEFAULT}
    missing = sorted((needed - set(d)) | set(missing_keys(d)))
    if missing:
        raise SimError(f"{where}: missing value(s) for {missing}")
    return cls(**dict(d))


def load_preset(group: str, option: str, schema: type, root: Path | None = None) -> Any:
    """conf/<group>/<option>.yaml merged onto its schema the way Hydra composes it, without Hydra
    (the runtime, notebooks, tests, a policy suite's members). Returns a DictConfig."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    base = Path(root) if root is not None else conf_dir()
    path = base / group / f"{option}.yaml"
    if not path.is_file():
        known = sorted(str(p.relative_to(base / group).with_suffix("")) for p in (base / group).rglob("*.yaml"))
        raise SimError(f"unknown {group} preset '{option}' ({path} not found); known: {', '.join(known)}")
    try:
        raw = OmegaConf.load(path)
        raw.pop("defaults", None)
        return OmegaConf.merge(OmegaConf.structured(schema), raw)
    except OmegaConfBaseException as e:
        raise SimError(f"{path}: {e}") from None
