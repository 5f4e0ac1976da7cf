"""Tiny local models for fast end-to-end tests: `--target DIR --behavior DIR` without SmolLM2 or Gemma.

`make_tiny_model(directory, ...)` writes a Hugging Face model directory that
pear-data loads like any local model (`resolve_model(DIR)`):

- `config.json` + `model.safetensors`: a `LlamaForCausalLM` with one layer and
  hidden size 16, random weights from a fixed seed (same bytes every time);
- a `PreTrainedTokenizerFast` built with the `tokenizers` library: byte-level
  (every byte of UTF-8 is one token, offsets map back to characters), no
  merges, plus the control tokens of the chosen `flavor` as special tokens and
  a chat template that uses them.

Flavors:
    "chatml": `<|im_start|>role\\ncontent<|im_end|>\\n` (SmolLM2/Qwen style), eos `<|im_end|>`
    "turns":  `<start_of_turn>role\\ncontent<end_of_turn>\\n` (Gemma style), eos `<end_of_turn>`;
              another tokenizer than "chatml" (so a chatml target with a turns behavior is aligned
              by character offsets)

`template` replaces the chat template (None: the flavor's own; "" : no chat template, a base model).

Scoring a row costs milliseconds, so a CLI run is dominated by the import of torch and
transformers (a few seconds).

Session fixtures (import them into a test module: `from .tiny_model import tiny_model_dir_fixture`):
`tiny_model_dir` (chatml), `tiny_turns_model_dir` (turns, another tokenizer), `tiny_strict_model_dir`
(chatml whose template refuses roles other than system/user/assistant).
"""

from __future__ import annotations

from pathlib import Path

import pytest

FLAVORS = {
    "chatml": {"bos": None, "eos": "<|im_end|>", "start": "<|im_start|>",
               "special": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]},
    "turns": {"bos": "<bos>", "eos": "<end_of_turn>", "start": "<start_of_turn>",
              "special": ["<pad>", "<bos>", "<start_of_turn>", "<end_of_turn>"]},
}


def chat_template(flavor: str) -> str:
    start, end = FLAVORS[flavor]["start"], FLAVORS[flavor]["eos"]
    bos = FLAVORS[flavor]["bos"]
    head = f"{{{{ '{bos}' }}}}" if bos else ""
    return (
        head + "{% for message in messages %}"
        f"{{{{ '{start}' + message['role'] + '\\n' + message['content'] + '{end}' + '\\n' }}}}"
        "{% endfor %}"
        f"{{% if add_generation_prompt %}}{{{{ '{start}assistant\\n' }}}}{{% endif %}}"
    )


# A ChatML template that refuses roles other than system/user/assistant (as many instruct templates do).
STRICT_ROLES_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('Unknown role: ' + message['role'] + '. Only system, user and assistant are supported.') }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


# BPE merges of frequent English pairs: a tokenizer with them splits text differently from the byte-level one,
# so rows aligned between the two have spans of several tokens (design 3.7).
MERGES = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("i", "n"), ("e", "r"), ("a", "n"), ("r", "e"), ("o", "n"),
          ("Ġ", "a"), ("e", "s"), ("s", "t"), ("Ġ", "s"), ("Ġ", "w"), ("Ġ", "o"), ("a", "t"), ("e", "n"),
          ("o", "u"), ("Ġ", "h"), ("Ġ", "b"), ("n", "d"), ("Ġa", "nd"), ("Ġ", "1"), ("Ġ", "2"), ("0", "0")]


def build_tokenizer(flavor: str = "chatml", template: str | None = None, merges: bool = False):
    """A byte-level `PreTrainedTokenizerFast` with the flavor's special tokens and chat template (and
    `MERGES` when `merges`)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    spec = FLAVORS[flavor]
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {symbol: i for i, symbol in enumerate(sorted(alphabet))}
    pairs = MERGES if merges else []
    for left, right in pairs:
        vocab.setdefault(left + right, len(vocab))
    backend = Tokenizer(models.BPE(vocab=vocab, merges=pairs, fuse_unk=False))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True, trim_offsets=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(spec["special"])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=spec["bos"],
        eos_token=spec["eos"],
        pad_token=spec["special"][0],
        clean_up_tokenization_spaces=False,
    )
    tokenizer.chat_template = chat_template(flavor) if template is None else (template or None)
    return tokenizer


def make_tiny_model(directory: str | Path, flavor: str = "chatml", template: str | None = None,
                    seed: int = 0, vocab_size: int | None = None, merges: bool = False, hidden_size: int = 16,
                    num_layers: int = 1) -> Path:
    """Write a tiny model directory (module docstring) and return its path.

    vocab_size: the model's embedding rows (default: the tokenizer's size); a smaller one makes a model whose
    tokenizer produces ids its weights do not have. merges: the tokenizer gets `MERGES` (spans across tokenizers).
    hidden_size, num_layers: a larger model scores slowly enough for a test to act while a run goes on."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(flavor, template, merges)
    config = LlamaConfig(
        vocab_size=vocab_size or len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=4096,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=None if vocab_size else tokenizer.pad_token_id, tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session", name="tiny_model_dir")
def tiny_model_dir_fixture(tmp_path_factory) -> Path:
    """A ChatML tiny model directory, usable as --target and --behavior."""
    return make_tiny_model(tmp_path_factory.mktemp("models") / "tiny-chatml", "chatml")


@pytest.fixture(scope="session", name="tiny_turns_model_dir")
def tiny_turns_model_dir_fixture(tmp_path_factory) -> Path:
    """A tiny model with another tokenizer (Gemma-style turn tokens): aligned to the chatml one by characters."""
    return make_tiny_model(tmp_path_factory.mktemp("models") / "tiny-turns", "turns", seed=1)


@pytest.fixture(scope="session", name="tiny_strict_model_dir")
def tiny_strict_model_dir_fixture(tmp_path_factory) -> Path:
    """A tiny ChatML model whose template raises on roles other than system/user/assistant."""
    return make_tiny_model(tmp_path_factory.mktemp("models") / "tiny-strict", "chatml", template=STRICT_ROLES_TEMPLATE)
