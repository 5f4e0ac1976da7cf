"""Where behavior log-probs come from: four sources behind one interface (docs/design.md 3.6, 3.7, 5).

    RecordedLogprobs     log-probs recorded with the data (--behavior-logprobs-field), on the target's
                         tokens, or in the behavior's own tokens aligned by character offsets
    TargetAtTemperature  the target model itself sampled at another temperature / top-p: the target's
                         forward pass gives both distributions (one pass)
    SameTokensModel      another model that renders every row into the target's exact tokens
    AlignedModel         a model on its own tokens and template, aligned by character offsets (align.py)

Every source does the same two steps:

    prepare(record, conversation, target) -> BehaviorRow     per row, CPU only; RowError rejects the row
    logprobs(rows, target_extra) -> [float32 [n_target]]     per batch: behavior log-probs on the target tokens

`target_extra` holds the log-probs of the source's `target_policies`, computed
in the target's own forward pass (TargetAtTemperature asks for one; the
others for none). `choose_behavior` picks the source once, from the flags and
the tokenizers, before any model is loaded.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .align import RowAlignment, TurnTokens, align_row, number_list, recorded_turn_tokens, turn_tokens
from .config import BehaviorSpec
from .corpus import Conversation, is_completion_turn
from .errors import RowError, UsageError
from .scoring import SamplingParams, Scorer
from .tokenize import ConversationTokenizer, TokenizeConfig, TokenizedRow, chat_template_hash


@dataclass
class BehaviorRow:
    """What a source prepared for one row (all None: the behavior scores the target's own tokens).

    tokens:    the row in the behavior's own tokens (AlignedModel)
    recorded:  recorded log-probs: on the target tokens (alignment None) or in the behavior's own tokens
    alignment: how the behavior's tokens map onto the target's (align.py); None: the same tokens
    """

    tokens: TokenizedRow | None = None
    recorded: np.ndarray | None = None
    alignment: RowAlignment | None = None


class BehaviorSource:
    """The interface of a behavior source (module docstring). `alignment` is "direct" or "char-offsets"."""

    alignment: str = "direct"
    target_policies: tuple[SamplingParams, ...] = ()
    reason: str = ""  # why `choose_behavior` picked this source (the manifest's `behavior.mode_reason`)

    def prepare(self, record: dict, conversation: Conversation, target: TokenizedRow) -> BehaviorRow:
        return BehaviorRow()

    def logprobs(self, targets: Sequence[TokenizedRow], rows: Sequence[BehaviorRow],
                 target_extra: Sequence[list[np.ndarray]]) -> list[np.ndarray]:
        raise NotImplementedError

    def describe(self) -> dict:
        """Manifest `behavior` entries beyond temperature and top-p."""
        return {}


def completion_contents(conversation: Conversation) -> list[str]:
    """The content strings of the trained assistant turns, in order (the text alignment works on)."""
    return [m["content"] for m in conversation if is_completion_turn(m)]


class RecordedLogprobs(BehaviorSource):
    """Behavior log-probs recorded with the data (`recorded_logprobs` says which shapes)."""

    def __init__(self, field: str) -> None:
        self.field = field

    def prepare(self, record: dict, conversation: Conversation, target: TokenizedRow) -> BehaviorRow:
        values, alignment = recorded_logprobs(record, self.field, target, completion_contents(conversation))
        return BehaviorRow(recorded=values, alignment=alignment)

    def logprobs(self, targets, rows, target_extra):
        return [r.recorded if r.alignment is None else r.alignment.behavior_logprobs(r.recorded) for r in rows]

    def describe(self) -> dict:
        return {"recorded_field": self.field}


class TargetAtTemperature(BehaviorSource):
    """The target model itself, sampled at another temperature / top-p: read off the target's forward pass."""

    def __init__(self, sampling: SamplingParams) -> None:
        self.target_policies = (sampling,)

    def logprobs(self, targets, rows, target_extra):
        return target_extra[0]


class SameTokensModel(BehaviorSource):
    """Another model whose tokenizer and template render every row into the target's exact tokens."""

    def __init__(self, scorer: Scorer, sampling: SamplingParams) -> None:
        self.scorer = scorer
        self.sampling = sampling

    def logprobs(self, targets, rows, target_extra):
        (values,) = self.scorer.score([t.input_ids for t in targets], [t.completion_mask for t in targets],
                                      [self.sampling])
        return values


class AlignedModel(BehaviorSource):
    """A model scored on its own tokens and template, aligned to the target's by character offsets."""

    alignment = "char-offsets"

    def __init__(self, tokenizer: ConversationTokenizer, scorer: Scorer, sampling: SamplingParams) -> None:
        self.tokenizer = tokenizer
        self.scorer = scorer
        self.sampling = sampling

    def prepare(self, record: dict, conversation: Conversation, target: TokenizedRow) -> BehaviorRow:
        return behavior_tokens(self.tokenizer, conversation, target)

    def logprobs(self, targets, rows, target_extra):
        (own,) = self.scorer.score([r.tokens.input_ids for r in rows], [r.tokens.completion_mask for r in rows],
                                   [self.sampling])
        return [r.alignment.behavior_logprobs(values) for r, values in zip(rows, own)]

    def describe(self) -> dict:
        from .models import tokenizer_fingerprint

        return {"template": self.tokenizer.mode,
                "tokenizer": {"fingerprint": tokenizer_fingerprint(self.tokenizer.tokenizer),
                              "chat_template_hash": chat_template_hash(self.tokenizer.tokenizer)}}


def behavior_tokens(tokenizer: ConversationTokenizer, conversation: Conversation,
                    target: TokenizedRow) -> BehaviorRow:
    """The row in the behavior's own tokens, and their alignment onto the target's (align.py)."""
    tokens = tokenizer(conversation)
    contents = completion_contents(conversation)
    turns = turn_tokens(tokens, contents, "behavior tokenizer")
    return BehaviorRow(tokens=tokens, alignment=align_row(target, turns, contents, behavior_name="behavior tokenizer"))


def recorded_logprobs(
    record: dict, name: str, tokenized: TokenizedRow, contents: list[str]
) -> tuple[np.ndarray, RowAlignment | None]:
    """Behavior log-probs supplied with the data: (log-probs, alignment).

    The field holds one log-prob per completion token of the *target*
    tokenization (in order), or one per token of the whole row (index i ->
    input_ids[i], values at prompt positions are ignored): returned placed on
    the target positions, alignment None. Or, in the behavior's own tokens,
    `{tokens, logprobs}` / `{text_offsets, logprobs}` (a list of them for
    several trained assistant turns): returned as recorded, with the
    character alignment onto the target tokens (align.py).
    """
    if name not in record or record[name] is None:
        raise RowError(f"missing field {name!r} (--behavior-logprobs-field)")
    value = record[name]
    if isinstance(value, dict) or (isinstance(value, list) and value and isinstance(value[0], dict)):
        turns = [value] if isinstance(value, dict) else value
        if len(turns) != len(contents):
            raise RowError(f"{name!r} holds {len(turns)} recorded turns for {len(contents)} trained assistant turns")
        tokens, logprobs, start = [], [], 0
        for turn, content in zip(turns, contents):
            recorded, values = recorded_turn_tokens(turn, content, name)
            tokens.append(TurnTokens(recorded.positions + start, recorded.starts, recorded.ends))
            logprobs.append(values)
            start += len(values)
        alignment = align_row(tokenized, tokens, contents, behavior_name=f"recorded {name!r}")
        return np.concatenate(logprobs), alignment
    values = number_list(value, repr(name))
    mask = tokenized.completion_mask == 1
    out = np.zeros(tokenized.num_tokens, dtype=np.float32)
    if len(values) == int(mask.sum()) + tokenized.truncated_completion_tokens:
        out[mask] = values[: int(mask.sum())]  # truncation cut completion tokens from the right
    elif len(values) == tokenized.num_tokens:
        out[mask] = values[mask]
    else:
        raise RowError(f"{name!r} has {values.size} log-probs but the completion has {int(mask.sum())} "
                       f"target tokens (and the row {tokenized.num_tokens})")
    return out, None


def rendering_differences(target: ConversationTokenizer, behavior: ConversationTokenizer) -> list[str]:
    """What makes the behavior render a row into other tokens than the target, [] when nothing does: the
    tokenizer (vocabulary, merges, normalizer, added tokens: its fingerprint), its special tokens (bos, eos,
    pad, ...), its chat template, and the template mode (chat or raw)."""
    from .models import tokenizer_fingerprint

    differences = []
    if behavior.tokenizer is not target.tokenizer:
        ours, theirs = behavior.tokenizer, target.tokenizer
        if dict(ours.special_tokens_map) != dict(theirs.special_tokens_map):
            differences.append("special tokens")
        elif tokenizer_fingerprint(ours) != tokenizer_fingerprint(theirs):
            differences.append("vocabulary or tokenizer settings")
        if chat_template_hash(ours) != chat_template_hash(theirs):
            differences.append("chat template")
    if behavior.mode != target.mode:
        differences.append(f"template mode ({behavior.mode}, the target's {target.mode})")
    return differences


# A row the probe aligns at start-up: digits, GSM8K markup, accents, an emoji, tabs and runs of spaces.
PROBE = [
    {"role": "user", "content": "Natalia sold clips to 48 of her friends in April. How many?"},
    {"role": "assistant",
     "content": "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n\n  Héllo wörld 😀\t\tx  ok\n#### 72"},
]


def choose_behavior(
    spec: BehaviorSpec,
    target: ConversationTokenizer,
    *,
    behavior_tokenizer: Callable[[], Any] | None,
    load_scorer: Callable[[], Scorer],
    behavior_name: str,
    same_weights: bool = False,
) -> BehaviorSource:
    """The behavior source for these flags, decided once (docs/design.md section 5, "Behavior policy"); its
    `reason` says why (the manifest's `behavior.mode_reason`).

    A recorded field -> RecordedLogprobs. Otherwise a model: `behavior_tokenizer()` loads its HF tokenizer
    (None: the behavior is the target model itself, named as the target is) and `load_scorer()` its scorer.
    The behavior *is* the target only when it has the target's weights (`same_weights`; always so without
    `behavior_tokenizer`) and renders every row into the target's exact tokens (the same tokenizer, special
    tokens, chat template and template mode: `rendering_differences`): then, unless
    `--alignment char-offsets`, TargetAtTemperature (one forward pass). Another model that renders the
    target's tokens -> SameTokensModel. Anything else is scored on its own tokens and template: AlignedModel,
    whose tokenizer is first probed on one row so that unusable offsets stop the run (UsageError) before its
    model loads.
    """
    if spec.logprobs_field is not None:
        return _because(RecordedLogprobs(spec.logprobs_field), f"recorded with the data ({spec.logprobs_field})")
    same_model = behavior_tokenizer is None
    hf_tokenizer = target.tokenizer if same_model else behavior_tokenizer()
    try:
        tokenizer = ConversationTokenizer(hf_tokenizer, TokenizeConfig(template=spec.template),
                                          name="behavior tokenizer")
    except ValueError as exc:
        raise UsageError(f"--behavior {behavior_name}: {exc} (--behavior-template)") from None
    differences = rendering_differences(target, tokenizer)
    if spec.alignment == "direct" and differences:
        raise UsageError(f"--alignment direct: --behavior {behavior_name} does not render rows into the target's "
                         f"tokens ({', '.join(differences)} differ); use --alignment auto or char-offsets")
    weights = "same weights as the target" if same_model or same_weights else "other weights than the target"
    if not differences and spec.alignment != "char-offsets":
        if same_model or same_weights:
            return _because(TargetAtTemperature(spec.sampling), "same weights and tokenizer as the target")
        return _because(SameTokensModel(load_scorer(), spec.sampling), f"{weights}, same tokenizer and template")
    whole = ConversationTokenizer(target.tokenizer, dataclasses.replace(target.config, max_length=None))
    try:
        behavior_tokens(tokenizer, PROBE, whole(PROBE))
    except RowError as exc:
        raise UsageError(f"--behavior {behavior_name}: cannot align its tokens to the target's by character "
                         f"offsets: {exc.reason}") from None
    reason = f"differs from the target in: {', '.join(differences)}" if differences else "--alignment char-offsets"
    return _because(AlignedModel(tokenizer, load_scorer(), spec.sampling), f"{weights}; {reason}")


def _because(source: BehaviorSource, reason: str) -> BehaviorSource:
    source.reason = reason
    return source
