"""Step time of plain cross-entropy vs the PEAR shim (static and online) on the same model and batch.

    python bench/loss_overhead.py                         # small Llama, SmolLM2's 49,152-token vocab, CPU
    python bench/loss_overhead.py --model smollm2         # the embedded SmolLM2-135M-Instruct
    python bench/loss_overhead.py --batch 8 --seq-len 512 --rounds 15

A step is forward + loss + backward (no optimizer step, which would only
dilute the differences). The three variants run interleaved, round by round,
so that load from other processes hits them alike; the median per variant is
reported. "plain CE" is the model's own loss (`model(..., labels=...).loss`,
transformers' ForCausalLMLoss: float32 logits, F.cross_entropy). Static and
online compute the logits the same way and apply `pear_data.loss.pear_loss`.
A second table times the loss alone on fixed logits (forward + backward of
the loss), where the differences are not diluted by the model.

Prints the ratios last. Targets: static <= 1.05 x plain CE, online <= 1.15 x.
The default model is a 4-layer Llama with the real vocabulary, random weights,
so that the loss (which scales with vocab) is a large share of the step: a
stricter test than a full-size model, where the decoder dominates.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch


def build_model(name: str, vocab: int):
    if name == "smollm2":
        from pear_data.models import load_model, resolve_model

        return load_model(resolve_model("smollm2-135m-instruct"), device="cpu", dtype=torch.float32).train()
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    return LlamaForCausalLM(config).train()


def make_batch(batch: int, seq_len: int, vocab: int, prompt_share: float):
    """input_ids, attention_mask, labels (-100 on the prompt and padding), static weights, behavior log-probs."""
    g = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, vocab, (batch, seq_len), generator=g)
    lengths = torch.linspace(seq_len * 0.75, seq_len, batch).long()  # ragged rows, right padding
    attention_mask = (torch.arange(seq_len)[None, :] < lengths[:, None]).long()
    labels = torch.where(attention_mask.bool(), input_ids, -100)
    labels[:, : int(seq_len * prompt_share)] = -100
    label_mask = labels != -100
    weights = torch.where(label_mask, torch.rand(batch, seq_len, generator=g) * 2, 0.0)
    behavior = torch.where(label_mask, -torch.rand(batch, seq_len, generator=g) * 8 - 8, 0.0)  # near log(1/V)
    return input_ids, attention_mask, labels, weights, behavior


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=["small", "smollm2"], default="small")
    parser.add_argument("--vocab", type=int, default=49152, help="vocab of the small model (SmolLM2's by default)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--prompt-share", type=float, default=0.4, help="share of each row that is prompt (no label)")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from pear_data.loss import pear_loss
    from pear_data.weights import WeightConfig

    model = build_model(args.model, args.vocab)
    vocab = model.config.vocab_size
    input_ids, attention_mask, labels, weights, behavior = make_batch(args.batch, args.seq_len, vocab,
                                                                      args.prompt_share)
    config = WeightConfig()

    def step_plain():
        model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss.backward()

    def step_static():
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
        pear_loss(labels, logits=logits, weights=weights).loss.backward()

    def step_online():
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
        pear_loss(labels, logits=logits, behavior_logprobs=behavior, config=config).loss.backward()

    with torch.no_grad():
        fixed = model(input_ids=input_ids, attention_mask=attention_mask).logits.detach()

    def loss_only(fn):
        def run():
            logits = fixed.clone().requires_grad_()
            fn(logits).backward()
        return run

    def ce(logits):  # what ForCausalLMLoss does
        shifted = torch.nn.functional.pad(labels, (0, 1), value=-100)[:, 1:]
        return torch.nn.functional.cross_entropy(logits.float().view(-1, vocab), shifted.reshape(-1),
                                                 ignore_index=-100)

    variants = {
        "step": {"plain CE": step_plain, "static": step_static, "online": step_online},
        "loss only": {
            "plain CE": loss_only(ce),
            "static": loss_only(lambda z: pear_loss(labels, logits=z, weights=weights).loss),
            "online": loss_only(lambda z: pear_loss(labels, logits=z, behavior_logprobs=behavior, config=config).loss),
        },
    }
    load_before = os.getloadavg()
    times = {kind: {name: [] for name in fns} for kind, fns in variants.items()}
    for round_ in range(args.warmup + args.rounds):
        for kind, fns in variants.items():
            for name, fn in fns.items():
                model.zero_grad(set_to_none=True)
                start = time.perf_counter()
                fn()
                elapsed = time.perf_counter() - start
                if round_ >= args.warmup:
                    times[kind][name].append(elapsed)
    load_after = os.getloadavg()

    tokens = int(attention_mask.sum())
    label_tokens = int((labels[:, 1:] != -100).sum())
    print(f"model={args.model} vocab={vocab} batch={args.batch} seq_len={args.seq_len} tokens={tokens} "
          f"label_tokens={label_tokens} threads={torch.get_num_threads()} rounds={args.rounds}")
    print(f"load average before {load_before[0]:.2f}, after {load_after[0]:.2f} (1 min), cpus {os.cpu_count()}")
    for kind, by_name in times.items():
        print(f"\n{kind}: median seconds (min, max)")
        for name, values in by_name.items():
            print(f"  {name:9s} {statistics.median(values):8.4f}  ({min(values):.4f}, {max(values):.4f})")
    print()
    for kind, by_name in times.items():
        base = statistics.median(by_name["plain CE"])
        for name, target in (("static", 1.05), ("online", 1.15)):
            ratio = statistics.median(by_name[name]) / base
            verdict = "ok" if ratio <= target else "over target"
            print(f"{kind:9s} {name} / plain CE = {ratio:.3f}  (target <= {target:.2f}: {verdict})")


if __name__ == "__main__":
    main()
