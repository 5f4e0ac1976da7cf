"""Crash-safe file writing: temp file in the target's directory, fsync, `os.replace`; JSON and Parquet the same
way every time (docs/design.md 6, "Resume" and "Determinism").

The Parquet writer options are fixed (`PARQUET_OPTIONS`, `ROW_GROUP_ROWS`) and schema-level metadata (pandas,
huggingface) is dropped: same pyarrow version + same rows = the same bytes.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

# Fixed writer options: they are part of the byte-identical-output contract.
PARQUET_OPTIONS: dict[str, Any] = {
    "compression": "zstd",
    "compression_level": 3,
    "use_dictionary": True,
    "write_statistics": True,
    "version": "2.6",
    "data_page_version": "1.0",
    "store_schema": True,  # keeps int8 / large_list / etc. exact on read-back
}

# Rows per Parquet row group (each `ShardHandle.write` call starts a new row group).
# Rows are token sequences of a few KB each, so 1024 rows stay well under the
# ~100 MB row group size that readers (and the Hub viewer) handle comfortably.
ROW_GROUP_ROWS = 1024


def fsync_dir(path: Path) -> None:
    # Makes a rename durable on POSIX; directories cannot be opened on Windows.
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temp_path(path: Path) -> Path:
    # Hidden (datasets and glob("*.parquet") skip it) and in the same directory (same filesystem).
    return path.with_name(f".{path.name}.tmp")


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write `data` to `path` atomically: temp file in the same directory, fsync, os.replace."""
    path = Path(path)
    tmp = temp_path(path)
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def atomic_write_text(path: str | Path, text: str) -> None:
    """`atomic_write_bytes` for UTF-8 text with '\\n' line endings on every platform."""
    atomic_write_bytes(path, text.encode("utf-8"))


def jsonable(value: Any, where: str = "") -> Any:
    """Plain-JSON copy of `value`: numpy scalars/arrays unboxed, tuples as lists, Paths as strings.

    Non-finite floats become None (JSON has no NaN/inf; a finished run must not
    crash at the last step over a diagnostic that is undefined on empty data).
    """
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        value = float(value)
        return value if math.isfinite(value) else None
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, np.ndarray):
        return jsonable(value.tolist(), where)
    if isinstance(value, Path):
        return value.as_posix()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return jsonable(asdict(value), where)
    if isinstance(value, dict):
        return {str(k): jsonable(v, f"{where}.{k}" if where else str(k)) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v, f"{where}[{i}]") for i, v in enumerate(value)]
    raise TypeError(f"{where or 'value'}: {type(value).__name__} is not JSON-able ({value!r})")


def dump_json(value: Any) -> str:
    return json.dumps(jsonable(value), sort_keys=True, indent=2, ensure_ascii=False, allow_nan=False) + "\n"


def strip_metadata(table: pa.Table) -> pa.Table:
    # pandas / huggingface schema metadata would make bytes depend on how the table was built.
    return table.replace_schema_metadata(None) if table.schema.metadata else table


def conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """`table` with exactly `schema`'s columns (missing ones as nulls) and types. Raises on failure."""
    extra = [name for name in table.column_names if schema.get_field_index(name) < 0]
    if extra:
        raise KeyError(f"columns not in the file schema: {extra}")
    columns = []
    for f in schema:
        if f.name in table.column_names:
            col = table[f.name]
            columns.append(col if col.type == f.type else col.cast(f.type))
        else:
            if not f.nullable:
                raise KeyError(f"column {f.name!r} is missing and not nullable")
            columns.append(pa.nulls(table.num_rows, f.type))
    return pa.Table.from_arrays(columns, schema=schema)


def unify(schemas: list[pa.Schema], what: str) -> pa.Schema:
    try:
        return pa.unify_schemas(schemas, promote_options="permissive")
    except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
        raise ValueError(
            f"{what}: column types differ between batches and cannot be promoted to one type ({exc}). "
            "Make the column type consistent in the input (e.g. cast it in the corpus)."
        ) from exc


def open_parquet(path: Path, schema: pa.Schema) -> pq.ParquetWriter:
    return pq.ParquetWriter(path, schema, **PARQUET_OPTIONS)


def write_rows(writer: pq.ParquetWriter, table: pa.Table) -> None:
    writer.write_table(table, row_group_size=ROW_GROUP_ROWS)


def write_table_atomic(path: str | Path, table: pa.Table) -> None:
    """Write a small in-memory table as Parquet with the fixed options, atomically."""
    path = Path(path)
    table = strip_metadata(table)
    tmp = temp_path(path)
    with open_parquet(tmp, table.schema) as writer:
        write_rows(writer, table)
    fsync_file(tmp)
    os.replace(tmp, path)
    fsync_dir(path.parent)


def copy_cast(src: Path, dst: Path, schema: pa.Schema) -> None:
    """Stream `src` into a new Parquet file `dst` with `schema`, one row group at a time."""
    reader = pq.ParquetFile(src)
    with open_parquet(dst, schema) as writer:
        for i in range(reader.num_row_groups):
            write_rows(writer, conform(strip_metadata(reader.read_row_group(i)), schema))
    fsync_file(dst)


def concat_rejects(tables: list[pa.Table]) -> pa.Table:
    table = pa.concat_tables([strip_metadata(t) for t in tables], promote_options="permissive")
    return table.sort_by([("row_index", "ascending")])
