"""A sweep job's record: the fingerprint of what decides its rows, the marker it leaves in its dir,
and the sweep's index of finished results by fingerprint.

The sweep app writes these records (``run_job``), the aggregation reads them (``scan_sweep``) and
a resumed sweep looks results up by them (docs/sweeps.md#resume). Each job dir holds Hydra's
``.hydra/`` and, once it ends, ``results.parquet`` and the marker ``sweep_job.json`` (written last,
atomically) with the job's status, error and the digest of the ``.hydra/config.yaml`` it ran with.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from traces.atomic import write_json_atomic

MARKER = "sweep_job.json"
INDEX_DIR = ".sweep_index"

#: config keys that change how a run is shown or stored, never its rows
RUN_ONLY_KEYS = frozenset({"hydra", "progress", "timeline_out", "resume", "results_name", "experiment"})


# ------------------------------------------------------------------ fingerprints
@functools.lru_cache(maxsize=None)
def code_fingerprint(plugins: tuple[str, ...] = ()) -> str:
    """Digest of what decides a run's rows besides its resolved config: the ``sim`` and ``traces``
    sources, the policy presets a suite loads at run time, and the sources of ``plugins``."""
    import importlib.util

    import traces

    import sim
    from sim.presets import conf_dir

    files: list[Path] = []
    for pkg in (sim, traces):
        files += sorted(Path(pkg.__file__).resolve().parent.rglob("*.py"))
    files += sorted((conf_dir() / "policy").glob("*.yaml"))
    for name in plugins:
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError):
            spec = None
        if spec is not None and spec.origin and os.path.isfile(spec.origin):
            files.append(Path(spec.origin))
    h = hashlib.sha1()
    for f in files:
        h.update(f.name.encode())
        h.update(f.read_bytes())
    return h.hexdigest()


@functools.lru_cache(maxsize=64)
def _file_digest(path: str, size: int, mtime_ns: int) -> str:
    return file_sha(path) or "missing"


def config_fingerprint(cfg: DictConfig) -> str:
    """Digest of a job's resolved config (less the keys that only change how it is shown), the
    simulator code and, for ``trace.path``, the trace file's bytes: equal digests, equal rows."""
    data = OmegaConf.to_container(cfg, resolve=True)
    data = {k: v for k, v in data.items() if k not in RUN_ONLY_KEYS}
    path = (data.get("trace") or {}).get("path")
    trace_digest = None
    if path:
        try:
            st = os.stat(path)
            trace_digest = _file_digest(os.path.abspath(path), st.st_size, st.st_mtime_ns)
        except OSError:
            trace_digest = "missing"
    blob = json.dumps({"config": data, "code": code_fingerprint(tuple(data.get("plugins") or ())),
                       "trace_file": trace_digest}, sort_keys=True, default=str)
    return hashlib.sha1(blob.encode()).hexdigest()


# ------------------------------------------------------------------ markers and the index
def file_sha(path: str | os.PathLike) -> str | None:
    """sha1 of a file's bytes (None if absent): ties a marker to the config a job ran with."""
    try:
        return hashlib.sha1(Path(path).read_bytes()).hexdigest()
    except FileNotFoundError:
        return None


def read_marker(job_dir: str | os.PathLike) -> dict[str, Any] | None:
    try:
        return json.loads((Path(job_dir) / MARKER).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def write_marker(job_dir: str | os.PathLike, data: dict[str, Any]) -> None:
    """The job's marker, stamped with the digest of its ``.hydra/config.yaml`` (if any)."""
    job_dir = Path(job_dir)
    data = {**data, "config_sha": file_sha(job_dir / ".hydra" / "config.yaml")}
    write_json_atomic(job_dir / MARKER, data)


def index_job(sweep_dir: str | os.PathLike | None, fingerprint: str, job_dir: str | os.PathLike,
              name: str = "results") -> None:
    """Keep the job's results under their config fingerprint in ``<sweep>/.sweep_index/<fp>/``, so
    a resumed sweep finds them even after the job numbering changed and another job overwrote this
    dir. Hard links (no extra space; a later rewrite of the job dir replaces its files, not these),
    or copies where links are not possible. Written once, atomically (a temp dir renamed)."""
    if sweep_dir is None:
        return
    index = Path(sweep_dir) / INDEX_DIR
    entry = index / fingerprint
    if entry.is_dir():
        return
    index.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{fingerprint}.", dir=index))
    try:
        for suffix in (".parquet", ".json"):
            src = Path(job_dir) / f"{name}{suffix}"
            try:
                os.link(src, tmp / f"results{suffix}")
            except OSError:
                shutil.copyfile(src, tmp / f"results{suffix}")
        write_json_atomic(tmp / "entry.json", {"fingerprint": fingerprint, "job": str(Path(job_dir).name)})
        try:
            os.rename(tmp, entry)
        except OSError:  # another job with the same config got there first
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def indexed_results(sweep_dir: str | os.PathLike | None, fingerprint: str) -> Path | None:
    """The index entry (a dir with results.parquet and results.json) of a fingerprint, if any."""
    if sweep_dir is None:
        return None
    entry = Path(sweep_dir) / INDEX_DIR / fingerprint
    ok = all((entry / f"results{x}").is_file() for x in (".parquet", ".json")) and (entry / "entry.json").is_file()
    return entry if ok else None
