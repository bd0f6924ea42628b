"""How every command-line entry point ends: one line on stderr, never a traceback for something the
user caused, and the same exit codes everywhere (README, "Exit codes"):

- 0: the work ran (for a suite or sweep: at least one policy or job ran; the others are rows with
  their ``status`` and ``reason``, printed under the table);
- 2: refused: nothing ran, the one named policy cannot run, or a usage error (unknown preset, bad
  override, bad path or value) -- :class:`~traces.errors.MoeOffloadError` or Hydra's own message;
- 130: interrupted (Ctrl-C), after one line saying where the finished rows are;
- 143: terminated (SIGTERM), temporary files removed;
- 1: a bug: the traceback is printed (please report it).

A closed stdout (``| head``) ends quietly.
"""

from __future__ import annotations

import functools
import os
import re
import signal
import sys
from contextlib import contextmanager
from typing import Callable, Iterator

from traces.errors import MoeOffloadError

EXIT_OK, EXIT_BUG, EXIT_REFUSED, EXIT_INTERRUPTED, EXIT_TERMINATED = 0, 1, 2, 130, 143


class Terminated(BaseException):
    """Raised in the main thread on SIGTERM, so that ``finally`` blocks (temp-file cleanup) run."""


class Interrupted(KeyboardInterrupt):
    """A Ctrl-C that knows where the finished rows are: its message is printed after 'interrupted: '."""


def error_line(e: BaseException) -> str:
    """One line for an error: the message with newlines folded; Hydra's wording kept."""
    text = str(e).strip()
    cause = e.__cause__
    if type(e).__name__ == "OverrideParseException":
        override = getattr(e, "override", None)
        text = f"bad override{f' {override!r}' if override else ''}: {text.splitlines()[0]}"
    m = re.match(r"(In '[^']*': Could not find '([^']*)')\s+Available options in '[^']*':\s*(.*?)(Config search path:|$)",
                 text, re.S)
    if m:  # an unknown preset: name the known ones on the same line
        known = ", ".join(m.group(3).split())
        text = f"{m.group(1)}; known: {known}" if known else m.group(1)
    elif cause is not None and type(cause).__module__.startswith("omegaconf"):
        first = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
        head = text.splitlines()[0].rstrip(".") if text else ""
        text = f"{head}: {first}" if head else first
    if isinstance(e, OSError) and not isinstance(e, MoeOffloadError) and e.filename is not None:
        text = f"{e.filename}: {e.strerror or text}"
    return " ".join(part.strip() for part in text.splitlines() if part.strip()) or type(e).__name__


_DEFERRED: list[Exception] = []


def hydra_task(task: Callable) -> Callable:
    """Decorate a Hydra task function (under ``hydra.main``): a :class:`MoeOffloadError` (or an
    OmegaConf config-access error) of a single run is handed to :func:`run_cli` after Hydra returns
    (Hydra would first print its own 'Error executing job' line). In a multirun it propagates to the
    sweep as before."""

    @functools.wraps(task)
    def wrapped(cfg):
        try:
            return task(cfg)
        except Exception as e:
            from hydra.core.hydra_config import HydraConfig
            from hydra.types import RunMode

            if HydraConfig.get().mode == RunMode.MULTIRUN or not (isinstance(e, MoeOffloadError) or _is_usage(e)):
                raise
            _DEFERRED.append(e)
            return None

    return wrapped


def _is_usage(e: BaseException) -> bool:
    """Hydra's and OmegaConf's errors before the job (composition, overrides) and OS errors on a path."""
    mod = type(e).__module__
    return mod.startswith(("hydra.", "omegaconf.")) or (isinstance(e, OSError) and e.filename is not None)


@contextmanager
def sigterm_raises() -> Iterator[None]:
    """Turn SIGTERM into :class:`Terminated` (main thread only) for the duration."""
    try:
        old = signal.signal(signal.SIGTERM, _raise_terminated)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def _raise_terminated(signum, frame) -> None:  # noqa: ARG001 - signal handler signature
    raise Terminated()


def run_cli(main: Callable[[], int | None]) -> int:
    """Run ``main`` and return the project's exit code for it (module docstring): entry points end
    with ``sys.exit(run_cli(...))``. ``main`` returns 0 or 2 (None: 0); errors it raises are mapped
    here, each printed as one line."""
    user_full_error = os.environ.get("HYDRA_FULL_ERROR") == "1"
    os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra re-raises instead of printing its own report
    code = EXIT_OK
    try:
        with sigterm_raises():
            _DEFERRED.clear()
            code = int(main() or 0)
            if _DEFERRED:
                raise _DEFERRED.pop()
    except MoeOffloadError as e:
        print(f"error: {error_line(e)}", file=sys.stderr)
        code = EXIT_REFUSED
    except KeyboardInterrupt as e:
        msg = str(e).strip()
        print(f"interrupted: {msg}" if msg else "interrupted", file=sys.stderr)
        code = EXIT_INTERRUPTED
    except Terminated:
        print("terminated", file=sys.stderr)
        code = EXIT_TERMINATED
    except BrokenPipeError:
        _quiet_stdout()
        code = EXIT_OK
    except SystemExit as e:  # argparse's usage errors already printed their line (exit 2)
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else EXIT_REFUSED)
    except Exception as e:
        if user_full_error or not _is_usage(e):
            raise  # a bug: the traceback goes through (exit 1)
        print(f"error: {error_line(e)}", file=sys.stderr)
        code = EXIT_REFUSED
    finally:
        from traces.atomic import remove_partial_files

        remove_partial_files()  # an interrupt at an unlucky instant of an atomic write
        if not user_full_error:
            os.environ.pop("HYDRA_FULL_ERROR", None)
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        _quiet_stdout()
    return code


def _quiet_stdout() -> None:
    """After a reader closed our stdout: point it at /dev/null so the interpreter's final flush is silent."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass
