"""An input row as read (`CorpusRow`), and the checks that make a row undecodable rather than an error of the
run: invalid JSON, a lone UTF-16 surrogate, nesting deeper than `MAX_NESTING` (design 2.1).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import pyarrow as pa


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


# Rows nested deeper are rejects: deeper values reach recursion limits (json, Arrow, Parquet readers).
MAX_NESTING = 200


def too_deep_reason() -> str:
    return f"nested more than {MAX_NESTING} levels deep (lists and objects); pear-data does not keep such rows"


def nesting(value: Any) -> int:
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
SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")

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


def decode_line(line: bytes, where: str) -> tuple[dict[str, Any] | None, str | None]:
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
        return None, f"{where}: {too_deep_reason()}"
    if not isinstance(record, dict):
        return None, f"{where}: expected a JSON object, got {type(record).__name__}"
    if line.count(b"[") + line.count(b"{") > MAX_NESTING and nesting(record) > MAX_NESTING:
        return None, f"{where}: {too_deep_reason()}"
    if SURROGATE_ESCAPE.search(line):
        reason = lone_surrogate(record)
        if reason is not None:
            return None, f"{where}: {reason}"
    return record, None


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
