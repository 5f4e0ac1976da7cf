"""`pear-data reweight`: new weight hyperparameters on already-scored rows, no model (docs/design.md 5).

    read the scored files in row order -> weigh (weigh.py) -> commit shards of --shard-rows rows

Streams the source one Parquet row group at a time (memory is a row group, not
the input). Dataset normalization needs the global mean of W first: that is a
first pass over the engine columns only (cheap: log-probs, no other column),
then the writing pass.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import itertools
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pyarrow as pa

from .card import render_card
from .config import ReweightOptions, WeightConfig
from .dataset import (
    check_scored,
    files_fingerprint,
    read_batches,
    read_metadata,
    read_schema,
    source_files,
    source_manifest,
)
from .diagnostics import Diagnostics, degeneracy_warnings
from .errors import InputError
from .output import MANIFEST_FILE, DatasetWriter, check_output_apart
from .schema import ENGINE_COLUMNS, INPUT_IDS, REJECT_REASON, ROW_INDEX
from .threads import prefetch
from .weigh import weigh_table
from .weights import WeightSums


def reweight(src: str | Path, out: str | Path, config: WeightConfig,
             options: ReweightOptions = ReweightOptions()) -> dict:
    """Recompute the weight columns of SRC into OUT; returns the manifest.

    Refused before anything is written (UsageError / InputError, exit 2): SRC, or an output it holds, that
    its run has not finished or that another process is writing (`dataset.check_finished`); OUT that is,
    contains or lies inside SRC or one of its files; weight flags that cannot give finite weights
    (checked by `WeightConfig` itself); SRC that is not scored Parquet (named file and column), or whose
    manifest is damaged or counts other rows than its data files hold.

    The manifest records the source: its files' fingerprint (`input`) and, for a pear-data output, what
    its manifest says it is (`source`: command, input, rows and the manifest's sha256).
    """
    files = source_files(src)
    check_output_apart([src, *files], out, "the input")
    check_scored(files)
    source = source_manifest(src)
    if source:
        check_rows(src, files, source)
    fingerprint = files_fingerprint(files)
    run_key = {"command": "reweight", "input_fingerprint": fingerprint, "weights": config.to_dict(),
               "shard_rows": options.shard_rows, "max_length": options.max_length}
    writer = DatasetWriter(out, run_key, overwrite=options.overwrite, resumable=False)
    try:
        return _reweight(writer, src, files, fingerprint, source, config, options)
    finally:
        writer.close()


def _reweight(writer: DatasetWriter, src: str | Path, files: list[Path], fingerprint: str, source: dict,
              config: WeightConfig, options: ReweightOptions) -> dict:
    means = dataset_means(files, config, options) if config.normalize == "dataset" else None

    diagnostics = Diagnostics()
    ahead = prefetch(batches(files, options.batch_rows))
    with contextlib.closing(ahead):  # an error or Ctrl-C stops and joins the reading thread
        tokens = write_shards(writer, shard_slices(ahead, options.shard_rows), config, means, diagnostics,
                              options.max_length)

    summary = diagnostics.summary()
    manifest = {
        "command": "reweight",
        "input": {"name": Path(src).resolve().name, "fingerprint": fingerprint, "files": len(files)},
        "weights": config.to_dict(),
        "tokens": tokens,
        "max_length": options.max_length,
        "diagnostics": summary,
        "warnings": degeneracy_warnings(summary),
        "dataset_means": means,
    }
    if source:
        manifest["source"] = source_record(src, source)
    corpus = corpus_record(source)
    if corpus:
        manifest["corpus"] = corpus
    for key in ("models", "tokenizer", "behavior", "alignment", "license"):  # as scored
        if key in source:
            manifest[key] = source[key]
    if options.card_title:
        manifest["card_title"] = options.card_title
    return writer.finalize(manifest, render_card)


def write_shards(writer: DatasetWriter, slices: Iterator[tuple[int, int, pa.Table]], config: WeightConfig,
                 means: dict | None, diagnostics: Diagnostics, max_length: int | None) -> dict[str, int]:
    """Weigh the slices (cut to max_length first) and commit one shard per shard number; returns the token
    counts of the manifest (`tokens`)."""
    counts = dict.fromkeys(("total", "completion", "truncated_completion", "truncated_prompt", "rows_truncated"), 0)
    for _, group in itertools.groupby(slices, key=lambda item: item[0]):
        with writer.shard() as handle:
            for _, start, part in group:
                weighed = weigh_table(part, config, means, diagnostics, max_length)
                if len(weighed.rejected_rows):
                    rejected = part.take(pa.array(weighed.rejected_rows))
                    rejected = rejected.append_column(ROW_INDEX, pa.array(start + weighed.rejected_rows, pa.int64()))
                    handle.reject(rejected.append_column(REJECT_REASON, pa.array(weighed.reasons, pa.string())))
                handle.write(weighed.kept)
                for key, value in (("total", weighed.tokens), ("completion", weighed.completion_tokens),
                                   ("truncated_completion", weighed.truncated_completion),
                                   ("truncated_prompt", weighed.truncated_prompt),
                                   ("rows_truncated", weighed.rows_truncated)):
                    counts[key] += value
                end = start + len(part)
            handle.commit(end)
    return counts


def source_record(src: str | Path, source: dict) -> dict:
    """The manifest's `source` of an output derived from a pear-data output: which output, by content."""
    digest = hashlib.sha256((Path(src) / MANIFEST_FILE).read_bytes()).hexdigest()
    return {"command": source.get("command"), "input": source.get("input"), "rows": source.get("rows"),
            "manifest": f"sha256:{digest}"}


def corpus_record(source: dict) -> dict | None:
    """The SFT corpus a pear-data output's rows come from (name, kind, split): the `corpus` a derived output
    records, or the `input` of a score run; None when its manifest says neither."""
    if source.get("corpus"):
        return source["corpus"]
    scored = source.get("input") if source.get("command") == "score" else None
    return {key: scored[key] for key in ("name", "kind", "split") if key in scored} if scored else None


def check_rows(src: str | Path, files: list[Path], source: dict) -> None:
    """InputError unless the data files of the output SRC hold the rows its manifest counts (`rows.out`)."""
    expected = (source.get("rows") or {}).get("out")
    found = sum(read_metadata(path).num_rows for path in files)
    if expected is not None and found != expected:
        raise InputError(f"{src}: its data files hold {found} rows, but its {MANIFEST_FILE} counts {expected}: "
                         "the files were changed after the run; write the output again")


def batches(files: list[Path], batch_rows: int, columns: list[str] | None = None) -> Iterator[pa.Table]:
    """The rows of `files` in order, `batch_rows` at a time (or a row group, when row groups are smaller)."""
    for path in files:
        for batch in read_batches(path, batch_rows, columns):
            yield pa.Table.from_batches([batch])


def shard_slices(tables: Iterator[pa.Table], shard_rows: int) -> Iterator[tuple[int, int, pa.Table]]:
    """(shard number, first input row, table slice): batches cut at every shard_rows input rows."""
    row = 0
    for table in tables:
        while len(table):
            take = min(len(table), shard_rows - row % shard_rows)
            yield row // shard_rows, row, table.slice(0, take)
            row += take
            table = table.slice(take)


def dataset_means(files: list[Path], config: WeightConfig, options: ReweightOptions) -> dict[str, float]:
    """First pass of `--normalize dataset`: mean bounded W per granularity over the valid rows.

    Reads only the columns the weigh stage needs; files are summed on a few threads (reading and the engine
    release the GIL), and the per-file sums are added in file order, so the means do not depend on timing.
    """
    unnormalized = dataclasses.replace(config, normalize="none", max_weight=None)

    def file_sums(path: Path) -> WeightSums:
        names = read_schema(path).names
        sums = WeightSums()
        for table in batches([path], options.batch_rows, [c for c in (INPUT_IDS, *ENGINE_COLUMNS) if c in names]):
            sums.add(weigh_table(table, unnormalized, max_length=options.max_length).sums)
        return sums

    total = WeightSums()
    with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1), thread_name_prefix="pear-means") as pool:
        try:
            for sums in pool.map(file_sums, files):
                total.add(sums)
        except BaseException:  # Ctrl-C or an error: wait for the files being summed, not for the others
            pool.shutdown(cancel_futures=True)
            raise
    return total.means()

