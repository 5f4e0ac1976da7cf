"""Row validation of scored data (pear_data/validate.py), the cross-tokenizer `shared_boundary` column included."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pytest

from pear_data.validate import validate
from pear_data.weigh import token_rows
from pear_data.weights import WeightConfig


def batch(rows: list[dict]) -> pa.Table:
    types = {"input_ids": pa.int32(), "completion_mask": pa.int8(), "target_logprobs": pa.float32(),
             "behavior_logprobs": pa.float32(), "shared_boundary": pa.int8()}
    names = [n for n in types if n in rows[0]]
    return pa.table({n: pa.array([r[n] for r in rows], pa.list_(types[n])) for n in names})


def row(**overrides) -> dict:
    base = {
        "input_ids": [1, 2, 3, 4, 5],
        "completion_mask": [0, 0, 1, 1, 1],
        "target_logprobs": [0.0, 0.0, -1.0, -0.5, -0.2],
        "behavior_logprobs": [0.0, 0.0, 0.0, -2.0, -0.1],
        "shared_boundary": [0, 0, 0, 1, 1],
    }
    return {**base, **overrides}


def test_valid_rows_with_spans_pass_and_reach_the_engine() -> None:
    table = batch([row(), row(shared_boundary=[0, 0, 1, 1, 1])])
    assert validate(table, WeightConfig()) == [None, None]
    rows = token_rows(table)
    assert rows.shared_boundary.tolist() == [0, 0, 0, 1, 1, 0, 0, 1, 1, 1]


def test_without_the_column_rows_have_no_spans() -> None:
    table = batch([{k: v for k, v in row().items() if k != "shared_boundary"}])
    assert validate(table, WeightConfig()) == [None]
    assert token_rows(table).shared_boundary is None


@pytest.mark.parametrize(
    ("shared", "fragment"),
    [
        ([0, 0, 0, 1, 2], "shared_boundary[4] = 2 (must be 0 or 1)"),
        ([0, 1, 0, 1, 1], "shared_boundary[1] = 1 on a prompt position"),
        ([0, 0, 1, 1, 0], "shared_boundary[4] = 0 on the row's last completion token"),
        ([0, 0, 1, 1], "lengths differ: input_ids has 5 tokens, shared_boundary has 4"),
    ],
)
def test_bad_shared_boundary_is_a_reject_naming_the_position(shared: list[int], fragment: str) -> None:
    reasons = validate(batch([row(), row(shared_boundary=shared)]), WeightConfig())
    assert reasons[0] is None
    assert reasons[1] is not None and fragment in reasons[1], reasons[1]


def test_both_minus_inf_in_one_span_is_undefined() -> None:
    """Within one span the target and behavior -inf fall into the same log-ratio: -inf - (-inf)."""
    ninf = -math.inf
    same_span = row(target_logprobs=[0.0, 0.0, ninf, -0.5, -0.2], behavior_logprobs=[0.0, 0.0, 0.0, ninf, -0.1])
    other_span = row(target_logprobs=[0.0, 0.0, ninf, -0.5, -0.2], behavior_logprobs=[0.0, 0.0, 0.0, -1.0, ninf])
    reasons = validate(batch([same_span, other_span]), WeightConfig())
    assert reasons[0] is not None and "both -inf in the span ending at position 3" in reasons[0]
    assert reasons[1] is None  # different spans: each -inf is clipped by the finite bounds


def test_span_checks_apply_per_row() -> None:
    """A bad row next to good ones: only it is flagged, at its own position."""
    rows = [row(), row(shared_boundary=[0, 0, 1, 0, 0]), row()]
    reasons = validate(batch(rows), WeightConfig())
    assert reasons[0] is None and reasons[2] is None
    assert "shared_boundary[4] = 0" in reasons[1]
    assert np.all(token_rows(batch([rows[0]])).shared_boundary[[3, 4]] == 1)
