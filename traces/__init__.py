"""Routing traces: schema, Parquet I/O, validation, importers, statistics, synthetic generator."""

from traces.errors import TraceError
from traces.io import SCHEMA_VERSION, Rows, read_trace, trace_from_rows, write_trace
from traces.shape import ModelShape
from traces.trace import DECODE, PREFILL, Trace

__all__ = [
    "DECODE",
    "PREFILL",
    "SCHEMA_VERSION",
    "ModelShape",
    "Rows",
    "Trace",
    "TraceError",
    "read_trace",
    "trace_from_rows",
    "write_trace",
]
