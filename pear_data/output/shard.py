"""A shard of the output: its record once committed, and the open shard that writes it (docs/design.md 6).

A shard becomes part of the output only when .pear/progress.json lists it (the writer's commit point): its data
file is written to a temp file in .pear/, fsynced and renamed into data/ just before.
"""

from __future__ import annotations

import collections
import dataclasses
import os
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import pyarrow as pa
import pyarrow.parquet as pq

from .files import (
    concat_rejects,
    conform,
    fsync_dir,
    fsync_file,
    jsonable,
    open_parquet,
    strip_metadata,
    unify,
    write_rows,
    write_table_atomic,
)
from .layout import DATA_DIR

# `ShardHandle.write` calls whose rows may wait for the background write thread.
WRITES_IN_FLIGHT = 2


@dataclass
class ShardRecord:
    """One committed shard: input rows [input_start, input_end) went to `data_file` or to rejects.

    `data_file` is relative to OUT ("data/part-00003.parquet"), None when every
    row of the range was rejected or dropped. `stats` is free-form JSON from the caller
    (token counts, weight sums for dataset normalization, ...). `rows_dropped`: rows of the range a command
    left out on purpose (`select`), neither written nor rejected; recorded only when not 0.
    """

    shard: int
    input_start: int
    input_end: int
    data_file: str | None
    rows_out: int
    rows_rejected: int
    stats: dict = field(default_factory=dict)
    rows_dropped: int = 0

    @classmethod
    def from_dict(cls, data: dict) -> ShardRecord:
        return cls(**{f.name: data[f.name] for f in dataclasses.fields(cls) if f.name in data})

    def to_dict(self) -> dict:
        """The record as progress.json and the manifest keep it (`rows_dropped` only when not 0)."""
        record = dataclasses.asdict(self)
        if not self.rows_dropped:
            del record["rows_dropped"]
        return record


class ShardOwner(Protocol):
    """What an open shard needs of the writer that opened it (`output.writer.DatasetWriter`)."""

    out_dir: Path
    state_dir: Path  # OUT/.pear: the shard's temp file and its rejects file
    committed: list[ShardRecord]

    def writing(self) -> AbstractContextManager[None]:
        """Around file work: an OS error becomes an OutputError naming the path and how to go on."""

    def commit_shard(self, record: ShardRecord) -> None:
        """The commit point: progress.json lists `record` once this returns."""

    def lists(self, record: ShardRecord) -> bool:
        """Whether progress.json lists `record` (the commit point was passed)."""

    def shard_closed(self) -> None:
        """The open shard was committed or aborted: the next one may open."""


class ShardHandle:
    """The open shard: `with writer.shard() as shard: shard.write(t); shard.reject(r); shard.commit(end)`.

    Output rows go to a temp Parquet file row group by row group. The encoding
    and compression run on a background thread, in order, so that the caller
    computes the next rows meanwhile; at most WRITES_IN_FLIGHT `write` calls'
    tables wait for it, and `commit` waits for all of them (a failed write
    raises there, or at the next `write`). Rejected rows are held in memory
    until commit (they are expected to be few). Leaving the `with` block by an
    exception commits nothing and removes the temp file; leaving it without
    `commit` is an error.
    """

    def __init__(self, writer: ShardOwner, shard: int, input_start: int) -> None:
        self._writer = writer
        self.shard = shard
        self.input_start = input_start
        self.rows_out = 0
        self.rows_rejected = 0
        self.rows_dropped = 0
        self._tmp: Path = writer.state_dir / f"shard-{shard:05d}.parquet.tmp"
        self._parquet: pq.ParquetWriter | None = None
        self._schema: pa.Schema | None = None
        self._rejects: list[pa.Table] = []
        self._generation = 0
        self._done = False
        self._pending: collections.deque[Future] = collections.deque()
        self._thread: ThreadPoolExecutor | None = None

    def __enter__(self) -> ShardHandle:
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if self._done:
            return False
        self._abort()
        if exc_type is None:
            raise RuntimeError(f"shard {self.shard} left its `with` block without commit(); nothing was written")
        return False

    def write(self, table: pa.Table) -> None:
        """Append output rows (in input order). Column types may be promoted across calls (null -> string, ...)."""
        self._check_open()
        with self._writer.writing():
            self._write(table)

    def _write(self, table: pa.Table) -> None:
        if table.num_rows == 0:
            return
        table = strip_metadata(table)
        if self._parquet is None:
            self._schema = table.schema
            self._parquet = open_parquet(self._tmp, self._schema)
        elif not table.schema.equals(self._schema, check_metadata=False):
            try:
                table = conform(table, self._schema)
            except (KeyError, pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError):
                self._promote(unify([self._schema, table.schema], f"shard {self.shard}"))
                table = conform(table, self._schema)
        if self._thread is None:
            self._thread = self._start_write_thread()
        while len(self._pending) >= WRITES_IN_FLIGHT:
            self._pending.popleft().result()
        self._pending.append(self._thread.submit(write_rows, self._parquet, table))
        self.rows_out += table.num_rows

    @staticmethod
    def _start_write_thread() -> ThreadPoolExecutor:
        """The shard's write thread, started before any write is queued. A Ctrl-C that lands while a thread
        starts leaves that thread outside its executor's shutdown (it would not be waited for); here it can only
        be this idle one, never one that still writes to the file an abort then closes."""
        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pear-write")
        executor.submit(int).result()
        return executor

    def _drain(self) -> None:
        """Wait for every queued write; a failed one raises here."""
        while self._pending:
            self._pending.popleft().result()
        if self._thread is not None:
            self._thread.shutdown()
            self._thread = None

    def _promote(self, schema: pa.Schema) -> None:
        # Rare path: a later batch brought a wider type (e.g. null -> string). ParquetWriter cannot
        # append or change its schema, so copy what was written so far into a new temp file.
        self._drain()
        self._parquet.close()
        self._generation += 1
        old, self._tmp = self._tmp, self._writer.state_dir / f"shard-{self.shard:05d}-{self._generation}.parquet.tmp"
        reader = pq.ParquetFile(old)
        self._parquet = open_parquet(self._tmp, schema)
        for i in range(reader.num_row_groups):
            write_rows(self._parquet, conform(reader.read_row_group(i), schema))
        old.unlink()
        self._schema = schema

    def reject(self, table: pa.Table) -> None:
        """Rows that could not be processed: needs `row_index` (input row, int) and `reject_reason` (str)."""
        self._check_open()
        missing = [c for c in ("row_index", "reject_reason") if c not in table.column_names]
        if missing:
            raise ValueError(f"reject table lacks column(s) {missing}; has {table.column_names}")
        if table.num_rows == 0:
            return
        table = strip_metadata(table)
        table = table.set_column(table.schema.get_field_index("row_index"), "row_index",
                                 table["row_index"].cast(pa.int64()))
        table = table.set_column(
            table.schema.get_field_index("reject_reason"), "reject_reason", table["reject_reason"].cast(pa.string())
        )
        self._rejects.append(table)
        self.rows_rejected += table.num_rows

    def drop(self, count: int) -> None:
        """Count `count` rows of the shard's input range that are left out on purpose (`select`): neither
        written nor rejected."""
        self._check_open()
        self.rows_dropped += count

    def commit(self, input_end: int, stats: dict | None = None) -> ShardRecord:
        """Make the shard part of the output: input rows [input_start, input_end) are now done.

        Checks rows_out + rows_rejected + rows_dropped == input_end - input_start (RuntimeError
        otherwise) and that reject row_index values lie in the range.
        """
        self._check_open()
        with self._writer.writing():
            return self._commit(input_end, stats)

    def _commit(self, input_end: int, stats: dict | None) -> ShardRecord:
        n_in = input_end - self.input_start
        if n_in < 0 or self.rows_out + self.rows_rejected + self.rows_dropped != n_in:
            raise RuntimeError(
                f"shard {self.shard}: input rows [{self.input_start}, {input_end}) = {n_in} but "
                f"{self.rows_out} written + {self.rows_rejected} rejected + {self.rows_dropped} dropped; every "
                "input row must end up in exactly one of data/ or rejects (or be dropped on purpose)"
            )
        stats = jsonable(stats or {}, "stats")
        writer = self._writer
        rejects_path = writer.state_dir / f"rejects-{self.shard:05d}.parquet"
        if self._rejects:
            rejects = concat_rejects(self._rejects)
            lo, hi = rejects["row_index"][0].as_py(), rejects["row_index"][-1].as_py()
            if rejects["row_index"].null_count or lo < self.input_start or hi >= input_end:
                raise RuntimeError(
                    f"shard {self.shard}: reject row_index range [{lo}, {hi}] is outside the shard's "
                    f"input rows [{self.input_start}, {input_end})"
                )
            write_table_atomic(rejects_path, rejects)
        data_file = None
        self._drain()
        if self._parquet is not None:
            self._parquet.close()
            self._parquet = None
            fsync_file(self._tmp)
            n_files = sum(1 for r in writer.committed if r.data_file is not None)
            data_file = f"{DATA_DIR}/part-{n_files:05d}.parquet"
            os.replace(self._tmp, writer.out_dir / data_file)
            fsync_dir(writer.out_dir / DATA_DIR)
        record = ShardRecord(
            shard=self.shard,
            input_start=self.input_start,
            input_end=input_end,
            data_file=data_file,
            rows_out=self.rows_out,
            rows_rejected=self.rows_rejected,
            stats=stats,
            rows_dropped=self.rows_dropped,
        )
        try:
            writer.commit_shard(record)
        except BaseException:
            # Take back what this shard put in place, unless progress.json lists it already: a Ctrl-C can
            # arrive after the commit point, and the files of a committed shard must stay.
            if not writer.lists(record):
                if data_file is not None:
                    (writer.out_dir / data_file).unlink(missing_ok=True)
                rejects_path.unlink(missing_ok=True)
            raise
        finally:
            self._done = True
            writer.shard_closed()
        return record

    def _check_open(self) -> None:
        if self._done:
            raise RuntimeError(f"shard {self.shard} is already committed or aborted")

    def _abort(self) -> None:
        self._done = True
        self._writer.shard_closed()
        try:
            self._drain()
        except Exception:  # noqa: BLE001 - aborting: the shard is discarded either way
            pass
        if self._thread is not None:  # a failed write stopped the drain: the queued ones end before the close
            self._thread.shutdown(wait=True)
            self._thread = None
        if self._parquet is not None:
            try:
                self._parquet.close()
            except Exception:
                pass
            self._parquet = None
        self._tmp.unlink(missing_ok=True)
        self._rejects = []
