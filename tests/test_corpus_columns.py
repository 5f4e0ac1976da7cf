"""corpus/columns.py: one Arrow type per input column for the whole output, decided before any row is
scored (docs/design.md 2.2); reserved names refused. Runs go through `pear-data score` with tiny models."""

from __future__ import annotations

import datetime
import json
from decimal import Decimal

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pear_data.corpus import open_corpus

from .outputs import (
    FIELDS,
    data,
    gsm8k,
    manifest,
    output_bytes,
    rejects,
    score,
    write_jsonl,
)


def test_a_column_whose_type_differs_between_shards_is_json_text_in_every_row(capsys, tmp_path, tiny_model_dir):
    rows = gsm8k(4)
    for i, row in enumerate(rows):
        row["id"] = i if i < 2 else f"id-{i}"  # int in the first shard, str in the second
        row["score"] = 1 if i < 2 else 2.5  # int + float -> float
    corpus = write_jsonl(tmp_path / "mixed.jsonl", rows)
    code, text = score(capsys, corpus, tmp_path / "out", tiny_model_dir, *FIELDS, "--shard-rows", "2")
    assert code == 0, text
    table = data(tmp_path / "out")
    assert table.schema.field("id").type == pa.string()
    assert table.column("id").to_pylist() == ["0", "1", '"id-2"', '"id-3"']  # JSON text: 0 and "id-2" stay apart
    assert table.schema.field("score").type == pa.float64()
    assert table.column("score").to_pylist() == [1.0, 1.0, 2.5, 2.5]
    for file in sorted((tmp_path / "out" / "data").glob("*.parquet")):  # every shard has the one schema
        assert pq.read_schema(file).remove_metadata().equals(table.schema.remove_metadata())

    # inside one shard the same rule, the same column type and the same values
    code, text = score(capsys, corpus, tmp_path / "one", tiny_model_dir, *FIELDS, "--shard-rows", "10")
    assert code == 0, text
    assert data(tmp_path / "one").select(["id", "score"]).equals(table.select(["id", "score"]))


def test_a_resumed_run_decides_column_types_like_an_uninterrupted_one(capsys, tmp_path, tiny_model_dir, monkeypatch):
    rows = gsm8k(6)
    for i, row in enumerate(rows):
        row["id"] = i if i < 4 else f"id-{i}"
    corpus = write_jsonl(tmp_path / "mixed.jsonl", rows)
    args = (*FIELDS, "--shard-rows", "2", "--behavior-temperature", "0.7")
    code, text = score(capsys, corpus, tmp_path / "whole", tiny_model_dir, *args)
    assert code == 0, text

    from pear_data.output import ShardHandle

    commit = ShardHandle.commit

    def killed_after_two_shards(self, *a, **k):  # the run dies before its third shard commits
        if self.shard >= 2:
            raise RuntimeError("killed")
        return commit(self, *a, **k)

    monkeypatch.setattr(ShardHandle, "commit", killed_after_two_shards)
    code, text = score(capsys, corpus, tmp_path / "resumed", tiny_model_dir, *args)
    assert code == 1 and "killed" in text, text
    monkeypatch.setattr(ShardHandle, "commit", commit)
    code, text = score(capsys, corpus, tmp_path / "resumed", tiny_model_dir, *args, "--resume")
    assert code == 0, text
    assert output_bytes(tmp_path / "resumed") == output_bytes(tmp_path / "whole")
    assert data(tmp_path / "whole").column("id").to_pylist()[3:5] == ["3", '"id-4"']


def test_content_as_text_parts_in_one_shard_and_strings_in_another(capsys, tmp_path, tiny_model_dir):
    rows = []
    for i, row in enumerate(gsm8k(4)):
        content = row["answer"] if i < 2 else [{"type": "text", "text": row["answer"]}]
        rows.append({"messages": [{"role": "user", "content": row["question"]},
                                  {"role": "assistant", "content": content}]})
    corpus = write_jsonl(tmp_path / "parts.jsonl", rows)
    code, text = score(capsys, corpus, tmp_path / "out", tiny_model_dir, "--shard-rows", "2")
    assert code == 0, text
    table = data(tmp_path / "out")
    assert table.schema.field("messages").type == pa.string()  # str vs list of parts: JSON text, every row
    assert [json.loads(m) for m in table.column("messages").to_pylist()] == [r["messages"] for r in rows]
    assert manifest(tmp_path / "out")["rows"] == {"in": 4, "out": 4, "rejected": 0}


def test_parquet_shards_with_different_column_types(capsys, tmp_path, tiny_model_dir):
    rows = gsm8k(4)
    folder = tmp_path / "pq"
    folder.mkdir()
    a = pa.table({"question": [r["question"] for r in rows[:2]], "answer": [r["answer"] for r in rows[:2]],
                  "id": pa.array([1, 2], pa.int64()), "n": pa.array([1, 2], pa.int32())})
    b = pa.table({"question": [r["question"] for r in rows[2:]], "answer": [r["answer"] for r in rows[2:]],
                  "id": pa.array(["x", "y"]), "n": pa.array([3, 4], pa.int64())})
    pq.write_table(a, folder / "a.parquet")
    pq.write_table(b, folder / "b.parquet")
    code, text = score(capsys, folder, tmp_path / "out", tiny_model_dir, *FIELDS, "--shard-rows", "2")
    assert code == 0, text
    table = data(tmp_path / "out")
    assert table.schema.field("n").type == pa.int64()  # int32 + int64: promoted
    assert table.column("n").to_pylist() == [1, 2, 3, 4]
    assert table.schema.field("id").type == pa.string()  # int64 vs string: JSON text
    assert table.column("id").to_pylist() == ["1", "2", '"x"', '"y"']


def test_huge_integers_in_jsonl_columns(capsys, tmp_path, tiny_model_dir):
    rows = gsm8k(3)
    for row, big, signed in zip(rows, [2**63, 2**64 - 1, 7], [-1, 2**63, 3]):
        row["hash"] = big  # all >= 0 and < 2**64: uint64
        row["mixed"] = signed  # -1 with 2**63: no 64-bit integer type holds both: JSON text
        row["huge"] = 2**70 if big == 7 else 1  # beyond uint64: JSON text
    corpus = write_jsonl(tmp_path / "big.jsonl", rows)
    code, text = score(capsys, corpus, tmp_path / "out", tiny_model_dir, *FIELDS)
    assert code == 0, text
    table = data(tmp_path / "out")
    assert table.schema.field("hash").type == pa.uint64()
    assert table.column("hash").to_pylist() == [2**63, 2**64 - 1, 7]
    assert table.schema.field("mixed").type == pa.string()
    assert [json.loads(v) for v in table.column("mixed").to_pylist()] == [-1, 2**63, 3]
    assert [json.loads(v) for v in table.column("huge").to_pylist()] == [1, 1, 2**70]


def test_parquet_uint64_stays_uint64(capsys, tmp_path, tiny_model_dir):
    rows = gsm8k(2)
    table = pa.table({"question": [r["question"] for r in rows], "answer": [r["answer"] for r in rows],
                      "hash": pa.array([2**64 - 1, 2**63], pa.uint64())})
    pq.write_table(table, tmp_path / "in.parquet")
    code, text = score(capsys, tmp_path / "in.parquet", tmp_path / "out", tiny_model_dir, *FIELDS)
    assert code == 0, text
    out = data(tmp_path / "out")
    assert out.schema.field("hash").type == pa.uint64()
    assert out.column("hash").to_pylist() == [2**64 - 1, 2**63]


@pytest.mark.parametrize("column", ["row_index", "input_ids", "pear_seq_weight", "reject_reason", "source"])
def test_an_input_column_with_a_name_pear_data_writes_is_refused_up_front(capsys, tmp_path, tiny_model_dir, column):
    rows = gsm8k(3)
    rows[2][column] = 1  # only the last row has it: the whole corpus is looked at, not the first row
    corpus = write_jsonl(tmp_path / "reserved.jsonl", rows)
    code, text = score(capsys, corpus, tmp_path / "out", tiny_model_dir, *FIELDS)
    assert code == 2, text
    assert f"'{column}'" in text and "rename" in text
    assert not (tmp_path / "out").exists()  # refused before anything is written


def test_a_reserved_parquet_column_is_refused(capsys, tmp_path, tiny_model_dir):
    rows = gsm8k(2)
    pq.write_table(pa.table({"question": [r["question"] for r in rows], "answer": [r["answer"] for r in rows],
                             "completion_mask": [[0, 1], [0, 1]]}), tmp_path / "in.parquet")
    code, text = score(capsys, tmp_path / "in.parquet", tmp_path / "out", tiny_model_dir, *FIELDS)
    assert code == 2, text
    assert "'completion_mask'" in text


def test_parquet_column_types_are_kept_exactly(capsys, tmp_path, tiny_model_dir):
    rows = gsm8k(2)
    types = {
        "ts_ms": (pa.timestamp("ms"), [datetime.datetime(2020, 1, 1, 1, 2, 3, 4000), None]),
        "ts_tz": (pa.timestamp("us", tz="UTC"), [datetime.datetime(2020, 1, 1, tzinfo=datetime.timezone.utc)] * 2),
        "day": (pa.date32(), [datetime.date(2020, 1, 1), datetime.date(2021, 2, 3)]),
        "price": (pa.decimal128(7, 3), [Decimal("1.234"), Decimal("-9999.999")]),
        "tags": (pa.map_(pa.string(), pa.int64()), [[("a", 1)], []]),
        "small": (pa.int8(), [3, -4]),
        "hash": (pa.uint64(), [2**64 - 1, 0]),
        "bytes": (pa.binary(), [b"\xff\x00", b""]),
        "vec": (pa.list_(pa.float32(), 2), [[1.5, 2.0], [0.0, -1.0]]),
        "meta": (pa.struct([("k", pa.int16()), ("v", pa.large_string())]), [{"k": 1, "v": "x"}, None]),
    }
    columns = {"question": [r["question"] for r in rows], "answer": [r["answer"] for r in rows]}
    columns.update({name: pa.array(values, t) for name, (t, values) in types.items()})
    source = pa.table(columns)
    pq.write_table(source, tmp_path / "typed.parquet")
    code, text = score(capsys, tmp_path / "typed.parquet", tmp_path / "out", tiny_model_dir, *FIELDS)
    assert code == 0, text
    out = data(tmp_path / "out")
    for name, (t, _) in types.items():
        assert out.schema.field(name).type == t, name
        assert out.column(name).equals(source.column(name)), name


def test_input_columns_of_a_jsonl_corpus_are_decided_over_every_row(tmp_path):
    rows = [{"a": 1, "b": None, "c": [], "d": {"x": 1}},
            {"a": 2.5, "b": "s", "c": [1], "d": {"y": "z"}, "e": True}]
    columns = open_corpus(write_jsonl(tmp_path / "c.jsonl", rows)).columns()
    assert columns.schema.field("a").type == pa.float64()
    assert columns.schema.field("b").type == pa.string()
    assert columns.schema.field("c").type == pa.list_(pa.int64())
    assert columns.schema.field("d").type == pa.struct([("x", pa.int64()), ("y", pa.string())])
    assert columns.schema.field("e").type == pa.bool_()
    assert columns.schema.names == ["a", "b", "c", "d", "e"]
    assert columns.json == frozenset()


@pytest.mark.parametrize(("values", "kind"), [
    ([1, "1"], "json"), ([True, 1], "json"), ([{"a": 1}, "x"], "json"), ([[1], ["x"]], "json"),
    ([2**53 + 1, 0.5], "json"), ([2**53, 0.5], pa.float64()), ([{}], "json"), ([-1, 2**63], "json"),
    ([2**63, 1], pa.uint64()), ([None, None], pa.null()), ([[], []], pa.list_(pa.null())),
    ([{"a": [1]}, {"a": [2.5]}], pa.struct([("a", pa.list_(pa.float64()))])),
])
def test_jsonl_column_type_rules(tmp_path, values, kind):
    corpus = write_jsonl(tmp_path / "c.jsonl", [{"v": v} for v in values])
    columns = open_corpus(corpus).columns(chunk_rows=1)  # the same decision chunk by chunk ...
    assert columns == open_corpus(corpus).columns()  # ... as over all rows at once
    if kind == "json":
        assert columns.json == frozenset({"v"}) and columns.schema.field("v").type == pa.string()
    else:
        assert columns.json == frozenset() and columns.schema.field("v").type == kind
    from pear_data.corpus import records_table

    table = records_table([r.record for r in open_corpus(corpus).rows()], columns)
    assert table.schema == columns.schema
    if kind == "json":
        assert [json.loads(v) for v in table.column("v").to_pylist()] == values


def test_deeply_nested_values_are_rejects_or_json_text_never_a_crash(capsys, tmp_path, tiny_model_dir):
    rows = gsm8k(4)
    lines = [json.dumps(r) for r in rows]
    lines[1] = lines[1][:-1] + ', "deep": ' + "[" * 5000 + "]" * 5000 + "}"  # beyond json's recursion limit
    lines[2] = lines[2][:-1] + ', "deep": ' + "[" * 300 + "]" * 300 + "}"  # beyond MAX_NESTING
    lines[3] = lines[3][:-1] + ', "deep": ' + "[" * 40 + "1" + "]" * 40 + "}"  # Parquet readers refuse such schemas
    corpus = write_jsonl(tmp_path / "deep.jsonl", lines)
    code, text = score(capsys, corpus, tmp_path / "out", tiny_model_dir, *FIELDS)
    assert code == 0, text
    assert [(r["row_index"], "nested" in r["reject_reason"]) for r in rejects(tmp_path / "out")] == [(1, True),
                                                                                                   (2, True)]
    table = data(tmp_path / "out")  # readable: the 40-deep column is JSON text
    assert table.schema.field("deep").type == pa.string()
    assert json.loads(table.column("deep")[1].as_py()) == json.loads("[" * 40 + "1" + "]" * 40)


def test_parquet_values_python_cannot_hold_are_kept_exactly(capsys, tmp_path, tiny_model_dir):
    rows = gsm8k(2)
    year_10000 = 253402300800000000  # microseconds: beyond datetime.datetime
    source = pa.table({
        "question": [r["question"] for r in rows], "answer": [r["answer"] for r in rows],
        "when": pa.array([year_10000, 0], pa.timestamp("us")),
        "meta": pa.array([{"t": year_10000}, None], pa.struct([("t", pa.timestamp("us"))])),
    })
    pq.write_table(source, tmp_path / "far.parquet")
    code, text = score(capsys, tmp_path / "far.parquet", tmp_path / "out", tiny_model_dir, *FIELDS)
    assert code == 0, text
    out = data(tmp_path / "out")
    assert out.column("when").equals(source.column("when"))
    assert out.column("meta").equals(source.column("meta"))


def test_datasets_directory_columns_keep_their_arrow_types(tmp_path):
    datasets = pytest.importorskip("datasets")
    from pear_data.corpus import records_table

    source = pa.table({"question": ["q1", "q2"], "small": pa.array([1, -2], pa.int8()),
                       "hash": pa.array([2**64 - 1, 0], pa.uint64()),
                       "messages": [[{"role": "user", "content": "a"}], []]})
    datasets.Dataset(source).save_to_disk(str(tmp_path / "ds"))
    corpus = open_corpus(tmp_path / "ds")
    columns = corpus.columns()
    assert columns.json == frozenset()
    table = records_table([r.record for r in corpus.rows()], columns)
    assert table.equals(source)
