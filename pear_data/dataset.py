"""Reading scored data back: the Parquet files of a pear-data output (or any Parquet with the scored columns).

Used by `reweight`, `stats` and the `score` resume: which files, in which order,
their fingerprint, a schema check that names the file, the column and what is
wrong with it, and readers that name the file when its bytes are damaged
(`read_batches`, `read_table`): every failure here is an InputError (exit 2).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from .errors import InputError
from .schema import (
    BEHAVIOR_LOGPROBS,
    COMPLETION_MASK,
    INPUT_IDS,
    REQUIRED_SCORED,
    SHARED_BOUNDARY,
    TARGET_LOGPROBS,
    WEIGHT_COLUMNS,
    missing_columns,
)
from .writer import DATA_DIR, MANIFEST_FILE, REJECTS_FILE, STATE_DIR, data_files

# What each column read back must hold: a list of integers (bool too, for masks), a list of floats, a float.
_INTEGER_LIST = (INPUT_IDS, COMPLETION_MASK, SHARED_BOUNDARY)
_FLOAT_LIST = (TARGET_LOGPROBS, BEHAVIOR_LOGPROBS, WEIGHT_COLUMNS["token"], WEIGHT_COLUMNS["block"])
_FLOAT = (WEIGHT_COLUMNS["sequence"],)

_DAMAGED = "the file is damaged or truncated: restore it, or write it again"


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
        missing = [p for p in files if not p.is_file()]
        if missing:
            raise InputError(f"{src}: data file(s) listed by the output are missing: "
                             f"{', '.join(str(p) for p in missing[:5])}; restore them, or write the output again")
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
        try:
            with open(path, "rb") as handle:
                for block in iter(lambda: handle.read(1 << 22), b""):
                    digest.update(block)
        except OSError as exc:
            raise InputError(f"{path}: cannot read ({exc.strerror or exc})") from None
    return digest.hexdigest()


def read_schema(path: Path) -> pa.Schema:
    """The Arrow schema of a Parquet file; InputError naming the file when it is not readable Parquet."""
    try:
        return pq.read_schema(path)
    except (OSError, pa.ArrowException) as exc:
        raise InputError(f"{path}: not a readable Parquet file ({exc}); {_DAMAGED}") from None


def _kind_problem(name: str, field_type: pa.DataType) -> str | None:
    """What is wrong with the type of a scored column, or None."""
    listed = (pa.types.is_list(field_type) or pa.types.is_large_list(field_type)
              or pa.types.is_fixed_size_list(field_type))
    value = field_type.value_type if listed else None
    if name in _INTEGER_LIST:
        if not (listed and (pa.types.is_integer(value) or pa.types.is_boolean(value))):
            return "a list of integers"
    elif name in _FLOAT_LIST:
        if not (listed and (pa.types.is_floating(value) or pa.types.is_integer(value))):
            return "a list of floats"
    elif name in _FLOAT:
        if not (pa.types.is_floating(field_type) or pa.types.is_integer(field_type)):
            return "a float"
    return None


def check_scored(files: list[Path], required: tuple[str, ...] = REQUIRED_SCORED) -> pa.Schema:
    """The first file's schema, after checking that every file has the `required` columns, of the right types
    (and `shared_boundary`, when present)."""
    for path in files:
        schema = read_schema(path)
        missing = missing_columns(schema, required)
        if missing:
            raise InputError(
                f"{path}: missing column(s) {', '.join(missing)}; this needs {', '.join(required)} "
                "(run `pear-data score` first)"
            )
        for name in (*required, SHARED_BOUNDARY):
            if name not in schema.names:
                continue
            expected = _kind_problem(name, schema.field(name).type)
            if expected:
                raise InputError(
                    f"{path}: column {name} is {schema.field(name).type}, but pear-data needs {expected} there "
                    "(the columns `pear-data score` writes: docs/design.md section 2)"
                )
    return read_schema(files[0])


def read_batches(path: Path, batch_rows: int, columns: list[str] | None = None) -> Iterator[pa.RecordBatch]:
    """The rows of one Parquet file, `batch_rows` at a time; InputError naming the file when its bytes fail."""
    try:
        batches = pq.ParquetFile(path).iter_batches(batch_size=batch_rows, columns=columns)
        while True:
            try:
                batch = next(batches)
            except StopIteration:
                return
            yield batch
    except (OSError, pa.ArrowException) as exc:
        raise InputError(f"{path}: cannot read its rows ({exc}); {_DAMAGED}") from None


def read_table(path: Path, columns: list[str] | None = None, row_group: int | None = None) -> pa.Table:
    """One Parquet file (or one of its row groups) as a table; InputError naming the file when its bytes fail."""
    try:
        parquet = pq.ParquetFile(path)
        return parquet.read(columns=columns) if row_group is None else parquet.read_row_group(row_group, columns)
    except (OSError, pa.ArrowException) as exc:
        raise InputError(f"{path}: cannot read its rows ({exc}); {_DAMAGED}") from None
