"""A pear-data dataset made ready for a trainer: check, cut, drop, pack (docs/design.md 4.2).

    dataset, report = prepare_dataset(dataset, TrainingData(mode="static", weights="pear_token_weight",
                                                            max_length=2048, packing="bfd"))

In order, for a map-style `datasets.Dataset` (an `IterableDataset` is left to the collator, which applies the
same rules row by row, and cannot be packed):

1. the columns the mode needs are there (else `TrainingError` naming the column and the command that writes it);
   static weights are finite and >= 0 on the completion;
2. rows longer than `max_length` follow the one truncation rule (`pear_data.truncation`): online, they are cut;
   static, their weights were computed for the whole row, so training refuses them and names
   `pear-data reweight --max-length`, which recomputes them for the cut; `packing="bfd_split"` splits them
   instead (static only: a fragment's online suffix sums would miss the other fragments);
3. rows with no label token left are dropped and counted, never trained as zero-loss rows;
4. with `packing`, the rows the collator reads are packed into rows of at most `max_length` tokens by TRL's
   `pack_dataset` (best-fit decreasing, the bins TRL's own packing makes), every PEAR list column with its
   tokens and `pear_seq_weight` spread over its row's tokens; `seq_lengths` records each packed row's rows.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from .config import TrainingData
from .errors import TrainingError
from .schema import COMPLETION_MASK, INPUT_IDS, SHARED_BOUNDARY, WEIGHT_COLUMNS
from .truncation import row_lengths, truncate_table
from .validate import flat_list

logger = logging.getLogger(__name__)

_STATS_BATCH = 4096


@dataclass
class PrepareReport:
    """What `prepare_dataset` did: rows in, rows cut, split or dropped (no label token left), rows out."""

    rows_in: int = 0
    cut: int = 0
    split: int = 0
    dropped: int = 0
    rows_out: int = 0
    packed_rows: int | None = None
    notes: list[str] = field(default_factory=list)


def check_columns(names: list[str], data: TrainingData, name: str = "train") -> None:
    """`TrainingError` naming the first column `data` needs that `names` lacks, and what writes it."""
    for column in data.columns:
        if column in names:
            continue
        if column in WEIGHT_COLUMNS.values():
            hint = ("`pear-data reweight SRC --out DST` writes all three weight columns (pear_token_weight, "
                    "pear_block_weight, pear_seq_weight) from the scored log-probs")
        elif column == SHARED_BOUNDARY:
            hint = ("online PEAR needs the span ends of rows aligned from another tokenizer (design 3.7); "
                    "`pear-data score` writes it (for rows in the target's own tokens it equals completion_mask)")
        else:
            hint = "train on the output of `pear-data score` / `reweight`, and keep the column"
        raise TrainingError(f"the {name} dataset has no column {column!r} (it has {sorted(names)}): {hint}")


def prepare_dataset(dataset: Any, data: TrainingData, name: str = "train") -> tuple[Any, PrepareReport]:
    """The dataset as the trainer will read it (module docstring); raises `TrainingError`."""
    import datasets

    check_columns(list(dataset.column_names or []), data, name)
    report = PrepareReport()
    if isinstance(dataset, datasets.IterableDataset):
        if data.packing:
            raise TrainingError(f"packing the {name} dataset needs a map-style datasets.Dataset, not an "
                                "IterableDataset (its row lengths are not known up front)")
        return dataset, report
    lengths, labels = _row_stats(dataset.select_columns(data.columns), data)
    report.rows_in = len(lengths)
    longer = np.flatnonzero(lengths > data.max_length) if data.max_length is not None else np.zeros(0, np.int64)
    if len(longer):
        _check_longer(longer, lengths, data, name)
        if data.packing == "bfd_split":
            report.split = len(longer)
            report.notes.append(f"{len(longer)} row(s) longer than max_length={data.max_length} are split across "
                                "packed rows (as TRL's bfd_split does): their later fragments lose the earlier context")
        else:
            report.cut = len(longer)
            report.notes.append(f"{len(longer)} row(s) longer than max_length={data.max_length} are cut to their "
                                "first max_length tokens (the truncation rule); their online weights follow the cut")
    empty = np.flatnonzero(labels == 0)
    if len(empty):
        report.dropped = len(empty)
        report.notes.append(f"{len(empty)} row(s) with no label token left (after the cut to max_length="
                            f"{data.max_length}) are dropped: they would train as zero-loss rows")
        dataset = dataset.select(np.flatnonzero(labels > 0))
    report.rows_out = report.rows_in - report.dropped
    if report.cut or data.packing:
        dataset = _arrow_map(dataset.select_columns(data.columns), _cut_and_spread, data, name)
    if data.packing:
        dataset = _pack(dataset, data)
        report.packed_rows = len(dataset)
    for note in report.notes:
        logger.warning("%s dataset: %s", name, note)
    return dataset, report


def _row_stats(dataset: Any, data: TrainingData) -> tuple[np.ndarray, np.ndarray]:
    """Per row: its length, and its label tokens after the cut (completion tokens at positions 1..kept-1).
    Streams the table a batch at a time; checks static weights on the way."""
    lengths, labels = [], []
    row = 0
    for table in dataset.with_format("arrow").iter(batch_size=_STATS_BATCH):
        offsets, mask = flat_list(table.column(COMPLETION_MASK))
        n = np.diff(offsets)
        kept = n if data.max_length is None or data.packing == "bfd_split" else np.minimum(n, data.max_length)
        position = np.arange(offsets[-1]) - np.repeat(offsets[:-1], n)
        label = (mask != 0) & (position >= 1) & (position < np.repeat(kept, n))
        counts = np.concatenate(([0], np.cumsum(label, dtype=np.int64)))
        labels.append(counts[offsets[1:]] - counts[offsets[:-1]])
        lengths.append(row_lengths(table))
        if data.mode == "static":
            _check_static(table, data.weights, mask != 0, offsets, row)
        row += table.num_rows
    if not lengths:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.concatenate(lengths), np.concatenate(labels)


def _check_static(table: pa.Table, column: str, completion: np.ndarray, offsets: np.ndarray, first_row: int) -> None:
    values = table.column(column)
    if values.null_count:
        row = first_row + int(np.flatnonzero(values.is_null().to_numpy(zero_copy_only=False))[0])
        raise TrainingError(f"row {row}: {column} is null; pear-data writes every weight, so this row was not "
                            "written by `pear-data score` / `reweight` (or was edited)")
    if pa.types.is_list(values.type):
        weights = flat_list(values)[1]
        bad = completion & ~(np.isfinite(weights) & (weights >= 0))
        position = np.flatnonzero(bad)
        rows = np.searchsorted(offsets, position, side="right") - 1
    else:
        weights = values.to_numpy(zero_copy_only=False)
        rows = np.flatnonzero(~(np.isfinite(weights) & (weights >= 0)))
    if len(rows):
        raise TrainingError(f"row {first_row + int(rows[0])}: {column} holds a NaN, infinite or negative weight on "
                            "a completion token; a PEAR weight must be a finite number >= 0 (rewrite the column "
                            "with `pear-data reweight`, giving a finite --weight-clip upper bound)")


def _check_longer(longer: np.ndarray, lengths: np.ndarray, data: TrainingData, name: str) -> None:
    first, longest = int(longer[0]), int(lengths[longer].max())
    where = (f"{len(longer)} of the {len(lengths)} {name} rows are longer than max_length={data.max_length} "
             f"(row {first} has {int(lengths[first])} tokens, the longest {longest})")
    if data.mode == "static" and data.packing != "bfd_split":
        raise TrainingError(
            f"{where}: their static weights were computed over the whole completion, and a cut row would train on "
            "weights that no longer match it. Recompute them for the cut, no model needed: `pear-data reweight "
            f"OUT --out OUT-{data.max_length} --max-length {data.max_length}` (same weight flags); or raise "
            "max_length, or train with pear_mode='online' (its weights follow the cut)"
        )
    if data.mode == "online" and data.packing == "bfd_split":
        raise TrainingError(
            f"{where}: packing_strategy='bfd_split' would split them across packed rows, and the online weights of "
            "a fragment would miss the other fragments' ratios; use packing_strategy='bfd' (rows are cut by the "
            "truncation rule) or raise max_length"
        )


def _arrow_map(dataset: Any, function: Any, data: TrainingData, name: str) -> Any:
    fmt = dataset.format
    out = dataset.with_format("arrow").map(function, batched=True, fn_kwargs={"data": data},
                                           desc=f"Preparing the {name} dataset for PEAR")
    return out.with_format(fmt["type"], columns=fmt["columns"], output_all_columns=fmt["output_all_columns"])


def _cut_and_spread(table: pa.Table, data: TrainingData) -> pa.Table:
    """One batch: cut by the rule (not for bfd_split), and spread pear_seq_weight over the tokens to pack it."""
    if data.max_length is not None and data.packing != "bfd_split":
        table = truncate_table(table, data.max_length)[0]
    if data.packing and data.weights == WEIGHT_COLUMNS["sequence"]:
        offsets, _ = flat_list(table.column(INPUT_IDS))
        values = table.column(data.weights).to_numpy(zero_copy_only=False).astype(np.float32)
        spread = pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)),
                                          pa.array(np.repeat(values, np.diff(offsets)), pa.float32()))
        table = table.set_column(table.column_names.index(data.weights), data.weights, spread)
    return table


def _pack(dataset: Any, data: TrainingData) -> Any:
    try:
        from trl import pack_dataset
    except ImportError as exc:
        raise TrainingError("packing uses TRL's pack_dataset: pip install 'pear-data[trl]'") from exc
    if data.shuffle_seed is not None:
        dataset = dataset.shuffle(seed=data.shuffle_seed)
    return pack_dataset(dataset, data.max_length, data.packing)
