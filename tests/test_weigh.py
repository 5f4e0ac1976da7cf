"""weigh.py: the one weigh stage of score, its dataset normalization and reweight."""

from __future__ import annotations

import numpy as np
import pyarrow as pa


def test_weigh_table_rejects_a_zero_length_row_at_the_end_of_a_batch():
    from pear_data.weigh import weigh_table
    from pear_data.weights import WeightConfig

    mask = [[0, 1, 1], [0, 1], []]
    logprobs = [[0.0, -0.5, -0.25], [0.0, -1.0], []]
    table = pa.table({
        "input_ids": pa.array([[1, 2, 3], [1, 2], []], pa.list_(pa.int32())),
        "completion_mask": pa.array(mask, pa.list_(pa.int8())),
        "target_logprobs": pa.array(logprobs, pa.list_(pa.float32())),
        "behavior_logprobs": pa.array(logprobs, pa.list_(pa.float32())),
    })
    weighed = weigh_table(table, WeightConfig())
    assert weighed.kept_rows.tolist() == [0, 1]
    assert weighed.rejected_rows.tolist() == [2]
    (reason,) = weighed.reasons
    assert "completion" in reason or "empty" in reason
    assert np.allclose(weighed.kept.column("pear_seq_weight").to_numpy(), 1.0)
