"""The output directory of a pear-data command (docs/design.md 2.3, 6): written crash-safe, shard by shard, one
run at a time; read back by its records.

    layout.py    the names and what a directory is (ownership, input and output apart)
    files.py     atomic writes: temp, fsync, rename; JSON and Parquet the same way every time
    lock.py      one run at a time (flock on OUT/.pear/lock)
    shard.py     a shard: the open shard that writes it, its record once committed
    writer.py    DatasetWriter: resume, overwrite, commit, finalize
    rewrite.py   the second commit protocol: rewriting every data file as one resumable step
    manifest.py  reading manifest.json, progress.json and the data files they list
"""

from __future__ import annotations

from .files import atomic_write_bytes, atomic_write_text, write_table_atomic
from .layout import (
    CARD_FILE,
    DATA_DIR,
    LOCK_FILE,
    MANIFEST_FILE,
    OUTPUT_FORMAT,
    PROGRESS_FILE,
    REJECTS_FILE,
    STATE_DIR,
    TOOL_NAME,
    check_out_path,
    check_output_apart,
    inspect_output,
    tool_record,
)
from .lock import lock_holder
from .manifest import data_files, data_schema, read_json_file, read_manifest, read_progress
from .rewrite import rewrite_data_files
from .shard import ShardHandle, ShardRecord
from .writer import DatasetWriter

__all__ = [
    "CARD_FILE", "DATA_DIR", "LOCK_FILE", "MANIFEST_FILE", "OUTPUT_FORMAT", "PROGRESS_FILE", "REJECTS_FILE",
    "STATE_DIR", "TOOL_NAME", "DatasetWriter", "ShardHandle", "ShardRecord", "atomic_write_bytes", "atomic_write_text",
    "check_out_path", "check_output_apart", "data_files", "data_schema", "inspect_output", "lock_holder",
    "read_json_file", "read_manifest", "read_progress", "rewrite_data_files", "tool_record", "write_table_atomic",
]
