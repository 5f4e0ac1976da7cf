"""Batch weighted-dataset rows for training: pad or pack, build labels, carry the PEAR columns (docs/design.md 4).

Input rows are the dicts a `datasets.Dataset` of `pear-data score` output
yields (lists, numpy arrays or tensors; extra columns such as the original
text are ignored), or rows packed by `pear_data.training_data.prepare_dataset`
(several rows in one, with `seq_lengths`). Rows longer than `max_length` are
cut by the one truncation rule (`pear_data.truncation`: keep the first
`max_length` tokens).

Padded (`padding_free=False`), right-padded to the longest row:

    input_ids          int64   [B, L]   pad_token_id on padding
    attention_mask     int64   [B, L]   1 on real tokens
    labels             int64   [B, L]   input_ids where completion_mask == 1, else -100
    pear_weights       float32 [B, L]   the chosen weight column (0.0 off the completion), if `weights` is set
    behavior_logprobs  float32 [B, L]   the stored behavior log-probs, if `behavior` is set (online PEAR)
    shared_boundary    int8    [B, L]   the span ends of cross-tokenizer rows, if `behavior` is set and the
                                        dataset has the column (online PEAR, design 3.7)

Padding-free (`padding_free=True`, and always for packed rows): every row of
the batch concatenated into one batch row, [1, T], with no attention mask and

    position_ids       int64   [1, T]   0, 1, ... restarting at every row: the model keeps rows apart
                                        (transformers' sdpa / flash attention read them), and `pear_loss`
                                        restarts its sums at every row
    cu_seq_lens_q/_k   int32   [R + 1]  row boundaries for varlen attention kernels; max_length_q/_k, seq_idx

as TRL's padding-free collator. Index i of every output refers to token
input_ids[i], as in the dataset; `pear_data.loss.pear_loss` does the causal
shift, and the first token of every row is never a label.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .loss import IGNORE_INDEX
from .schema import BEHAVIOR_LOGPROBS, COMPLETION_MASK, INPUT_IDS, SHARED_BOUNDARY, WEIGHT_COLUMNS
from .truncation import truncate

logger = logging.getLogger(__name__)
SEQ_LENGTHS = "seq_lengths"  # lengths of the rows packed into one (TRL's pack_dataset column)


@dataclass
class PearCollator:
    """Callable `rows -> dict of tensors` for a DataLoader or a Trainer (`data_collator=`).

    pad_token_id: id written on padding (any valid id: padding is masked out of attention and labels).
    weights: a granularity ("token", "block", "sequence") or a column name ("pear_token_weight", ...);
        None for no `pear_weights` (online PEAR, or plain SFT). `pear_seq_weight` (one float per row)
        is spread over the row's completion positions.
    behavior: also emit `behavior_logprobs` (online PEAR).
    max_length: cut longer rows by the truncation rule (keep the first max_length tokens); None keeps them
        whole. Static weights were computed for the whole row, so a static row longer than max_length is an
        error naming `pear-data reweight --max-length` (which recomputes them for the cut).
    pad_to_multiple_of: round the padded (or packed) length up to a multiple of this.
    padding_free: concatenate the batch's rows into one row with position_ids instead of padding.

    A row with no label token left (after the cut) is dropped from its batch and counted in
    `dropped_rows`, never trained as a zero-loss row; a batch with none left is an error.
    """

    pad_token_id: int
    weights: str | None = "token"
    behavior: bool = False
    max_length: int | None = None
    pad_to_multiple_of: int | None = None
    padding_free: bool = False
    dropped_rows: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        if self.weights is not None and self.weights in WEIGHT_COLUMNS:
            self.weights = WEIGHT_COLUMNS[self.weights]
        if self.max_length is not None and self.max_length < 2:
            raise ValueError(f"max_length must be >= 2 (a prompt token and a completion token), got {self.max_length}")
        if self.pad_to_multiple_of is not None and self.pad_to_multiple_of < 1:
            raise ValueError(f"pad_to_multiple_of must be >= 1, got {self.pad_to_multiple_of}")

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
        """Columns read when present: shared_boundary (online PEAR on cross-tokenizer rows), seq_lengths (packed)."""
        return [SHARED_BOUNDARY, SEQ_LENGTHS] if self.behavior else [SEQ_LENGTHS]

    def __call__(self, rows: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        if not rows:
            raise ValueError("PearCollator got an empty batch")
        self._check_columns(rows[0])
        prepared = [self._row(row, b) for b, row in enumerate(rows)]
        kept = [row for row in prepared if row["labels"].any()]
        if len(kept) < len(prepared):
            self._drop(len(prepared) - len(kept))
        if not kept:
            raise ValueError(f"no row of the batch has a label token left after the cut to max_length="
                             f"{self.max_length}: drop such rows before batching (the pear_data.trainer classes "
                             "do: pear_data.training_data.prepare_dataset), or raise max_length")
        packed = any(len(row["segments"]) > 1 for row in kept)
        if packed and not self.padding_free:
            raise ValueError("packed rows (several rows in one, with seq_lengths) need padding_free=True: a padded "
                             "batch's attention mask would let the packed rows attend to each other")
        return self._flatten(kept) if self.padding_free else self._pad(kept)

    def _check_columns(self, row: Mapping[str, Any]) -> None:
        for name in self.columns:
            if name not in row:
                raise KeyError(
                    f"column {name!r} is missing from the batch rows (they have {sorted(row)}): use a dataset "
                    "written by `pear-data score` / `reweight`, and keep the column (transformers/TRL: "
                    "remove_unused_columns=False, or the pear_data.trainer classes that keep it)"
                )

    def _drop(self, count: int) -> None:
        self.dropped_rows += count
        logger.warning("PearCollator dropped %d row(s) with no label token left after the cut to max_length=%s "
                       "(%d so far): they would train as zero-loss rows", count, self.max_length, self.dropped_rows)

    # ------------------------------------------------------------------ one row

    def _row(self, row: Mapping[str, Any], b: int) -> dict[str, Any]:
        """One row as numpy arrays: input_ids, labels (bool), weights, behavior, shared, segments (lengths)."""
        ids = _values(row, INPUT_IDS, b).astype(np.int64)
        n = len(ids)
        mask = _column(row, COMPLETION_MASK, b, n) != 0
        segments = _segments(row, b, n)
        out: dict[str, Any] = {"input_ids": ids, "labels": mask, "segments": segments}
        if self.weights is not None:
            value = row[self.weights]
            if value is not None and np.ndim(value) == 0:  # pear_seq_weight: one weight for the completion
                out["weights"] = np.full(n, np.float32(value), dtype=np.float32)
            else:
                out["weights"] = _column(row, self.weights, b, n).astype(np.float32)
        if self.behavior:
            out["behavior"] = _column(row, BEHAVIOR_LOGPROBS, b, n).astype(np.float32)
            if SHARED_BOUNDARY in row:
                out["shared"] = _column(row, SHARED_BOUNDARY, b, n).astype(np.int8)
        if self.max_length is not None and n > self.max_length:
            self._cut(out, b)
        starts = np.cumsum(out["segments"]) - out["segments"]
        out["labels"] = out["labels"].copy()
        out["labels"][starts] = False  # a row's first token has no context
        return out

    def _cut(self, row: dict[str, Any], b: int) -> None:
        n = len(row["input_ids"])
        if len(row["segments"]) > 1:
            raise ValueError(f"batch row {b}: a packed row of {n} tokens is longer than max_length={self.max_length}; "
                             "pack to at most max_length tokens")
        if "weights" in row:
            raise ValueError(
                f"batch row {b} has {n} tokens, more than max_length={self.max_length}: its static weights were "
                "computed for the whole row and no longer match a cut one; recompute them for the cut with "
                f"`pear-data reweight OUT --out OUT-{self.max_length} --max-length {self.max_length}` (no model), "
                "raise max_length, or train online"
            )
        cut = truncate(np.array([0, n]), self.max_length, row["labels"], row.get("behavior"), row.get("shared"))
        for name in ("input_ids", "labels"):
            row[name] = row[name][cut.keep]
        if "behavior" in row:
            row["behavior"] = cut.behavior
        if "shared" in row:
            row["shared"] = cut.shared
        row["segments"] = np.array([self.max_length], dtype=np.int64)

    # ------------------------------------------------------------------ batches

    def _length(self, n: int) -> int:
        multiple = self.pad_to_multiple_of
        return -(-n // multiple) * multiple if multiple else n

    def _pad(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        lengths = np.array([len(row["input_ids"]) for row in rows], dtype=np.int64)
        length = self._length(int(lengths.max()))
        attention = np.arange(length)[None, :] < lengths[:, None]
        out = {"attention_mask": torch.from_numpy(attention.astype(np.int64))}
        for name, values in self._stack(rows, lambda values, fill, dtype: _pad_rows(values, length, fill, dtype)):
            out[name] = values
        return out

    def _flatten(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        total = sum(len(row["input_ids"]) for row in rows)
        length = self._length(total)
        segments = np.concatenate([row["segments"] for row in rows] + ([[length - total]] if length > total else []))
        position_ids = np.arange(length) - np.repeat(np.cumsum(segments) - segments, segments)
        cu_seq_lens = torch.from_numpy(np.concatenate(([0], np.cumsum(segments))).astype(np.int32))
        out = {
            "position_ids": torch.from_numpy(position_ids[None, :].astype(np.int64)),
            "cu_seq_lens_q": cu_seq_lens, "cu_seq_lens_k": cu_seq_lens,
            "max_length_q": int(segments.max()), "max_length_k": int(segments.max()),
            "seq_idx": torch.repeat_interleave(torch.arange(len(segments), dtype=torch.int32),
                                               torch.from_numpy(segments))[None, :],
        }
        for name, values in self._stack(rows, lambda values, fill, dtype: _pad_rows(
                [np.concatenate(values)], length, fill, dtype)):
            out[name] = values
        return out

    def _stack(self, rows: list[dict[str, Any]], combine) -> list[tuple[str, torch.Tensor]]:
        """(name, tensor) of every output column, each combined from the rows' arrays by `combine`."""
        ids = combine([row["input_ids"] for row in rows], self.pad_token_id, np.int64)
        labels = combine([row["labels"] for row in rows], False, bool)
        out = [(INPUT_IDS, ids), ("labels", torch.where(labels, ids, IGNORE_INDEX))]
        if self.weights is not None:
            weights = combine([row["weights"] for row in rows], 0.0, np.float32)
            out.append(("pear_weights", torch.where(labels, weights, 0.0)))
        if self.behavior:
            out.append((BEHAVIOR_LOGPROBS, combine([row["behavior"] for row in rows], 0.0, np.float32)))
            if all("shared" in row for row in rows):
                out.append((SHARED_BOUNDARY, combine([row["shared"] for row in rows], 0, np.int8)))
        return out


def _pad_rows(values: list[np.ndarray], length: int, fill: Any, dtype: Any) -> torch.Tensor:
    out = np.full((len(values), length), fill, dtype=dtype)
    for b, row in enumerate(values):
        out[b, : len(row)] = row
    return torch.from_numpy(out)


def _values(row: Mapping[str, Any], name: str, b: int) -> np.ndarray:
    """A list column of one row as a numeric array; a null (the row or an element) is a clear error."""
    value = row[name]
    values = np.asarray([] if value is None else value)
    if value is None or values.dtype == object:
        raise ValueError(f"batch row {b}: {name} is null or holds nulls; pear-data writes every list column in "
                         "full, so this row was not written by `pear-data score` / `reweight` (or was edited)")
    return values


def _column(row: Mapping[str, Any], name: str, b: int, n: int) -> np.ndarray:
    values = _values(row, name, b)
    if values.ndim != 1 or len(values) != n:
        raise ValueError(f"batch row {b}: {name} has shape {values.shape} but input_ids has {n} tokens "
                         "(every list column is aligned with input_ids)")
    return values


def _segments(row: Mapping[str, Any], b: int, n: int) -> np.ndarray:
    """Lengths of the rows packed into this one ([n] for a plain row), checked to add up to n."""
    if row.get(SEQ_LENGTHS) is None:
        return np.array([n], dtype=np.int64)
    segments = np.asarray(row[SEQ_LENGTHS], dtype=np.int64).reshape(-1)
    if segments.sum() != n or (segments <= 0).any():
        raise ValueError(f"batch row {b}: seq_lengths {segments.tolist()} do not add up to its {n} tokens")
    return segments
