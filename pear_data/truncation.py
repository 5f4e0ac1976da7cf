"""The one truncation rule, shared by `score`, `reweight --max-length` and the trainers (docs/design.md 2.6).

A row longer than `max_length` tokens keeps its first `max_length` tokens
(TRL's `truncation_mode="keep_start"`). Because the models are causal, the
log-prob of every kept token is the same in the cut row as in the whole row:
static weights recomputed on the cut from the stored log-probs are the weights
`score --max-length` writes, and the online weights of a cut row at the scoring
checkpoint equal them too.

For a row aligned from another tokenizer (design 3.7) a cut can fall inside a
span, whose behavior log-prob is stored on the span's last token, past the cut.
The cut span keeps that log-prob on its last kept token, which becomes the
span's end: the whole span's behavior log-prob stands for the part kept (exact
when the cut falls on a shared boundary; `score` counts the behavior token
that straddles its cut whole, so the two can differ by the behavior tokens of
the span past the straddling one).

A row left with no completion token is not trained: `score` and `reweight`
reject it, the trainers drop and count it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from .schema import BEHAVIOR_LOGPROBS, COMPLETION_MASK, INPUT_IDS, SHARED_BOUNDARY, TOKEN_COLUMNS
from .validate import flat_list


@dataclass
class Cut:
    """The result of `truncate` on flat token arrays of R rows.

    keep:      bool [N], the tokens kept (the first max_length of each row)
    offsets:   int64 [R + 1], row offsets of the kept tokens
    behavior:  float [N'] or None, the kept behavior log-probs, span log-probs moved to the cut
    shared:    int8 [N'] or None, the kept span ends, the cut's last token closing its span
    cut_completion: completion tokens cut away, per row (int64 [R])
    """

    keep: np.ndarray
    offsets: np.ndarray
    behavior: np.ndarray | None
    shared: np.ndarray | None
    cut_completion: np.ndarray


def truncate(offsets: np.ndarray, max_length: int, completion_mask: np.ndarray,
             behavior_logprobs: np.ndarray | None = None, shared_boundary: np.ndarray | None = None) -> Cut:
    """Apply the rule to rows given as flat arrays with row offsets (int64 [R + 1]); no loop over tokens.

    completion_mask: [N] 0/1. behavior_logprobs, shared_boundary: [N] or None (the span fix needs both).
    """
    offsets = np.asarray(offsets, dtype=np.int64)
    lengths = np.diff(offsets)
    kept = np.minimum(lengths, max_length)
    position = np.arange(offsets[-1], dtype=np.int64) - np.repeat(offsets[:-1], lengths)
    keep = position < np.repeat(kept, lengths)
    mask = np.asarray(completion_mask) != 0
    cut = np.concatenate(([0], np.cumsum(mask & ~keep, dtype=np.int64)))
    cut_completion = cut[offsets[1:]] - cut[offsets[:-1]]
    behavior = shared = None
    if behavior_logprobs is not None and shared_boundary is not None:
        behavior, shared = _close_cut_spans(offsets, kept, mask, np.asarray(behavior_logprobs).copy(),
                                            np.asarray(shared_boundary).copy())
        behavior, shared = behavior[keep], shared[keep]
    elif behavior_logprobs is not None:
        behavior = np.asarray(behavior_logprobs)[keep]
    new_offsets = np.zeros_like(offsets)
    np.cumsum(kept, out=new_offsets[1:])
    return Cut(keep, new_offsets, behavior, shared, cut_completion)


def _close_cut_spans(offsets: np.ndarray, kept: np.ndarray, mask: np.ndarray, behavior: np.ndarray,
                     shared: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Where a cut row's last kept token is a completion token inside a span, move the span's behavior
    log-prob (on its end past the cut) to that token and make it the span's end."""
    lengths = np.diff(offsets)
    cut_rows = np.flatnonzero(kept < lengths)
    last = offsets[cut_rows] + kept[cut_rows] - 1
    inside = (kept[cut_rows] > 0) & mask[last] & (shared[last] == 0)
    last, row_end = last[inside], offsets[cut_rows + 1][inside]
    ends = np.flatnonzero(shared != 0)
    at = np.searchsorted(ends, last)
    span_end = ends[np.minimum(at, len(ends) - 1)] if len(ends) else last
    found = (at < len(ends)) & (span_end < row_end)  # the span's end, in the same row (validated rows have one)
    last, span_end = last[found], span_end[found]
    behavior[last] = behavior[span_end]
    shared[last] = 1
    return behavior, shared


def truncate_table(table: pa.Table, max_length: int) -> tuple[pa.Table, np.ndarray]:
    """Cut every token-aligned list column (`schema.TOKEN_COLUMNS`) of the rows longer than max_length by the
    rule; other columns are kept as they are. Returns the table and the completion tokens cut per row (int64).

    The rows must hold no nulls in these columns (validated rows, or rows written by pear-data).
    """
    offsets, mask = flat_list(table.column(COMPLETION_MASK))
    if not (np.diff(offsets) > max_length).any():
        return table, np.zeros(table.num_rows, dtype=np.int64)
    names = table.column_names
    spans = BEHAVIOR_LOGPROBS in names and SHARED_BOUNDARY in names
    cut = truncate(offsets, max_length, mask,
                   flat_list(table.column(BEHAVIOR_LOGPROBS))[1] if spans else None,
                   flat_list(table.column(SHARED_BOUNDARY))[1] if spans else None)
    new_offsets = pa.array(cut.offsets.astype(np.int32))
    for name in (n for n in TOKEN_COLUMNS if n in names):
        column = table.column(name)
        if spans and name == BEHAVIOR_LOGPROBS:
            values = cut.behavior
        elif spans and name == SHARED_BOUNDARY:
            values = cut.shared
        else:
            values = flat_list(column)[1][cut.keep]
        value_type = column.type.value_type
        table = table.set_column(names.index(name), name,
                                 pa.ListArray.from_arrays(new_offsets, pa.array(values, type=value_type)))
    return table, cut.cut_completion


def row_lengths(table: pa.Table) -> np.ndarray:
    """int64 [R]: tokens per row (the length of input_ids)."""
    return np.diff(flat_list(table.column(INPUT_IDS))[0])
