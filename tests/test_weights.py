"""Property tests for the PEAR weight engine (pear_data/weights.py) against docs/design.md section 3.

The engine is vectorized (one cumulative sum per chunk of rows). The reference
below is the other way round on purpose: plain Python loops over rows and
tokens with `math` floats, written straight from the formulas of docs/design.md
3.1-3.3, so that the two share no code and no trick (no cumulative sums, no
discount folded into the sums, no repeat/reduceat).

Tolerance: the engine sums in float64 through a prefix sum over a whole chunk
(so a suffix sum is a difference of two large prefix values) and stores
float32; the reference sums each suffix directly in float64. Their float64
log-weights differ by a few ulps of the chunk's prefix-sum magnitude (at most
~1e-8 absolute even with 1e4-sized log-ratios), i.e. a relative difference of
W far below float32's resolution (6e-8). Comparing the stored float32 values
with rtol=1e-5 therefore only fails on a real formula difference, and atol is
the smallest normal float32 so that values that underflow (W ~ 1e-40) compare
as zero.

Hypothesis draws the structure (row lengths, flags) and a seed; the per-token
log-probs come from a seeded numpy generator (long lists of floats drawn by
Hypothesis itself would overrun its buffer), so a failure prints lengths and
seed, which reproduce it.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass

import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, assume, given, settings
from hypothesis import strategies as st

from pear_data import weights
from pear_data.weights import (
    GRANULARITIES,
    RowWeights,
    TokenRows,
    WeightConfig,
    WeightObserver,
    WeightSums,
    row_chunks,
    weigh,
    weight_sums,
)

RTOL = 1e-5
ATOL = float(np.finfo(np.float32).tiny)

PROPERTY = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FEW = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# --------------------------------------------------------------------------
# Reference: docs/design.md section 3, literally, with plain loops and math floats
# --------------------------------------------------------------------------


def ieee_exp(x: float) -> float:
    """exp with IEEE overflow to +inf (math.exp raises instead), as numpy does."""
    return math.inf if x > 709.782712893384 else math.exp(x)


def ieee_div(a: float, b: float) -> float:
    """a / b with IEEE semantics for b == 0 (Python raises ZeroDivisionError), as numpy does."""
    if b == 0.0:
        return math.nan if (a == 0.0 or math.isnan(a)) else math.copysign(math.inf, a)
    return a / b


def clip(x: float, lo: float, hi: float) -> float:
    return min(max(x, lo), hi)


def reference_log_ratios(
    lt: list[float], lb: list[float], mask: list[int], config: WeightConfig, span_ends: list[int] | None = None
) -> list[float]:
    """design 3.1: d_k for k = 1..T (list index k - 1).

    span_ends (cross-tokenizer rows, design 3.7): the k (1-based) that end a
    span; a span's d is the clipped sum of its tokens' log-ratios, on its last
    token, and 0 on its other tokens.
    """
    C = [i for i, m in enumerate(mask) if m == 1]
    if not C:
        raise ValueError("empty completion (T = 0): design 3.3 says the row is a reject")
    r = [lt[c] - lb[c] for c in C]
    if config.center:
        mean_r = 0.0
        for r_k in r:
            mean_r += r_k
        mean_r /= len(r)
        r = [r_k - mean_r for r_k in r]
    lo, hi = config.log_ratio_clip
    if span_ends is None:
        return [clip(r_k, lo, hi) for r_k in r]
    d = [0.0] * len(r)
    start = 1
    for end in span_ends:
        span_sum = 0.0
        for k in range(start, end + 1):
            span_sum += r[k - 1]
        d[end - 1] = clip(span_sum, lo, hi)
        start = end + 1
    return d


def reference_block_lasts(T: int, B: int, span_ends: list[int] | None) -> list[int]:
    """The last k of every block: every B tokens, each snapped to the nearest span end (ties: the later one)."""
    nominal = [min(T, m * B) for m in range(1, -(-T // B) + 1)]
    if span_ends is None:
        return nominal
    lasts = []
    for x in nominal:
        best = None
        for e in span_ends:
            if best is None or abs(e - x) < abs(best - x) or (abs(e - x) == abs(best - x) and e > best):
                best = e
        if best not in lasts:
            lasts.append(best)
    return lasts


def reference_log_weights(
    d: list[float], config: WeightConfig, span_ends: list[int] | None = None
) -> dict[str, list[float]]:
    """design 3.2: logW_k per granularity, before bounds (list index k - 1)."""
    T = len(d)
    log_gamma = math.log(config.gamma)
    H = config.horizon

    token = []
    for k in range(1, T + 1):
        e_k = T if H is None else min(T, k + H)
        S_k = 0.0
        for j in range(k + 1, e_k + 1):
            S_k += d[j - 1]
        token.append(S_k + (e_k - k) * log_gamma)

    lasts = reference_block_lasts(T, config.block_size, span_ends)
    block = []
    for k in range(1, T + 1):
        last = min(e for e in lasts if e >= k)  # last k in k's block (the last block of a row may be short)
        S_k = 0.0
        for j in range(last + 1, T + 1):  # every j in the blocks after b
            S_k += d[j - 1]
        block.append(S_k + (T - last) * log_gamma)

    total = 0.0
    for d_j in d:
        total += d_j
    if config.length_normalize:
        total /= T
    sequence = [total] * T
    return {"token": token, "block": block, "sequence": sequence}


def reference_token_recursion(d: list[float], gamma: float) -> list[float]:
    """design 3.2, second form (H unbounded): G_T = 1, G_k = gamma * exp(d_{k+1}) * G_{k+1}; W before bounds."""
    T = len(d)
    G = [0.0] * T
    G[T - 1] = 1.0
    for k in range(T - 1, 0, -1):
        G[k - 1] = gamma * ieee_exp(d[k]) * G[k]  # d[k] is d_{k+1}
    return G


def reference_log_bounds(config: WeightConfig) -> tuple[float, float]:
    """log(wmin), log(wmax), with log(0) = -inf."""
    return tuple(math.log(w) if w > 0 else -math.inf for w in config.weight_clip)


@dataclass
class ReferenceRow:
    positions: list[int]  # C, flat positions within the row
    d: list[float]
    log_w: dict[str, list[float]]  # before bounds
    w: dict[str, list[float]]  # final (after bounds, normalization, cap), float64


def reference_weights(rows: TokenRows, config: WeightConfig) -> list[ReferenceRow]:
    """design 3.1-3.3 for every row, with dataset normalization over the whole input."""
    offsets = [int(o) for o in rows.offsets]
    mask = rows.completion_mask.tolist()
    lt = [float(x) for x in rows.target_logprobs.tolist()]
    lb = [float(x) for x in rows.behavior_logprobs.tolist()]
    shared = None if rows.shared_boundary is None else rows.shared_boundary.tolist()
    log_lo, log_hi = reference_log_bounds(config)

    out = []
    for r in range(len(offsets) - 1):
        a, b = offsets[r], offsets[r + 1]
        row_mask = mask[a:b]
        span_ends = None
        if shared is not None:
            completion = [i for i in range(a, b) if mask[i] == 1]
            span_ends = [k for k, i in enumerate(completion, start=1) if shared[i] == 1 or k == len(completion)]
        d = reference_log_ratios(lt[a:b], lb[a:b], row_mask, config, span_ends)
        log_w = reference_log_weights(d, config, span_ends)
        # 3.3 steps 1-2: bounds, exp
        w = {g: [ieee_exp(clip(x, log_lo, log_hi)) for x in log_w[g]] for g in GRANULARITIES}
        out.append(ReferenceRow([i for i, m in enumerate(row_mask) if m == 1], d, log_w, w))

    # 3.3 step 3: normalize
    if config.normalize == "dataset":
        for g in GRANULARITIES:
            total, n = 0.0, 0
            for row in out:
                for w_k in row.w[g]:
                    total += w_k
                    n += 1
            mean = total / n
            for row in out:
                row.w[g] = [ieee_div(w_k, mean) for w_k in row.w[g]]
    elif config.normalize == "sequence":
        for row in out:
            for g in GRANULARITIES:
                total = 0.0
                for w_k in row.w[g]:
                    total += w_k
                row_mean = total / len(row.w[g])
                row.w[g] = [ieee_div(w_k, row_mean) for w_k in row.w[g]]

    # 3.3 step 4: cap
    if config.max_weight is not None:
        cap = config.max_weight
        for row in out:
            for g in GRANULARITIES:
                row.w[g] = [cap if w_k > cap else w_k for w_k in row.w[g]]
    return out


def reference_columns(rows: TokenRows, config: WeightConfig) -> dict[str, np.ndarray]:
    """The reference in the engine's output layout: token/block float32 [N] (0 off-mask), sequence float32 [R]."""
    ref = reference_weights(rows, config)
    n = len(rows.completion_mask)
    token = [0.0] * n
    block = [0.0] * n
    sequence = []
    for r, row in enumerate(ref):
        start = int(rows.offsets[r])
        for k, c in enumerate(row.positions):
            token[start + c] = row.w["token"][k]
            block[start + c] = row.w["block"][k]
        sequence.append(row.w["sequence"][0])
    with np.errstate(over="ignore"):  # float64 W beyond float32's range is stored as inf, as the engine does
        return {
            "token": np.array(token, dtype=np.float64).astype(np.float32),
            "block": np.array(block, dtype=np.float64).astype(np.float32),
            "sequence": np.array(sequence, dtype=np.float64).astype(np.float32),
        }


# --------------------------------------------------------------------------
# Engine entry point as a pipeline uses it (two passes for dataset normalization)
# --------------------------------------------------------------------------


def engine_columns(rows: TokenRows, config: WeightConfig, observer: WeightObserver | None = None) -> RowWeights:
    # Overflow/0-division warnings are expected with unbounded flags (W = inf, 0/0);
    # the values themselves are compared against the reference.
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        means = weight_sums(rows, config).means() if config.normalize == "dataset" else None
        return weigh(rows, config, means, observer=observer)


def assert_matches_reference(result: RowWeights, expected: dict[str, np.ndarray]) -> None:
    for g in GRANULARITIES:
        got = result.column(g)
        assert got.dtype == np.float32, g
        assert got.shape == expected[g].shape, g
        np.testing.assert_allclose(got, expected[g], rtol=RTOL, atol=ATOL, equal_nan=True, err_msg=f"{g} weights")


# --------------------------------------------------------------------------
# Strategies
# --------------------------------------------------------------------------


def logprob_values(rng: np.random.Generator, n: int, *, extreme: bool) -> np.ndarray:
    """Mixture of realistic and corner-case log-probs in [-1e4, 0]."""
    kinds = rng.choice(5, size=n, p=[0.35, 0.3, 0.15, 0.1, 0.1])
    values = np.where(kinds == 0, rng.uniform(-50.0, 0.0, n), 0.0)
    values = np.where(kinds == 1, rng.uniform(-3.0, 0.0, n), values)
    # kinds == 2: exact 0.0 (probability one)
    values = np.where(kinds == 3, rng.uniform(-1e-6, 0.0, n), values)
    values = np.where(kinds == 4, -1e4 if extreme else -50.0, values)
    return values


def make_rows(lengths: list[int], seed: int, *, extreme: bool = True, garbage_outside: bool = False,
              spans: bool = False) -> TokenRows:
    """Rows with several completion segments each (multi-turn), position 0 always prompt, T >= 1.

    Off-mask log-probs are 0.0 (the data contract), or garbage (NaN, +inf, 7.0)
    with garbage_outside: the engine must never read them. spans: add a
    cross-tokenizer `shared_boundary` column (each completion token ends a
    span with probability 0.1-0.9, the row's last one always).
    """
    rng = np.random.default_rng(seed)
    masks, targets, behaviors = [], [], []
    for L in lengths:
        mask = np.zeros(L, dtype=np.int8)
        if rng.random() < 0.15:
            mask[1:] = 1  # single turn: everything after the first token
        else:
            segments = int(rng.integers(1, min(4, L // 2) + 1))
            # 2s distinct cut points in 1..L; completion segments [c1, c2), [c3, c4), ...
            # are non-empty and separated by non-empty prompt/environment gaps.
            cuts = np.sort(rng.choice(np.arange(1, L + 1), size=2 * segments, replace=False))
            for a, b in zip(cuts[0::2], cuts[1::2]):
                mask[a:b] = 1
        lt = logprob_values(rng, L, extreme=extreme)
        lb = logprob_values(rng, L, extreme=extreme)
        if rng.random() < 0.1:
            lb = lt.copy()  # behavior == target on the whole row: d = 0
        else:
            same = rng.random(L) < 0.2
            lb[same] = lt[same]
        off = mask == 0
        if garbage_outside:
            garbage = np.array([np.nan, np.inf, 7.0, -np.inf])
            lt[off] = rng.choice(garbage, size=int(off.sum()))
            lb[off] = rng.choice(garbage, size=int(off.sum()))
        else:
            lt[off] = 0.0
            lb[off] = 0.0
        masks.append(mask)
        targets.append(lt.astype(np.float32))
        behaviors.append(lb.astype(np.float32))
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    mask = np.concatenate(masks)
    shared = None
    if spans:
        shared = ((rng.random(len(mask)) < rng.uniform(0.1, 0.9)) & (mask == 1)).astype(np.int8)
        completion = np.flatnonzero(mask)
        last = completion[np.searchsorted(completion, offsets[1:]) - 1]
        shared[last] = 1
    return TokenRows(
        offsets=offsets,
        completion_mask=mask,
        target_logprobs=np.concatenate(targets),
        behavior_logprobs=np.concatenate(behaviors),
        shared_boundary=shared,
    )


@st.composite
def scored_rows(draw, *, min_len: int = 2, max_len: int = 200, max_rows: int = 6, extreme: bool = True,
                garbage_outside: bool = False, spans: bool = False) -> TokenRows:
    lengths = draw(st.lists(st.integers(min_len, max_len), min_size=1, max_size=max_rows))
    seed = draw(st.integers(0, 2**32 - 1))
    return make_rows(lengths, seed, extreme=extreme, garbage_outside=garbage_outside, spans=spans)


LOG_RATIO_CLIPS = [(-0.08, 0.3), (-0.01, 0.01), (-5.0, 5.0), (-0.5, -0.5), (-math.inf, math.inf)]
WEIGHT_CLIPS = [(math.exp(-10.0), math.exp(5.0)), (0.0, math.inf), (0.5, 2.0), (math.exp(-3.0), 1.0)]
HORIZONS = st.one_of(st.none(), st.sampled_from([0, 1, 10**9]), st.integers(2, 12))
BLOCK_SIZES = st.one_of(st.integers(1, 8), st.just(10_000))


@st.composite
def weight_configs(draw, **fixed) -> WeightConfig:
    """Any combination of the section-3 flags; keyword arguments pin a flag."""
    values = {
        "granularity": draw(st.sampled_from(GRANULARITIES)),
        "gamma": draw(st.sampled_from([1.0, 0.999, 0.5])),
        "horizon": draw(HORIZONS),
        "block_size": draw(BLOCK_SIZES),
        "log_ratio_clip": draw(st.sampled_from(LOG_RATIO_CLIPS)),
        "weight_clip": draw(st.sampled_from(WEIGHT_CLIPS)),
        "normalize": draw(st.sampled_from(["dataset", "sequence", "none"])),
        "max_weight": draw(st.sampled_from([None, 0.5, 3.0])),
        "length_normalize": draw(st.booleans()),
        "center": draw(st.booleans()),
    }
    for name, value in fixed.items():
        values[name] = draw(value) if isinstance(value, st.SearchStrategy) else value
    if values["normalize"] != "none" and values["weight_clip"][0] == 0.0:  # refused by WeightConfig (design 6)
        values["weight_clip"] = (1e-30, values["weight_clip"][1])
    return WeightConfig(**values)


def completion_lengths(rows: TokenRows) -> np.ndarray:
    return np.add.reduceat(rows.completion_mask.astype(np.int64), rows.offsets[:-1])


# --------------------------------------------------------------------------
# Engine == reference
# --------------------------------------------------------------------------


@PROPERTY
@given(rows=scored_rows(), config=weight_configs())
def test_engine_matches_reference(rows: TokenRows, config: WeightConfig) -> None:
    assert_matches_reference(engine_columns(rows, config), reference_columns(rows, config))


@PROPERTY
@given(rows=scored_rows(spans=True), config=weight_configs())
def test_engine_matches_reference_with_spans(rows: TokenRows, config: WeightConfig) -> None:
    """Cross-tokenizer rows (design 3.7): span log-ratios on the span's last token, blocks snapped to span ends."""
    assert_matches_reference(engine_columns(rows, config), reference_columns(rows, config))


@FEW
@given(rows=scored_rows(), config=weight_configs())
def test_all_tokens_shared_boundaries_is_the_direct_path(rows: TokenRows, config: WeightConfig) -> None:
    """A shared_boundary column of all ones (one target token per span) gives bit-identical weights."""
    direct = engine_columns(rows, config)
    spans = TokenRows(rows.offsets, rows.completion_mask, rows.target_logprobs, rows.behavior_logprobs,
                      shared_boundary=rows.completion_mask.astype(np.int8))
    aligned = engine_columns(spans, config)
    for g in GRANULARITIES:
        np.testing.assert_array_equal(aligned.column(g), direct.column(g))


@FEW
@given(rows=scored_rows(spans=True, extreme=False),
       config=weight_configs(log_ratio_clip=(-math.inf, math.inf), weight_clip=(0.0, math.inf), center=False,
                             normalize="none", max_weight=None, horizon=None, length_normalize=False))
def test_span_weights_are_exact_at_shared_boundaries(rows: TokenRows, config: WeightConfig) -> None:
    """Unclipped: at a span end the token weight is the plain per-token suffix product (exact), and the
    sequence weight is the plain one: charging a span's ratio to its last token only moves it inside the span."""
    plain = TokenRows(rows.offsets, rows.completion_mask, rows.target_logprobs, rows.behavior_logprobs)
    direct, aligned = engine_columns(plain, config), engine_columns(rows, config)
    ends = rows.shared_boundary == 1
    np.testing.assert_allclose(aligned.token[ends], direct.token[ends], rtol=1e-5, atol=ATOL)
    np.testing.assert_allclose(aligned.sequence, direct.sequence, rtol=1e-5, atol=ATOL)


@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rows=scored_rows(min_len=500, max_len=1500, max_rows=2), config=weight_configs())
def test_long_rows_match_reference(rows: TokenRows, config: WeightConfig) -> None:
    assert_matches_reference(engine_columns(rows, config), reference_columns(rows, config))


@FEW
@given(rows=scored_rows(), config=weight_configs(normalize="dataset"))
def test_weight_sums_means_match_reference(rows: TokenRows, config: WeightConfig) -> None:
    """The first pass of dataset normalization: mean bounded W over completion tokens, per granularity."""
    with np.errstate(over="ignore"):
        sums = weight_sums(rows, config)
    assert sums.count == int(rows.completion_mask.sum())
    means = sums.means()
    none = WeightConfig(**{**config.__dict__, "normalize": "none", "max_weight": None})
    ref = reference_weights(rows, none)
    for g in GRANULARITIES:
        total = 0.0
        for row in ref:
            for w_k in row.w[g]:
                total += w_k
        assert means[g] == pytest.approx(total / sums.count, rel=1e-9, nan_ok=True), g


def test_weight_sums_add_and_empty_means() -> None:
    a, b = WeightSums(), WeightSums()
    a.sums["token"], a.count = 6.0, 3
    b.sums["token"], b.count = 2.0, 1
    a.add(b)
    assert a.count == 4 and a.means()["token"] == 2.0
    assert WeightSums().means() == {g: 1.0 for g in GRANULARITIES}


@FEW
@given(rows=scored_rows(max_len=60), config=weight_configs(log_ratio_clip=(-0.08, 0.3), center=False))
def test_infinite_logprob_is_clipped_by_finite_bounds(rows: TokenRows, config: WeightConfig) -> None:
    """design 3.1: -inf (probability 0) is clipped by finite lo/hi like any other value (without --center:
    validate.py rejects such rows when centering, since the row mean is infinite)."""
    lt, lb = rows.target_logprobs.copy(), rows.behavior_logprobs.copy()
    completion = np.flatnonzero(rows.completion_mask)
    lb[completion[0::3]] = -np.inf  # d = +inf -> hi
    lt[completion[1::3]] = -np.inf  # d = -inf -> lo
    lb[completion[1::3]] = -1.0
    with_inf = TokenRows(rows.offsets, rows.completion_mask, lt, lb)
    assert_matches_reference(engine_columns(with_inf, config), reference_columns(with_inf, config))
    assert np.all(np.isfinite(engine_columns(with_inf, config).token))


# --------------------------------------------------------------------------
# Named behaviors
# --------------------------------------------------------------------------


@PROPERTY
@given(rows=scored_rows(), config=weight_configs(block_size=1, horizon=None))
def test_block_size_one_equals_token_level(rows: TokenRows, config: WeightConfig) -> None:
    """design 3.2: B = 1 gives exactly the token level with H unbounded."""
    result = engine_columns(rows, config)
    np.testing.assert_allclose(result.block, result.token, rtol=1e-6, atol=ATOL, equal_nan=True)


@PROPERTY
@given(
    rows=scored_rows(extreme=False),
    config=weight_configs(horizon=None, weight_clip=(0.0, math.inf), normalize="none", max_weight=None,
                          log_ratio_clip=st.sampled_from([(-0.08, 0.3), (-1.0, 1.0), (-0.5, -0.5)])),
)
def test_horizon_unbounded_equals_recursion(rows: TokenRows, config: WeightConfig) -> None:
    """design 3.2: with H unbounded the token weight is G_k, G_T = 1, G_k = gamma exp(d_{k+1}) G_{k+1}."""
    result = engine_columns(rows, config)
    mask = rows.completion_mask.tolist()
    lt = [float(x) for x in rows.target_logprobs.tolist()]
    lb = [float(x) for x in rows.behavior_logprobs.tolist()]
    expected = np.zeros(len(mask), dtype=np.float64)
    for r in range(rows.num_rows):
        a, b = int(rows.offsets[r]), int(rows.offsets[r + 1])
        d = reference_log_ratios(lt[a:b], lb[a:b], mask[a:b], config)
        G = reference_token_recursion(d, config.gamma)
        # the two references agree with each other, too
        literal = [ieee_exp(x) for x in reference_log_weights(d, config)["token"]]
        np.testing.assert_allclose(G, literal, rtol=1e-9, atol=1e-300)
        expected[[a + c for c in range(b - a) if mask[a + c] == 1]] = G
    np.testing.assert_allclose(result.token, expected.astype(np.float32), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("horizon", [10**9, 2**62, sys.maxsize, 10**30])
def test_huge_horizon_equals_unbounded(horizon: int) -> None:
    """design 3.2: e_k = min(T, k + H), so any H >= T is the unbounded horizon."""
    rows = make_rows([40, 17, 90], seed=3)
    config = WeightConfig(horizon=horizon, log_ratio_clip=(-1.0, 1.0))
    unbounded = engine_columns(rows, WeightConfig(horizon=None, log_ratio_clip=(-1.0, 1.0)))
    np.testing.assert_array_equal(engine_columns(rows, config).token, unbounded.token)


@PROPERTY
@given(rows=scored_rows(), config=weight_configs())
def test_horizon_zero_gives_exp_zero_before_normalization(rows: TokenRows, config: WeightConfig) -> None:
    """H = 0: e_k = k, an empty suffix, logW_k = 0 for every token (then bounds: clip(0) = 0 or a bound)."""
    config = WeightConfig(**{**config.__dict__, "horizon": 0, "normalize": "none", "max_weight": None})
    log_lo, log_hi = reference_log_bounds(config)
    expected = math.exp(clip(0.0, log_lo, log_hi))
    token = engine_columns(rows, config).token
    completion = rows.completion_mask == 1
    np.testing.assert_allclose(token[completion], np.float32(expected), rtol=RTOL)


@PROPERTY
@given(rows=scored_rows(garbage_outside=True), config=weight_configs())
def test_zero_weight_outside_completion(rows: TokenRows, config: WeightConfig) -> None:
    """Prompt/environment positions get exactly 0.0, whatever their log-probs (even NaN/inf)."""
    result = engine_columns(rows, config)
    off = rows.completion_mask == 0
    assert np.all(result.token[off] == 0.0)
    assert np.all(result.block[off] == 0.0)


@FEW
@given(rows=scored_rows(garbage_outside=True), config=weight_configs())
def test_environment_tokens_never_enter_a_ratio(rows: TokenRows, config: WeightConfig) -> None:
    """design 3: prompt and user/tool turns never enter a ratio: off-mask log-probs do not change any weight."""
    off = rows.completion_mask == 0
    clean = TokenRows(
        rows.offsets,
        rows.completion_mask,
        np.where(off, np.float32(0.0), rows.target_logprobs),
        np.where(off, np.float32(0.0), rows.behavior_logprobs),
    )
    dirty, tidy = engine_columns(rows, config), engine_columns(clean, config)
    for g in GRANULARITIES:
        assert dirty.column(g).tobytes() == tidy.column(g).tobytes(), g


@PROPERTY
@given(rows=scored_rows(), config=weight_configs())
def test_every_block_token_has_same_weight(rows: TokenRows, config: WeightConfig) -> None:
    """design 3.2: every token of a block (B consecutive completion tokens, across turn gaps) has the same weight."""
    block = engine_columns(rows, config).block
    B = config.block_size
    for r in range(rows.num_rows):
        a, b = int(rows.offsets[r]), int(rows.offsets[r + 1])
        values = block[a:b][rows.completion_mask[a:b] == 1]
        for start in range(0, len(values), B):
            chunk = values[start : start + B]
            assert np.array_equal(chunk, np.full_like(chunk, chunk[0]), equal_nan=True), (r, start)


class RecordingObserver(WeightObserver):
    """Keeps every completion-space array the engine hands to its observer."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, np.ndarray, np.ndarray, weights.CompletionIndex]] = []
        self.log_ratio_calls: list[np.ndarray] = []

    def observe(self, granularity, w, at_bound, index) -> None:
        self.calls.append((granularity, w.copy(), at_bound.copy(), index))

    def observe_log_ratio(self, d) -> None:
        self.log_ratio_calls.append(d.copy())


@PROPERTY
@given(rows=scored_rows(), config=weight_configs())
def test_sequence_weight_constant_per_row(rows: TokenRows, config: WeightConfig) -> None:
    """design 3.2: the sequence level gives the same W to every completion token of a row."""
    observer = RecordingObserver()
    result = engine_columns(rows, config, observer)
    seen = 0
    for g, w, _, index in observer.calls:
        if g != "sequence":
            continue
        for r in range(len(index.lengths)):
            row_w = w[index.offsets[r] : index.offsets[r + 1]]
            assert np.array_equal(row_w, np.full_like(row_w, row_w[0]), equal_nan=True)
            assert np.array_equal(np.float32(row_w[0]), result.sequence[seen + r], equal_nan=True)
        seen += len(index.lengths)
    assert seen == rows.num_rows


@FEW
@given(rows=scored_rows(), config=weight_configs())
def test_observer_sees_the_written_weights(rows: TokenRows, config: WeightConfig) -> None:
    """Diagnostics are computed on exactly the weights that are written (before the float32 cast)."""
    observer = RecordingObserver()
    result = engine_columns(rows, config, observer)
    for g in ("token", "block"):
        seen = np.concatenate([w for name, w, _, _ in observer.calls if name == g])
        written = result.column(g)[rows.completion_mask == 1]
        assert seen.astype(np.float32).tobytes() == written.tobytes(), g


@PROPERTY
@given(
    rows=scored_rows(),
    config=weight_configs(normalize="dataset", max_weight=None, weight_clip=(math.exp(-10.0), math.exp(5.0))),
)
def test_dataset_normalization_mean_is_one(rows: TokenRows, config: WeightConfig) -> None:
    """design 3.3: with `dataset`, mean W over all completion tokens is 1 (sequence: weighted by T), before the cap."""
    result = engine_columns(rows, config)
    completion = rows.completion_mask == 1
    assert result.token[completion].astype(np.float64).mean() == pytest.approx(1.0, rel=1e-5)
    assert result.block[completion].astype(np.float64).mean() == pytest.approx(1.0, rel=1e-5)
    T = completion_lengths(rows)
    assert float(np.dot(result.sequence.astype(np.float64), T) / T.sum()) == pytest.approx(1.0, rel=1e-5)


@PROPERTY
@given(rows=scored_rows(), config=weight_configs(normalize="sequence", max_weight=None,
                                                 weight_clip=(math.exp(-10.0), math.exp(5.0))))
def test_sequence_normalize_row_mean_is_one(rows: TokenRows, config: WeightConfig) -> None:
    """design 3.3: with `sequence`, every row's mean W over its own completion tokens is 1."""
    result = engine_columns(rows, config)
    for r in range(rows.num_rows):
        a, b = int(rows.offsets[r]), int(rows.offsets[r + 1])
        completion = rows.completion_mask[a:b] == 1
        for g in ("token", "block"):
            assert result.column(g)[a:b][completion].astype(np.float64).mean() == pytest.approx(1.0, rel=1e-5), (r, g)
    np.testing.assert_allclose(result.sequence, 1.0, rtol=1e-6)


@FEW
@given(rows=scored_rows(), config=weight_configs(max_weight=st.sampled_from([0.5, 3.0])))
def test_cap_is_applied_last(rows: TokenRows, config: WeightConfig) -> None:
    """design 3.3 step 4: no weight exceeds the cap, and the cap comes after normalization."""
    result = engine_columns(rows, config)
    for g in GRANULARITIES:
        values = result.column(g)
        assert not np.any(values[~np.isnan(values)] > np.float32(config.max_weight)), g


# No shrink phase: the inputs are already small, and shrinking a failure here costs ~20 s.
@settings(max_examples=25, deadline=None, phases=[Phase.explicit, Phase.reuse, Phase.generate],
          suppress_health_check=[HealthCheck.too_slow])
@given(rows=scored_rows(max_rows=8, max_len=40), config=weight_configs())
def test_chunking_does_not_change_weights(rows: TokenRows, config: WeightConfig) -> None:
    """Rows are processed in chunks of about CHUNK_TOKENS tokens; every step is row-local (dataset
    normalization takes its mean from the whole input), so the chunk size changes nothing beyond
    float64 summation order."""
    assume(rows.num_rows >= 2 and len(rows.completion_mask) > 7)
    whole = engine_columns(rows, config)
    counter = RecordingObserver()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(weights, "CHUNK_TOKENS", 1)
        chunked = engine_columns(rows, config, counter)
    # The monkeypatch must actually split the work, or this test cannot fail.
    assert len(counter.log_ratio_calls) > 1, "CHUNK_TOKENS = 1 did not split the rows into several chunks"
    for g in GRANULARITIES:
        np.testing.assert_allclose(chunked.column(g), whole.column(g), rtol=1e-6, atol=ATOL, equal_nan=True,
                                   err_msg=g)


@settings(max_examples=200, deadline=None)
@given(lengths=st.lists(st.integers(0, 30), min_size=0, max_size=20), chunk_tokens=st.integers(1, 50))
def test_row_chunks_cover_rows_in_order(lengths: list[int], chunk_tokens: int) -> None:
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    chunks = row_chunks(offsets, chunk_tokens)
    if not lengths:
        assert chunks == []
        return
    assert chunks[0][0] == 0 and chunks[-1][1] == len(lengths)
    for (_, a1), (b0, _) in zip(chunks, chunks[1:]):
        assert a1 == b0
    for r0, r1 in chunks:
        assert r1 > r0
        # a chunk stays under chunk_tokens plus the length of its last row (a row is never split)
        assert offsets[r1] - offsets[r0] < chunk_tokens + (offsets[r1] - offsets[r1 - 1]) or r1 - r0 == 1


def on_grid(rows: TokenRows) -> TokenRows:
    """Log-probs rounded to multiples of 1/64: for |x| < 2**17, x + c (c a multiple of 1/64) is exact in float32."""
    def snap(x: np.ndarray) -> np.ndarray:
        return (np.round(x.astype(np.float64) * 64.0) / 64.0).astype(np.float32)

    return TokenRows(rows.offsets, rows.completion_mask, snap(rows.target_logprobs), snap(rows.behavior_logprobs))


def shift_row_target(rows: TokenRows, row: int, gap: float) -> TokenRows:
    """lt + gap on the completion tokens of one row (exact: see on_grid)."""
    a, b = int(rows.offsets[row]), int(rows.offsets[row + 1])
    lt = rows.target_logprobs.copy()
    completion = np.flatnonzero(rows.completion_mask[a:b] == 1) + a
    lt[completion] += np.float32(gap)
    assert np.array_equal(lt[completion] - np.float32(gap), rows.target_logprobs[completion])  # shift is exact
    return TokenRows(rows.offsets, rows.completion_mask, lt, rows.behavior_logprobs)


@FEW
@given(rows=scored_rows(), config=weight_configs(center=True, log_ratio_clip=(-math.inf, math.inf),
                                                 weight_clip=(math.exp(-10.0), math.exp(5.0))),
       gap_64ths=st.integers(-1920, -1), data=st.data())
def test_centering_removes_constant_gap(rows: TokenRows, config: WeightConfig, gap_64ths: int, data) -> None:
    """design 3.1 --center: a constant model gap on a row (every lt + c) changes no weight when the clip is wide."""
    base = on_grid(rows)
    shifted = shift_row_target(base, data.draw(st.integers(0, rows.num_rows - 1)), gap_64ths / 64.0)
    got_base, got_shifted = engine_columns(base, config), engine_columns(shifted, config)
    for g in GRANULARITIES:
        np.testing.assert_allclose(got_shifted.column(g), got_base.column(g), rtol=RTOL, atol=ATOL, err_msg=g)


def test_without_centering_a_constant_gap_changes_weights() -> None:
    """The converse, so that the centering test can fail: without --center the same gap moves the weights."""
    base = on_grid(make_rows([30, 55, 12], seed=11, extreme=False))
    shifted = shift_row_target(base, 1, -2.0)
    plain = WeightConfig(log_ratio_clip=(-math.inf, math.inf), weight_clip=(0.0, math.inf), gamma=1.0)
    assert not np.allclose(engine_columns(shifted, plain).token, engine_columns(base, plain).token, rtol=1e-3)
    centered = WeightConfig(**{**plain.__dict__, "center": True})
    np.testing.assert_allclose(engine_columns(shifted, centered).token, engine_columns(base, centered).token, rtol=1e-6)


def test_empty_completion_raises() -> None:
    """design 3.3: T = 0 is a reject; the engine refuses such a row and names it."""
    mask = np.array([0, 1, 1, 0, 0, 0, 0, 1], dtype=np.int8)  # row 1 = positions 3..5 has no completion token
    lp = np.zeros(8, dtype=np.float32)
    rows = TokenRows(np.array([0, 3, 6, 8]), mask, lp, lp)
    with pytest.raises(ValueError, match=r"row 1 .*empty completion"):
        weigh(rows, WeightConfig())
    with pytest.raises(ValueError, match=r"row 1 .*empty completion"):
        weight_sums(rows, WeightConfig())
    zero_length = TokenRows(np.array([0, 3, 3, 8]), np.array([0, 1, 1, 0, 1, 1, 1, 1], np.int8),
                            lp, lp)
    with pytest.raises(ValueError, match=r"row 1 .*empty completion"):
        weigh(zero_length, WeightConfig())


def test_dataset_normalization_needs_the_first_pass() -> None:
    rows = make_rows([10, 20], seed=0)
    with pytest.raises(ValueError, match="weight_sums"):
        weigh(rows, WeightConfig(normalize="dataset"))


def test_granularities_subset() -> None:
    rows = make_rows([10, 20], seed=1)
    result = weigh(rows, WeightConfig(), granularities=("token",))
    assert result.block is None and result.sequence is None
    np.testing.assert_array_equal(result.token, weigh(rows, WeightConfig()).token)


def test_no_rows_gives_empty_columns() -> None:
    empty = np.zeros(0, dtype=np.float32)
    result = weigh(TokenRows(np.array([0]), np.zeros(0, np.int8), empty, empty), WeightConfig())
    assert result.token.shape == (0,) and result.sequence.shape == (0,)


@FEW
@given(rows=scored_rows(), config=weight_configs())
def test_deterministic_bytes(rows: TokenRows, config: WeightConfig) -> None:
    first, second = engine_columns(rows, config), engine_columns(rows, config)
    for g in GRANULARITIES:
        assert first.column(g).tobytes() == second.column(g).tobytes(), g


# --------------------------------------------------------------------------
# Config: validation and round trip
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "flag"),
    [
        ({"granularity": "word"}, "--granularity"),
        ({"gamma": 0.0}, "--gamma"),
        ({"gamma": 1.5}, "--gamma"),
        ({"gamma": math.nan}, "--gamma"),
        ({"horizon": -1}, "--horizon"),
        ({"block_size": 0}, "--block-size"),
        ({"log_ratio_clip": (0.3, -0.08)}, "--log-ratio-clip"),
        ({"log_ratio_clip": (math.nan, 0.3)}, "--log-ratio-clip"),
        ({"weight_clip": (-1.0, 2.0)}, "--weight-clip"),
        ({"weight_clip": (2.0, 1.0)}, "--weight-clip"),
        ({"weight_clip": (0.1, math.nan)}, "--weight-clip"),
        ({"normalize": "batch"}, "--normalize"),
        ({"max_weight": 0.0}, "--max-weight"),
        ({"max_weight": -2.0}, "--max-weight"),
        ({"max_weight": math.nan}, "--max-weight"),
    ],
)
def test_invalid_config_names_the_flag(overrides: dict, flag: str) -> None:
    with pytest.raises(ValueError, match=flag):
        WeightConfig(**overrides)


def test_invalid_config_reports_every_problem() -> None:
    with pytest.raises(ValueError) as info:
        WeightConfig(gamma=2.0, block_size=0)
    assert "--gamma" in str(info.value) and "--block-size" in str(info.value)


@settings(max_examples=100, deadline=None)
@given(config=weight_configs())
def test_config_round_trip_through_json(config: WeightConfig) -> None:
    """to_dict is strict JSON (inf spelled 'inf') and from_dict restores an equal config."""
    text = json.dumps(config.to_dict(), allow_nan=False)
    assert WeightConfig.from_dict(json.loads(text)) == config


def test_config_round_trip_infinite_cap() -> None:
    """--max-weight inf passes validation, so its to_dict ('inf') must read back too."""
    config = WeightConfig(max_weight=math.inf)
    text = json.dumps(config.to_dict(), allow_nan=False)
    assert WeightConfig.from_dict(json.loads(text)) == config


def test_default_config_is_design_3_4() -> None:
    config = WeightConfig()
    assert (config.granularity, config.gamma, config.horizon, config.block_size) == ("token", 0.999, None, 4)
    assert config.log_ratio_clip == (-0.08, 0.3)
    assert config.weight_clip == pytest.approx((4.54e-05, 148.41), rel=1e-3)
    assert (config.normalize, config.max_weight, config.length_normalize, config.center) == ("none", None, False, False)
