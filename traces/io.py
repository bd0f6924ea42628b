"""Parquet I/O for traces, and the one validating path from row columns to the dense form.

Long table, one row per (request, token position, MoE layer); metadata as JSON under one key of
the Arrow schema metadata (docs/architecture.md, Trace). Every file that enters the project, read from
Parquet or converted by an importer, passes ``trace_from_rows``: nothing is silently repaired.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from traces.atomic import atomic_write
from traces.errors import TraceError
from traces.shape import ModelShape
from traces.trace import DECODE, PHASES, PREFILL, Trace, empty_arrays

SCHEMA_VERSION = 1
META_KEY = b"moe_trace"
REQUIRED = ("request_id", "position", "step", "phase", "layer", "expert_ids")
LOOKAHEAD_RE = re.compile(r"^lookahead_(\d+)$")


# --------------------------------------------------------------------------- rows
@dataclass
class Rows:
    """Row-level columns as numpy arrays (what a Parquet file or an importer yields).

    List columns are (n, width) arrays; predictor columns use -1 for null rows.
    """

    request_id: np.ndarray
    position: np.ndarray
    step: np.ndarray
    phase: np.ndarray  # int8 codes: 0 prefill, 1 decode
    layer: np.ndarray
    expert_ids: np.ndarray
    gate_weights: np.ndarray | None = None
    lookahead: dict[int, np.ndarray] | None = None
    lookahead_null: dict[int, np.ndarray] | None = None  # d -> (n,) bool, row is null
    draft: np.ndarray | None = None
    draft_match: np.ndarray | None = None


def _fail(where: str, row: int | None, rows: Rows | None, field: str, msg: str) -> TraceError:
    loc = ""
    if row is not None:
        loc = f" row {row}"
        if rows is not None:
            loc += (
                f" (request {int(rows.request_id[row])}, position {int(rows.position[row])},"
                f" layer {int(rows.layer[row])})"
            )
    return TraceError(f"{where}:{loc} field '{field}': {msg}")


def _first(mask: np.ndarray) -> int:
    return int(np.flatnonzero(mask)[0])


def trace_from_rows(rows: Rows, shape: ModelShape, meta: dict[str, Any], where: str = "<trace>") -> Trace:
    """Validate row columns against ``shape`` and build the dense trace.

    Rows must come grouped by request, then by position (never going back), each token with
    exactly one row per MoE layer in increasing layer order.
    """
    if len(rows.request_id) == 0:
        raise _fail(where, None, None, "request_id", "the trace has no rows")
    _check_expert_columns(rows, shape, where)
    starts = _request_blocks(rows, shape, where)
    tok_start = _token_rows(rows, shape, where)
    _check_token_fields(rows, shape, tok_start, where)
    _check_lookahead_nulls(rows, shape, tok_start, where)
    return _dense_trace(rows, shape, meta, starts, tok_start)


def _check_expert_columns(rows: Rows, shape: ModelShape, where: str) -> None:
    """Widths equal top_k; expert ids in range and distinct within a row; gate weights finite and
    in decreasing order."""
    n, k, E = len(rows.request_id), shape.top_k, shape.num_experts

    def check_width(name: str, a: np.ndarray | None) -> None:
        if a is not None and (a.ndim != 2 or a.shape[1] != k):
            width = a.shape[1] if a.ndim == 2 else "scalar"
            raise _fail(where, None, None, name, f"has width {width}, the model's top_k is {k}")

    check_width("expert_ids", rows.expert_ids)
    check_width("gate_weights", rows.gate_weights)
    check_width("draft", rows.draft)
    for d, a in (rows.lookahead or {}).items():
        check_width(f"lookahead_{d}", a)

    def check_ids(name: str, a: np.ndarray, null: np.ndarray | None = None) -> None:
        live = np.ones(n, dtype=bool) if null is None else ~null
        bad = live & ((a < 0) | (a >= E)).any(axis=1)
        if bad.any():
            r = _first(bad)
            raise _fail(where, r, rows, name, f"expert id(s) {a[r].tolist()} out of range [0, {E})")
        if k > 1:
            s = np.sort(a, axis=1)
            dup = live & (s[:, 1:] == s[:, :-1]).any(axis=1)
            if dup.any():
                r = _first(dup)
                raise _fail(where, r, rows, name, f"duplicate expert ids {a[r].tolist()}")

    check_ids("expert_ids", rows.expert_ids)
    if rows.draft is not None:
        check_ids("draft", rows.draft)
    for d, a in (rows.lookahead or {}).items():
        check_ids(f"lookahead_{d}", a, (rows.lookahead_null or {}).get(d))

    if rows.gate_weights is not None:
        w = rows.gate_weights
        bad = ~np.isfinite(w).all(axis=1)
        if bad.any():
            r = _first(bad)
            raise _fail(where, r, rows, "gate_weights", f"non-finite weight in {w[r].tolist()}")
        if k > 1:
            bad = (np.diff(w, axis=1) > 0).any(axis=1)
            if bad.any():
                r = _first(bad)
                raise _fail(where, r, rows, "gate_weights", f"not ordered by gate weight: {w[r].tolist()}")


def _request_blocks(rows: Rows, shape: ModelShape, where: str) -> np.ndarray:
    """First row of each request: layers are MoE layers, each request one block of rows, positions
    never going back."""
    moe = np.asarray(shape.moe_layers, dtype=np.int64)
    bad = ~np.isin(rows.layer, moe)
    if bad.any():
        r = _first(bad)
        raise _fail(where, r, rows, "layer", f"layer {int(rows.layer[r])} is not an MoE layer {moe.tolist()}")

    rid = rows.request_id.astype(np.int64)
    starts = np.flatnonzero(np.r_[True, rid[1:] != rid[:-1]])
    order_ids = rid[starts]
    if len(np.unique(order_ids)) != len(order_ids):
        seen: set[int] = set()
        for s, v in zip(starts, order_ids):
            if int(v) in seen:
                raise _fail(where, int(s), rows, "request_id", f"request {int(v)} appears in two separate blocks")
            seen.add(int(v))

    pos = rows.position.astype(np.int64)
    same_req = rid[1:] == rid[:-1]
    back = same_req & (pos[1:] < pos[:-1])
    if back.any():
        r = _first(back) + 1
        raise _fail(where, r, rows, "position", f"position goes back from {int(pos[r - 1])} to {int(pos[r])}")
    if (pos < 0).any():
        r = _first(pos < 0)
        raise _fail(where, r, rows, "position", "negative position")
    return starts


def _token_rows(rows: Rows, shape: ModelShape, where: str) -> np.ndarray:
    """First row of each token, after checking that every token has exactly the MoE layers, in order."""
    n, M = len(rows.request_id), shape.num_moe_layers
    moe = np.asarray(shape.moe_layers, dtype=np.int64)
    rid, pos = rows.request_id.astype(np.int64), rows.position.astype(np.int64)
    tok_start = np.flatnonzero(np.r_[True, (rid[1:] != rid[:-1]) | (pos[1:] != pos[:-1])])
    tok_len = np.diff(np.r_[tok_start, n])
    bad_tok = tok_len != M
    if not bad_tok.any():
        lay = rows.layer.astype(np.int64).reshape(-1, M)
        bad_tok = (lay != moe[None, :]).any(axis=1)
    if bad_tok.any():
        t = _first(bad_tok)
        s, e = int(tok_start[t]), int(tok_start[t]) + int(tok_len[t])
        got = rows.layer[s:e].astype(np.int64).tolist()
        missing = sorted(set(moe.tolist()) - set(got))
        extra = sorted(x for x in set(got) if got.count(x) > 1)
        detail = []
        if missing:
            detail.append(f"missing layers {missing}")
        if extra:
            detail.append(f"repeated layers {extra}")
        if not detail:
            detail.append(f"layers out of order {got}")
        raise _fail(where, s, rows, "layer", "; ".join(detail) + f" (expected {moe.tolist()})")
    return tok_start


def _check_token_fields(rows: Rows, shape: ModelShape, tok_start: np.ndarray, where: str) -> None:
    """step, phase and draft_match are per token (equal on its layer rows); prefill is step 0 and
    comes before decode (step >= 1, never going back) within a request."""
    M = shape.num_moe_layers
    for name, col in (("step", rows.step), ("phase", rows.phase), ("draft_match", rows.draft_match)):
        if col is None:
            continue
        incons = (col.reshape(-1, M) != col[tok_start][:, None]).any(axis=1)
        if incons.any():
            t = _first(incons)
            raise _fail(where, int(tok_start[t]), rows, name, "differs between the layer rows of one token")
    tstep = rows.step[tok_start].astype(np.int64)
    tphase = rows.phase[tok_start].astype(np.int8)
    bad = ~np.isin(tphase, (PREFILL, DECODE))
    if bad.any():
        raise _fail(where, int(tok_start[_first(bad)]), rows, "phase", "must be 'prefill' or 'decode'")
    trid = rows.request_id.astype(np.int64)[tok_start]
    tsame = trid[1:] == trid[:-1]
    bad = tsame & (tstep[1:] < tstep[:-1])
    if bad.any():
        r = int(tok_start[_first(bad) + 1])
        raise _fail(where, r, rows, "step", "step goes back within a request")
    bad = ((tphase == PREFILL) & (tstep != 0)) | ((tphase == DECODE) & (tstep < 1))
    if bad.any():
        r = int(tok_start[_first(bad)])
        raise _fail(where, r, rows, "step", "prefill tokens must have step 0 and decode tokens step >= 1")
    bad = tsame & (tphase[1:] == PREFILL) & (tphase[:-1] == DECODE)
    if bad.any():
        r = int(tok_start[_first(bad) + 1])
        raise _fail(where, r, rows, "phase", "a prefill token follows a decode token")


def _check_lookahead_nulls(rows: Rows, shape: ModelShape, tok_start: np.ndarray, where: str) -> None:
    """lookahead_d is null exactly where layer l + d is not an MoE layer."""
    n, M = len(rows.request_id), shape.num_moe_layers
    moe_set = set(shape.moe_layers)
    for d, a in (rows.lookahead or {}).items():
        null = (rows.lookahead_null or {}).get(d, np.zeros(n, dtype=bool))
        has_target = np.array([(int(layer) + d) in moe_set for layer in shape.moe_layers], dtype=bool)
        want_null = ~has_target[np.tile(np.arange(M), len(tok_start))]
        bad = null != want_null
        if bad.any():
            r = _first(bad)
            what = "is null but" if null[r] else "has ids but"
            tgt = int(rows.layer[r]) + d
            raise _fail(
                where, r, rows, f"lookahead_{d}",
                f"{what} layer {tgt} {'is' if want_null[r] else 'is not'} missing/dense (null exactly where l+d is not an MoE layer)",
            )


def _dense_trace(rows: Rows, shape: ModelShape, meta: dict[str, Any], starts: np.ndarray,
                 tok_start: np.ndarray) -> Trace:
    """The (request, token, MoE layer, k) arrays of validated rows."""
    M, k = shape.num_moe_layers, shape.top_k
    R, ntok = len(starts), len(tok_start)
    req_of_tok = np.searchsorted(starts, tok_start, side="right") - 1
    first_tok_of_req = np.searchsorted(tok_start, starts)
    t_idx = np.arange(ntok) - first_tok_of_req[req_of_tok]
    lengths = np.bincount(req_of_tok, minlength=R).astype(np.int32)
    T = int(lengths.max())
    arr = empty_arrays(R, T, M, k)
    arr["position"][req_of_tok, t_idx] = rows.position.astype(np.int64)[tok_start]
    arr["step"][req_of_tok, t_idx] = rows.step[tok_start].astype(np.int64)
    arr["phase"][req_of_tok, t_idx] = rows.phase[tok_start].astype(np.int8)
    arr["expert_ids"][req_of_tok, t_idx] = rows.expert_ids.reshape(ntok, M, k)

    def dense(a: np.ndarray, fill: Any, dtype: Any) -> np.ndarray:
        out = np.full((R, T, M, k), fill, dtype=dtype)
        out[req_of_tok, t_idx] = a.reshape(ntok, M, k)
        return out

    gw = None if rows.gate_weights is None else dense(rows.gate_weights.astype(np.float32), np.nan, np.float32)
    look = {}
    for d, a in (rows.lookahead or {}).items():
        a = a.astype(np.int16).copy()
        null = (rows.lookahead_null or {}).get(d)
        if null is not None:
            a[null] = -1
        look[int(d)] = dense(a, -1, np.int16)
    draft = None if rows.draft is None else dense(rows.draft.astype(np.int16), -1, np.int16)
    dm = None
    if rows.draft_match is not None:
        dm = np.zeros((R, T), dtype=bool)
        dm[req_of_tok, t_idx] = rows.draft_match[tok_start].astype(bool)
    return Trace(
        shape=shape,
        request_ids=rows.request_id.astype(np.int64)[starts],
        lengths=lengths,
        gate_weights=gw,
        lookahead=look,
        draft=draft,
        draft_match=dm,
        meta=meta,
        **arr,
    )


def rows_from_trace(trace: Trace) -> Rows:
    """The inverse of ``trace_from_rows``: row columns in canonical order."""
    M, k = trace.shape.num_moe_layers, trace.shape.top_k
    valid = trace.valid_mask()
    r_idx, t_idx = np.nonzero(valid)
    ntok = len(r_idx)

    def rep(a: np.ndarray) -> np.ndarray:
        return np.repeat(a[r_idx, t_idx], M)

    def flat(a: np.ndarray) -> np.ndarray:
        return a[r_idx, t_idx].reshape(ntok * M, k)

    look, null = {}, {}
    for d, a in trace.lookahead.items():
        f = flat(a)
        look[d] = f
        null[d] = (f < 0).all(axis=1)
    return Rows(
        request_id=np.repeat(trace.request_ids[r_idx], M),
        position=rep(trace.position),
        step=rep(trace.step),
        phase=rep(trace.phase),
        layer=np.tile(np.asarray(trace.shape.moe_layers, dtype=np.int16), ntok),
        expert_ids=flat(trace.expert_ids),
        gate_weights=None if trace.gate_weights is None else flat(trace.gate_weights),
        lookahead=look,
        lookahead_null=null,
        draft=None if trace.draft is None else flat(trace.draft),
        draft_match=None if trace.draft_match is None else rep(trace.draft_match),
    )


# ------------------------------------------------------------------------ parquet
def _fixed_list(a: np.ndarray, value_type: pa.DataType, null: np.ndarray | None = None) -> pa.Array:
    n, k = a.shape
    values = pa.array(a.reshape(-1), type=value_type)
    mask = None if null is None or not null.any() else pa.array(null)
    return pa.FixedSizeListArray.from_arrays(values, k, mask=mask)


def _nullable_list(a: np.ndarray, null: np.ndarray) -> pa.Array:
    """A list<int16> column with null rows. Not fixed_size_list: pyarrow 25 cannot read null
    entries of fixed-size lists back from Parquet ("Expected all lists to be of size=k")."""
    n, k = a.shape
    offsets = np.zeros(n + 1, dtype=np.int32)
    offsets[1:] = np.cumsum(np.where(null, 0, k))
    values = pa.array(a[~null].reshape(-1), type=pa.int16())
    return pa.ListArray.from_arrays(pa.array(offsets), values, mask=pa.array(null))


def trace_to_table(trace: Trace) -> pa.Table:
    rows = rows_from_trace(trace)
    phase = pa.DictionaryArray.from_arrays(pa.array(rows.phase, type=pa.int8()), pa.array(list(PHASES)))
    cols: dict[str, pa.Array] = {
        "request_id": pa.array(rows.request_id, type=pa.int64()),
        "position": pa.array(rows.position, type=pa.int32()),
        "step": pa.array(rows.step, type=pa.int32()),
        "phase": phase,
        "layer": pa.array(rows.layer, type=pa.int16()),
        "expert_ids": _fixed_list(rows.expert_ids, pa.int16()),
    }
    if rows.gate_weights is not None:
        cols["gate_weights"] = _fixed_list(rows.gate_weights, pa.float32())
    for d in sorted(rows.lookahead or {}):
        cols[f"lookahead_{d}"] = _nullable_list(rows.lookahead[d], rows.lookahead_null[d])
    if rows.draft is not None:
        cols["draft"] = _fixed_list(rows.draft, pa.int16())
        cols["draft_match"] = pa.array(rows.draft_match, type=pa.bool_())
    table = pa.table(cols)
    meta = dict(trace.meta)
    meta["schema_version"] = SCHEMA_VERSION
    meta["shape"] = trace.shape.shape_only().to_dict()
    meta["num_rows"] = table.num_rows
    meta["num_requests"] = trace.num_requests
    return table.replace_schema_metadata({META_KEY: json.dumps(meta, sort_keys=True).encode()})


def write_trace(trace: Trace, path: str | os.PathLike) -> Path:
    """Write atomically (temp file + rename): a failed write leaves nothing behind."""
    table = trace_to_table(trace)
    return atomic_write(path, lambda tmp: pq.write_table(table, tmp, compression="zstd"))


def _list_column(table: pa.Table, name: str, where: str, k: int, int_ids: bool) -> tuple[np.ndarray, np.ndarray]:
    col = table.column(name).combine_chunks()
    if not (pa.types.is_fixed_size_list(col.type) or pa.types.is_list(col.type) or pa.types.is_large_list(col.type)):
        raise TraceError(f"{where}: field '{name}' has type {col.type}, expected a list column")
    null = col.is_null().to_numpy(zero_copy_only=False)
    if pa.types.is_fixed_size_list(col.type):
        width = col.type.list_size
        child = col.values.slice(col.offset * width, len(col) * width)
        if child.null_count:
            child = child.fill_null(-1 if int_ids else float("nan"))
        vals = child.to_numpy(zero_copy_only=False)
        a = vals.reshape(len(col), width)
    else:
        lens = col.value_lengths().fill_null(0).to_numpy(zero_copy_only=False)
        live = ~null
        if live.any() and (lens[live] != lens[live][0]).any():
            r = _first(live & (lens != lens[live][0]))
            raise TraceError(f"{where}: row {r} field '{name}': has {int(lens[r])} ids, other rows {int(lens[live][0])}")
        width = int(lens[live][0]) if live.any() else k
        if width == 0:
            raise TraceError(f"{where}: row 0 field '{name}': empty list")
        a = np.full((len(col), width), -1)
        if live.any():
            a[live] = col.flatten().to_numpy(zero_copy_only=False).reshape(-1, width)
    if int_ids:
        a = a.astype(np.int64)
    else:
        a = a.astype(np.float32)
    return a, null


def read_trace(path: str | os.PathLike) -> Trace:
    """Read and validate a trace file; errors name the file, row and field."""
    where = str(path)
    try:
        table = pq.ParquetFile(path).read()
    except FileNotFoundError:
        raise TraceError(f"{where}: no such trace file") from None
    except (pa.ArrowInvalid, OSError) as e:
        raise TraceError(f"{where}: not a readable Parquet trace ({e})") from None
    meta, shape = _file_meta(table, where)
    _check_table(table, meta, where)
    rows = _rows_of_table(table, shape, where)
    for key in ("num_rows", "schema_version", "shape"):
        meta.pop(key, None)
    n_req = meta.pop("num_requests", None)
    trace = trace_from_rows(rows, shape, meta, where)
    if n_req is not None and n_req != trace.num_requests:
        raise TraceError(f"{where}: metadata field 'num_requests' says {n_req}, the rows hold {trace.num_requests}")
    return trace


def _file_meta(table: pa.Table, where: str) -> tuple[dict[str, Any], ModelShape]:
    """The file's metadata (schema version checked) and the model shape it names."""
    raw = (table.schema.metadata or {}).get(META_KEY)
    if raw is None:
        raise TraceError(f"{where}: no '{META_KEY.decode()}' metadata in the Parquet schema (not a trace file?)")
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError as e:
        raise TraceError(f"{where}: metadata '{META_KEY.decode()}' is not valid JSON ({e})") from None
    if not isinstance(meta, dict):
        raise TraceError(f"{where}: metadata '{META_KEY.decode()}' is a JSON {type(meta).__name__}, expected an object")
    version = meta.get("schema_version")
    if version != SCHEMA_VERSION:
        raise TraceError(f"{where}: metadata field 'schema_version' is {version!r}, this tool reads {SCHEMA_VERSION}")
    if "shape" not in meta:
        raise TraceError(f"{where}: metadata has no 'shape' field")
    if not isinstance(meta["shape"], dict):
        raise TraceError(f"{where}: metadata field 'shape' is {meta['shape']!r}, expected an object")
    try:
        shape = ModelShape.from_dict(meta["shape"], where=f"{where}: metadata field 'shape'")
    except TraceError:
        raise
    except (TypeError, ValueError) as e:
        raise TraceError(f"{where}: metadata field 'shape' is invalid: {meta['shape']!r} ({e})") from None
    return meta, shape


def _check_table(table: pa.Table, meta: dict[str, Any], where: str) -> None:
    """Required columns present, integer where they must be, no nulls outside lookahead columns."""
    for name in REQUIRED:
        if name not in table.column_names:
            raise TraceError(f"{where}: missing column '{name}'")
    for name in ("request_id", "position", "step", "layer"):
        if not pa.types.is_integer(table.column(name).type):
            raise TraceError(f"{where}: field '{name}' has type {table.column(name).type}, expected an integer column")
    if meta.get("num_rows", table.num_rows) != table.num_rows:
        raise TraceError(f"{where}: metadata field 'num_rows' says {meta['num_rows']}, the file has {table.num_rows} rows")
    for name in table.column_names:
        if table.column(name).null_count and not LOOKAHEAD_RE.match(name):
            r = _first(table.column(name).combine_chunks().is_null().to_numpy(zero_copy_only=False))
            raise TraceError(f"{where}: row {r} field '{name}': null value")


def _rows_of_table(table: pa.Table, shape: ModelShape, where: str) -> Rows:
    """The row columns as numpy arrays (phase as codes, list columns as (n, top_k) arrays)."""
    phase_col = table.column("phase").combine_chunks()
    if pa.types.is_dictionary(phase_col.type):
        phase_col = phase_col.cast(pa.string())
    phase_str = np.asarray(phase_col.to_numpy(zero_copy_only=False), dtype=object)
    phase = np.full(len(phase_str), -1, dtype=np.int8)
    phase[phase_str == "prefill"] = PREFILL
    phase[phase_str == "decode"] = DECODE
    if (phase < 0).any():
        r = _first(phase < 0)
        raise TraceError(f"{where}: row {r} field 'phase': {phase_str[r]!r} is not 'prefill' or 'decode'")

    k = shape.top_k
    ids, _ = _list_column(table, "expert_ids", where, k, True)
    rows = Rows(
        request_id=table.column("request_id").to_numpy(),
        position=table.column("position").to_numpy(),
        step=table.column("step").to_numpy(),
        phase=phase,
        layer=table.column("layer").to_numpy(),
        expert_ids=ids,
    )
    if "gate_weights" in table.column_names:
        rows.gate_weights, _ = _list_column(table, "gate_weights", where, k, False)
    rows.lookahead, rows.lookahead_null = {}, {}
    for name in table.column_names:
        m = LOOKAHEAD_RE.match(name)
        if m:
            d = int(m.group(1))
            if d < 1:
                raise TraceError(f"{where}: field '{name}': lookahead depth must be >= 1")
            a, null = _list_column(table, name, where, k, True)
            rows.lookahead[d], rows.lookahead_null[d] = a, null
    if ("draft" in table.column_names) != ("draft_match" in table.column_names):
        raise TraceError(f"{where}: columns 'draft' and 'draft_match' must appear together")
    if "draft" in table.column_names:
        rows.draft, _ = _list_column(table, "draft", where, k, True)
        rows.draft_match = table.column("draft_match").to_numpy(zero_copy_only=False).astype(bool)
    known = set(REQUIRED) | {"gate_weights", "draft", "draft_match"}
    extra = [c for c in table.column_names if c not in known and not LOOKAHEAD_RE.match(c)]
    if extra:
        raise TraceError(f"{where}: unknown column(s) {extra}")
    return rows
