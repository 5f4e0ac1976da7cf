"""Row shapes and conversations (design 2.1): `detect_shape` decides the shape from the flags or the first row,
`to_conversation` turns a record into the one normalized form, a `Conversation`.

- conversational: `messages` = list of `{role, content}`; every `assistant` turn is completion;
- prompt-completion (TRL's convention): `prompt` and `completion`, each a str or a list of messages;
- field mapping (`--prompt-field question --completion-field answer [--system-field S]`).

A `Conversation` is a list of `{"role": str, "content": str}` messages in which the completion tokens are exactly
those of the `assistant` turns (but for an assistant turn inside a prompt-completion *prompt*, marked
`"train": False`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from ..errors import CorpusError, RowError

ShapeKind = Literal["messages", "prompt_completion"]

Message = dict[str, Any]  # {"role": str, "content": str[, "train": False]}

Conversation = list[Message]

ROLE_ASSISTANT = "assistant"

_STARTS_WITH_ASSISTANT = "starts with an assistant turn: a completion needs a prompt before it"


@dataclass(frozen=True)
class RowShape:
    """How a row maps to a conversation.

    kind "messages":          `messages_field` holds a list of {role, content}.
    kind "prompt_completion": `prompt_field` and `completion_field` each hold a str
                              or a list of messages; a str prompt becomes one user
                              turn, a str completion one assistant turn. Field
                              mapping (GSM8K's question/answer) is this kind with
                              other field names. `system_field`, if set, names a
                              column whose str becomes a leading system turn.
    """

    kind: ShapeKind
    messages_field: str = "messages"
    prompt_field: str = "prompt"
    completion_field: str = "completion"
    system_field: str | None = None

    def describe(self) -> dict[str, str | None]:
        """The shape as recorded in the manifest."""
        if self.kind == "messages":
            return {"kind": self.kind, "messages_field": self.messages_field}
        return {
            "kind": self.kind,
            "prompt_field": self.prompt_field,
            "completion_field": self.completion_field,
            "system_field": self.system_field,
        }


def detect_shape(
    record: Mapping[str, Any] | None,
    *,
    source: str = "the corpus",
    messages_field: str | None = None,
    prompt_field: str | None = None,
    completion_field: str | None = None,
    system_field: str | None = None,
) -> RowShape:
    """The row shape from the flags, else auto-detected from `record` (the first decodable row).

    Flags win: `messages_field` selects the conversational shape;
    `prompt_field` + `completion_field` (both required) select field mapping.
    Without flags: a `messages` column means conversational, `prompt` and
    `completion` columns mean prompt-completion. Raises `CorpusError` when the
    flags conflict or the shape cannot be detected (naming `source`, the input).
    """
    if (prompt_field is None) != (completion_field is None):
        raise CorpusError("--prompt-field and --completion-field must be given together")
    if messages_field is not None and prompt_field is not None:
        raise CorpusError("--messages-field cannot be combined with --prompt-field/--completion-field")
    if messages_field is not None:
        if system_field is not None:
            raise CorpusError("--system-field applies to prompt/completion fields, not to --messages-field")
        return RowShape("messages", messages_field=messages_field)
    if prompt_field is not None and completion_field is not None:
        return RowShape(
            "prompt_completion", prompt_field=prompt_field, completion_field=completion_field, system_field=system_field
        )
    if record is None:
        raise CorpusError(f"{source}: cannot detect the row shape: no row of it decodes; fix the rows, or name the "
                          "shape (--prompt-field and --completion-field, or --messages-field): undecodable rows "
                          "then go to rejects.parquet with their reason")
    if "messages" in record:
        if system_field is not None:
            raise CorpusError("--system-field applies to prompt/completion fields, not to a 'messages' column")
        return RowShape("messages")
    if "prompt" in record and "completion" in record:
        return RowShape("prompt_completion", system_field=system_field)
    raise CorpusError(
        f"cannot detect the row shape from the columns {sorted(record)}: expected 'messages', or 'prompt' and "
        "'completion'. Name your columns with --prompt-field and --completion-field "
        "(e.g. --prompt-field question --completion-field answer)."
    )


def _content(value: Any, where: str) -> str:
    """Message content as a str; a list of text parts ([{type: text, text: ...}]) is joined."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(
        isinstance(p, Mapping) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in value
    ):
        return "".join(p["text"] for p in value)
    got = "null" if value is None else type(value).__name__
    raise RowError(f"{where}: content must be a string (or a list of text parts), got {got}")


def _messages(value: Any, field: str) -> Conversation:
    if not isinstance(value, list):
        got = "null" if value is None else type(value).__name__
        raise RowError(f"field '{field}' must be a list of {{role, content}} messages, got {got}")
    if not value:
        raise RowError(f"field '{field}' is an empty list of messages")
    conversation: Conversation = []
    for i, message in enumerate(value):
        where = f"field '{field}'[{i}]"
        if not isinstance(message, Mapping):
            raise RowError(f"{where} must be a {{role, content}} object, got {type(message).__name__}")
        if "role" not in message:
            raise RowError(f"{where}: missing key 'role'")
        if "content" not in message:
            raise RowError(f"{where}: missing key 'content'")
        role = message["role"]
        if not isinstance(role, str) or not role:
            raise RowError(f"{where}: role must be a non-empty string, got {role!r}")
        conversation.append({"role": role, "content": _content(message["content"], where)})
    return conversation


def _field(record: Mapping[str, Any], field: str) -> Any:
    if field not in record:
        raise RowError(f"missing field '{field}'")
    return record[field]


def _check_completions(turns: Conversation, field: str) -> None:
    """At least one assistant turn in `turns`, and none with empty content."""
    if not any(m["role"] == ROLE_ASSISTANT for m in turns):
        raise RowError(f"no assistant turn in field '{field}': nothing to train on")
    for i, message in enumerate(turns):
        if message["role"] == ROLE_ASSISTANT and not message["content"].strip():
            raise RowError(f"empty completion: field '{field}'[{i}] is an assistant turn with empty content")


def to_conversation(record: Mapping[str, Any], shape: RowShape) -> Conversation:
    """Normalize one row to a list of {"role", "content"} messages (both str).

    The completion is exactly the `assistant` turns, except an assistant turn
    that comes from a prompt-completion *prompt* (few-shot context, TRL
    semantics: only the completion is trained on): it carries the extra key
    `"train": False`. Every trained assistant turn is non-empty, at least one
    exists, and the conversation does not start with one (a completion needs a
    prompt before it). Raises `RowError` whose reason names the field
    ("missing field 'answer'", "field 'answer' must be a string or a list of
    messages, got int", "empty completion: field 'answer' is empty").
    """
    if shape.kind == "messages":
        conversation = _messages(_field(record, shape.messages_field), shape.messages_field)
        _check_completions(conversation, shape.messages_field)
        if conversation[0]["role"] == ROLE_ASSISTANT:
            raise RowError(f"field '{shape.messages_field}' {_STARTS_WITH_ASSISTANT}")
        return conversation

    prompt = _field(record, shape.prompt_field)
    completion = _field(record, shape.completion_field)
    conversation = []
    if shape.system_field is not None:
        system = _field(record, shape.system_field)
        if system is not None and not isinstance(system, str):
            raise RowError(f"field '{shape.system_field}' must be a string, got {type(system).__name__}")
        if system:
            conversation.append({"role": "system", "content": system})

    if isinstance(prompt, str):
        conversation.append({"role": "user", "content": prompt})
    elif isinstance(prompt, list):
        for message in _messages(prompt, shape.prompt_field):
            if message["role"] == ROLE_ASSISTANT:
                message["train"] = False
            conversation.append(message)
    else:
        got = "null" if prompt is None else type(prompt).__name__
        raise RowError(f"field '{shape.prompt_field}' must be a string or a list of messages, got {got}")

    if isinstance(completion, str):
        if not completion.strip():
            raise RowError(f"empty completion: field '{shape.completion_field}' is empty")
        conversation.append({"role": ROLE_ASSISTANT, "content": completion})
    elif isinstance(completion, list):
        turns = _messages(completion, shape.completion_field)
        _check_completions(turns, shape.completion_field)
        conversation.extend(turns)
    else:
        got = "null" if completion is None else type(completion).__name__
        raise RowError(f"field '{shape.completion_field}' must be a string or a list of messages, got {got}")

    if conversation[0]["role"] == ROLE_ASSISTANT:
        raise RowError(f"field '{shape.prompt_field}' {_STARTS_WITH_ASSISTANT}")
    return conversation


def is_completion_turn(message: Message) -> bool:
    """True when the message's tokens are completion (trained on): an assistant turn not marked `train: False`."""
    return message["role"] == ROLE_ASSISTANT and message.get("train", True) is not False
