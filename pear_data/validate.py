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
    reasons: list[str | None] = [None] * batch.num_rows
    has_spans = SHARED_BOUNDARY in batch.schema.names
    _check_lists(batch, REQUIRED_SCORED + ((SHARED_BOUNDARY,) if has_spans else ()), _Flags(reasons))
    # Token-level checks on the rows that passed the row-level ones.
    keep = np.flatnonzero(np.array([r is None for r in reasons], dtype=bool))
    if not len(keep):
        return reasons
    sub = batch.take(pa.array(keep)) if len(keep) < batch.num_rows else batch
    flag = _Flags(reasons, keep)
    offsets, mask = flat_list(sub.column("completion_mask"))
    completion, counts = _check_mask(offsets, mask, flag)
    span_end = _check_spans(sub, offsets, completion, counts, flag) if has_spans else completion
    _check_logprobs(sub, offsets, completion, span_end, config, flag)
    return reasons


class _Flags:
    """Records the first reason of each row; `rows` are positions in the checked table, mapped through `keep`
    (the rows of the batch that table holds) to batch rows."""

    def __init__(self, reasons: list[str | None], keep: np.ndarray | None = None) -> None:
        self.reasons, self.keep = reasons, keep

    def __call__(self, rows, messages) -> None:
        for row, text in zip(rows, messages):
            row = int(row if self.keep is None else self.keep[row])
            if self.reasons[row] is None:
                self.reasons[row] = text


def _check_lists(batch: pa.RecordBatch | pa.Table, names: tuple[str, ...], flag: _Flags) -> None:
    """Each list column present and non-null, every one as long as input_ids."""
    lengths = {}
    for name in names:
        column = batch.column(name)
        if not pa.types.is_list(column.type) and not pa.types.is_large_list(column.type):
            raise TypeError(f"column {name!r} must be a list column, got {column.type}")
        nulls = np.flatnonzero(column.is_null().to_numpy(zero_copy_only=False))
        flag(nulls, [f"{name} is null"] * len(nulls))
        lengths[name] = pc.fill_null(pc.list_value_length(column), 0).to_numpy(zero_copy_only=False)
    for name in names[1:]:
        differ = np.flatnonzero(lengths[name] != lengths["input_ids"])
        flag(differ, [f"lengths differ: input_ids has {lengths['input_ids'][r]} tokens, {name} has "
                      f"{lengths[name][r]}" for r in differ])


def _check_mask(offsets: np.ndarray, mask: np.ndarray, flag: _Flags) -> tuple[np.ndarray, np.ndarray]:
    """completion_mask holds 0/1, position 0 is 0, at least one 1; returns (completion bool [N], per-row count)."""
    rows, pos = _first_per_row((mask != 0) & (mask != 1), offsets)
    flag(rows, [f"completion_mask[{p}] = {mask[offsets[r] + p]} (must be 0 or 1)" for r, p in zip(rows, pos)])
    nonempty = np.flatnonzero(offsets[:-1] < offsets[1:])
    first_is_one = nonempty[mask[offsets[nonempty]] == 1]
    flag(first_is_one,
         ["completion_mask[0] = 1 (position 0 has no context and cannot be a completion token)"] * len(first_is_one))
    completion = mask == 1
    cumulative = np.concatenate(([0], np.cumsum(completion, dtype=np.int64)))
    counts = cumulative[offsets[1:]] - cumulative[offsets[:-1]]  # completion tokens per row (empty rows too)
    empty = np.flatnonzero(counts == 0)
    flag(empty, ["empty completion: completion_mask has no 1"] * len(empty))
    return completion, counts


def _check_spans(sub: pa.RecordBatch | pa.Table, offsets: np.ndarray, completion: np.ndarray, counts: np.ndarray,
                 flag: _Flags) -> np.ndarray:
    """shared_boundary holds 0/1, 1 only on completion positions and on each row's last completion token;
    returns the span ends (bool [N])."""
    _, shared = flat_list(sub.column(SHARED_BOUNDARY))
    rows, pos = _first_per_row((shared != 0) & (shared != 1), offsets)
    flag(rows, [f"{SHARED_BOUNDARY}[{p}] = {shared[offsets[r] + p]} (must be 0 or 1)" for r, p in zip(rows, pos)])
    rows, pos = _first_per_row((shared == 1) & ~completion, offsets)
    flag(rows, [f"{SHARED_BOUNDARY}[{p}] = 1 on a prompt position (completion_mask is 0)" for p in pos])
    positions = np.flatnonzero(completion)
    last = positions[np.searchsorted(positions, offsets[1:][counts > 0]) - 1]
    open_end = last[shared[last] != 1]
    rows = np.searchsorted(offsets, open_end, side="right") - 1
    flag(rows, [f"{SHARED_BOUNDARY}[{p - offsets[r]}] = 0 on the row's last completion token (the last span never "
                "ends)" for r, p in zip(rows, open_end)])
    return completion & (shared == 1)


def _check_logprobs(sub: pa.RecordBatch | pa.Table, offsets: np.ndarray, completion: np.ndarray,
                    span_end: np.ndarray, config: WeightConfig, flag: _Flags) -> None:
    """Every log-prob on a completion position is a number <= 0; -inf only where a finite clip bound absorbs it
    (design 3.1)."""
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
            flag(rows, [f"{name}[{p}] {describe(lp[offsets[r] + p])}" for r, p in zip(rows, pos)])
    target_ninf = (values["target_logprobs"] == -np.inf) & completion
    behavior_ninf = (values["behavior_logprobs"] == -np.inf) & completion
    for bad, template in _infinite_log_ratio_checks(target_ninf, behavior_ninf, span_end, completion, config):
        rows, pos = _first_per_row(bad, offsets)
        for r, p in zip(rows, pos):
            column = "target_logprobs" if target_ninf[offsets[r] + p] else "behavior_logprobs"
            flag([r], [template.format(p=p, col=column)])


def _infinite_log_ratio_checks(target_ninf: np.ndarray, behavior_ninf: np.ndarray, span_end: np.ndarray,
                               completion: np.ndarray, config: WeightConfig) -> list[tuple[np.ndarray, str]]:
    """(bad positions, reason template) of each way a -inf log-prob leaves the log-ratio infinite."""
    lo, hi = config.log_ratio_clip
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
    return checks


def _in_span(flags: np.ndarray, span_end: np.ndarray, completion: np.ndarray) -> np.ndarray:
    """bool [N]: True on the span ends whose span (completion tokens since the previous span end) has a flag."""
    positions = np.flatnonzero(completion)
    span_id = np.cumsum(span_end[positions]) - span_end[positions]  # span of each completion token
    hit = np.bincount(span_id, weights=flags[positions], minlength=int(span_end.sum())) > 0
    out = np.zeros(len(flags), dtype=bool)
    out[np.flatnonzero(span_end)] = hit[: int(span_end.sum())]
    return out
