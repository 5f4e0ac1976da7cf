"""Dataset writer shared by every pear-data command: Parquet shards, rejects, manifest, card, resume.

Output layout (docs/design.md section 2):

    OUT/data/part-00000.parquet ...   # output rows; row order = input order across parts
    OUT/rejects.parquet               # only if any rejects; sorted by row_index; has row_index (int64),
                                      # reject_reason (string) and whatever else the caller put in
    OUT/manifest.json                 # sorted keys, indent 2, no timestamps
    OUT/README.md                     # dataset card (pear_data.card)
    OUT/.pear/                        # resume state and the lock; never uploaded

What `.pear/` holds: `progress.json` (the run key, every committed shard, the
applied rewrites, `finished`), `rejects-NNNNN.parquet` (rejects of shard NNNNN),
`lock` (the process id of the last run that held it) and, only while a shard
is open, `shard-NNNNN.parquet.tmp`. Other temps are hidden `.NAME.tmp` files
next to their target (data/, OUT). It is kept after `finalize` (small:
progress.json plus the per-shard rejects that rejects.parquet duplicates):
that lets `--resume` on a finished output redo `finalize` to the same bytes,
and lets `push` check that the run finished.

How to read the output. It is a directory of Parquet shards, NOT a
`Dataset.save_to_disk` directory, so `datasets.load_from_disk` does not read it.
Any of these do:

    datasets.load_dataset("parquet", data_dir=f"{OUT}/data", split="train")
    datasets.load_dataset(OUT, split="train")            # uses the card's `configs`
    datasets.Dataset.from_parquet(f"{OUT}/data/*.parquet")
    polars.scan_parquet(f"{OUT}/data/*.parquet")

Crash safety. Every file is written to a temp file in its final directory
(an open shard's data: in `.pear/`, same filesystem), fsynced, then
`os.replace`d; a shard becomes part of the output only when
`.pear/progress.json` (also replaced atomically) lists it. A run killed at
any point leaves either the old committed state or the new one, and a resumed
run first deletes temp files and data/reject files that progress.json does
not list. Resuming and redoing the same calls gives the same bytes as a run that
was never interrupted.

Determinism. The Parquet writer options are fixed (`PARQUET_OPTIONS`,
`ROW_GROUP_ROWS`), schema-level metadata (pandas, huggingface) is dropped, and
nothing records a time, a path or a host. Same pyarrow version + same input +
same calls = byte-identical data files, rejects.parquet, manifest.json and
README.md.

Ownership. Every manifest.json and progress.json this module writes carries
`tool` = {"name": "pear-data", "version", "format": OUTPUT_FORMAT}; progress.json
also has its own `format` (PROGRESS_FORMAT). A directory is a pear-data output
only when one of them says so (or it holds nothing but an interrupted start);
`overwrite` replaces nothing else, and inside data/ and .pear/ it deletes only
the file names this module writes (a stray file there refuses the overwrite).
`check_output_apart` refuses an output that is, contains or lies inside an input.

One run at a time. The writer holds an exclusive `flock` on `.pear/lock` from
its start until `close()` (or the end of the process: the kernel releases it
after a kill -9 too). Another process that opens the same OUT gets
OutputLockedError, naming the holder's process id. Writers in one process share
the lock (the Python API may reopen an output it is writing).

Errors. A failed write (a full disk, a read-only or vanished directory) is an
OutputError naming the path and saying how to go on: `--resume` when the
command can resume (committed shards are kept), `--overwrite` otherwise.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import errno
import json
import math
import os
import re
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .errors import (
    InputError,
    OutputError,
    OutputExistsError,
    OutputLockedError,
    PearDataError,
    ResumeMismatchError,
    UsageError,
)

try:
    import fcntl
except ImportError:  # not POSIX: no lock (docs/design.md section 6)
    fcntl = None

DATA_DIR = "data"
STATE_DIR = ".pear"
PROGRESS_FILE = "progress.json"
MANIFEST_FILE = "manifest.json"
CARD_FILE = "README.md"
REJECTS_FILE = "rejects.parquet"
LOCK_FILE = "lock"
TOOL_NAME = "pear-data"
PROGRESS_FORMAT = "pear-data/progress/1"
OUTPUT_FORMAT = "pear-data/output/1"  # the layout of docs/design.md section 2; bump on an incompatible change

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
# `ShardHandle.write` calls whose rows may wait for the background write thread.
WRITES_IN_FLIGHT = 2
# Rows per Parquet row group (each `ShardHandle.write` call starts a new row group).
# Rows are token sequences of a few KB each, so 1024 rows stay well under the
# ~100 MB row group size that readers (and the Hub viewer) handle comfortably.
ROW_GROUP_ROWS = 1024

_DATA_NAME = re.compile(r"^part-(\d{5,})\.parquet$")
_REJECTS_NAME = re.compile(r"^rejects-(\d{5,})\.parquet$")
_DATA_FILE = re.compile(r"^data/part-\d{5,}\.parquet$")  # a shard record's data_file
# Every name this module writes, per folder (temps included): what --overwrite may delete.
_OWN_NAMES = {
    "": re.compile(r"^\.?(rejects\.parquet|manifest\.json|README\.md)(\.tmp)?$"),
    DATA_DIR: re.compile(r"^\.?part-\d{5,}\.parquet(\.tmp)?$"),
    STATE_DIR: re.compile(
        r"^(\.?progress\.json(\.tmp)?|lock|\.?rejects-\d{5,}\.parquet(\.tmp)?|shard-\d{5,}(-\d+)?\.parquet\.tmp)$"
    ),
}


def tool_record() -> dict:
    """The `tool` entry of every manifest.json and progress.json: who wrote the output, in which format."""
    from . import __version__

    return {"name": TOOL_NAME, "version": __version__, "format": OUTPUT_FORMAT}


# ----------------------------------------------------------------------------- small helpers


def _fsync_dir(path: Path) -> None:
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


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _temp_path(path: Path) -> Path:
    # Hidden (datasets and glob("*.parquet") skip it) and in the same directory (same filesystem).
    return path.with_name(f".{path.name}.tmp")


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write `data` to `path` atomically: temp file in the same directory, fsync, os.replace."""
    path = Path(path)
    tmp = _temp_path(path)
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def atomic_write_text(path: str | Path, text: str) -> None:
    """`atomic_write_bytes` for UTF-8 text with '\\n' line endings on every platform."""
    atomic_write_bytes(path, text.encode("utf-8"))


def _jsonable(value: Any, where: str = "") -> Any:
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
        return _jsonable(value.tolist(), where)
    if isinstance(value, Path):
        return value.as_posix()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _jsonable(asdict(value), where)
    if isinstance(value, dict):
        return {str(k): _jsonable(v, f"{where}.{k}" if where else str(k)) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v, f"{where}[{i}]") for i, v in enumerate(value)]
    raise TypeError(f"{where or 'value'}: {type(value).__name__} is not JSON-able ({value!r})")


def _dump_json(value: Any) -> str:
    return json.dumps(_jsonable(value), sort_keys=True, indent=2, ensure_ascii=False, allow_nan=False) + "\n"


def _strip_metadata(table: pa.Table) -> pa.Table:
    # pandas / huggingface schema metadata would make bytes depend on how the table was built.
    return table.replace_schema_metadata(None) if table.schema.metadata else table


def _conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
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


def _unify(schemas: list[pa.Schema], what: str) -> pa.Schema:
    try:
        return pa.unify_schemas(schemas, promote_options="permissive")
    except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
        raise ValueError(
            f"{what}: column types differ between batches and cannot be promoted to one type ({exc}). "
            "Make the column type consistent in the input (e.g. cast it in the corpus)."
        ) from exc


def _open_parquet(path: Path, schema: pa.Schema) -> pq.ParquetWriter:
    return pq.ParquetWriter(path, schema, **PARQUET_OPTIONS)


def _write_rows(writer: pq.ParquetWriter, table: pa.Table) -> None:
    writer.write_table(table, row_group_size=ROW_GROUP_ROWS)


def write_table_atomic(path: str | Path, table: pa.Table) -> None:
    """Write a small in-memory table as Parquet with the fixed options, atomically."""
    path = Path(path)
    table = _strip_metadata(table)
    tmp = _temp_path(path)
    with _open_parquet(tmp, table.schema) as writer:
        _write_rows(writer, table)
    _fsync_file(tmp)
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _copy_cast(src: Path, dst: Path, schema: pa.Schema) -> None:
    """Stream `src` into a new Parquet file `dst` with `schema`, one row group at a time."""
    reader = pq.ParquetFile(src)
    with _open_parquet(dst, schema) as writer:
        for i in range(reader.num_row_groups):
            _write_rows(writer, _conform(_strip_metadata(reader.read_row_group(i)), schema))
    _fsync_file(dst)


def _concat_rejects(tables: list[pa.Table]) -> pa.Table:
    table = pa.concat_tables([_strip_metadata(t) for t in tables], promote_options="permissive")
    return table.sort_by([("row_index", "ascending")])


# ----------------------------------------------------------------------------- records


@dataclass
class ShardRecord:
    """One committed shard: input rows [input_start, input_end) went to `data_file` or to rejects.

    `data_file` is relative to OUT ("data/part-00003.parquet"), None when every
    row of the range was rejected. `stats` is free-form JSON from the caller
    (token counts, weight sums for dataset normalization, ...).
    """

    shard: int
    input_start: int
    input_end: int
    data_file: str | None
    rows_out: int
    rows_rejected: int
    stats: dict = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: dict) -> ShardRecord:
        return cls(**{f.name: data[f.name] for f in dataclasses.fields(cls) if f.name in data})


# ----------------------------------------------------------------------------- the writer


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

    def __init__(self, writer: DatasetWriter, shard: int, input_start: int) -> None:
        self._writer = writer
        self.shard = shard
        self.input_start = input_start
        self.rows_out = 0
        self.rows_rejected = 0
        self._tmp: Path = writer._state / f"shard-{shard:05d}.parquet.tmp"
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
        with self._writer._writing():
            self._write(table)

    def _write(self, table: pa.Table) -> None:
        if table.num_rows == 0:
            return
        table = _strip_metadata(table)
        if self._parquet is None:
            self._schema = table.schema
            self._parquet = _open_parquet(self._tmp, self._schema)
        elif not table.schema.equals(self._schema, check_metadata=False):
            try:
                table = _conform(table, self._schema)
            except (KeyError, pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError):
                self._promote(_unify([self._schema, table.schema], f"shard {self.shard}"))
                table = _conform(table, self._schema)
        if self._thread is None:
            self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pear-write")
        while len(self._pending) >= WRITES_IN_FLIGHT:
            self._pending.popleft().result()
        self._pending.append(self._thread.submit(_write_rows, self._parquet, table))
        self.rows_out += table.num_rows

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
        old, self._tmp = self._tmp, self._writer._state / f"shard-{self.shard:05d}-{self._generation}.parquet.tmp"
        reader = pq.ParquetFile(old)
        self._parquet = _open_parquet(self._tmp, schema)
        for i in range(reader.num_row_groups):
            _write_rows(self._parquet, _conform(reader.read_row_group(i), schema))
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
        table = _strip_metadata(table)
        table = table.set_column(table.schema.get_field_index("row_index"), "row_index",
                                 table["row_index"].cast(pa.int64()))
        table = table.set_column(
            table.schema.get_field_index("reject_reason"), "reject_reason", table["reject_reason"].cast(pa.string())
        )
        self._rejects.append(table)
        self.rows_rejected += table.num_rows

    def commit(self, input_end: int, stats: dict | None = None) -> ShardRecord:
        """Make the shard part of the output: input rows [input_start, input_end) are now done.

        Checks rows_out + rows_rejected == input_end - input_start (RuntimeError
        otherwise) and that reject row_index values lie in the range.
        """
        self._check_open()
        with self._writer._writing():
            return self._commit(input_end, stats)

    def _commit(self, input_end: int, stats: dict | None) -> ShardRecord:
        n_in = input_end - self.input_start
        if n_in < 0 or self.rows_out + self.rows_rejected != n_in:
            raise RuntimeError(
                f"shard {self.shard}: input rows [{self.input_start}, {input_end}) = {n_in} but "
                f"{self.rows_out} written + {self.rows_rejected} rejected; every input row must end up "
                "in exactly one of data/ or rejects"
            )
        stats = _jsonable(stats or {}, "stats")
        writer = self._writer
        rejects_path = writer._state / f"rejects-{self.shard:05d}.parquet"
        if self._rejects:
            rejects = _concat_rejects(self._rejects)
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
            _fsync_file(self._tmp)
            n_files = sum(1 for r in writer.committed if r.data_file is not None)
            data_file = f"{DATA_DIR}/part-{n_files:05d}.parquet"
            os.replace(self._tmp, writer.out_dir / data_file)
            _fsync_dir(writer.out_dir / DATA_DIR)
        record = ShardRecord(
            shard=self.shard,
            input_start=self.input_start,
            input_end=input_end,
            data_file=data_file,
            rows_out=self.rows_out,
            rows_rejected=self.rows_rejected,
            stats=stats,
        )
        try:
            writer._commit(record)
        except BaseException:
            # Take back what this shard put in place, unless progress.json lists it already: a Ctrl-C can
            # arrive after the commit point, and the files of a committed shard must stay.
            if not writer._lists(record):
                if data_file is not None:
                    (writer.out_dir / data_file).unlink(missing_ok=True)
                rejects_path.unlink(missing_ok=True)
            raise
        finally:
            self._done = True
            writer._open = None
        return record

    def _check_open(self) -> None:
        if self._done:
            raise RuntimeError(f"shard {self.shard} is already committed or aborted")

    def _abort(self) -> None:
        self._done = True
        self._writer._open = None
        try:
            self._drain()
        except Exception:  # noqa: BLE001 - aborting: the shard is discarded either way
            pass
        if self._parquet is not None:
            try:
                self._parquet.close()
            except Exception:
                pass
            self._parquet = None
        self._tmp.unlink(missing_ok=True)
        self._rejects = []


# ----------------------------------------------------------------------------- ownership, overlap, lock


@dataclass
class OutputState:
    """What `inspect_output` found in OUT.

    kind:   "absent" (no OUT), "empty", "unused" (pear-data started there but committed nothing:
            nothing to keep), "ours" (a pear-data output: its manifest or its resume state says so),
            "foreign" (anything else: never written to)
    reason: for "foreign", why it is not recognized
    """

    kind: str
    reason: str = ""
    entries: list[str] = field(default_factory=list)
    progress: dict | None = None  # .pear/progress.json, when it is ours
    manifest: bool = False  # manifest.json is ours


def _load_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        return None


def _is_own_tool(value: Any) -> bool:
    tool = value.get("tool") if isinstance(value, dict) else None
    return (isinstance(tool, dict) and tool.get("name") == TOOL_NAME
            and isinstance(tool.get("format"), str) and tool["format"].startswith(f"{TOOL_NAME}/output/"))


def _names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


def stray_files(out_dir: str | Path) -> list[str]:
    """Files in OUT/data/ and OUT/.pear/ that pear-data does not write (an overwrite would lose them)."""
    out_dir = Path(out_dir)
    strays = []
    for folder in (DATA_DIR, STATE_DIR):
        for name in _names(out_dir / folder):
            if not (_OWN_NAMES[folder].match(name) and (out_dir / folder / name).is_file()):
                strays.append(f"{folder}/{name}")
    return strays


def inspect_output(out_dir: str | Path) -> OutputState:
    """Classify OUT without changing anything (see OutputState)."""
    out_dir = Path(out_dir)
    if not out_dir.exists():
        return OutputState("absent")
    entries = _names(out_dir)
    if not entries:
        return OutputState("empty")
    progress_path = out_dir / STATE_DIR / PROGRESS_FILE
    progress = _load_json(progress_path) if progress_path.is_file() else None
    if not (isinstance(progress, dict) and str(progress.get("format", "")).startswith(f"{TOOL_NAME}/progress/")):
        progress = None
    manifest_path = out_dir / MANIFEST_FILE
    manifest = _is_own_tool(_load_json(manifest_path)) if manifest_path.is_file() else False
    state = OutputState("ours", entries=entries, progress=progress, manifest=manifest)
    if progress is None and not manifest:
        # An interrupted start: the lock (and an empty data/), nothing else.
        started = (set(entries) <= {STATE_DIR, DATA_DIR} and not _names(out_dir / DATA_DIR)
                   and set(_names(out_dir / STATE_DIR)) <= {LOCK_FILE, f".{PROGRESS_FILE}.tmp"}
                   and (out_dir / STATE_DIR).is_dir())
        if started:
            state.kind = "unused"
            return state
        state.kind = "foreign"
        if manifest_path.is_file():
            state.reason = (f"its {MANIFEST_FILE} was not written by pear-data: no tool record of format "
                            f"{TOOL_NAME}/output/N")
        elif progress_path.is_file():
            state.reason = f"its {STATE_DIR}/{PROGRESS_FILE} is unreadable or not pear-data's"
        else:
            state.reason = f"no pear-data {MANIFEST_FILE} or {STATE_DIR}/{PROGRESS_FILE}"
        return state
    if (progress is not None and not progress.get("shards") and not progress.get("finished")
            and not manifest_path.exists() and not stray_files(out_dir)):
        state.kind = "unused"  # started, stopped before its first shard (a model that did not load, ...)
    return state


def check_output_apart(inputs: list[str | Path], out_dir: str | Path, what: str = "the input") -> None:
    """UsageError when OUT is an input, lies inside one, or contains one (symlinks resolved).

    Writing there would replace or mix with what is being read: `--overwrite` would delete the input
    before it is read. Called before anything is written.
    """
    out = check_out_path(out_dir)
    for item in inputs:
        src = Path(item).resolve()
        if out == src or src in out.parents or out in src.parents:
            relation = ("is" if out == src else "lies inside" if src in out.parents else "contains")
            raise UsageError(
                f"--out {out_dir} {relation} {what} {item}: pear-data never writes where it reads "
                "(--overwrite would delete the input before reading it). Choose an --out outside the input."
            )


def check_out_path(out_dir: str | Path) -> Path:
    """--out with its symbolic links resolved; OutputError naming the link when one on the way leads nowhere.

    A link that goes round a loop (which `Path.resolve` reports as a RuntimeError, or ELOOP), or that points
    to a path that does not exist (which `mkdir` would report as "File exists"), cannot hold an output.
    """
    out = Path(out_dir)
    try:
        resolved = out.resolve()
    except (RuntimeError, OSError) as exc:
        raise OutputError(f"--out {out_dir}: the path goes round a loop of symbolic links ({exc}); fix or remove "
                          "the link, or choose another --out") from None
    for link in (out, *out.parents):
        if link.is_symlink() and not link.exists():
            raise OutputError(f"--out {out_dir}: {link} is a symbolic link to {os.readlink(link)}, which does not "
                              "exist; create the directory it points to, remove the link, or choose another --out")
    return resolved


class _LockHandle:
    def __init__(self, key: str, fd: int) -> None:
        self.key, self.fd, self.users = key, fd, 1


_LOCKS: dict[str, _LockHandle] = {}  # lock file (real path) -> this process's handle


def _acquire_lock(out_dir: Path, state_dir: Path) -> _LockHandle | None:
    """flock OUT/.pear/lock (shared by the writers of this process). OutputLockedError if another process holds it."""
    if fcntl is None:
        return None
    path = state_dir / LOCK_FILE
    key = os.path.realpath(path)
    held = _LOCKS.get(key)
    if held is not None:
        try:
            if os.path.samestat(os.fstat(held.fd), os.stat(path)):
                held.users += 1
                return held
        except OSError:
            pass
        del _LOCKS[key]  # OUT was deleted and made again: that old lock protects nothing here
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)
        if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise
        raise OutputLockedError(
            f"another pear-data run (process {_holder(path)}) is writing {out_dir}; wait for it to end, or choose "
            f"another --out. The lock ({path}) goes away with that process, kill -9 included."
        ) from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    handle = _LockHandle(key, fd)
    _LOCKS[key] = handle
    return handle


def _holder(lock: Path) -> str:
    """The process id the lock file names (the last run that took it), or "unknown"."""
    try:
        return lock.read_text(encoding="utf-8").strip() or "unknown"
    except OSError:
        return "unknown"


def lock_holder(out_dir: str | Path) -> str | None:
    """The process id of another process that holds OUT/.pear/lock now (a run writing OUT), else None.

    Probes the lock without waiting: a shared flock, released at once. The lock of a writer of this process
    does not count (the Python API may read an output it is writing).
    """
    path = Path(out_dir) / STATE_DIR / LOCK_FILE
    if fcntl is None or os.path.realpath(path) in _LOCKS:
        return None
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None  # no lock file: no run ever wrote here, or the file is gone
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    except OSError as exc:
        if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise
        return _holder(path)
    finally:
        os.close(fd)


def _release_lock(handle: _LockHandle | None) -> None:
    if handle is None or handle.users <= 0:
        return
    handle.users -= 1
    if handle.users == 0:
        if _LOCKS.get(handle.key) is handle:
            del _LOCKS[handle.key]
        os.close(handle.fd)


class DatasetWriter:
    """Writes OUT shard by shard; resumable; `finalize` writes rejects, manifest and card.

    `run_key` identifies the run (input fingerprint and every flag that changes
    output bytes); it is stored in `.pear/progress.json` and a `--resume` with
    a different one raises ResumeMismatchError naming the differing keys.

    - OUT missing or empty, or holding a pear-data start that committed no
      shard (`inspect_output` "unused"): fresh run, whatever the flags.
    - `resume=True` and OUT has `.pear/progress.json`: continue after the last
      committed shard (`committed`, `next_input_row`, `rewrites`, `finished`);
      stray temp files and uncommitted data/reject files are deleted first. On
      a finished output there is nothing left to write: calling `finalize`
      again reproduces the same files.
    - `overwrite=True` on a pear-data output (its manifest or resume state says
      so): deletes what pear-data wrote (data/part-*, rejects.parquet,
      manifest.json, README.md, .pear/ but its lock) and starts fresh. A file
      pear-data does not write inside data/ or .pear/ refuses the overwrite
      (OutputExistsError naming it), before anything is deleted.
    - anything else non-empty: OutputExistsError, and nothing is touched
      (also for `overwrite` on a directory that is not a pear-data output).

    `resumable=False` (commands without `--resume`, e.g. `reweight`): messages
    never suggest `--resume`.

    The writer holds the output's lock until `close()` (or the end of the process).
    """

    def __init__(self, out_dir: str | Path, run_key: dict, *, resume: bool = False, overwrite: bool = False,
                 resumable: bool = True) -> None:
        if resume and overwrite:
            raise UsageError("--resume and --overwrite exclude each other: pick one")
        self.out_dir = Path(out_dir)
        self.run_key: dict = _jsonable(run_key, "run_key")
        self.resumable = resumable
        self.committed: list[ShardRecord] = []
        self.rewrites: list[str] = []
        self.finished = False
        self._open: ShardHandle | None = None
        self._state = self.out_dir / STATE_DIR
        self._progress = self._state / PROGRESS_FILE
        self._lock: _LockHandle | None = None

        check_out_path(self.out_dir)
        if self.out_dir.exists() and not self.out_dir.is_dir():
            raise OutputExistsError(f"{self.out_dir} exists and is not a directory; choose another --out")
        self._plan(resume, overwrite)  # refuse before creating anything
        try:
            self._state.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutputError(
                f"cannot create {exc.filename or self._state}: {exc.strerror or exc}. Choose a writable --out."
            ) from None
        with self._writing():
            self._lock = _acquire_lock(self.out_dir, self._state)
        try:
            with self._writing():
                action = self._plan(resume, overwrite)  # again, under the lock: the state cannot change now
                if action == "resume":
                    self._restore()
                elif action in ("fresh", "overwrite"):
                    self._delete_previous()
                (self.out_dir / DATA_DIR).mkdir(exist_ok=True)
                if not self._progress.is_file():
                    self._save_progress(self.committed)
        except BaseException:
            self.close()
            raise

    def _plan(self, resume: bool, overwrite: bool) -> str:
        """"fresh", "resume" or "overwrite", or the error for this OUT and these flags (changes nothing)."""
        state = inspect_output(self.out_dir)
        if state.kind == "foreign":
            shown = ", ".join(state.entries[:5]) + (", ..." if len(state.entries) > 5 else "")
            raise OutputExistsError(
                f"{self.out_dir} is not empty and is not a pear-data output ({state.reason}; found {shown}). "
                "pear-data replaces only what it wrote: choose an empty or new --out."
            )
        if state.kind in ("absent", "empty", "unused"):
            return "fresh"
        if overwrite:
            strays = stray_files(self.out_dir)
            if strays:
                raise OutputExistsError(
                    f"--overwrite: {self.out_dir} holds files pear-data did not write: {', '.join(strays[:5])}"
                    f"{', ...' if len(strays) > 5 else ''}. Move them out of {self.out_dir} (nothing was deleted), "
                    "or choose another --out."
                )
            return "overwrite"
        if resume:
            if state.progress is not None:
                return "resume"
            raise OutputExistsError(
                f"{self.out_dir} holds a pear-data output without resume state ({STATE_DIR}/{PROGRESS_FILE}); "
                "it cannot be resumed. Pass --overwrite to replace it or choose another --out."
            )
        if self.resumable:
            raise OutputExistsError(
                f"{self.out_dir} already holds a pear-data output. Pass --resume to continue it "
                "(same input and flags) or --overwrite to replace it."
            )
        raise OutputExistsError(
            f"{self.out_dir} already holds a pear-data output. Pass --overwrite to replace it, or choose another --out."
        )

    def close(self) -> None:
        """Release the output's lock (idempotent). The writer must not write after this."""
        lock, self._lock = self._lock, None
        _release_lock(lock)

    def __enter__(self) -> DatasetWriter:
        return self

    def __exit__(self, *exc_info) -> bool:
        self.close()
        return False

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()

    @contextlib.contextmanager
    def _writing(self) -> Iterator[None]:
        """A failed write (full disk, read-only or vanished directory) as an OutputError that says how to go on."""
        try:
            yield
        except PearDataError:
            raise
        except OSError as exc:
            where = exc.filename or self.out_dir
            detail = exc.strerror or str(exc) or type(exc).__name__
            if self.resumable:
                advice = ("Committed shards are kept: fix the cause (free space, permissions) and rerun the same "
                          "command with --resume.")
            else:
                advice = "Fix the cause (free space, permissions) and rerun the command with --overwrite."
            raise OutputError(f"cannot write {where} (output {self.out_dir}): {detail}. {advice}") from exc

    # -- state -------------------------------------------------------------------------------

    @property
    def next_input_row(self) -> int:
        """First input row not yet covered by a committed shard (0 on a fresh run)."""
        return self.committed[-1].input_end if self.committed else 0

    def _progress_dict(self, committed: list[ShardRecord], **extra: Any) -> dict:
        return {
            "format": PROGRESS_FORMAT,
            "tool": tool_record(),
            "run_key": self.run_key,
            "shards": [asdict(r) for r in committed],
            "rewrites": list(self.rewrites),
            "finished": self.finished,
            **extra,
        }

    def _save_progress(self, committed: list[ShardRecord]) -> None:
        atomic_write_text(self._progress, _dump_json(self._progress_dict(committed)))

    def _commit(self, record: ShardRecord) -> None:
        finished, self.finished = self.finished, False
        try:
            self._save_progress([*self.committed, record])
        except BaseException:
            self.finished = finished
            raise
        self.committed.append(record)

    def _lists(self, record: ShardRecord) -> bool:
        """Whether progress.json on disk lists `record` as committed."""
        progress = _load_json(self._progress)
        shards = progress.get("shards") if isinstance(progress, dict) else None
        return isinstance(shards, list) and any(
            isinstance(s, dict) and (s.get("shard"), s.get("input_end")) == (record.shard, record.input_end)
            for s in shards)

    def _restore(self) -> None:
        progress = read_progress(self.out_dir)
        old_key = progress.get("run_key", {})
        if old_key != self.run_key:
            raise ResumeMismatchError(
                f"--resume: {self.out_dir} was written by a different run; differing keys (old vs new): "
                + "; ".join(_key_diff(old_key, self.run_key))
                + ". Rerun with the original input and flags, or pass --overwrite (or another --out)."
            )
        pending = "pending_rewrite" in progress
        _finish_pending_rewrite(self.out_dir, progress)
        self.committed = [ShardRecord.from_dict(r) for r in progress.get("shards", [])]
        self.rewrites = list(progress.get("rewrites", []))
        self.finished = bool(progress.get("finished", False))
        if pending:
            # Drop the applied record at once: a later temp with the same name (finalize's schema
            # unification) must never be renamed into place by a stale record after another kill.
            self._save_progress(self.committed)
        self._delete_uncommitted()
        missing = [r.data_file for r in self.committed if r.data_file and not (self.out_dir / r.data_file).is_file()]
        missing += [
            f"{STATE_DIR}/rejects-{r.shard:05d}.parquet"
            for r in self.committed
            if r.rows_rejected and not (self._state / f"rejects-{r.shard:05d}.parquet").is_file()
        ]
        if missing:
            raise OutputError(
                f"--resume: committed file(s) missing from {self.out_dir}: {', '.join(missing)}. "
                "The output was modified by hand; pass --overwrite to start over."
            )

    def _delete_uncommitted(self) -> None:
        keep_data = {Path(r.data_file).name for r in self.committed if r.data_file}
        keep_rejects = {f"rejects-{r.shard:05d}.parquet" for r in self.committed if r.rows_rejected}
        # Temps: hidden ".NAME.tmp" next to their target in OUT and data/, "*.tmp" in .pear/.
        for folder, hidden in ((self.out_dir, True), (self.out_dir / DATA_DIR, True), (self._state, False)):
            if folder.is_dir():
                for p in folder.iterdir():
                    if p.is_file() and p.name.endswith(".tmp") and (p.name.startswith(".") or not hidden):
                        p.unlink()
        data = self.out_dir / DATA_DIR
        if data.is_dir():
            for p in data.iterdir():
                if _DATA_NAME.match(p.name) and p.name not in keep_data:
                    p.unlink()
        for p in self._state.iterdir():
            if _REJECTS_NAME.match(p.name) and p.name not in keep_rejects:
                p.unlink()

    def _delete_previous(self) -> None:
        """Delete the files pear-data writes (`_OWN_NAMES`), keeping the lock; never anything else."""
        for folder in ("", DATA_DIR, STATE_DIR):
            path = self.out_dir / folder
            for name in _names(path):
                if _OWN_NAMES[folder].match(name) and name != LOCK_FILE and (path / name).is_file():
                    (path / name).unlink()

    # -- writing -----------------------------------------------------------------------------

    def shard(self) -> ShardHandle:
        """Open the next shard; it starts at `next_input_row`. One shard is open at a time."""
        if self._open is not None:
            raise RuntimeError(f"shard {self._open.shard} is still open; commit it or leave its `with` block first")
        self._open = ShardHandle(self, len(self.committed), self.next_input_row)
        return self._open

    def rewrite_data_files(self, fn: Callable[[pa.Table], pa.Table], *, name: str | None = None) -> None:
        """`rewrite_data_files(OUT, fn, name=name, schema=...)` for the files of this writer; see there.

        Every file is written with the data files' unified schema, so `finalize` has nothing left to rewrite.
        A rewrite whose `name` is already in `rewrites` (a resumed run that got past its commit point) is a
        programming error: check `writer.rewrites` first.
        """
        if self._open is not None:
            raise RuntimeError("rewrite_data_files: a shard is still open")
        if name is not None and name in self.rewrites:
            raise RuntimeError(f"rewrite {name!r} was already applied to {self.out_dir}; check `writer.rewrites`")
        with self._writing():
            rewrite_data_files(self.out_dir, fn, name=name, schema=self._unified_schema())
        progress = json.loads(self._progress.read_text(encoding="utf-8"))
        self.rewrites = list(progress.get("rewrites", []))
        self.finished = bool(progress.get("finished", False))

    def data_schema(self) -> pa.Schema | None:
        """The schema shared by all data files after `finalize` (None when there are no output rows)."""
        return data_schema(self.out_dir)

    def finalize(
        self,
        manifest: dict,
        card_markdown: str | Callable[[dict, pa.Schema | None], str] | None = None,
    ) -> dict:
        """Finish the output: rejects.parquet, manifest.json, README.md; mark progress finished.

        - promotes the data files to one schema when shards disagree (a column
          that was all-null in one shard, int32 vs int64, ...), so `datasets`
          reads them as one table;
        - merges the per-shard rejects into OUT/rejects.parquet, sorted by
          row_index (removes a stale one when there are none);
        - sets manifest["tool"] = `tool_record()` (how pear-data recognizes its own output),
          manifest["rows"] = {"in", "out", "rejected"},
          manifest["bytes"] = {"parquet": size of data/ on disk,
          "uncompressed": uncompressed size from the Parquet footers} and
          manifest["shards"] = [ShardRecord dicts]; raises RuntimeError unless
          rows in == out + rejected;
        - writes manifest.json (sorted keys, indent 2) and README.md.
          `card_markdown` is the card text, or a function (manifest, schema) ->
          text called with the final manifest, or None for
          `pear_data.card.render_card`.

        Returns the manifest as written (plain JSON types).
        """
        if self._open is not None:
            raise RuntimeError(f"finalize: shard {self._open.shard} is still open")
        with self._writing():
            return self._finalize(manifest, card_markdown)

    def _finalize(self, manifest: dict, card_markdown: str | Callable[[dict, pa.Schema | None], str] | None) -> dict:
        rows_in = sum(r.input_end - r.input_start for r in self.committed)
        rows_out = sum(r.rows_out for r in self.committed)
        rows_rejected = sum(r.rows_rejected for r in self.committed)
        if rows_in != rows_out + rows_rejected:
            raise OutputError(
                f"row count check failed in {self.out_dir}: rows_in {rows_in} != rows_out {rows_out} "
                f"+ rows_rejected {rows_rejected}; the output is incomplete or was edited, rerun with --overwrite"
            )

        schema = self._unify_data_files()
        rejects_path = self.out_dir / REJECTS_FILE
        reject_tables = [
            pq.read_table(self._state / f"rejects-{r.shard:05d}.parquet") for r in self.committed if r.rows_rejected
        ]
        if reject_tables:
            write_table_atomic(rejects_path, _concat_rejects(reject_tables))
        else:
            rejects_path.unlink(missing_ok=True)

        manifest = dict(manifest)
        manifest["tool"] = tool_record()
        manifest["rows"] = {"in": rows_in, "out": rows_out, "rejected": rows_rejected}
        manifest["bytes"] = self._data_bytes()
        manifest["shards"] = [asdict(r) for r in self.committed]
        manifest = _jsonable(manifest, "manifest")
        if card_markdown is None:
            from pear_data.card import render_card

            card_markdown = render_card
        card = card_markdown if isinstance(card_markdown, str) else card_markdown(manifest, schema)

        atomic_write_text(self.out_dir / MANIFEST_FILE, _dump_json(manifest))
        atomic_write_text(self.out_dir / CARD_FILE, card)
        self.finished = True
        self._save_progress(self.committed)
        return manifest

    def _data_bytes(self) -> dict:
        """Sizes of data/: `parquet` on disk, `uncompressed` from the Parquet footers (no data read)."""
        paths = [self.out_dir / r.data_file for r in self.committed if r.data_file]
        uncompressed = 0
        for path in paths:
            meta = pq.read_metadata(path)
            uncompressed += sum(meta.row_group(i).total_byte_size for i in range(meta.num_row_groups))
        return {"parquet": sum(p.stat().st_size for p in paths), "uncompressed": uncompressed}

    def _unified_schema(self) -> pa.Schema | None:
        """The one schema of all data files: theirs when they agree, else their permissive unification."""
        paths = [self.out_dir / r.data_file for r in self.committed if r.data_file]
        if not paths:
            return None
        schemas = [pq.read_schema(p).remove_metadata() for p in paths]
        if all(s.equals(schemas[0]) for s in schemas[1:]):
            return schemas[0]
        return _unify(schemas, "data files")

    def _unify_data_files(self) -> pa.Schema | None:
        unified = self._unified_schema()
        paths = [self.out_dir / r.data_file for r in self.committed if r.data_file]
        schemas = [pq.read_schema(p).remove_metadata() for p in paths]
        if all(s.equals(unified) for s in schemas):
            return unified
        for path, s in zip(paths, schemas):
            if not s.equals(unified):
                tmp = _temp_path(path)
                _copy_cast(path, tmp, unified)
                os.replace(tmp, path)
        _fsync_dir(self.out_dir / DATA_DIR)
        return unified


def _key_diff(old: Any, new: Any, prefix: str = "") -> list[str]:
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
                out.extend(_key_diff(old[key], new[key], path))
        return out
    if old != new:
        return [f"{prefix or '<run_key>'}: {json.dumps(old)} -> {json.dumps(new)}"]
    return []


# ----------------------------------------------------------------------------- reading & rewriting


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


def _check_records(value: dict, path: Path, what: str) -> dict:
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
        if data_file is not None and not (isinstance(data_file, str) and _DATA_FILE.match(data_file)):
            raise bad(f"shards[{i}].data_file", data_file, "null or a path like data/part-00000.parquet")
        for key in ("shard", "input_start", "input_end", "rows_out", "rows_rejected"):
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
    return _check_records(read_json_file(path, "the manifest"), path, "the manifest")


def read_progress(out_dir: str | Path) -> dict | None:
    """OUT/.pear/progress.json as a dict, or None when OUT has no resume state."""
    path = Path(out_dir) / STATE_DIR / PROGRESS_FILE
    if not path.is_file():
        return None
    progress = _check_records(read_json_file(path, "the resume state"), path, "the resume state")
    for i, record in enumerate(progress.get("shards", [])):
        missing = [f.name for f in dataclasses.fields(ShardRecord) if f.name not in record and f.name != "stats"]
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
    found = [p for p in (out_dir / DATA_DIR).glob("part-*.parquet") if _DATA_NAME.match(p.name)]
    return sorted(found, key=lambda p: int(_DATA_NAME.match(p.name).group(1)))


def data_schema(out_dir: str | Path) -> pa.Schema | None:
    """Arrow schema of the first data file, schema-level metadata removed (None if no data files)."""
    files = data_files(out_dir)
    return pq.read_schema(files[0]).remove_metadata() if files else None


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
    finishes the renames. `name` (e.g. "normalize=dataset") is recorded in
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
            tmp = _temp_path(path)
            reader = pq.ParquetFile(path)
            writer: pq.ParquetWriter | None = None
            try:
                for i in range(reader.num_row_groups):
                    rows = reader.read_row_group(i)
                    new = _strip_metadata(fn(rows))
                    if new.num_rows != rows.num_rows:
                        raise RuntimeError(
                            f"rewrite_data_files: fn returned {new.num_rows} rows for {rows.num_rows} "
                            f"(row group {i} of {path.name}); it must keep every row, in order"
                        )
                    if writer is None:
                        file_schema = schema or new.schema
                        writer = _open_parquet(tmp, file_schema)
                    if not new.schema.equals(file_schema, check_metadata=False):
                        new = _conform(new, file_schema)
                    _write_rows(writer, new)
            finally:
                if writer is not None:
                    writer.close()
            _fsync_file(tmp)
            plan.append((tmp, path))
    except BaseException:
        for tmp, _ in plan:
            tmp.unlink(missing_ok=True)
        for path in files:
            _temp_path(path).unlink(missing_ok=True)
        raise

    progress = read_progress(out_dir)
    progress_path = out_dir / STATE_DIR / PROGRESS_FILE
    if progress is not None:
        progress["finished"] = False
        if name is not None:
            progress["rewrites"] = [*progress.get("rewrites", []), name]
        progress["pending_rewrite"] = [[t.relative_to(out_dir).as_posix(), p.relative_to(out_dir).as_posix()]
                                       for t, p in plan]
        atomic_write_text(progress_path, _dump_json(progress))  # commit point
        _finish_pending_rewrite(out_dir, progress)
        atomic_write_text(progress_path, _dump_json(progress))
    else:
        for tmp, path in plan:
            os.replace(tmp, path)
        if plan:
            _fsync_dir(out_dir / DATA_DIR)


def _finish_pending_rewrite(out_dir: Path, progress: dict) -> None:
    """Apply the renames a committed rewrite recorded (idempotent); removes the record from `progress`."""
    pending = progress.pop("pending_rewrite", None)
    for tmp, dest in pending or []:
        if (out_dir / tmp).exists():
            os.replace(out_dir / tmp, out_dir / dest)
    if pending:
        _fsync_dir(out_dir / DATA_DIR)
