"""PearCollator: padded and padding-free batches, packed rows, the truncation rule, dropped rows. No model."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from pear_data.collator import PearCollator


def _row(n: int, prompt: int, seed: int, **changes) -> dict:
    """A synthetic scored row of n tokens whose completion starts at `prompt`; spans of two tokens."""
    rng = np.random.default_rng(seed)
    mask = [0] * prompt + [1] * (n - prompt)
    shared = [0] * prompt + [int((k % 2 == 1) or k == n - prompt - 1) for k in range(n - prompt)]
    row = {
        "input_ids": rng.integers(0, 50, n).tolist(),
        "completion_mask": mask,
        "behavior_logprobs": [0.0] * prompt + (-rng.random(n - prompt)).tolist(),
        "shared_boundary": shared,
        "pear_token_weight": [0.0] * prompt + rng.random(n - prompt).tolist(),
        "pear_seq_weight": float(rng.random()),
        "text": f"row {seed}",
    }
    row.update(changes)
    return row


ROWS = [_row(7, 2, 0), _row(4, 1, 1), _row(9, 5, 2)]


@pytest.mark.parametrize("weights", ["token", "sequence"])
def test_padding_free_concatenates_the_padded_rows(weights):
    padded = PearCollator(pad_token_id=99, weights=weights, behavior=True)(ROWS)
    flat = PearCollator(pad_token_id=99, weights=weights, behavior=True, padding_free=True)(ROWS)
    lengths = [len(r["input_ids"]) for r in ROWS]
    assert "attention_mask" not in flat and flat["input_ids"].shape == (1, sum(lengths))
    for name in ("input_ids", "labels", "pear_weights", "behavior_logprobs", "shared_boundary"):
        expected = torch.cat([padded[name][b, :n] for b, n in enumerate(lengths)])
        assert torch.equal(flat[name][0], expected), name
    assert flat["position_ids"][0].tolist() == [i for n in lengths for i in range(n)]
    assert flat["cu_seq_lens_q"].tolist() == [0, 7, 11, 20] and flat["max_length_q"] == 9
    assert flat["seq_idx"][0].tolist() == [0] * 7 + [1] * 4 + [2] * 9


def test_pad_to_multiple_of_in_both_layouts():
    padded = PearCollator(pad_token_id=99, pad_to_multiple_of=8)(ROWS)
    assert padded["input_ids"].shape == (3, 16) and padded["attention_mask"][:, 9:].sum() == 0
    flat = PearCollator(pad_token_id=99, pad_to_multiple_of=8, padding_free=True)(ROWS)
    assert flat["input_ids"].shape == (1, 24)
    assert (flat["labels"][0, 20:] == -100).all() and (flat["input_ids"][0, 20:] == 99).all()
    assert flat["position_ids"][0, 20:].tolist() == [0, 1, 2, 3]  # the padding is a row of its own
    assert flat["cu_seq_lens_q"].tolist() == [0, 7, 11, 20, 24]


def test_packed_rows_keep_their_rows_apart():
    """A row packed from several (TRL's pack_dataset: seq_lengths) gives the batch of those rows."""
    packed = {name: sum((r[name] for r in ROWS[:2]), []) for name in ("input_ids", "completion_mask",
                                                                         "behavior_logprobs", "shared_boundary",
                                                                         "pear_token_weight")}
    packed["seq_lengths"] = [7, 4]
    flat = PearCollator(pad_token_id=99, behavior=True, padding_free=True)([packed, ROWS[2]])
    one_by_one = PearCollator(pad_token_id=99, behavior=True, padding_free=True)(ROWS)
    for name in ("input_ids", "labels", "pear_weights", "behavior_logprobs", "shared_boundary", "position_ids"):
        assert torch.equal(flat[name], one_by_one[name]), name
    with pytest.raises(ValueError, match="need padding_free=True"):
        PearCollator(pad_token_id=99)([packed])
    packed["seq_lengths"] = [7, 5]
    with pytest.raises(ValueError, match="do not add up"):
        PearCollator(pad_token_id=99, padding_free=True)([packed])


def test_a_row_starts_never_is_a_label_even_if_its_mask_says_so():
    row = _row(5, 1, 3)
    row["completion_mask"] = [1, 1, 1, 1, 1]
    batch = PearCollator(pad_token_id=0, padding_free=True)([row, row])
    assert batch["labels"][0, [0, 5]].tolist() == [-100, -100]


def test_a_static_row_longer_than_max_length_is_refused_with_the_reweight_command():
    with pytest.raises(ValueError, match=r"reweight OUT --out OUT-8 --max-length 8"):
        PearCollator(pad_token_id=0, weights="token", max_length=8)(ROWS)


def test_an_online_row_is_cut_and_a_split_span_closes_on_its_last_kept_token():
    row = _row(9, 2, 4)  # completion positions 2..8, span ends at 3, 5, 7, 8
    cut = PearCollator(pad_token_id=0, weights=None, behavior=True, max_length=5)([row])
    assert cut["input_ids"][0].tolist() == row["input_ids"][:5]
    assert cut["shared_boundary"][0].tolist() == [0, 0, 0, 1, 1]  # position 4 now ends the span 4..5
    assert float(cut["behavior_logprobs"][0, 4]) == pytest.approx(row["behavior_logprobs"][5])


def test_rows_with_no_label_left_are_dropped_and_counted(caplog):
    collator = PearCollator(pad_token_id=0, weights=None, behavior=True, max_length=3)
    with caplog.at_level(logging.WARNING):
        batch = collator([ROWS[0], ROWS[2]])  # row 2's completion starts at position 5: nothing left
    assert batch["input_ids"].shape == (1, 3) and collator.dropped_rows == 1
    assert "dropped 1 row(s) with no label token" in caplog.text
    with pytest.raises(ValueError, match="no row of the batch"):
        collator([ROWS[2]])
