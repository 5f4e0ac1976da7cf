"""Reading scored data back: the Parquet files of a pear-data output (or any Parquet with the scored columns).

Used by `reweight`, `stats`, `push`, `select`, `show`, `rescore` and the `score` resume: which files, in which
order, their fingerprint, a schema check that names the file, the column and what
is wrong with it, and readers that name the file when its bytes are damaged
(`read_batches`, `read_table`): every failure here is an InputError (exit 2). `scan` hands the rows to
users as a polars LazyFrame.

Every reader of an output goes through `check_finished` (directly, or through
`source_files`, `finished_manifest` or `source_manifest`) before it reads a byte:
an output whose run has not finished, or that another process is writing, is
refused (docs/design.md section 6), so nothing derived from a partial output
can exist.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.parquet as pq

from .errors import InputError, UnfinishedOutputError
from .output import (
    DATA_DIR,
    LOCK_FILE,
    MANIFEST_FILE,
    PROGRESS_FILE,
    REJECTS_FILE,
    STATE_DIR,
    data_files,
    lock_holder,
    read_manifest,
    read_progress,
)
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

if TYPE_CHECKING:
    import polars as pl

# What each column read back must hold: a list of integers (bool too, for masks), a list of floats, a float.
_INTEGER_LIST = (INPUT_IDS, COMPLETION_MASK, SHARED_BOUNDARY)
_FLOAT_LIST = (TARGET_LOGPROBS, BEHAVIOR_LOGPROBS, WEIGHT_COLUMNS["token"], WEIGHT_COLUMNS["block"])
_FLOAT = (WEIGHT_COLUMNS["sequence"],)

_DAMAGED = "the file is damaged or truncated: restore it, or write it again"


def is_output(path: str | Path) -> bool:
    """Whether `path` is a pear-data output directory: it has resume state (`.pear/`) or a manifest."""
    path = Path(path)
    return path.is_dir() and ((path / STATE_DIR).is_dir() or (path / MANIFEST_FILE).is_file())


def output_root(path: str | Path) -> Path | None:
    """The pear-data output that `path` is or lies in (OUT for OUT, OUT/data and OUT/data/part-N.parquet)."""
    path = Path(path)
    for candidate, inside in ((path, True), (path.parent, path.name == DATA_DIR),
                              (path.parent.parent, path.parent.name == DATA_DIR)):
        if inside and is_output(candidate):
            return candidate
    return None


def finish_hint(progress: dict | None) -> str:
    """How to finish the run that writes an output: `score` resumes, `reweight` has no --resume."""
    command = ((progress or {}).get("run_key") or {}).get("command")
    if command == "reweight":
        return "Finish it first: rerun the `pear-data reweight` that writes it, with --overwrite."
    if command == "score":
        return "Finish it first: rerun the same `pear-data score ... --resume` (same input and flags)."
    return "Finish it first (`pear-data score ... --resume`, or `pear-data reweight ... --overwrite`)."


def check_finished(out_dir: str | Path) -> None:
    """UnfinishedOutputError (exit 2) unless the output OUT is finished and no other process is writing it.

    Refused, naming OUT and how to finish it: another process holds OUT/.pear/lock (a run writing it now);
    no manifest.json (a run killed, or still running); .pear/progress.json says finished: false (killed
    after its data changed, e.g. in the dataset-normalization rewrite). An output without `.pear/` (one
    downloaded from the Hub) is finished when it has its manifest. InputError for damaged resume state.
    """
    out_dir = Path(out_dir)
    holder = lock_holder(out_dir)
    if holder is not None:
        raise UnfinishedOutputError(
            f"{out_dir} is being written right now by another pear-data run (process {holder}, which holds "
            f"{out_dir / STATE_DIR / LOCK_FILE}): wait for that run to finish, then run this again")
    progress = read_progress(out_dir)
    if not (out_dir / MANIFEST_FILE).is_file():
        raise UnfinishedOutputError(
            f"{out_dir} is not a finished pear-data output: it has no {MANIFEST_FILE} (its run was stopped or "
            f"failed before the end). {finish_hint(progress)}")
    if progress is not None and not progress.get("finished"):
        raise UnfinishedOutputError(
            f"{out_dir} is not finished: {STATE_DIR}/{PROGRESS_FILE} says its run did not finish (killed, or "
            f"its data rewritten after the manifest). {finish_hint(progress)}")


def finished_manifest(out_dir: str | Path) -> dict:
    """The manifest of a finished output that no other process is writing (`check_finished`, then
    `read_manifest`): what every reader of an output calls first, the trainers' loaders included."""
    check_finished(out_dir)
    return read_manifest(out_dir)


def source_manifest(src: str | Path) -> dict:
    """The manifest of SRC when it is a pear-data output directory (`finished_manifest`), else {}."""
    return finished_manifest(src) if is_output(src) else {}


def source_files(src: str | Path) -> list[Path]:
    """Parquet files of SRC in row order: a pear-data output dir (its data files, in shard order), a dir of
    Parquet files (sorted, recursively), or one file. Every output SRC is or holds must be finished
    (`check_finished`)."""
    src = Path(src)
    if not src.exists():
        raise InputError(f"{src}: no such file or directory")
    root = output_root(src)
    if root is not None:
        check_finished(root)
    if src.is_file():
        return [src]
    if root == src:
        files = data_files(src)
        missing = [p for p in files if not p.is_file()]
        if missing:
            raise InputError(f"{src}: data file(s) listed by the output are missing: "
                             f"{', '.join(str(p) for p in missing[:5])}; restore them, or write the output again")
    else:
        files = sorted(p for p in src.rglob("*.parquet") if STATE_DIR not in p.parts and p.name != REJECTS_FILE)
        for inner in sorted({output_root(p) for p in files} - {None, root}):
            check_finished(inner)
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


def read_metadata(path: Path) -> pq.FileMetaData:
    """The Parquet footer of a file (row counts, no data read); InputError naming the file when it is damaged."""
    try:
        return pq.read_metadata(path)
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


def scan(src: str | Path, *, derived: bool = False) -> pl.LazyFrame:
    """The rows of a finished pear-data output SRC (or of scored Parquet files) as a `polars.LazyFrame`, in row
    order; nothing is read until it is collected (`.collect(engine="streaming")` for outputs larger than memory).

    With `derived`, the per-row columns of `pear_data.query` are added (`row`, `n_completion_tokens`,
    `mean_log_ratio`, `token_ess`, ...): what `pear-data select --where` and `show --where` query. An unfinished
    output, or one another process is writing, is refused like by every reader (`check_finished`).
    """
    from .query import scan_files

    return scan_files(source_files(src), derived=derived)
