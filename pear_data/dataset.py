"""Reading scored data back: the Parquet files of a pear-data output (or any Parquet with the scored columns).

Used by `reweight` and `stats`: which files, in which order, their fingerprint,
and a schema check that names the file and the missing columns.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from .errors import InputError
from .schema import REQUIRED_SCORED, missing_columns
from .writer import DATA_DIR, MANIFEST_FILE, REJECTS_FILE, STATE_DIR, data_files


def source_files(src: str | Path) -> list[Path]:
    """Parquet files of SRC in row order: a pear-data output dir (its data files, in shard order), a dir of
    Parquet files (sorted, recursively), or one file."""
    src = Path(src)
    if src.is_file():
        return [src]
    if not src.is_dir():
        raise InputError(f"{src}: no such file or directory")
    if (src / MANIFEST_FILE).is_file() and (src / DATA_DIR).is_dir():
        files = data_files(src)
    else:
        files = sorted(p for p in src.rglob("*.parquet") if STATE_DIR not in p.parts and p.name != REJECTS_FILE)
    if not files:
        raise InputError(f"{src}: no Parquet files found")
    return files


def files_fingerprint(files: list[Path]) -> str:
    """sha256 over the files' names (in order) and bytes."""
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode() + b"\0")
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 22), b""):
                digest.update(block)
    return digest.hexdigest()


def read_schema(path: Path) -> pa.Schema:
    """The Arrow schema of a Parquet file; InputError naming the file when it is not readable Parquet."""
    try:
        return pq.read_schema(path)
    except (OSError, pa.ArrowException) as exc:
        raise InputError(f"{path}: not a readable Parquet file ({exc})") from None


def check_scored(files: list[Path], required: tuple[str, ...] = REQUIRED_SCORED) -> pa.Schema:
    """The first file's schema, after checking that every file has the `required` columns."""
    for path in files:
        missing = missing_columns(read_schema(path), required)
        if missing:
            raise InputError(
                f"{path}: missing column(s) {', '.join(missing)}; this needs {', '.join(required)} "
                "(run `pear-data score` first)"
            )
    return read_schema(files[0])
