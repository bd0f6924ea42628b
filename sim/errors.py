"""Errors of the simulator (its branch of the project's error tree, traces.errors)."""

from __future__ import annotations

from traces.errors import MoeOffloadError


class SimError(MoeOffloadError, ValueError):
    """A bad model/hardware spec, config value or cost-model query; the message names the field."""


class InfeasibleError(SimError):
    """A configuration that cannot run (docs/architecture.md, Memory budget): the GPU memory budget is too small.

    ``reason`` is a one-line explanation that says what does not fit and by how much; a sweep
    records it as a result row with ``status = infeasible``; on its own it is a clear error.
    ``short_by_bytes`` is how many bytes the budget lacks (None where a count, not bytes, is short).
    """

    status = "infeasible"

    def __init__(self, reason: str, short_by_bytes: int | None = None) -> None:
        super().__init__(reason)
        self.short_by_bytes = short_by_bytes


class UnsupportedError(SimError):
    """A combination the simulator (or the runtime hosting it) cannot express; ``status = unsupported``."""

    status = "unsupported"
