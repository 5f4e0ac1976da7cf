"""The columns pear-data adds to every row: names, Arrow types and meaning (docs/design.md, "Data contract").

This module is the one place that spells them. The writer, validation, the
dataset card, the collator and the trainer read the names from here.

Index i of every list column refers to token `input_ids[i]`. A trainer's
label at position i is `input_ids[i]` where `completion_mask[i] == 1`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import pyarrow as pa

Granularity = Literal["token", "block", "sequence"]
GRANULARITIES: tuple[Granularity, ...] = ("token", "block", "sequence")


@dataclass(frozen=True)
class Column:
    """One added column: its name, Arrow type, the type as the card shows it, and what it means."""

    name: str
    type: pa.DataType
    doc: str

    @property
    def type_name(self) -> str:
        """The type as the docs and the card write it: list<float32>, int8, ..."""
        return _type_name(self.type)


def _type_name(t: pa.DataType) -> str:
    if pa.types.is_list(t):
        return f"list<{_type_name(t.value_type)}>"
    return {"float": "float32", "double": "float64", "halffloat": "float16"}.get(str(t), str(t))


INPUT_IDS = "input_ids"
COMPLETION_MASK = "completion_mask"
TARGET_LOGPROBS = "target_logprobs"
BEHAVIOR_LOGPROBS = "behavior_logprobs"
SHARED_BOUNDARY = "shared_boundary"

# What `score` adds before weighing, in column order.
SCORED: tuple[Column, ...] = (
    Column(INPUT_IDS, pa.list_(pa.int32()),
           "prompt + completion tokens (target tokenizer, chat template applied)"),
    Column(COMPLETION_MASK, pa.list_(pa.int8()),
           "1 on completion (policy) tokens, the ones trained on; 0 elsewhere; position 0 is 0"),
    Column(TARGET_LOGPROBS, pa.list_(pa.float32()),
           "log pi_target(input_ids[i] given input_ids[:i]); 0.0 where completion_mask is 0"),
    Column(BEHAVIOR_LOGPROBS, pa.list_(pa.float32()),
           "the same under the behavior (sampling) policy; behavior from another tokenizer: the log-prob of a "
           "whole span's text, on the span's last token (0.0 inside)"),
    Column(SHARED_BOUNDARY, pa.list_(pa.int8()),
           "1 on completion tokens that end at a token boundary shared by target and behavior tokenizations "
           "(every completion token when they share the tokenizer)"),
)

# Weight column of each granularity.
WEIGHT_COLUMNS: dict[Granularity, str] = {
    "token": "pear_token_weight",
    "block": "pear_block_weight",
    "sequence": "pear_seq_weight",
}
WEIGHTS: tuple[Column, ...] = (
    Column(WEIGHT_COLUMNS["token"], pa.list_(pa.float32()),
           "token-level PEAR weight per position; 0.0 where completion_mask is 0"),
    Column(WEIGHT_COLUMNS["block"], pa.list_(pa.float32()),
           "block-level PEAR weight per position; 0.0 where completion_mask is 0"),
    Column(WEIGHT_COLUMNS["sequence"], pa.float32(), "sequence-level PEAR weight"),
)

ADDED: tuple[Column, ...] = SCORED + WEIGHTS
ADDED_NAMES: tuple[str, ...] = tuple(c.name for c in ADDED)
# The list columns aligned with input_ids (index i is token i): what a cut to max_length slices.
TOKEN_COLUMNS: tuple[str, ...] = tuple(c.name for c in ADDED if pa.types.is_list(c.type))
COLUMNS: dict[str, Column] = {c.name: c for c in ADDED}

# What `reweight` and the weigh stage need; shared_boundary is optional (absent: every completion token
# ends its own span).
REQUIRED_SCORED: tuple[str, ...] = (INPUT_IDS, COMPLETION_MASK, TARGET_LOGPROBS, BEHAVIOR_LOGPROBS)
LOGPROB_COLUMNS: tuple[str, ...] = (TARGET_LOGPROBS, BEHAVIOR_LOGPROBS)
# The columns the weight engine reads (the cheap projection of a scored file).
ENGINE_COLUMNS: tuple[str, ...] = (COMPLETION_MASK, TARGET_LOGPROBS, BEHAVIOR_LOGPROBS, SHARED_BOUNDARY)

# rejects.parquet: every rejected input row with its index and the reason; `score` adds the row itself as
# `source` (JSON, or the raw line when it did not decode), `reweight` keeps the row's own columns.
ROW_INDEX = "row_index"
REJECT_REASON = "reject_reason"
SOURCE = "source"
REJECTS: tuple[Column, ...] = (
    Column(ROW_INDEX, pa.int64(), "0-based index of the row in the input"),
    Column(REJECT_REASON, pa.string(), "why the row was rejected (names the field, column or position)"),
    Column(SOURCE, pa.string(), "score: the input row as JSON, or the raw line when it did not decode"),
)

# Names an input column may not have: pear-data writes them itself.
RESERVED_NAMES: frozenset[str] = frozenset(ADDED_NAMES) | {ROW_INDEX, REJECT_REASON, SOURCE}


def missing_columns(names: list[str] | pa.Schema, required: tuple[str, ...] = REQUIRED_SCORED) -> list[str]:
    """The required columns absent from `names` (a schema or a list of column names)."""
    present = set(names.names if isinstance(names, pa.Schema) else names)
    return [name for name in required if name not in present]
