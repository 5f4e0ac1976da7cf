"""Cross-tokenizer alignment: behavior log-probs in the behavior's own tokens -> target tokens.

This module implements docs/design.md section 3.7 ("design 3.7").

When the behavior policy tokenizes the completion differently from the
target (a teacher from another model family, or log-probs recorded by an
API), per-token ratios are not defined token by token. Both tokenizations
cover the same completion *text*, so they are aligned by character offsets:

1. Each trained assistant turn's content string c (as written in the corpus,
   length L) is the common coordinate system. Every completion token of each
   policy gets a span [start, end) of c from its tokenizer's offset mapping
   (`return_offsets_mapping`, relative to where its template rendered the
   content). The turn's end marker (`<|im_end|>`, `<end_of_turn>`, EOS, ...)
   and anything else a template puts after the content becomes one virtual
   character [L, L + 1): "the turn ends here" under each policy.
2. A *cut* is the place between two consecutive tokens of one policy: the
   character interval [end of the left token, start of the right one]. It is
   a point when the offsets touch, an interval when the tokenizer leaves
   whitespace out of its offsets, and there is none when the tokens overlap
   (byte-level BPE and byte-fallback SentencePiece split one multi-byte
   character over several tokens that report the same character).
3. A *shared boundary* is a target cut that intersects a behavior cut. The
   matching walks both cut lists in order and pairs each target cut with the
   first behavior cut it touches, at most once each, so it is monotone and
   one-to-one. The turn's start and end always match. Between two shared
   boundaries lies a *span*: one or more target tokens and one or more
   behavior tokens spelling the same characters.
4. Output per row: `shared_boundary` (1 on the target token that closes a
   span) and, for every behavior completion token, the target position of
   its span's closing token, so that the behavior log-prob of the span text
   (the sum over its behavior tokens) lands on that target token. The weight
   engine turns that into an exact log-ratio per span (weights.py).

What is exact, and what is a rule (README, "Cross-tokenizer behavior"):
sequence weights and every suffix sum at a shared boundary are exact; blocks
are snapped to shared boundaries, so every block log-ratio is exact; inside a
span of several target tokens the span's ratio is charged to its last target
token. Characters that only one policy's template renders (whitespace a
template trims) count as probability one for the other policy. A completion
cut by `--max-length` truncation ends at the target's cut; the behavior token
that straddles it counts whole.

Coverage is checked, not assumed: every non-whitespace character of c must
lie in some completion token of each policy, offsets must be in order and
inside the text; otherwise `AlignmentError` names the policy, turn and
characters (a tokenizer whose offsets do not cover the text cannot be
aligned, and a silent misalignment would corrupt every weight).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .errors import RowError
from .tokenize import TokenizedRow, first_uncovered


class AlignmentError(RowError):
    """A policy's token offsets cannot be aligned to the completion text (the row is rejected)."""


@dataclass(frozen=True)
class TurnTokens:
    """One policy's completion tokens of one assistant turn, on the turn's content string.

    positions: int64 [n], index of each token in the policy's row (or in its recorded list)
    starts, ends: int64 [n], character span [start, end) in the content; the end
                  marker is [L, L + 1) with L = len(content)
    """

    positions: np.ndarray
    starts: np.ndarray
    ends: np.ndarray

    def __len__(self) -> int:
        return len(self.positions)


@dataclass
class AlignmentStats:
    """Counts for the manifest: how much of the completion text is aligned token for token."""

    rows: int = 0
    turns: int = 0
    spans: int = 0
    completion_chars: int = 0
    chars_in_one_token_spans: int = 0  # spans of exactly one target token: exact at token level too
    chars_in_multi_token_spans: int = 0  # spans of several target tokens: the span rule applies
    target_tokens_in_multi_token_spans: int = 0
    target_tokens: int = 0
    behavior_tokens: int = 0

    def add(self, other: AlignmentStats) -> None:
        for name in self.__dataclass_fields__:
            setattr(self, name, getattr(self, name) + getattr(other, name))

    def to_dict(self) -> dict:
        out = {name: getattr(self, name) for name in self.__dataclass_fields__}
        chars = max(self.completion_chars, 1)
        out["share_chars_in_one_token_spans"] = self.chars_in_one_token_spans / chars
        out["share_chars_in_multi_token_spans"] = self.chars_in_multi_token_spans / chars
        return out


@dataclass
class RowAlignment:
    """How one row's behavior tokens map onto its target tokens.

    shared_boundary: int8 [n_target], 1 on the target completion tokens that close a span
    behavior_target: int64 [n_behavior_completion], target row position whose span holds each
                     behavior completion token (in the order of `behavior_positions`), -1: dropped
                     (beyond a truncated target)
    behavior_positions: int64, the behavior row positions (or recorded indices) of those tokens
    """

    shared_boundary: np.ndarray
    behavior_target: np.ndarray
    behavior_positions: np.ndarray
    stats: AlignmentStats = field(default_factory=AlignmentStats)

    def behavior_logprobs(self, behavior: np.ndarray) -> np.ndarray:
        """float32 [n_target]: each span's behavior log-prob (sum over its tokens) on the span's closing token.

        behavior: the behavior log-probs indexed by `behavior_positions` (a behavior row, or a recorded list).
        """
        keep = self.behavior_target >= 0
        values = np.asarray(behavior, dtype=np.float64)[self.behavior_positions[keep]]
        sums = np.bincount(self.behavior_target[keep], weights=values, minlength=len(self.shared_boundary))
        return sums.astype(np.float32)


# --------------------------------------------------------------------------- token spans on the content


def turn_tokens(tokenized: TokenizedRow, contents: Sequence[str], who: str) -> list[TurnTokens]:
    """Per trained turn, the completion tokens of a tokenized row as spans of the turn's content.

    `contents` are the trained assistant turns' content strings (in order). A
    turn that truncation removed entirely has no tokens.
    """
    if len(tokenized.content_spans) != len(contents):
        raise AlignmentError(f"{who}: {len(tokenized.content_spans)} completion turns rendered, "
                             f"{len(contents)} assistant turns in the row")
    positions = np.flatnonzero(tokenized.completion_mask == 1)
    token_start = tokenized.offsets[positions, 0]
    token_end = tokenized.offsets[positions, 1]
    out = []
    for (span_start, span_end), (c_start, c_end, offset), content in zip(
        tokenized.completion_spans, tokenized.content_spans, contents
    ):
        L = len(content)
        inside = (token_start >= span_start) & (token_start < span_end)
        start, end = token_start[inside], token_end[inside]
        in_content = start < c_end
        # content tokens: shift to content coordinates; a token reaching past the content stops at its end
        starts = np.where(in_content, np.maximum(start, c_start) - c_start + offset, L)
        ends = np.maximum(np.where(in_content, np.minimum(end, c_end) - c_start + offset, L + 1), starts)
        out.append(TurnTokens(positions[inside], starts.astype(np.int64), ends.astype(np.int64)))
    return out


def _describe(value: Any) -> str:
    if value is None:
        return "null"
    text = repr(value)
    return f"a {type(value).__name__} ({text[:20]}{'...' if len(text) > 20 else ''})"


def number_list(value: Any, what: str, *, integers: bool = False) -> np.ndarray:
    """A flat list of numbers (JSON ints and floats) as float64, or of integers as int64 with `integers`.

    Anything else is a `RowError` naming `what` and the position: not a list, a nested list, a string,
    a bool, a null, a float where an integer is due, a number out of range (beyond float64, or int64).
    """
    kind = "integers" if integers else "numbers"
    if not isinstance(value, (list, tuple)):
        raise RowError(f"{what} must be a flat list of {kind}, got {_describe(value)}")
    allowed = {int} if integers else {int, float}
    if set(map(type, value)) <= allowed:
        try:
            return np.asarray(value, dtype=np.int64 if integers else np.float64)
        except OverflowError:
            pass
    for i, item in enumerate(value):
        if isinstance(item, (list, tuple, dict)):
            raise RowError(f"{what} must be a flat list of {kind}, got a nested list ({what}[{i}] is a "
                           f"{type(item).__name__})")
        if type(item) not in allowed:
            due = "an integer" if integers else "a number"
            shown = repr(item) if isinstance(item, float) else _describe(item)
            raise RowError(f"{what}[{i}] is {shown}: must be {due}")
        if integers and not -(2**63) <= item < 2**63:
            raise RowError(f"{what}[{i}] = {item} is out of range (beyond a 64-bit integer)")
        if not integers and isinstance(item, int):
            try:
                float(item)
            except OverflowError:
                raise RowError(f"{what}[{i}] = {str(item)[:20]}... is out of range (beyond a float)") from None
    raise AssertionError("unreachable")  # pragma: no cover


def recorded_turn_tokens(value: Any, content: str, name: str) -> tuple[TurnTokens, np.ndarray]:
    """Behavior tokens recorded with the data, `{tokens, logprobs}` or `{text_offsets, logprobs}`.

    tokens:       the token strings, in order; their concatenation spells the
                  content (leading whitespace may be missing), and any tokens
                  past its end (a stop token) are the end marker;
    text_offsets: the character offset of each token in the content (token i
                  spans [text_offsets[i], text_offsets[i + 1]), the last one to
                  the end; offsets at or past the end are the end marker).
    Returns the tokens and their log-probs (float64).
    """
    if not isinstance(value, dict) or "logprobs" not in value or not ({"tokens", "text_offsets"} & set(value)):
        raise RowError(f"{name!r} must be a dict with 'logprobs' and 'tokens' or 'text_offsets'")
    logprobs = number_list(value["logprobs"], f"{name!r}['logprobs']")
    L = len(content)
    if "tokens" in value:
        tokens = value["tokens"]
        if not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens):
            raise RowError(f"{name!r}['tokens'] must be a list of strings")
        lengths = np.array([len(t) for t in tokens], dtype=np.int64)
        starts = np.concatenate(([0], np.cumsum(lengths)[:-1])) if len(tokens) else np.zeros(0, np.int64)
        joined = "".join(tokens)
        lead = len(content) - len(content.lstrip())
        if joined[:L] != content:
            if not (lead and joined[: L - lead] == content[lead:]):
                first = next((i for i, (a, b) in enumerate(zip(joined, content)) if a != b), min(len(joined), L))
                raise RowError(f"{name!r}['tokens'] do not spell the completion text: they differ at character "
                               f"{first} ({joined[first:first + 12]!r} vs {content[first:first + 12]!r})")
            starts = starts + lead  # the recording left out the content's leading whitespace
        ends = starts + lengths
    else:
        starts = number_list(value["text_offsets"], f"{name!r}['text_offsets']", integers=True)
        if (len(starts) > 1 and np.any(np.diff(starts) < 0)) or (len(starts) and starts[0] < 0):
            raise RowError(f"{name!r}['text_offsets'] must be non-negative and non-decreasing")
        ends = np.append(starts[1:], max(L, int(starts[-1]) if len(starts) else L)) if len(starts) else starts
    if len(logprobs) != len(starts):
        raise RowError(f"{name!r} has {logprobs.size} logprobs for {len(starts)} tokens")
    # Past the content: the end marker (a recorded stop token).
    marker = starts >= L
    starts = np.where(marker, L, starts)
    ends = np.where(marker, L + 1, np.minimum(ends, L))
    return TurnTokens(np.arange(len(starts), dtype=np.int64), starts, ends), logprobs


# --------------------------------------------------------------------------- checks


def check_coverage(tokens: TurnTokens, content: str, who: str, turn: int, *, until: int | None = None) -> None:
    """Raise AlignmentError unless the offsets are ordered, inside the content, and cover every
    non-whitespace character of content[:until] (until: where a truncated target stops)."""
    L = len(content)
    starts, ends = tokens.starts, tokens.ends
    where = f"{who}, assistant turn {turn}"
    if len(starts) == 0:
        raise AlignmentError(f"{where}: no completion token")
    if np.any(starts < 0) or np.any(ends > L + 1) or np.any(ends < starts):
        bad = int(np.flatnonzero((starts < 0) | (ends > L + 1) | (ends < starts))[0])
        raise AlignmentError(f"{where}: token {bad} has offsets ({starts[bad]}, {ends[bad]}) outside the "
                             f"completion text of {L} characters")
    if np.any(np.diff(starts) < 0):
        bad = int(np.flatnonzero(np.diff(starts) < 0)[0]) + 1
        raise AlignmentError(f"{where}: token offsets go backwards at token {bad} "
                             f"({starts[bad - 1]} then {starts[bad]}); the offset mapping is unusable for alignment")
    limit = L if until is None else min(until, L)
    position = first_uncovered(content, starts, ends, 0, limit)
    if position is not None:
        end = position + 1
        while end < limit and end - position < 20 and first_uncovered(content, starts, ends, end, end + 1) == end:
            end += 1
        raise AlignmentError(
            f"{where}: the token offsets do not cover the completion text: characters {position}-{end} "
            f"({content[position:end]!r}) are in no token (the tokenizer's offset mapping cannot be used for "
            "alignment; use a fast tokenizer with exact offsets)"
        )


# --------------------------------------------------------------------------- matching


def _cuts(tokens: TurnTokens) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Interior cuts: (index i of the token after the cut, lo, hi) for every valid cut between tokens i-1 and i."""
    lo, hi = tokens.ends[:-1], tokens.starts[1:]
    valid = lo <= hi
    return np.flatnonzero(valid) + 1, lo[valid], hi[valid]


def match_cuts(target: TurnTokens, behavior: TurnTokens) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The shared boundaries of one turn: (target cut indices, behavior cut indices, character positions).

    A target cut [a, b] is paired with the first behavior cut [c, d] that it
    intersects (c <= b and d >= a), and each behavior cut with at most one
    target cut (the first), so the pairs are increasing on both sides.
    Interior cuts only: the turn's start and end are shared by definition.
    """
    ti, ta, tb = _cuts(target)
    bi, bc, bd = _cuts(behavior)
    if len(ti) == 0 or len(bi) == 0:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty, empty
    # bd (start of the token after each behavior cut) is non-decreasing: first behavior cut with d >= a
    j = np.searchsorted(bd, ta, side="left")
    hit = j < len(bi)
    hit[hit] &= bc[j[hit]] <= tb[hit]
    t_idx, b_pos = ti[hit], j[hit]
    b_pos, first = np.unique(b_pos, return_index=True)  # one target cut per behavior cut (the first)
    t_idx = t_idx[first]
    positions = np.maximum(ta[hit][first], bc[b_pos])
    return t_idx, bi[b_pos], positions


def align_turn(target: TurnTokens, behavior: TurnTokens, content: str) -> tuple[np.ndarray, np.ndarray, AlignmentStats]:
    """Align one turn. Returns (span_end int8 [n_t], behavior_span_close int64 [n_b], stats).

    span_end[i] = 1 on the target tokens that close a span; behavior_span_close[j]
    is the index (into `target`) of the target token closing behavior token j's
    span, or -1 for a behavior token past a truncated target's end.
    """
    L = len(content)
    truncated_at = int(target.ends[-1]) if target.ends[-1] <= L else None
    if truncated_at is not None:  # drop the behavior tokens that start past the kept target text
        keep = behavior.starts < max(truncated_at, 1)
        behavior_kept = TurnTokens(behavior.positions[keep], behavior.starts[keep], behavior.ends[keep])
    else:
        keep = np.ones(len(behavior), dtype=bool)
        behavior_kept = behavior
    n_t, n_b = len(target), len(behavior_kept)
    if n_b == 0:
        raise AlignmentError("no behavior token inside the kept completion text")
    t_cut, b_cut, cut_chars = match_cuts(target, behavior_kept)

    span_end = np.zeros(n_t, dtype=np.int8)
    closing = np.append(t_cut - 1, n_t - 1)  # target token closing each span
    span_end[closing] = 1
    span_of = np.searchsorted(b_cut, np.arange(n_b), side="right")  # span of each kept behavior token
    close = np.full(len(behavior), -1, dtype=np.int64)
    close[np.flatnonzero(keep)] = closing[span_of]

    end_char = L if truncated_at is None else truncated_at
    bounds = np.concatenate(([0], np.minimum(cut_chars, end_char), [end_char]))
    span_chars = np.diff(bounds)
    span_tokens = np.diff(np.concatenate(([0], t_cut, [n_t])))
    multi = span_tokens > 1
    stats = AlignmentStats(
        turns=1,
        spans=len(span_tokens),
        completion_chars=int(end_char),
        chars_in_one_token_spans=int(span_chars[~multi].sum()),
        chars_in_multi_token_spans=int(span_chars[multi].sum()),
        target_tokens_in_multi_token_spans=int(span_tokens[multi].sum()),
        target_tokens=n_t,
        behavior_tokens=n_b,
    )
    return span_end, close, stats


def align_row(
    target: TokenizedRow,
    behavior_turns: Sequence[TurnTokens],
    contents: Sequence[str],
    *,
    behavior_name: str = "behavior",
) -> RowAlignment:
    """Align a row's behavior tokens (one TurnTokens per trained turn) to its target tokenization."""
    target_turns = turn_tokens(target, contents, "target tokenizer")
    if len(behavior_turns) != len(target_turns):
        raise AlignmentError(f"{behavior_name} has {len(behavior_turns)} completion turns, the target "
                             f"{len(target_turns)}")
    shared = np.zeros(target.num_tokens, dtype=np.int8)
    closes, positions = [], []
    stats = AlignmentStats(rows=1)
    for turn, (t, b, content) in enumerate(zip(target_turns, behavior_turns, contents)):
        if len(t) == 0:  # removed by truncation: its behavior tokens do not count
            closes.append(np.full(len(b), -1, dtype=np.int64))
            positions.append(b.positions)
            continue
        until = int(t.ends[-1]) if t.ends[-1] <= len(content) else None
        check_coverage(t, content, "target tokenizer", turn, until=until)
        check_coverage(b, content, behavior_name, turn, until=until)
        span_end, close, turn_stats = align_turn(t, b, content)
        shared[t.positions] = span_end
        closes.append(np.where(close >= 0, t.positions[np.maximum(close, 0)], -1))
        positions.append(b.positions)
        stats.add(turn_stats)
    return RowAlignment(
        shared_boundary=shared,
        behavior_target=np.concatenate(closes) if closes else np.zeros(0, np.int64),
        behavior_positions=np.concatenate(positions) if positions else np.zeros(0, np.int64),
        stats=stats,
    )
