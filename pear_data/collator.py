"""Batch weighted-dataset rows for training: pad, build labels, carry the PEAR columns (docs/design.md section 4).

Input rows are the dicts a `datasets.Dataset` of `pear-data score` output
yields (lists, numpy arrays or tensors; extra columns such as the original
text are ignored). Output tensors, right-padded to the longest row (after
truncation to `max_length`, keeping the start):

    input_ids          int64   [B, L]   pad_token_id on padding
    attention_mask     int64   [B, L]   1 on real tokens
    labels             int64   [B, L]   input_ids where completion_mask == 1, else -100
    pear_weights       float32 [B, L]   the chosen weight column (0.0 off the completion), if `weights` is set
    behavior_logprobs  float32 [B, L]   the stored behavior log-probs, if `behavior` is set (online PEAR)
    shared_boundary    int8    [B, L]   the span ends of cross-tokenizer rows, if `behavior` is set and the
                                        dataset has the column (online PEAR, design 3.7)

Index i of every output refers to token input_ids[i], as in the dataset;
`pear_data.loss.pear_loss` does the causal shift. Truncation keeps the
static weights of the kept tokens as `pear-data score` computed them on the
full row (their suffixes then reach past the cut); online weights are
computed on what the batch holds.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .loss import IGNORE_INDEX
from .schema import BEHAVIOR_LOGPROBS, COMPLETION_MASK, INPUT_IDS, SHARED_BOUNDARY, WEIGHT_COLUMNS


@dataclass
class PearCollator:
    """Callable `rows -> dict of tensors` for a DataLoader or a Trainer (`data_collator=`).

    pad_token_id: id written on padding (any valid id: padding is masked out of attention and labels).
    weights: a granularity ("token", "block", "sequence") or a column name ("pear_token_weight", ...);
        None for no `pear_weights` (online PEAR, or plain SFT). `pear_seq_weight` (one float per row)
        is spread over the row's completion positions.
    behavior: also emit `behavior_logprobs` (online PEAR).
    max_length: truncate rows to this many tokens (keep the start); None keeps them whole.
    pad_to_multiple_of: round the padded length up to a multiple of this.
    """

    pad_token_id: int
    weights: str | None = "token"
    behavior: bool = False
    max_length: int | None = None
    pad_to_multiple_of: int | None = None

    def __post_init__(self) -> None:
        if self.weights is not None and self.weights in WEIGHT_COLUMNS:
            self.weights = WEIGHT_COLUMNS[self.weights]
        if self.max_length is not None and self.max_length < 2:
            raise ValueError(f"max_length must be >= 2 (a prompt token and a completion token), got {self.max_length}")

    @property
    def columns(self) -> list[str]:
        """Dataset columns this collator reads (a Trainer must not drop them); see also optional_columns."""
        names = [INPUT_IDS, COMPLETION_MASK]
        if self.weights is not None:
            names.append(self.weights)
        if self.behavior:
            names.append(BEHAVIOR_LOGPROBS)
        return names

    @property
    def optional_columns(self) -> list[str]:
        """Columns read when present: shared_boundary (online PEAR on cross-tokenizer rows)."""
        return [SHARED_BOUNDARY] if self.behavior else []

    def __call__(self, rows: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        if not rows:
            raise ValueError("PearCollator got an empty batch")
        for name in self.columns:
            if name not in rows[0]:
                raise KeyError(
                    f"column {name!r} is missing from the batch rows (they have {sorted(rows[0])}): use a dataset "
                    "written by `pear-data score` / `reweight`, and keep the column (transformers/TRL: "
                    "remove_unused_columns=False, or the pear_data.trainer classes that keep it)"
                )
        ids = [self._values(row, INPUT_IDS, b).astype(np.int64) for b, row in enumerate(rows)]
        full_lengths = [len(x) for x in ids]
        ids = [x[: self.max_length] for x in ids]
        lengths = np.array([len(x) for x in ids], dtype=np.int64)
        length = int(lengths.max())
        if self.pad_to_multiple_of:
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of
        batch = len(rows)
        input_ids = np.full((batch, length), self.pad_token_id, dtype=np.int64)
        completion = np.zeros((batch, length), dtype=bool)
        weights = np.zeros((batch, length), dtype=np.float32) if self.weights is not None else None
        behavior = np.zeros((batch, length), dtype=np.float32) if self.behavior else None
        shared = np.zeros((batch, length), dtype=np.int8) if self.behavior and SHARED_BOUNDARY in rows[0] else None
        for b, row in enumerate(rows):
            n = lengths[b]
            input_ids[b, :n] = ids[b]
            completion[b, :n] = self._column(row, COMPLETION_MASK, b, n, full_lengths[b]) != 0
            if weights is not None:
                value = row[self.weights]
                if value is not None and np.ndim(value) == 0:  # pear_seq_weight: one weight for the completion
                    weights[b, :n] = np.where(completion[b, :n], np.float32(value), 0.0)
                else:
                    weights[b, :n] = self._column(row, self.weights, b, n, full_lengths[b])
            if behavior is not None:
                behavior[b, :n] = self._column(row, BEHAVIOR_LOGPROBS, b, n, full_lengths[b])
            if shared is not None:
                shared[b, :n] = self._column(row, SHARED_BOUNDARY, b, n, full_lengths[b])
        attention_mask = (np.arange(length)[None, :] < lengths[:, None]).astype(np.int64)
        out = {
            INPUT_IDS: torch.from_numpy(input_ids),
            "attention_mask": torch.from_numpy(attention_mask),
            "labels": torch.from_numpy(np.where(completion, input_ids, IGNORE_INDEX)),
        }
        if weights is not None:
            out["pear_weights"] = torch.from_numpy(np.where(completion, weights, np.float32(0.0)))
        if behavior is not None:
            out[BEHAVIOR_LOGPROBS] = torch.from_numpy(behavior)
        if shared is not None:
            out[SHARED_BOUNDARY] = torch.from_numpy(shared)
        return out

    @staticmethod
    def _values(row: Mapping[str, Any], name: str, b: int) -> np.ndarray:
        """A list column of one row as a numeric array; a null (the row or an element) is a clear error."""
        value = row[name]
        values = np.asarray([] if value is None else value)
        if value is None or values.dtype == object:
            raise ValueError(f"batch row {b}: {name} is null or holds nulls; pear-data writes every list column in "
                             "full, so this row was not written by `pear-data score` / `reweight` (or was edited)")
        return values

    @classmethod
    def _column(cls, row: Mapping[str, Any], name: str, b: int, n: int, full: int) -> np.ndarray:
        values = cls._values(row, name, b)
        if values.ndim != 1 or len(values) != full:
            raise ValueError(f"batch row {b}: {name} has shape {values.shape} but input_ids has {full} tokens "
                             "(every list column is aligned with input_ids)")
        return values[:n]
