"""config.py: flags that cannot work are refused when the options are built (ConfigError, exit 2), naming
the flag (docs/design.md 3.3, 6)."""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest

from pear_data.weights import WeightConfig

from .cli_harness import cli
from .outputs import (
    assert_user_error,
)


@pytest.mark.parametrize(
    "flags, fragments",
    [
        (["--weight-clip", "inf,inf"], ["--weight-clip"]),
        (["--log-ratio-clip", "inf,inf"], ["--log-ratio-clip"]),
        (["--log-ratio-clip=-inf,-inf"], ["--log-ratio-clip"]),
        (["--weight-clip", "0,1", "--normalize", "dataset"], ["--weight-clip", "--normalize"]),
        (["--weight-clip", "0,1", "--normalize", "sequence"], ["--weight-clip", "--normalize"]),
    ],
)
def test_weight_flags_that_cannot_give_finite_weights_exit_2(monkeypatch, capsys, scored, tmp_path, flags, fragments):
    code, _, err = cli(capsys, "reweight", scored, "--out", tmp_path / "out", *flags)
    assert_user_error(code, err, *fragments)
    assert not (tmp_path / "out").exists()


def test_non_finite_wmin_and_infinite_log_ratio_bounds_are_refused_by_the_config():
    for bad in ({"weight_clip": (float("inf"), float("inf"))}, {"log_ratio_clip": (float("inf"), float("inf"))},
                {"log_ratio_clip": (-float("inf"), -float("inf"))}):
        with pytest.raises(ValueError):
            WeightConfig(**bad)
    WeightConfig(weight_clip=(0.0, float("inf")), log_ratio_clip=(-float("inf"), float("inf")))  # unclipped: fine


def test_a_huge_block_size_is_one_block_per_row(monkeypatch, capsys, scored, tmp_path):
    config = WeightConfig(block_size=10**30)
    assert config.block_size == WeightConfig(block_size=2**40).block_size  # larger than any row: all the same
    code, _, err = cli(capsys, "reweight", scored, "--out", tmp_path / "huge", "--block-size",
                        str(10**30), "--horizon", str(10**30))
    assert code == 0, err
    code, _, err = cli(capsys, "reweight", scored, "--out", tmp_path / "row", "--block-size", "100000")
    assert code == 0, err
    huge = pq.read_table(tmp_path / "huge" / "data" / "part-00000.parquet")
    row = pq.read_table(tmp_path / "row" / "data" / "part-00000.parquet")
    assert huge["pear_block_weight"].equals(row["pear_block_weight"])
    # one block per row: no later block, so W = 1 on every completion token
    for weights, mask in zip(huge["pear_block_weight"].to_pylist(), huge["completion_mask"].to_pylist()):
        assert [w for w, m in zip(weights, mask) if m] == [1.0] * sum(mask)


def test_score_resume_with_overwrite_exits_2_before_loading_anything(monkeypatch, capsys, tmp_path):
    corpus = tmp_path / "c.jsonl"
    corpus.write_text('{"prompt": "a", "completion": "b"}\n')
    code, _, err = cli(capsys, "score", corpus, "--out", tmp_path / "out", "--resume", "--overwrite")
    assert_user_error(code, err, "--resume", "--overwrite")
    assert not (tmp_path / "out").exists()
