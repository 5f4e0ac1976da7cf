"""Corpus.ranges / read_range: reading a shard's rows without reading the rows before it (used by Ray workers)."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pear_data.corpus import open_corpus


def _records(n: int, start: int = 0) -> list[dict]:
    return [{"prompt": f"q{i}", "completion": f"a{i}", "id": i} for i in range(start, start + n)]


def _jsonl(path: Path, records: list[dict], *, broken: int | None = None, blank_every: int = 0) -> Path:
    lines = []
    for i, record in enumerate(records):
        lines.append('{"prompt": "broken' if i == broken else json.dumps(record))
        if blank_every and i % blank_every == 0:
            lines.append("   ")
    path.write_text("\n".join(lines) + "\n")
    return path


def _inputs(tmp_path: Path) -> dict[str, Path]:
    folder = tmp_path / "multi"
    folder.mkdir(parents=True)
    _jsonl(folder / "a.jsonl", _records(11), broken=4, blank_every=3)
    _jsonl(folder / "b.jsonl", _records(7, 11))
    gz = tmp_path / "rows.jsonl.gz"
    gz.write_bytes(gzip.compress((json.dumps(_records(1)[0]) + "\n").encode() * 9))
    array = tmp_path / "rows.json"
    array.write_text(json.dumps(_records(10)))
    parquet = tmp_path / "pq"
    parquet.mkdir()
    pq.write_table(pa.Table.from_pylist(_records(13)), parquet / "a.parquet", row_group_size=4)
    pq.write_table(pa.Table.from_pylist(_records(6, 13)), parquet / "b.parquet", row_group_size=5)
    return {"jsonl dir": folder, "gzip": gz, "json array": array, "parquet dir": parquet,
            "one jsonl": _jsonl(tmp_path / "one.jsonl", _records(10))}


@pytest.mark.parametrize("shard_rows", [1, 3, 4, 100])
@pytest.mark.parametrize("start_shard", [0, 1, 2])
def test_read_range_gives_exactly_the_rows_of_each_shard(tmp_path, shard_rows, start_shard):
    for name, path in _inputs(tmp_path / f"{shard_rows}-{start_shard}").items():
        corpus = open_corpus(path)
        rows = list(corpus.rows())
        start = min(start_shard * shard_rows, len(rows))
        ranges = list(corpus.ranges(shard_rows, start))
        assert [r.start for r in ranges] == list(range(start, len(rows), shard_rows)), name
        assert all(r.end == min(r.start + shard_rows, len(rows)) for r in ranges), name
        read = [row for r in ranges for row in corpus.read_range(r)]
        assert read == rows[start:], name


def test_ranges_locate_plain_jsonl_rows_by_byte_offset(tmp_path):
    """Plain JSONL ranges carry a seekable position; reading one does not decode the lines before it."""
    path = _jsonl(tmp_path / "rows.jsonl", _records(10), broken=7)
    corpus = open_corpus(path)
    last = list(corpus.ranges(3))[-1]
    assert (last.start, last.end) == (9, 10) and last.offset > 0 and last.line == 10
    (row,) = corpus.read_range(last)
    assert row.index == 9 and row.record == _records(10)[9]
    broken = list(corpus.ranges(3))[2]
    assert corpus.read_range(broken)[1].error.startswith("line 8: invalid JSON")
