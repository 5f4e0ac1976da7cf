"""The target model: a character-level tokenizer, a small Llama from a config, brief pretraining, and pass@k.

The tokenizer is a `PreTrainedTokenizerFast` with one token per character of the task's alphabet plus
`<eos>` and `<pad>`, no chat template and no BOS, so pear-data renders a row as
`prompt "\\n\\n" completion <eos>` and a completion of c characters is c + 1 trained tokens.
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from task import SEPARATOR, Writer, prompt_text, reward

ALPHABET = "0123456789+=,;\n"


@dataclass(frozen=True)
class ModelShape:
    hidden: int = 128
    layers: int = 4
    heads: int = 4
    intermediate: int = 384


def build_tokenizer(alphabet: str = ALPHABET, merges: tuple[tuple[str, str], ...] = ()):
    """One token per character of `alphabet` and one per BPE merge of two earlier tokens (in order), then
    `<eos>` and `<pad>`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False, trim_offsets=False)

    def symbol(text: str) -> str:  # the text as the ByteLevel pre-tokenizer writes it (GPT-2's byte table)
        return byte_level.pre_tokenize_str(text)[0][0]

    vocab = {symbol(text): i for i, text in enumerate(list(alphabet) + [left + right for left, right in merges])}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[(symbol(a), symbol(b)) for a, b in merges], fuse_unk=False))
    backend.pre_tokenizer = byte_level
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(["<eos>", "<pad>"])
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>", pad_token="<pad>",
                                   padding_side="left", model_max_length=128)


def build_model(tokenizer, shape: ModelShape, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=shape.hidden, num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads, num_key_value_heads=shape.heads, intermediate_size=shape.intermediate,
        max_position_embeddings=128, tie_word_embeddings=True, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=None,
    )
    model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = None
    return model


def encode(tokenizer, prompt: str, completion: str) -> list[int]:
    return tokenizer(prompt + SEPARATOR + completion)["input_ids"] + [tokenizer.eos_token_id]


def writer_texts(writer: Writer, pool: list[tuple[int, ...]]) -> Callable[[random.Random, int], list]:
    """Pretraining text for the digit-sum task: `batch` (prompt, completion) pairs the writer samples for random
    problems of `pool`."""
    def texts(rng: random.Random, batch: int) -> list[tuple[str, str]]:
        return [(prompt_text(d), writer.sample(d, rng)[0]) for d in rng.choices(pool, k=batch)]
    return texts


def pretrain(model, tokenizer, texts: Callable[[random.Random, int], list], steps: int, batch: int, lr: float,
             seed: int) -> list[float]:
    """Plain causal-LM training on `texts(rng, batch)` (prompt, completion) pairs, whole rows; returns the losses."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    losses = []
    for _ in range(steps):
        rows = [encode(tokenizer, prompt, completion) for prompt, completion in texts(rng, batch)]
        width = max(map(len, rows))
        ids = torch.full((batch, width), tokenizer.pad_token_id)
        mask = torch.zeros((batch, width), dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = torch.tensor(row)
            mask[i, : len(row)] = 1
        labels = ids.masked_fill(mask == 0, -100)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    model.eval()
    return losses


@torch.no_grad()
def sample(model, tokenizer, prompts: list[str], n: int, temperature: float, seed: int, max_new_tokens: int = 40
           ) -> list[list[str]]:
    """n completions per prompt at `temperature` (prompts of one token length batched together, no padding)."""
    model.eval()
    encoded = [tokenizer(prompt + SEPARATOR)["input_ids"] for prompt in prompts]
    by_length: dict[int, list[int]] = defaultdict(list)
    for i, ids in enumerate(encoded):
        by_length[len(ids)].append(i)
    out: list[list[str]] = [[] for _ in prompts]
    generator_seed = seed
    for length in sorted(by_length):
        index = by_length[length]
        ids = torch.tensor([encoded[i] for i in index]).repeat_interleave(n, dim=0)
        torch.manual_seed(generator_seed)
        generator_seed += 1
        generated = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True,
                                   temperature=temperature, top_k=0, top_p=1.0, max_new_tokens=max_new_tokens)
        texts = tokenizer.batch_decode(generated[:, ids.shape[1]:], skip_special_tokens=True)
        for j, i in enumerate(index):
            out[i] = texts[j * n:(j + 1) * n]
    return out


def pass_at_k(model, tokenizer, problems: list[tuple[int, ...]], k: int, temperature: float, seed: int
              ) -> dict[str, float]:
    """pass@1 (mean reward over the k samples) and pass@k (share of problems with a correct sample)."""
    completions = sample(model, tokenizer, [prompt_text(d) for d in problems], k, temperature, seed)
    rewards = [[reward(c, d) for c in cs] for cs, d in zip(completions, problems)]
    return {"pass@1": sum(map(sum, rewards)) / (k * len(problems)),
            f"pass@{k}": sum(max(r) for r in rewards) / len(problems)}


def save(model, tokenizer, directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    from transformers.utils import logging

    logging.disable_progress_bar()
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory
