"""The dataset writer shared by every pear-data command: shards, rejects, manifest, card, resume (docs/design.md
2.3 and 6).

    writer = DatasetWriter(OUT, run_key, resume=..., overwrite=...)   # refuses what it may not touch; locks OUT
    with writer.shard() as shard: shard.write(rows); shard.reject(rows); shard.commit(input_end, stats)
    writer.finalize(manifest, card)                                    # rejects.parquet, manifest.json, README.md

What `.pear/` holds: `progress.json` (the run key, every committed shard, the applied rewrites, `finished`),
`rejects-NNNNN.parquet` (rejects of shard NNNNN), `lock` (output/lock.py) and, only while a shard is open,
`shard-NNNNN.parquet.tmp`. Other temps are hidden `.NAME.tmp` files next to their target. It is kept after
`finalize`, so that `--resume` on a finished output redoes `finalize` to the same bytes, and `push` can check
that the run finished.

Crash safety. Every file is written to a temp file in its final directory, fsynced, then `os.replace`d
(output/files.py); a shard becomes part of the output only when `.pear/progress.json` (also replaced atomically)
lists it. A run killed at any point leaves either the old committed state or the new one, and a resumed run first
deletes temp files and data/reject files that progress.json does not list: resuming and redoing the same calls
gives the same bytes as a run that was never interrupted.

Errors. A failed write (a full disk, a read-only or vanished directory) is an OutputError naming the path and
saying how to go on: `--resume` when the command can resume (committed shards are kept), `--overwrite` otherwise.

How to read the output: it is a directory of Parquet shards, NOT a `Dataset.save_to_disk` directory;
`datasets.load_dataset("parquet", data_dir=f"{OUT}/data", split="train")` or `datasets.load_dataset(OUT)` (the
card's `configs`) read it.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from ..errors import OutputError, OutputExistsError, PearDataError, ResumeMismatchError, UsageError
from .files import (
    atomic_write_text,
    concat_rejects,
    copy_cast,
    dump_json,
    fsync_dir,
    jsonable,
    temp_path,
    unify,
    write_table_atomic,
)
from .layout import (
    CARD_FILE,
    DATA_DIR,
    DATA_NAME,
    LOCK_FILE,
    MANIFEST_FILE,
    OWN_NAMES,
    PROGRESS_FILE,
    PROGRESS_FORMAT,
    REJECTS_FILE,
    REJECTS_NAME,
    STATE_DIR,
    check_out_path,
    inspect_output,
    load_json,
    names,
    stray_files,
    tool_record,
)
from .lock import LockHandle, acquire_lock, release_lock
from .manifest import key_diff, read_progress
from .rewrite import finish_pending_rewrite, rewrite_data_files
from .shard import ShardHandle, ShardRecord


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
        self.run_key: dict = jsonable(run_key, "run_key")
        self.resumable = resumable
        self.committed: list[ShardRecord] = []
        self.rewrites: list[str] = []
        self.finished = False
        self._open: ShardHandle | None = None
        self.state_dir = self.out_dir / STATE_DIR
        self._progress = self.state_dir / PROGRESS_FILE
        self._lock: LockHandle | None = None

        check_out_path(self.out_dir)
        if self.out_dir.exists() and not self.out_dir.is_dir():
            raise OutputExistsError(f"{self.out_dir} exists and is not a directory; choose another --out")
        self._plan(resume, overwrite)  # refuse before creating anything
        try:
            self.state_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutputError(
                f"cannot create {exc.filename or self.state_dir}: {exc.strerror or exc}. Choose a writable --out."
            ) from None
        with self.writing():
            self._lock = acquire_lock(self.out_dir, self.state_dir)
        try:
            with self.writing():
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
        release_lock(lock)

    def __enter__(self) -> DatasetWriter:
        return self

    def __exit__(self, *exc_info) -> bool:
        self.close()
        return False

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()

    @contextlib.contextmanager
    def writing(self) -> Iterator[None]:
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
            "shards": [r.to_dict() for r in committed],
            "rewrites": list(self.rewrites),
            "finished": self.finished,
            **extra,
        }

    def _save_progress(self, committed: list[ShardRecord]) -> None:
        atomic_write_text(self._progress, dump_json(self._progress_dict(committed)))

    def commit_shard(self, record: ShardRecord) -> None:
        finished, self.finished = self.finished, False
        try:
            self._save_progress([*self.committed, record])
        except BaseException:
            self.finished = finished
            raise
        self.committed.append(record)

    def lists(self, record: ShardRecord) -> bool:
        """Whether progress.json on disk lists `record` as committed."""
        progress = load_json(self._progress)
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
                + "; ".join(key_diff(old_key, self.run_key))
                + ". Rerun with the original input and flags, or pass --overwrite (or another --out)."
            )
        pending = "pending_rewrite" in progress
        finish_pending_rewrite(self.out_dir, progress)
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
            if r.rows_rejected and not (self.state_dir / f"rejects-{r.shard:05d}.parquet").is_file()
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
        for folder, hidden in ((self.out_dir, True), (self.out_dir / DATA_DIR, True), (self.state_dir, False)):
            if folder.is_dir():
                for p in folder.iterdir():
                    if p.is_file() and p.name.endswith(".tmp") and (p.name.startswith(".") or not hidden):
                        p.unlink()
        data = self.out_dir / DATA_DIR
        if data.is_dir():
            for p in data.iterdir():
                if DATA_NAME.match(p.name) and p.name not in keep_data:
                    p.unlink()
        for p in self.state_dir.iterdir():
            if REJECTS_NAME.match(p.name) and p.name not in keep_rejects:
                p.unlink()

    def _delete_previous(self) -> None:
        """Delete the files pear-data writes (`OWN_NAMES`), keeping the lock; never anything else."""
        for folder in ("", DATA_DIR, STATE_DIR):
            path = self.out_dir / folder
            for name in names(path):
                if OWN_NAMES[folder].match(name) and name != LOCK_FILE and (path / name).is_file():
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
        with self.writing():
            rewrite_data_files(self.out_dir, fn, name=name, schema=self._unified_schema())
        progress = json.loads(self._progress.read_text(encoding="utf-8"))
        self.rewrites = list(progress.get("rewrites", []))
        self.finished = bool(progress.get("finished", False))

    def shard_closed(self) -> None:
        """The open shard was committed or aborted (`ShardOwner`)."""
        self._open = None

    def finalize(
        self,
        manifest: dict,
        card_markdown: str | Callable[[dict, pa.Schema | None], str] | None = None,
        carried_rejects: pa.Table | None = None,
    ) -> dict:
        """Finish the output: rejects.parquet, manifest.json, README.md; mark progress finished.

        - promotes the data files to one schema when shards disagree (a column
          that was all-null in one shard, int32 vs int64, ...), so `datasets`
          reads them as one table;
        - merges the per-shard rejects, and `carried_rejects` (the rejects of the output a `select` reads,
          carried over: not rows of this run's input), into OUT/rejects.parquet, sorted by
          row_index (removes a stale one when there are none);
        - sets manifest["tool"] = `tool_record()` (how pear-data recognizes its own output),
          manifest["rows"] = {"in", "out", "rejected"} (the carried rejects counted in `rejected`; other keys
          the caller put in manifest["rows"] are kept),
          manifest["bytes"] = {"parquet": size of data/ on disk,
          "uncompressed": uncompressed size from the Parquet footers} and
          manifest["shards"] = [ShardRecord dicts]; raises OutputError unless the shards' input rows
          == out + rejected + dropped;
        - writes manifest.json (sorted keys, indent 2) and README.md.
          `card_markdown` is the card text, or a function (manifest, schema) ->
          text called with the final manifest, or None for
          `pear_data.card.render_card`.

        Returns the manifest as written (plain JSON types).
        """
        if self._open is not None:
            raise RuntimeError(f"finalize: shard {self._open.shard} is still open")
        with self.writing():
            return self._finalize(manifest, card_markdown, carried_rejects)

    def _finalize(self, manifest: dict, card_markdown: str | Callable[[dict, pa.Schema | None], str] | None,
                  carried_rejects: pa.Table | None) -> dict:
        rows_in = sum(r.input_end - r.input_start for r in self.committed)
        rows_out = sum(r.rows_out for r in self.committed)
        rows_rejected = sum(r.rows_rejected for r in self.committed)
        rows_dropped = sum(r.rows_dropped for r in self.committed)
        if rows_in != rows_out + rows_rejected + rows_dropped:
            raise OutputError(
                f"row count check failed in {self.out_dir}: rows_in {rows_in} != rows_out {rows_out} "
                f"+ rows_rejected {rows_rejected} + rows_dropped {rows_dropped}; the output is incomplete or was "
                "edited, rerun with --overwrite"
            )

        schema = self._unify_data_files()
        rejects_path = self.out_dir / REJECTS_FILE
        reject_tables = [
            pq.read_table(self.state_dir / f"rejects-{r.shard:05d}.parquet") for r in self.committed if r.rows_rejected
        ]
        if carried_rejects is not None and carried_rejects.num_rows:
            reject_tables.append(carried_rejects)
            rows_rejected += carried_rejects.num_rows
        if reject_tables:
            write_table_atomic(rejects_path, concat_rejects(reject_tables))
        else:
            rejects_path.unlink(missing_ok=True)

        manifest = dict(manifest)
        manifest["tool"] = tool_record()
        manifest["rows"] = {**(manifest.get("rows") or {}), "in": rows_in, "out": rows_out, "rejected": rows_rejected}
        manifest["bytes"] = self._data_bytes()
        manifest["shards"] = [r.to_dict() for r in self.committed]
        manifest = jsonable(manifest, "manifest")
        if card_markdown is None:
            from pear_data.card import render_card

            card_markdown = render_card
        card = card_markdown if isinstance(card_markdown, str) else card_markdown(manifest, schema)

        atomic_write_text(self.out_dir / MANIFEST_FILE, dump_json(manifest))
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
        return unify(schemas, "data files")

    def _unify_data_files(self) -> pa.Schema | None:
        unified = self._unified_schema()
        paths = [self.out_dir / r.data_file for r in self.committed if r.data_file]
        schemas = [pq.read_schema(p).remove_metadata() for p in paths]
        if all(s.equals(unified) for s in schemas):
            return unified
        for path, s in zip(paths, schemas):
            if not s.equals(unified):
                tmp = temp_path(path)
                copy_cast(path, tmp, unified)
                os.replace(tmp, path)
        fsync_dir(self.out_dir / DATA_DIR)
        return unified
