"""Errors raised by policies. Policies import nothing from the simulator core, so their branch of
the project's error tree (traces.errors) lives here."""

from __future__ import annotations

from traces.errors import MoeOffloadError


class PolicyError(MoeOffloadError, ValueError):
    """Bad policy or predictor arguments, or an unknown registered name."""


class PolicyUnsupported(PolicyError):
    """A policy needs an input this trace does not have (e.g. recorded lookahead columns)."""

    status = "unsupported"
