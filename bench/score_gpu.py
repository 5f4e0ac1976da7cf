"""GPU scoring benchmark: the pear-data scorer next to how RL trainers compute reference log-probs.

For a machine with an NVIDIA GPU (written for an H100 / H200; every command
must fit in 10 minutes there) and no model hub: each model is built from its
config with random weights (seeded), so no download is needed. Shapes:
SmolLM2-135M (Llama, 49,152-token vocabulary), Qwen2.5-0.5B and Qwen2.5-1.5B
(Qwen2, 151,936). The final norm's weight is scaled so that the logits'
standard deviation is about --logit-std (5: the largest of 49k-152k logits is
then ~20-25 above the mean, and the next-token distributions at T <= 1 are
dominated by a few tokens, as a trained model's are, so a top-p nucleus is
small); with the default initialization it would be ~0.5-0.8, a nearly flat
distribution.
Rows: --rows random token rows (seeded) of --seq-len tokens; the first
quarter of each row is prompt, the rest completion (scored).

Side by side, on the same rows, same process, one variant after the other:

- scorer: `TorchScorer` (device defaults: bf16 weights, --batch-tokens per
  forward, log-softmax in float32 from hidden states chunk by chunk), for the
  target alone (T=1), and for target + behavior (T=1 and T=0.7 top-p 0.9,
  one forward); each log-prob strategy ("power", the CUDA default, and
  "exp"); and with `fused_head=True` where liger-kernel is installed.
- full logits (RL trainers today): `model(ids, attention_mask).logits` for
  the same rows per forward as the scorer, bf16 [B, L, V], then per row
  log_softmax + gather, as TRL's `selective_log_softmax` does for bf16 logits.
- naive: one row at a time, `model(ids).logits.log_softmax(-1).gather(...)`.

Figures per variant: real tokens/s (best of --repeats, after a warm-up run),
MFU, peak GPU memory above the loaded weights (`torch.cuda.max_memory_allocated`
during one run), and agreement with float32 CPU log-probs of the same seeded
weights on the first --check-rows rows (max and mean |difference| over the
scored positions; the reference is a float64 log-softmax of the float32
model's logits). MFU = counted FLOPs / s / peak, with the counted FLOPs of
`pear_data.scoring.scoring_flops`, the same for every variant: 2 x non-embedding
decoder parameters per token + 2 x hidden x vocab per *scored* token (the
head) + attention 4 x layers x seq x width per token, halved for causal
attention. Peak: the device's dense bf16 tensor-core peak from the table
below (e.g. 989 TFLOP/s for H100 SXM), or --peak-tflops; a measured bf16
matmul rate is printed next to it.

    python bench/score_gpu.py [--models smollm2-135m,qwen2.5-0.5b,qwen2.5-1.5b] [--rows 16] [--seq-len 2048]
                              [--repeats 3] [--json score_gpu.json]
    python bench/score_gpu.py --device cpu --tiny        # tiny shapes, short rows: a smoke check without a GPU

Needs torch, transformers, numpy and pear_data (liger-kernel optional). It
writes its figures to --json and prints them last.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import time
from collections.abc import Callable
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch
import transformers

from pear_data.scoring import SamplingParams, TorchScorer, default_batch_tokens, scoring_dtype, scoring_flops

# Dense bf16 tensor-core peaks (no sparsity), TFLOP/s, from the vendors' datasheets; matched in the device name.
PEAK_BF16_TFLOPS = [
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.4),  # SXM (the name reads e.g. "NVIDIA H100 80GB HBM3")
    ("H200", 989.4),
    ("H20", 148.0),
    ("GH200", 989.4),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("L40S", 362.0),
    ("A10G", 70.0),
]

LLAMA_SMOLLM2_135M = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                          num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                          rope_theta=100000.0, rms_norm_eps=1e-5, tie_word_embeddings=True)
QWEN25_05B = dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                  num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768, rope_theta=1e6,
                  rms_norm_eps=1e-6, tie_word_embeddings=True)
QWEN25_15B = dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                  num_attention_heads=12, num_key_value_heads=2, max_position_embeddings=32768, rope_theta=1e6,
                  rms_norm_eps=1e-6, tie_word_embeddings=True)
MODELS = {
    "smollm2-135m": ("llama", LLAMA_SMOLLM2_135M),
    "qwen2.5-0.5b": ("qwen2", QWEN25_05B),
    "qwen2.5-1.5b": ("qwen2", QWEN25_15B),
}
# --tiny: the same families, small enough for a CPU smoke run.
TINY_MODELS = {
    "tiny-llama": ("llama", dict(vocab_size=2048, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                                 tie_word_embeddings=True)),
    "tiny-qwen2": ("qwen2", dict(vocab_size=6000, hidden_size=96, intermediate_size=192, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                                 tie_word_embeddings=True)),
}

TARGET = [SamplingParams()]
TARGET_AND_BEHAVIOR = [SamplingParams(), SamplingParams(0.7, 0.9)]


# --------------------------------------------------------------------------- models and rows


def build_model(family: str, config_kwargs: dict, seed: int, logit_std: float) -> torch.nn.Module:
    """A float32 CPU causal LM with seeded random weights, logits of standard deviation ~logit_std.

    The final RMSNorm's output has RMS |weight| (1 at init) and the tied head's
    rows are N(0, initializer_range^2), so a logit has standard deviation
    |weight| x initializer_range x sqrt(hidden): the norm weight is set to give logit_std.
    """
    config_class, model_class = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
    }[family]
    config = config_class(**config_kwargs)
    torch.manual_seed(seed)
    model = model_class(config).eval()
    with torch.no_grad():
        model.get_decoder().norm.weight.fill_(logit_std / (config.initializer_range * math.sqrt(config.hidden_size)))
    return model


def make_rows(vocab: int, rows: int, seq_len: int, seed: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Random token rows; mask 0 on the first quarter (prompt), 1 on the rest (completion)."""
    rng = np.random.default_rng(seed)
    sequences = [rng.integers(0, vocab, size=seq_len).astype(np.int32) for _ in range(rows)]
    mask = np.zeros(seq_len, np.int8)
    mask[seq_len // 4:] = 1
    return sequences, [mask.copy() for _ in range(rows)]


def reference_logprobs(model: torch.nn.Module, sequences: list[np.ndarray],
                       masks: list[np.ndarray]) -> list[np.ndarray]:
    """float32 CPU model, float64 log-softmax of its logits, the chosen tokens; 0.0 off the completion."""
    out = []
    with torch.inference_mode():
        for sequence, mask in zip(sequences, masks):
            ids = torch.as_tensor(sequence, dtype=torch.long)[None]
            logp = model(input_ids=ids).logits[0, :-1].double().log_softmax(-1).gather(-1, ids[0, 1:, None])[:, 0]
            row = np.zeros(len(sequence))
            row[1:] = logp.numpy()
            row[mask == 0] = 0.0
            out.append(row)
    return out


# --------------------------------------------------------------------------- the variants


def full_logits_logprobs(model: Any, sequences: list[np.ndarray], masks: list[np.ndarray], rows_per_forward: int,
                         device: torch.device) -> list[np.ndarray]:
    """RL trainers today: full [B, L, V] logits per batch, then per row log_softmax + gather (TRL's bf16 branch)."""
    values = []
    with torch.inference_mode():
        for start in range(0, len(sequences), rows_per_forward):
            ids = torch.as_tensor(np.stack(sequences[start:start + rows_per_forward]), dtype=torch.long, device=device)
            logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[:, :-1]
            labels = ids[:, 1:]
            per_row = []
            for row_logits, row_labels in zip(logits, labels):  # selective_log_softmax, bf16 branch
                per_row.append(row_logits.log_softmax(dim=-1).gather(-1, row_labels[:, None])[:, 0])
            values.append(torch.stack(per_row))
            del logits
    return _rows_to_host(torch.cat(values), masks)


def naive_logprobs(model: Any, sequences: list[np.ndarray], masks: list[np.ndarray],
                   device: torch.device) -> list[np.ndarray]:
    """One row at a time: model(ids).logits.log_softmax(-1).gather(...)."""
    values = []
    with torch.inference_mode():
        for sequence in sequences:
            ids = torch.as_tensor(sequence, dtype=torch.long, device=device)[None]
            values.append(model(input_ids=ids).logits.log_softmax(-1)[0, :-1].gather(-1, ids[0, 1:, None])[:, 0])
    return _rows_to_host(torch.stack(values), masks)


def _rows_to_host(values: torch.Tensor, masks: list[np.ndarray]) -> list[np.ndarray]:
    """[R, L - 1] device log-probs of tokens 1.. -> per row float32 [L] on the host, 0.0 off the completion."""
    host = values.float().cpu().numpy()
    out = []
    for row, mask in zip(host, masks):
        full = np.zeros(len(mask), np.float32)
        full[1:] = row
        full[mask == 0] = 0.0
        out.append(full)
    return out


# --------------------------------------------------------------------------- measuring


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(fn: Callable[[], list[np.ndarray]], device: torch.device, repeats: int) -> dict[str, Any]:
    """Warm-up run, then `repeats` timed runs (best counts); peak device memory above what was allocated before."""
    result = fn()  # warm-up: kernels, allocator pools, lazy inits
    synchronize(device)
    peak_extra = None
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    best = math.inf
    for _ in range(repeats):
        synchronize(device)
        started = time.perf_counter()
        result = fn()
        synchronize(device)
        best = min(best, time.perf_counter() - started)
        if device.type == "cuda" and peak_extra is None:
            peak_extra = (torch.cuda.max_memory_allocated(device) - before) / 2**30
    return {"seconds": best, "peak_gib_above_weights": peak_extra, "result": result}


def agreement(values: list[np.ndarray], reference: list[np.ndarray], masks: list[np.ndarray]) -> dict[str, float]:
    """max and mean |values - reference| over the scored positions of the reference rows."""
    diffs = []
    for got, ref, mask in zip(values, reference, masks):
        scored = np.flatnonzero(mask[1:]) + 1
        diffs.append(np.abs(got[scored].astype(np.float64) - ref[scored]))
    flat = np.concatenate(diffs)
    finite = np.isfinite(flat)
    return {"max_abs_diff": float(flat[finite].max()), "mean_abs_diff": float(flat[finite].mean()),
            "nonfinite": int((~finite).sum())}


def device_peak(device: torch.device, override: float | None) -> tuple[float | None, str]:
    if override is not None:
        return override * 1e12, f"--peak-tflops {override}"
    if device.type != "cuda":
        return None, "no datasheet peak for a CPU: MFU against the measured matmul rate"
    name = torch.cuda.get_device_name(device)
    for key, tflops in PEAK_BF16_TFLOPS:
        if key in name:
            return tflops * 1e12, f"{name}: dense bf16 peak {tflops} TFLOP/s (datasheet, matched '{key}')"
    return None, f"{name}: not in the table, pass --peak-tflops; MFU against the measured matmul rate"


def matmul_rate(device: torch.device, dtype: torch.dtype, n: int, repeats: int = 5) -> float:
    """Best FLOP/s of an n x n x n matmul in `dtype` on `device` (2 n^3 FLOPs)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    torch.mm(a, b)
    synchronize(device)
    best = math.inf
    for _ in range(repeats):
        synchronize(device)
        started = time.perf_counter()
        torch.mm(a, b)
        synchronize(device)
        best = min(best, time.perf_counter() - started)
    return 2 * n**3 / best


# --------------------------------------------------------------------------- main


def liger_available() -> bool:
    try:
        import liger_kernel.transformers.functional  # noqa: F401
    except ImportError:
        return False
    return True


def bench_model(name: str, family: str, config_kwargs: dict, args: argparse.Namespace, device: torch.device,
                peak: float) -> dict[str, Any]:
    started = time.perf_counter()
    model = build_model(family, config_kwargs, args.seed, args.logit_std)
    sequences, masks = make_rows(config_kwargs["vocab_size"], args.rows, args.seq_len, args.seed + 1)
    check_rows = min(args.check_rows, args.rows)
    reference = reference_logprobs(model, sequences[:check_rows], masks[:check_rows])
    flops = scoring_flops(model)
    counted = flops.total([len(s) for s in sequences], [int(np.count_nonzero(m[1:])) for m in masks])
    model = model.to(device=device, dtype=scoring_dtype(str(device)))
    synchronize(device)
    print(f"{name}: built, float32 CPU reference of {check_rows} row(s) and move to {device} in "
          f"{time.perf_counter() - started:.1f} s", flush=True)

    batch_tokens = args.batch_tokens or default_batch_tokens(str(device))
    rows_per_forward = max(1, batch_tokens // args.seq_len)

    def scorer(policies: list[SamplingParams], **options: Any) -> Callable[[], list[np.ndarray]]:
        instance = TorchScorer(model, device=str(device), batch_tokens=batch_tokens, **options)
        return lambda: instance.score(sequences, masks, policies)[0]

    variants: dict[str, Callable[[], list[np.ndarray]]] = {
        "scorer T=1": scorer(TARGET),
        "scorer T=1 + T=0.7 top-p 0.9": scorer(TARGET_AND_BEHAVIOR),
        "scorer T=1 + T=0.7 top-p 0.9, exp": scorer(TARGET_AND_BEHAVIOR, logprob_strategy="exp"),
        "scorer T=1 + T=0.7 top-p 0.9, power": scorer(TARGET_AND_BEHAVIOR, logprob_strategy="power"),
    }
    if device.type == "cuda" and liger_available():
        variants["scorer T=1, fused_head (liger)"] = scorer(TARGET, fused_head=True)
    variants[f"full logits ({rows_per_forward} rows/forward, TRL-style)"] = (
        lambda: full_logits_logprobs(model, sequences, masks, rows_per_forward, device))
    variants["naive per-row loop"] = lambda: naive_logprobs(model, sequences, masks, device)

    tokens = args.rows * args.seq_len
    figures: dict[str, Any] = {
        "shape": config_kwargs, "family": family, "rows": args.rows, "seq_len": args.seq_len,
        "scored_tokens": int(sum(np.count_nonzero(m[1:]) for m in masks)), "batch_tokens": batch_tokens,
        "counted_flops": counted, "counted_flops_per_token": counted / tokens, "variants": {},
    }
    for label, fn in variants.items():
        try:
            record = measure(fn, device, args.repeats)
        except torch.cuda.OutOfMemoryError as exc:  # report it and go on with the other variants
            figures["variants"][label] = {"error": f"out of memory: {str(exc).splitlines()[0]}"}
            gc.collect()
            torch.cuda.empty_cache()
            print(f"  {label}: out of memory", flush=True)
            continue
        seconds = record["seconds"]
        figures["variants"][label] = {
            "seconds": seconds, "tokens_per_s": tokens / seconds, "mfu": counted / seconds / peak,
            "peak_gib_above_weights": record["peak_gib_above_weights"],
            **agreement(record["result"][:check_rows], reference, masks[:check_rows]),
        }
        entry = figures["variants"][label]
        print(f"  {label}: {entry['tokens_per_s']:.0f} tokens/s, MFU {entry['mfu']:.1%}, max |diff| vs fp32 CPU "
              f"{entry['max_abs_diff']:.2e}", flush=True)
        del record
        gc.collect()
    figures["seconds_total"] = time.perf_counter() - started
    return figures  # the model goes with this frame


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes and short rows (smoke check)")
    parser.add_argument("--models", default=None, help="comma-separated subset of the shapes")
    parser.add_argument("--rows", type=int, default=None, help="rows per model (default 16; --tiny 4)")
    parser.add_argument("--seq-len", type=int, default=None, help="tokens per row (default 2048; --tiny 128)")
    parser.add_argument("--batch-tokens", type=int, default=None, help="scorer tokens per forward (device default)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--check-rows", type=int, default=1, help="rows compared with float32 CPU log-probs")
    parser.add_argument("--logit-std", type=float, default=5.0, help="standard deviation of the random models' logits")
    parser.add_argument("--peak-tflops", type=float, default=None, help="the device's dense bf16 peak")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default="score_gpu.json", help="where to write the figures")
    args = parser.parse_args()
    shapes = TINY_MODELS if args.tiny else MODELS
    args.rows = args.rows or (4 if args.tiny else 16)
    args.seq_len = args.seq_len or (128 if args.tiny else 2048)
    if args.tiny and args.batch_tokens is None:
        args.batch_tokens = 2 * args.seq_len
    names = args.models.split(",") if args.models else list(shapes)
    unknown = [n for n in names if n not in shapes]
    if unknown:
        parser.error(f"unknown model(s) {unknown}: choose from {list(shapes)}")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but torch sees no CUDA device (use --device cpu --tiny for a smoke run)")

    started = time.perf_counter()
    dtype = scoring_dtype(str(device))
    measured = matmul_rate(device, dtype, 8192 if device.type == "cuda" else 1024)
    peak, peak_source = device_peak(device, args.peak_tflops)
    if peak is None:
        peak = measured
    results: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "transformers": transformers.__version__, "liger_kernel": liger_available(),
        "dtype": str(dtype).removeprefix("torch."), "peak_flops": peak, "peak_source": peak_source,
        "measured_matmul_flops": measured, "tiny": args.tiny, "logit_std": args.logit_std, "seed": args.seed,
        "mfu_formula": "counted FLOPs / s / peak; counted = 2 x non-embedding decoder params per token + "
                       "2 x hidden x vocab per scored token + 4 x layers x attention width x seq / 2 per token",
        "models": {},
    }
    for name in names:
        family, config_kwargs = shapes[name]
        results["models"][name] = bench_model(name, family, config_kwargs, args, device, peak)
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    results["seconds_total"] = time.perf_counter() - started
    with open(args.json, "w") as handle:
        json.dump(results, handle, indent=2)

    print(f"\n== score_gpu: {results['device']}, torch {results['torch']}, transformers {results['transformers']}, "
          f"{results['dtype']} weights, liger-kernel {'installed' if results['liger_kernel'] else 'not installed'}")
    print(f"MFU peak: {peak / 1e12:.4g} TFLOP/s ({peak_source}); measured {results['dtype']} matmul: "
          f"{measured / 1e12:.4g} TFLOP/s")
    print(f"MFU counts {results['mfu_formula']}")
    for name, figures in results["models"].items():
        print(f"{name}: {figures['rows']} rows x {figures['seq_len']} tokens ({figures['scored_tokens']} scored), "
              f"{figures['counted_flops_per_token'] / 1e6:.4g} MFLOP per token counted, scorer batch "
              f"{figures['batch_tokens']} tokens")
        for label, entry in figures["variants"].items():
            if "error" in entry:
                print(f"  {label:48s} {entry['error']}")
                continue
            memory = ("" if entry["peak_gib_above_weights"] is None
                      else f"  peak +{entry['peak_gib_above_weights']:6.2f} GiB")
            print(f"  {label:48s} {entry['tokens_per_s']:10.0f} tokens/s  MFU {entry['mfu']:6.1%}{memory}  "
                  f"vs fp32 CPU: max {entry['max_abs_diff']:.2e} mean {entry['mean_abs_diff']:.2e}")
    print(f"figures written to {args.json} ({results['seconds_total']:.0f} s in all)")


if __name__ == "__main__":
    main()
