"""The one truncation rule (pear_data.truncation, design 2.6): the same cut in `score`, `reweight --max-length`
and the trainers."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from pear_data.config import ReweightOptions
from pear_data.reweight import reweight
from pear_data.truncation import truncate, truncate_table
from pear_data.weights import WeightConfig

from .scored_data import scored_table
from .tiny_scored import (  # noqa: F401 - session fixtures
    score_tiny,
)


def _reference(rows: list[dict], max_length: int) -> list[dict]:
    """The rule one row and one token at a time: keep the first max_length tokens; a span the cut splits keeps
    its behavior log-prob (stored on its end past the cut) on the last kept token, which ends it."""
    out = []
    for row in rows:
        n = len(row["input_ids"])
        cut = {k: list(v[:max_length]) for k, v in row.items() if isinstance(v, list)}
        last = min(n, max_length) - 1
        if n > max_length and row["completion_mask"][last] == 1 and row["shared_boundary"][last] == 0:
            end = next(j for j in range(last + 1, n) if row["shared_boundary"][j] == 1)
            cut["behavior_logprobs"][last] = row["behavior_logprobs"][end]
            cut["shared_boundary"][last] = 1
        cut["cut_completion"] = sum(row["completion_mask"][max_length:])
        out.append(cut)
    return out


@pytest.mark.parametrize("max_length", [2, 5, 17, 40, 1000])
def test_truncate_table_equals_a_plain_loop(max_length):
    table = scored_table(num_rows=30, seed=max_length, spans=True)
    cut, completion = truncate_table(table, max_length)
    expected = _reference(table.to_pylist(), max_length)
    for row, want in zip(cut.to_pylist(), expected):
        for name in ("input_ids", "completion_mask", "target_logprobs", "behavior_logprobs", "shared_boundary"):
            assert row[name] == pytest.approx(want[name]), name
        assert row["text"].startswith("row ")  # other columns untouched
    assert completion.tolist() == [w["cut_completion"] for w in expected]


def test_truncate_without_spans_only_slices():
    offsets = np.array([0, 5, 7])
    mask = np.array([0, 1, 1, 1, 1, 0, 1])
    behavior = np.arange(7, dtype=np.float32)
    cut = truncate(offsets, 3, mask, behavior)
    assert cut.keep.tolist() == [True, True, True, False, False, True, True]
    assert cut.offsets.tolist() == [0, 3, 5]
    assert cut.behavior.tolist() == [0, 1, 2, 5, 6]
    assert cut.cut_completion.tolist() == [2, 0]


def _columns(path) -> dict:
    return pq.read_table(path / "data").to_pydict()


@pytest.mark.parametrize("fixture", ["tiny_scored", "tiny_scored_cross"])
def test_reweight_max_length_gives_the_weights_score_max_length_writes(fixture, request, tmp_path):
    """Causal models: the kept tokens' log-probs do not depend on what follows, so recomputing the weights of
    the stored rows for a cut equals scoring with the cut (to the float drift of batched forwards: the scorer
    batched other rows next to these)."""
    scored = request.getfixturevalue(fixture)
    behavior = scored.model if fixture == "tiny_scored" else request.getfixturevalue("tiny_merged_dir")
    cut = score_tiny(tmp_path / "cut", scored.model, behavior, 0.7 if fixture == "tiny_scored" else 1.0,
                     max_length=300)
    manifest = reweight(scored.out, tmp_path / "rw", WeightConfig(), ReweightOptions(max_length=300))
    scored_manifest = json.loads((cut / "manifest.json").read_text())
    assert manifest["rows"] == scored_manifest["rows"]
    assert manifest["rows"]["rejected"] == 1  # the prompt of the last row alone is longer than 300 tokens
    for key in ("total", "completion", "truncated_completion", "truncated_prompt", "rows_truncated"):
        assert manifest["tokens"][key] == scored_manifest["tokens"][key], key
    a, b = _columns(cut), _columns(tmp_path / "rw")
    for name in ("input_ids", "completion_mask", "shared_boundary"):
        assert a[name] == b[name], name
    for name in ("target_logprobs", "behavior_logprobs", "pear_token_weight", "pear_block_weight"):
        for x, y in zip(a[name], b[name]):
            np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6, err_msg=name)
    np.testing.assert_allclose(a["pear_seq_weight"], b["pear_seq_weight"], rtol=1e-5)
    rejects = pq.read_table(tmp_path / "rw" / "rejects.parquet").to_pylist()
    assert "no completion token within --max-length 300" in rejects[0]["reject_reason"]
    assert len(rejects[0]["input_ids"]) > 300  # the reject keeps the whole row


def test_reweight_max_length_cuts_nothing_shorter(tmp_path):
    src = tmp_path / "src.parquet"
    pq.write_table(scored_table(num_rows=12, seed=3, max_len=30), src)
    whole = reweight(src, tmp_path / "a", WeightConfig())
    cut = reweight(src, tmp_path / "b", WeightConfig(), ReweightOptions(max_length=30))
    assert cut["tokens"]["rows_truncated"] == 0
    assert pq.read_table(tmp_path / "a" / "data").equals(pq.read_table(tmp_path / "b" / "data"))
    assert whole["rows"] == cut["rows"]


def test_dataset_normalization_after_a_cut_has_mean_one(tmp_path):
    src = tmp_path / "src.parquet"
    pq.write_table(scored_table(num_rows=20, seed=4, max_len=60, spans=True), src)
    reweight(src, tmp_path / "out", WeightConfig(normalize="dataset"), ReweightOptions(max_length=20))
    table = pq.read_table(tmp_path / "out" / "data")
    mask = np.concatenate(table.column("completion_mask").to_pylist()) == 1
    weights = np.concatenate(table.column("pear_token_weight").to_pylist())[mask]
    assert max(len(r) for r in table.column("input_ids").to_pylist()) <= 20
    assert weights.mean() == pytest.approx(1.0, rel=1e-5)
