"""Corpus reading (JSONL, Parquet, datasets dirs, Hub ids) and row-shape normalization."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach the network

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pear_data.corpus import RowShape, detect_shape, is_completion_turn, open_corpus, to_conversation
from pear_data.errors import CorpusError, RowError

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "data"
GSM8K = EXAMPLES / "gsm8k_sample.jsonl"
CHAT = EXAMPLES / "chat_sample.jsonl"
def read_rows(source, **kwargs):
    """The rows of a corpus, in input order."""
    return open_corpus(source, **kwargs).rows()


GSM8K_SHAPE = RowShape("prompt_completion", prompt_field="question", completion_field="answer")


def _records(n: int) -> list[dict]:
    """Rows with a scalar id, a str column and a nested messages column."""
    return [
        {
            "id": i,
            "question": f"q{i}",
            "messages": [{"role": "user", "content": f"u{i}"}, {"role": "assistant", "content": f"a{i}"}],
        }
        for i in range(n)
    ]


# --------------------------------------------------------------------------- JSONL


def test_jsonl_rows_come_in_file_order_with_indices() -> None:
    lines = GSM8K.read_text(encoding="utf-8").splitlines()
    rows = list(read_rows(GSM8K))
    assert [r.index for r in rows] == list(range(64))
    assert [r.record for r in rows] == [json.loads(line) for line in lines]
    assert all(r.error is None and r.raw is None for r in rows)


def test_undecodable_jsonl_line_is_an_error_row_with_its_index(tmp_path: Path) -> None:
    path = tmp_path / "corpus.jsonl"
    path.write_bytes(
        b'{"prompt": "a", "completion": "b"}\n'
        b'{"prompt": "a", "completion": \n'  # line 2: truncated JSON
        b"\n"  # line 3: blank, not a row
        b'{"prompt": "\xff\xfe", "completion": "b"}\n'  # line 4: not UTF-8
        b"[1, 2]\n"  # line 5: valid JSON, not an object
        b'{"prompt": "c", "completion": "d"}'  # line 6: no trailing newline
    )
    rows = list(read_rows(path))
    assert [r.index for r in rows] == [0, 1, 2, 3, 4]
    assert rows[0].record == {"prompt": "a", "completion": "b"}
    assert rows[1].record is None and rows[1].error.startswith("line 2: invalid JSON (")
    assert rows[1].raw == '{"prompt": "a", "completion": '
    assert rows[2].record is None and rows[2].error.startswith("line 4: not valid UTF-8")
    assert rows[3].record is None and rows[3].error == "line 5: expected a JSON object, got list"
    assert rows[4].record == {"prompt": "c", "completion": "d"} and rows[4].error is None


def test_gzipped_jsonl_and_json_array_files_are_read(tmp_path: Path) -> None:
    records = [{"prompt": f"p{i}", "completion": f"c{i}"} for i in range(5)]
    gz = tmp_path / "c.jsonl.gz"
    with gzip.open(gz, "wt", encoding="utf-8") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in records)
    array = tmp_path / "c.json"
    array.write_text(json.dumps(records, indent=2))
    assert [r.record for r in read_rows(gz)] == records
    assert [r.record for r in read_rows(array)] == records


def test_jsonl_directory_is_read_in_sorted_file_order(tmp_path: Path) -> None:
    (tmp_path / "b.jsonl").write_text('{"id": 3}\nnot json\n')  # written first on purpose
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"id": i}) + "\n" for i in range(3)))
    rows = list(read_rows(tmp_path))
    assert [r.record["id"] if r.record else None for r in rows] == [0, 1, 2, 3, None]
    assert rows[4].index == 4 and rows[4].error.startswith("b.jsonl line 2: invalid JSON")


# --------------------------------------------------------------------------- Parquet / datasets


def test_parquet_file_is_streamed_in_order_across_row_groups(tmp_path: Path) -> None:
    records = _records(2500)
    path = tmp_path / "corpus.parquet"
    pq.write_table(pa.Table.from_pylist(records), path, row_group_size=300)
    corpus = open_corpus(path)
    assert corpus.kind == "parquet" and corpus.num_rows() == 2500
    rows = list(corpus.rows(batch_size=256))
    assert [r.index for r in rows] == list(range(2500))
    assert [r.record for r in rows] == records  # nested messages come back as lists of dicts


def test_parquet_directory_is_read_in_sorted_path_order(tmp_path: Path) -> None:
    records = _records(30)
    data = tmp_path / "data"
    data.mkdir()
    # written out of order on purpose: part-00002 first
    for part in (2, 0, 1):
        chunk = records[part * 10 : (part + 1) * 10]
        pq.write_table(pa.Table.from_pylist(chunk), data / f"part-{part:05d}.parquet")
    rows = list(read_rows(tmp_path))
    assert [r.record["id"] for r in rows] == list(range(30))
    assert [r.index for r in rows] == list(range(30))


def test_datasets_save_to_disk_directory_preserves_order(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    records = _records(100)
    datasets.Dataset.from_list(records).save_to_disk(str(tmp_path / "ds"), num_shards=3)
    corpus = open_corpus(tmp_path / "ds")
    assert corpus.kind == "datasets" and corpus.num_rows() == 100
    assert [r.record for r in corpus.rows(batch_size=7)] == records


def test_datasets_dict_directory_reads_the_requested_split(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    dd = datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(_records(5)), "test": datasets.Dataset.from_list(_records(3))}
    )
    dd.save_to_disk(str(tmp_path / "dd"))
    assert [r.record["id"] for r in read_rows(tmp_path / "dd", split="test")] == [0, 1, 2]
    with pytest.raises(CorpusError, match=r"split 'validation' not found.*\['test', 'train'\]"):
        list(read_rows(tmp_path / "dd", split="validation"))


# --------------------------------------------------------------------------- sources that do not resolve


def test_missing_local_path_is_a_corpus_error() -> None:
    with pytest.raises(CorpusError, match="no such file"):
        open_corpus("data/does-not-exist.jsonl")


def test_uncached_hub_dataset_offline_names_the_offline_flag(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    corpus = open_corpus("pear-data-tests/definitely-not-cached")
    assert corpus.kind == "hub"
    with pytest.raises(CorpusError, match="not in the local cache and HF_HUB_OFFLINE=1"):
        list(corpus.rows())


# --------------------------------------------------------------------------- fingerprint


def test_fingerprint_of_a_file_is_sha256_of_its_bytes() -> None:
    expected = hashlib.sha256(GSM8K.read_bytes()).hexdigest()
    assert open_corpus(GSM8K).fingerprint() == f"sha256:{expected}"


def test_fingerprint_changes_with_content_and_file_names(tmp_path: Path) -> None:
    d = tmp_path / "d"
    d.mkdir()
    (d / "a.jsonl").write_text('{"x": 1}\n')
    (d / "b.jsonl").write_text('{"x": 2}\n')
    first = open_corpus(d).fingerprint()
    assert open_corpus(d).fingerprint() == first  # deterministic
    (d / "b.jsonl").write_text('{"x": 3}\n')
    second = open_corpus(d).fingerprint()
    assert second != first
    (d / "b.jsonl").rename(d / "c.jsonl")
    assert open_corpus(d).fingerprint() != second


# --------------------------------------------------------------------------- row shapes


def test_detect_shape_from_columns_and_flags() -> None:
    assert detect_shape({"messages": []}).kind == "messages"
    assert detect_shape({"prompt": "p", "completion": "c"}) == RowShape("prompt_completion")
    assert detect_shape(None, prompt_field="question", completion_field="answer") == GSM8K_SHAPE
    with pytest.raises(CorpusError, match=r"\['answer', 'question'\].*--prompt-field"):
        detect_shape({"question": "q", "answer": "a"})
    with pytest.raises(CorpusError, match="must be given together"):
        detect_shape({"question": "q"}, prompt_field="question")


def test_gsm8k_row_maps_to_user_question_and_assistant_answer() -> None:
    record = json.loads(GSM8K.read_text(encoding="utf-8").splitlines()[0])
    conversation = to_conversation(record, GSM8K_SHAPE)
    assert conversation == [
        {"role": "user", "content": record["question"]},
        {"role": "assistant", "content": record["answer"]},
    ]


def test_system_field_becomes_a_leading_system_turn() -> None:
    shape = RowShape("prompt_completion", prompt_field="q", completion_field="a", system_field="sys")
    assert to_conversation({"q": "Q", "a": "A", "sys": "Be brief."}, shape) == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Q"},
        {"role": "assistant", "content": "A"},
    ]
    assert to_conversation({"q": "Q", "a": "A", "sys": None}, shape)[0]["role"] == "user"


def test_prompt_completion_with_strings_and_with_messages_normalize_alike() -> None:
    shape = RowShape("prompt_completion")
    as_strings = to_conversation({"prompt": "2+2?", "completion": "4"}, shape)
    as_messages = to_conversation(
        {"prompt": [{"role": "user", "content": "2+2?"}], "completion": [{"role": "assistant", "content": "4"}]}, shape
    )
    assert as_strings == as_messages == [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]


def test_assistant_turn_inside_a_prompt_is_context_not_completion() -> None:
    record = {
        "prompt": [
            {"role": "user", "content": "1+1?"},
            {"role": "assistant", "content": "2"},
            {"role": "user", "content": "2+2?"},
        ],
        "completion": [{"role": "assistant", "content": "4"}],
    }
    conversation = to_conversation(record, RowShape("prompt_completion"))
    assert [is_completion_turn(m) for m in conversation] == [False, False, False, True]


def test_chat_sample_rows_keep_every_turn() -> None:
    rows = list(read_rows(CHAT))
    shape = detect_shape(rows[0].record)
    for row in rows:
        assert to_conversation(row.record, shape) == row.record["messages"]


@pytest.mark.parametrize(
    ("record", "shape", "reason"),
    [
        ({"question": "q"}, GSM8K_SHAPE, "missing field 'answer'"),
        ({"answer": "a"}, GSM8K_SHAPE, "missing field 'question'"),
        ({"question": "q", "answer": 42}, GSM8K_SHAPE, "field 'answer' must be a string or a list of messages, got"),
        ({"question": None, "answer": "a"}, GSM8K_SHAPE, "field 'question' must be a string or a list of messages"),
        ({"question": "q", "answer": "  "}, GSM8K_SHAPE, "empty completion: field 'answer' is empty"),
        ({"msgs": []}, RowShape("messages"), "missing field 'messages'"),
        ({"messages": "hi"}, RowShape("messages"), "field 'messages' must be a list of {role, content} messages"),
        ({"messages": [{"role": "user", "content": "hi"}]}, RowShape("messages"), "no assistant turn in field"),
        ({"messages": [{"content": "hi"}]}, RowShape("messages"), "field 'messages'[0]: missing key 'role'"),
        (
            {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": None}]},
            RowShape("messages"),
            "field 'messages'[1]: content must be a string",
        ),
        (
            {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}]},
            RowShape("messages"),
            "empty completion: field 'messages'[1]",
        ),
        (
            {"messages": [{"role": "assistant", "content": "hi"}, {"role": "user", "content": "?"}]},
            RowShape("messages"),
            "field 'messages' starts with an assistant turn",
        ),
    ],
)
def test_bad_row_raises_row_error_naming_the_field(record: dict, shape: RowShape, reason: str) -> None:
    with pytest.raises(RowError) as info:
        to_conversation(record, shape)
    assert info.value.reason.startswith(reason)
