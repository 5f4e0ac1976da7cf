"""Tokenize a normalized conversation with the target tokenizer (docs/design.md section 2).

Output per row (`TokenizedRow`):

    input_ids        int32 [n]     target-tokenizer tokens, chat template applied
    completion_mask  int8  [n]     1 on completion tokens, else 0; completion_mask[0] == 0
    offsets          int64 [n, 2]  character span text[start:end] of each token
    text             str           the rendered conversation the tokens come from

How the mask is built (one technique for every template, no per-model code):

1. Render the conversation to text. Chat mode: the tokenizer's chat template
   (`apply_chat_template(..., tokenize=False)`). Raw mode (base models with no
   chat template, e.g. Gemma-3-270M base): see `render_raw`.
2. Find the character span of every completion turn (each trained `assistant`
   turn): it starts where the turn's content starts and ends after the turn's
   end marker. Chat mode learns both ends from the template itself, by
   rendering prefixes: the content starts at
   `len(render(messages[:i], add_generation_prompt=True))` (everything before
   is the role header, `<|im_start|>assistant\\n` for ChatML), and the turn
   ends at `len(render(messages[:i + 1]).rstrip())`. The end marker is in
   (`<|im_end|>` for ChatML, `<end_of_turn>` for Gemma, `<|eot_id|>` for
   Llama-3): the model must learn to stop. Whitespace the template puts after
   the end marker (ChatML's "\\n") is *not* completion: generation stops at the
   end token, so the policy never emits it.
3. Tokenize the rendered text once, `add_special_tokens=False` (the template
   already holds BOS where the model wants one) with
   `return_offsets_mapping=True`, and mark a token as completion when its
   first character lies inside a completion span. A token that straddles the
   start of a span (begins in the header) stays prompt.

Rows the tokenizer cannot take are rejects (`RowError`), never errors of the
run: a chat template that raises on the row (unknown or `tool` roles, roles
that do not alternate; its message is the reason), and a message whose text
spells one of the tokenizer's special tokens (`<|im_end|>` in content would
become the control token itself and forge a turn boundary).

The rendered text and the per-token offsets stay on the result, so that a
behavior model with another tokenizer can be aligned by character offsets of
the completion text (`completion_spans`).

`max_length` overflow (`TokenizeConfig.on_overflow`):

- "truncate": the one truncation rule (`pear_data.truncation`, design 2.6):
  keep the first `max_length` tokens. A row left with no completion token
  (the prompt alone fills `max_length`) is a reject.
  `truncated_prompt_tokens` / `truncated_completion_tokens` count the dropped
  tokens with mask 0 / 1.
- "skip": `RowError("over max length: 2310 tokens > 2048")` (the row is rejected).
- "error": `OverflowAbort` (the CLI stops with exit code 2).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from pear_data.config import ON_OVERFLOW, OnOverflow, TokenizeConfig  # noqa: F401 - re-exported
from pear_data.corpus import Conversation, is_completion_turn
from pear_data.errors import OverflowAbort, RowError, UsageError

try:  # chat templates are Jinja (transformers needs jinja2); without it there is no template to fail
    from jinja2 import TemplateError, TemplateSyntaxError
except ImportError:  # pragma: no cover

    class TemplateError(Exception):  # type: ignore[no-redef]
        pass

    class TemplateSyntaxError(TemplateError):  # type: ignore[no-redef]
        pass

TemplateMode = Literal["chat", "raw"]


@dataclass(frozen=True)
class RenderedConversation:
    """A conversation rendered to text, with the character spans of its completion turns.

    completion_spans: sorted, disjoint [start, end) spans of `text`, one per
    trained assistant turn: the content plus the turn's end marker.
    content_spans: per trained turn, (start, end, offset): the part of `text`
    that is the message content as written, text[start:end] ==
    content[offset:offset + end - start] (a template may trim whitespace);
    cross-tokenizer alignment works on these characters (align.py).
    """

    text: str
    completion_spans: tuple[tuple[int, int], ...]
    mode: TemplateMode
    content_spans: tuple[tuple[int, int, int], ...] = ()


@dataclass(frozen=True, eq=False)
class TokenizedRow:
    """One tokenized row; index i of every array refers to token input_ids[i].

    input_ids:        int32 [n]
    completion_mask:  int8 [n], 1 on completion tokens; completion_mask[0] == 0
    offsets:          int64 [n, 2], token i is text[offsets[i, 0]:offsets[i, 1]]
    text:             the full rendered conversation (before any truncation; offsets index into it)
    completion_spans: character spans of the completion turns in `text`
    content_spans:    per completion turn, (start, end, offset) of the message content in `text`
                      (see RenderedConversation)
    truncated_prompt_tokens / truncated_completion_tokens: tokens dropped by
                      truncation with mask 0 / mask 1
    """

    input_ids: np.ndarray
    completion_mask: np.ndarray
    offsets: np.ndarray
    text: str
    completion_spans: tuple[tuple[int, int], ...]
    mode: TemplateMode
    truncated_prompt_tokens: int = 0
    truncated_completion_tokens: int = 0
    content_spans: tuple[tuple[int, int, int], ...] = ()

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def num_completion_tokens(self) -> int:
        return int(self.completion_mask.sum())


def template_mode(tokenizer: Any) -> TemplateMode:
    """"chat" when the tokenizer has a chat template, else "raw" (plain concatenation)."""
    return "chat" if getattr(tokenizer, "chat_template", None) else "raw"


def chat_template_hash(tokenizer: Any) -> str | None:
    """sha256 of the tokenizer's chat template (for the manifest); None without one."""
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        return None
    if not isinstance(template, str):  # a dict of named templates
        template = "\n".join(f"{k}\n{v}" for k, v in sorted(dict(template).items()))
    return "sha256:" + hashlib.sha256(template.encode()).hexdigest()


def adds_bos(tokenizer: Any) -> bool:
    """True when the tokenizer puts BOS in front of plain text (add_special_tokens=True)."""
    bos_id = getattr(tokenizer, "bos_token_id", None)
    if bos_id is None:
        return False
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    without = tokenizer("a", add_special_tokens=False)["input_ids"]
    return bool(with_special) and with_special[0] == bos_id and (not without or without[0] != bos_id)


# --------------------------------------------------------------------------- rendering


def _template_messages(conversation: Conversation) -> list[dict[str, str]]:
    return [{"role": m["role"], "content": m["content"]} for m in conversation]


def locate_content(text: str, start: int, end: int, content: str) -> tuple[int, int, int]:
    """(start, end, offset) of `content` as rendered in text[start:end]: verbatim, or with the
    whitespace the template trimmed (text[start:end'] == content[offset:offset + end' - start])."""
    lead = len(content) - len(content.lstrip())
    for variant, offset in ((content, 0), (content.strip(), lead), (content.lstrip(), lead), (content.rstrip(), 0)):
        if variant and text.startswith(variant, start) and start + len(variant) <= end:
            return start, start + len(variant), offset
    stripped = content.strip()
    found = text.find(stripped, start, end) if stripped else start
    if found < 0:
        raise RowError("the template alters the assistant content: its text is not found verbatim in the rendered turn")
    return found, found + len(stripped), lead


def render_chat(conversation: Conversation, tokenizer: Any, who: str = "tokenizer") -> RenderedConversation:
    """Render with the chat template and locate each trained assistant turn (module docstring, step 2).

    Raises `RowError` when the template refuses the row (a template that raises on an unknown role, a
    `tool` turn, roles that do not alternate: its message is the reason) or does not let the turns be
    located: a template that rewrites earlier turns once later ones exist (not prefix-stable), or that
    alters the assistant content. A template that is not valid Jinja is a `UsageError` (every row would
    fail). `who` names the tokenizer in the messages ("target tokenizer").
    """
    messages = _template_messages(conversation)

    def render(msgs: list[dict[str, str]], add_generation_prompt: bool = False) -> str:
        try:
            return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=add_generation_prompt)
        except TemplateSyntaxError as exc:
            raise UsageError(f"the chat template of the {who} is not valid Jinja ({exc}); fix the template, "
                             "or render rows without it (--template raw, --behavior-template raw)") from None
        except TemplateError as exc:  # the template's own raise_exception(...): it refuses this row
            raise RowError(f"the chat template of the {who} refuses this row: {exc}") from None
        except Exception as exc:  # noqa: BLE001 - any failure of the template on this row's data rejects the row
            raise RowError(f"the chat template of the {who} fails on this row ({type(exc).__name__}: {exc})") from None

    text = render(messages)
    spans: list[tuple[int, int]] = []
    contents: list[tuple[int, int, int]] = []
    for i, message in enumerate(conversation):
        if not is_completion_turn(message):
            continue
        if i == 0:
            raise RowError("the conversation starts with an assistant turn: a completion needs a prompt before it")
        turn = render(messages[: i + 1])
        if not text.startswith(turn):
            raise RowError(
                f"chat template is not prefix-stable at message {i} (assistant): rendering the conversation up to "
                "this turn is not a prefix of the full rendering (the template rewrites earlier turns); "
                "split the conversation into one row per assistant turn"
            )
        header_end = render(messages[:i], add_generation_prompt=True)
        content = message["content"]
        if turn.startswith(header_end):
            start = len(header_end)
        else:  # the generation prompt differs from the rendered turn's header (e.g. a forced "<think>")
            before = len(render(messages[:i]))
            start = turn.find(content, before)
            if start < 0:
                start = turn.find(content.strip(), before)
        end = len(turn.rstrip())
        if start < 0 or end <= start or content.strip() not in turn[start:end]:
            raise RowError(
                f"chat template alters the content of message {i} (assistant): its text is not found verbatim "
                "in the rendered turn, so its tokens cannot be located"
            )
        if spans and start < spans[-1][1]:
            raise RowError(f"chat template renders message {i} (assistant) before the end of the previous one")
        spans.append((start, end))
        contents.append(locate_content(text, start, end, content))
    if not spans:
        raise RowError("no assistant turn to train on")
    return RenderedConversation(text, tuple(spans), "chat", tuple(contents))


def render_raw(
    conversation: Conversation, tokenizer: Any, separator: str = "\n\n", bos: bool | None = None
) -> RenderedConversation:
    """Plain concatenation for base models without a chat template.

    text = [BOS] + content_0 + separator + content_1 + separator + ... where
    BOS (the tokenizer's bos_token) is there when the tokenizer adds one to
    plain text, roles are not rendered, and every assistant content is
    followed by the tokenizer's eos_token (nothing when it has none). A
    completion span is an assistant content plus its EOS: the model learns to
    stop. For a prompt-completion row that is `[BOS] prompt "\\n\\n" completion EOS`.
    """
    if bos is None:
        bos = adds_bos(tokenizer)
    eos = getattr(tokenizer, "eos_token", None) or ""
    pieces: list[str] = [tokenizer.bos_token] if bos else []
    length = len(pieces[0]) if pieces else 0
    spans: list[tuple[int, int]] = []
    contents: list[tuple[int, int, int]] = []
    for i, message in enumerate(conversation):
        if i:
            pieces.append(separator)
            length += len(separator)
        if message["role"] == "assistant":
            start = length
            pieces += [message["content"], eos]
            length += len(message["content"]) + len(eos)
            if is_completion_turn(message):
                spans.append((start, length))
                contents.append((start, start + len(message["content"]), 0))
        else:
            pieces.append(message["content"])
            length += len(message["content"])
    if not spans:
        raise RowError("no assistant turn to train on")
    return RenderedConversation("".join(pieces), tuple(spans), "raw", tuple(contents))


# --------------------------------------------------------------------------- tokenizing


def mask_from_spans(offsets: np.ndarray, spans: Sequence[tuple[int, int]]) -> np.ndarray:
    """int8 [n]: 1 where a token's first character offsets[:, 0] lies in one of the sorted disjoint `spans`."""
    token_start = offsets[:, 0]
    if not spans:
        return np.zeros(token_start.shape[0], dtype=np.int8)
    span = np.asarray(spans, dtype=np.int64)
    k = np.searchsorted(span[:, 0], token_start, side="right") - 1
    inside = (k >= 0) & (token_start < span[np.maximum(k, 0), 1])
    return inside.astype(np.int8)


def first_uncovered(text: str, starts: np.ndarray, ends: np.ndarray, lo: int = 0, hi: int | None = None) -> int | None:
    """The first non-whitespace character of text[lo:hi] that lies in no token [starts, ends), else None."""
    hi = len(text) if hi is None else min(hi, len(text))
    if hi <= lo:
        return None
    depth = np.zeros(hi - lo + 1, dtype=np.int64)
    np.add.at(depth, np.clip(starts - lo, 0, hi - lo), 1)
    np.add.at(depth, np.clip(ends - lo, 0, hi - lo), -1)
    holes = np.flatnonzero(np.cumsum(depth)[:-1] <= 0)
    return next((lo + int(h) for h in holes if not text[lo + h].isspace()), None)


class SpecialTokens:
    """Finds the special (control) tokens of a tokenizer spelled inside a text.

    A special token in message text would be tokenized as the control token itself: content could
    forge a turn boundary (`<|im_end|>`), an end of sequence, a role header. The tokens are the
    tokenizer's special tokens and its added tokens marked special.
    """

    def __init__(self, tokens: Iterable[str]) -> None:
        self.tokens = frozenset(t for t in tokens if t)
        self.first = sorted({t[0] for t in self.tokens})
        self.lengths = sorted({len(t) for t in self.tokens}, reverse=True)

    @classmethod
    def of(cls, tokenizer: Any) -> SpecialTokens:
        added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
        special = [str(t) for t in getattr(tokenizer, "all_special_tokens", [])]
        return cls([*special, *(t.content for t in added.values() if getattr(t, "special", False))])

    def find(self, text: str) -> str | None:
        """The first special token spelled in `text` (the longest one at that position), else None."""
        found: tuple[int, str] | None = None
        for char in self.first:
            at = text.find(char)
            while at >= 0 and (found is None or at < found[0]):
                token = next((text[at:at + n] for n in self.lengths if text[at:at + n] in self.tokens), None)
                if token is not None:
                    found = (at, token)
                    break
                at = text.find(char, at + 1)
        return None if found is None else found[1]


class ConversationTokenizer:
    """Tokenizes conversations for one target tokenizer; the per-tokenizer checks are done once.

    `tokenizer` is a fast `transformers` tokenizer (character offsets are needed). `name` names it in
    reject reasons ("target tokenizer", "behavior tokenizer").

    A message whose text (content or role) spells one of the tokenizer's special tokens is rejected
    (`RowError` naming the message and the token): its text would become the control token itself,
    trained as completion or forging a turn boundary.
    """

    def __init__(self, tokenizer: Any, config: TokenizeConfig | None = None, name: str = "tokenizer") -> None:
        self.tokenizer = tokenizer
        self.config = config or TokenizeConfig()
        self.name = name
        self.special = SpecialTokens.of(tokenizer)
        if not getattr(tokenizer, "is_fast", False):
            raise ValueError(
                f"{type(tokenizer).__name__} is a slow tokenizer; pear-data needs a fast one (character offsets). "
                "Load it with use_fast=True or convert it with the `tokenizers` library."
            )
        self.mode: TemplateMode = template_mode(tokenizer) if self.config.template == "auto" else self.config.template
        if self.mode == "chat" and not getattr(tokenizer, "chat_template", None):
            raise ValueError("template 'chat' requested but the tokenizer has no chat template; use 'raw' or 'auto'")
        self.bos = adds_bos(tokenizer) if self.mode == "raw" else False

    def render(self, conversation: Conversation) -> RenderedConversation:
        if self.mode == "chat":
            return render_chat(conversation, self.tokenizer, self.name)
        return render_raw(conversation, self.tokenizer, self.config.raw_separator, bos=self.bos)

    def check_text(self, conversation: Conversation) -> None:
        """`RowError` when a message's content or role spells a special token (see the class docstring)."""
        for i, message in enumerate(conversation):
            for part in ("content", "role"):
                token = self.special.find(message[part])
                if token is not None:
                    raise RowError(
                        f"message {i} ({message['role'][:40]}) {part} holds {token!r}, a special token of the "
                        f"{self.name}: text may not spell a control token (it would be read as one and could "
                        "forge a turn boundary); remove or escape it in the input"
                    )

    def __call__(self, conversation: Conversation) -> TokenizedRow:
        """Tokenize one conversation. Raises `RowError` (reject the row) or `OverflowAbort` (stop the run)."""
        self.check_text(conversation)
        rendered = self.render(conversation)
        encoding = self.tokenizer(rendered.text, add_special_tokens=False, return_offsets_mapping=True)
        input_ids = np.asarray(encoding["input_ids"], dtype=np.int32)
        offsets = np.asarray(encoding["offset_mapping"], dtype=np.int64).reshape(-1, 2)
        for a, b in rendered.completion_spans:
            hole = first_uncovered(rendered.text, offsets[:, 0], offsets[:, 1], a, b)
            if hole is not None:
                raise RowError(
                    f"the tokenizer's offset mapping does not cover the completion text: character {hole} "
                    f"({rendered.text[hole:hole + 12]!r}) is in no token, so completion tokens cannot be located "
                    "(use a fast tokenizer with exact offsets)"
                )
        mask = mask_from_spans(offsets, rendered.completion_spans)

        span = np.asarray(rendered.completion_spans, dtype=np.int64)
        tokens_per_span = np.searchsorted(offsets[:, 0], span[:, 1]) - np.searchsorted(offsets[:, 0], span[:, 0])
        if (tokens_per_span == 0).any():
            turn = int(np.argmax(tokens_per_span == 0))
            raise RowError(f"assistant turn {turn} has no token of its own after tokenization (merged into its header)")
        if mask[0] == 1:
            raise RowError("the completion starts at the first token: there is no prompt token to condition on")

        truncated_prompt = truncated_completion = 0
        max_length = self.config.max_length
        n = input_ids.shape[0]
        if max_length is not None and n > max_length:
            if self.config.on_overflow == "error":
                raise OverflowAbort(n, max_length)
            if self.config.on_overflow == "skip":
                raise RowError(f"over max length: {n} tokens > {max_length}")
            truncated_completion = int(mask[max_length:].sum())
            truncated_prompt = n - max_length - truncated_completion
            input_ids, mask, offsets = input_ids[:max_length], mask[:max_length], offsets[:max_length]
            if not mask.any():
                raise RowError(f"no completion token within --max-length {max_length}: the row's first "
                               f"{max_length} tokens are all prompt (the rule keeps a row's start; raise "
                               "--max-length or shorten the prompt)")

        return TokenizedRow(
            input_ids=input_ids,
            completion_mask=mask,
            offsets=offsets,
            text=rendered.text,
            completion_spans=rendered.completion_spans,
            mode=rendered.mode,
            truncated_prompt_tokens=truncated_prompt,
            truncated_completion_tokens=truncated_completion,
            content_spans=rendered.content_spans,
        )
