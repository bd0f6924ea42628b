"""Errors of the GPU runtime: its branch of the project's error tree (traces.errors). Runtime
errors are not trace errors: a model that cannot load is not a malformed trace."""

from __future__ import annotations

from traces.errors import MoeOffloadError


class OffloadRuntimeError(MoeOffloadError):
    """Base of the runtime's errors (executor, capture, model loading, memory pre-check)."""


class ExecutorError(OffloadRuntimeError, ValueError):
    """Bad executor setup or a run that cannot proceed (clear message, never a silent fix)."""


class CaptureError(OffloadRuntimeError, ValueError):
    """Bad capture input or settings (prompt files, capture dials)."""


class ModelLoadError(OffloadRuntimeError, ValueError):
    """A model source that cannot be loaded (missing, not MoE, unsupported, needs the network)."""


class MemoryCheckError(OffloadRuntimeError):
    """The run would not fit host or GPU memory; raised before anything is built, with the numbers."""

    status = "infeasible"
