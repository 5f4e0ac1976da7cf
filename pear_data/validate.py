"""Row validation for scored data (docs/design.md 3.1, 3.3, 3.7).

A scored row is valid when its four list columns are non-null and of equal
length, completion_mask holds only 0/1 with position 0 equal to 0 and at
least one 1, and every log-prob on a completion position is a number <= 0
(-inf only where a finite --log-ratio-clip bound can absorb it). Positions
outside the completion are not checked: they never enter a ratio.

The optional `shared_boundary` column (cross-tokenizer rows, design 3.7)
must have the same length, hold 0/1, be 1 only on completion positions and be
1 on each row's last completion token (every span ends). Without it every
completion token ends its own span.

Checks are vectorized over the batch's flat arrays; each bad row gets one
reason that names the column and the position, e.g.
"behavior_logprobs[17] is NaN".
"""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .schema import LOGPROB_COLUMNS, REQUIRED_SCORED, SHARED_BOUNDARY
from .weights import WeightConfig

SPAN_COLUMN = SHARED_BOUNDARY


def flat_list(column: pa.Array | pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    """(offsets int64 [R+1], values ndarray [N]) of a list column without nulls."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    lengths = pc.list_value_length(column).to_numpy(zero_copy_only=False).astype(np.int64)
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    values = pc.list_flatten(column)
    if values.null_count:
        values = values.fill_null(math.nan) if pa.types.is_floating(values.type) else values.fill_null(-1)
    return offsets, values.to_numpy(zero_copy_only=False)


def _first_per_row(bad: np.ndarray, offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For flat boolean `bad`: rows having any True, and the first bad position within each."""
    flat = np.flatnonzero(bad)
    rows = np.searchsorted(offsets, flat, side="right") - 1
    rows, first = np.unique(rows, return_index=True)
    return rows, flat[first] - offsets[rows]


def validate(batch: pa.RecordBatch | pa.Table, config: WeightConfig) -> list[str | None]:
    """One entry per row: None when valid, else the reject reason."""
    num_rows = batch.num_rows
    reasons: list[str | None] = [None] * num_rows

    def flag(rows, message) -> None:
        for row, text in zip(rows, message):
            if reasons[row] is None:
                reasons[row] = text

    has_spans = SPAN_COLUMN in batch.schema.names
    list_columns = REQUIRED_SCORED + ((SPAN_COLUMN,) if has_spans else ())
    lengths = {}
    for name in list_columns:
        column = batch.column(name)
        if not pa.types.is_list(column.type) and not pa.types.is_large_list(column.type):
            raise TypeError(f"column {name!r} must be a list column, got {column.type}")
        nulls = np.flatnonzero(column.is_null().to_numpy(zero_copy_only=False))
        flag(nulls, [f"{name} is null"] * len(nulls))
        lengths[name] = pc.fill_null(pc.list_value_length(column), 0).to_numpy(zero_copy_only=False)
    for name in list_columns[1:]:
        differ = np.flatnonzero(lengths[name] != lengths["input_ids"])
        flag(differ, [
            f"lengths differ: input_ids has {lengths['input_ids'][r]} tokens, {name} has {lengths[name][r]}"
            for r in differ
        ])

    # Token-level checks on the rows that passed the row-level ones.
    ok = np.array([r is None for r in reasons], dtype=bool)
    if not ok.any():
        return reasons
    keep = np.flatnonzero(ok)
    sub = batch.take(pa.array(keep)) if len(keep) < num_rows else batch
    offsets, mask = flat_list(sub.column("completion_mask"))

    rows, pos = _first_per_row((mask != 0) & (mask != 1), offsets)
    flag(keep[rows], [f"completion_mask[{p}] = {mask[offsets[r] + p]} (must be 0 or 1)" for r, p in zip(rows, pos)])
    nonempty = np.flatnonzero(offsets[:-1] < offsets[1:])
    first_is_one = nonempty[mask[offsets[nonempty]] == 1]
    flag(keep[first_is_one],
         ["completion_mask[0] = 1 (position 0 has no context and cannot be a completion token)"] * len(first_is_one))
    completion = mask == 1
    cumulative = np.concatenate(([0], np.cumsum(completion, dtype=np.int64)))
    counts = cumulative[offsets[1:]] - cumulative[offsets[:-1]]  # completion tokens per row (empty rows too)
    empty = np.flatnonzero(counts == 0)
    flag(keep[empty], ["empty completion: completion_mask has no 1"] * len(empty))

    # Spans: span_end[i] is True on the completion tokens that close a span.
    span_end = completion
    if has_spans:
        _, shared = flat_list(sub.column(SPAN_COLUMN))
        rows, pos = _first_per_row((shared != 0) & (shared != 1), offsets)
        flag(keep[rows], [f"{SPAN_COLUMN}[{p}] = {shared[offsets[r] + p]} (must be 0 or 1)" for r, p in zip(rows, pos)])
        rows, pos = _first_per_row((shared == 1) & ~completion, offsets)
        flag(keep[rows], [f"{SPAN_COLUMN}[{p}] = 1 on a prompt position (completion_mask is 0)" for p in pos])
        positions = np.flatnonzero(completion)
        last = positions[np.searchsorted(positions, offsets[1:][counts > 0]) - 1]
        open_end = last[shared[last] != 1]
        rows = np.searchsorted(offsets, open_end, side="right") - 1
        flag(keep[rows], [f"{SPAN_COLUMN}[{p - offsets[r]}] = 0 on the row's last completion token (the last span "
                          "never ends)" for r, p in zip(rows, open_end)])
        span_end = completion & (shared == 1)

    lo, hi = config.log_ratio_clip
    values = {}
    for name in LOGPROB_COLUMNS:
        _, lp = flat_list(sub.column(name))
        values[name] = lp
        for bad, describe in (
            (np.isnan(lp), lambda v: "is NaN"),
            (lp == np.inf, lambda v: "is +inf"),
            (lp > 0, lambda v: f"= {v:.6g} > 0 (a log-prob must be <= 0)"),
        ):
            rows, pos = _first_per_row(bad & completion, offsets)
            flag(keep[rows], [f"{name}[{p}] {describe(lp[offsets[r] + p])}" for r, p in zip(rows, pos)])

    # -inf: the log-ratio is +-inf; only a finite clip bound on that side absorbs it (design 3.1).
    target_ninf = (values["target_logprobs"] == -np.inf) & completion
    behavior_ninf = (values["behavior_logprobs"] == -np.inf) & completion
    checks = []
    if target_ninf.any() and behavior_ninf.any():  # -inf is rare: skip the span bookkeeping without it
        checks.append((_in_span(target_ninf, span_end, completion) & _in_span(behavior_ninf, span_end, completion),
                       "target_logprobs and behavior_logprobs are both -inf in the span ending at position {p} "
                       "(log-ratio undefined)"))
    if config.center:
        checks.append((target_ninf | behavior_ninf,
                       "{col}[{p}] is -inf: an infinite log-ratio cannot be centered (--center)"))
    if lo == -math.inf:
        checks.append((target_ninf, "target_logprobs[{p}] is -inf and --log-ratio-clip has no finite lower bound"))
    if hi == math.inf:
        checks.append((behavior_ninf, "behavior_logprobs[{p}] is -inf and --log-ratio-clip has no finite upper bound"))
    for bad, template in checks:
        rows, pos = _first_per_row(bad, offsets)
        for r, p in zip(rows, pos):
            column = "target_logprobs" if target_ninf[offsets[r] + p] else "behavior_logprobs"
            flag([keep[r]], [template.format(p=p, col=column)])
    return reasons


def _in_span(flags: np.ndarray, span_end: np.ndarray, completion: np.ndarray) -> np.ndarray:
    """bool [N]: True on the span ends whose span (completion tokens since the previous span end) has a flag."""
    positions = np.flatnonzero(completion)
    span_id = np.cumsum(span_end[positions]) - span_end[positions]  # span of each completion token
    hit = np.bincount(span_id, weights=flags[positions], minlength=int(span_end.sum())) > 0
    out = np.zeros(len(flags), dtype=bool)
    out[np.flatnonzero(span_end)] = hit[: int(span_end.sum())]
    return out
