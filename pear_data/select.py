"""`pear-data select`: keep the rows of an output that a query picks, as a new output (docs/design.md 5).

    pick:   a polars lazy scan of the per-row values the query needs (derived columns, query.py): one boolean per
            row, never a token list in memory
    write:  stream the source one row group at a time, keep the picked rows (in input order, bytes as stored),
            commit shards of --shard-rows source rows (the others counted as dropped), carry the source's rejects
    finish: the kept rows' diagnostics, a manifest that records the query and the source, the card

The query: `--where` (a polars SQL condition), then `--top-frac F --by COLUMN` (the ceil(F x n) rows with the
largest values, ties in input order, NaN last) or `--sample N [--by-weight --by COLUMN] --seed S` (N rows drawn
without replacement, uniformly or with probability proportional to the column: Efraimidis-Spirakis keys
log(u) / w from numpy's generator seeded with S, so the same seed picks the same rows). Weights are kept as
stored: selecting does not renormalize them.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc

from .card import render_card
from .config import SelectOptions
from .dataset import check_scored, files_fingerprint, read_table, source_files, source_manifest
from .diagnostics import degeneracy_warnings
from .errors import InputError, UsageError
from .output import REJECTS_FILE, DatasetWriter, check_output_apart
from .query import condition, numeric_column, scan_files
from .reweight import batches, check_rows, shard_slices, source_record
from .schema import COMPLETION_MASK, INPUT_IDS, REQUIRED_SCORED
from .stats import files_diagnostics

# What a selected output keeps of its source's manifest: what the rows are and how they were weighed.
CARRIED_KEYS = ("models", "tokenizer", "behavior", "alignment", "scoring", "tokenize", "weights", "dataset_means",
                "license")


def select(src: str | Path, out: str | Path, options: SelectOptions) -> dict:
    """Write the rows of SRC that `options` picks to OUT (a full pear-data output); returns the manifest.

    Refused before anything is written (exit 2): SRC unfinished or being written (`dataset.check_finished`), not
    scored Parquet, or holding other rows than its manifest counts; OUT that is, contains or lies inside SRC; a
    query naming a column SRC does not have (or a derived one it cannot compute), SQL polars cannot read, a
    condition that is not true/false, a --by column that is not one number per row, negative or NaN weights
    for --by-weight.
    """
    files = source_files(src)
    check_output_apart([src, *files], out, "the input")
    check_scored(files, REQUIRED_SCORED)
    source = source_manifest(src)
    if source:
        check_rows(src, files, source)
    picked = pick_rows(files, options)
    fingerprint = files_fingerprint(files)
    run_key = {"command": "select", "input_fingerprint": fingerprint, "query": options.describe(),
               "shard_rows": options.shard_rows}
    writer = DatasetWriter(out, run_key, overwrite=options.overwrite, resumable=False)
    try:
        tokens = write_selected(writer, files, picked, options)
        return writer.finalize(_manifest(writer, src, files, fingerprint, source, picked, tokens, options),
                               render_card, carried_rejects=_rejects(src, source))
    finally:
        writer.close()


def pick_rows(files: list[Path], options: SelectOptions) -> np.ndarray:
    """bool [rows of the files]: the rows the query keeps (module docstring)."""
    frame = scan_files(files, derived=True)
    values = [condition(frame, options.where).fill_null(False).alias("keep")] if options.where else []
    if options.top_frac is not None or options.by_weight:
        values.append(numeric_column(frame, options.rank_column, "--by").alias("by"))
    table = collect(frame.select(*values) if values else frame.select(pl.len()), files)
    n_rows = table.height if values else int(table.item())
    keep = table["keep"].to_numpy() if options.where else np.ones(n_rows, dtype=bool)
    candidates = np.flatnonzero(keep)
    chosen = candidates
    if options.top_frac is not None:
        values_by = table["by"].to_numpy()[candidates]
        order = np.argsort(-values_by, kind="stable")  # NaN sorts last
        chosen = candidates[order[:math.ceil(options.top_frac * len(candidates))]]
    elif options.sample is not None:
        chosen = candidates[_sample(table["by"].to_numpy()[candidates] if options.by_weight else None,
                                    len(candidates), options)]
    picked = np.zeros(n_rows, dtype=bool)
    picked[chosen] = True
    return picked


def _sample(weights: np.ndarray | None, n: int, options: SelectOptions) -> np.ndarray:
    """Indices of `options.sample` of n candidates drawn without replacement (weighted: Efraimidis-Spirakis)."""
    if weights is not None and not (np.isfinite(weights).all() and (weights >= 0).all()):
        bad = int(np.flatnonzero(~(np.isfinite(weights) & (weights >= 0)))[0])
        raise UsageError(f"--by-weight --by {options.rank_column}: weights must be finite and >= 0, a candidate "
                         f"row has {weights[bad]}; pick another --by, or filter the rows with --where first")
    u = np.random.default_rng(options.seed).random(n)
    with np.errstate(divide="ignore"):
        keys = np.log(u) if weights is None else np.log(u) / weights
    keys = np.where(np.isnan(keys), -np.inf, keys)
    return np.argsort(-keys, kind="stable")[:options.sample]


def collect(frame: pl.LazyFrame, files: list[Path]) -> pl.DataFrame:
    """Collect a per-row query over `files` (streaming); a file whose bytes fail is named (InputError)."""
    try:
        return frame.collect(engine="streaming")
    except pl.exceptions.PolarsError as exc:
        for path in files:
            read_table(path)  # names the damaged file
        raise InputError(f"{files[0].parent}: cannot read the rows ({exc}); restore the files, or write them "
                         "again") from None


def write_selected(writer: DatasetWriter, files: list[Path], picked: np.ndarray,
                   options: SelectOptions) -> dict[str, int]:
    """Commit the picked rows, one shard per --shard-rows source rows (the others dropped); returns the token
    counts of the kept rows."""
    counts = {"total": 0, "completion": 0}
    slices: Iterator[tuple[int, int, pa.Table]] = shard_slices(batches(files, options.batch_rows), options.shard_rows)
    for _, group in itertools.groupby(slices, key=lambda item: item[0]):
        with writer.shard() as handle:
            for _, start, part in group:
                kept = part.filter(pa.array(picked[start:start + len(part)]))
                handle.write(kept)
                handle.drop(len(part) - kept.num_rows)
                counts["total"] += int(pc.sum(pc.list_value_length(kept[INPUT_IDS])).as_py() or 0)
                counts["completion"] += int(pc.sum(pc.list_flatten(kept[COMPLETION_MASK])).as_py() or 0)
                end = start + len(part)
            handle.commit(end)
    return counts


def _manifest(writer: DatasetWriter, src: str | Path, files: list[Path], fingerprint: str, source: dict,
              picked: np.ndarray, tokens: dict, options: SelectOptions) -> dict:
    kept_files = [writer.out_dir / r.data_file for r in writer.committed if r.data_file]
    summary = files_diagnostics(kept_files).summary() if kept_files else {}
    selected = int(picked.sum())
    manifest = {
        "command": "select",
        "input": {"name": Path(src).resolve().name, "fingerprint": fingerprint, "files": len(files)},
        "query": options.describe(),
        "rows": {"selected": selected, "dropped": len(picked) - selected},
        "tokens": tokens,
        "diagnostics": summary,
        "warnings": degeneracy_warnings(summary),
    }
    if source:
        manifest["source"] = source_record(src, source)
    manifest.update({key: source[key] for key in CARRIED_KEYS if key in source})
    return manifest


def _rejects(src: str | Path, source: dict) -> pa.Table | None:
    """The source's rejects.parquet, carried over (an output's, never a plain Parquet file's)."""
    path = Path(src) / REJECTS_FILE
    if not source or not (source.get("rows") or {}).get("rejected") or not path.is_file():
        return None
    return read_table(path)
