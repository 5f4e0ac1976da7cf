"""The second commit protocol: rewrite every data file of an output, as one named, resumable step (dataset
normalization rewrites the shards once every shard is in; docs/design.md 6, "Resume").

The rewrite is recorded in .pear/progress.json with its pending renames before the first rename: a run killed
after that point finishes the renames when it resumes (`finish_pending_rewrite`) and skips the rewrite.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from .files import (
    atomic_write_text,
    conform,
    dump_json,
    fsync_dir,
    fsync_file,
    open_parquet,
    strip_metadata,
    temp_path,
    write_rows,
)
from .layout import DATA_DIR, PROGRESS_FILE, STATE_DIR
from .manifest import data_files, read_progress


def rewrite_data_files(
    out_dir: str | Path, fn: Callable[[pa.Table], pa.Table], *, name: str | None = None,
    schema: pa.Schema | None = None,
) -> None:
    """Replace every data file's rows by `fn(rows)`, row group by row group (bounded memory).

    Used when dataset-level normalization needs a second pass after scoring.
    `fn` gets one row group (a pa.Table of at most ROW_GROUP_ROWS rows) and
    must return the same number of rows in the same order (RuntimeError
    otherwise); it may add, drop or change columns.

    Atomic as a whole when OUT has `.pear/progress.json`: all new files are
    written as temps first, then progress.json records the planned renames
    (the commit point), then they are applied. A run killed before the commit
    point keeps the old files; after it, the next DatasetWriter(resume=True)
    finishes the renames. `name` (e.g. "normalize-dataset") is recorded in
    progress.json "rewrites" at the commit point, so a resumed caller can see
    that the rewrite was already applied and must not be redone. The run is
    marked unfinished: call `finalize` again after a rewrite.
    Without progress.json each file is still replaced atomically, one by one.
    `schema`: write every file with it (`fn`'s output is cast to it); None: the first
    row group's output schema of each file.
    """
    out_dir = Path(out_dir)
    files = data_files(out_dir)
    plan: list[tuple[Path, Path]] = []
    try:
        for path in files:
            plan.append((_rewrite_file(path, fn, schema), path))
    except BaseException:
        for path in files:
            temp_path(path).unlink(missing_ok=True)
        raise
    _apply(out_dir, plan, name)


def _rewrite_file(path: Path, fn: Callable[[pa.Table], pa.Table], schema: pa.Schema | None) -> Path:
    """`fn` over every row group of the data file `path`, into its temp file (fsynced); returns the temp."""
    tmp = temp_path(path)
    reader = pq.ParquetFile(path)
    writer: pq.ParquetWriter | None = None
    try:
        for i in range(reader.num_row_groups):
            rows = reader.read_row_group(i)
            new = strip_metadata(fn(rows))
            if new.num_rows != rows.num_rows:
                raise RuntimeError(
                    f"rewrite_data_files: fn returned {new.num_rows} rows for {rows.num_rows} "
                    f"(row group {i} of {path.name}); it must keep every row, in order"
                )
            if writer is None:
                file_schema = schema or new.schema
                writer = open_parquet(tmp, file_schema)
            if not new.schema.equals(file_schema, check_metadata=False):
                new = conform(new, file_schema)
            write_rows(writer, new)
    finally:
        if writer is not None:
            writer.close()
    fsync_file(tmp)
    return tmp


def _apply(out_dir: Path, plan: list[tuple[Path, Path]], name: str | None) -> None:
    """Put the rewritten files in place: through progress.json's commit point when the output has one."""
    progress = read_progress(out_dir)
    progress_path = out_dir / STATE_DIR / PROGRESS_FILE
    if progress is None:
        for tmp, path in plan:
            os.replace(tmp, path)
        if plan:
            fsync_dir(out_dir / DATA_DIR)
        return
    progress["finished"] = False
    if name is not None:
        progress["rewrites"] = [*progress.get("rewrites", []), name]
    progress["pending_rewrite"] = [[t.relative_to(out_dir).as_posix(), p.relative_to(out_dir).as_posix()]
                                   for t, p in plan]
    atomic_write_text(progress_path, dump_json(progress))  # commit point
    finish_pending_rewrite(out_dir, progress)
    atomic_write_text(progress_path, dump_json(progress))


def finish_pending_rewrite(out_dir: Path, progress: dict) -> None:
    """Apply the renames a committed rewrite recorded (idempotent); removes the record from `progress`."""
    pending = progress.pop("pending_rewrite", None)
    for tmp, dest in pending or []:
        if (out_dir / tmp).exists():
            os.replace(out_dir / tmp, out_dir / dest)
    if pending:
        fsync_dir(out_dir / DATA_DIR)
