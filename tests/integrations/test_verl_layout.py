"""`pear_data.integrations.verl.flat_rows`: verl's nested, shifted log-probs read as `pear_loss` reads a padding-free
row. Pure torch (verl's layout is built here as verl's engine builds it): default run, no verl needed."""

from __future__ import annotations

import pytest
import torch

from pear_data.loss import IGNORE_INDEX, pear_loss
from pear_data.weights import WeightConfig

ROWS = [[1, 2, 3, 4, 5, 6], [7, 8, 9], [3, 1, 4, 1, 5]]
MASKS = [[0, 0, 1, 1, 1, 1], [0, 1, 1], [0, 0, 0, 1, 1]]
WEIGHTS = [[0, 0, 0.5, 2.0, 1.0, 0.1], [0, 3.0, 0.25], [0, 0, 0, 1.5, 0.7]]


def _nested(rows, dtype):
    return torch.nested.as_nested_tensor([torch.tensor(r, dtype=dtype) for r in rows], layout=torch.jagged)


def _verl_batch(vocab: int = 11):
    """(data, log_probs, logits per row) as verl's engine hands them to its loss: every column a jagged nested
    tensor; log_probs.values()[t] = log p(ids[t + 1]) over the concatenated rows (torch.roll, as verl does)."""
    torch.manual_seed(0)
    logits = [torch.randn(len(r), vocab) for r in ROWS]
    ids = torch.tensor([t for r in ROWS for t in r])
    rolled = torch.roll(ids, shifts=-1)
    shifted = torch.log_softmax(torch.cat(logits), dim=-1).gather(-1, rolled[:, None]).squeeze(-1)
    offsets = torch.tensor([0, *torch.tensor([len(r) for r in ROWS]).cumsum(0).tolist()])
    data = {"input_ids": _nested(ROWS, torch.int64), "loss_mask": _nested(MASKS, torch.int64),
            "pear_weights": _nested(WEIGHTS, torch.float32), "behavior_logprobs": _nested(
                [[-0.5 * (i % 3) for i in range(len(r))] for r in ROWS], torch.float32)}
    return data, torch.nested.nested_tensor_from_jagged(shifted, offsets), logits


def _padded(rows, fill, dtype):
    out = torch.full((len(rows), max(map(len, rows))), fill, dtype=dtype)
    for b, row in enumerate(rows):
        out[b, : len(row)] = torch.as_tensor(row, dtype=dtype)
    return out


@pytest.mark.parametrize("mode", ["static", "online"])
def test_verl_rows_give_the_loss_of_the_padded_rows(mode):
    from pear_data.integrations.verl import flat_rows

    data, log_probs, logits = _verl_batch()
    labels, logprobs, position_ids = flat_rows(data, log_probs)
    padded_logits = torch.zeros(len(ROWS), max(map(len, ROWS)), logits[0].shape[1])
    for b, rows in enumerate(logits):
        padded_logits[b, : len(rows)] = rows
    ids, masks = _padded(ROWS, 0, torch.int64), _padded(MASKS, 0, torch.int64)
    padded_labels = torch.where(masks.bool(), ids, IGNORE_INDEX)
    config = WeightConfig(granularity="block", block_size=2, normalize="sequence")
    if mode == "static":
        flat = {"weights": data["pear_weights"].values()[None]}
        padded = {"weights": _padded(WEIGHTS, 0.0, torch.float32)}
    else:
        flat = {"behavior_logprobs": data["behavior_logprobs"].values()[None]}
        padded = {"behavior_logprobs": torch.nested.to_padded_tensor(data["behavior_logprobs"], 0.0)}
    got = pear_loss(labels, logprobs=logprobs, position_ids=position_ids, config=config, **flat)
    want = pear_loss(padded_labels, logits=padded_logits, config=config, **padded)
    assert float(got.loss) == pytest.approx(float(want.loss), rel=1e-6)
    assert position_ids.tolist() == [[*range(6), *range(3), *range(5)]]
    assert got.weights[labels != IGNORE_INDEX].tolist() == pytest.approx(
        want.weights[padded_labels != IGNORE_INDEX].tolist(), rel=1e-6)


def test_a_column_with_other_offsets_is_refused():
    from pear_data.errors import TrainingError
    from pear_data.integrations.verl import flat_rows

    data, log_probs, _ = _verl_batch()
    data["loss_mask"] = _nested([m[::-1] for m in reversed(MASKS)], torch.int64)
    with pytest.raises(TrainingError, match="'loss_mask' is not aligned with input_ids"):
        flat_rows(data, log_probs)
