"""`pear-data reweight`: new weight hyperparameters on already-scored rows, no model.

Streams the source in record batches, so memory is bounded by the batch, not
the input. Dataset normalization needs the global mean of W first: that is a
first pass over the source (cheap: log-probs only), then the writing pass.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from . import __version__
from .card import render_card
from .diagnostics import Diagnostics, degeneracy_warnings
from .validate import missing_columns, token_rows, validate, weight_columns, with_columns
from .weights import WeightConfig, WeightSums, weigh, weight_sums
from .writer import DatasetWriter


class UsageError(Exception):
    """Bad input or flags for the whole run: the CLI prints it and exits 2."""


@dataclass(frozen=True)
class ReweightOptions:
    shard_rows: int = 10_000
    batch_rows: int = 256
    overwrite: bool = False


def source_files(src: str | Path) -> list[Path]:
    """Parquet files of SRC in order: a pear-data output dir (its data/), a dir of Parquet files, or one file."""
    src = Path(src)
    if src.is_file():
        return [src]
    if not src.is_dir():
        raise UsageError(f"{src}: no such file or directory")
    root = src / "data" if (src / "manifest.json").exists() and (src / "data").is_dir() else src
    files = sorted(p for p in root.rglob("*.parquet") if ".pear" not in p.parts and p.name != "rejects.parquet")
    if not files:
        raise UsageError(f"{src}: no Parquet files found")
    return files


def files_fingerprint(files: list[Path]) -> str:
    """sha256 over the files' names (relative order) and bytes."""
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode() + b"\0")
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 22), b""):
                digest.update(block)
    return digest.hexdigest()


def _check_schema(files: list[Path]) -> pa.Schema:
    schema = pq.read_schema(files[0])
    for path in files:
        missing = missing_columns(pq.read_schema(path))
        if missing:
            raise UsageError(
                f"{path}: missing column(s) {', '.join(missing)}; reweight needs "
                "input_ids, completion_mask, target_logprobs, behavior_logprobs (run `pear-data score` first)"
            )
    return schema


def iter_batches(files: list[Path], batch_rows: int) -> Iterator[pa.Table]:
    for path in files:
        for batch in pq.ParquetFile(path).iter_batches(batch_size=batch_rows):
            yield pa.Table.from_batches([batch])


def _shard_slices(tables: Iterator[pa.Table], shard_rows: int) -> Iterator[tuple[int, int, pa.Table]]:
    """(shard number, first input row, table slice): batches cut at every shard_rows input rows."""
    row = 0
    for table in tables:
        while len(table):
            take = min(len(table), shard_rows - row % shard_rows)
            yield row // shard_rows, row, table.slice(0, take)
            row += take
            table = table.slice(take)


def _split(reasons: list[str | None]) -> tuple[np.ndarray, np.ndarray]:
    bad = np.array([r is not None for r in reasons], dtype=bool)
    return np.flatnonzero(~bad), np.flatnonzero(bad)


def dataset_means(files: list[Path], config: WeightConfig, batch_rows: int) -> dict[str, float]:
    """First pass of `--normalize dataset`: mean bounded W per granularity over valid rows."""
    sums = WeightSums()
    for table in iter_batches(files, batch_rows):
        good, _ = _split(validate(table, config))
        if len(good):
            sums.add(weight_sums(token_rows(table.take(pa.array(good))), config))
    return sums.means()


def _source_manifest(src: Path) -> dict:
    path = src / "manifest.json"
    return json.loads(path.read_text()) if src.is_dir() and path.exists() else {}


def reweight(src: str | Path, out: str | Path, config: WeightConfig, options: ReweightOptions = ReweightOptions()) -> dict:
    """Recompute the weight columns of SRC into OUT; returns the manifest."""
    files = source_files(src)
    schema = _check_schema(files)
    fingerprint = files_fingerprint(files)
    run_key = {"command": "reweight", "input_fingerprint": fingerprint, "weights": config.to_dict(),
               "shard_rows": options.shard_rows}
    writer = DatasetWriter(out, run_key, overwrite=options.overwrite)
    means = dataset_means(files, config, options.batch_rows) if config.normalize == "dataset" else None

    diagnostics = Diagnostics()
    tokens = completion_tokens = 0
    slices = _shard_slices(iter_batches(files, options.batch_rows), options.shard_rows)
    for _, group in itertools.groupby(slices, key=lambda item: item[0]):
        with writer.shard() as handle:
            for _, start, part in group:
                reasons = validate(part, config)
                good, bad = _split(reasons)
                if len(bad):
                    rejects = part.take(pa.array(bad))
                    rejects = rejects.append_column("row_index", pa.array(start + bad, pa.int64()))
                    rejects = rejects.append_column("reject_reason", pa.array([reasons[i] for i in bad], pa.string()))
                    handle.reject(rejects)
                if len(good):
                    kept = part.take(pa.array(good)) if len(good) < len(part) else part
                    rows = token_rows(kept)
                    weights = weigh(rows, config, means, observer=diagnostics)
                    handle.write(with_columns(kept, weight_columns(rows, weights)))
                    tokens += int(rows.offsets[-1])
                    completion_tokens += int(np.count_nonzero(rows.completion_mask == 1))
                end = start + len(part)
            handle.commit(end)

    summary = diagnostics.summary()
    source = _source_manifest(Path(src))
    manifest = {
        "tool": {"name": "pear-data", "version": __version__},
        "command": "reweight",
        "input": {"path": str(src), "fingerprint": fingerprint, "files": len(files)},
        "weights": config.to_dict(),
        "tokens": {"total": tokens, "completion": completion_tokens},
        "diagnostics": summary,
        "warnings": degeneracy_warnings(summary),
        "dataset_means": means,
    }
    for key in ("models", "tokenizer", "behavior", "alignment", "license", "corpus"):  # as scored
        if key in source:
            manifest[key] = source[key]
    return writer.finalize(manifest, render_card)
