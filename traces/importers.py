"""`python -m traces import`: convert other tools' per-token routing logs (JSON Lines, CSV) to a trace.

Why: routing is often already logged by a serving stack (vLLM-based loggers write records
``{layer, token_idx, topk_ids, topk_weights}``; SGLang's recorder dumps top-k ids per token per
layer). Such logs are one record per (token, layer), often grouped by layer,
sometimes ragged (a few rows missing in some layers), with string request names. This module turns
them into the project's trace with the same validation as every other path
(``traces.io.trace_from_rows``) and records where the data came from in the metadata.

Library use::

    from traces.importers import import_log
    trace = import_log("logs/", "jsonl", prefill_tokens=32, num_experts=64)
"""

from __future__ import annotations

import argparse
import csv
import gzip
import io
import json
import re
import sys
import warnings
import fnmatch
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Any, Iterable, Sequence

import numpy as np

from traces.errors import TraceError
from traces.io import Rows, trace_from_rows, write_trace
from traces.provenance import project_version
from traces.shape import ModelShape
from traces.trace import DECODE, PREFILL, Trace

FORMATS = ("jsonl", "csv")
EXTENSIONS = {"jsonl": (".jsonl", ".ndjson", ".json"), "csv": (".csv",)}

#: Candidate field names per role, tried in this order when no name is given (the first one
#: present in the first record / CSV header wins). The first candidate is the vLLM-logger name.
DEFAULT_FIELDS: dict[str, tuple[str, ...]] = {
    "request": ("request_id", "req_id", "rid", "problem_id"),
    "layer": ("layer", "layer_id", "layer_idx"),
    "token": ("token_idx", "token", "token_id", "position", "pos"),
    "experts": ("topk_ids", "expert_ids", "experts"),
    "weights": ("topk_weights", "gate_weights", "weights"),
    "phase": ("phase",),
}
REQUIRED_ROLES = ("layer", "token", "experts")
#: 'global': a request id names the same request in every file; 'file': ids are local to their file
REQUEST_SCOPES = ("global", "file")
_INT32_MAX = int(np.iinfo(np.int32).max)
_INT16_MAX = int(np.iinfo(np.int16).max)
_SPLIT = re.compile(r"[\s,;]+")


class LogImportWarning(UserWarning):
    """Something the importer guessed, ignored or dropped (printed by the CLI as 'warning: ...')."""


class RaggedLogWarning(LogImportWarning):
    """Some tokens were not logged in every MoE layer; the importer truncated those requests."""


class LogFieldWarning(LogImportWarning):
    """A field was chosen by what its values look like, or a list field of width k is left unread."""


# ----------------------------------------------------------------------------- helpers
def _natural_key(s: str) -> list[Any]:
    return [(0, int(p), p) if p.isdigit() else (1, 0, p) for p in re.split(r"(\d+)", s) if p]


def _strip_gz(name: str) -> str:
    return name[:-3] if name.lower().endswith(".gz") else name


def _format_of(path: Path) -> str | None:
    name = _strip_gz(path.name).lower()
    for fmt, exts in EXTENSIONS.items():
        if name.endswith(exts):
            return fmt
    return None


def _included(rel: str, include: Sequence[str]) -> bool:
    """A glob without '/' matches the file name, one with '/' the path relative to the directory."""
    name = rel.rsplit("/", 1)[-1]
    return any(fnmatch.fnmatchcase(rel if "/" in g else name, g) for g in include)


def discover(src: str | Path, fmt: str | None,
             include: Sequence[str] | None = None) -> tuple[list[Path], list[str], str]:
    """The files to read, their names relative to ``src`` (natural sort order), and the format.

    A directory is searched recursively for files with the format's extensions (``.gz`` too);
    hidden files are skipped; with ``include``, only files matching one of its globs are read (a
    directory that also holds other JSON Lines files). The order is deterministic: natural sort of
    the relative path, so ``req2`` comes before ``req10``.
    """
    src = Path(src)
    if fmt is not None and fmt not in FORMATS:
        raise TraceError(f"{src}: unknown format {fmt!r}, expected one of {list(FORMATS)}")
    if include is not None and not src.is_dir():
        raise TraceError(f"{src}: --include selects files of a directory; this source is not one")
    if src.is_file():
        files = [src]
        names = [src.name]
    elif src.is_dir():
        found = []
        for p in src.rglob("*"):
            rel = p.relative_to(src).as_posix()
            if not p.is_file() or any(part.startswith(".") for part in p.relative_to(src).parts):
                continue
            f = _format_of(p)
            if f is None or (fmt is not None and f != fmt):
                continue
            if include is not None and not _included(rel, include):
                continue
            found.append((rel, p, f))
        if not found and include is not None:
            raise TraceError(f"{src}: no log file in this directory matches --include {' '.join(include)}")
        if not found:
            want = ", ".join(EXTENSIONS[fmt]) if fmt else ", ".join(e for v in EXTENSIONS.values() for e in v)
            raise TraceError(f"{src}: empty source, no routing log files ({want}, optionally .gz) in this directory")
        found.sort(key=lambda x: _natural_key(x[0]))
        kinds = sorted({f for _, _, f in found})
        if fmt is None and len(kinds) > 1:
            raise TraceError(f"{src}: the directory holds both {kinds[0]} and {kinds[1]} files; pick one with --format")
        fmt = fmt or kinds[0]
        files = [p for _, p, _ in found]
        names = [r for r, _, _ in found]
    else:
        raise TraceError(f"{src}: no such file or directory")
    if fmt is None:
        fmt = _format_of(src)
        if fmt is None:
            raise TraceError(f"{src}: cannot tell the format from the file name; give --format {{jsonl,csv}}")
    return files, names, fmt


def _open_text(path: Path) -> IO[str]:
    if path.name.lower().endswith(".gz"):
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8", newline="")
    return open(path, encoding="utf-8", newline="")


def parse_layers(spec: str) -> tuple[int, ...]:
    """'1,3,5-7' -> (1, 3, 5, 6, 7): the --moe-layers syntax."""
    out: list[int] = []
    backwards = None
    try:
        for part in spec.split(","):
            part = part.strip()
            if not part:
                continue
            if "-" in part:
                a, b = (int(x) for x in part.split("-", 1))
                backwards = backwards or (part if a > b else None)
                out.extend(range(a, b + 1))
            else:
                out.append(int(part))
    except ValueError:
        raise TraceError(f"--moe-layers: cannot parse {spec!r} (expected e.g. '1,3,5-23')") from None
    if backwards:
        a, b = backwards.split("-", 1)
        raise TraceError(f"--moe-layers: range {backwards!r} runs backwards (write {b}-{a})")
    if not out or min(out) < 0:
        raise TraceError(f"--moe-layers: {spec!r} names no layer or a negative one (expected e.g. '1,3,5-23')")
    return tuple(sorted(set(out)))


# ----------------------------------------------------------------------------- collection
@dataclass
class _Cols:
    """Raw per-row values in source order, plus where each row came from (None: role not read)."""

    request: list[Any] = field(default_factory=list)
    layer: list[Any] = field(default_factory=list)
    token: list[Any] = field(default_factory=list)
    experts: list[Any] = field(default_factory=list)  # one list per row
    weights: list[Any] = field(default_factory=list)
    phase: list[Any] = field(default_factory=list)
    file: list[int] = field(default_factory=list)
    line: list[int] = field(default_factory=list)


@dataclass
class _Fields:
    """Which field each role reads, decided on the first record of the log."""

    names: dict[str, str | None]  # role -> field name; None = the role is not read
    by_role: list[str] = field(default_factory=list)  # roles found by what their values look like
    unused: list[str] = field(default_factory=list)  # list fields of width k that no role reads
    where: str = ""  # 'FILE: line N' of the record they were decided on


class _Locator:
    """Turns a row index (source order) into 'FILE: line N' for error messages."""

    def __init__(self, files: Sequence[Path], file_idx: np.ndarray, line: np.ndarray) -> None:
        self.files, self.file_idx, self.line = files, file_idx, line

    def __call__(self, row: int) -> str:
        return f"{self.files[int(self.file_idx[row])]}: line {int(self.line[row])}"

    def fail(self, row: int, fld: str | None, msg: str) -> TraceError:
        f = f" field '{fld}':" if fld else ""
        return TraceError(f"{self(row)}:{f} {msg}")


def _resolve(role: str, given: str | None, keys: Iterable[str]) -> str | None:
    """The field name for ``role``: the given one ('' = do not read this role), else the first default present."""
    if given is not None:
        return given or None
    keys = set(keys)
    for cand in DEFAULT_FIELDS[role]:
        if cand in keys:
            return cand
    return None


def _numbers(value: Any, text: bool) -> tuple[list[float], bool] | None:
    """A record value read as a list of numbers and whether all are integers; None if it is not a
    list (a CSV cell counts as a list when bracketed or holding a separator)."""
    if text:
        s = value.strip()
        bracketed = s[:1] in "[(" and s[-1:] in "])"
        toks = [x for x in _SPLIT.split(s[1:-1] if bracketed else s) if x]
        if not bracketed and len(toks) < 2:
            return None
        try:
            return [float(x) for x in toks], all(x.lstrip("+-").isdigit() for x in toks)
        except ValueError:
            return None
    if type(value) is not list or not all(type(x) in (int, float) for x in value):
        return None
    return [float(x) for x in value], all(type(x) is int for x in value)


def _resolve_fields(first: dict[str, Any], given: dict[str, str | None], where: str, text: bool) -> _Fields:
    """Field names from the first record: given names, else the defaults; without either, gate
    weights are the first list field of width k whose values are numbers in [0, 1], not all
    integers. List fields of width k left unread are reported (they may be weights under a name
    the importer cannot tell)."""
    names = {role: _resolve(role, given.get(role), first.keys()) for role in DEFAULT_FIELDS}
    for role in REQUIRED_ROLES:
        if names[role] is None and not (role == "token" and given.get("token") == ""):
            raise TraceError(
                f"{where}: field for {role} missing: none of {list(DEFAULT_FIELDS[role])} is present"
                f" (found {sorted(first)}); name it with --{role}-field"
                + (", or --token-field '' to number tokens by row order" if role == "token" else "")
            )
    out = _Fields(names, where=where)
    ids = _numbers(first.get(names["experts"]), text) if names["experts"] in first else None
    if ids is None:
        return out  # the experts column's own check reports it, naming the row
    k = len(ids[0])
    used = {v for v in names.values() if v is not None}
    width_k = [f for f, v in first.items() if f not in used and (x := _numbers(v, text)) is not None and len(x[0]) == k]
    if names["weights"] is None and given.get("weights") is None:
        for f in width_k:
            vals, ints = _numbers(first[f], text)  # type: ignore[misc]
            if not ints and all(0.0 <= v <= 1.0 for v in vals):
                names["weights"] = f
                out.by_role.append("weights")
                break
    out.unused = [f for f in width_k if f != names["weights"]]
    return out


def _read_jsonl(path: Path, fi: int, fields: _Fields | None, given: dict[str, str | None], cols: _Cols) -> _Fields | None:
    """Append the records of one JSON Lines file to ``cols``; resolve field names on the first record."""
    loads = json.loads
    with _open_text(path) as f:
        for lineno, text in enumerate(f, 1):
            if not text.strip():
                continue
            try:
                rec = loads(text)
            except ValueError as e:
                raise TraceError(f"{path}: line {lineno}: not valid JSON ({e})") from None
            if type(rec) is not dict:
                raise TraceError(f"{path}: line {lineno}: expected a JSON object, got {type(rec).__name__}")
            if fields is None:
                fields = _resolve_fields(rec, given, f"{path}: line {lineno}", False)
            nm = fields.names
            rf, tf, wf, pf = nm["request"], nm["token"], nm["weights"], nm["phase"]
            try:
                layer = rec[nm["layer"]]  # type: ignore[index]
                experts = rec[nm["experts"]]  # type: ignore[index]
                token = rec[tf] if tf is not None else None
                req = rec[rf] if rf is not None else fi
                w = rec[wf] if wf is not None else None
                ph = rec[pf] if pf is not None else None
            except KeyError as e:
                raise TraceError(f"{path}: line {lineno}: field '{e.args[0]}': missing") from None
            cols.layer.append(layer)
            cols.token.append(token)
            cols.experts.append(experts)
            cols.request.append(req)
            cols.weights.append(w)
            cols.phase.append(ph)
            cols.file.append(fi)
            cols.line.append(lineno)
    return fields


def _parse_list(cell: str, conv: Any) -> list[Any]:
    s = cell.strip()
    if s[:1] in "[(" and s[-1:] in "])":
        s = s[1:-1]
    return [conv(x) for x in _SPLIT.split(s.strip()) if x]


def _read_csv(path: Path, fi: int, fields: _Fields | None, given: dict[str, str | None], cols: _Cols) -> _Fields | None:
    """Append the rows of one CSV file to ``cols``; list cells like '[3, 5]', '3 5' or '3;5'.
    Field names are resolved on the first data row of the log (the header names them)."""
    with _open_text(path) as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None:
            return fields
        header = [h.strip() for h in header]
        width = len(header)
        idx: dict[str, int | None] | None = None
        for row in reader:
            lineno = reader.line_num
            if not row or (len(row) == 1 and not row[0].strip()):
                continue
            if len(row) < width:
                missing = header[len(row)]
                raise TraceError(f"{path}: line {lineno}: field '{missing}': missing (row has {len(row)} of {width} columns)")
            if fields is None:
                fields = _resolve_fields(dict(zip(header, row)), given, f"{path}: line {lineno}", True)
            if idx is None:
                idx = {}
                for role, name in fields.names.items():
                    if name is not None and name not in header:
                        raise TraceError(f"{path}: line 1: field '{name}': missing from the CSV header {header}")
                    idx[role] = None if name is None else header.index(name)
                il, it, ie = idx["layer"], idx["token"], idx["experts"]
                ir, iw, ip = idx["request"], idx["weights"], idx["phase"]
            cols.layer.append(row[il].strip())  # type: ignore[index]
            cols.token.append(row[it].strip() if it is not None else None)
            cols.experts.append(row[ie])  # type: ignore[index]
            cols.request.append(row[ir].strip() if ir is not None else fi)
            cols.weights.append(row[iw] if iw is not None else None)
            cols.phase.append(row[ip].strip() if ip is not None else None)
            cols.file.append(fi)
            cols.line.append(lineno)
    return fields


def _read_files(src: str | Path, files: list[Path], fmt: str, given: dict[str, str | None]) -> tuple[_Cols, _Fields]:
    """Every record of every file, in file order then line order."""
    reader = _read_jsonl if fmt == "jsonl" else _read_csv
    cols = _Cols()
    fields: _Fields | None = None
    for fi, path in enumerate(files):
        try:
            fields = reader(path, fi, fields, given, cols)
        except UnicodeDecodeError as e:
            raise TraceError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
        except (OSError, EOFError, csv.Error) as e:
            raise TraceError(f"{path}: cannot read ({e})") from None
    if fields is None or not cols.layer:
        raise TraceError(f"{src}: empty source, no routing records in {len(files)} file(s)")
    return cols, fields


# ----------------------------------------------------------------------------- conversion
def _int_column(values: list[Any], loc: _Locator, fld: str, from_text: bool) -> np.ndarray:
    """Integers (JSON ints, not bools/floats; or decimal text from CSV) as int64."""
    if from_text:
        try:
            return np.array([int(v) for v in values], dtype=np.int64)
        except (ValueError, OverflowError):
            pass
        for i, v in enumerate(values):
            try:
                x = int(v)
                if not -(2**63) <= x < 2**63:
                    raise ValueError
            except ValueError:
                raise loc.fail(i, fld, f"{v!r} is not an integer") from None
        raise AssertionError("unreachable")
    if set(map(type, values)) <= {int}:
        try:
            return np.array(values, dtype=np.int64)
        except OverflowError:
            pass
    for i, v in enumerate(values):
        if type(v) is not int or not -(2**63) <= v < 2**63:
            raise loc.fail(i, fld, f"{v!r} is not an integer")
    raise AssertionError("unreachable")


def _list_column(values: list[Any], loc: _Locator, fld: str, width: int | None, from_text: bool,
                 is_float: bool, why: str | None = None) -> np.ndarray:
    """Per-row lists of ids (ints) or weights (numbers) as an (n, width) array."""
    conv = float if is_float else int
    kind = "number" if is_float else "integer"
    if from_text:
        lists = []
        for i, cell in enumerate(values):
            try:
                lists.append(_parse_list(cell, conv))
            except ValueError:
                raise loc.fail(i, fld, f"{cell!r} is not a list of {kind}s (expected e.g. '[3, 5]', '3 5' or '3;5')") from None
    else:
        lists = values
        for i, v in enumerate(values):
            if type(v) is not list:
                raise loc.fail(i, fld, f"{v!r} is not a list of {kind}s")
    lens = np.fromiter(map(len, lists), dtype=np.int64, count=len(lists))
    want = int(lens[0]) if width is None else width
    bad = lens != want
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise loc.fail(i, fld, f"has {int(lens[i])} entries, expected {want} ({why or 'as in the first record'})")
    if want == 0:
        raise loc.fail(0, fld, "empty list: a routing record needs at least one expert id")
    flat = [x for row in lists for x in row]
    types = set(map(type, flat))
    ok = {int, float} if is_float else {int}
    if not types <= ok:
        for i, row in enumerate(lists):
            for x in row:
                if type(x) not in ok:
                    raise loc.fail(i, fld, f"{row!r} holds {x!r}, not an {kind}")
    try:
        arr = np.array(flat, dtype=np.float64 if is_float else np.int64)
    except OverflowError:
        for i, row in enumerate(lists):
            if any(not -(2**63) <= x < 2**63 for x in row):
                raise loc.fail(i, fld, f"{row!r}: id out of range") from None
        raise
    return arr.reshape(len(lists), want)


def _request_keys(values: list[Any], loc: _Locator, fld: str, from_text: bool,
                  file_names: Sequence[str] | None = None) -> tuple[np.ndarray, dict[str, int] | None]:
    """Integer request ids (as logged) or, for string names, ids 0.. in order of first appearance.
    With ``file_names`` (request scope 'file') every id is a name 'FILE:ID', so that ids restarting
    in each file stay distinct."""
    if from_text:
        if file_names is None and all(re.fullmatch(r"\s*[+-]?\d+\s*", v) for v in values):
            return _int_column(values, loc, fld, True), None
        names = values
    else:
        types = set(map(type, values))
        if file_names is None and types <= {int}:
            return _int_column(values, loc, fld, False), None
        for i, v in enumerate(values):
            if type(v) not in (int, str):
                raise loc.fail(i, fld, f"{v!r} is not an integer or string request id")
        names = [str(v) for v in values]
    if file_names is not None:
        names = [f"{file_names[int(f)]}:{v}" for f, v in zip(loc.file_idx, names)]
    mapping: dict[str, int] = {}
    ids = np.fromiter((mapping.setdefault(v, len(mapping)) for v in names), dtype=np.int64, count=len(names))
    return ids, mapping


def _row_order_positions(req: np.ndarray, layer: np.ndarray) -> np.ndarray:
    """Token positions 0, 1, ... from the order of a request's rows at each layer (a log without a
    position column, grouped by layer or by token)."""
    n = len(req)
    order = np.lexsort((np.arange(n), layer, req))
    r, lay = req[order], layer[order]
    start = np.r_[True, (r[1:] != r[:-1]) | (lay[1:] != lay[:-1])]
    first = np.maximum.accumulate(np.where(start, np.arange(n), 0))
    pos = np.empty(n, dtype=np.int64)
    pos[order] = np.arange(n) - first
    return pos


def _phase_codes(values: list[Any], loc: _Locator, fld: str) -> np.ndarray:
    table = {"prefill": PREFILL, "decode": DECODE}
    out = np.empty(len(values), dtype=np.int8)
    for i, v in enumerate(values):
        code = table.get(v.lower()) if isinstance(v, str) else None
        if code is None:
            raise loc.fail(i, fld, f"{v!r} is not 'prefill' or 'decode'")
        out[i] = code
    return out


@dataclass
class _Table:
    """The log's columns as arrays in source order, validated one by one."""

    n: int
    loc: _Locator
    fields: _Fields
    layer: np.ndarray
    token: np.ndarray
    ids: np.ndarray  # (n, k)
    weights: np.ndarray | None
    req: np.ndarray
    req_names: dict[str, int] | None
    req_names_from: str | None
    phase: np.ndarray | None


def _table(cols: _Cols, fields: _Fields, files: list[Path], names: list[str], text: bool,
           top_k: int | None, request_scope: str) -> _Table:
    """Convert and check each column: integers in range, id lists of one width, finite weights."""
    n = len(cols.layer)
    loc = _Locator(files, np.asarray(cols.file, dtype=np.int32), np.asarray(cols.line, dtype=np.int64))
    nm = fields.names
    lf, tf, ef = nm["layer"], nm["token"], nm["experts"]
    rf, wf, pf = nm["request"], nm["weights"], nm["phase"]
    layer = _int_column(cols.layer, loc, lf, text)  # type: ignore[arg-type]
    token = _int_column(cols.token, loc, tf, text) if tf is not None else None  # type: ignore[arg-type]
    for a, fld, hi in ((layer, lf, _INT16_MAX), (token, tf, _INT32_MAX)):
        if a is None:
            continue
        bad = (a < 0) | (a > hi)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise loc.fail(i, fld, f"{int(a[i])} out of range [0, {hi}]")
    ids = _list_column(cols.experts, loc, ef, top_k, text, False,  # type: ignore[arg-type]
                       None if top_k is None else f"--top-k {top_k}")
    weights = None
    if wf is not None:
        weights = _list_column(cols.weights, loc, wf, ids.shape[1], text, True, f"one per expert id in '{ef}'")
        bad = ~np.isfinite(weights).all(axis=1)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise loc.fail(i, wf, f"non-finite gate weight in {weights[i].tolist()}")
    if rf is not None:
        scope = names if request_scope == "file" else None
        req, req_names = _request_keys(cols.request, loc, rf, text, scope)
        names_from = None if req_names is None else "file:field" if scope is not None else "field"
    else:
        req = np.asarray(cols.request, dtype=np.int64)
        req_names = {names[i]: int(i) for i in np.unique(req)}
        names_from = "file"
    if token is None:
        token = _row_order_positions(req, layer)
    phase = _phase_codes(cols.phase, loc, pf) if pf is not None else None
    return _Table(n, loc, fields, layer, token, ids, weights, req, req_names, names_from, phase)


def _check_ids(t: _Table, num_experts: int | None) -> None:
    ef = t.fields.names["experts"]
    ids, loc = t.ids, t.loc
    bad = (ids < 0).any(axis=1)
    if num_experts is not None:
        bad |= (ids >= num_experts).any(axis=1)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        hi = num_experts if num_experts is not None else "num_experts"
        raise loc.fail(i, ef, f"expert id(s) {ids[i].tolist()} out of range [0, {hi})")
    if ids.shape[1] > 1:
        s = np.sort(ids, axis=1)
        bad = (s[:, 1:] == s[:, :-1]).any(axis=1)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise loc.fail(i, ef, f"duplicate expert ids {ids[i].tolist()}")


def _order_by_weight(t: _Table) -> int:
    """Order each row's ids by gate weight, descending (stable); returns the rows reordered."""
    k = t.ids.shape[1]
    if t.weights is None or k == 1:
        return 0
    order = np.argsort(-t.weights, axis=1, kind="stable")
    reordered = int((order != np.arange(k)[None, :]).any(axis=1).sum())
    t.ids = np.take_along_axis(t.ids, order, axis=1)
    t.weights = np.take_along_axis(t.weights, order, axis=1)
    return reordered


def _shape(src: str | Path, t: _Table, num_experts: int | None, top_k: int | None, num_layers: int | None,
           moe_layers: Sequence[int] | None, num_shared_experts: int, model_name: str) -> tuple[ModelShape, list[str]]:
    """The model shape: what was given, the rest inferred from the data (listed)."""
    lf, layer, loc = t.fields.names["layer"], t.layer, t.loc
    inferred = []
    E = num_experts if num_experts is not None else int(t.ids.max()) + 1
    if E > _INT16_MAX:
        raise TraceError(f"{src}: num_experts {E} does not fit the trace's int16 expert ids")
    if num_experts is None:
        inferred.append("num_experts")
    if top_k is None:
        inferred.append("top_k")
    if moe_layers is not None:
        moe = np.asarray(sorted(set(int(x) for x in moe_layers)), dtype=np.int64)
        bad = ~np.isin(layer, moe)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise loc.fail(i, lf, f"layer {int(layer[i])} is not one of the given MoE layers {moe.tolist()}")
    else:
        moe = np.unique(layer)
        inferred.append("moe_layers")
    if num_layers is not None:
        bad = layer >= num_layers
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise loc.fail(i, lf, f"layer {int(layer[i])} out of range for --num-layers {num_layers}")
        L = num_layers
    else:
        L = int(max(int(layer.max()), int(moe.max()))) + 1
        inferred.append("num_layers")
    shape = ModelShape(name=model_name, num_layers=L, moe_layers=tuple(moe.tolist()), num_experts=E,
                       top_k=t.ids.shape[1], num_shared_experts=num_shared_experts)
    return shape, inferred


@dataclass
class _Kept:
    """Rows sorted by (request, token, layer), grouped into tokens, and which tokens are kept."""

    order: np.ndarray  # sorted row -> source row
    tok_start: np.ndarray  # first sorted row of each token
    tok_len: np.ndarray  # rows (layers) logged per token
    tok_req: np.ndarray  # request id of each token
    tok_pos: np.ndarray
    req_start: np.ndarray  # first token of each request
    req_of_tok: np.ndarray  # request ordinal of each token
    keep_tok: np.ndarray
    dropped_by_req: np.ndarray  # rows dropped per request ordinal
    empty_reqs: list[int]  # request ids left without a token
    names: dict[int, str]  # request id -> its name in the log, where it had one

    @property
    def keep_row(self) -> np.ndarray:
        return np.repeat(self.keep_tok, self.tok_len)

    def label(self, rid: int) -> str:
        return self.names.get(rid, str(rid))


def _complete_prefix(src: str | Path, t: _Table, M: int, moe: tuple[int, ...]) -> _Kept:
    """Sort by (request, token, layer), refuse duplicates, and keep each request's longest prefix of
    tokens logged in every MoE layer (a ragged log)."""
    req, token, layer, loc, n = t.req, t.token, t.layer, t.loc, t.n
    inv = {i: name for name, i in (t.req_names or {}).items()}
    order = np.lexsort((layer, token, req))
    req_s, tok_s, lay_s = req[order], token[order], layer[order]
    dup = (req_s[1:] == req_s[:-1]) & (tok_s[1:] == tok_s[:-1]) & (lay_s[1:] == lay_s[:-1])
    if dup.any():
        j = int(np.flatnonzero(dup)[0])
        a, b = sorted((int(order[j]), int(order[j + 1])))
        hint = ""
        if loc.file_idx[a] != loc.file_idx[b] and t.fields.names["request"] is not None:
            hint = "; request ids restart in each file? --request-scope file keeps them apart"
        raise loc.fail(
            b, t.fields.names["layer"], f"request {inv.get(int(req_s[j]), int(req_s[j]))} token {int(tok_s[j])} layer"
            f" {int(lay_s[j])} logged twice (first at {loc(a)}){hint}"
        )
    tok_start = np.flatnonzero(np.r_[True, (req_s[1:] != req_s[:-1]) | (tok_s[1:] != tok_s[:-1])])
    tok_len = np.diff(np.r_[tok_start, n])
    tok_req, tok_pos = req_s[tok_start], tok_s[tok_start]
    req_start = np.flatnonzero(np.r_[True, tok_req[1:] != tok_req[:-1]])
    req_of_tok = np.repeat(np.arange(len(req_start)), np.diff(np.r_[req_start, len(tok_start)]))
    incomplete = tok_len != M
    first_bad = np.full(len(req_start), np.iinfo(np.int64).max, dtype=np.int64)
    np.minimum.at(first_bad, req_of_tok[incomplete], tok_pos[incomplete])
    keep_tok = tok_pos < first_bad[req_of_tok]
    if not keep_tok.any():
        raise TraceError(
            f"{src}: no request has a token logged in every MoE layer {list(moe)}; all {n} rows would be dropped"
        )
    dropped_by_req = np.bincount(req_of_tok[~keep_tok], weights=tok_len[~keep_tok],
                                 minlength=len(req_start)).astype(np.int64)
    kept_tokens = np.bincount(req_of_tok[keep_tok], minlength=len(req_start))
    empty_reqs = [int(tok_req[req_start[r]]) for r in np.flatnonzero(kept_tokens == 0)]
    return _Kept(order, tok_start, tok_len, tok_req, tok_pos, req_start, req_of_tok, keep_tok, dropped_by_req,
                 empty_reqs, inv)


def _phases(t: _Table, kept: _Kept, prefill_tokens: int | None) -> tuple[np.ndarray, np.ndarray, str, int, int]:
    """Phase and step of each kept token, where the phase came from, and the position gaps
    (count, positions) among kept tokens."""
    pf, loc = t.fields.names["phase"], t.loc
    if t.phase is not None:
        ph_s = t.phase[kept.order]
        incons = ph_s != np.repeat(ph_s[kept.tok_start], kept.tok_len)
        if incons.any():
            j = int(np.flatnonzero(incons)[0])
            raise loc.fail(int(kept.order[j]), pf, "differs between the layer records of one token")
    kt = np.flatnonzero(kept.keep_tok)
    k_req = kept.req_of_tok[kt]
    k_first = np.flatnonzero(np.r_[True, k_req[1:] != k_req[:-1]])
    run_len = np.diff(np.r_[k_first, len(kt)])
    t_ord = np.arange(len(kt)) - np.repeat(k_first, run_len)
    jump = np.diff(kept.tok_pos[kt]) - 1
    gap = (k_req[1:] == k_req[:-1]) & (jump > 0)
    if t.phase is not None:
        tphase = t.phase[kept.order][kept.tok_start[kt]]
        bad = (tphase[1:] == PREFILL) & (tphase[:-1] == DECODE) & (k_req[1:] == k_req[:-1])
        if bad.any():
            j = int(np.flatnonzero(bad)[0]) + 1
            raise loc.fail(int(kept.order[kept.tok_start[kt[j]]]), pf, "a prefill token follows a decode token of the same request")
        phase_from = "field"
    elif prefill_tokens is not None:
        tphase = np.where(t_ord < prefill_tokens, PREFILL, DECODE).astype(np.int8)
        phase_from = "prefill_tokens"
    else:
        tphase = np.full(len(kt), DECODE, dtype=np.int8)
        phase_from = "all decode (no phase in the log)"
    is_dec = (tphase == DECODE).astype(np.int64)
    cum = np.cumsum(is_dec)
    dec_ord = cum - np.repeat((cum - is_dec)[k_first], run_len)
    tstep = np.where(tphase == DECODE, dec_ord, 0).astype(np.int32)
    return tphase, tstep, phase_from, int(gap.sum()), int(jump[gap].sum())


def _report(src: str | Path, t: _Table, kept: _Kept, n_gaps: int, gap_positions: int) -> None:
    """Warnings about what the import guessed, ignored or dropped."""
    f = t.fields
    if "weights" in f.by_role:
        warnings.warn(
            f"{f.where}: gate weights read from field '{f.names['weights']}' (a list of {t.ids.shape[1]} numbers in"
            " [0, 1]); --weights-field names another field, --weights-field '' none",
            LogFieldWarning, stacklevel=3)
    if f.unused:
        warnings.warn(
            f"{f.where}: field(s) {f.unused} hold lists of {t.ids.shape[1]} numbers but are not read"
            " (--weights-field names the gate weights' field)",
            LogFieldWarning, stacklevel=3)
    dropped_by_req = kept.dropped_by_req
    dropped = int(dropped_by_req.sum())
    if dropped:
        worst = np.argsort(-dropped_by_req, kind="stable")[:3]
        detail = ", ".join(
            f"request {kept.label(int(kept.tok_req[kept.req_start[r]]))}: {int(dropped_by_req[r])}"
            for r in worst if dropped_by_req[r]
        )
        warnings.warn(
            f"{src}: ragged log: {dropped} of {t.n} rows dropped (tokens from the first one missing in some MoE"
            f" layer on; {detail}{', ...' if (dropped_by_req > 0).sum() > 3 else ''})"
            + (f"; {len(kept.empty_reqs)} request(s) left empty and removed" if kept.empty_reqs else ""),
            RaggedLogWarning,
            stacklevel=3,
        )
    if n_gaps:
        warnings.warn(
            f"{src}: {n_gaps} gap(s) in the token positions of kept tokens ({gap_positions} position(s) logged in no"
            " layer at all); kept as logged, with the gaps",
            RaggedLogWarning,
            stacklevel=3,
        )


def _provenance(src: str | Path, names: list[str], fmt: str, t: _Table, kept: _Kept, *, date: str | None,
                phase_from: str, prefill_tokens: int | None, inferred: list[str], reordered: int, n_gaps: int,
                include: Sequence[str] | None, request_scope: str) -> dict[str, Any]:
    """The trace's ``meta["import"]``: where the data came from and what the import did to it."""
    imp: dict[str, Any] = {
        "source": str(src),
        "files": names,
        "format": fmt,
        "fields": dict(t.fields.names),
        "tool": "traces.importers",
        "tool_version": project_version(),
        "date": date or datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "rows_read": t.n,
        "dropped_rows": int(kept.dropped_by_req.sum()),
        "phase_from": phase_from,
        "prefill_tokens": prefill_tokens,
        "shape_inferred": inferred,
        "weights_reordered_rows": reordered,
        "position_gaps": n_gaps,
    }
    if t.fields.names["token"] is None:
        imp["positions_from"] = "row order within (request, layer)"
    if t.fields.by_role:
        imp["fields_found_by_role"] = list(t.fields.by_role)
    if t.fields.unused:
        imp["fields_unused"] = list(t.fields.unused)
    if include:
        imp["include"] = list(include)
    if request_scope != "global":
        imp["request_scope"] = request_scope
    if imp["dropped_rows"]:
        imp["dropped_rows_by_request"] = {
            kept.label(int(kept.tok_req[kept.req_start[r]])): int(kept.dropped_by_req[r])
            for r in np.flatnonzero(kept.dropped_by_req)
        }
    if kept.empty_reqs:
        imp["dropped_requests"] = [kept.label(r) for r in kept.empty_reqs]
    if t.req_names is not None:
        imp["request_names"] = t.req_names
        imp["request_names_from"] = t.req_names_from
    return imp


def import_log(
    src: str | Path,
    fmt: str | None = None,
    *,
    request_field: str | None = None,
    layer_field: str | None = None,
    token_field: str | None = None,
    experts_field: str | None = None,
    weights_field: str | None = None,
    phase_field: str | None = None,
    prefill_tokens: int | None = None,
    request_scope: str = "global",
    include: Sequence[str] | None = None,
    num_experts: int | None = None,
    top_k: int | None = None,
    num_layers: int | None = None,
    moe_layers: Sequence[int] | None = None,
    num_shared_experts: int = 0,
    model_name: str = "unknown",
    meta: dict[str, Any] | None = None,
    date: str | None = None,
) -> Trace:
    """Read a routing log (a file or a directory of files) and return a validated trace.

    One record per (request, token, layer) with the token's top-k expert ids and optionally its
    gate weights and phase. A field name left as None is looked up among ``DEFAULT_FIELDS`` (gate
    weights also by what they look like, see ``_resolve_fields``); '' means the log has no such
    field: without a request field each file is one request, without a token field positions
    follow the rows' order within (request, layer). ``request_scope='file'`` keeps request ids of
    different files apart (logs whose ids restart in each file); ``include`` globs select a
    directory's files. Ragged logs are truncated per request to the longest prefix of tokens logged
    in every MoE layer (with a ``RaggedLogWarning`` and the count in
    ``meta["import"]["dropped_rows"]``). Ids are reordered by gate weight (descending, stable).
    Shape fields left as None are inferred from the data. Tokens are decode unless the phase field
    or ``prefill_tokens`` says otherwise; prefill tokens have step 0 and decode tokens steps 1, 2,
    ... in token order. Anything malformed raises ``TraceError`` naming the file, line and field.
    """
    if prefill_tokens is not None and prefill_tokens < 0:
        raise TraceError(f"--prefill-tokens must be >= 0, got {prefill_tokens}")
    if prefill_tokens is not None and phase_field:
        raise TraceError("give either a phase field or --prefill-tokens, not both")
    if request_scope not in REQUEST_SCOPES:
        raise TraceError(f"--request-scope must be one of {list(REQUEST_SCOPES)}, got {request_scope!r}")
    files, names, fmt = discover(src, fmt, include)
    given = {"request": request_field, "layer": layer_field, "token": token_field,
             "experts": experts_field, "weights": weights_field,
             "phase": "" if prefill_tokens is not None else phase_field}
    cols, fields = _read_files(src, files, fmt, given)
    t = _table(cols, fields, files, names, fmt == "csv", top_k, request_scope)
    del cols
    _check_ids(t, num_experts)
    reordered = _order_by_weight(t)
    shape, inferred = _shape(src, t, num_experts, top_k, num_layers, moe_layers, num_shared_experts, model_name)
    M = shape.num_moe_layers
    kept = _complete_prefix(src, t, M, shape.moe_layers)
    tphase, tstep, phase_from, n_gaps, gap_positions = _phases(t, kept, prefill_tokens)
    rows_idx = kept.order[kept.keep_row]
    rows = Rows(
        request_id=t.req[rows_idx],
        position=t.token[rows_idx].astype(np.int32),
        step=np.repeat(tstep, M),
        phase=np.repeat(tphase, M),
        layer=t.layer[rows_idx].astype(np.int16),
        expert_ids=t.ids[rows_idx],
        gate_weights=None if t.weights is None else t.weights[rows_idx].astype(np.float32),
    )
    imp = _provenance(src, names, fmt, t, kept, date=date, phase_from=phase_from, prefill_tokens=prefill_tokens,
                      inferred=inferred, reordered=reordered, n_gaps=n_gaps, include=include,
                      request_scope=request_scope)
    _report(src, t, kept, n_gaps, gap_positions)
    out_meta = dict(meta or {})
    out_meta["import"] = imp
    out_meta = json.loads(json.dumps(out_meta))  # exactly what a read-back gives (string keys, lists)
    return trace_from_rows(rows, shape, out_meta, where=str(src))


# ----------------------------------------------------------------------------- CLI
def add_arguments(p: argparse.ArgumentParser) -> None:
    d = DEFAULT_FIELDS
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.description = (
        "Convert a per-token routing log (one record per request, token and layer) into a trace.\n"
        "JSON Lines: one object per line, e.g. {\"request_id\": \"q1\", \"layer\": 3, \"token_idx\": 0,\n"
        "  \"topk_ids\": [5, 1], \"topk_weights\": [0.7, 0.3]} (the vLLM-logger names).\n"
        "CSV: a header row, one row per token and layer, the id list in one cell: '[5, 1]', '5 1' or\n"
        "  '5;1'; rows may be grouped by token or by layer.\n"
        "Field names not given are looked up among the defaults below, first match wins; without\n"
        "one, gate weights are the first list field of width k holding numbers in [0, 1] (warned),\n"
        "and any other list field of width k left unread is warned about.\n"
        "Ragged logs: each request is truncated to the tokens before the first one missing in some\n"
        "MoE layer (warned; counted in metadata import.dropped_rows). A token logged in no layer at\n"
        "all leaves a gap in the positions (warned; import.position_gaps). String request ids get\n"
        "ids 0, 1, ... by first appearance (names kept in import.request_names). Ids are ordered\n"
        "by gate weight, descending; tokens are decode (steps 1, 2, ...) unless a phase field or\n"
        "--prefill-tokens says otherwise."
    )
    p.add_argument("src", help="log file or directory of log files (.jsonl/.ndjson/.json or .csv, optionally .gz); "
                   "files are read in natural name order, and without a request field each file is one request")
    p.add_argument("-o", "--output", required=True, help="trace file to write (.parquet), written atomically")
    p.add_argument("--format", choices=FORMATS, default=None, help="input format (default: from the file extension)")
    p.add_argument("--include", action="append", metavar="GLOB",
                   help="read only a directory's files matching GLOB (the file name; the relative path if GLOB has a "
                   "'/'); repeatable, e.g. --include 'routing_*.jsonl'")
    p.add_argument("--request-scope", choices=REQUEST_SCOPES, default="global",
                   help="'file': request ids are local to each file (logs whose ids restart at 0 in every file); "
                   "requests are then named 'FILE:ID' in import.request_names (default: global)")
    g = p.add_argument_group("field names")
    g.add_argument("--request-field", help=f"request/problem id, int or string (default: first of {list(d['request'])}; "
                   "if none is present, or with --request-field '', each file is one request)")
    g.add_argument("--layer-field", help=f"decoder layer index (default: first of {list(d['layer'])})")
    g.add_argument("--token-field", help=f"token index/position in the request (default: first of {list(d['token'])}; "
                   "with --token-field '' positions follow the rows' order within each (request, layer), "
                   "so a CSV grouped by layer or by token needs no position column)")
    g.add_argument("--experts-field", help=f"list of top-k expert ids (default: first of {list(d['experts'])})")
    g.add_argument("--weights-field", help=f"list of gate weights, optional (default: first of {list(d['weights'])}, "
                   "else found by role: a list of width k of numbers in [0, 1]; '' reads none)")
    g.add_argument("--phase-field", help="'prefill'/'decode' per record, optional (default: 'phase' if present and --prefill-tokens "
                   "is not given)")
    g.add_argument("--prefill-tokens", type=int, default=None,
                   help="the first N tokens of each request are prefill (step 0); the rest decode, steps 1, 2, ...")
    s = p.add_argument_group("model shape (inferred from the data when not given)")
    s.add_argument("--model-name", default="unknown", help="model name stored in the trace's shape")
    s.add_argument("--num-experts", type=int, help="routed experts per layer (default: max id + 1)")
    s.add_argument("--top-k", type=int, help="experts per token (default: the id lists' length)")
    s.add_argument("--num-layers", type=int, help="decoder layers (default: max layer + 1)")
    s.add_argument("--moe-layers", help="MoE decoder layers, e.g. '1-23' or '0,2,4' (default: the layers seen)")
    s.add_argument("--shared-experts", type=int, default=0, help="shared experts per MoE layer (default 0)")


def run(args: argparse.Namespace) -> int:
    with warnings.catch_warnings():
        warnings.simplefilter("always", LogImportWarning)
        warnings.showwarning = _show_warning
        trace = import_log(
            args.src,
            args.format,
            request_field=args.request_field,
            layer_field=args.layer_field,
            token_field=args.token_field,
            experts_field=args.experts_field,
            weights_field=args.weights_field,
            phase_field=args.phase_field,
            prefill_tokens=args.prefill_tokens,
            request_scope=args.request_scope,
            include=args.include,
            num_experts=args.num_experts,
            top_k=args.top_k,
            num_layers=args.num_layers,
            moe_layers=parse_layers(args.moe_layers) if args.moe_layers else None,
            num_shared_experts=args.shared_experts,
            model_name=args.model_name,
        )
    path = write_trace(trace, args.output)
    s, imp = trace.shape, trace.meta["import"]
    print(
        f"{path}: {trace.num_requests} requests, {int(trace.lengths.sum())} tokens, {trace.num_rows} rows "
        f"({imp['dropped_rows']} dropped); {s.num_layers} layers, MoE layers {list(s.moe_layers)}, "
        f"{s.num_experts} experts, top-{s.top_k}"
    )
    return 0


def _show_warning(message: Any, category: Any, filename: str, lineno: int, file: Any = None, line: Any = None) -> None:
    print(f"warning: {message}", file=sys.stderr)
