"""Throughput of the PEAR weight engine vs a per-token Python loop.

Builds >= 20M synthetic completion tokens in rows of 100..8000 tokens
(log-uniform lengths, a short prompt, one in four rows multi-turn), times
`pear_data.weights.weigh` per granularity (best of --repeats), then a naive
per-token loop (what a trainer-side implementation tends to look like) on a
subset, and prints tokens/s for both and their ratio last.

    python bench/weights_throughput.py [--tokens 20000000] [--loop-tokens 300000]
"""

from __future__ import annotations

import argparse
import math
import platform
import time

import numpy as np

from pear_data.diagnostics import Diagnostics
from pear_data.weights import GRANULARITIES, TokenRows, WeightConfig, weigh


def synthetic_rows(completion_tokens: int, seed: int = 0) -> TokenRows:
    rng = np.random.default_rng(seed)
    lengths = []
    total = 0
    while total < completion_tokens / 0.93:
        n = int(np.exp(rng.uniform(np.log(100), np.log(8000))))
        lengths.append(n)
        total += n
    lengths = np.array(lengths, dtype=np.int64)
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    n = int(offsets[-1])
    mask = np.ones(n, dtype=np.int8)
    prompt = np.maximum(1, (lengths * rng.uniform(0.02, 0.1, len(lengths))).astype(np.int64))
    for r in range(len(lengths)):  # building the data, not the measured code
        start = offsets[r]
        mask[start : start + prompt[r]] = 0
        if r % 4 == 0:  # a user turn in the middle: two completion segments
            mid = start + lengths[r] // 2
            mask[mid : mid + min(20, lengths[r] // 10)] = 0
    target = np.log(rng.uniform(0.05, 1.0, n)).astype(np.float32)
    behavior = (target + rng.normal(0.0, 0.1, n)).clip(max=0).astype(np.float32)
    return TokenRows(offsets, mask, target, behavior)


def python_loop_weights(rows: TokenRows, config: WeightConfig) -> list[list[float]]:
    """Token level, unbounded horizon, the recursion G_k = gamma exp(d_{k+1}) G_{k+1}, one token at a time."""
    lo, hi = config.log_ratio_clip
    wmin, wmax = config.weight_clip
    out = []
    for r in range(rows.num_rows):
        a, b = rows.offsets[r], rows.offsets[r + 1]
        mask = rows.completion_mask[a:b].tolist()
        lt = rows.target_logprobs[a:b].tolist()
        lb = rows.behavior_logprobs[a:b].tolist()
        weights = [0.0] * (b - a)
        log_g = 0.0
        for i in range(b - a - 1, -1, -1):
            if not mask[i]:
                continue
            weights[i] = min(max(math.exp(log_g), wmin), wmax)
            d = min(max(lt[i] - lb[i], lo), hi)
            log_g += d + math.log(config.gamma)
        out.append(weights)
    return out


def best_time(fn, repeats: int) -> float:
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=20_000_000, help="completion tokens to build")
    parser.add_argument("--loop-tokens", type=int, default=300_000, help="completion tokens for the Python loop")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    rows = synthetic_rows(args.tokens)
    completion = int(np.count_nonzero(rows.completion_mask))
    print(f"{rows.num_rows:,} rows, {len(rows.completion_mask):,} tokens, {completion:,} completion tokens "
          f"({platform.processor() or platform.machine()}, numpy {np.__version__})")
    config = WeightConfig()
    rates = {}
    for g in GRANULARITIES:
        seconds = best_time(lambda g=g: weigh(rows, config, granularities=(g,)), args.repeats)
        rates[g] = completion / seconds
        print(f"engine {g:8s} {rates[g] / 1e6:8.1f} M completion tokens/s  ({seconds:.3f} s)")
    seconds = best_time(lambda: weigh(rows, config), args.repeats)
    print(f"engine all three       {completion / seconds / 1e6:8.1f} M completion tokens/s  ({seconds:.3f} s)")
    seconds = best_time(lambda: weigh(rows, config, observer=Diagnostics()), 1)
    print(f"engine all + diagnostics {completion / seconds / 1e6:6.1f} M completion tokens/s  ({seconds:.3f} s)")

    # The loop on a prefix of rows holding about --loop-tokens completion tokens.
    cut = int(np.searchsorted(np.cumsum(np.diff(rows.offsets)), args.loop_tokens)) + 1
    subset = TokenRows(rows.offsets[: cut + 1], rows.completion_mask[: rows.offsets[cut]],
                       rows.target_logprobs[: rows.offsets[cut]], rows.behavior_logprobs[: rows.offsets[cut]])
    subset_completion = int(np.count_nonzero(subset.completion_mask))
    start = time.perf_counter()
    loop = python_loop_weights(subset, config)
    loop_rate = subset_completion / (time.perf_counter() - start)
    # Same numbers as the engine on the subset (a benchmark of a wrong answer is worthless).
    engine = weigh(subset, config).token
    np.testing.assert_allclose(np.concatenate([np.asarray(w) for w in loop]), engine, rtol=1e-5, atol=0)
    print(f"python loop (token)     {loop_rate / 1e6:8.3f} M completion tokens/s  on {subset_completion:,} tokens")
    print(f"token-level engine: {rates['token'] / 1e6:.1f} M tokens/s; python loop: {loop_rate / 1e6:.3f} M tokens/s; "
          f"ratio: {rates['token'] / loop_rate:.0f}x")


if __name__ == "__main__":
    main()
