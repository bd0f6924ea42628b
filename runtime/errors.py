"""Errors of the GPU runtime's executor."""

from __future__ import annotations

from traces.errors import TraceError


class ExecutorError(TraceError):
    """Bad executor setup or a run that cannot proceed (clear message, never a silent fix)."""
