"""Reading a corpus in input order (design 2.1): JSONL (plain or `.gz`, or a JSON array), Parquet files, a
`datasets` directory, or a Hub dataset; whole, or one row range at a time (`Corpus.ranges`, for Ray).

Nothing loads the whole corpus into memory: JSONL and Parquet are streamed, `datasets` tables are memory-mapped
Arrow. Every row comes out as a `CorpusRow` with its 0-based `index` in input order; an undecodable JSONL line is
a row with `error` set (records.py), not an exception.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow.parquet as pq

from ..errors import CorpusError
from ..hub import hub_offline
from ..schema import RESERVED_NAMES
from .columns import COLUMN_CHUNK_ROWS, InputColumns, parquet_columns
from .files import (
    file_lines,
    files_under,
    is_json_array,
    is_jsonl,
    is_parquet,
    json_array,
    open_binary,
    parquet_num_rows,
    parquet_read,
    strip_gz,
)
from .records import (
    MAX_NESTING,
    SURROGATE_ESCAPE,
    CorpusRow,
    batch_records,
    decode_line,
    lone_surrogate,
    nesting,
    too_deep_reason,
)

SourceKind = Literal["jsonl", "parquet", "datasets", "hub"]

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")



def _import_datasets(what: str) -> Any:
    try:
        import datasets
    except ImportError as exc:  # optional dependency (pear-data[models])
        raise CorpusError(f"reading {what} needs the `datasets` package: pip install 'pear-data[models]'") from exc
    return datasets


@dataclass(frozen=True)
class Corpus:
    """A resolved input corpus: where it is and how to read it (see `open_corpus`).

    kind:   "jsonl" | "parquet" | "datasets" | "hub".
    files:  the input files in read order (JSONL/Parquet), or every file of a
            `datasets` directory in sorted order (for the fingerprint); empty for the Hub.
    root:   the directory the files are under (None for a single file or the Hub).
    split:  the split read from a `DatasetDict` directory or a Hub dataset.
    """

    source: str
    kind: SourceKind
    files: tuple[Path, ...] = ()
    root: Path | None = None
    split: str | None = None

    @property
    def name(self) -> str:
        """How the manifest names the input: the Hub id, or the file or directory name (never a local path)."""
        return self.source if self.kind == "hub" else Path(self.source).expanduser().resolve().name

    def rows(self, batch_size: int = 1024) -> Iterator[CorpusRow]:
        """Yield every row in input order; `batch_size` rows are decoded at a time (Parquet/datasets)."""
        if self.kind == "jsonl":
            yield from _jsonl_rows(self.files)
        elif self.kind == "parquet":
            yield from _parquet_rows(self.files, batch_size)
        else:
            yield from _dataset_rows(self._load_dataset(), batch_size)

    def first_record(self) -> dict[str, Any] | None:
        """The first row that decodes (None when none does); CorpusError naming the input when it has no rows."""
        rows = self.rows()
        first = next(rows, None)
        if first is None:
            raise CorpusError(f"{self.source}: the corpus has no rows (an empty file?); give a corpus with at "
                              "least one row")
        return first.record if first.record is not None else next(
            (r.record for r in rows if r.record is not None), None)

    def ranges(self, shard_rows: int, start: int = 0) -> Iterator[RowRange]:
        """The rows from `start` on in ranges of `shard_rows` (boundaries at multiples of shard_rows), each
        with where its first row lies, so that `read_range` can read it without reading what comes before.

        One streaming pass over JSONL files (byte offsets, no decoding); Parquet file metadata; the length
        of a `datasets` table. Gzipped JSONL and JSON arrays cannot be sought into: their ranges carry no
        position and `read_range` reads from the start of the input.
        """
        if self.kind == "jsonl" and not any(strip_gz(f) != f.name.lower() or is_json_array(f) for f in self.files):
            yield from _jsonl_ranges(self.files, shard_rows, start)
            return
        if self.kind == "parquet":
            counts = [parquet_num_rows(f) for f in self.files]
        else:
            counts = [self.num_rows()]
            if counts[0] is None:  # gzipped JSONL or a JSON array: count by reading
                counts = [sum(1 for _ in self.rows())]
        total, file_starts = sum(counts), np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        first = start - start % shard_rows
        for lo in range(first, total, shard_rows):
            lo = max(lo, start)
            hi = min((lo // shard_rows + 1) * shard_rows, total)
            if lo >= hi:
                continue
            file = int(np.searchsorted(file_starts, lo, side="right") - 1)
            yield RowRange(lo, hi, file, int(lo - file_starts[file]))

    def read_range(self, rows: RowRange, batch_size: int = 1024) -> list[CorpusRow]:
        """The input rows [rows.start, rows.end), as `rows()` gives them (same indices, same decoding)."""
        if self.kind == "jsonl" and rows.line:
            return _jsonl_range(self.files, rows)
        if self.kind == "parquet":
            return _parquet_range(self.files, rows, batch_size)
        if self.kind in ("datasets", "hub"):
            table = self._load_dataset().select(range(rows.start, rows.end))
            return [CorpusRow(row.index + rows.start, row.record) for row in _dataset_rows(table, batch_size)]
        out = []
        for row in self.rows(batch_size):
            if row.index >= rows.end:
                break
            if row.index >= rows.start:
                out.append(row)
        return out

    def columns(self, chunk_rows: int = COLUMN_CHUNK_ROWS) -> InputColumns:
        """The output type of every input column, decided once over the whole corpus (design 2.2).

        Parquet: from the file schemas (no data read while the files agree); `datasets`/Hub: the dataset's
        Arrow schema; JSONL: one pass over every row, `chunk_rows` rows at a time (`InputColumns.infer`).
        Raises `CorpusError` when an input column has a name pear-data writes itself (schema.RESERVED_NAMES).
        """
        if self.kind == "jsonl":
            columns = InputColumns.infer((r.record for r in self.rows() if r.record is not None), chunk_rows)
        elif self.kind == "parquet":
            columns = parquet_columns(self.files)
        else:
            columns = InputColumns(self._load_dataset().features.arrow_schema.remove_metadata())
        reserved = [name for name in columns.schema.names if name in RESERVED_NAMES]
        if reserved:
            name = reserved[0]
            raise CorpusError(
                f"{self.source}: the input has a column named {name!r}, a name pear-data writes itself "
                f"(reserved: {', '.join(sorted(RESERVED_NAMES))}); rename it in the input (e.g. to "
                f"'orig_{name}') and run again"
            )
        return columns

    def num_rows(self) -> int | None:
        """Number of rows without decoding them: Parquet metadata, datasets length, non-blank JSONL lines
        (None for a JSON array file or gzipped JSONL, which would have to be decoded to count)."""
        if self.kind == "parquet":
            return sum(parquet_num_rows(f) for f in self.files)
        if self.kind in ("datasets", "hub"):
            return len(self._load_dataset())
        if any(f.suffix == ".gz" or is_json_array(f) for f in self.files):
            return None
        count = 0
        for path in self.files:
            with path.open("rb") as fh:
                count += sum(1 for line in file_lines(path, fh) if line.strip())
        return count

    def fingerprint(self) -> str:
        """Content fingerprint of the input, "sha256:<hex>" or "hub:<id>:<split>:<fingerprint>".

        Local files: sha256 over the bytes of the input files in read order.
        A single file's fingerprint is exactly `sha256sum FILE`; for a
        directory each file contributes its path relative to the directory,
        a NUL byte, its size and its bytes, so that renaming or re-splitting
        files changes the fingerprint. Hub: the `datasets` fingerprint of
        the loaded split (it changes with the dataset revision).
        """
        if self.kind == "hub":
            ds = self._load_dataset()
            return f"hub:{self.source}:{self.split}:{ds._fingerprint}"
        digest = hashlib.sha256()
        for path in self.files:
            if self.root is not None:
                rel = path.relative_to(self.root).as_posix()
                digest.update(rel.encode() + b"\0" + str(path.stat().st_size).encode() + b"\0")
            with path.open("rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    digest.update(chunk)
        return "sha256:" + digest.hexdigest()

    def _load_dataset(self) -> Any:
        datasets = _import_datasets(f"{self.source!r}")
        if self.kind == "datasets":
            assert self.root is not None
            try:
                ds = datasets.load_from_disk(str(self.root))
            except Exception as exc:  # noqa: BLE001 - a damaged directory: JSON, Arrow and OS errors alike
                raise CorpusError(f"{self.source}: cannot load this `datasets` directory ({type(exc).__name__}: "
                                  f"{exc}); it is damaged or truncated: save it again (`save_to_disk`)") from None
            if isinstance(ds, datasets.DatasetDict):
                if self.split not in ds:
                    raise CorpusError(
                        f"{self.source}: split {self.split!r} not found; this DatasetDict has {sorted(ds)} "
                        "(choose one with --split)"
                    )
                ds = ds[self.split]
            return ds
        # Hub
        try:
            return datasets.load_dataset(self.source, split=self.split)
        except Exception as exc:  # noqa: BLE001 - datasets raises many types; all mean "cannot load"
            if hub_offline():
                raise CorpusError(
                    f"Hub dataset {self.source!r} (split {self.split!r}) is not in the local cache and "
                    f"HF_HUB_OFFLINE=1 forbids downloading it ({type(exc).__name__}: {exc}). "
                    "Unset HF_HUB_OFFLINE to download it once, or pass a local JSONL/Parquet path."
                ) from exc
            raise CorpusError(
                f"cannot load Hub dataset {self.source!r} (split {self.split!r}): {type(exc).__name__}: {exc}. "
                "Check the id, the split (--split), your network and your token (huggingface-cli login)."
            ) from exc


def open_corpus(source: str | os.PathLike[str], *, split: str = "train") -> Corpus:
    """Resolve `source` (path or Hub id) to a `Corpus`; raises `CorpusError` if it is not readable."""
    text = os.fspath(source)
    path = Path(text).expanduser()
    if path.is_file():
        if is_parquet(path):
            return Corpus(text, "parquet", (path,))
        if is_jsonl(path):
            return Corpus(text, "jsonl", (path,))
        raise CorpusError(f"{text}: unknown file type; expected .jsonl/.ndjson/.json (optionally .gz) or .parquet")
    if path.is_dir():
        if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
            return Corpus(text, "datasets", files_under(path), root=path, split=split)
        ordered = files_under(path)
        parquet = tuple(p for p in ordered if is_parquet(p))
        jsonl = tuple(p for p in ordered if is_jsonl(p))
        if parquet and jsonl:
            raise CorpusError(f"{text}: the directory mixes Parquet and JSONL files; pass one file type")
        if parquet:
            return Corpus(text, "parquet", parquet, root=path)
        if jsonl:
            return Corpus(text, "jsonl", jsonl, root=path)
        raise CorpusError(
            f"{text}: directory holds no .parquet or .jsonl file and is not a `datasets` save_to_disk directory"
        )
    looks_like_path = (
        text.startswith((".", "/", "~"))
        or text.count("/") > 1
        or is_jsonl(path)
        or is_parquet(path)
        or os.sep in text.replace("/", "")
    )
    if looks_like_path or not _HUB_ID.match(text):
        raise CorpusError(f"{text}: no such file or directory (and not a Hub dataset id like 'owner/name')")
    return Corpus(text, "hub", split=split)


@dataclass(frozen=True)
class RowRange:
    """Input rows [start, end), and where the first one lies: its file (index into `Corpus.files`) and, in
    it, the row (Parquet) or the byte offset (JSONL; `line`: its 1-based line number, 0 when unknown)."""

    start: int
    end: int
    file: int = 0
    offset: int = 0
    line: int = 0


def _jsonl_ranges(files: tuple[Path, ...], shard_rows: int, start: int) -> Iterator[RowRange]:
    """RowRanges of plain JSONL files from one pass over their bytes (lines are counted, not decoded)."""
    index, pending = 0, None  # pending: (start row, file, offset, line) of the range being collected
    for file, path in enumerate(files):
        offset = 0
        with path.open("rb") as fh:
            for line_no, line in enumerate(fh, start=1):
                if line.strip():
                    if index >= start and (pending is None or index % shard_rows == 0):
                        if pending is not None:
                            yield RowRange(pending[0], index, *pending[1:])
                        pending = (index, file, offset, line_no)
                    index += 1
                offset += len(line)
    if pending is not None:
        yield RowRange(pending[0], index, *pending[1:])


def _jsonl_range(files: tuple[Path, ...], rows: RowRange) -> list[CorpusRow]:
    """Read a RowRange of plain JSONL files from its byte offset on (see `_jsonl_rows` for the decoding)."""
    out: list[CorpusRow] = []
    index, multi = rows.start, len(files) > 1
    for file in range(rows.file, len(files)):
        path = files[file]
        prefix = f"{path.name} " if multi else ""
        with path.open("rb") as fh:
            first = file == rows.file
            offset = rows.offset if first else 0
            fh.seek(offset)
            source = file_lines(path, fh) if offset == 0 else fh  # the file's start: its byte-order mark, if any
            for line_no, line in enumerate(source, start=rows.line if first else 1):
                if index >= rows.end:
                    return out
                if not line.strip():
                    continue
                record, reason = decode_line(line, f"{prefix}line {line_no}")
                raw = None if reason is None else line.decode("utf-8", "replace").rstrip("\r\n")
                out.append(CorpusRow(index, record, reason, raw))
                index += 1
    return out


def _parquet_range(files: tuple[Path, ...], rows: RowRange, batch_size: int) -> list[CorpusRow]:
    """Read a RowRange of Parquet files: only the row groups that hold it."""
    out: list[CorpusRow] = []
    index, skip = rows.start, rows.offset
    for file in range(rows.file, len(files)):
        with parquet_read(files[file]):
            parquet = pq.ParquetFile(files[file])
            sizes = [parquet.metadata.row_group(g).num_rows for g in range(parquet.num_row_groups)]
            starts = np.concatenate([[0], np.cumsum(sizes)])
            first = int(np.searchsorted(starts, skip, side="right") - 1)
            skip -= int(starts[first])
            for batch in parquet.iter_batches(batch_size=batch_size, row_groups=range(first, len(sizes))):
                for record in batch.slice(skip).to_pylist() if skip < len(batch) else []:
                    if index >= rows.end:
                        return out
                    out.append(CorpusRow(index, record))
                    index += 1
                skip = max(0, skip - len(batch))
        skip = 0
    return out


def _jsonl_rows(files: tuple[Path, ...]) -> Iterator[CorpusRow]:
    index = 0
    multi = len(files) > 1
    for path in files:
        prefix = f"{path.name} " if multi else ""
        if is_json_array(path):
            data, items = json_array(path)
            check = SURROGATE_ESCAPE.search(data) is not None
            for item_no, item in enumerate(items, start=1):
                reason = None
                if not isinstance(item, dict):
                    reason = f"{prefix}item {item_no}: expected a JSON object, got {type(item).__name__}"
                elif nesting(item) > MAX_NESTING:
                    reason = f"{prefix}item {item_no}: {too_deep_reason()}"
                    item = {"nested": "too deep to show"}
                elif check and (surrogate := lone_surrogate(item)) is not None:
                    reason = f"{prefix}item {item_no}: {surrogate}"
                if reason is None:
                    yield CorpusRow(index, item)
                else:
                    yield CorpusRow(index, None, reason, json.dumps(item))
                index += 1
            continue
        with open_binary(path) as fh:
            for line_no, line in enumerate(file_lines(path, fh), start=1):
                if not line.strip():
                    continue
                record, reason = decode_line(line, f"{prefix}line {line_no}")
                raw = None if reason is None else line.decode("utf-8", "replace").rstrip("\r\n")
                yield CorpusRow(index, record, reason, raw)
                index += 1


def _parquet_rows(files: tuple[Path, ...], batch_size: int) -> Iterator[CorpusRow]:
    index = 0
    for path in files:
        with parquet_read(path):
            for batch in pq.ParquetFile(path).iter_batches(batch_size=batch_size):
                for record in batch_records(batch):
                    yield CorpusRow(index, record)
                    index += 1


def _dataset_rows(ds: Any, batch_size: int) -> Iterator[CorpusRow]:
    """Rows of a `datasets.Dataset` as their Arrow values (what the output stores; no feature decoding)."""
    index = 0
    for batch in ds.with_format("arrow").iter(batch_size=batch_size):
        for record in batch_records(batch):
            yield CorpusRow(index, record)
            index += 1
