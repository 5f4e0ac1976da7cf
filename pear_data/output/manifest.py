"""Reading an output's records back: manifest.json, .pear/progress.json, and the data files they list.

Every failure here names the file (InputError, exit 2): a damaged or foreign JSON file, a record of the wrong
shape.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from ..errors import InputError
from .layout import DATA_DIR, DATA_FILE, DATA_NAME, MANIFEST_FILE, PROGRESS_FILE, STATE_DIR
from .shard import ShardRecord


def key_diff(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Dotted paths where two JSON values differ, each as 'key: old -> new'."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in sorted(set(old) | set(new)):
            path = f"{prefix}.{key}" if prefix else key
            if key not in old:
                out.append(f"{path}: <absent> -> {json.dumps(new[key])}")
            elif key not in new:
                out.append(f"{path}: {json.dumps(old[key])} -> <absent>")
            else:
                out.extend(key_diff(old[key], new[key], path))
        return out
    if old != new:
        return [f"{prefix or '<run_key>'}: {json.dumps(old)} -> {json.dumps(new)}"]
    return []


def read_json_file(path: Path, what: str) -> dict:
    """A JSON object from `path`; InputError naming the file when it is unreadable or not a JSON object."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise InputError(f"{path}: cannot read {what} ({exc}); restore it, or write the output again") from None
    if not isinstance(value, dict):
        raise InputError(f"{path}: {what} must be a JSON object, got {type(value).__name__}; restore it, or write "
                         "the output again")
    return value


def check_records(value: dict, path: Path, what: str) -> dict:
    """The parts of a manifest / progress.json that pear-data reads back, checked: InputError naming the key."""
    def bad(key: str, got: Any, expected: str) -> InputError:
        return InputError(f"{path}: {what} is damaged: {key} is {json.dumps(got)[:80]}, expected {expected}; "
                          "restore it, or write the output again")

    def count(key: str, got: Any) -> None:
        if isinstance(got, bool) or not isinstance(got, int) or got < 0:
            raise bad(key, got, "a count (an integer >= 0)")

    shards = value.get("shards", [])
    if not isinstance(shards, list):
        raise bad("shards", shards, "a list of shard records")
    for i, record in enumerate(shards):
        if not isinstance(record, dict):
            raise bad(f"shards[{i}]", record, "a shard record (an object)")
        data_file = record.get("data_file")
        if data_file is not None and not (isinstance(data_file, str) and DATA_FILE.match(data_file)):
            raise bad(f"shards[{i}].data_file", data_file, "null or a path like data/part-00000.parquet")
        for key in ("shard", "input_start", "input_end", "rows_out", "rows_rejected", "rows_dropped"):
            if key in record:
                count(f"shards[{i}].{key}", record[key])
        if "stats" in record and not isinstance(record["stats"], dict):
            raise bad(f"shards[{i}].stats", record["stats"], "an object")
    rows = value.get("rows", {})
    if not isinstance(rows, dict):
        raise bad("rows", rows, "an object with in, out and rejected")
    for key in ("in", "out", "rejected"):
        if key in rows:
            count(f"rows.{key}", rows[key])
    for key in ("rewrites", "warnings"):
        if key in value and not isinstance(value[key], list):
            raise bad(key, value[key], "a list")
    for key in ("weights", "diagnostics", "run_key"):
        if key in value and value[key] is not None and not isinstance(value[key], dict):
            raise bad(key, value[key], "an object")
    return value


def read_manifest(out_dir: str | Path) -> dict:
    """OUT/manifest.json as a dict; InputError naming the path if the run never finished or it is damaged."""
    path = Path(out_dir) / MANIFEST_FILE
    if not path.is_file():
        raise InputError(
            f"{path} not found: {out_dir} is not a finished pear-data output (finish the command that writes it: "
            "`score` continues with --resume, `reweight` is rerun with --overwrite)"
        )
    return check_records(read_json_file(path, "the manifest"), path, "the manifest")


def read_progress(out_dir: str | Path) -> dict | None:
    """OUT/.pear/progress.json as a dict, or None when OUT has no resume state."""
    path = Path(out_dir) / STATE_DIR / PROGRESS_FILE
    if not path.is_file():
        return None
    progress = check_records(read_json_file(path, "the resume state"), path, "the resume state")
    for i, record in enumerate(progress.get("shards", [])):
        optional = ("stats", "rows_dropped")
        missing = [f.name for f in dataclasses.fields(ShardRecord) if f.name not in record and f.name not in optional]
        if missing:
            raise InputError(f"{path}: the resume state is damaged: shards[{i}] lacks {', '.join(missing)}; "
                             "restore it, or write the output again")
    return progress


def data_files(out_dir: str | Path) -> list[Path]:
    """The output's data files in row order.

    From `.pear/progress.json` when present (so a running or crashed output
    lists only committed shards), else from manifest.json's shards (an output
    downloaded from the Hub), else every data/part-*.parquet.
    """
    out_dir = Path(out_dir)
    source = read_progress(out_dir)
    if source is None and (out_dir / MANIFEST_FILE).is_file():
        source = read_manifest(out_dir)
    if source is not None:
        return [out_dir / r["data_file"] for r in source.get("shards", []) if r.get("data_file")]
    found = [p for p in (out_dir / DATA_DIR).glob("part-*.parquet") if DATA_NAME.match(p.name)]
    return sorted(found, key=lambda p: int(DATA_NAME.match(p.name).group(1)))


def data_schema(out_dir: str | Path) -> pa.Schema | None:
    """Arrow schema of the first data file, schema-level metadata removed (None if no data files)."""
    files = data_files(out_dir)
    return pq.read_schema(files[0]).remove_metadata() if files else None
