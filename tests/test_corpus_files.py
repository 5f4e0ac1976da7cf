"""corpus/files.py and records.py: damaged, empty or oddly encoded corpus files exit 2 naming the file; an
undecodable row is a reject naming the field, never an error of the run (docs/design.md 2.1, 6)."""

from __future__ import annotations

import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pear_data.corpus import open_corpus

from .outputs import (
    FIELDS,
    assert_named,
    data,
    gsm8k,
    rejects,
    score,
    write_jsonl,
)


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
