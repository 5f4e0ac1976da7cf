"""Opening corpus files: which files, gzip or not, a byte-order mark, a JSON array; every failure names the file.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

import pyarrow as pa
import pyarrow.parquet as pq

from ..errors import CorpusError
from .records import too_deep_reason

JSONL_SUFFIXES = (".jsonl", ".ndjson", ".json")

PARQUET_SUFFIXES = (".parquet",)

UTF8_BOM = b"\xef\xbb\xbf"

UTF16_BOMS = (b"\xff\xfe", b"\xfe\xff")


def strip_gz(path: Path) -> str:
    name = path.name.lower()
    return name[:-3] if name.endswith(".gz") else name


def is_jsonl(path: Path) -> bool:
    return strip_gz(path).endswith(JSONL_SUFFIXES)


def is_parquet(path: Path) -> bool:
    return path.name.lower().endswith(PARQUET_SUFFIXES)


@contextlib.contextmanager
def open_binary(path: Path) -> Iterator[BinaryIO]:
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
def parquet_read(path: Path) -> Iterator[None]:
    """A Parquet file pyarrow cannot read (truncated, corrupt pages, not Parquet at all) as a CorpusError naming
    it; pyarrow raises OSError or an ArrowException, at open or while the rows are read (so reads happen inside
    this block)."""
    try:
        yield
    except (OSError, pa.ArrowException) as exc:
        raise CorpusError(f"{path}: not a readable Parquet file ({exc}); the file is damaged or truncated: "
                          "restore it, or write it again") from None


def parquet_num_rows(path: Path) -> int:
    with parquet_read(path):
        return pq.ParquetFile(path).metadata.num_rows


def files_under(root: Path) -> tuple[Path, ...]:
    """Every regular file under `root`, sorted by relative POSIX path (the read order)."""
    files = (p for p in root.rglob("*") if p.is_file())
    return tuple(sorted(files, key=lambda p: p.relative_to(root).as_posix()))


def file_lines(path: Path, fh: BinaryIO) -> Iterator[bytes]:
    """The lines of a JSONL file; a UTF-8 byte-order mark is the encoding marker, not data (utf-8-sig)."""
    first = True
    for line in fh:
        if first:
            first = False
            if line.startswith(UTF16_BOMS):
                raise CorpusError(f"{path}: the file is UTF-16 text (it starts with a UTF-16 byte-order mark); "
                                  "JSONL must be UTF-8: convert it, e.g. `iconv -f UTF-16 -t UTF-8`")
            line = line.removeprefix(UTF8_BOM)
        yield line


def is_json_array(path: Path) -> bool:
    """A `.json` file whose first non-blank byte (after a UTF-8 byte-order mark) is '[' (a JSON array, not JSONL)."""
    if not strip_gz(path).endswith(".json"):
        return False
    with open_binary(path) as fh:
        head = fh.read(4096).removeprefix(UTF8_BOM).lstrip()
    return head.startswith(b"[")


def json_array(path: Path) -> tuple[bytes, list[Any]]:
    """(the file's bytes, its items); a UTF-8 byte-order mark is skipped, UTF-16/32 are detected by `json`."""
    with open_binary(path) as fh:
        data = fh.read()
    try:
        items = json.loads(data.removeprefix(UTF8_BOM))
    except RecursionError:
        raise CorpusError(f"{path}: the JSON array is {too_deep_reason()}; use JSONL (one object per line) to "
                          "reject such rows one by one") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CorpusError(
            f"{path}: invalid JSON array ({exc}); use JSONL (one object per line) to reject bad rows one by one"
        ) from exc
    return data, items
