"""Throughput, peak memory and MFU of the torch scorer vs a naive per-example full-softmax loop.

Model: the embedded SmolLM2-135M-Instruct (float32, CPU), loaded through
`pear_data.models` (the GGUF conversion is cached). Data: GSM8K rows from
examples/data/gsm8k_sample.jsonl (repeated when more rows are asked for),
question as the user turn and answer as the assistant turn of the chat
template; the assistant turn is the completion.

1. Throughput, same rows, same process: the scorer (`TorchScorer`, defaults)
   vs `model(ids).logits.log_softmax(-1).gather(...)` one row at a time, on
   the GSM8K rows (123-468 tokens; units of --unit-rows rows) and on
   --long-seqs rows of --seq-len (2048) tokens, GSM8K rows concatenated
   (units of one scorer forward). Each unit is timed --repeats times per
   variant, the variants alternating, and its best time counts: on a shared
   machine this filters out most of the load of other processes. The two
   results are compared (max abs difference).
2. Peak memory at long sequences: the --long-seqs packed rows of --seq-len
   tokens, each variant in a fresh subprocess; the scorer at
   --batch-tokens (8192: four rows per forward) and at each
   --memory-batch-tokens (2048: one row per forward), the naive loop one row
   at a time. Method: after
   the model is loaded and warmed up, the child resets the kernel's peak-RSS
   counter (`echo 5 > /proc/self/clear_refs` resets VmHWM), scores, and reports
   VmHWM - VmRSS(before) from /proc/self/status: the peak resident memory the
   scoring itself added, torch allocations included (tracemalloc does not see
   them). Where clear_refs is not writable it falls back to ru_maxrss minus
   the RSS before scoring (an upper bound if loading peaked higher).
3. MFU = counted FLOP/s / measured peak. Counted (`scoring_flops`, the
   same for both variants: the work scoring needs, not the work a variant
   does): per token 2 x the decoder's non-embedding parameters; per *scored*
   (completion) token 2 x hidden x vocab for the lm_head; attention
   4 x layers x seq x width per token, halved for causal attention (a row of
   n tokens: 4 L d n^2 / 2). Peak: the best float32 `torch.mm` of two
   2048 x 2048 matrices (2 n^3 FLOPs, same threads) over measurements taken
   before and after every timed step, since load from other processes only
   ever lowers it.
4. Where the scorer's time goes: torch.profiler over one batch (the first
   batch of the packed rows: batch_tokens / seq_len rows), top ops by self
   CPU time.

    python bench/score_throughput.py [--rows 64] [--unit-rows 16] [--repeats 3] [--seq-len 2048] [--long-seqs 4]
                                     [--batch-tokens 8192] [--memory-batch-tokens 2048]

`--logprob-step` runs only a micro-bench of the log-prob step on one
[--chunk-rows, V] float32 logits chunk (the scorer's default chunk): real
SmolLM2 logits of GSM8K completion positions (V = 49,152), and the same rows
widened to V = 151,936 (a Qwen2.5-size vocabulary) with values drawn from
each row's own logits below its median (the top of every row, hence its
nucleus, is unchanged). Policy sets: the target (T=1); target + T=0.7;
target + T=0.7 top-p 0.9. Variants: "per policy" computes each policy alone
(its own max, shift, exp, sum and nucleus, each in new tensors: the scorer's
log-prob step before `policy_logprobs`), and `policy_logprobs` with the
"exp" and "power" strategies on a chunk it may overwrite, with a reused
scratch buffer, as the scorer calls it. Overwriting needs a fresh copy of the
chunk per run: the best time of that copy alone is subtracted. Best of
--repeats, the variants alternating.

    python bench/score_throughput.py --logprob-step [--repeats 7] [--chunk-rows 256]

The figures are printed last. On a shared machine, run it when `uptime`
shows a low load; the load averages are printed with the figures.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch

from pear_data.models import load_model, load_tokenizer, resolve_model
from pear_data.scoring import SamplingParams, TorchScorer, plan_batches, policy_logprobs, scoring_flops
from pear_data.scoring.sampling import log_normalizer, nucleus
from pear_data.tokenize import ConversationTokenizer

REPO = Path(__file__).resolve().parent.parent
GSM8K = REPO / "examples" / "data" / "gsm8k_sample.jsonl"


# --------------------------------------------------------------------------- data


def gsm8k_rows(tokenizer: Any, count: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Chat-templated GSM8K rows as `pear-data score` tokenizes them.

    Returns (input_ids int32 [n], completion_mask int8 [n]) per row.
    """
    to_tokens = ConversationTokenizer(tokenizer)
    sequences, masks = [], []
    lines = GSM8K.read_text().splitlines()
    for line, _ in zip(itertools.cycle(lines), range(count)):
        record = json.loads(line)
        row = to_tokens([{"role": "user", "content": record["question"]},
                         {"role": "assistant", "content": record["answer"]}])
        sequences.append(row.input_ids)
        masks.append(row.completion_mask)
    return sequences, masks


def packed_rows(sequences: list[np.ndarray], masks: list[np.ndarray], seq_len: int, count: int) -> tuple[list, list]:
    """`count` sequences of exactly `seq_len` tokens: GSM8K rows concatenated (cycling), cut at seq_len."""
    ids_stream = np.concatenate(sequences)
    mask_stream = np.concatenate(masks)
    reps = -(-seq_len * count // len(ids_stream))
    ids_stream, mask_stream = np.tile(ids_stream, reps), np.tile(mask_stream, reps)
    packed_ids = [ids_stream[i * seq_len : (i + 1) * seq_len] for i in range(count)]
    packed_masks = [mask_stream[i * seq_len : (i + 1) * seq_len].copy() for i in range(count)]
    for mask in packed_masks:
        mask[0] = 0
    return packed_ids, packed_masks


# --------------------------------------------------------------------------- the two variants


def naive_score(model: Any, sequences: list[np.ndarray], masks: list[np.ndarray]) -> list[np.ndarray]:
    """The straightforward loop: one row at a time, full [n, V] logits, full log_softmax, gather."""
    out = []
    with torch.inference_mode():
        for sequence, mask in zip(sequences, masks):
            ids = torch.as_tensor(sequence, dtype=torch.long)[None]
            logp = model(input_ids=ids).logits[0].log_softmax(-1)[:-1].gather(-1, ids[0, 1:, None])[:, 0]
            row = np.zeros(len(sequence), dtype=np.float32)
            row[1:] = logp.float().numpy()
            row[mask == 0] = 0.0
            out.append(row)
    return out


def scorer_score(scorer: TorchScorer, sequences: list[np.ndarray], masks: list[np.ndarray]) -> list[np.ndarray]:
    return scorer.score(sequences, masks, [SamplingParams()])[0]


def timed(fn, repeats: int) -> tuple[float, Any]:
    best, result = float("inf"), None
    for _ in range(repeats):
        started = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - started)
    return best, result


def interleaved_seconds(units: list[tuple[list, list]], variants: dict[str, Any], repeats: int) -> dict[str, float]:
    """Sum over units of the best-of-`repeats` time of each variant, the variants alternating on every unit.

    On a shared machine other processes come and go within seconds; timing
    small units back to back and keeping each unit's fastest run filters most
    of that out, and the alternation exposes both variants to the same load.
    """
    total = dict.fromkeys(variants, 0.0)
    for unit_sequences, unit_masks in units:
        best = dict.fromkeys(variants, float("inf"))
        for _ in range(repeats):
            for name, fn in variants.items():
                seconds, _ = timed(lambda fn=fn, s=unit_sequences, m=unit_masks: fn(s, m), 1)
                best[name] = min(best[name], seconds)
        for name in variants:
            total[name] += best[name]
        print("  unit: " + ", ".join(f"{n} {best[n]:.2f} s" for n in variants) + f" (load {os.getloadavg()[0]:.2f})",
              flush=True)
    return total


def matmul_peak_flops(n: int = 2048, repeats: int = 5) -> float:
    """Best float32 torch.mm FLOP/s on n x n matrices, same threads as the scoring."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)  # warm-up
    seconds, _ = timed(lambda: torch.mm(a, b), repeats)
    return 2 * n**3 / seconds


# --------------------------------------------------------------------------- the log-prob step alone


def per_policy_logprobs(logits: torch.Tensor, tokens: torch.Tensor, policies: list[SamplingParams]) -> list:
    """Each policy on its own, in new tensors: the scorer's log-prob step before `policy_logprobs`."""
    out = []
    for params in policies:
        log_z = log_normalizer(logits, params.temperature)
        chosen = logits.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
        logp = chosen / params.temperature - log_z
        if params.top_p < 1.0:
            threshold, log_mass = nucleus(logits, log_z, params.temperature, params.top_p)
            logp = torch.where(chosen >= threshold, logp - log_mass, -float("inf"))
        out.append(logp)
    return out


def real_logits(model: Any, sequences: list[np.ndarray], masks: list[np.ndarray], rows: int) -> tuple:
    """float32 [rows, V] logits of the first `rows` completion positions of the GSM8K rows, and their next tokens."""
    hidden, tokens = [], []
    with torch.inference_mode():
        for sequence, mask in zip(sequences, masks):
            ids = torch.as_tensor(sequence, dtype=torch.long)
            scored = torch.from_numpy(np.flatnonzero(mask[1:]))  # position i predicts token i + 1
            hidden.append(model.get_decoder()(input_ids=ids[None]).last_hidden_state[0, scored])
            tokens.append(ids[scored + 1])
            if sum(len(t) for t in tokens) >= rows:
                break
        logits = model.lm_head(torch.cat(hidden)[:rows]).float()
    return logits, torch.cat(tokens)[:rows]


def widen_vocabulary(logits: torch.Tensor, vocab: int, seed: int = 0) -> torch.Tensor:
    """[C, vocab]: the rows, then vocab - V values drawn from each row's own logits below its median."""
    generator = torch.Generator().manual_seed(seed)
    low = logits.sort(dim=-1).values[:, : logits.shape[1] // 2]
    pick = torch.randint(0, low.shape[1], (logits.shape[0], vocab - logits.shape[1]), generator=generator)
    return torch.cat([logits, low.gather(-1, pick)], dim=-1).contiguous()


def logprob_step_bench(args: argparse.Namespace) -> None:
    load_at_start = os.getloadavg()
    source = resolve_model("smollm2-135m-instruct")
    model = load_model(source, device="cpu", dtype=torch.float32)
    logits, tokens = real_logits(model, *gsm8k_rows(load_tokenizer(source), 16), args.chunk_rows)
    policy_sets = {
        "T=1": [SamplingParams()],
        "T=1 + T=0.7": [SamplingParams(), SamplingParams(0.7)],
        "T=1 + T=0.7 top-p 0.9": [SamplingParams(), SamplingParams(0.7, 0.9)],
    }
    lines = []
    def step_variants(chunk, work, scratch, policies) -> dict:
        def one_pass(strategy: str):
            return lambda: policy_logprobs(work.copy_(chunk), tokens, policies, overwrite=True, scratch=scratch,
                                           strategy=strategy)

        return {"per policy": lambda: per_policy_logprobs(chunk, tokens, policies),
                "exp": one_pass("exp"), "power": one_pass("power")}

    widened = widen_vocabulary(logits, 151_936)
    for vocab_label, chunk in (("49,152 (SmolLM2 logits)", logits), ("151,936 (widened)", widened)):
        work, scratch = torch.empty_like(chunk), torch.empty_like(chunk)
        copy_seconds, _ = timed(lambda work=work, chunk=chunk: work.copy_(chunk), args.repeats)
        for label, policies in policy_sets.items():
            reference = per_policy_logprobs(chunk, tokens, policies)
            variants = step_variants(chunk, work, scratch, policies)
            best = dict.fromkeys(variants, float("inf"))
            for _ in range(args.repeats):
                for name, fn in variants.items():
                    seconds, result = timed(fn, 1)
                    best[name] = min(best[name], seconds)
            for name in ("exp", "power"):
                best[name] = max(best[name] - copy_seconds, 0.0)
                values = variants[name]()
                gap = max(float((a - b)[torch.isfinite(b)].abs().max()) for a, b in zip(values, reference))
                best[name + " gap"] = gap
            lines.append(f"  V={vocab_label:24s} {label:22s} per policy {best['per policy'] * 1e3:7.1f} ms   "
                         f"exp {best['exp'] * 1e3:7.1f} ms ({best['per policy'] / best['exp']:.2f}x)   "
                         f"power {best['power'] * 1e3:7.1f} ms ({best['per policy'] / best['power']:.2f}x)   "
                         f"max |diff| {max(best['exp gap'], best['power gap']):.1e}")
            print(lines[-1], flush=True)
    print(f"\n== log-prob step, one [{args.chunk_rows}, V] float32 chunk, CPU "
          f"({platform.processor() or platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch "
          f"threads), best of {args.repeats}, variants alternating")
    print(f"load average (1 min) at start {load_at_start[0]:.2f}, at end {os.getloadavg()[0]:.2f}; "
          f"exp/power exclude the chunk copy each run needs ({copy_seconds * 1e3:.1f} ms at V=151,936)")
    print("\n".join(lines))


# --------------------------------------------------------------------------- memory child


def _status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def memory_child(args: argparse.Namespace) -> None:
    """Score packed long sequences with one variant; print one JSON line with the peak RSS increase."""
    source = resolve_model("smollm2-135m-instruct")
    model = load_model(source, device="cpu", dtype=torch.float32)
    sequences, masks = packed_rows(*gsm8k_rows(load_tokenizer(source), 64), args.seq_len, args.long_seqs)
    scorer = TorchScorer(model, batch_tokens=args.batch_tokens, vocab_chunk_tokens=args.vocab_chunk_tokens)
    run = {
        "scorer": lambda: scorer_score(scorer, sequences, masks),
        "naive": lambda: naive_score(model, sequences, masks),
    }[args.memory_child]
    warm_ids, warm_masks = [sequences[0][:64]], [masks[0][:64]]  # warm-up: allocator pools, lazy inits
    if args.memory_child == "scorer":
        scorer_score(scorer, warm_ids, warm_masks)
    else:
        naive_score(model, warm_ids, warm_masks)
    rss_before = _status_mb("VmRSS")
    try:
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM (peak RSS) to the current RSS
        method = "VmHWM after clear_refs"
    except OSError:
        method = "ru_maxrss (peak since start)"
    started = time.perf_counter()
    run()
    seconds = time.perf_counter() - started
    if method.startswith("VmHWM"):
        peak = _status_mb("VmHWM")
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({
        "variant": args.memory_child, "peak_increase_mb": peak - rss_before, "rss_before_mb": rss_before,
        "seconds": seconds, "tokens": int(sum(len(s) for s in sequences)), "method": method,
    }))


def run_memory_child(variant: str, args: argparse.Namespace, batch_tokens: int) -> dict[str, Any]:
    command = [sys.executable, __file__, "--memory-child", variant, "--seq-len", str(args.seq_len),
               "--long-seqs", str(args.long_seqs), "--batch-tokens", str(batch_tokens),
               "--vocab-chunk-tokens", str(args.vocab_chunk_tokens)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"memory child {variant} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- main


def profile_one_batch(scorer: TorchScorer, sequences: list[np.ndarray], masks: list[np.ndarray]) -> str:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        scorer_score(scorer, sequences, masks)
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=64, help="GSM8K rows for the throughput comparison")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per unit and variant (the best counts)")
    parser.add_argument("--unit-rows", type=int, default=16, help="GSM8K rows per timed unit")
    parser.add_argument("--seq-len", type=int, default=2048, help="tokens per packed sequence (memory test)")
    parser.add_argument("--long-seqs", type=int, default=4, help="packed sequences (long-row timing, memory test)")
    parser.add_argument("--batch-tokens", type=int, default=8192)
    parser.add_argument("--vocab-chunk-tokens", type=int, default=256)
    parser.add_argument("--memory-batch-tokens", type=lambda v: [int(x) for x in v.split(",") if x], default=[2048],
                        help="extra scorer budgets for the memory test, comma-separated (--batch-tokens always runs)")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--skip-profile", action="store_true")
    parser.add_argument("--memory-child", choices=["scorer", "naive"], help=argparse.SUPPRESS)
    parser.add_argument("--logprob-step", action="store_true", help="only the micro-bench of the log-prob step")
    parser.add_argument("--chunk-rows", type=int, default=256, help="rows of the --logprob-step chunk")
    args = parser.parse_args()
    if args.memory_child:
        memory_child(args)
        return
    if args.logprob_step:
        logprob_step_bench(args)
        return

    load_at_start = os.getloadavg()
    source = resolve_model("smollm2-135m-instruct")
    model = load_model(source, device="cpu", dtype=torch.float32)
    sequences, masks = gsm8k_rows(load_tokenizer(source), args.rows)
    tokens = int(sum(len(s) for s in sequences))
    completion = int(sum(int(m.sum()) for m in masks))
    scorer = TorchScorer(model, batch_tokens=args.batch_tokens, vocab_chunk_tokens=args.vocab_chunk_tokens)
    flops = scoring_flops(model)
    print(f"{len(sequences)} GSM8K rows, {tokens} tokens ({completion} completion), lengths "
          f"{min(map(len, sequences))}..{max(map(len, sequences))}; torch threads {torch.get_num_threads()}",
          flush=True)

    scorer_score(scorer, sequences[:2], masks[:2])  # warm-up
    naive_score(model, sequences[:2], masks[:2])
    peaks = [matmul_peak_flops()]  # the machine's peak is the best seen: measured around every step
    variants = {"scorer": lambda s, m: scorer_score(scorer, s, m), "naive": lambda s, m: naive_score(model, s, m)}

    print(f"GSM8K rows in units of {args.unit_rows} rows, best of {args.repeats} per unit:", flush=True)
    units = [(sequences[i : i + args.unit_rows], masks[i : i + args.unit_rows])
             for i in range(0, len(sequences), args.unit_rows)]
    short_seconds = interleaved_seconds(units, variants, args.repeats)
    peaks.append(matmul_peak_flops())
    ours, reference = scorer_score(scorer, *units[0]), naive_score(model, *units[0])
    max_diff = max(float(np.abs(a - b).max()) for a, b in zip(ours, reference))

    long_sequences, long_masks = packed_rows(sequences, masks, args.seq_len, args.long_seqs)
    long_tokens = args.seq_len * args.long_seqs
    scored = [int(np.count_nonzero(m[1:])) for m in masks]
    long_scored = [int(np.count_nonzero(m[1:])) for m in long_masks]
    short_flops = flops.total([len(s) for s in sequences], scored)
    long_flops = flops.total([len(s) for s in long_sequences], long_scored)
    per_forward = max(1, args.batch_tokens // args.seq_len)
    print(f"{args.long_seqs} packed rows of {args.seq_len} tokens in units of {per_forward} (one scorer forward), "
          f"best of {args.repeats} per unit:", flush=True)
    long_units = [(long_sequences[i : i + per_forward], long_masks[i : i + per_forward])
                  for i in range(0, args.long_seqs, per_forward)]
    long_seconds = interleaved_seconds(long_units, variants, args.repeats)
    peaks.append(matmul_peak_flops())

    profile_table = ""
    if not args.skip_profile:
        # one full forward: the first planned batch of the packed rows (batch_tokens / seq_len rows)
        first_batch = plan_batches([len(s) for s in long_sequences], args.batch_tokens)[0]
        profile_table = profile_one_batch(scorer, [long_sequences[r] for r in first_batch],
                                          [long_masks[r] for r in first_batch])

    memory: list[tuple[str, dict[str, Any]]] = []
    if not args.skip_memory:
        budgets = sorted({args.batch_tokens, *args.memory_batch_tokens}, reverse=True)
        for label, variant, budget in [*((f"scorer@{b}", "scorer", b) for b in budgets),
                                       ("naive", "naive", args.batch_tokens)]:
            memory.append((label, run_memory_child(variant, args, budget)))
            print(f"memory child {label}: {memory[-1][1]}", flush=True)
            peaks.append(matmul_peak_flops())
    peak = max(peaks)

    if profile_table:
        print(f"\nscorer, one batch ({len(first_batch)} x {args.seq_len} tokens), top ops by self CPU time:\n"
              + profile_table)
    print(f"\n== score throughput: SmolLM2-135M-Instruct float32, CPU ({platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores, {torch.get_num_threads()} torch threads)")
    print(f"load average (1 min) at start {load_at_start[0]:.2f}, at end {os.getloadavg()[0]:.2f}")
    print(f"counted FLOPs (scoring_flops): 2 x decoder non-embedding params = {flops.dense_per_token / 1e6:.1f} M "
          f"per token + 2 x hidden x vocab = {flops.head_per_scored_token / 1e6:.1f} M per scored token + "
          f"4 x layers x width x seq / 2 = {flops.attention_per_token_per_position / 2e6:.3f} M x seq per token "
          f"(causal); fp32 matmul peak: {peak / 1e9:.1f} GFLOP/s (best of {len(peaks)} measurements, "
          f"lowest {min(peaks) / 1e9:.1f})")
    print(f"batch_tokens={args.batch_tokens}, vocab_chunk_tokens={args.vocab_chunk_tokens}; times are sums over "
          f"units of each unit's best of {args.repeats}, the variants alternating")
    for title, count, total_flops, seconds in (
        (f"GSM8K rows: {len(sequences)} rows, {tokens} tokens, {sum(scored)} scored", tokens, short_flops,
         short_seconds),
        (f"packed rows: {args.long_seqs} x {args.seq_len} tokens, {sum(long_scored)} scored", long_tokens, long_flops,
         long_seconds),
    ):
        print(f"{title} ({total_flops / count / 1e6:.1f} MFLOP per token counted)")
        for name, label in (("scorer", "pear-data scorer"), ("naive", "naive per-example")):
            rate = count / seconds[name]
            print(f"  {label:18s} {rate:8.1f} tokens/s  ({seconds[name]:.2f} s)  "
                  f"MFU {total_flops / seconds[name] / peak:6.1%}")
        print(f"  speedup scorer / naive: {seconds['naive'] / seconds['scorer']:.2f}x")
    print(f"max |scorer - naive| log-prob on the first {len(units[0][0])} GSM8K rows: {max_diff:.2e}")
    if memory:
        records = dict(memory)
        first = memory[0][1]
        print(f"{args.long_seqs} packed sequences of {args.seq_len} tokens ({first['tokens']} tokens), "
              f"peak RSS increase over the loaded model ({first['method']}, fresh process each):")
        for label, record in memory:
            rate = record["tokens"] / record["seconds"]
            print(f"  {label:12s} peak +{record['peak_increase_mb']:7.1f} MiB   ({record['seconds']:.1f} s, "
                  f"load-dependent: {rate:.1f} tokens/s)")
        naive_mb = records["naive"]["peak_increase_mb"]
        for label, record in memory[:-1]:
            print(f"  memory naive / {label}: {naive_mb / record['peak_increase_mb']:.2f}x")


if __name__ == "__main__":
    main()
