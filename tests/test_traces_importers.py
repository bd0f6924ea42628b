"""Importers of other tools' routing logs (JSON Lines, CSV) into traces."""

from __future__ import annotations

import csv
import gzip
import importlib
import json
import sys
import types
import warnings
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from traces import ModelShape, Trace, TraceError, read_trace
from traces.importers import DEFAULT_FIELDS, LogFieldWarning, RaggedLogWarning, import_log, parse_layers
from traces.io import rows_from_trace
from traces.trace import DECODE, PREFILL, empty_arrays

DATE = "2026-01-01T00:00:00+00:00"


# --------------------------------------------------------------------------- ground truth
def truth(
    rng: np.random.Generator,
    lengths: list[int],
    *,
    moe: tuple[int, ...] = (0, 1, 2),
    num_layers: int | None = None,
    E: int = 8,
    k: int = 2,
    prefill: int = 0,
    weights: bool = True,
    request_ids: list[int] | None = None,
    offsets: list[int] | None = None,
) -> Trace:
    """What a correct import of the generated log must give (steps as the importer numbers them)."""
    R, T, M = len(lengths), max(lengths), len(moe)
    shape = ModelShape(name="unknown", num_layers=num_layers or moe[-1] + 1, moe_layers=moe, num_experts=E, top_k=k)
    arr = empty_arrays(R, T, M, k)
    gw = np.full((R, T, M, k), np.nan, np.float32) if weights else None
    for r, n in enumerate(lengths):
        t = np.arange(n)
        arr["position"][r, :n] = (offsets[r] if offsets else 0) + t
        arr["phase"][r, :n] = np.where(t < prefill, PREFILL, DECODE)
        arr["step"][r, :n] = np.maximum(t - prefill + 1, 0)
        arr["expert_ids"][r, :n] = np.argsort(rng.random((n, M, E)), axis=-1)[..., :k]
        if weights:
            gw[r, :n] = -np.sort(-rng.random((n, M, k)).astype(np.float32), axis=-1)
    return Trace(shape=shape, request_ids=np.asarray(request_ids or list(range(R)), np.int64),
                 lengths=np.asarray(lengths, np.int32), gate_weights=gw, **arr)


def records(t: Trace, names: dict[int, Any] | None = None, *, request: bool = True,
            weights: bool = True) -> list[dict[str, Any]]:
    """The trace as vLLM-logger style records, token-grouped."""
    rows = rows_from_trace(t)
    out = []
    for i in range(len(rows.request_id)):
        rec: dict[str, Any] = {}
        if request:
            rid = int(rows.request_id[i])
            rec["request_id"] = names[rid] if names else rid
        rec["layer"] = int(rows.layer[i])
        rec["token_idx"] = int(rows.position[i])
        rec["topk_ids"] = [int(x) for x in rows.expert_ids[i]]
        if weights and rows.gate_weights is not None:
            rec["topk_weights"] = [float(x) for x in rows.gate_weights[i]]
        out.append(rec)
    return out


def write_jsonl(path: Path, recs: list[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return path


def fmt_list(xs: list[Any], style: str) -> str:
    return {"json": json.dumps(xs), "space": " ".join(map(str, xs)), "semi": ";".join(map(str, xs))}[style]


def write_csv(path: Path, recs: list[dict[str, Any]], style: str = "json") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    cols = list(recs[0]) if recs else ["request_id", "layer", "token_idx", "topk_ids"]
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(cols)
        for r in recs:
            w.writerow([fmt_list(r[c], style) if isinstance(r[c], list) else r[c] for c in cols])
    return path


def same(got: Trace, want: Trace) -> bool:
    """Same routing arrays and shape; metadata aside."""
    saved = got.meta
    got.meta = want.meta
    try:
        return got.equals(want)
    finally:
        got.meta = saved


def by_layer(recs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return sorted(recs, key=lambda r: r["layer"])  # stable: token order kept within a layer


# --------------------------------------------------------------------------- JSON Lines
def test_jsonl_roundtrip(tmp_path: Path) -> None:
    want = truth(np.random.default_rng(0), [5, 3, 4], request_ids=[3, 7, 10], offsets=[0, 4, 100], prefill=2)
    recs = records(want)
    src = write_jsonl(tmp_path / "log.jsonl", [recs[i] for i in np.random.default_rng(1).permutation(len(recs))])
    got = import_log(src, "jsonl", prefill_tokens=2, date=DATE)
    assert same(got, want)
    imp = got.meta["import"]
    assert imp["dropped_rows"] == 0 and imp["rows_read"] == len(recs)
    assert imp["fields"] == {"request": "request_id", "layer": "layer", "token": "token_idx",
                             "experts": "topk_ids", "weights": "topk_weights", "phase": None}
    assert "request_names" not in imp  # integer ids are kept as logged


def test_jsonl_provenance_metadata(tmp_path: Path) -> None:
    want = truth(np.random.default_rng(0), [2])
    src = write_jsonl(tmp_path / "a.jsonl", records(want))
    got = import_log(src)
    imp = got.meta["import"]
    assert imp["source"] == str(src) and imp["files"] == ["a.jsonl"] and imp["format"] == "jsonl"
    assert imp["tool"] == "traces.importers" and imp["tool_version"]
    date = datetime.fromisoformat(imp["date"])
    assert date.utcoffset() == timezone.utc.utcoffset(None)
    assert imp["phase_from"].startswith("all decode")
    assert sorted(imp["shape_inferred"]) == ["moe_layers", "num_experts", "num_layers", "top_k"]
    assert json.loads(json.dumps(got.meta)) == got.meta


def test_written_trace_reads_back_identical(tmp_path: Path) -> None:
    from traces import write_trace

    want = truth(np.random.default_rng(2), [4, 6])
    got = import_log(write_jsonl(tmp_path / "l.jsonl", records(want, {0: "q-a", 1: "q-b"})), date=DATE)
    write_trace(got, tmp_path / "t.parquet")
    assert read_trace(tmp_path / "t.parquet").equals(got)


def test_string_request_ids_map_by_first_appearance(tmp_path: Path) -> None:
    want = truth(np.random.default_rng(3), [3, 2, 4])
    names = {0: "zeta", 1: "alpha", 2: "17b"}
    got = import_log(write_jsonl(tmp_path / "l.jsonl", records(want, names)), date=DATE)
    assert same(got, want)
    assert got.meta["import"]["request_names"] == {"zeta": 0, "alpha": 1, "17b": 2}
    assert got.meta["import"]["request_names_from"] == "field"


def test_mixed_int_and_string_request_ids_are_names(tmp_path: Path) -> None:
    want = truth(np.random.default_rng(3), [2, 2])
    got = import_log(write_jsonl(tmp_path / "l.jsonl", records(want, {0: 5, 1: "x"})), date=DATE)
    assert got.meta["import"]["request_names"] == {"5": 0, "x": 1}
    assert got.request_ids.tolist() == [0, 1]


def test_alternative_default_field_names(tmp_path: Path) -> None:
    want = truth(np.random.default_rng(4), [3, 3], weights=True)
    recs = [{"req_id": r["request_id"], "layer_id": r["layer"], "position": r["token_idx"],
             "expert_ids": r["topk_ids"], "gate_weights": r["topk_weights"]} for r in records(want)]
    got = import_log(write_jsonl(tmp_path / "l.jsonl", recs), date=DATE)
    assert same(got, want)
    assert got.meta["import"]["fields"]["token"] == "position"


def test_explicit_field_names(tmp_path: Path) -> None:
    want = truth(np.random.default_rng(5), [3, 2], weights=False)
    recs = [{"pid": r["request_id"], "L": r["layer"], "i": r["token_idx"], "sel": r["topk_ids"],
             "topk_weights": [0.5, 0.5]} for r in records(want)]
    with pytest.warns(LogFieldWarning, match=r"\['topk_weights'\] hold lists of 2 numbers but are not read"):
        got = import_log(write_jsonl(tmp_path / "l.jsonl", recs), "jsonl", request_field="pid", layer_field="L",
                         token_field="i", experts_field="sel", weights_field="", date=DATE)
    assert same(got, want)
    assert got.gate_weights is None and got.meta["import"]["fields"]["weights"] is None


def test_no_weights(tmp_path: Path) -> None:
    want = truth(np.random.default_rng(6), [2, 5], weights=False)
    got = import_log(write_jsonl(tmp_path / "l.jsonl", records(want)), date=DATE)
    assert same(got, want) and got.gate_weights is None


def test_gzip_input(tmp_path: Path) -> None:
    want = truth(np.random.default_rng(7), [3])
    path = tmp_path / "l.jsonl.gz"
    with gzip.open(path, "wt") as f:
        f.writelines(json.dumps(r) + "\n" for r in records(want))
    assert same(import_log(path, date=DATE), want)


def test_blank_lines_are_skipped(tmp_path: Path) -> None:
    want = truth(np.random.default_rng(8), [2])
    path = tmp_path / "l.jsonl"
    path.write_text("\n".join(json.dumps(r) + "\n" for r in records(want)) + "\n   \n")
    assert same(import_log(path, date=DATE), want)


# --------------------------------------------------------------------------- weights and shape
def test_ids_ordered_by_gate_weight_descending_stable(tmp_path: Path) -> None:
    recs = []
    for layer in (0, 1):
        recs.append({"layer": layer, "token_idx": 0, "topk_ids": [1, 2, 3], "topk_weights": [0.2, 0.5, 0.2]})
        recs.append({"layer": layer, "token_idx": 1, "topk_ids": [4, 0, 6], "topk_weights": [0.6, 0.3, 0.1]})
    got = import_log(write_jsonl(tmp_path / "l.jsonl", recs), date=DATE)
    assert got.expert_ids[0, 0, 0].tolist() == [2, 1, 3]  # tie 0.2/0.2 keeps the logged order
    assert got.gate_weights[0, 0, 0].tolist() == pytest.approx([0.5, 0.2, 0.2])
    assert got.expert_ids[0, 1, 1].tolist() == [4, 0, 6]
    assert got.meta["import"]["weights_reordered_rows"] == 2


def test_shape_inferred_from_data(tmp_path: Path) -> None:
    want = truth(np.random.default_rng(9), [3, 3], moe=(1, 3, 4), E=6, k=3)
    got = import_log(write_jsonl(tmp_path / "l.jsonl", records(want)), date=DATE)
    s = got.shape
    assert s.moe_layers == (1, 3, 4) and s.num_layers == 5 and s.top_k == 3
    assert s.num_experts == int(want.expert_ids.max()) + 1


def test_shape_given_explicitly(tmp_path: Path) -> None:
    want = truth(np.random.default_rng(10), [3, 2], moe=(1, 3), num_layers=6, E=64, k=2)
    object.__setattr__(want.shape, "name", "mixtral-ish")
    src = write_jsonl(tmp_path / "l.jsonl", records(want))
    got = import_log(src, num_experts=64, top_k=2, num_layers=6, moe_layers=(1, 3), model_name="mixtral-ish",
                     date=DATE)
    assert same(got, want)
    assert got.meta["import"]["shape_inferred"] == []


def test_shared_experts(tmp_path: Path) -> None:
    want = truth(np.random.default_rng(10), [2])
    got = import_log(write_jsonl(tmp_path / "l.jsonl", records(want)), num_shared_experts=2, date=DATE)
    assert got.shape.num_shared_experts == 2


def test_parse_layers() -> None:
    assert parse_layers("1-3,7, 5") == (1, 2, 3, 5, 7)
    assert parse_layers("0") == (0,)
    with pytest.raises(TraceError, match="--moe-layers"):
        parse_layers("1-x")


# --------------------------------------------------------------------------- phase
def test_prefill_tokens(tmp_path: Path) -> None:
    want = truth(np.random.default_rng(11), [5, 2], prefill=3)
    got = import_log(write_jsonl(tmp_path / "l.jsonl", records(want)), prefill_tokens=3, date=DATE)
    assert same(got, want)
    assert got.step[0].tolist() == [0, 0, 0, 1, 2] and got.step[1].tolist() == [0, 0, -1, -1, -1]
    assert got.meta["import"]["phase_from"] == "prefill_tokens"


def test_phase_field(tmp_path: Path) -> None:
    want = truth(np.random.default_rng(12), [4, 3], prefill=2)
    recs = records(want)
    for r in recs:
        r["phase"] = "PREFILL" if r["token_idx"] < 2 else "decode"
    got = import_log(write_jsonl(tmp_path / "l.jsonl", recs), date=DATE)
    assert same(got, want)
    assert got.meta["import"]["phase_from"] == "field" and got.meta["import"]["fields"]["phase"] == "phase"


def test_prefill_tokens_override_a_default_phase_field(tmp_path: Path) -> None:
    want = truth(np.random.default_rng(13), [4], prefill=1)
    recs = records(want)
    for r in recs:
        r["phase"] = "garbage"
    got = import_log(write_jsonl(tmp_path / "l.jsonl", recs), prefill_tokens=1, date=DATE)
    assert same(got, want)


# --------------------------------------------------------------------------- CSV
@pytest.mark.parametrize("style", ["json", "space", "semi"])
@pytest.mark.parametrize("grouping", ["token", "layer"])
def test_csv(tmp_path: Path, style: str, grouping: str) -> None:
    want = truth(np.random.default_rng(14), [4, 2, 3], moe=(0, 2, 3), request_ids=[1, 2, 5], prefill=1)
    recs = records(want)
    if grouping == "layer":
        recs = by_layer(recs)
    got = import_log(write_csv(tmp_path / "l.csv", recs, style), "csv", prefill_tokens=1, date=DATE)
    assert same(got, want)
    assert got.meta["import"]["format"] == "csv"


def test_csv_string_request_ids_and_extra_columns(tmp_path: Path) -> None:
    want = truth(np.random.default_rng(15), [2, 3])
    recs = [dict(r, note="x, y") for r in records(want, {0: "p-1", 1: "p-0"})]
    got = import_log(write_csv(tmp_path / "l.csv", recs), date=DATE)
    assert same(got, want)
    assert got.meta["import"]["request_names"] == {"p-1": 0, "p-0": 1}


def test_csv_numeric_text_request_ids_are_ints(tmp_path: Path) -> None:
    want = truth(np.random.default_rng(16), [2, 2], request_ids=[4, 12])
    got = import_log(write_csv(tmp_path / "l.csv", records(want)), date=DATE)
    assert same(got, want) and "request_names" not in got.meta["import"]


# --------------------------------------------------------------------------- directories
def test_directory_one_request_per_file(tmp_path: Path) -> None:
    want = truth(np.random.default_rng(17), [3, 4, 2])
    per = [want.select_requests([r]) for r in range(3)]
    d = tmp_path / "logs"
    # natural order: req1 < req2 < req10 (a plain string sort would put req10 second)
    for name, t in zip(["req1.jsonl", "req2.jsonl", "req10.jsonl"], per):
        write_jsonl(d / name, by_layer(records(t, request=False)))
    (d / "README.md").write_text("not a log")
    write_jsonl(d / ".hidden.jsonl", [{"junk": 1}])
    got = import_log(d, date=DATE)
    assert same(got, want)
    imp = got.meta["import"]
    assert imp["files"] == ["req1.jsonl", "req2.jsonl", "req10.jsonl"]
    assert imp["request_names"] == {"req1.jsonl": 0, "req2.jsonl": 1, "req10.jsonl": 2}
    assert imp["request_names_from"] == "file" and imp["fields"]["request"] is None


def test_directory_csv_one_request_per_file(tmp_path: Path) -> None:
    want = truth(np.random.default_rng(18), [2, 3])
    for r in range(2):
        write_csv(tmp_path / "d" / f"r{r}.csv", records(want.select_requests([r]), request=False), "space")
    assert same(import_log(tmp_path / "d", date=DATE), want)


def test_directory_request_field_ignored_on_request(tmp_path: Path) -> None:
    want = truth(np.random.default_rng(19), [2, 2])
    for r in range(2):
        recs = [dict(x, request_id=0) for x in records(want.select_requests([r]))]  # every file says request 0
        write_jsonl(tmp_path / "d" / f"{r}.jsonl", recs)
    assert same(import_log(tmp_path / "d", request_field="", date=DATE), want)


def test_directory_files_split_by_layer(tmp_path: Path) -> None:
    want = truth(np.random.default_rng(20), [3, 2], moe=(0, 1), request_ids=[8, 9])
    recs = records(want)
    for layer in (0, 1):
        write_jsonl(tmp_path / "d" / f"layer{layer}.jsonl", [r for r in recs if r["layer"] == layer])
    got = import_log(tmp_path / "d", date=DATE)
    assert same(got, want)
    assert got.meta["import"]["files"] == ["layer0.jsonl", "layer1.jsonl"]


def test_directory_nested_and_deterministic(tmp_path: Path) -> None:
    want = truth(np.random.default_rng(21), [2, 2, 2])
    for r, name in enumerate(["a/x.jsonl", "a/y.jsonl", "b.jsonl"]):
        write_jsonl(tmp_path / "d" / name, records(want.select_requests([r]), request=False))
    a = import_log(tmp_path / "d", date=DATE)
    b = import_log(tmp_path / "d", date=DATE)
    assert a.equals(b) and same(a, want)
    assert a.meta["import"]["files"] == ["a/x.jsonl", "a/y.jsonl", "b.jsonl"]


# --------------------------------------------------------------------------- real logs as shipped
CASES = Path(__file__).resolve().parent / "data" / "logs"  # written by make_cases.py


def canonical() -> Trace:
    return import_log(CASES / "canonical.jsonl", date=DATE)


def test_case_request_ids_restarting_in_each_file(tmp_path: Path) -> None:
    with pytest.raises(TraceError, match=r"logged twice .*--request-scope file"):
        import_log(CASES / "restart-ids")
    got = import_log(CASES / "restart-ids", request_scope="file", date=DATE)
    assert same(got, canonical())  # ranks' requests get ids 0..3 by first appearance
    imp = got.meta["import"]
    assert imp["request_names"] == {"rank0.jsonl:0": 0, "rank0.jsonl:1": 1, "rank1.jsonl:0": 2, "rank1.jsonl:1": 3}
    assert imp["request_scope"] == "file" and imp["request_names_from"] == "file:field"


def test_case_layer_grouped_csv_without_positions() -> None:
    with pytest.raises(TraceError, match="field for token missing.*--token-field ''"):
        import_log(CASES / "layer-grouped.csv")
    got = import_log(CASES / "layer-grouped.csv", token_field="", date=DATE)
    assert same(got, canonical())
    assert got.meta["import"]["fields"]["token"] is None
    assert got.meta["import"]["positions_from"] == "row order within (request, layer)"


@given(seed=st.integers(0, 2**32 - 1), grouping=st.sampled_from(["token", "layer", "shuffled layers"]))
def test_positions_from_row_order_any_grouping(tmp_path_factory: pytest.TempPathFactory, seed: int,
                                               grouping: str) -> None:
    """Rows grouped by token, by layer, or interleaved across layers: only the order of a request's
    rows within one layer carries the position."""
    rng = np.random.default_rng(seed)
    want = truth(rng, list(rng.integers(1, 6, size=3)))
    recs = records(want)
    if grouping == "layer":
        recs = by_layer(recs)
    elif grouping == "shuffled layers":  # a random interleaving that keeps each (request, layer)'s order
        lanes = {}
        for r in recs:
            lanes.setdefault((r["request_id"], r["layer"]), []).append(r)
        keys = [key for key, lane in lanes.items() for _ in lane]
        rng.shuffle(keys)
        recs = [lanes[key].pop(0) for key in keys]
    for r in recs:
        del r["token_idx"]
    path = write_jsonl(tmp_path_factory.mktemp("rows") / "l.jsonl", recs)
    assert same(import_log(path, token_field="", date=DATE), want)


def test_case_directory_with_other_jsonl_files() -> None:
    with pytest.raises(TraceError, match="config.jsonl: line 1: field for layer missing"):
        import_log(CASES / "mixed")
    got = import_log(CASES / "mixed", include=["routing_*.jsonl"], date=DATE)
    assert same(got, canonical())
    assert got.meta["import"]["files"] == ["routing_0.jsonl", "routing_1.jsonl"]
    assert got.meta["import"]["include"] == ["routing_*.jsonl"]
    with pytest.raises(TraceError, match="no log file in this directory matches --include nothing_\\*"):
        import_log(CASES / "mixed", include=["nothing_*"])
    with pytest.raises(TraceError, match="--include selects files of a directory"):
        import_log(CASES / "canonical.jsonl", include=["*.jsonl"])


def test_include_glob_with_a_slash_matches_the_relative_path(tmp_path: Path) -> None:
    want = truth(np.random.default_rng(30), [2, 2])
    write_jsonl(tmp_path / "d" / "rank0" / "a.jsonl", records(want))
    write_jsonl(tmp_path / "d" / "rank1" / "a.jsonl", [{"other": 1}])
    got = import_log(tmp_path / "d", include=["rank0/*"], date=DATE)
    assert same(got, want) and got.meta["import"]["files"] == ["rank0/a.jsonl"]


def test_case_weights_under_another_name_found_by_role() -> None:
    with pytest.warns(LogFieldWarning) as rec:
        got = import_log(CASES / "renamed-weights.jsonl", date=DATE)
    assert same(got, canonical())  # the gate weights came from 'probs'
    msgs = [str(w.message) for w in rec]
    assert any("gate weights read from field 'probs'" in m for m in msgs), msgs
    assert any("['draft_ids'] hold lists of 2 numbers but are not read" in m for m in msgs), msgs
    imp = got.meta["import"]
    assert imp["fields"]["weights"] == "probs" and imp["fields_found_by_role"] == ["weights"]
    assert imp["fields_unused"] == ["draft_ids"]
    # named explicitly: no guess (the unread list field is still reported)
    with pytest.warns(LogFieldWarning, match="draft_ids"):
        named = import_log(CASES / "renamed-weights.jsonl", weights_field="probs", date=DATE)
    assert same(named, canonical()) and "fields_found_by_role" not in named.meta["import"]


@pytest.mark.parametrize(("first", "found"), [
    ({"w": [0.6, 0.4]}, "w"),
    ({"w": [1, 0]}, None),  # integers: more likely ids than weights
    ({"w": [0.6, 1.4]}, None),  # outside [0, 1]
    ({"w": [0.6, 0.3, 0.1]}, None),  # not of width k
    ({"a": [2, 1], "w": [0.6, 0.4]}, "w"),
])
def test_weights_role_rule(tmp_path: Path, first: dict[str, Any], found: str | None) -> None:
    recs = [{"layer": 0, "token_idx": t, "topk_ids": [1, 2], **first} for t in range(2)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LogFieldWarning)
        got = import_log(write_jsonl(tmp_path / "l.jsonl", recs), date=DATE)
    assert got.meta["import"]["fields"]["weights"] == found


def test_case_prefill_only_log(capsys: pytest.CaptureFixture[str]) -> None:
    got = import_log(CASES / "prefill-only.jsonl", date=DATE)
    assert (got.phase[got.valid_mask()] == PREFILL).all() and got.meta["import"]["phase_from"] == "field"


# --------------------------------------------------------------------------- ragged logs
@given(
    lengths=st.lists(st.integers(1, 7), min_size=1, max_size=4),
    M=st.integers(1, 4),
    k=st.integers(1, 3),
    prefill=st.integers(0, 3),
    drop_p=st.sampled_from([0.0, 0.02, 0.1, 0.3]),
    seed=st.integers(0, 2**32 - 1),
    fmt=st.sampled_from(["jsonl", "csv"]),
)
def test_ragged_logs_truncate_to_complete_prefix(
    tmp_path_factory: pytest.TempPathFactory, lengths: list[int], M: int, k: int, prefill: int, drop_p: float,
    seed: int, fmt: str,
) -> None:
    rng = np.random.default_rng(seed)
    moe = tuple(sorted(rng.choice(6, M, replace=False).tolist()))
    want = truth(rng, lengths, moe=moe, num_layers=6, E=k + 5, k=k, prefill=prefill,
                 request_ids=sorted(rng.choice(100, len(lengths), replace=False).tolist()))
    recs = records(want)
    drop = rng.random(len(recs)) < drop_p
    kept = [recs[i] for i in rng.permutation(len(recs)) if not drop[i]]
    # ground truth: per request, of the tokens logged in at least one layer (a token logged in no
    # layer is invisible: a position gap), those before the first one missing in some layer
    R = len(lengths)
    keep: list[list[int]] = []
    gaps = 0
    for r in range(R):
        rows = drop[sum(lengths[:r]) * M: sum(lengths[: r + 1]) * M].reshape(lengths[r], M)
        visible = np.flatnonzero(~rows.all(axis=1))
        bad = np.flatnonzero(rows[visible].any(axis=1))
        keep.append(visible[: bad[0] if len(bad) else len(visible)].tolist())
        gaps += int((np.diff(keep[-1]) > 1).sum())
    n_dropped = len(kept) - sum(map(len, keep)) * M
    path = tmp_path_factory.mktemp("rag") / f"log.{fmt}"
    (write_jsonl if fmt == "jsonl" else write_csv)(path, kept)
    kw: dict[str, Any] = dict(num_experts=k + 5, num_layers=6, moe_layers=moe, prefill_tokens=prefill, date=DATE)
    if not any(keep):
        with pytest.raises(TraceError) as ei:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                import_log(path, **kw)
        assert "no request has a token" in str(ei.value) or "empty source" in str(ei.value)
        return
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = import_log(path, **kw)
    msgs = [str(w.message) for w in caught if issubclass(w.category, RaggedLogWarning)]
    assert any("ragged log" in m for m in msgs) == (n_dropped > 0)
    assert any("gap(s)" in m for m in msgs) == (gaps > 0)
    exp = subset(want, keep, prefill)
    assert same(got, exp)
    imp = got.meta["import"]
    assert imp["dropped_rows"] == n_dropped
    assert imp["rows_read"] == len(kept)
    assert imp["rows_read"] - imp["dropped_rows"] == got.num_rows  # rows never logged are not "dropped"
    if n_dropped:
        assert sum(imp["dropped_rows_by_request"].values()) == n_dropped
    assert imp["position_gaps"] == gaps
    empty = [str(want.request_ids[r]) for r in range(R) if not keep[r] and not drop[
        sum(lengths[:r]) * M: sum(lengths[: r + 1]) * M].all()]
    assert imp.get("dropped_requests", []) == empty


def test_ragged_example_counts_rows_present_but_dropped(tmp_path: Path) -> None:
    """dropped_rows counts rows read from the log and left out of the trace."""
    want = truth(np.random.default_rng(22), [5, 3], moe=(0, 1, 2))
    recs = [r for r in records(want) if not (r["request_id"] == 0 and r["layer"] == 2 and r["token_idx"] >= 3)]
    with pytest.warns(RaggedLogWarning, match="ragged log: 4 of 22 rows dropped"):
        got = import_log(write_jsonl(tmp_path / "l.jsonl", recs), date=DATE)
    assert got.lengths.tolist() == [3, 3]
    assert got.meta["import"]["dropped_rows"] == 4  # tokens 3, 4 of request 0 in layers 0 and 1
    assert got.meta["import"]["dropped_rows_by_request"] == {"0": 4}
    assert same(got, truncate(want, [3, 3]))


def test_token_missing_from_every_layer_is_a_position_gap(tmp_path: Path) -> None:
    want = truth(np.random.default_rng(26), [5], moe=(0, 1))
    recs = [r for r in records(want) if r["token_idx"] != 2]
    with pytest.warns(RaggedLogWarning, match="1 gap"):
        got = import_log(write_jsonl(tmp_path / "l.jsonl", recs), prefill_tokens=1, date=DATE)
    assert got.position[0].tolist() == [0, 1, 3, 4]
    assert got.step[0].tolist() == [0, 1, 2, 3]
    assert got.meta["import"]["position_gaps"] == 1 and got.meta["import"]["dropped_rows"] == 0


def subset(t: Trace, keep: list[list[int]], prefill: int) -> Trace:
    """The requests' tokens at indices ``keep[r]`` (requests with none left out), steps renumbered."""
    live = [r for r in range(t.num_requests) if keep[r]]
    R, T, M, k = len(live), max(map(len, keep)), t.shape.num_moe_layers, t.shape.top_k
    arr = empty_arrays(R, T, M, k)
    gw = None if t.gate_weights is None else np.full((R, T, M, k), np.nan, np.float32)
    for i, r in enumerate(live):
        idx = np.asarray(keep[r])
        n = len(idx)
        arr["position"][i, :n] = t.position[r, idx]
        arr["expert_ids"][i, :n] = t.expert_ids[r, idx]
        arr["phase"][i, :n] = np.where(np.arange(n) < prefill, PREFILL, DECODE)
        arr["step"][i, :n] = np.maximum(np.arange(n) - prefill + 1, 0)
        if gw is not None:
            gw[i, :n] = t.gate_weights[r, idx]
    return Trace(shape=t.shape, request_ids=t.request_ids[live].copy(),
                 lengths=np.asarray([len(keep[r]) for r in live], np.int32), gate_weights=gw, **arr)


def truncate(t: Trace, keep: list[int]) -> Trace:
    out = t.select_requests(range(t.num_requests))
    for i, n in enumerate(keep):
        out.lengths[i] = n
        for name in ("position", "step", "phase"):
            getattr(out, name)[i, n:] = -1
        out.expert_ids[i, n:] = -1
        if out.gate_weights is not None:
            out.gate_weights[i, n:] = np.nan
    return out.select_requests(range(t.num_requests))


# --------------------------------------------------------------------------- errors
def base_recs() -> list[dict[str, Any]]:
    return records(truth(np.random.default_rng(23), [3, 2], moe=(0, 1)))  # 10 records; line = index + 1


def err(tmp_path: Path, recs: list[Any] | str, *parts: str, fmt: str = "jsonl", **kw: Any) -> str:
    """Import a log that must fail; the message must name the file and every part."""
    path = tmp_path / f"bad.{fmt}"
    if isinstance(recs, str):
        path.write_text(recs)
    elif fmt == "jsonl":
        path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in recs))
    else:
        write_csv(path, recs)
    with pytest.raises(TraceError) as ei:
        import_log(path, fmt, **kw)
    msg = str(ei.value)
    assert str(path) in msg, msg
    for p in parts:
        assert p in msg, f"{p!r} not in {msg!r}"
    return msg


def test_error_unparseable_line(tmp_path: Path) -> None:
    recs: list[Any] = base_recs()
    recs[2] = '{"layer": 0, "token_idx": '
    err(tmp_path, recs, "line 3", "not valid JSON")


def test_error_line_not_an_object(tmp_path: Path) -> None:
    recs: list[Any] = base_recs()
    recs[1] = "[1, 2]"
    err(tmp_path, recs, "line 2", "expected a JSON object")


@pytest.mark.parametrize("fld", ["layer", "token_idx", "topk_ids", "topk_weights", "request_id"])
def test_error_missing_field(tmp_path: Path, fld: str) -> None:
    recs = base_recs()
    del recs[4][fld]
    err(tmp_path, recs, "line 5", f"'{fld}'", "missing")


def test_error_no_candidate_field(tmp_path: Path) -> None:
    recs = [{k if k != "topk_ids" else "chosen": v for k, v in r.items()} for r in base_recs()]
    err(tmp_path, recs, "line 1", "experts", "topk_ids", "--experts-field")


@pytest.mark.parametrize("bad", [[1, "x"], [1, 2.5], [True, 2], "1 2", [[1], [2]]])
def test_error_non_integer_id(tmp_path: Path, bad: Any) -> None:
    recs = base_recs()
    recs[6]["topk_ids"] = bad
    err(tmp_path, recs, "line 7", "'topk_ids'")


@pytest.mark.parametrize("fld,bad", [("layer", "1"), ("layer", 1.0), ("token_idx", None), ("token_idx", False)])
def test_error_non_integer_layer_or_token(tmp_path: Path, fld: str, bad: Any) -> None:
    recs = base_recs()
    recs[3][fld] = bad
    err(tmp_path, recs, "line 4", f"'{fld}'", "not an integer")


def test_error_negative_token(tmp_path: Path) -> None:
    recs = base_recs()
    recs[8]["token_idx"] = -1
    err(tmp_path, recs, "line 9", "'token_idx'", "out of range")


def test_error_wrong_number_of_ids(tmp_path: Path) -> None:
    recs = base_recs()
    recs[5]["topk_ids"] = [1, 2, 3]
    err(tmp_path, recs, "line 6", "'topk_ids'", "has 3 entries, expected 2")


def test_error_ids_do_not_match_top_k(tmp_path: Path) -> None:
    err(tmp_path, base_recs(), "line 1", "'topk_ids'", "--top-k 3", top_k=3)


def test_error_empty_id_list(tmp_path: Path) -> None:
    recs = [dict(r, topk_ids=[]) for r in base_recs()]
    del recs[0]["topk_weights"]
    err(tmp_path, [{k: v for k, v in r.items() if k != "topk_weights"} for r in recs], "line 1", "'topk_ids'", "empty")


def test_error_weights_width(tmp_path: Path) -> None:
    recs = base_recs()
    recs[7]["topk_weights"] = [0.5]
    err(tmp_path, recs, "line 8", "'topk_weights'", "has 1 entries")


def test_error_weight_not_a_number(tmp_path: Path) -> None:
    recs = base_recs()
    recs[2]["topk_weights"] = [0.5, "a"]
    err(tmp_path, recs, "line 3", "'topk_weights'")


def test_error_non_finite_weight(tmp_path: Path) -> None:
    recs: list[Any] = base_recs()
    recs[4] = json.dumps(dict(recs[4], topk_weights=[float("nan"), 0.1]))  # Python's json writes NaN
    err(tmp_path, recs, "line 5", "'topk_weights'", "non-finite")


def test_error_negative_id(tmp_path: Path) -> None:
    recs = base_recs()
    recs[1]["topk_ids"] = [-1, 3]
    err(tmp_path, recs, "line 2", "'topk_ids'", "out of range")


def test_error_id_beyond_num_experts(tmp_path: Path) -> None:
    recs = base_recs()
    recs[9]["topk_ids"] = [7, 8]
    err(tmp_path, recs, "line 10", "'topk_ids'", "out of range [0, 8)", num_experts=8)


def test_error_duplicate_ids(tmp_path: Path) -> None:
    recs = base_recs()
    recs[3]["topk_ids"] = [4, 4]
    err(tmp_path, recs, "line 4", "'topk_ids'", "duplicate")


def test_error_record_logged_twice(tmp_path: Path) -> None:
    recs = base_recs()
    recs.append(dict(recs[2]))
    err(tmp_path, recs, "line 11", "'layer'", "logged twice", "line 3")


def test_error_layer_not_moe(tmp_path: Path) -> None:
    err(tmp_path, base_recs(), "line 2", "'layer'", "not one of the given MoE layers [0]", moe_layers=(0,))


def test_error_layer_beyond_num_layers(tmp_path: Path) -> None:
    err(tmp_path, base_recs(), "line 2", "'layer'", "--num-layers 1", num_layers=1)


def test_error_too_many_experts_for_int16(tmp_path: Path) -> None:
    err(tmp_path, base_recs(), "int16", num_experts=40000)


@pytest.mark.parametrize("bad", [1.5, [1], None, True])
def test_error_bad_request_id(tmp_path: Path, bad: Any) -> None:
    recs = base_recs()
    recs[5]["request_id"] = bad
    recs[0]["request_id"] = "named"  # not all ints: a name is expected everywhere
    err(tmp_path, recs, "line 6", "'request_id'")


def test_error_bad_phase(tmp_path: Path) -> None:
    recs = [dict(r, phase="decode") for r in base_recs()]
    recs[6]["phase"] = "warmup"
    err(tmp_path, recs, "line 7", "'phase'", "warmup")


def test_error_phase_differs_between_layers(tmp_path: Path) -> None:
    recs = [dict(r, phase="decode") for r in base_recs()]
    recs[1]["phase"] = "prefill"  # request 0 token 0, layer 1; layer 0 (line 1) says decode
    err(tmp_path, recs, "line 2", "'phase'", "differs")


def test_error_prefill_after_decode(tmp_path: Path) -> None:
    recs = [dict(r, phase="decode" if r["token_idx"] == 0 else "prefill") for r in base_recs()]
    err(tmp_path, recs, "line 3", "'phase'", "prefill token follows a decode token")


def test_error_phase_field_and_prefill_tokens(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "l.jsonl", base_recs())
    with pytest.raises(TraceError, match="not both"):
        import_log(path, phase_field="phase", prefill_tokens=1)
    with pytest.raises(TraceError, match="prefill-tokens"):
        import_log(path, prefill_tokens=-1)


def test_error_all_rows_dropped(tmp_path: Path) -> None:
    recs = base_recs()
    recs.append({"request_id": 0, "layer": 5, "token_idx": 1, "topk_ids": [0, 1], "topk_weights": [0.6, 0.4]})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        err(tmp_path, recs, "no request has a token", "[0, 1, 5]")


def test_error_empty_file(tmp_path: Path) -> None:
    err(tmp_path, "\n\n", "empty source")


def test_error_empty_csv(tmp_path: Path) -> None:
    err(tmp_path, "", "empty source", fmt="csv")
    err(tmp_path, "layer,token_idx,topk_ids\n", "empty source", fmt="csv")


def test_error_empty_directory(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "notes.txt").write_text("x")
    for fmt in (None, "jsonl", "csv"):
        with pytest.raises(TraceError, match="empty source") as ei:
            import_log(tmp_path / "d", fmt)
        assert str(tmp_path / "d") in str(ei.value)


def test_error_no_such_source(tmp_path: Path) -> None:
    with pytest.raises(TraceError, match="no such file"):
        import_log(tmp_path / "nope.jsonl")


def test_error_unknown_extension_without_format(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "log.txt", base_recs())
    with pytest.raises(TraceError, match="--format"):
        import_log(path)
    assert import_log(path, "jsonl").num_requests == 2


def test_error_mixed_directory(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "d" / "a.jsonl", base_recs())
    write_csv(tmp_path / "d" / "b.csv", base_recs())
    with pytest.raises(TraceError, match="both csv and jsonl"):
        import_log(tmp_path / "d")
    assert import_log(tmp_path / "d", "csv").num_requests == 2


def test_error_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b'{"layer": 0}\n\xff\xfe\n')
    with pytest.raises(TraceError, match="UTF-8") as ei:
        import_log(path)
    assert str(path) in str(ei.value)


def test_error_csv_bad_list(tmp_path: Path) -> None:
    text = "request_id,layer,token_idx,topk_ids\n0,0,0,\"[1, 2]\"\n0,1,0,\"[3, x]\"\n"
    err(tmp_path, text, "line 3", "'topk_ids'", "not a list of integers", fmt="csv")


def test_error_csv_non_integer_layer(tmp_path: Path) -> None:
    text = "request_id,layer,token_idx,topk_ids\n0,0,0,1 2\n0,one,0,1 2\n"
    err(tmp_path, text, "line 3", "'layer'", "not an integer", fmt="csv")


def test_error_csv_short_row(tmp_path: Path) -> None:
    text = "request_id,layer,token_idx,topk_ids\n0,0,0,1 2\n0,1\n"
    err(tmp_path, text, "line 3", "'token_idx'", "missing", fmt="csv")


def test_error_csv_missing_named_column(tmp_path: Path) -> None:
    text = "request_id,layer,token_idx,topk_ids\n0,0,0,1 2\n"
    err(tmp_path, text, "line 1", "'topk_weights'", "header", fmt="csv", weights_field="topk_weights")


def test_error_csv_bad_weight(tmp_path: Path) -> None:
    text = "layer,token_idx,topk_ids,topk_weights\n0,0,1 2,0.5 0.5\n1,0,1 2,0.5 abc\n"
    err(tmp_path, text, "line 3", "'topk_weights'", "not a list of numbers", fmt="csv")


# --------------------------------------------------------------------------- CLI
@pytest.fixture
def cli(monkeypatch: pytest.MonkeyPatch) -> Callable[[list[str]], int]:
    """traces.__main__.main; sibling subcommands not written yet are stubbed so the parser builds."""
    for name in ("stats", "synth"):
        try:
            importlib.import_module(f"traces.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"traces.{name}":
                raise
            stub = types.ModuleType(f"traces.{name}")
            stub.add_arguments = lambda p: None  # type: ignore[attr-defined]
            stub.run = lambda a: 0  # type: ignore[attr-defined]
            monkeypatch.setitem(sys.modules, f"traces.{name}", stub)
    from traces.__main__ import main

    return main


def test_cli_import(tmp_path: Path, cli: Callable[[list[str]], int], capsys: pytest.CaptureFixture[str]) -> None:
    want = truth(np.random.default_rng(24), [4, 3], moe=(1, 2), num_layers=4, E=16, prefill=2)
    object.__setattr__(want.shape, "name", "m")
    src = write_csv(tmp_path / "log.csv", by_layer(records(want)), "semi")
    out = tmp_path / "out" / "t.parquet"
    rc = cli(["import", str(src), "-o", str(out), "--format", "csv", "--prefill-tokens", "2",
              "--num-experts", "16", "--num-layers", "4", "--moe-layers", "1-2", "--model-name", "m"])
    assert rc == 0
    got = read_trace(out)
    assert same(got, want)
    assert got.meta["import"]["format"] == "csv"
    stdout = capsys.readouterr().out
    assert str(out) in stdout and "2 requests" in stdout and "0 dropped" in stdout


def test_cli_field_options(tmp_path: Path, cli: Callable[[list[str]], int]) -> None:
    want = truth(np.random.default_rng(25), [2, 2], weights=True)
    recs = [{"q": r["request_id"], "l": r["layer"], "t": r["token_idx"], "e": r["topk_ids"], "w": r["topk_weights"]}
            for r in records(want)]
    src = write_jsonl(tmp_path / "log.ndjson", recs)
    out = tmp_path / "t.parquet"
    assert cli(["import", str(src), "-o", str(out), "--request-field", "q", "--layer-field", "l",
                "--token-field", "t", "--experts-field", "e", "--weights-field", "w"]) == 0
    assert same(read_trace(out), want)


def test_cli_ragged_warns_on_stderr(tmp_path: Path, cli: Callable[[list[str]], int],
                                    capsys: pytest.CaptureFixture[str]) -> None:
    recs = base_recs()[:-1]  # request 1 loses its last token in layer 1
    src = write_jsonl(tmp_path / "log.jsonl", recs)
    assert cli(["import", str(src), "-o", str(tmp_path / "t.parquet")]) == 0
    cap = capsys.readouterr()
    assert "warning:" in cap.err and "ragged log: 1 of 9 rows dropped" in cap.err
    assert "(1 dropped)" in cap.out
    assert read_trace(tmp_path / "t.parquet").meta["import"]["dropped_rows"] == 1


def test_cli_error_exit_code(tmp_path: Path, cli: Callable[[list[str]], int],
                             capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"layer": 0, "token_idx": 0, "topk_ids": [1, 1]}\n')
    out = tmp_path / "t.parquet"
    assert cli(["import", str(path), "-o", str(out)]) == 2
    err_text = capsys.readouterr().err
    assert err_text.startswith("error:") and str(path) in err_text and "line 1" in err_text
    assert not out.exists() and list(tmp_path.iterdir()) == [path]


def test_cli_real_log_options(tmp_path: Path, cli: Callable[[list[str]], int],
                              capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "t.parquet"
    assert cli(["import", str(CASES / "restart-ids"), "-o", str(out), "--request-scope", "file"]) == 0
    assert same(read_trace(out), canonical())
    assert cli(["import", str(CASES / "mixed"), "-o", str(out), "--include", "routing_*.jsonl"]) == 0
    assert cli(["import", str(CASES / "layer-grouped.csv"), "-o", str(out), "--token-field", ""]) == 0
    assert same(read_trace(out), canonical())
    capsys.readouterr()
    assert cli(["import", str(CASES / "renamed-weights.jsonl"), "-o", str(out)]) == 0
    err_text = capsys.readouterr().err
    assert "warning:" in err_text and "gate weights read from field 'probs'" in err_text and "draft_ids" in err_text


def test_cli_help_documents_defaults(cli: Callable[[list[str]], int], capsys: pytest.CaptureFixture[str]) -> None:
    assert cli(["import", "--help"]) == 0  # argparse's exit, mapped by traces.cli
    text = capsys.readouterr().out
    for role in ("request", "layer", "token", "experts", "weights"):
        assert f"--{role}-field" in text
        assert DEFAULT_FIELDS[role][0] in text
    for opt in ("--format", "--prefill-tokens", "--num-experts", "--top-k", "--num-layers", "--model-name",
                "--moe-layers", "dropped_rows", "--include", "--request-scope"):
        assert opt in text
