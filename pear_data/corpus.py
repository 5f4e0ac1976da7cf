"""Input corpus: read rows in input order and normalize row shapes (docs/design.md section 2).

Sources (auto-detected from `source`):

- JSONL file (`.jsonl`, `.ndjson`, `.json` with one object per line, or any of
  them `.gz`-compressed), or a directory of JSONL files: read line by line.
  A `.json` file holding one top-level array of objects is also accepted (it
  is parsed whole: not streamed).
- Parquet file or directory of `.parquet` files (searched recursively, read in
  sorted path order): read record batch by record batch.
- A `datasets` directory written by `Dataset.save_to_disk` or
  `DatasetDict.save_to_disk` (pick the split with `split=`): memory-mapped.
- A Hub dataset id (`owner/name`): `datasets.load_dataset(id, split=split)`.
  With `HF_HUB_OFFLINE=1` only the local cache is used, and a dataset that is
  not cached is a `CorpusError` that says so.

Nothing loads the whole corpus into memory: JSONL and Parquet are streamed,
`datasets` tables are memory-mapped Arrow.

Every row comes out as a `CorpusRow` with its 0-based `index` in input order.
A JSONL line that cannot be decoded is not an exception: it is a row with
`record=None` and `error="line 17: invalid JSON (...)"`, so the caller can send
it to rejects with its index (every input row ends up in data/ or rejects).
Blank lines are not rows. A UTF-8 byte-order mark starting a file is the
encoding marker, not data; a UTF-16 JSONL file is a `CorpusError`. A row
holding a lone UTF-16 surrogate (JSON `"\ud83d"`, half an emoji: not Unicode
text) or nested more than `MAX_NESTING` levels is an undecodable row whose
reason names the field.

The output type of every input column (`InputColumns`) is decided once for the
whole corpus by `Corpus.columns()`, before any row is scored (design 2.2):
Parquet keeps its file types, `datasets` its Arrow schema, JSONL columns get
the type of all their values together (`InputColumns.infer`), and a column
whose values share no type is JSON text in every row. It also refuses an
input column with a name pear-data writes itself (`schema.RESERVED_NAMES`).

Row shapes (`RowShape`, auto-detected by `detect_shape`, overridable by flags):

- conversational: `messages` = list of `{role, content}`; every `assistant`
  turn is completion, everything else is prompt/environment;
- prompt-completion (TRL convention): `prompt` and `completion`, each a str or
  a list of messages;
- field mapping, e.g. `--prompt-field question --completion-field answer`
  (GSM8K), optionally `--system-field`: a prompt-completion shape whose fields
  have other names.

`to_conversation(record, shape)` turns any of them into one normalized form, a
`Conversation`: a list of `{"role": str, "content": str}` messages in which
the completion tokens are exactly those of the `assistant` turns (but for an
assistant turn inside a prompt-completion *prompt*, marked `"train": False`).
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import json
import os
import re
import zlib
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .errors import CorpusError, RowError
from .schema import RESERVED_NAMES

SourceKind = Literal["jsonl", "parquet", "datasets", "hub"]
ShapeKind = Literal["messages", "prompt_completion"]
Message = dict[str, Any]  # {"role": str, "content": str[, "train": False]}
Conversation = list[Message]

JSONL_SUFFIXES = (".jsonl", ".ndjson", ".json")
PARQUET_SUFFIXES = (".parquet",)
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_ROLE_ASSISTANT = "assistant"
COLUMN_CHUNK_ROWS = 4096  # JSONL rows per step of the column-type pass
_STARTS_WITH_ASSISTANT = "starts with an assistant turn: a completion needs a prompt before it"


@dataclass(frozen=True)
class CorpusRow:
    """One input row.

    index:  0-based position in input order (across files of a directory).
    record: the decoded row (column -> value), or None when it could not be decoded.
    error:  why the row could not be decoded ("line 17: invalid JSON (...)"), else None.
    raw:    the undecoded text of a row that could not be decoded, else None.
    """

    index: int
    record: dict[str, Any] | None
    error: str | None = None
    raw: str | None = None


# --------------------------------------------------------------------------- sources


def _hub_offline() -> bool:
    """True when the Hub must not be contacted (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE)."""
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        if os.environ.get(name, "").strip().upper() in {"1", "ON", "YES", "TRUE"}:
            return True
    try:  # the libraries read the variables at import time; honour what they decided
        import datasets.config

        return bool(datasets.config.HF_HUB_OFFLINE)
    except ImportError:
        return False


def _import_datasets(what: str) -> Any:
    try:
        import datasets
    except ImportError as exc:  # optional dependency (pear-data[models])
        raise CorpusError(f"reading {what} needs the `datasets` package: pip install 'pear-data[models]'") from exc
    return datasets


def _strip_gz(path: Path) -> str:
    name = path.name.lower()
    return name[:-3] if name.endswith(".gz") else name


def _is_jsonl(path: Path) -> bool:
    return _strip_gz(path).endswith(JSONL_SUFFIXES)


def _is_parquet(path: Path) -> bool:
    return path.name.lower().endswith(PARQUET_SUFFIXES)


@contextlib.contextmanager
def _open_binary(path: Path) -> Iterator[BinaryIO]:
    """The file's bytes, gunzipped for `.gz`; a `.gz` that is not gzip, or ends early, is a CorpusError naming it
    (gzip raises BadGzipFile, EOFError or zlib.error while the file is read, so reads happen inside this block)."""
    if not path.name.lower().endswith(".gz"):
        with path.open("rb") as fh:
            yield fh
        return
    try:
        with gzip.open(path, "rb") as fh:
            yield fh  # type: ignore[misc]
    except gzip.BadGzipFile as exc:
        with path.open("rb") as raw:
            gzipped = raw.read(2) == b"\x1f\x8b"
        if not gzipped:
            raise CorpusError(f"{path}: not a gzip file ({exc}), though its name ends in .gz; rename it without "
                              ".gz if it is plain JSONL, or compress it with gzip") from None
        raise CorpusError(f"{path}: the gzip file is damaged ({exc}); restore it, or download or compress it "
                          "again") from None
    except (EOFError, zlib.error) as exc:
        raise CorpusError(f"{path}: the gzip file is truncated or damaged ({type(exc).__name__}: {exc}); restore "
                          "it, or download or compress it again") from None


@contextlib.contextmanager
def _parquet_read(path: Path) -> Iterator[None]:
    """A Parquet file pyarrow cannot read (truncated, corrupt pages, not Parquet at all) as a CorpusError naming
    it; pyarrow raises OSError or an ArrowException, at open or while the rows are read (so reads happen inside
    this block)."""
    try:
        yield
    except (OSError, pa.ArrowException) as exc:
        raise CorpusError(f"{path}: not a readable Parquet file ({exc}); the file is damaged or truncated: "
                          "restore it, or write it again") from None


def _parquet_num_rows(path: Path) -> int:
    with _parquet_read(path):
        return pq.ParquetFile(path).metadata.num_rows


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
        if self.kind == "jsonl" and not any(_strip_gz(f) != f.name.lower() or _is_json_array(f) for f in self.files):
            yield from _jsonl_ranges(self.files, shard_rows, start)
            return
        if self.kind == "parquet":
            counts = [_parquet_num_rows(f) for f in self.files]
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
            columns = _parquet_columns(self.files)
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
            return sum(_parquet_num_rows(f) for f in self.files)
        if self.kind in ("datasets", "hub"):
            return len(self._load_dataset())
        if any(f.suffix == ".gz" or _is_json_array(f) for f in self.files):
            return None
        count = 0
        for path in self.files:
            with path.open("rb") as fh:
                count += sum(1 for line in _lines(path, fh) if line.strip())
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
            if _hub_offline():
                raise CorpusError(
                    f"Hub dataset {self.source!r} (split {self.split!r}) is not in the local cache and "
                    f"HF_HUB_OFFLINE=1 forbids downloading it ({type(exc).__name__}: {exc}). "
                    "Unset HF_HUB_OFFLINE to download it once, or pass a local JSONL/Parquet path."
                ) from exc
            raise CorpusError(
                f"cannot load Hub dataset {self.source!r} (split {self.split!r}): {type(exc).__name__}: {exc}. "
                "Check the id, the split (--split), your network and your token (huggingface-cli login)."
            ) from exc


def _files_under(root: Path) -> tuple[Path, ...]:
    """Every regular file under `root`, sorted by relative POSIX path (the read order)."""
    files = (p for p in root.rglob("*") if p.is_file())
    return tuple(sorted(files, key=lambda p: p.relative_to(root).as_posix()))


def open_corpus(source: str | os.PathLike[str], *, split: str = "train") -> Corpus:
    """Resolve `source` (path or Hub id) to a `Corpus`; raises `CorpusError` if it is not readable."""
    text = os.fspath(source)
    path = Path(text).expanduser()
    if path.is_file():
        if _is_parquet(path):
            return Corpus(text, "parquet", (path,))
        if _is_jsonl(path):
            return Corpus(text, "jsonl", (path,))
        raise CorpusError(f"{text}: unknown file type; expected .jsonl/.ndjson/.json (optionally .gz) or .parquet")
    if path.is_dir():
        if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
            return Corpus(text, "datasets", _files_under(path), root=path, split=split)
        ordered = _files_under(path)
        parquet = tuple(p for p in ordered if _is_parquet(p))
        jsonl = tuple(p for p in ordered if _is_jsonl(p))
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
        or _is_jsonl(path)
        or _is_parquet(path)
        or os.sep in text.replace("/", "")
    )
    if looks_like_path or not _HUB_ID.match(text):
        raise CorpusError(f"{text}: no such file or directory (and not a Hub dataset id like 'owner/name')")
    return Corpus(text, "hub", split=split)


def read_corpus(source: str | os.PathLike[str], *, split: str = "train", batch_size: int = 1024) -> Iterator[CorpusRow]:
    """Yield every row of `source` in input order (see `Corpus.rows`)."""
    yield from open_corpus(source, split=split).rows(batch_size)


def corpus_fingerprint(source: str | os.PathLike[str], *, split: str = "train") -> str:
    """Content fingerprint of `source` (see `Corpus.fingerprint`)."""
    return open_corpus(source, split=split).fingerprint()


def _decode_line(line: bytes, where: str) -> tuple[dict[str, Any] | None, str | None]:
    """(record, None) for a JSON object line, else (None, reason) naming the line."""
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as exc:
        return None, f"{where}: not valid UTF-8 ({exc})"
    try:
        record = json.loads(text)
    except json.JSONDecodeError as exc:
        return None, f"{where}: invalid JSON ({exc})"
    except RecursionError:
        return None, f"{where}: {_too_deep_reason()}"
    if not isinstance(record, dict):
        return None, f"{where}: expected a JSON object, got {type(record).__name__}"
    if line.count(b"[") + line.count(b"{") > MAX_NESTING and _nesting(record) > MAX_NESTING:
        return None, f"{where}: {_too_deep_reason()}"
    if _SURROGATE_ESCAPE.search(line):
        reason = lone_surrogate(record)
        if reason is not None:
            return None, f"{where}: {reason}"
    return record, None


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
            lines = _lines(path, fh) if offset == 0 else fh  # the file's start: its byte-order mark, if any
            for line_no, line in enumerate(lines, start=rows.line if first else 1):
                if index >= rows.end:
                    return out
                if not line.strip():
                    continue
                record, reason = _decode_line(line, f"{prefix}line {line_no}")
                raw = None if reason is None else line.decode("utf-8", "replace").rstrip("\r\n")
                out.append(CorpusRow(index, record, reason, raw))
                index += 1
    return out


def _parquet_range(files: tuple[Path, ...], rows: RowRange, batch_size: int) -> list[CorpusRow]:
    """Read a RowRange of Parquet files: only the row groups that hold it."""
    out: list[CorpusRow] = []
    index, skip = rows.start, rows.offset
    for file in range(rows.file, len(files)):
        with _parquet_read(files[file]):
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


# Rows nested deeper are rejects: deeper values reach recursion limits (json, Arrow, Parquet readers).
MAX_NESTING = 200


def _too_deep_reason() -> str:
    return f"nested more than {MAX_NESTING} levels deep (lists and objects); pear-data does not keep such rows"


def _nesting(value: Any) -> int:
    """How many lists/objects deep `value` is (iterative: no recursion limit)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            item = list(item.values())
        if isinstance(item, list):
            deepest = max(deepest, depth)
            if deepest > MAX_NESTING:
                return deepest
            stack.extend((element, depth + 1) for element in item)
    return deepest


# A JSON escape of a UTF-16 surrogate (\ud800-\udfff): a valid pair decodes to one character, a lone one
# stays a surrogate, which is not Unicode text (UTF-8, Arrow, Parquet and tokenizers all refuse it).
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")
_SURROGATE = re.compile("[\ud800-\udfff]")


def lone_surrogate(record: Mapping[str, Any]) -> str | None:
    """The reject reason when a string (or key) of the decoded row holds a lone UTF-16 surrogate, else None.

    Names the field and where inside it: "field 'meta' (meta.note): lone UTF-16 surrogate '\\udc00' at
    character 3 (half of a character pair, e.g. a truncated emoji); it is not valid Unicode text".
    """

    def find(value: Any, path: str) -> tuple[str, str, int] | None:
        if isinstance(value, str):
            hit = _SURROGATE.search(value)
            return (path, hit.group(), hit.start()) if hit else None
        if isinstance(value, dict):
            for key, item in value.items():
                found = find(key, f"{path} (a key)") or find(item, f"{path}.{key}")
                if found:
                    return found
        elif isinstance(value, list):
            for i, item in enumerate(value):
                found = find(item, f"{path}[{i}]")
                if found:
                    return found
        return None

    for name, value in record.items():
        found = find(name, "a column name") or find(value, name)
        if found:
            path, char, at = found
            inside = "" if path == name else f" ({path})"
            return (f"field {name!r}{inside}: lone UTF-16 surrogate {ascii(char)} at character {at} (half of "
                    "a character pair, e.g. a truncated emoji); it is not valid Unicode text")
    return None


_UTF8_BOM = b"\xef\xbb\xbf"
_UTF16_BOMS = (b"\xff\xfe", b"\xfe\xff")


def _lines(path: Path, fh: BinaryIO) -> Iterator[bytes]:
    """The lines of a JSONL file; a UTF-8 byte-order mark is the encoding marker, not data (utf-8-sig)."""
    first = True
    for line in fh:
        if first:
            first = False
            if line.startswith(_UTF16_BOMS):
                raise CorpusError(f"{path}: the file is UTF-16 text (it starts with a UTF-16 byte-order mark); "
                                  "JSONL must be UTF-8: convert it, e.g. `iconv -f UTF-16 -t UTF-8`")
            line = line.removeprefix(_UTF8_BOM)
        yield line


def _jsonl_rows(files: tuple[Path, ...]) -> Iterator[CorpusRow]:
    index = 0
    multi = len(files) > 1
    for path in files:
        prefix = f"{path.name} " if multi else ""
        if _is_json_array(path):
            data, items = _json_array(path)
            check = _SURROGATE_ESCAPE.search(data) is not None
            for item_no, item in enumerate(items, start=1):
                reason = None
                if not isinstance(item, dict):
                    reason = f"{prefix}item {item_no}: expected a JSON object, got {type(item).__name__}"
                elif _nesting(item) > MAX_NESTING:
                    reason = f"{prefix}item {item_no}: {_too_deep_reason()}"
                    item = {"nested": "too deep to show"}
                elif check and (surrogate := lone_surrogate(item)) is not None:
                    reason = f"{prefix}item {item_no}: {surrogate}"
                if reason is None:
                    yield CorpusRow(index, item)
                else:
                    yield CorpusRow(index, None, reason, json.dumps(item))
                index += 1
            continue
        with _open_binary(path) as fh:
            for line_no, line in enumerate(_lines(path, fh), start=1):
                if not line.strip():
                    continue
                record, reason = _decode_line(line, f"{prefix}line {line_no}")
                raw = None if reason is None else line.decode("utf-8", "replace").rstrip("\r\n")
                yield CorpusRow(index, record, reason, raw)
                index += 1


def _is_json_array(path: Path) -> bool:
    """A `.json` file whose first non-blank byte (after a UTF-8 byte-order mark) is '[' (a JSON array, not JSONL)."""
    if not _strip_gz(path).endswith(".json"):
        return False
    with _open_binary(path) as fh:
        head = fh.read(4096).removeprefix(_UTF8_BOM).lstrip()
    return head.startswith(b"[")


def _json_array(path: Path) -> tuple[bytes, list[Any]]:
    """(the file's bytes, its items); a UTF-8 byte-order mark is skipped, UTF-16/32 are detected by `json`."""
    with _open_binary(path) as fh:
        data = fh.read()
    try:
        items = json.loads(data.removeprefix(_UTF8_BOM))
    except RecursionError:
        raise CorpusError(f"{path}: the JSON array is {_too_deep_reason()}; use JSONL (one object per line) to "
                          "reject such rows one by one") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CorpusError(
            f"{path}: invalid JSON array ({exc}); use JSONL (one object per line) to reject bad rows one by one"
        ) from exc
    return data, items


def _parquet_rows(files: tuple[Path, ...], batch_size: int) -> Iterator[CorpusRow]:
    index = 0
    for path in files:
        with _parquet_read(path):
            for batch in pq.ParquetFile(path).iter_batches(batch_size=batch_size):
                for record in batch_records(batch):
                    yield CorpusRow(index, record)
                    index += 1


def column_values(column: pa.Array | pa.ChunkedArray) -> list[Any]:
    """An Arrow column as Python values; a column holding values Python cannot represent (a timestamp
    beyond year 9999, say) as Arrow scalars, which `pa.array(values, type)` turns back into the same values."""
    try:
        return column.to_pylist()
    except (OverflowError, ValueError, pa.ArrowException):
        return [column[i] for i in range(len(column))]


def batch_records(batch: pa.RecordBatch | pa.Table) -> list[dict[str, Any]]:
    """The rows of an Arrow batch as dicts (`column_values` for a column Python cannot represent)."""
    try:
        return batch.to_pylist()
    except (OverflowError, ValueError, pa.ArrowException):
        columns = {name: column_values(column) for name, column in zip(batch.schema.names, batch.columns)}
        return [{name: values[i] for name, values in columns.items()} for i in range(batch.num_rows)]


def _dataset_rows(ds: Any, batch_size: int) -> Iterator[CorpusRow]:
    """Rows of a `datasets.Dataset` as their Arrow values (what the output stores; no feature decoding)."""
    index = 0
    for batch in ds.with_format("arrow").iter(batch_size=batch_size):
        for record in batch_records(batch):
            yield CorpusRow(index, record)
            index += 1


# --------------------------------------------------------------------------- input column types (design 2.2)


class InputColumnError(RowError):
    """A row's value does not fit the type decided for its column (the corpus changed since the pass)."""


@dataclass(frozen=True)
class InputColumns:
    """The Arrow type of every input column in the output, one for the whole corpus (design 2.2).

    schema: one field per input column, in order of first appearance in the corpus
    json:   the columns whose values cannot share one Arrow type; they are stored as JSON text
            (type string) in every row, a null value as null

    `policies.records_table(records, columns)` builds every shard with exactly `schema`, so all data files
    of an output share it, whatever the shard boundaries, and a resumed run decides the same.
    """

    schema: pa.Schema
    json: frozenset[str] = frozenset()

    @classmethod
    def infer(cls, records: Iterable[Mapping[str, Any]], chunk_rows: int = COLUMN_CHUNK_ROWS) -> InputColumns:
        """The types of JSON values (JSONL rows), decided over all `records`, `chunk_rows` at a time.

        Per column, the types of its values merge: null goes with anything; int with int (int64 while
        every value fits, uint64 when all are >= 0 and some exceed int64, else no type); int with float
        is float64 while every integer is exactly a float (|i| <= 2**53); lists merge their items,
        objects become structs with the union of their keys. Anything else (str with int, bool with
        int, struct with str, an empty object, integers beyond 64 bits) has no common type: the column
        is JSON text. The result does not depend on `chunk_rows`.
        """
        types: dict[str, tuple] = {}
        chunk: list[Mapping[str, Any]] = []

        def fold() -> None:
            names = dict.fromkeys(name for record in chunk for name in record)
            for name in names:
                chunk_type = _chunk_type([record.get(name) for record in chunk])
                types[name] = _merge(types[name], chunk_type) if name in types else chunk_type
            chunk.clear()

        for record in records:
            chunk.append(record)
            if len(chunk) >= chunk_rows:
                fold()
        if chunk:
            fold()
        fields, json_names = [], set()
        for name, value_type in types.items():
            arrow_type = _arrow_type(value_type)
            if arrow_type is None:
                json_names.add(name)
                arrow_type = pa.string()
            fields.append(pa.field(name, arrow_type))
        return cls(pa.schema(fields), frozenset(json_names))


def json_text(value: Any, **options: Any) -> str:
    """A value of a JSON-text column: JSON, keys in their order; values JSON has no form for (a Parquet
    timestamp, decimal or bytes) as their text."""
    return json.dumps(value, ensure_ascii=False, default=_as_text, **options)


def _as_text(value: Any) -> str:
    try:
        return str(value)
    except Exception:  # noqa: BLE001 - an Arrow scalar whose value Python cannot hold: its repr names it
        return repr(value)


def input_column(values: list[Any], field: pa.Field, as_json: bool) -> pa.Array:
    """One input column of the output: `values` as `field.type` (as JSON text when `as_json`).

    Raises `InputColumnError` naming the column when a value does not fit the type."""
    try:
        if as_json:
            values = [None if v is None else json_text(v) for v in values]
        return pa.array(values, field.type)
    except (pa.ArrowException, OverflowError, TypeError, ValueError, RecursionError) as exc:
        raise InputColumnError(f"column {field.name!r}: a value does not fit the column's type {field.type}, "
                               f"decided over the whole corpus ({type(exc).__name__}: {exc})") from None


# Value types of JSON data, merged over a column (`InputColumns.infer`):
#   ("null",) ("bool",) ("str",) ("int", lo, hi) ("float", largest |int| merged in) ("list", item)
#   ("struct", ((key, type), ...)) ("json",): no common Arrow type
_NULL, _BOOL, _STR, _FLOAT, _JSON = ("null",), ("bool",), ("str",), ("float", 0), ("json",)
_EXACT_FLOAT_INT = 2**53
MAX_COLUMN_DEPTH = 32  # lists/structs deeper than this: JSON text (Parquet readers refuse deep schemas)


def _value_type(value: Any, depth: int = 0) -> tuple:
    if depth > MAX_COLUMN_DEPTH:
        return _JSON if isinstance(value, (list, dict)) else _value_type(value)
    if value is None:
        return _NULL
    kind = type(value)
    if kind is str:
        return _STR
    if kind is bool:
        return _BOOL
    if kind is int:
        return ("int", value, value)
    if kind is float:
        return _FLOAT
    if kind is list:
        item = _NULL
        for element in value:
            item = _merge(item, _value_type(element, depth + 1))
            if item is _JSON:
                return _JSON
        return ("list", item)
    if kind is dict:
        fields = tuple((key, _value_type(element, depth + 1)) for key, element in value.items())
        return _JSON if any(t is _JSON for _, t in fields) else ("struct", fields)
    return _JSON


def _int_magnitude(value_type: tuple) -> int:
    return max(-value_type[1], value_type[2]) if value_type[0] == "int" else value_type[1]


def _merge(a: tuple, b: tuple) -> tuple:
    """The type of values of types a and b together (_JSON: none)."""
    if a == b:
        return a
    if a is _NULL:
        return b
    if b is _NULL:
        return a
    kinds = (a[0], b[0])
    if "json" in kinds:
        return _JSON
    if kinds == ("int", "int"):
        return ("int", min(a[1], b[1]), max(a[2], b[2]))
    if set(kinds) <= {"int", "float"}:
        return ("float", max(_int_magnitude(a), _int_magnitude(b)))
    if kinds[0] != kinds[1]:
        return _JSON
    if kinds[0] == "list":
        item = _merge(a[1], b[1])
        return _JSON if item is _JSON else ("list", item)
    if kinds[0] == "struct":
        fields = dict(a[1])
        for key, value_type in b[1]:
            fields[key] = _merge(fields[key], value_type) if key in fields else value_type
            if fields[key] is _JSON:
                return _JSON
        return ("struct", tuple(fields.items()))
    return a


def _chunk_type(values: list[Any]) -> tuple:
    """The merged type of a chunk of one column's values: Arrow's own inference (fast), or value by value
    when Arrow cannot type them together (integers beyond int64, mixed kinds); the same result either way."""
    try:
        return _arrow_value_type(pa.array(values))
    except (pa.ArrowException, OverflowError, TypeError, ValueError):
        merged = _NULL
        for value in values:
            merged = _merge(merged, _value_type(value))
            if merged is _JSON:
                break
        return merged


def _arrow_value_type(array: pa.Array, depth: int = 0) -> tuple:
    """The value type (see `_merge`) of an array Arrow inferred from JSON values."""
    t = array.type
    if depth > MAX_COLUMN_DEPTH and pa.types.is_nested(t):
        return _JSON
    if pa.types.is_null(t):
        return _NULL
    if pa.types.is_boolean(t):
        return _BOOL
    if pa.types.is_string(t):
        return _STR
    if pa.types.is_int64(t):
        low_high = pc.min_max(array).as_py()
        return ("int", low_high["min"] or 0, low_high["max"] or 0)
    if pa.types.is_float64(t):
        return _FLOAT
    if pa.types.is_list(t):
        item = _arrow_value_type(array.flatten(), depth + 1)
        return _JSON if item is _JSON else ("list", item)
    if pa.types.is_struct(t):
        fields = tuple((t.field(i).name, _arrow_value_type(array.field(i), depth + 1)) for i in range(t.num_fields))
        return _JSON if any(f is _JSON for _, f in fields) else ("struct", fields)
    raise TypeError(f"unexpected inferred type {t}")


def _arrow_type(value_type: tuple) -> pa.DataType | None:
    """The Arrow type of merged JSON values (None: JSON text)."""
    kind = value_type[0]
    if kind == "null":
        return pa.null()
    if kind == "bool":
        return pa.bool_()
    if kind == "str":
        return pa.string()
    if kind == "int":
        low, high = value_type[1], value_type[2]
        if -(2**63) <= low and high < 2**63:
            return pa.int64()
        return pa.uint64() if low >= 0 and high < 2**64 else None
    if kind == "float":
        return pa.float64() if value_type[1] <= _EXACT_FLOAT_INT else None
    if kind == "list":
        item = _arrow_type(value_type[1])
        return None if item is None else pa.list_(item)
    if kind == "struct" and value_type[1]:  # Parquet cannot store a struct without fields ({} in every row)
        fields = [(key, _arrow_type(t)) for key, t in value_type[1]]
        return None if any(t is None for _, t in fields) else pa.struct(fields)
    return None


def _parquet_columns(files: tuple[Path, ...]) -> InputColumns:
    """Parquet: each column keeps its file type; types that differ between files are unified permissively
    (int32 + int64 -> int64, null -> anything) when every file's values convert to the unified type, else
    the column is JSON text."""
    fields: dict[str, list[pa.Field]] = {}
    for path in files:
        with _parquet_read(path):
            schema = pq.read_schema(path)
        for f in schema:
            fields.setdefault(f.name, []).append(f)
    out, json_names = [], set()
    for name, found in fields.items():
        if len(found) == len(files) and all(f.equals(found[0], check_metadata=True) for f in found):
            out.append(found[0])
            continue
        types = list(dict.fromkeys(f.type for f in found))
        if len(types) == 1:
            out.append(pa.field(name, types[0]))
            continue
        field = pa.field(name, pa.string())
        try:
            unified = pa.unify_schemas([pa.schema([pa.field(name, t)]) for t in types], promote_options="permissive")
            candidate = unified.field(name)
            for path in files:
                with _parquet_read(path):
                    parquet = pq.ParquetFile(path)
                    if name in parquet.schema_arrow.names and parquet.schema_arrow.field(name).type != candidate.type:
                        input_column(column_values(parquet.read(columns=[name]).column(name)), candidate, False)
            field = candidate
        except (pa.ArrowException, InputColumnError):
            json_names.add(name)
        out.append(field)
    return InputColumns(pa.schema(out), frozenset(json_names))


# --------------------------------------------------------------------------- row shapes


@dataclass(frozen=True)
class RowShape:
    """How a row maps to a conversation.

    kind "messages":          `messages_field` holds a list of {role, content}.
    kind "prompt_completion": `prompt_field` and `completion_field` each hold a str
                              or a list of messages; a str prompt becomes one user
                              turn, a str completion one assistant turn. Field
                              mapping (GSM8K's question/answer) is this kind with
                              other field names. `system_field`, if set, names a
                              column whose str becomes a leading system turn.
    """

    kind: ShapeKind
    messages_field: str = "messages"
    prompt_field: str = "prompt"
    completion_field: str = "completion"
    system_field: str | None = None

    def describe(self) -> dict[str, str | None]:
        """The shape as recorded in the manifest."""
        if self.kind == "messages":
            return {"kind": self.kind, "messages_field": self.messages_field}
        return {
            "kind": self.kind,
            "prompt_field": self.prompt_field,
            "completion_field": self.completion_field,
            "system_field": self.system_field,
        }


def detect_shape(
    record: Mapping[str, Any] | None,
    *,
    source: str = "the corpus",
    messages_field: str | None = None,
    prompt_field: str | None = None,
    completion_field: str | None = None,
    system_field: str | None = None,
) -> RowShape:
    """The row shape from the flags, else auto-detected from `record` (the first decodable row).

    Flags win: `messages_field` selects the conversational shape;
    `prompt_field` + `completion_field` (both required) select field mapping.
    Without flags: a `messages` column means conversational, `prompt` and
    `completion` columns mean prompt-completion. Raises `CorpusError` when the
    flags conflict or the shape cannot be detected (naming `source`, the input).
    """
    if (prompt_field is None) != (completion_field is None):
        raise CorpusError("--prompt-field and --completion-field must be given together")
    if messages_field is not None and prompt_field is not None:
        raise CorpusError("--messages-field cannot be combined with --prompt-field/--completion-field")
    if messages_field is not None:
        if system_field is not None:
            raise CorpusError("--system-field applies to prompt/completion fields, not to --messages-field")
        return RowShape("messages", messages_field=messages_field)
    if prompt_field is not None and completion_field is not None:
        return RowShape(
            "prompt_completion", prompt_field=prompt_field, completion_field=completion_field, system_field=system_field
        )
    if record is None:
        raise CorpusError(f"{source}: cannot detect the row shape: no row of it decodes; fix the rows, or name the "
                          "shape (--prompt-field and --completion-field, or --messages-field): undecodable rows "
                          "then go to rejects.parquet with their reason")
    if "messages" in record:
        if system_field is not None:
            raise CorpusError("--system-field applies to prompt/completion fields, not to a 'messages' column")
        return RowShape("messages")
    if "prompt" in record and "completion" in record:
        return RowShape("prompt_completion", system_field=system_field)
    raise CorpusError(
        f"cannot detect the row shape from the columns {sorted(record)}: expected 'messages', or 'prompt' and "
        "'completion'. Name your columns with --prompt-field and --completion-field "
        "(e.g. --prompt-field question --completion-field answer)."
    )


def _content(value: Any, where: str) -> str:
    """Message content as a str; a list of text parts ([{type: text, text: ...}]) is joined."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(
        isinstance(p, Mapping) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in value
    ):
        return "".join(p["text"] for p in value)
    got = "null" if value is None else type(value).__name__
    raise RowError(f"{where}: content must be a string (or a list of text parts), got {got}")


def _messages(value: Any, field: str) -> Conversation:
    if not isinstance(value, list):
        got = "null" if value is None else type(value).__name__
        raise RowError(f"field '{field}' must be a list of {{role, content}} messages, got {got}")
    if not value:
        raise RowError(f"field '{field}' is an empty list of messages")
    conversation: Conversation = []
    for i, message in enumerate(value):
        where = f"field '{field}'[{i}]"
        if not isinstance(message, Mapping):
            raise RowError(f"{where} must be a {{role, content}} object, got {type(message).__name__}")
        if "role" not in message:
            raise RowError(f"{where}: missing key 'role'")
        if "content" not in message:
            raise RowError(f"{where}: missing key 'content'")
        role = message["role"]
        if not isinstance(role, str) or not role:
            raise RowError(f"{where}: role must be a non-empty string, got {role!r}")
        conversation.append({"role": role, "content": _content(message["content"], where)})
    return conversation


def _field(record: Mapping[str, Any], field: str) -> Any:
    if field not in record:
        raise RowError(f"missing field '{field}'")
    return record[field]


def _check_completions(turns: Conversation, field: str) -> None:
    """At least one assistant turn in `turns`, and none with empty content."""
    if not any(m["role"] == _ROLE_ASSISTANT for m in turns):
        raise RowError(f"no assistant turn in field '{field}': nothing to train on")
    for i, message in enumerate(turns):
        if message["role"] == _ROLE_ASSISTANT and not message["content"].strip():
            raise RowError(f"empty completion: field '{field}'[{i}] is an assistant turn with empty content")


def to_conversation(record: Mapping[str, Any], shape: RowShape) -> Conversation:
    """Normalize one row to a list of {"role", "content"} messages (both str).

    The completion is exactly the `assistant` turns, except an assistant turn
    that comes from a prompt-completion *prompt* (few-shot context, TRL
    semantics: only the completion is trained on): it carries the extra key
    `"train": False`. Every trained assistant turn is non-empty, at least one
    exists, and the conversation does not start with one (a completion needs a
    prompt before it). Raises `RowError` whose reason names the field
    ("missing field 'answer'", "field 'answer' must be a string or a list of
    messages, got int", "empty completion: field 'answer' is empty").
    """
    if shape.kind == "messages":
        conversation = _messages(_field(record, shape.messages_field), shape.messages_field)
        _check_completions(conversation, shape.messages_field)
        if conversation[0]["role"] == _ROLE_ASSISTANT:
            raise RowError(f"field '{shape.messages_field}' {_STARTS_WITH_ASSISTANT}")
        return conversation

    prompt = _field(record, shape.prompt_field)
    completion = _field(record, shape.completion_field)
    conversation = []
    if shape.system_field is not None:
        system = _field(record, shape.system_field)
        if system is not None and not isinstance(system, str):
            raise RowError(f"field '{shape.system_field}' must be a string, got {type(system).__name__}")
        if system:
            conversation.append({"role": "system", "content": system})

    if isinstance(prompt, str):
        conversation.append({"role": "user", "content": prompt})
    elif isinstance(prompt, list):
        for message in _messages(prompt, shape.prompt_field):
            if message["role"] == _ROLE_ASSISTANT:
                message["train"] = False
            conversation.append(message)
    else:
        got = "null" if prompt is None else type(prompt).__name__
        raise RowError(f"field '{shape.prompt_field}' must be a string or a list of messages, got {got}")

    if isinstance(completion, str):
        if not completion.strip():
            raise RowError(f"empty completion: field '{shape.completion_field}' is empty")
        conversation.append({"role": _ROLE_ASSISTANT, "content": completion})
    elif isinstance(completion, list):
        turns = _messages(completion, shape.completion_field)
        _check_completions(turns, shape.completion_field)
        conversation.extend(turns)
    else:
        got = "null" if completion is None else type(completion).__name__
        raise RowError(f"field '{shape.completion_field}' must be a string or a list of messages, got {got}")

    if conversation[0]["role"] == _ROLE_ASSISTANT:
        raise RowError(f"field '{shape.prompt_field}' {_STARTS_WITH_ASSISTANT}")
    return conversation


def is_completion_turn(message: Message) -> bool:
    """True when the message's tokens are completion (trained on): an assistant turn not marked `train: False`."""
    return message["role"] == _ROLE_ASSISTANT and message.get("train", True) is not False
