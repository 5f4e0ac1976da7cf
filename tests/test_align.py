"""Cross-tokenizer alignment (pear_data/align.py) on the real SmolLM2 (byte-level BPE, ChatML) and
Gemma-3 (SentencePiece BPE with byte fallback, raw template) tokenizers.

The invariant checked everywhere: between two shared boundaries, the target
tokens and the behavior tokens spell the same characters, so a span's
log-prob sums are comparable, and every behavior token lands in exactly one
span (nothing lost, nothing counted twice).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pear_data.align import (
    AlignmentError,
    TurnTokens,
    align_row,
    align_turn,
    check_coverage,
    recorded_turn_tokens,
    turn_tokens,
)
from pear_data.errors import RowError
from pear_data.tokenize import ConversationTokenizer, TokenizeConfig, locate_content

GSM8K_ANSWER = (
    "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
    "Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n#### 72"
)
TRICKY = [
    GSM8K_ANSWER,
    "Héllo wörld 😀 naïve café — 中文字符 ok",
    "  leading and trailing  \n\n",
    "tabs\t\tand    runs     of spaces\n\n\n\nnewlines",
    "$1,234.56 + 7% = <<1234.56*1.07=1320.9792>>1320.98\n#### 1320.98",
    "x",
    "🙂🙂🙂 emoji run",
    "a\u00a0b\u2009c (non-breaking and thin spaces)",
]


def conversation(answer: str, question: str = "How many clips did Natalia sell?") -> list[dict]:
    return [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]


@pytest.fixture(scope="module")
def target(smollm2_tokenizer: Any) -> ConversationTokenizer:
    return ConversationTokenizer(smollm2_tokenizer)


@pytest.fixture(scope="module")
def behavior(gemma_tokenizer: Any) -> ConversationTokenizer:
    return ConversationTokenizer(gemma_tokenizer, TokenizeConfig(template="raw"))


def aligned(target: ConversationTokenizer, behavior: ConversationTokenizer, conv: list[dict], **config):
    t_row = target(conv) if not config else ConversationTokenizer(target.tokenizer, TokenizeConfig(**config))(conv)
    b_row = behavior(conv)
    contents = [m["content"] for m in conv if m["role"] == "assistant"]
    return t_row, b_row, align_row(t_row, turn_tokens(b_row, contents, "behavior"), contents)


def assert_same_texts(texts: list[tuple[str, str]]) -> None:
    """Span by span the two sides spell the same text; only leading whitespace of a turn may differ, when
    one template's header token swallowed it (it is then prompt for that policy, design 3.7)."""
    for i, (t_text, b_text) in enumerate(texts):
        if i == 0:
            assert t_text.lstrip() == b_text.lstrip(), (t_text, b_text)
        else:
            assert t_text == b_text, (i, t_text, b_text)


def span_texts(t_row, b_row, alignment, t_tok, b_tok) -> list[tuple[str, str]]:
    """Per span (except end markers): the decoded target tokens and the decoded behavior tokens."""
    t_pos = np.flatnonzero(t_row.completion_mask == 1)
    out, start = [], 0
    for k, p in enumerate(t_pos):
        if not alignment.shared_boundary[p]:
            continue
        t_ids = t_row.input_ids[t_pos[start : k + 1]].tolist()
        b_ids = b_row.input_ids[alignment.behavior_positions[alignment.behavior_target == p]].tolist()
        start = k + 1
        if t_ids[-1] in t_tok.all_special_ids or b_ids[-1] in b_tok.all_special_ids:
            continue  # the end-marker span: "<|im_end|>" vs "<eos>"
        decode = dict(skip_special_tokens=False, clean_up_tokenization_spaces=False)
        out.append((t_tok.decode(t_ids, **decode), b_tok.decode(b_ids, **decode)))
    return out


def check_invariants(t_row, b_row, alignment) -> None:
    mask = t_row.completion_mask == 1
    shared = alignment.shared_boundary
    assert set(np.unique(shared)) <= {0, 1}
    assert not shared[~mask].any(), "a span end on a prompt token"
    assert shared[np.flatnonzero(mask)[-1]] == 1, "the last completion token must close a span"
    b_completion = np.flatnonzero(b_row.completion_mask == 1)
    assert sorted(alignment.behavior_positions.tolist()) == b_completion.tolist(), "every behavior token once"
    kept = alignment.behavior_target[alignment.behavior_target >= 0]
    assert np.all(shared[kept] == 1), "behavior tokens land on span ends only"
    assert np.all(np.diff(kept) >= 0), "the mapping is monotone"
    assert set(kept.tolist()) == set(np.flatnonzero(shared).tolist()), "every span has behavior tokens"
    values = np.linspace(-3.0, -0.1, len(b_row.input_ids))
    expected = values[alignment.behavior_positions[alignment.behavior_target >= 0]].sum()
    assert alignment.behavior_logprobs(values).sum() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("answer", TRICKY)
def test_spans_spell_the_same_text_under_both_tokenizers(target, behavior, answer) -> None:
    t_row, b_row, alignment = aligned(target, behavior, conversation(answer))
    check_invariants(t_row, b_row, alignment)
    texts = span_texts(t_row, b_row, alignment, target.tokenizer, behavior.tokenizer)
    assert_same_texts(texts)
    assert "".join(b for _, b in texts).strip() == answer.strip()
    stats = alignment.stats
    assert stats.chars_in_one_token_spans + stats.chars_in_multi_token_spans == stats.completion_chars == len(answer)


def test_gsm8k_calculator_annotations_align_digit_by_digit(target, behavior) -> None:
    """Both tokenizers split digits one by one, so GSM8K's `<<48/2=24>>` is almost all one-token spans."""
    t_row, b_row, alignment = aligned(target, behavior, conversation(GSM8K_ANSWER))
    texts = span_texts(t_row, b_row, alignment, target.tokenizer, behavior.tokenizer)
    assert ("4", "4") in texts and (">>", ">>") in texts
    assert alignment.stats.chars_in_one_token_spans / alignment.stats.completion_chars > 0.9


TEXT = (
    st.lists(
        st.sampled_from(
            [
                "a",
                "Z",
                "7",
                "42",
                " ",
                "  ",
                "\n",
                "\n\n",
                "\t",
                "é",
                "ö",
                "😀",
                "中",
                "<<",
                ">>",
                "=",
                "/",
                "####",
                "the",
                " cat",
                "ing",
                ".",
                ",",
                "$",
                "\u00a0",
            ]
        ),
        min_size=1,
        max_size=40,
    )
    .map("".join)
    .filter(lambda s: s.strip() != "")
)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture]
)
@given(answer=TEXT)
def test_alignment_invariants_on_random_text(target, behavior, answer) -> None:
    t_row, b_row, alignment = aligned(target, behavior, conversation(answer))
    check_invariants(t_row, b_row, alignment)
    assert_same_texts(span_texts(t_row, b_row, alignment, target.tokenizer, behavior.tokenizer))


def test_same_tokenizer_and_template_gives_one_token_per_span(target) -> None:
    t_row, b_row, alignment = aligned(target, target, conversation(GSM8K_ANSWER))
    mask = t_row.completion_mask == 1
    assert np.array_equal(alignment.shared_boundary.astype(bool), mask)
    assert np.array_equal(alignment.behavior_target, alignment.behavior_positions)
    assert alignment.stats.chars_in_multi_token_spans == 0


def test_multi_turn_rows_align_turn_by_turn(target, behavior) -> None:
    conv = [
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "2+2 = <<2+2=4>>4"},
        {"role": "user", "content": "And 😀 times 3?"},
        {"role": "assistant", "content": "Héllo: 4*3 = 12\n#### 12"},
    ]
    t_row, b_row, alignment = aligned(target, behavior, conv)
    check_invariants(t_row, b_row, alignment)
    assert alignment.stats.turns == 2
    # each turn's end marker closes a span of its own: spans never cross turns
    im_end = target.tokenizer.convert_tokens_to_ids("<|im_end|>")
    ends = np.flatnonzero((t_row.input_ids == im_end) & (t_row.completion_mask == 1))
    assert len(ends) == 2 and np.all(alignment.shared_boundary[ends] == 1)
    assert np.all(alignment.shared_boundary[ends - 1] == 1)


def test_truncated_target_drops_the_behavior_tokens_past_its_end(target, behavior) -> None:
    conv = conversation(GSM8K_ANSWER)
    full = target(conv)
    first = int(np.argmax(full.completion_mask))
    t_row, b_row, alignment = aligned(target, behavior, conv, max_length=first + 10)
    assert t_row.truncated_completion_tokens > 0
    check_invariants(t_row, b_row, alignment)
    assert (alignment.behavior_target == -1).any()
    kept_chars = alignment.stats.completion_chars
    assert 0 < kept_chars < len(GSM8K_ANSWER)


class BrokenOffsets:
    """A fast tokenizer whose offset mapping points every token at character 0 (unusable for alignment)."""

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer

    def __getattr__(self, name: str) -> Any:
        return getattr(self._tokenizer, name)

    def __call__(self, text: str, **kwargs: Any) -> dict:
        encoding = self._tokenizer(text, **kwargs)
        if "offset_mapping" in encoding:
            encoding["offset_mapping"] = [(0, 0) for _ in encoding["offset_mapping"]]
        return encoding


def test_offsets_that_do_not_cover_the_text_are_a_clear_error(target, behavior) -> None:
    broken = ConversationTokenizer(BrokenOffsets(behavior.tokenizer), TokenizeConfig(template="raw"))
    with pytest.raises(RowError, match=r"offset mapping does not cover the completion text: character \d+ \('Natalia"):
        broken(conversation(GSM8K_ANSWER))


def test_behavior_offsets_shifted_off_the_content_are_caught(target, behavior) -> None:
    """Offsets that cover the rendered text but not where the content is: alignment refuses, naming the characters."""
    conv = conversation(GSM8K_ANSWER)
    b_row = behavior(conv)
    contents = [GSM8K_ANSWER]
    (turn,) = turn_tokens(b_row, contents, "behavior tokenizer")
    L = len(GSM8K_ANSWER)
    shifted = TurnTokens(turn.positions, np.minimum(turn.starts + 5, L), np.minimum(turn.ends + 5, L + 1))
    with pytest.raises(AlignmentError, match=r"behavior tokenizer, assistant turn 0: .*characters 0-5 \('Natal'\)"):
        align_row(target(conv), [shifted], contents, behavior_name="behavior tokenizer")


def test_coverage_check_names_turn_and_characters() -> None:
    tokens = TurnTokens(np.arange(2), np.array([0, 6]), np.array([3, 9]))
    with pytest.raises(AlignmentError, match=r"behavior, assistant turn 0.*characters 4-6 \('de'"):
        check_coverage(tokens, "abc de fgh", "behavior", 0)
    check_coverage(TurnTokens(np.arange(2), np.array([0, 4]), np.array([3, 11])), "abc defghij", "b", 0)


def test_coverage_check_rejects_backwards_offsets() -> None:
    tokens = TurnTokens(np.arange(2), np.array([4, 0]), np.array([8, 4]))
    with pytest.raises(AlignmentError, match="go backwards"):
        check_coverage(tokens, "abcdefgh", "target tokenizer", 1)


def test_overlapping_tokens_of_one_character_have_no_cut_between_them() -> None:
    """Byte-level BPE splits '😀' into two tokens that both report (1, 2): no boundary inside the character."""
    content = "a😀b"
    target = TurnTokens(np.arange(5), np.array([0, 1, 1, 2, 3]), np.array([1, 2, 2, 3, 4]))  # a, 😀(2), b, marker
    behavior = TurnTokens(np.arange(4), np.array([0, 1, 2, 3]), np.array([1, 2, 3, 4]))
    span_end, close, stats = align_turn(target, behavior, content)
    assert span_end.tolist() == [1, 0, 1, 1, 1]
    assert close.tolist() == [0, 2, 3, 4]
    assert stats.chars_in_multi_token_spans == 1 and stats.target_tokens_in_multi_token_spans == 2


def test_whitespace_left_out_of_offsets_still_matches() -> None:
    """One tokenizer leaves the space out of its offsets ('▁word' reported as the word only)."""
    content = "ab cd"
    target = TurnTokens(np.arange(3), np.array([0, 2, 5]), np.array([2, 5, 6]))  # 'ab', ' cd', marker
    behavior = TurnTokens(np.arange(3), np.array([0, 3, 5]), np.array([2, 5, 6]))  # 'ab', 'cd' (gap), marker
    span_end, close, _ = align_turn(target, behavior, content)
    assert span_end.tolist() == [1, 1, 1] and close.tolist() == [0, 1, 2]


def test_recorded_tokens_spell_the_content() -> None:
    tokens, logprobs = recorded_turn_tokens(
        {"tokens": ["Nat", "alia", " sold", "<|eot|>"], "logprobs": [-1.0, -0.5, -0.25, -0.1]}, "Natalia sold", "lp"
    )
    assert tokens.starts.tolist() == [0, 3, 7, 12] and tokens.ends.tolist() == [3, 7, 12, 13]
    assert logprobs.tolist() == [-1.0, -0.5, -0.25, -0.1]


def test_recorded_tokens_with_or_without_the_leading_whitespace() -> None:
    with_space, _ = recorded_turn_tokens({"tokens": ["  Na", "t"], "logprobs": [-1.0, -0.5]}, "  Nat", "lp")
    assert with_space.starts.tolist() == [0, 4] and with_space.ends.tolist() == [4, 5]
    without, _ = recorded_turn_tokens({"tokens": ["Na", "t"], "logprobs": [-1.0, -0.5]}, "  Nat", "lp")
    assert without.starts.tolist() == [2, 4] and without.ends.tolist() == [4, 5]


def test_recorded_tokens_that_do_not_spell_the_content_are_a_reject() -> None:
    with pytest.raises(RowError, match="differ at character 3"):
        recorded_turn_tokens({"tokens": ["Nat", "ilia"], "logprobs": [-1.0, -0.5]}, "Natalia", "lp")
    with pytest.raises(RowError, match="2 logprobs for 3 tokens"):
        recorded_turn_tokens({"tokens": ["N", "a", "t"], "logprobs": [-1.0, -0.5]}, "Nat", "lp")
    with pytest.raises(RowError, match="'tokens' or 'text_offsets'"):
        recorded_turn_tokens({"logprobs": [-1.0]}, "Nat", "lp")


def test_recorded_text_offsets() -> None:
    tokens, _ = recorded_turn_tokens(
        {"text_offsets": [0, 3, 7, 12], "logprobs": [-1, -1, -1, -1]}, "Natalia sold", "lp"
    )
    assert tokens.starts.tolist() == [0, 3, 7, 12] and tokens.ends.tolist() == [3, 7, 12, 13]
    with pytest.raises(RowError, match="non-decreasing"):
        recorded_turn_tokens({"text_offsets": [0, 5, 3], "logprobs": [-1, -1, -1]}, "Natalia", "lp")


def test_locate_content_finds_trimmed_content() -> None:
    text = "<s>user: q</s><s>assistant: the answer</s>"
    start = text.index("the")
    assert locate_content(text, start, len(text), "  the answer \n") == (start, start + 10, 2)
    assert locate_content(text, start, len(text), "the answer") == (start, start + 10, 0)
    with pytest.raises(RowError, match="alters the assistant content"):
        locate_content(text, start, len(text), "another answer")


def _policies(monkeypatch, **behavior):
    """Load pear_data.policies.Policies for SmolLM2 <- Gemma; fails before any model is loaded."""
    from pear_data import models
    from pear_data.config import BehaviorSpec, ScoreOptions, ScoringConfig
    from pear_data.corpus import RowShape
    from pear_data.policies import ModelSources, PolicyRecipe

    options = ScoreOptions(behavior=BehaviorSpec(**behavior), scoring=ScoringConfig(device="cpu"))
    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("no model may load before the checks"))
    recipe = PolicyRecipe(ModelSources.resolve(options.target, options.behavior), RowShape("messages"), None,
                          options.scoring, options.tokenize, options.behavior)
    return recipe.load()


def test_unusable_behavior_offsets_stop_the_run_before_scoring(monkeypatch, gemma_source) -> None:
    from pear_data import models
    from pear_data.errors import UsageError

    real = models.load_tokenizer
    monkeypatch.setattr(
        models,
        "load_tokenizer",
        lambda source, **k: BrokenOffsets(real(source, **k)) if source.spec == "gemma-3-270m" else real(source, **k),
    )
    with pytest.raises(UsageError, match=r"--behavior gemma-3-270m: .*offset mapping does not cover"):
        _policies(monkeypatch, model="gemma-3-270m")


def test_direct_alignment_with_another_tokenizer_is_a_usage_error(monkeypatch, gemma_source) -> None:
    from pear_data.errors import UsageError

    with pytest.raises(UsageError, match="--alignment direct"):
        _policies(monkeypatch, model="gemma-3-270m", alignment="direct")
    with pytest.raises(UsageError, match="no chat template"):
        _policies(monkeypatch, model="gemma-3-270m", template="chat")


def test_same_tokenizer_with_another_template_aligns_by_characters(target, smollm2_tokenizer) -> None:
    """SmolLM2 rendering raw text against SmolLM2's chat template: the same tokenizer, different contexts;
    the content tokenizes alike, so nearly every span is one target token."""
    raw = ConversationTokenizer(smollm2_tokenizer, TokenizeConfig(template="raw"))
    t_row, b_row, alignment = aligned(target, raw, conversation(GSM8K_ANSWER))
    check_invariants(t_row, b_row, alignment)
    assert_same_texts(span_texts(t_row, b_row, alignment, target.tokenizer, raw.tokenizer))
    assert alignment.stats.chars_in_multi_token_spans == 0


def test_alignment_mode_follows_the_tokens_the_behavior_renders(target, behavior, smollm2_tokenizer) -> None:
    """auto: direct only when the behavior renders the target's exact tokens; the behavior's own template counts
    even when it is the target model (SmolLM2 rendering raw text is aligned by characters)."""
    from pear_data.behavior import (
        AlignedModel,
        BehaviorSpec,
        SameTokensModel,
        TargetAtTemperature,
        choose_behavior,
        rendering_differences,
    )
    from pear_data.errors import UsageError

    same = ConversationTokenizer(smollm2_tokenizer)
    raw = ConversationTokenizer(smollm2_tokenizer, TokenizeConfig(template="raw"))
    assert rendering_differences(target, same) == []
    assert rendering_differences(target, raw) == ["template mode (raw, the target's chat)"]
    assert rendering_differences(target, behavior)

    def choose(tokenizer, **spec):
        """tokenizer None: the behavior is the target model itself."""
        return choose_behavior(
            BehaviorSpec(**spec),
            target,
            load_scorer=lambda: "scorer",
            behavior_name="x",
            behavior_tokenizer=None if tokenizer is None else (lambda: tokenizer),
        )

    assert type(choose(None, temperature=0.7)) is TargetAtTemperature
    assert type(choose(None, alignment="char-offsets")) is AlignedModel
    assert type(choose(None, template="raw")) is AlignedModel
    assert type(choose(smollm2_tokenizer)) is SameTokensModel
    assert type(choose(behavior.tokenizer)) is AlignedModel
    for tokenizer, spec in ((None, {"template": "raw"}), (behavior.tokenizer, {})):
        with pytest.raises(UsageError, match="--alignment direct"):
            choose(tokenizer, alignment="direct", **spec)
