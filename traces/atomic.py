"""Atomic file output: write to a temporary file beside the target, then rename. A failed write
leaves nothing behind, and readers never see half a file."""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Any, Callable


def _default_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


#: temporary files of writes in progress in this process: named here before they are created, so
#: that an interrupt at any point leaves them findable (remove_partial_files)
_LIVE: set[Path] = set()


def atomic_write(path: str | os.PathLike, write: Callable[[str], None], *, overwrite: bool = True) -> Path:
    """Call ``write(tmp_path)``, then move the result to ``path`` with the usual permissions.

    The temporary file is removed on any exception, KeyboardInterrupt included; one interrupted at
    an unlucky instant (SIGTERM too, which the CLIs turn into an exception) is removed by
    :func:`remove_partial_files`, which traces.cli calls before it exits. ``overwrite=False`` never
    replaces an existing ``path``: the move is a hard link, which fails if another process created
    ``path`` meanwhile (FileExistsError).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
    _LIVE.add(tmp)
    try:
        os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
        write(str(tmp))
        os.chmod(tmp, _default_mode())
        if overwrite:
            os.replace(tmp, path)
        else:
            _move_no_clobber(str(tmp), path)
    finally:
        tmp.unlink(missing_ok=True)
        _LIVE.discard(tmp)
    return path


def remove_partial_files() -> None:
    """Remove the temporary files of this process's interrupted writes (the targets are untouched)."""
    for tmp in list(_LIVE):
        tmp.unlink(missing_ok=True)
        _LIVE.discard(tmp)


def _move_no_clobber(tmp: str, path: Path) -> None:
    try:
        os.link(tmp, path)  # atomic, and fails if path exists
    except FileExistsError:
        raise
    except OSError:  # a filesystem without hard links: exclusive create, then replace
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        os.close(fd)
        os.replace(tmp, path)


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> Path:
    return atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))


def write_json_atomic(path: str | os.PathLike, obj: Any, *, indent: int | None = 1) -> Path:
    """JSON of ``obj`` (values JSON does not know are written as ``str``)."""
    return write_text_atomic(path, json.dumps(obj, indent=indent, default=str))


# ---------------------------------------------------------------- checks before the work
def check_output_dir(path: str | os.PathLike, what: str) -> Path:
    """Refuse (UsageError, one line) a directory we could not create or write into, before any work."""
    from traces.errors import UsageError

    path = Path(path)
    probe = path
    while not probe.exists():  # the nearest existing ancestor decides whether we can create it
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise UsageError(f"{what} {str(path)!r}: {str(probe)!r} is a file, not a directory")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise UsageError(f"{what} {str(path)!r}: cannot write into {str(probe)!r} (permission denied)")
    return path


def check_output_file(path: str | os.PathLike, what: str) -> Path:
    """Refuse a file path that is a directory, or whose folder we cannot create or write into."""
    from traces.errors import UsageError

    path = Path(path)
    if path.is_dir():
        raise UsageError(f"{what} {str(path)!r} is a directory; give a file name")
    if str(path).endswith(os.sep):
        raise UsageError(f"{what} {str(path)!r} ends with '{os.sep}'; give a file name")
    check_output_dir(path.parent if str(path.parent) else Path("."), what)
    return path
