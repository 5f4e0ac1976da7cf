"""Training step time and tokens/s: plain TRL SFTTrainer vs PearSFTTrainer (static, online), padded vs packed.

    python bench/train_throughput.py                     # 64 GSM8K sample rows, 4-layer Llama, SmolLM2 vocab
    python bench/train_throughput.py --rows 128 --steps 8

The same rows for every variant: the GSM8K sample (examples/data, question -> answer) tokenized with
SmolLM2-135M-Instruct's chat template by pear-data's own tokenizer stage, with pear-data's columns
(random log-probs, weighed by the weigh stage: `pear_data.weigh.weigh_table`). Plain TRL trains on
`input_ids` + `completion_mask` through its own preparation (completion_only_loss=True) and packing; PEAR on the
weighted rows. The model is a 4-layer Llama with SmolLM2's 49,152-token vocabulary and random weights (compute-bound
on a CPU: the step is matmuls). float32, one optimizer step per batch (AdamW).

Padded: batches of --batch rows. Packed: TRL's best-fit-decreasing packing into --max-length tokens, padding-free,
one packed row per step (about the tokens of a padded batch with --max-length 2048). Every variant is timed over
--steps steps after --warmup (one `train()` each, one variant after the other: run it on an otherwise idle machine);
the median step is reported. tokens/s counts real (non-padding) tokens.

Prints the ratios last. Targets (with packing): static <= 1.05 x plain's step time, online <= 1.15 x.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import time
import warnings
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
GSM8K = ROOT / "examples" / "data" / "gsm8k_sample.jsonl"


def scored_rows(rows: int):
    """The GSM8K sample as pear-data output rows (input_ids, completion_mask, log-probs, the weight columns)."""
    import datasets
    import pyarrow as pa

    from pear_data.models import load_tokenizer, resolve_model
    from pear_data.tokenize import ConversationTokenizer
    from pear_data.weigh import weigh_table
    from pear_data.weights import WeightConfig

    tokenizer = load_tokenizer(resolve_model("smollm2-135m-instruct"))
    tokenize = ConversationTokenizer(tokenizer)
    lines = [json.loads(line) for line in GSM8K.read_text().splitlines()]
    lines = (lines * (rows // len(lines) + 1))[:rows]
    rng = np.random.default_rng(0)
    ids, masks, target, behavior = [], [], [], []
    for line in lines:
        row = tokenize([{"role": "user", "content": line["question"]},
                        {"role": "assistant", "content": line["answer"]}])
        n = len(row.input_ids)
        lt = np.where(row.completion_mask == 1, -rng.exponential(1.0, n), 0.0)
        lb = np.where(row.completion_mask == 1, np.minimum(lt + rng.normal(0, 0.3, n), 0.0), 0.0)
        ids.append(row.input_ids.tolist())
        masks.append(row.completion_mask.tolist())
        target.append(lt.astype(np.float32).tolist())
        behavior.append(lb.astype(np.float32).tolist())
    table = pa.table({
        "input_ids": pa.array(ids, pa.list_(pa.int32())),
        "completion_mask": pa.array(masks, pa.list_(pa.int8())),
        "target_logprobs": pa.array(target, pa.list_(pa.float32())),
        "behavior_logprobs": pa.array(behavior, pa.list_(pa.float32())),
        "shared_boundary": pa.array(masks, pa.list_(pa.int8())),
    })
    weighed = weigh_table(table, WeightConfig()).kept
    return datasets.Dataset(weighed), tokenizer


def build_model(vocab: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                         max_position_embeddings=4096)
    return LlamaForCausalLM(config)


class StepTimer:
    def __new__(cls):
        from transformers import TrainerCallback

        class Timer(TrainerCallback):
            def __init__(self) -> None:
                self.times: list[float] = []

            def on_step_begin(self, args, state, control, **kwargs):
                self.start = time.perf_counter()

            def on_step_end(self, args, state, control, **kwargs):
                self.times.append(time.perf_counter() - self.start)

        return Timer()


def make_trainer(variant: str, packed: bool, data, tokenizer, args_common: dict, total_steps: int):
    from trl import SFTConfig, SFTTrainer

    from pear_data.trainer import PearSFTTrainer

    settings = {**args_common, **(dict(packing=True, per_device_train_batch_size=1) if packed else {})}
    args = SFTConfig(output_dir=f"/tmp/pear-bench-train/{variant}-{packed}", max_steps=total_steps, **settings)
    timer = StepTimer()
    model = build_model(len(tokenizer))
    if variant == "plain":
        plain = data.select_columns(["input_ids", "completion_mask"])
        args.completion_only_loss = True
        trainer = SFTTrainer(model=model, args=args, train_dataset=plain, processing_class=tokenizer, callbacks=[timer])
    else:
        trainer = PearSFTTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer,
                                 pear_mode=variant, callbacks=[timer])
    return trainer, timer


def real_tokens(trainer, packed: bool, batch: int) -> float:
    """Mean real tokens per step of the trainer's dataset (packed: per packed row; padded: per batch)."""
    lengths = [len(ids) for ids in trainer.train_dataset["input_ids"]]
    return float(np.mean(lengths)) * (1 if packed else batch)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8, help="rows per padded batch")
    parser.add_argument("--max-length", type=int, default=2048, help="tokens per packed row")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    options = parser.parse_args()
    torch.set_num_threads(options.threads)
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    import transformers

    transformers.logging.set_verbosity_error()

    data, tokenizer = scored_rows(options.rows)
    common = dict(per_device_train_batch_size=options.batch, max_length=options.max_length, learning_rate=1e-4,
                  logging_steps=10_000, save_strategy="no", report_to=[], use_cpu=True, bf16=False, seed=0,
                  disable_tqdm=True, gradient_checkpointing=False, dataloader_num_workers=0)
    total = options.steps + options.warmup
    variants = [(v, p) for p in (False, True) for v in ("plain", "static", "online")]
    runs = {key: make_trainer(*key, data, tokenizer, common, total) for key in variants}
    timings = {}
    for key, (trainer, timer) in runs.items():
        trainer.train()
        timings[key] = timer.times[options.warmup:]
    print(f"{options.rows} GSM8K rows, SmolLM2 tokens; 4-layer Llama (hidden 256, vocab {len(tokenizer)}); "
          f"{options.threads} threads; median of {options.steps} steps after {options.warmup}")
    print(f"{'variant':<10}{'layout':<9}{'step s':>9}{'tokens/step':>13}{'tokens/s':>10}")
    rate = {}
    for (variant, packed), times in timings.items():
        trainer = runs[(variant, packed)][0]
        tokens = real_tokens(trainer, packed, options.batch)
        step = statistics.median(times)
        rate[(variant, packed)] = (step, tokens / step)
        print(f"{variant:<10}{'packed' if packed else 'padded':<9}{step:>9.3f}{tokens:>13.0f}{tokens / step:>10.0f}")
    for packed in (True, False):
        name = "packed" if packed else "padded"
        plain = rate[("plain", packed)][0]
        print(f"{name}: static / plain step time {rate[('static', packed)][0] / plain:.3f} (target <= 1.05 packed), "
              f"online / plain {rate[('online', packed)][0] / plain:.3f} (target <= 1.15 packed)")
    for variant in ("plain", "static", "online"):
        gain = rate[(variant, True)][1] / rate[(variant, False)][1]
        print(f"{variant}: packed / padded tokens/s {gain:.2f}x")


if __name__ == "__main__":
    main()
