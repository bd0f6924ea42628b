"""The project's error tree. Every error a user can cause derives from :class:`MoeOffloadError`;
each package has its own branch:

- ``MoeOffloadError``            (this module: the base; the CLIs print it as one line, exit 2)
  - ``UsageError``               bad command line, output path or numeric setting
  - ``TraceError``               malformed trace, importer input or shape
  - ``sim.errors.SimError``      bad model/hardware spec, config value or cost-model query
    - ``InfeasibleError``        the memory budget cannot hold the run (``status = infeasible``)
    - ``UnsupportedError``       a run this configuration cannot express (``status = unsupported``)
  - ``sim.policies.errors.PolicyError``  bad policy arguments, unknown policy names
    - ``PolicyUnsupported``      a policy needs an input the trace lacks (``status = unsupported``)
  - ``runtime.errors.OffloadRuntimeError``  the GPU runtime
    - ``ExecutorError``, ``CaptureError``, ``ModelLoadError``, ``MemoryCheckError``

Anything else (an ``AssertionError``, a ``KeyError`` from our code) is a bug: it is never caught
as a recoverable row, and the CLIs let its traceback through (exit 1).
"""

from __future__ import annotations


class MoeOffloadError(Exception):
    """Base of every error the project raises for something the user can fix.

    ``status`` is the results-row status a sweep or a suite records when it catches the error
    (ok / infeasible / unsupported / failed, docs/metrics.md); ``reason`` is the one-line message.
    """

    status: str = "failed"

    @property
    def reason(self) -> str:
        return str(self)


class UsageError(MoeOffloadError, ValueError):
    """A bad command line, output path or setting; the message names the option and the value."""


class TraceError(MoeOffloadError, ValueError):
    """A malformed trace, importer input or shape; the message names file, row and field."""
