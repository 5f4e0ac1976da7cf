"""The weigh stage: scored rows in, weighted rows and rejects out (docs/design.md section 3).

    table (scored columns) --validate--> valid rows --weigh--> + pear_*_weight columns

One function, `weigh_table`, used by every place that writes weights: each
shard of `score`, the dataset-normalization pass of `score`, and `reweight`.
It also converts between Arrow list columns and the engine's flat arrays
(`token_rows`, `weight_columns`): Arrow in, Arrow out, no Python loop over
rows or tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from .schema import BEHAVIOR_LOGPROBS, COMPLETION_MASK, INPUT_IDS, SHARED_BOUNDARY, TARGET_LOGPROBS, WEIGHT_COLUMNS
from .truncation import truncate_table
from .validate import flat_list, validate
from .weights import RowWeights, TokenRows, WeightConfig, WeightObserver, WeightSums, weigh


@dataclass
class WeighedTable:
    """What `weigh_table` did with a table of R scored rows.

    kept:          the valid rows, in order, with the three weight columns set
    kept_rows:     int64 [K], index in the input table of each kept row
    rejected_rows: int64 [R - K], index in the input table of each rejected row
    reasons:       why, one per rejected row ("behavior_logprobs[17] is NaN")
    tokens:        tokens of the kept rows; completion_tokens: their completion tokens
    truncated_completion / truncated_prompt / rows_truncated: completion and other tokens, and kept rows,
                   cut by `max_length`
    sums:          per granularity, the sum of the bounded W before normalization and cap, over
                   the kept completion tokens (dataset normalization sums these over the output)
    """

    kept: pa.Table
    kept_rows: np.ndarray
    rejected_rows: np.ndarray
    reasons: list[str]
    tokens: int = 0
    completion_tokens: int = 0
    sums: WeightSums = field(default_factory=WeightSums)
    truncated_completion: int = 0
    truncated_prompt: int = 0
    rows_truncated: int = 0


def weigh_table(
    table: pa.Table,
    config: WeightConfig,
    means: dict[str, float] | None = None,
    observer: WeightObserver | None = None,
    max_length: int | None = None,
) -> WeighedTable:
    """Validate every row, weigh the valid ones (`weights.weigh`), set their weight columns.

    means: the dataset means of the bounded W per granularity, needed with
    `config.normalize == "dataset"` (`WeightSums.means()` of a first pass).
    observer: sees the weights as they are computed (`diagnostics.Diagnostics`).
    max_length: cut the valid rows by the one truncation rule first (`pear_data.truncation`); a row left with
    no completion token is rejected (rejects keep the whole row). Every other column is kept as it is.
    """
    reasons = validate(table, config)
    bad = np.fromiter((r is not None for r in reasons), dtype=bool, count=len(reasons))
    kept_rows = np.flatnonzero(~bad)
    kept = table if len(kept_rows) == table.num_rows else table.take(pa.array(kept_rows))
    cut_completion = np.zeros(len(kept_rows), dtype=np.int64)
    if max_length is not None and len(kept_rows):
        lengths = np.diff(flat_list(kept.column(INPUT_IDS))[0])
        kept, cut_completion = truncate_table(kept, max_length)
        offsets, mask = flat_list(kept.column(COMPLETION_MASK))
        counts = np.concatenate(([0], np.cumsum(mask != 0, dtype=np.int64)))
        emptied = counts[offsets[1:]] == counts[offsets[:-1]]
        for i in np.flatnonzero(emptied):
            reasons[kept_rows[i]] = (f"no completion token within --max-length {max_length} (the rule keeps a "
                                     f"row's first {max_length} tokens)")
        if emptied.any():
            kept, kept_rows = kept.filter(pa.array(~emptied)), kept_rows[~emptied]
            lengths, cut_completion = lengths[~emptied], cut_completion[~emptied]
    rejected_rows = np.setdiff1d(np.arange(table.num_rows), kept_rows)
    result = WeighedTable(table.slice(0, 0), kept_rows, rejected_rows, [reasons[i] for i in rejected_rows])
    if not len(kept_rows):
        return result
    if max_length is not None:
        result.truncated_completion = int(cut_completion.sum())
        result.truncated_prompt = int(np.maximum(lengths - max_length, 0).sum()) - result.truncated_completion
        result.rows_truncated = int((lengths > max_length).sum())
    rows = token_rows(kept)
    weights = weigh(rows, config, means, observer=observer)
    result.kept = with_columns(kept, weight_columns(rows, weights))
    result.tokens = int(rows.offsets[-1])
    result.completion_tokens = weights.sums.count
    result.sums = weights.sums
    return result


def token_rows(batch: pa.RecordBatch | pa.Table) -> TokenRows:
    """Flat engine view of a batch of *valid* rows (zero-copy where Arrow allows)."""
    offsets, mask = flat_list(batch.column(COMPLETION_MASK))
    _, target = flat_list(batch.column(TARGET_LOGPROBS))
    _, behavior = flat_list(batch.column(BEHAVIOR_LOGPROBS))
    shared = flat_list(batch.column(SHARED_BOUNDARY))[1] if SHARED_BOUNDARY in batch.schema.names else None
    return TokenRows(offsets=offsets, completion_mask=mask, target_logprobs=target, behavior_logprobs=behavior,
                     shared_boundary=shared)


def weight_columns(rows: TokenRows, weights: RowWeights) -> dict[str, pa.Array]:
    """The three weight columns (design section 2) as Arrow arrays aligned with the rows."""
    offsets = pa.array(rows.offsets.astype(np.int32))
    return {
        WEIGHT_COLUMNS["token"]: pa.ListArray.from_arrays(offsets, pa.array(weights.token, type=pa.float32())),
        WEIGHT_COLUMNS["block"]: pa.ListArray.from_arrays(offsets, pa.array(weights.block, type=pa.float32())),
        WEIGHT_COLUMNS["sequence"]: pa.array(weights.sequence, type=pa.float32()),
    }


def with_columns(table: pa.Table, columns: dict[str, pa.Array]) -> pa.Table:
    """Set (replace in place, or append) columns of a table, keeping every other column."""
    for name, array in columns.items():
        if name in table.column_names:
            table = table.set_column(table.column_names.index(name), name, array)
        else:
            table = table.append_column(name, array)
    return table
