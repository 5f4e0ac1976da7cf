"""`pear_data.integrations`: the `pear:` section every adapter reads, the first-batch check, loading an output.
Fast, no framework needed (default run)."""

from __future__ import annotations

import math

import pytest

from pear_data.errors import TrainingError
from pear_data.integrations import PEAR_WEIGHTS, PearSettings, check_batch, load_output
from pear_data.weights import WeightConfig


def test_an_empty_section_is_static_token_weights():
    settings = PearSettings.from_section(None, "pear")
    assert (settings.mode, settings.weight_column, settings.batch_key) == ("static", "pear_token_weight", PEAR_WEIGHTS)
    assert settings.config == WeightConfig() and settings.loss_normalize == "tokens"


def test_an_online_section_takes_every_weight_flag():
    section = {"mode": "online", "granularity": "block", "block_size": 8, "gamma": 0.99, "weight_clip": [0.1, "inf"],
               "log_ratio_clip": ["-inf", 0.5], "normalize": "sequence", "loss_normalize": "weights"}
    settings = PearSettings.from_section(section, "pear")
    assert settings.batch_key == "behavior_logprobs" and settings.weight_column is None
    assert settings.config == WeightConfig(granularity="block", block_size=8, gamma=0.99, weight_clip=(0.1, math.inf),
                                           log_ratio_clip=(-math.inf, 0.5), normalize="sequence")
    assert settings.training_data(512).columns == ["input_ids", "completion_mask", "behavior_logprobs",
                                                   "shared_boundary"]


@pytest.mark.parametrize("section, message", [
    ({"granulrity": "block"}, r"unknown key\(s\) granulrity; known: mode, loss_normalize, granularity"),
    ({"mode": "offline"}, "mode must be 'static' or 'online'"),
    ({"loss_normalize": "rows"}, "loss_normalize must be 'tokens' or 'weights'"),
    ({"granularity": "row"}, "--granularity must be one of"),
    ({"mode": "online", "gamma": 2.0}, r"--gamma must be in \(0, 1\]"),
    ({"gamma": 0.9}, r"gamma have no effect in static mode.*pear-data reweight"),
])
def test_a_bad_section_names_the_key_and_what_to_do(section, message):
    with pytest.raises(TrainingError, match=message):
        PearSettings.from_section(section, "data.pear")


def test_a_batch_without_the_weights_stops_training():
    static, online = PearSettings(), PearSettings(mode="online")
    check_batch(["input_ids", "labels", PEAR_WEIGHTS], static, "a trainer")
    with pytest.raises(TrainingError, match=r"in a trainer has no 'pear_weights'.*rather than train on plain NLL"):
        check_batch(["input_ids", "labels"], static, "a trainer")
    with pytest.raises(TrainingError, match="no 'behavior_logprobs'"):
        check_batch(["input_ids", "labels", PEAR_WEIGHTS], online, "a trainer")


def test_an_output_is_read_from_its_directory_its_data_directory_or_files(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "out" / "data").mkdir(parents=True)
    for i in range(2):
        pq.write_table(pa.table({"input_ids": [[i, 1]]}), tmp_path / "out" / "data" / f"part-0000{i}.parquet")
    files = sorted(str(p) for p in (tmp_path / "out" / "data").iterdir())
    for paths in (tmp_path / "out", str(tmp_path / "out" / "data"), files):
        assert load_output(paths, "datasets[0].path", tmp_path / "hf")["input_ids"] == [[0, 1], [1, 1]]
    with pytest.raises(TrainingError, match=r"datasets\[0\].path: .*missing does not exist"):
        load_output(tmp_path / "missing", "datasets[0].path")
    (tmp_path / "empty").mkdir()
    with pytest.raises(TrainingError, match="no Parquet file"):
        load_output(tmp_path / "empty", "datasets[0].path")
