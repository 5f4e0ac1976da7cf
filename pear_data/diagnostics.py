"""Weight diagnostics of docs/design.md section 3.5, accumulated chunk by chunk.

Everything is a running sum or a fixed histogram, so the accumulator uses
bounded memory on any input size, merges across shards and is deterministic.
Quantiles come from a histogram keyed by the top bits of W's float32
representation (exponent and 10 mantissa bits: log-spaced bins 0.1% wide,
no log() needed); min and max are exact.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from .weights import GRANULARITIES, CompletionIndex, Granularity, WeightObserver

MANTISSA_SHIFT = 13  # keep 23 - 13 = 10 mantissa bits
NUM_BINS = 1 << (31 - MANTISSA_SHIFT)  # every non-negative float32, inf included
POSITION_BINS = 20

# design 3.5: when to warn that the weights degenerate
LOWER_BOUND_SHARE_LIMIT = 0.5
UPPER_BOUND_SHARE_LIMIT = 0.5
ESS_FRACTION_LIMIT = 0.05


@dataclass
class WeightStats:
    """Running statistics of W over completion tokens for one granularity."""

    count: int = 0
    sum_w: float = 0.0
    sum_w2: float = 0.0
    min_w: float = math.inf
    max_w: float = -math.inf
    at_lower: int = 0
    at_upper: int = 0
    bounds_known: bool = True
    histogram: np.ndarray = field(default_factory=lambda: np.zeros(NUM_BINS, dtype=np.int64))
    position_sum: np.ndarray = field(default_factory=lambda: np.zeros(POSITION_BINS, dtype=np.float64))
    position_count: np.ndarray = field(default_factory=lambda: np.zeros(POSITION_BINS, dtype=np.int64))

    def update(self, w: np.ndarray, at_bound: np.ndarray | None, relative_position: np.ndarray | None) -> None:
        if len(w) == 0:
            return
        self.count += len(w)
        self.sum_w += float(w.sum())
        self.sum_w2 += float(np.dot(w, w))
        self.min_w = min(self.min_w, float(w.min()))
        self.max_w = max(self.max_w, float(w.max()))
        if at_bound is None:
            self.bounds_known = False
        else:
            self.at_lower += int(np.count_nonzero(at_bound == 1))
            self.at_upper += int(np.count_nonzero(at_bound == 2))
        self.histogram += np.bincount(histogram_bins(w), minlength=NUM_BINS)
        if relative_position is not None:
            pos_bins = np.minimum((relative_position * POSITION_BINS).astype(np.int64), POSITION_BINS - 1)
            self.position_sum += np.bincount(pos_bins, weights=w, minlength=POSITION_BINS)
            self.position_count += np.bincount(pos_bins, minlength=POSITION_BINS)

    def quantile(self, q: float) -> float:
        if self.count == 0:
            return math.nan
        cumulative = np.cumsum(self.histogram)
        b = int(np.searchsorted(cumulative, q * self.count, side="left"))
        lower, upper = float(bin_edges(b)), float(bin_edges(b + 1))
        # geometric bin center; weights beyond float32's range share the last (infinite) bin
        value = math.sqrt(lower * upper) if math.isfinite(upper) else self.max_w
        return min(max(value, self.min_w), self.max_w)

    def merge(self, other: WeightStats) -> None:
        self.count += other.count
        self.sum_w += other.sum_w
        self.sum_w2 += other.sum_w2
        self.min_w = min(self.min_w, other.min_w)
        self.max_w = max(self.max_w, other.max_w)
        self.at_lower += other.at_lower
        self.at_upper += other.at_upper
        self.bounds_known = self.bounds_known and other.bounds_known
        self.histogram += other.histogram
        self.position_sum += other.position_sum
        self.position_count += other.position_count

    def summary(self) -> dict:
        if self.count == 0:
            return {"tokens": 0}
        ess = self.sum_w**2 / (self.count * self.sum_w2) if self.sum_w2 > 0 else 0.0
        out = {
            "tokens": self.count,
            "mean": self.sum_w / self.count,
            "ess_fraction": ess,
            "min": self.min_w,
            "p01": self.quantile(0.01),
            "p50": self.quantile(0.50),
            "p99": self.quantile(0.99),
            "max": self.max_w,
        }
        if self.bounds_known:
            out["share_at_bound"] = (self.at_lower + self.at_upper) / self.count
            out["share_at_lower_bound"] = self.at_lower / self.count
            out["share_at_upper_bound"] = self.at_upper / self.count
        return {k: _round(v) for k, v in out.items()}


def histogram_bins(w: np.ndarray) -> np.ndarray:
    """Histogram key of each weight (w >= 0): the float32 bit pattern without its low mantissa bits."""
    return np.right_shift(w.astype(np.float32).view(np.int32), MANTISSA_SHIFT)


def bin_edges(keys) -> np.ndarray:
    """Lower edge of histogram bin(s) `keys` (the upper edge of key k is bin_edges(k + 1))."""
    keys = np.asarray(keys, dtype=np.int64)
    inside = np.minimum(keys, NUM_BINS - 1)
    edges = np.left_shift(inside, MANTISSA_SHIFT).astype(np.int32).view(np.float32).astype(np.float64)
    return np.where(keys >= NUM_BINS, np.inf, edges)


def _round(value):
    # 12 significant digits: stable JSON across platforms' last-bit summation differences
    return float(f"{value:.12g}") if isinstance(value, float) else value


class Diagnostics(WeightObserver):
    """Accumulates design 3.5 diagnostics; pass it as `observer=` to `weights.weigh`."""

    def __init__(self, *, positions: bool = False) -> None:
        self.stats: dict[str, WeightStats] = {g: WeightStats() for g in GRANULARITIES}
        self.sum_log_ratio = 0.0
        self.log_ratio_count = 0
        self.positions = positions

    def observe(self, granularity: Granularity, w: np.ndarray, at_bound: np.ndarray | None,
                index: CompletionIndex) -> None:
        relative = relative_positions(index) if self.positions else None
        self.stats[granularity].update(w, at_bound, relative)

    def observe_log_ratio(self, d: np.ndarray) -> None:
        self.sum_log_ratio += float(d.sum())
        self.log_ratio_count += len(d)

    def merge(self, other: Diagnostics) -> None:
        """Add another accumulator's data (e.g. another shard's)."""
        for g in GRANULARITIES:
            self.stats[g].merge(other.stats[g])
        self.sum_log_ratio += other.sum_log_ratio
        self.log_ratio_count += other.log_ratio_count

    def summary(self) -> dict:
        out: dict = {g: self.stats[g].summary() for g in GRANULARITIES if self.stats[g].count}
        if self.log_ratio_count:
            out["mean_log_ratio"] = _round(self.sum_log_ratio / self.log_ratio_count)
            out["completion_tokens"] = self.log_ratio_count
        return out


def relative_positions(index: CompletionIndex) -> np.ndarray:
    """(k - 1) / T for every completion token, float64 [Nc], in [0, 1)."""
    row_start = np.repeat(index.offsets[:-1], index.lengths)
    return (np.arange(index.num_tokens) - row_start) / np.repeat(index.lengths, index.lengths)


# What to try when a granularity's weights degenerate: never the granularity itself.
REMEDIES = {
    "token": "try --center, a shorter --horizon, or --granularity block or sequence",
    "block": "try --center, a larger --block-size, or --granularity token (with a short --horizon) or sequence",
    "sequence": "try --center, --length-normalize, or --granularity token (with a short --horizon) or block",
}


def degenerate_granularities(summary: dict) -> list[tuple[str, dict[str, float]]]:
    """design 3.5: the granularities whose weights collapse, each with the limits its diagnostics pass: "lower"
    (most tokens at the lower bound: SFT trains only the ends of the traces), "upper" (most at the upper bound:
    rows are no longer told apart), "ess" (an ESS fraction under ESS_FRACTION_LIMIT), with the measured value."""
    found = []
    for g in GRANULARITIES:
        s = summary.get(g)
        if not s or not s.get("tokens"):
            continue
        lower, upper, ess = s.get("share_at_lower_bound"), s.get("share_at_upper_bound"), s.get("ess_fraction")
        limits = {"lower": lower if lower is not None and lower > LOWER_BOUND_SHARE_LIMIT else None,
                  "upper": upper if upper is not None and upper > UPPER_BOUND_SHARE_LIMIT else None,
                  "ess": ess if ess is not None and ess < ESS_FRACTION_LIMIT else None}
        limits = {name: value for name, value in limits.items() if value is not None}
        if limits:
            found.append((g, limits))
    return found


def degeneracy_warnings(summary: dict) -> list[str]:
    """The terminal's warnings for `degenerate_granularities`, each naming its remedy (the flags to try)."""
    warnings = []
    for g, limits in degenerate_granularities(summary):
        remedy = REMEDIES[g]
        if "lower" in limits:
            warnings.append(
                f"{g} weights: {limits['lower']:.0%} of completion tokens sit at the lower weight bound; {remedy}"
            )
        if "upper" in limits:
            warnings.append(
                f"{g} weights: {limits['upper']:.0%} of completion tokens sit at the upper weight bound (or the cap), "
                "so the weights no longer tell them apart (the target finds this data much likelier than the "
                f"behavior); {remedy}, or a narrower --log-ratio-clip"
            )
        if "ess" in limits:
            warnings.append(f"{g} weights: ESS fraction {limits['ess']:.3f} < {ESS_FRACTION_LIMIT}; {remedy}")
    return warnings


def degeneracy_notes(summary: dict) -> list[str]:
    """The dataset card's warnings: one short line per degenerate granularity, for a reader of the data (who
    cannot act on the flags): "token weights: 55% at the upper bound"."""
    notes = []
    for g, limits in degenerate_granularities(summary):
        facts = [f"{limits[side]:.0%} at the {side} bound" for side in ("lower", "upper") if side in limits]
        if "ess" in limits:
            facts.append(f"ESS fraction {limits['ess']:.3f}")
        notes.append(f"{g} weights: {', '.join(facts)}")
    return notes
