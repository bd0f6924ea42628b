"""Trace Parquet format: write-then-read is exact, and every malformed file gets a precise error."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given
from hypothesis import strategies as st

from traces import ModelShape, Trace, TraceError, read_trace, trace_from_rows, write_trace
from traces.io import META_KEY, rows_from_trace, trace_to_table
from traces.trace import DECODE, PREFILL

RESERVED = {"schema_version", "shape", "num_rows", "num_requests"}


# --------------------------------------------------------------------------- builders
def make_trace(
    rng: np.random.Generator,
    shape: ModelShape,
    lengths: list[int],
    request_ids: list[int],
    *,
    weights: bool = True,
    depths: tuple[int, ...] = (),
    draft: bool = False,
    meta: dict[str, Any] | None = None,
) -> Trace:
    """A canonical trace (padding as trace_from_rows makes it) with random routing."""
    R, T = len(lengths), max(lengths)
    M, k, E = shape.num_moe_layers, shape.top_k, shape.num_experts
    valid = np.arange(T)[None, :] < np.asarray(lengths)[:, None]
    position = np.full((R, T), -1, np.int32)
    step = np.full((R, T), -1, np.int32)
    phase = np.full((R, T), -1, np.int8)
    for r, n in enumerate(lengths):
        start = int(rng.integers(0, 50))
        position[r, :n] = start + np.r_[0, np.cumsum(rng.integers(1, 4, n - 1))]
        n_pre = int(rng.integers(0, n + 1))
        phase[r, :n] = np.where(np.arange(n) < n_pre, PREFILL, DECODE)
        dec = 1 + np.r_[0, np.cumsum(rng.integers(0, 3, n - 1))][: n - n_pre]
        step[r, :n] = np.r_[np.zeros(n_pre, np.int32), dec]
    mask4 = valid[:, :, None, None]

    def ids() -> np.ndarray:
        a = np.argsort(rng.random((R, T, M, E)), axis=-1)[..., :k].astype(np.int16)
        return np.where(mask4, a, -1).astype(np.int16)

    gw = None
    if weights:
        w = -np.sort(-rng.random((R, T, M, k)).astype(np.float32), axis=-1)
        gw = np.where(mask4, w, np.nan).astype(np.float32)
    moe = list(shape.moe_layers)
    look = {}
    for d in depths:
        has = np.array([(layer + d) in moe for layer in moe])
        look[d] = np.where(mask4 & has[None, None, :, None], ids(), -1).astype(np.int16)
    dr = dm = None
    if draft:
        dr = ids()
        dm = (rng.random((R, T)) < 0.6) & valid
    return Trace(
        shape=shape,
        request_ids=np.asarray(request_ids, np.int64),
        lengths=np.asarray(lengths, np.int32),
        position=position,
        step=step,
        phase=phase,
        expert_ids=ids(),
        gate_weights=gw,
        lookahead=look,
        draft=dr,
        draft_match=dm,
        meta=meta or {},
    )


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=6),
    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=5), c, max_size=3),
    max_leaves=8,
)


@st.composite
def traces(draw: st.DrawFn) -> Trace:
    L = draw(st.integers(1, 6))
    moe = sorted(draw(st.lists(st.integers(0, L - 1), min_size=1, max_size=L, unique=True)))
    k = draw(st.integers(1, 4))
    E = draw(st.integers(k, 12))
    shape = ModelShape(name=draw(st.text(max_size=8)), num_layers=L, moe_layers=tuple(moe), num_experts=E,
                       top_k=k, num_shared_experts=draw(st.integers(0, 2)))
    R = draw(st.integers(1, 4))
    lengths = draw(st.lists(st.integers(1, 6), min_size=R, max_size=R))
    rids = draw(st.lists(st.integers(-(2**62), 2**62), min_size=R, max_size=R, unique=True))
    meta = draw(st.dictionaries(st.text(max_size=8).filter(lambda s: s not in RESERVED), json_values, max_size=4))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    return make_trace(
        rng, shape, lengths, rids,
        weights=draw(st.booleans()),
        depths=tuple(draw(st.lists(st.integers(1, 3), unique=True, max_size=3))),
        draft=draw(st.booleans()),
        meta=meta,
    )


# --------------------------------------------------------------------------- round trip
@given(traces())
def test_write_then_read_is_identical(tmp_path_factory: pytest.TempPathFactory, trace: Trace) -> None:
    path = tmp_path_factory.mktemp("rt") / "t.parquet"
    # the builder is canonical: the validating path reproduces it exactly
    assert trace_from_rows(rows_from_trace(trace), trace.shape, trace.meta).equals(trace)
    write_trace(trace, path)
    back = read_trace(path)
    assert back.equals(trace)
    assert back.meta == trace.meta
    assert back.lookahead_depths == trace.lookahead_depths
    # a second round trip is byte-stable in content
    write_trace(back, path)
    assert read_trace(path).equals(trace)


def test_write_is_atomic_and_leaves_no_temp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    t = base_trace()
    out = tmp_path / "sub" / "t.parquet"
    write_trace(t, out)
    assert [p.name for p in out.parent.iterdir()] == ["t.parquet"]

    def half_write(table: pa.Table, where: str, **kw: Any) -> None:
        Path(where).write_bytes(b"PAR1 half")
        raise OSError("disk full")

    import traces.io

    monkeypatch.setattr(traces.io.pq, "write_table", half_write)
    other = make_trace(np.random.default_rng(1), SHAPE, [2], [0])
    with pytest.raises(OSError, match="disk full"):
        write_trace(other, out)
    monkeypatch.undo()
    assert [p.name for p in out.parent.iterdir()] == ["t.parquet"]
    assert read_trace(out).equals(t)


# --------------------------------------------------------------------------- malformed files
SHAPE = ModelShape(name="t", num_layers=4, moe_layers=(0, 1, 3), num_experts=8, top_k=2)
# rows: request 0 tokens 0..2 -> rows 0..8, request 1 tokens 0..3 -> rows 9..20; layers (0, 1, 3) per token.
# lookahead_1 has ids on layer-0 rows only (0+1 = 1 is MoE; 2 is dense, 4 is past the end),
# lookahead_2 on layer-1 rows only (1+2 = 3).


def base_trace() -> Trace:
    t = make_trace(np.random.default_rng(7), SHAPE, [3, 4], [5, 9], weights=True, depths=(1, 2), draft=True,
                   meta={"source": "unit test"})
    t.position[1, :4] = [10, 11, 12, 13]
    return t


@pytest.fixture
def table() -> pa.Table:
    return trace_to_table(base_trace())


def meta_of(table: pa.Table) -> dict[str, Any]:
    return json.loads(table.schema.metadata[META_KEY])


def with_meta(table: pa.Table, **changes: Any) -> pa.Table:
    meta = meta_of(table)
    meta.update(changes)
    return table.replace_schema_metadata({META_KEY: json.dumps(meta).encode()})


def fixed(a: np.ndarray, value_type: pa.DataType, null: np.ndarray | None = None) -> pa.Array:
    n, w = a.shape
    mask = None if null is None else pa.array(null)
    return pa.FixedSizeListArray.from_arrays(pa.array(a.reshape(-1), type=value_type), w, mask=mask)


def list_col(table: pa.Table, name: str) -> np.ndarray:
    """All rows of a list column as an (n, k) array; null rows (lookahead) come back as -1."""
    col = table.column(name).combine_chunks()
    if pa.types.is_fixed_size_list(col.type):
        return col.values.to_numpy(zero_copy_only=False).reshape(len(col), col.type.list_size).copy()
    k = int(col.value_lengths().drop_null().to_numpy().max())
    out = np.full((len(col), k), -1, dtype=np.int64)
    live = ~col.is_null().to_numpy(zero_copy_only=False)
    out[live] = col.flatten().to_numpy(zero_copy_only=False).reshape(-1, k)
    return out


def replace(table: pa.Table, name: str, arr: pa.Array) -> pa.Table:
    return table.set_column(table.column_names.index(name), name, arr)


def take_rows(table: pa.Table, idx: list[int]) -> pa.Table:
    t = table.take(pa.array(idx, pa.int64()))
    return with_meta(t, num_rows=len(idx))


def expect(tmp_path: Path, table: pa.Table, *parts: str) -> str:
    """Write ``table`` with pyarrow directly, read it with read_trace; the error must name every part."""
    path = tmp_path / "bad.parquet"
    pq.write_table(table, path)
    with pytest.raises(TraceError) as ei:
        read_trace(path)
    msg = str(ei.value)
    assert str(path) in msg, msg
    for p in parts:
        assert p in msg, f"{p!r} not in {msg!r}"
    return msg


def test_base_table_is_valid(tmp_path: Path, table: pa.Table) -> None:
    path = tmp_path / "ok.parquet"
    pq.write_table(table, path)
    t = read_trace(path)
    assert t.equals(base_trace())
    assert table.num_rows == 21
    assert table.column("layer").to_pylist()[:6] == [0, 1, 3, 0, 1, 3]


def test_ids_out_of_range(tmp_path: Path, table: pa.Table) -> None:
    ids = list_col(table, "expert_ids")
    ids[4] = [0, 8]
    expect(tmp_path, replace(table, "expert_ids", fixed(ids, pa.int16())), "row 4", "'expert_ids'", "out of range")


def test_negative_id(tmp_path: Path, table: pa.Table) -> None:
    ids = list_col(table, "expert_ids")
    ids[11] = [-1, 2]
    expect(tmp_path, replace(table, "expert_ids", fixed(ids, pa.int16())), "row 11", "'expert_ids'", "out of range")


def test_wrong_k_width_fixed(tmp_path: Path, table: pa.Table) -> None:
    ids = np.c_[list_col(table, "expert_ids"), np.full(21, 7)]
    msg = expect(tmp_path, replace(table, "expert_ids", fixed(ids, pa.int16())), "'expert_ids'", "width 3", "top_k is 2")
    assert "row" not in msg  # the whole column is wrong, no single row to blame


def test_wrong_k_width_in_one_row(tmp_path: Path, table: pa.Table) -> None:
    lists = list_col(table, "expert_ids").tolist()
    lists[6] = lists[6] + [7]
    col = pa.array(lists, type=pa.list_(pa.int16()))
    expect(tmp_path, replace(table, "expert_ids", col), "row 6", "'expert_ids'", "has 3 ids")


def test_duplicate_ids_in_a_row(tmp_path: Path, table: pa.Table) -> None:
    ids = list_col(table, "expert_ids")
    ids[5] = [3, 3]
    expect(tmp_path, replace(table, "expert_ids", fixed(ids, pa.int16())), "row 5", "'expert_ids'", "duplicate")


def test_missing_layer(tmp_path: Path, table: pa.Table) -> None:
    idx = [i for i in range(21) if i != 4]  # request 5, token 1 (rows 3..5), layer 1
    expect(tmp_path, take_rows(table, idx), "row 3", "'layer'", "missing layers [1]", "request 5")


def test_repeated_layer(tmp_path: Path, table: pa.Table) -> None:
    idx = list(range(5)) + [4] + list(range(5, 21))
    expect(tmp_path, take_rows(table, idx), "row 3", "'layer'", "repeated layers [1]")


def test_extra_non_moe_layer(tmp_path: Path, table: pa.Table) -> None:
    layer = table.column("layer").to_numpy().copy()
    layer[13] = 2  # dense layer
    expect(tmp_path, replace(table, "layer", pa.array(layer, pa.int16())), "row 13", "'layer'", "not an MoE layer")


def test_layers_out_of_order(tmp_path: Path, table: pa.Table) -> None:
    idx = [0, 2, 1] + list(range(3, 21))
    expect(tmp_path, take_rows(table, idx), "row 0", "'layer'", "out of order")


def test_position_goes_back(tmp_path: Path, table: pa.Table) -> None:
    pos = table.column("position").to_numpy().copy()
    pos[15:18] = 10  # request 9's third token jumps back to its first position
    expect(tmp_path, replace(table, "position", pa.array(pos, pa.int32())), "row 15", "'position'", "goes back")


def test_negative_position(tmp_path: Path, table: pa.Table) -> None:
    pos = table.column("position").to_numpy().copy()
    pos[0:3] = -5
    expect(tmp_path, replace(table, "position", pa.array(pos, pa.int32())), "row 0", "'position'", "negative")


def test_request_in_two_blocks(tmp_path: Path, table: pa.Table) -> None:
    idx = list(range(9, 12)) + list(range(0, 9)) + list(range(12, 21))
    expect(tmp_path, take_rows(table, idx), "row 12", "'request_id'", "two separate blocks")


def test_lookahead_wrong_width(tmp_path: Path, table: pa.Table) -> None:
    a = np.c_[list_col(table, "lookahead_1"), np.zeros(21, int)]
    null = table.column("lookahead_1").combine_chunks().is_null().to_numpy(zero_copy_only=False)
    expect(tmp_path, replace(table, "lookahead_1", fixed(a, pa.int16(), null)), "'lookahead_1'", "width 3")


def test_draft_wrong_width_in_one_row(tmp_path: Path, table: pa.Table) -> None:
    lists = list_col(table, "draft").tolist()
    lists[8] = lists[8][:1]
    expect(tmp_path, replace(table, "draft", pa.array(lists, type=pa.list_(pa.int16()))), "row 8", "'draft'", "has 1 ids")


def test_draft_id_out_of_range(tmp_path: Path, table: pa.Table) -> None:
    a = list_col(table, "draft")
    a[2] = [9, 1]
    expect(tmp_path, replace(table, "draft", fixed(a, pa.int16())), "row 2", "'draft'", "out of range")


def test_lookahead_null_where_target_exists(tmp_path: Path, table: pa.Table) -> None:
    col = table.column("lookahead_1").combine_chunks()
    null = col.is_null().to_numpy(zero_copy_only=False).copy()
    assert not null[3] and null[4]  # layer 0 row has a target (layer 1), layer 1 row does not (layer 2 dense)
    null[3] = True
    a = list_col(table, "lookahead_1")
    expect(tmp_path, replace(table, "lookahead_1", fixed(a, pa.int16(), null)), "row 3", "'lookahead_1'", "is null but")


def test_lookahead_ids_where_target_missing(tmp_path: Path, table: pa.Table) -> None:
    col = table.column("lookahead_2").combine_chunks()
    null = col.is_null().to_numpy(zero_copy_only=False).copy()
    a = list_col(table, "lookahead_2")
    assert null[5]  # layer 3 + 2 is past the end
    null[5] = False
    a[5] = [1, 2]
    expect(tmp_path, replace(table, "lookahead_2", fixed(a, pa.int16(), null)), "row 5", "'lookahead_2'", "has ids but")


def test_lookahead_depth_zero(tmp_path: Path, table: pa.Table) -> None:
    t = table.append_column("lookahead_0", table.column("expert_ids"))
    expect(tmp_path, t, "'lookahead_0'", "depth")


def test_metadata_num_rows_contradicts(tmp_path: Path, table: pa.Table) -> None:
    expect(tmp_path, with_meta(table, num_rows=20), "'num_rows'", "20", "21 rows")


def test_metadata_num_requests_contradicts(tmp_path: Path, table: pa.Table) -> None:
    expect(tmp_path, with_meta(table, num_requests=3), "'num_requests'", "3")


def test_metadata_shape_num_experts_contradicts(tmp_path: Path, table: pa.Table) -> None:
    ids = list_col(table, "expert_ids")
    r = int(np.flatnonzero((ids >= 4).any(axis=1))[0])
    shape = dict(meta_of(table)["shape"], num_experts=4)
    expect(tmp_path, with_meta(table, shape=shape), f"row {r} ", "'expert_ids'", "out of range [0, 4)")


def test_metadata_shape_moe_layers_contradicts(tmp_path: Path, table: pa.Table) -> None:
    shape = dict(meta_of(table)["shape"], moe_layers=[0, 1])
    expect(tmp_path, with_meta(table, shape=shape), "row 2 ", "'layer'", "not an MoE layer")


def test_metadata_shape_top_k_contradicts(tmp_path: Path, table: pa.Table) -> None:
    shape = dict(meta_of(table)["shape"], top_k=3)
    expect(tmp_path, with_meta(table, shape=shape), "'expert_ids'", "top_k is 3")


def test_metadata_shape_invalid(tmp_path: Path, table: pa.Table) -> None:
    shape = dict(meta_of(table)["shape"])
    del shape["top_k"]
    expect(tmp_path, with_meta(table, shape=shape), "'shape'", "top_k")


def test_metadata_shape_wrong_type(tmp_path: Path, table: pa.Table) -> None:
    shape = dict(meta_of(table)["shape"], top_k="2")
    expect(tmp_path, with_meta(table, shape=shape), "'shape'")


def test_unknown_column(tmp_path: Path, table: pa.Table) -> None:
    t = table.append_column("foo", pa.array(np.zeros(21, np.int32)))
    expect(tmp_path, t, "unknown column", "'foo'")


def test_missing_required_column(tmp_path: Path, table: pa.Table) -> None:
    expect(tmp_path, table.drop_columns(["step"]), "missing column 'step'")


def test_null_in_required_column(tmp_path: Path, table: pa.Table) -> None:
    step = pa.array([None if i == 7 else v for i, v in enumerate(table.column("step").to_pylist())], pa.int32())
    expect(tmp_path, replace(table, "step", step), "row 7", "'step'", "null")


def test_bad_phase(tmp_path: Path, table: pa.Table) -> None:
    phases = table.column("phase").combine_chunks().cast(pa.string()).to_pylist()
    phases[12] = "warmup"
    expect(tmp_path, replace(table, "phase", pa.array(phases)), "row 12", "'phase'", "warmup")


def test_phase_differs_within_token(tmp_path: Path, table: pa.Table) -> None:
    phases = table.column("phase").combine_chunks().cast(pa.string()).to_pylist()
    phases[10] = "prefill" if phases[10] == "decode" else "decode"
    expect(tmp_path, replace(table, "phase", pa.array(phases)), "row 9", "'phase'", "differs")


def test_prefill_step_not_zero(tmp_path: Path) -> None:
    t = base_trace()
    t.phase[0, :3] = PREFILL
    t.step[0, :3] = [0, 0, 0]
    table = trace_to_table(t)
    step = table.column("step").to_numpy().copy()
    step[0:9] = 1
    expect(tmp_path, replace(table, "step", pa.array(step, pa.int32())), "row 0", "'step'", "step 0")


def test_step_goes_back(tmp_path: Path) -> None:
    t = base_trace()
    t.phase[1, :4] = DECODE
    t.step[1, :4] = [1, 2, 3, 4]
    table = trace_to_table(t)
    step = table.column("step").to_numpy().copy()
    step[18:21] = 1
    expect(tmp_path, replace(table, "step", pa.array(step, pa.int32())), "row 18", "'step'", "goes back")


def test_gate_weights_not_ordered(tmp_path: Path, table: pa.Table) -> None:
    w = list_col(table, "gate_weights")
    w[14] = [0.1, 0.9]
    expect(tmp_path, replace(table, "gate_weights", fixed(w, pa.float32())), "row 14", "'gate_weights'", "ordered")


def test_gate_weights_nan(tmp_path: Path, table: pa.Table) -> None:
    w = list_col(table, "gate_weights")
    w[1, 1] = np.nan
    expect(tmp_path, replace(table, "gate_weights", fixed(w, pa.float32())), "row 1", "'gate_weights'", "non-finite")


def test_draft_without_draft_match(tmp_path: Path, table: pa.Table) -> None:
    expect(tmp_path, table.drop_columns(["draft_match"]), "'draft'", "'draft_match'")


def test_draft_match_differs_within_token(tmp_path: Path, table: pa.Table) -> None:
    dm = table.column("draft_match").to_numpy(zero_copy_only=False).copy()
    dm[19] = not dm[19]
    expect(tmp_path, replace(table, "draft_match", pa.array(dm)), "row 18", "'draft_match'", "differs")


def test_not_a_parquet_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.parquet"
    path.write_text("request_id,layer\n1,2\n")
    with pytest.raises(TraceError, match="not a readable Parquet trace") as ei:
        read_trace(path)
    assert str(path) in str(ei.value)


def test_no_such_file(tmp_path: Path) -> None:
    with pytest.raises(TraceError, match="no such trace file"):
        read_trace(tmp_path / "missing.parquet")


def test_missing_metadata(tmp_path: Path, table: pa.Table) -> None:
    expect(tmp_path, table.replace_schema_metadata({}), "'moe_trace'", "metadata")


def test_metadata_not_json(tmp_path: Path, table: pa.Table) -> None:
    expect(tmp_path, table.replace_schema_metadata({META_KEY: b"{nope"}), "'moe_trace'", "not valid JSON")


def test_metadata_not_an_object(tmp_path: Path, table: pa.Table) -> None:
    expect(tmp_path, table.replace_schema_metadata({META_KEY: b"[1, 2]"}), "'moe_trace'", "object")


def test_wrong_schema_version(tmp_path: Path, table: pa.Table) -> None:
    expect(tmp_path, with_meta(table, schema_version=2), "'schema_version'", "2")


def test_empty_table(tmp_path: Path, table: pa.Table) -> None:
    expect(tmp_path, take_rows(table, []), "no rows")


def test_all_empty_id_lists(tmp_path: Path, table: pa.Table) -> None:
    col = pa.array([[]] * 21, type=pa.list_(pa.int16()))
    expect(tmp_path, replace(table, "expert_ids", col), "'expert_ids'", "empty")


def test_request_id_not_integer(tmp_path: Path, table: pa.Table) -> None:
    col = pa.array([f"r{v}" for v in table.column("request_id").to_pylist()])
    expect(tmp_path, replace(table, "request_id", col), "'request_id'", "integer")
