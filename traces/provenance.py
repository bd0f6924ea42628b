"""Where a file came from: the project's version and source revision, recorded in the metadata of
every trace the project writes (synthetic, imported or captured)."""

from __future__ import annotations

import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def project_version() -> str:
    """The installed distribution's version, else pyproject.toml's beside the package, else "unknown"."""
    try:
        from importlib.metadata import version

        return version("moe-offload-sim")
    except Exception:  # noqa: BLE001 - not installed as a distribution
        pass
    try:
        import tomllib

        return str(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"])
    except Exception:  # noqa: BLE001 - no readable pyproject.toml
        return "unknown"


def git_sha() -> str | None:
    """The source checkout's commit, or None outside a git checkout."""
    try:
        out = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return (out.stdout.strip() or None) if out.returncode == 0 else None
