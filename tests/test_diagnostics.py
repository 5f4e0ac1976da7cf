"""Tests for the weight diagnostics accumulator (pear_data/diagnostics.py), docs/design.md section 3.5.

Figures are checked against the plain-loop reference of design section 3 in
test_weights.py (final W, clipped log-weights, d_k), not against the engine's
own internals: ESS fraction, mean, min and max to float64 rounding; p01/p50/p99
(from a log-spaced histogram with ~0.1%-wide bins) within 0.2% of numpy's
'inverted_cdf' quantile; shares at the weight bounds against a direct count.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from pear_data.diagnostics import (
    ESS_FRACTION_LIMIT,
    LOWER_BOUND_SHARE_LIMIT,
    Diagnostics,
    degeneracy_warnings,
    relative_positions,
)
from pear_data.weights import GRANULARITIES, CompletionIndex, TokenRows, WeightConfig, weigh, weight_sums

from .test_weights import (  # the plain-loop reference lives next to the engine's property tests
    engine_columns,
    make_rows,
    reference_log_bounds,
    reference_weights,
    scored_rows,
    weight_configs,
)

# Finite weight bounds keep every W in (0, inf) and ln W inside the histogram range [-40, 40].
FINITE_WEIGHT_CLIPS = [(math.exp(-10.0), math.exp(5.0)), (0.5, 2.0), (math.exp(-3.0), 1.0)]
DIAG = settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much]
)
QUANTILE_REL = 2e-3  # within 0.2%: a bin center is at most half a ~0.1%-wide bin away


def diagnose(rows: TokenRows, config: WeightConfig, observer: Diagnostics | None = None) -> dict:
    observer = observer if observer is not None else Diagnostics()
    engine_columns(rows, config, observer)
    return observer.summary()


def split_rows(rows: TokenRows, h: int) -> tuple[TokenRows, TokenRows]:
    """Rows [0, h) and [h, R) as two batches (two shards)."""
    cut = int(rows.offsets[h])

    def part(offsets: np.ndarray, a: int, b: int) -> TokenRows:
        return TokenRows(offsets - a, rows.completion_mask[a:b], rows.target_logprobs[a:b], rows.behavior_logprobs[a:b])

    return part(rows.offsets[: h + 1], 0, cut), part(rows.offsets[h:], cut, int(rows.offsets[-1]))


class ReferenceDiagnostics:
    """design 3.5 from the reference's final W and clipped log-weights, per granularity, over completion tokens."""

    def __init__(self, rows: TokenRows, config: WeightConfig) -> None:
        ref = reference_weights(rows, config)
        log_lo, log_hi = reference_log_bounds(config)
        cap = config.max_weight
        self.values = {g: [w for row in ref for w in row.w[g]] for g in GRANULARITIES}
        self.d = [d for row in ref for d in row.d]
        # Bound category per token as the engine defines it: 1 = logW at/below log(wmin), 2 = at/above
        # log(wmax) or capped (the cap counts as the upper bound; upper wins). Tokens whose category
        # changes under a 1e-9 perturbation of logW are ties with the engine's own rounding: ambiguous.
        self.categories: dict[str, list[int | None]] = {}
        for g in GRANULARITIES:
            cats: list[int | None] = []
            for row in ref:
                for log_w, w in zip(row.log_w[g], row.w[g]):
                    variants = {
                        self._category(log_w + s * 1e-9 * (1 + abs(log_w)), w * (1 + s * 1e-9), log_lo, log_hi, cap)
                        for s in (-1, 0, 1)
                    }
                    cats.append(variants.pop() if len(variants) == 1 else None)
            self.categories[g] = cats

    @staticmethod
    def _category(log_w: float, w: float, log_lo: float, log_hi: float, cap: float | None) -> int:
        category = 0
        if log_w <= log_lo:
            category = 1
        if log_w >= log_hi:
            category = 2
        if cap is not None and w >= cap:
            category = 2
        return category

    def ess_fraction(self, g: str) -> float:
        total, squares = 0.0, 0.0
        for w in self.values[g]:
            total += w
            squares += w * w
        return total * total / (len(self.values[g]) * squares)

    def mean(self, g: str) -> float:
        return math.fsum(self.values[g]) / len(self.values[g])

    def count_range(self, g: str, wanted: set[int]) -> tuple[int, int]:
        """Smallest and largest count of tokens in the wanted categories, ambiguous tokens going either way."""
        sure = sum(1 for c in self.categories[g] if c is not None and c in wanted)
        ambiguous = sum(1 for c in self.categories[g] if c is None)
        return sure, sure + ambiguous


def quantiles_are_well_posed(n: int) -> bool:
    """q * n is at least 0.01 away from an integer for q in (0.01, 0.5, 0.99): no rank ambiguity."""
    return n % 2 == 1 and n % 100 != 0


# --------------------------------------------------------------------------
# Summary figures against the reference
# --------------------------------------------------------------------------


@DIAG
@given(rows=scored_rows(), config=weight_configs(weight_clip=st.sampled_from(FINITE_WEIGHT_CLIPS)))
def test_summary_matches_reference(rows: TokenRows, config: WeightConfig) -> None:
    summary = diagnose(rows, config)
    ref = ReferenceDiagnostics(rows, config)
    n = int(rows.completion_mask.sum())
    assert summary["completion_tokens"] == n
    abs_d = max(1.0, max(abs(x) for x in ref.d))
    assert summary["mean_log_ratio"] == pytest.approx(math.fsum(ref.d) / n, rel=1e-9, abs=1e-12 * abs_d)
    for g in GRANULARITIES:
        s = summary[g]
        assert s["tokens"] == n
        assert s["mean"] == pytest.approx(ref.mean(g), rel=1e-9)
        assert s["ess_fraction"] == pytest.approx(ref.ess_fraction(g), rel=1e-9)
        # min and max are exact (not from the histogram): equal to the reference up to float64 rounding, which
        # reaches ~1e-11 relative with 1e4-sized log-ratios (centering cancels large values)
        assert s["min"] == pytest.approx(min(ref.values[g]), rel=1e-9)
        assert s["max"] == pytest.approx(max(ref.values[g]), rel=1e-9)
        assert s["min"] <= s["p01"] <= s["p50"] <= s["p99"] <= s["max"]
        if quantiles_are_well_posed(n):
            for key, q in (("p01", 0.01), ("p50", 0.5), ("p99", 0.99)):
                expected = float(np.quantile(np.array(ref.values[g]), q, method="inverted_cdf"))
                assert s[key] == pytest.approx(expected, rel=QUANTILE_REL), (g, key)
        lower_lo, lower_hi = ref.count_range(g, {1})
        bound_lo, bound_hi = ref.count_range(g, {1, 2})
        assert lower_lo <= round(s["share_at_lower_bound"] * n) <= lower_hi, g
        assert bound_lo <= round(s["share_at_bound"] * n) <= bound_hi, g


@DIAG
@given(
    rows=scored_rows(),
    config=weight_configs(
        weight_clip=(math.exp(-10.0), math.exp(5.0)),
        log_ratio_clip=st.sampled_from([(-1.0, 1.0), (-3.0, 3.0)]),
        horizon=st.sampled_from([1, 2, 3]),
        gamma=1.0,
        max_weight=None,
    ),
)
def test_quantiles_match_numpy_inverted_cdf(rows: TokenRows, config: WeightConfig) -> None:
    """p01/p50/p99 within 0.2% of np.quantile(method='inverted_cdf') on spread-out weights (short horizon,
    wide log-ratio clip: logW is a sum of 1-3 continuous d's, few ties)."""
    n = int(rows.completion_mask.sum())
    assume(quantiles_are_well_posed(n))
    summary = diagnose(rows, config)
    ref = ReferenceDiagnostics(rows, config)
    for g in GRANULARITIES:
        for key, q in (("p01", 0.01), ("p50", 0.5), ("p99", 0.99)):
            expected = float(np.quantile(np.array(ref.values[g]), q, method="inverted_cdf"))
            assert summary[g][key] == pytest.approx(expected, rel=QUANTILE_REL), (g, key)


@pytest.mark.parametrize("gap", [50.0, 100.0])
def test_quantiles_of_extreme_weights(gap: float) -> None:
    """design 3.5 asks for p01/p99 of W, and the manifest must stay strict JSON. With --weight-clip 0,inf a
    sequence weight leaves any fixed range quickly (logW = sum of d over the trace): e^100 is finite in
    float64 (where W is computed, and min/max are reported) but beyond float32's range."""
    # 101 one-token rows: 50 with d = -gap, 50 with d = +gap, one with d = 0 -> sequence W = e^-gap, e^gap, 1
    offsets = np.arange(0, 2 * 101 + 1, 2, dtype=np.int64)
    mask = np.tile(np.array([0, 1], dtype=np.int8), 101)
    gaps = np.array([-gap] * 50 + [gap] * 50 + [0.0])
    lt = np.zeros(202, dtype=np.float32)
    lb = np.zeros(202, dtype=np.float32)
    lt[1::2] = np.where(gaps < 0, gaps, 0.0)  # log-probs stay <= 0: lt - lb = gap
    lb[1::2] = np.where(gaps > 0, -gaps, 0.0)
    rows = TokenRows(offsets, mask, lt, lb)
    config = WeightConfig(log_ratio_clip=(-math.inf, math.inf), weight_clip=(0.0, math.inf))
    summary = diagnose(rows, config)
    json.dumps(summary, allow_nan=False)  # manifest.json is strict JSON
    sequence = summary["sequence"]
    assert sequence["min"] == pytest.approx(math.exp(-gap), rel=1e-9)
    assert sequence["max"] == pytest.approx(math.exp(gap), rel=1e-9)
    # inverted CDF on 101 values: p01 is the 2nd smallest (e^-gap), p99 the 100th (e^gap)
    assert sequence["p01"] == pytest.approx(math.exp(-gap), rel=QUANTILE_REL)
    assert sequence["p50"] == pytest.approx(1.0, rel=QUANTILE_REL)
    assert sequence["p99"] == pytest.approx(math.exp(gap), rel=QUANTILE_REL)


def test_uniform_weights() -> None:
    """H = 0 and no bound hit: every token weight is exactly 1, ESS fraction 1, every quantile 1."""
    rows = make_rows([5, 40, 9], seed=2)
    summary = diagnose(rows, WeightConfig(horizon=0, granularity="token"))["token"]
    assert summary["ess_fraction"] == 1.0
    assert summary["min"] == summary["p01"] == summary["p50"] == summary["p99"] == summary["max"] == 1.0
    assert summary["share_at_bound"] == 0.0


def test_share_at_bound_counts_cap_as_upper() -> None:
    """One row, d = -1 clipped to lo = -0.07 on every token, gamma 1: token logW_k = -0.07 m with m = T - k.
    T = 200, wmin = e^-10: m >= 143 (k <= 57) sit at the lower bound; with --max-weight 0.5 the tokens with
    W >= 0.5 (m <= 9, 10 tokens: e^-0.63 = 0.53, e^-0.70 = 0.497) count as at the (upper) bound.
    No logW lies within 0.01 of a bound, so float rounding cannot move a token across one."""
    T = 200
    mask = np.array([0] + [1] * T, dtype=np.int8)
    lt = np.array([0.0] + [-1.0] * T, dtype=np.float32)
    lb = np.zeros(T + 1, dtype=np.float32)
    rows = TokenRows(np.array([0, T + 1]), mask, lt, lb)
    config = WeightConfig(gamma=1.0, log_ratio_clip=(-0.07, 0.3), max_weight=0.5)
    token = diagnose(rows, config)["token"]
    assert token["share_at_lower_bound"] == pytest.approx(57 / T)
    assert token["share_at_bound"] == pytest.approx((57 + 10) / T)
    uncapped = diagnose(rows, WeightConfig(gamma=1.0, log_ratio_clip=(-0.07, 0.3)))["token"]
    assert uncapped["share_at_bound"] == pytest.approx(57 / T)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rows=scored_rows(), config=weight_configs(weight_clip=st.sampled_from(FINITE_WEIGHT_CLIPS)))
def test_summary_is_json_and_deterministic(rows: TokenRows, config: WeightConfig) -> None:
    first, second = diagnose(rows, config), diagnose(rows, config)
    assert json.dumps(first, allow_nan=False, sort_keys=True) == json.dumps(second, allow_nan=False, sort_keys=True)


def test_nothing_observed() -> None:
    assert Diagnostics().summary() == {}
    assert degeneracy_warnings({}) == []


# --------------------------------------------------------------------------
# Accumulation across shards
# --------------------------------------------------------------------------


def assert_summaries_close(got: dict, expected: dict) -> None:
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        if isinstance(value, dict):
            assert_summaries_close(got[key], value)
        elif isinstance(value, float):
            assert got[key] == pytest.approx(value, rel=1e-9, abs=1e-12), key
        else:
            assert got[key] == value, key


@DIAG
@given(
    rows=scored_rows(max_rows=8),
    config=weight_configs(weight_clip=st.sampled_from(FINITE_WEIGHT_CLIPS)),
    data=st.data(),
)
def test_one_observer_over_two_shards_equals_one_pass(rows: TokenRows, config: WeightConfig, data) -> None:
    """A Diagnostics passed to weigh() shard after shard accumulates the same figures as one pass over all rows
    (dataset normalization: the means come from the whole input, as a pipeline's first pass gives them)."""
    assume(rows.num_rows >= 2)
    h = data.draw(st.integers(1, rows.num_rows - 1))
    first, second = split_rows(rows, h)
    whole = Diagnostics()
    means = None
    if config.normalize == "dataset":
        sums = weight_sums(first, config)
        sums.add(weight_sums(second, config))
        means = sums.means()
        for g, mean in weight_sums(rows, config).means().items():
            assert means[g] == pytest.approx(mean, rel=1e-12)
    weigh(rows, config, means, observer=whole)
    shards = Diagnostics()
    weigh(first, config, means, observer=shards)
    weigh(second, config, means, observer=shards)
    got, expected = shards.summary(), whole.summary()
    # A logW that ties a bound exactly (e.g. logW = log(gamma) = log(wmin)) can land on either side of it
    # depending on the rows that share its chunk's prefix sum (last-ulp rounding): such tokens may move
    # between "inside" and "at bound"; everything else must agree.
    ref = ReferenceDiagnostics(rows, config)
    n = int(rows.completion_mask.sum())
    for g in GRANULARITIES:
        ties = sum(1 for c in ref.categories[g] if c is None)
        for key in ("share_at_bound", "share_at_lower_bound", "share_at_upper_bound"):
            assert abs(round(got[g].pop(key) * n) - round(expected[g].pop(key) * n)) <= ties, (g, key)
    assert_summaries_close(got, expected)


def test_two_observers_merge_equals_one() -> None:
    """The module promises accumulators that merge across shards (e.g. a resumed run: the committed shards'
    diagnostics plus the new ones): Diagnostics over two halves, merged, equals one over everything."""
    rows = make_rows([30, 12, 80, 45, 7], seed=5)
    config = WeightConfig()
    first, second = split_rows(rows, 2)
    left, right, whole = Diagnostics(), Diagnostics(), Diagnostics()
    engine_columns(first, config, left)
    engine_columns(second, config, right)
    engine_columns(rows, config, whole)
    left.merge(right)
    assert_summaries_close(left.summary(), whole.summary())


# --------------------------------------------------------------------------
# Positions profile
# --------------------------------------------------------------------------


def test_relative_positions_are_k_minus_one_over_T() -> None:
    mask = np.array([0, 1, 1, 0, 1, 0, 0, 1, 1, 1, 1], dtype=np.int8)
    index = CompletionIndex.from_mask(np.array([0, 5, 11]), mask)
    expected = [0 / 3, 1 / 3, 2 / 3, 0 / 4, 1 / 4, 2 / 4, 3 / 4]
    np.testing.assert_array_equal(relative_positions(index), expected)


def test_position_profile_counts_every_token() -> None:
    rows = make_rows([50, 120, 33], seed=9)
    observer = Diagnostics(positions=True)
    diagnose(rows, WeightConfig(), observer)
    stats = observer.stats["token"]
    assert int(stats.position_count.sum()) == int(rows.completion_mask.sum())
    assert float(stats.position_sum.sum()) == pytest.approx(stats.sum_w, rel=1e-12)


# --------------------------------------------------------------------------
# Degeneracy warnings (design 3.5)
# --------------------------------------------------------------------------


def test_warns_when_most_tokens_sit_at_the_lower_bound() -> None:
    """One row, d = -1 clipped to -0.07 on all 400 tokens (behavior much stronger), gamma 1:
    logW_k = -0.07 (400 - k) <= -10 for k <= 257 (64% of the tokens, no tie: -0.07 * 143 = -10.01);
    the sequence weight e^-28 is at the bound for every token."""
    T = 400
    rows = TokenRows(
        np.array([0, T + 1]),
        np.array([0] + [1] * T, np.int8),
        np.array([0.0] + [-1.0] * T, np.float32),
        np.zeros(T + 1, np.float32),
    )
    summary = diagnose(rows, WeightConfig(gamma=1.0, log_ratio_clip=(-0.07, 0.3)))
    assert summary["token"]["share_at_lower_bound"] == pytest.approx(257 / 400)
    assert summary["sequence"]["share_at_lower_bound"] == 1.0
    warnings = degeneracy_warnings(summary)
    lower = [w for w in warnings if "lower weight bound" in w]
    assert {w.split()[0] for w in lower} == {"token", "block", "sequence"}
    assert all("--center" in w and "--horizon" in w for w in warnings)


def test_warns_when_ess_fraction_is_low() -> None:
    """100 rows of 20 tokens; one row has d = 0.3 everywhere (sequence logW = 6, clipped to 5), the others d = 0:
    sequence ESS = (20 e^5 + 1980)^2 / (2000 (20 e^10 + 1980)) = 0.028 < 0.05, and no token at the lower bound.
    Horizon 1 and one block per row keep the token and block levels healthy, so only the sequence level warns."""
    rows_count, T = 100, 20
    offsets = np.arange(0, rows_count * (T + 1) + 1, T + 1, dtype=np.int64)
    mask = np.tile(np.array([0] + [1] * T, dtype=np.int8), rows_count)
    lt = np.zeros(len(mask), dtype=np.float32)
    lb = np.zeros(len(mask), dtype=np.float32)
    lb[1 : T + 1] = -0.5  # row 0: lt - lb = 0.5, clipped to hi = 0.3
    config = WeightConfig(gamma=1.0, horizon=1, block_size=1000)
    summary = diagnose(TokenRows(offsets, mask, lt, lb), config)
    expected = (20 * math.exp(5) + 1980) ** 2 / (2000 * (20 * math.exp(10) + 1980))
    assert summary["sequence"]["ess_fraction"] == pytest.approx(expected, rel=1e-9)
    assert summary["sequence"]["share_at_lower_bound"] == 0.0
    warnings = degeneracy_warnings(summary)
    assert len(warnings) == 1
    assert warnings[0].startswith("sequence weights: ESS fraction 0.028")
    assert "--center" in warnings[0]


def test_silent_on_healthy_weights() -> None:
    rows = make_rows([60, 140, 35, 200], seed=4, extreme=False)
    same = TokenRows(rows.offsets, rows.completion_mask, rows.target_logprobs, rows.target_logprobs)
    assert degeneracy_warnings(diagnose(same, WeightConfig())) == []
    assert degeneracy_warnings(diagnose(rows, WeightConfig(center=True, horizon=16))) == []


@pytest.mark.parametrize(
    ("ess", "lower", "fires"),
    [
        (ESS_FRACTION_LIMIT, LOWER_BOUND_SHARE_LIMIT, []),  # at the limits: silent ("more than", "under")
        (ESS_FRACTION_LIMIT - 1e-4, 0.0, ["ESS"]),
        (0.9, LOWER_BOUND_SHARE_LIMIT + 1e-4, ["lower weight bound"]),
        (0.01, 0.9, ["lower weight bound", "ESS"]),
        (0.9, None, []),  # bounds unknown: only the ESS rule applies
    ],
)
def test_warning_thresholds(ess: float, lower: float | None, fires: list[str]) -> None:
    assert (ESS_FRACTION_LIMIT, LOWER_BOUND_SHARE_LIMIT) == (0.05, 0.5)  # design 3.5
    stats = {"tokens": 100, "ess_fraction": ess}
    if lower is not None:
        stats["share_at_lower_bound"] = lower
    warnings = degeneracy_warnings({"block": stats})
    assert len(warnings) == len(fires)
    for warning, needle in zip(warnings, fires):
        assert warning.startswith("block weights:") and needle in warning and "--center" in warning


def test_warns_when_most_tokens_sit_at_the_upper_bound() -> None:
    """One row, d = +1 clipped to 0.3 on all 400 tokens (the target finds the data much likelier), gamma 1:
    logW_k = 0.3 (400 - k) >= 5 for k <= 383 (95.75% of the tokens); the sequence weight e^120 is at the upper
    bound for every token. Each warning names remedies other than its own granularity."""
    T = 400
    rows = TokenRows(
        np.array([0, T + 1]),
        np.array([0] + [1] * T, np.int8),
        np.array([0.0] + [-0.1] * T, np.float32),
        np.array([0.0] + [-1.1] * T, np.float32),
    )
    summary = diagnose(rows, WeightConfig(gamma=1.0))
    assert summary["token"]["share_at_upper_bound"] == pytest.approx(383 / 400)
    assert summary["sequence"]["share_at_upper_bound"] == 1.0
    assert summary["sequence"]["share_at_lower_bound"] == 0.0
    upper = [w for w in degeneracy_warnings(summary) if "upper weight bound" in w]
    assert {w.split()[0] for w in upper} == {"token", "block", "sequence"}
    for warning in upper:
        granularity = warning.split()[0]
        assert "--center" in warning and "--log-ratio-clip" in warning
        assert f"--granularity {granularity}" not in warning and f"or {granularity}" not in warning
