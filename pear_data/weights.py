"""PEAR weight engine: docs/design.md section 3, vectorized over flat token arrays.

A batch of rows is held Arrow-style: one flat array per list column plus
`offsets` (row r owns flat positions offsets[r]:offsets[r+1]). The math runs
on the *completion* tokens only (completion_mask == 1), packed into a second
flat space ("completion space") with its own row offsets, so that every
suffix sum is a difference of one cumulative sum:

    cs[i] = d_0 + ... + d_{i-1}            (cs has Nc + 1 entries, cs[0] = 0)
    sum_{j=i+1}^{e} d_j = cs[e + 1] - cs[i + 1]

Everything is float64 inside and float32 out. There is no Python loop over
tokens or rows.

Cross-tokenizer rows (a behavior with another tokenizer, design section 3.7)
carry `shared_boundary`: 1 on the completion tokens that end at a character
position where both tokenizations have a token boundary. The tokens from one
shared boundary to the next form a *span*; the span's log-ratio
sum_{k in span} (lt_k - lb_k) is exact (the behavior's log-prob of the span
text sits on the span's last token), is clipped as one d, and is charged to
the span's last target token (d = 0 on the span's other tokens). Block
boundaries are snapped to the nearest span end. Without the column every
completion token ends a span, which is the plain math above.
"""

from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from .config import WeightConfig
from .schema import GRANULARITIES, Granularity

__all__ = ["WeightConfig", "TokenRows", "RowWeights", "WeightSums", "weigh", "weight_sums"]


@dataclass
class TokenRows:
    """A batch of scored rows as flat arrays (Arrow list layout).

    offsets:            int64 [R + 1], row r is flat[offsets[r]:offsets[r+1]]
    completion_mask:    int8/bool [N]
    target_logprobs:    float [N], log pi_target(input_ids[i] | input_ids[:i])
    behavior_logprobs:  float [N], same under the behavior (sampling) policy
    shared_boundary:    int8/bool [N] or None, 1 on completion tokens that end a
                        span (module docstring); None = every completion token
    """

    offsets: np.ndarray
    completion_mask: np.ndarray
    target_logprobs: np.ndarray
    behavior_logprobs: np.ndarray
    shared_boundary: np.ndarray | None = None

    @property
    def num_rows(self) -> int:
        return len(self.offsets) - 1


@dataclass
class CompletionIndex:
    """Where the completion tokens are, and how they group into rows.

    positions:  int64 [Nc], flat position of each completion token
    offsets:    int64 [R + 1], completion-space row offsets
    lengths:    int64 [R], T per row
    row_end:    int64 [Nc], completion-space index of the row's last token, per token
    span_ends:  int64 [S] or None, sorted completion-space indices of the tokens
                that end a span (cross-tokenizer rows); None = every token
    """

    positions: np.ndarray
    offsets: np.ndarray
    lengths: np.ndarray
    row_end: np.ndarray
    span_ends: np.ndarray | None = None

    @classmethod
    def from_mask(
        cls, offsets: np.ndarray, completion_mask: np.ndarray, shared_boundary: np.ndarray | None = None
    ) -> CompletionIndex:
        mask = completion_mask.astype(bool, copy=False)
        positions = np.flatnonzero(mask)
        # Completion tokens before each row start, from a searchsorted on the
        # sorted positions: no cumsum over all N tokens needed.
        comp_offsets = np.searchsorted(positions, np.asarray(offsets, dtype=np.int64)).astype(np.int64)
        lengths = np.diff(comp_offsets)
        row_end = np.repeat(comp_offsets[1:] - 1, lengths)
        span_ends = None
        if shared_boundary is not None:
            ends = shared_boundary[positions].astype(bool, copy=False)
            ends[comp_offsets[1:][lengths > 0] - 1] = True  # a row's last token always closes its last span
            if not ends.all():
                span_ends = np.flatnonzero(ends)
        return cls(positions=positions, offsets=comp_offsets, lengths=lengths, row_end=row_end, span_ends=span_ends)

    @property
    def num_tokens(self) -> int:
        return len(self.positions)


def log_ratios(rows: TokenRows, index: CompletionIndex, config: WeightConfig) -> np.ndarray:
    """d_k of design 3.1 in completion space, float64 [Nc]."""
    lt = rows.target_logprobs[index.positions].astype(np.float64)
    lb = rows.behavior_logprobs[index.positions].astype(np.float64)
    r = np.subtract(lt, lb, out=lt)
    if config.center:
        r -= np.repeat(_row_sums(r, index) / index.lengths, index.lengths)
    lo, hi = config.log_ratio_clip
    if index.span_ends is not None:
        # One d per span, sum of the span's per-token log-ratios, on the span's last token.
        span_starts = np.concatenate(([0], index.span_ends[:-1] + 1))
        span_sums = np.add.reduceat(r, span_starts)  # reduceat, not cumsum differences: -inf stays local
        r[:] = 0.0
        r[index.span_ends] = np.clip(span_sums, lo, hi)
        return r
    return np.clip(r, lo, hi, out=r)


def _row_sums(values: np.ndarray, index: CompletionIndex) -> np.ndarray:
    """Sum of completion-space values per row, float64 [R] (rows must have T >= 1)."""
    return np.add.reduceat(values, index.offsets[:-1]) if len(values) else np.zeros(0)


def _prefix_sums(values: np.ndarray) -> np.ndarray:
    """cs[i] = values[0] + ... + values[i-1], float64 [len + 1]."""
    cs = np.empty(len(values) + 1, dtype=np.float64)
    cs[0] = 0.0
    np.cumsum(values, out=cs[1:])
    return cs


def log_weights(d: np.ndarray, index: CompletionIndex, config: WeightConfig, granularity: Granularity) -> np.ndarray:
    """logW_k of design 3.2 in completion space, float64 [Nc], before bounds.

    The discount is folded into the sums: a suffix of n tokens carries
    n * log(gamma), so summing d_j + log(gamma) over the suffix gives
    S_k + (e_k - k) log(gamma) (token) and S_k + (T - last_k(b)) log(gamma)
    (block) in one cumulative sum.
    """
    if granularity == "sequence":
        total = _row_sums(d, index)
        if config.length_normalize:
            total = total / index.lengths
        return np.repeat(total, index.lengths)

    dg = d + math.log(config.gamma)
    if granularity == "token":
        cs = _prefix_sums(dg)
        if config.horizon is None:
            # sum over (k, T]: row total minus the inclusive prefix
            logw = np.repeat(cs[index.offsets[1:]], index.lengths)
        else:
            i = np.arange(index.num_tokens, dtype=np.int64)
            horizon = min(config.horizon, index.num_tokens)  # a larger H changes nothing and could overflow int64
            logw = cs[np.minimum(index.row_end, i + horizon) + 1]
        logw -= cs[1:]
        return logw
    if granularity == "block":
        # sum over the blocks after b: row total minus the inclusive prefix through b's last token
        cs = _prefix_sums(dg)
        return cs[index.row_end + 1] - cs[block_ends(index, config.block_size) + 1]
    raise ValueError(f"unknown granularity {granularity!r}")


def block_ends(index: CompletionIndex, block_size: int) -> np.ndarray:
    """Completion-space index of the last token of each token's block, int64 [Nc].

    Blocks of B = block_size completion tokens per row (the last one may be
    short). With spans (cross-tokenizer rows) every block end is snapped to the
    nearest span end in the row (a tie goes to the later one), so that a block
    boundary is a shared boundary and each block's log-ratio is exact; blocks
    that snap to the same end merge.
    """
    B = block_size
    i = np.arange(index.num_tokens, dtype=np.int64)
    if index.span_ends is None:
        row_start = np.repeat(index.offsets[:-1], index.lengths)
        return np.minimum(row_start + ((i - row_start) // B + 1) * B - 1, index.row_end)
    blocks_per_row = -(-index.lengths // B)
    row_start = np.repeat(index.offsets[:-1], blocks_per_row)
    row_end = np.repeat(index.offsets[1:] - 1, blocks_per_row)
    block_in_row = np.arange(len(row_start), dtype=np.int64) - np.repeat(
        np.cumsum(blocks_per_row) - blocks_per_row, blocks_per_row)
    ends = np.minimum(row_start + (block_in_row + 1) * B - 1, row_end)  # nominal block ends, sorted
    spans = index.span_ends
    j = np.searchsorted(spans, ends)  # first span end >= the nominal end (the row's last token is one)
    after = spans[j]
    before = spans[np.maximum(j - 1, 0)]
    use_before = (j > 0) & (before >= row_start) & (ends - before < after - ends)
    ends = np.unique(np.where(use_before, before, after))
    return ends[np.searchsorted(ends, i)]


def _log_bounds(config: WeightConfig) -> tuple[float, float]:
    wmin, wmax = config.weight_clip
    return (math.log(wmin) if wmin > 0 else -math.inf, math.log(wmax) if wmax > 0 else -math.inf)


def bounded_weights(
    logw: np.ndarray, config: WeightConfig, *, with_bounds: bool = True
) -> tuple[np.ndarray, np.ndarray | None]:
    """Steps 1-2 of design 3.3: W = exp(clip(logW)) (in place), and which tokens sit at a bound.

    at_bound: int8 [Nc], 0 inside, 1 at the lower bound wmin, 2 at the upper bound wmax.
    """
    log_lo, log_hi = _log_bounds(config)
    at_bound = None
    if with_bounds:
        at_bound = (logw <= log_lo).view(np.int8)
        at_bound[logw >= log_hi] = 2
    np.clip(logw, log_lo, log_hi, out=logw)
    return np.exp(logw, out=logw), at_bound


@dataclass
class WeightSums:
    """What dataset normalization needs from a pass over the data: sum W and n per granularity."""

    sums: dict[str, float] = field(default_factory=lambda: {g: 0.0 for g in GRANULARITIES})
    count: int = 0

    def add(self, other: WeightSums) -> None:
        for g in GRANULARITIES:
            self.sums[g] += other.sums[g]
        self.count += other.count

    def means(self) -> dict[str, float]:
        if self.count == 0:
            return {g: 1.0 for g in GRANULARITIES}
        return {g: self.sums[g] / self.count for g in GRANULARITIES}


@dataclass
class RowWeights:
    """Engine output for a batch of R rows with N tokens.

    token, block:   float32 [N], 0.0 where completion_mask == 0 (None if not asked for)
    sequence:       float32 [R] (None if not asked for)
    sums:           sum of the bounded W (design 3.3 steps 1-2, before normalization and cap) per
                    granularity over the completion tokens, and their count: what dataset
                    normalization needs (`WeightSums.means` over the whole output)
    """

    token: np.ndarray | None
    block: np.ndarray | None
    sequence: np.ndarray | None
    sums: WeightSums = field(default_factory=WeightSums)

    def column(self, granularity: Granularity) -> np.ndarray | None:
        return getattr(self, granularity)


def granularity_weights(
    d: np.ndarray,
    index: CompletionIndex,
    config: WeightConfig,
    granularity: Granularity,
    dataset_mean: float | None = None,
    *,
    with_bounds: bool = True,
) -> tuple[np.ndarray, np.ndarray | None, float]:
    """Final W (design 3.2 then 3.3) for one granularity in completion space, its at-bound flags, and the
    sum of the bounded W before normalization and cap."""
    w, at_bound = bounded_weights(log_weights(d, index, config, granularity), config, with_bounds=with_bounds)
    bounded_sum = float(w.sum())
    return normalized_weights(w, at_bound, index, config, dataset_mean), at_bound, bounded_sum


def normalized_weights(w: np.ndarray, at_bound: np.ndarray | None, index: CompletionIndex, config: WeightConfig,
                       dataset_mean: float | None = None) -> np.ndarray:
    """Steps 3-4 of design 3.3 (in place): normalize (dataset mean, or per row), then the cap, which counts as
    the upper bound in `at_bound`."""
    if config.normalize == "dataset":
        if dataset_mean is None:
            raise ValueError("normalize='dataset' needs the dataset mean of W (a first pass: weight_sums)")
        w /= dataset_mean
    elif config.normalize == "sequence":
        w /= np.repeat(_row_sums(w, index) / index.lengths, index.lengths)
    if config.max_weight is not None:
        if at_bound is not None:
            at_bound[w >= config.max_weight] = 2
        np.minimum(w, config.max_weight, out=w)
    return w


# Rows are processed in chunks of about this many tokens: every step is
# row-local, and cache-sized temporaries are much faster than arrays of the
# whole batch (bench/weights_throughput.py measures the engine).
CHUNK_TOKENS = 1 << 20


def row_chunks(offsets: np.ndarray, chunk_tokens: int | None = None) -> list[tuple[int, int]]:
    """Split rows [0, R) into consecutive [r0, r1) ranges: rows whose first token falls in the same
    window of chunk_tokens tokens share a chunk (so a chunk holds < chunk_tokens + its last row's length)."""
    chunk_tokens = CHUNK_TOKENS if chunk_tokens is None else chunk_tokens
    num_rows = len(offsets) - 1
    if num_rows == 0:
        return []
    window = (np.asarray(offsets[:-1], dtype=np.int64) - offsets[0]) // chunk_tokens
    bounds = [0, *(np.flatnonzero(np.diff(window)) + 1).tolist(), num_rows]
    return list(zip(bounds[:-1], bounds[1:]))


def _chunk(rows: TokenRows, r0: int, r1: int) -> TokenRows:
    a, b = int(rows.offsets[r0]), int(rows.offsets[r1])
    return TokenRows(
        offsets=rows.offsets[r0 : r1 + 1] - a,
        completion_mask=rows.completion_mask[a:b],
        target_logprobs=rows.target_logprobs[a:b],
        behavior_logprobs=rows.behavior_logprobs[a:b],
        shared_boundary=None if rows.shared_boundary is None else rows.shared_boundary[a:b],
    )


def _prepare(rows: TokenRows, config: WeightConfig) -> tuple[CompletionIndex, np.ndarray]:
    index = CompletionIndex.from_mask(rows.offsets, rows.completion_mask, rows.shared_boundary)
    if np.any(index.lengths == 0):
        row = int(np.flatnonzero(index.lengths == 0)[0])
        raise ValueError(f"row {row} has an empty completion (validate rows before weighing them)")
    return index, log_ratios(rows, index, config)


def weight_sums(rows: TokenRows, config: WeightConfig) -> WeightSums:
    """First pass of dataset normalization: sum of bounded W per granularity over completion tokens."""
    sums = WeightSums()
    for r0, r1 in row_chunks(rows.offsets):
        index, d = _prepare(_chunk(rows, r0, r1), config)
        sums.count += index.num_tokens
        for g in GRANULARITIES:
            w, _ = bounded_weights(log_weights(d, index, config, g), config, with_bounds=False)
            sums.sums[g] += float(w.sum())
    return sums


def weigh(
    rows: TokenRows,
    config: WeightConfig,
    dataset_means: dict[str, float] | None = None,
    *,
    granularities: tuple[Granularity, ...] = GRANULARITIES,
    observer: WeightObserver | None = None,
) -> RowWeights:
    """PEAR weights (design section 3) for a batch of valid rows (every row T >= 1).

    dataset_means: mean bounded W per granularity over the whole output, needed
    when config.normalize == "dataset" (from a first pass, `weight_sums`).
    observer: called per chunk, in row order, with the completion-space
    internals (diagnostics).

    Chunks run on a thread pool (numpy releases the GIL); each chunk writes a
    disjoint slice of the outputs and the observer sees chunks in order, so
    the result does not depend on the thread count.
    """
    n = len(rows.completion_mask)
    out: dict[str, np.ndarray] = {}
    for g in granularities:
        out[g] = np.zeros(rows.num_rows if g == "sequence" else n, dtype=np.float32)

    def run(bounds: tuple[int, int]):
        r0, r1 = bounds
        index, d = _prepare(_chunk(rows, r0, r1), config)
        a = int(rows.offsets[r0])
        seen, sums = [], {}
        for g in granularities:
            mean = None if dataset_means is None else dataset_means[g]
            w, at_bound, sums[g] = granularity_weights(d, index, config, g, mean, with_bounds=observer is not None)
            if g == "sequence":
                out[g][r0:r1] = w[index.offsets[:-1]]
            else:
                out[g][a + index.positions] = w
            if observer is not None:
                seen.append((g, w, at_bound))
        return index, d, seen, sums

    chunks = row_chunks(rows.offsets)
    results = _pool().map(run, chunks) if len(chunks) > 1 else map(run, chunks)
    total = WeightSums()
    for index, d, seen, sums in results:  # in chunk order: float sums do not depend on the thread count
        total.count += index.num_tokens
        for g, value in sums.items():
            total.sums[g] += value
        if observer is not None:
            for g, w, at_bound in seen:
                observer.observe(g, w, at_bound, index)
            observer.observe_log_ratio(d)
    return RowWeights(token=out.get("token"), block=out.get("block"), sequence=out.get("sequence"), sums=total)


_POOL: ThreadPoolExecutor | None = None


def _pool() -> ThreadPoolExecutor:
    global _POOL
    if _POOL is None:
        _POOL = ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1), thread_name_prefix="pear-weights")
    return _POOL


class WeightObserver:
    """Hook for per-chunk completion-space internals; see pear_data.diagnostics."""

    def observe(self, granularity: Granularity, w: np.ndarray, at_bound: np.ndarray, index: CompletionIndex) -> None:
        ...

    def observe_log_ratio(self, d: np.ndarray) -> None:
        ...
