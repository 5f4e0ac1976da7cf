"""One Arrow type per input column for the whole output (design 2.2), and the input rows' own columns as a table.

`Corpus.columns` decides the types before any row is scored: Parquet keeps its file types, `datasets` its Arrow
schema, JSONL columns get the type of all their values together (`InputColumns.infer`, over the lattice below),
and a column whose values share no type is JSON text in every row.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ..errors import RowError
from .files import parquet_read
from .records import column_values

COLUMN_CHUNK_ROWS = 4096  # JSONL rows per step of the column-type pass

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


def parquet_columns(files: tuple[Path, ...]) -> InputColumns:
    """Parquet: each column keeps its file type; types that differ between files are unified permissively
    (int32 + int64 -> int64, null -> anything) when every file's values convert to the unified type, else
    the column is JSON text."""
    fields: dict[str, list[pa.Field]] = {}
    for path in files:
        with parquet_read(path):
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
                with parquet_read(path):
                    parquet = pq.ParquetFile(path)
                    if name in parquet.schema_arrow.names and parquet.schema_arrow.field(name).type != candidate.type:
                        input_column(column_values(parquet.read(columns=[name]).column(name)), candidate, False)
            field = candidate
        except (pa.ArrowException, InputColumnError):
            json_names.add(name)
        out.append(field)
    return InputColumns(pa.schema(out), frozenset(json_names))


def records_table(records: list[dict], columns: InputColumns | None = None) -> pa.Table:
    """The input rows' own columns, with exactly `columns.schema` (design 2.2).

    `columns` is decided once over the whole corpus (`Corpus.columns`), so every shard of an output gets
    the same schema; a column in `columns.json` is JSON text in every row. None: decided over `records`
    alone, with the same rules (`InputColumns.infer`). Raises `InputColumnError` naming the column when a
    value does not fit its type.
    """
    if columns is None:
        columns = InputColumns.infer(records)
    names = set(columns.schema.names)
    for record in records:
        if not names.issuperset(record):
            extra = next(name for name in record if name not in names)
            raise InputColumnError(f"column {extra!r} was not in the corpus when its column types were decided")
    arrays = [input_column([record.get(f.name) for record in records], f, f.name in columns.json)
              for f in columns.schema]
    return pa.Table.from_arrays(arrays, schema=columns.schema)
