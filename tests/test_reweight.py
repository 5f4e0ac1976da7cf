"""`pear-data reweight` (reweight.py): new weight flags on scored rows, no model (exit codes, rows, columns, bytes)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pear_data.weigh import token_rows
from pear_data.weights import WeightConfig, weigh, weight_sums

from .cli_harness import cli
from .scored_data import corrupt, scored_table, write_parquet

WEIGHT_COLUMNS = ["pear_token_weight", "pear_block_weight", "pear_seq_weight"]


def read_output(out: Path) -> pa.Table:
    return pa.concat_tables(pq.read_table(p) for p in sorted((out / "data").glob("part-*.parquet")))


@pytest.fixture(scope="module")
def scored(tmp_path_factory) -> Path:
    return write_parquet(scored_table(40, seed=1), tmp_path_factory.mktemp("src") / "scored.parquet")


@pytest.fixture(scope="module")
def default_run(scored, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "default"
    result = cli(None, "reweight", scored, "--out", out, "--shard-rows", "15")
    assert result.code == 0, result.err
    return out


def test_reweight_keeps_every_row_and_column_in_order(scored, default_run):
    source = pq.read_table(scored)
    table = read_output(default_run)
    assert table.num_rows == source.num_rows
    assert table.column_names == source.column_names + WEIGHT_COLUMNS
    assert table.column("text").to_pylist() == source.column("text").to_pylist()
    assert len(list((default_run / "data").glob("part-*.parquet"))) == 3  # 40 rows, 15 per shard
    manifest = json.loads((default_run / "manifest.json").read_text())
    assert manifest["rows"] == {"in": 40, "out": 40, "rejected": 0}
    assert not (default_run / "rejects.parquet").exists()


def _reference_token_weights(mask, lt, lb, config: WeightConfig) -> list[float]:
    """design 3.2 token level, literal sums (independent of the engine)."""
    completion = [i for i, m in enumerate(mask) if m]
    d = [min(max(lt[i] - lb[i], config.log_ratio_clip[0]), config.log_ratio_clip[1]) for i in completion]
    T = len(d)
    lo, hi = (math.log(w) for w in config.weight_clip)
    out = [0.0] * len(mask)
    for k in range(1, T + 1):
        e = T if config.horizon is None else min(T, k + config.horizon)
        log_w = sum(d[j - 1] for j in range(k + 1, e + 1)) + (e - k) * math.log(config.gamma)
        out[completion[k - 1]] = math.exp(min(max(log_w, lo), hi))
    return out


def test_reweight_default_token_weights_match_the_formula(default_run):
    table = read_output(default_run).to_pylist()
    for row in table:
        expected = _reference_token_weights(
            row["completion_mask"], row["target_logprobs"], row["behavior_logprobs"], WeightConfig()
        )
        np.testing.assert_allclose(row["pear_token_weight"], expected, rtol=2e-6)


FLAG_SETS = [
    ["--granularity", "block", "--block-size", "3", "--gamma", "0.9"],
    ["--horizon", "5", "--log-ratio-clip=-1,1", "--weight-clip", "0.01,100"],
    ["--normalize", "dataset", "--max-weight", "3"],
    ["--normalize", "sequence", "--center", "--length-normalize"],
    ["--gamma", "1", "--log-ratio-clip=-inf,inf", "--weight-clip", "0,inf"],
]


@pytest.mark.parametrize("flags", FLAG_SETS, ids=lambda f: " ".join(f))
def test_reweight_flags_reach_the_engine(capsys, scored, tmp_path, flags):
    out = tmp_path / "out"
    result = cli(capsys, "reweight", scored, "--out", out, *flags)
    assert result.code == 0, result.err
    manifest = json.loads((out / "manifest.json").read_text())
    config = WeightConfig.from_dict(manifest["weights"])
    source = pq.read_table(scored)
    rows = token_rows(source)
    means = weight_sums(rows, config).means() if config.normalize == "dataset" else None
    expected = weigh(rows, config, means)
    table = read_output(out)
    np.testing.assert_array_equal(np.concatenate(table.column("pear_token_weight").to_pylist()), expected.token)
    np.testing.assert_array_equal(np.concatenate(table.column("pear_block_weight").to_pylist()), expected.block)
    np.testing.assert_array_equal(table.column("pear_seq_weight").to_numpy(), expected.sequence)
    if config.normalize == "dataset" and config.max_weight is None:
        mask = np.concatenate(table.column("completion_mask").to_pylist()) == 1
        assert np.concatenate(table.column("pear_token_weight").to_pylist())[mask].mean() == pytest.approx(1, rel=1e-6)


def test_reweight_keeps_cross_tokenizer_spans(capsys, tmp_path):
    """Rows with a shared_boundary column (behavior from another tokenizer): the column is kept and the
    weights are the engine's span math, not the per-token one."""
    source = scored_table(30, seed=5, spans=True)
    src = write_parquet(source, tmp_path / "spans.parquet")
    out = tmp_path / "out"
    result = cli(capsys, "reweight", src, "--out", out, "--granularity", "block")
    assert result.code == 0, result.err
    table = read_output(out)
    assert table.num_rows == 30 and table.column("shared_boundary").equals(source.column("shared_boundary"))
    rows = token_rows(source)
    assert rows.shared_boundary is not None
    expected = weigh(rows, WeightConfig(granularity="block"))
    for name, column in (("pear_token_weight", expected.token), ("pear_block_weight", expected.block)):
        np.testing.assert_array_equal(np.concatenate(table.column(name).to_pylist()), column)
    per_token = weigh(token_rows(source.drop(["shared_boundary"])), WeightConfig())
    assert not np.array_equal(np.concatenate(table.column("pear_token_weight").to_pylist()), per_token.token)


def test_bad_rows_go_to_rejects_with_reasons(capsys, tmp_path):
    table, expected = corrupt(scored_table(20, seed=2))
    src = write_parquet(table, tmp_path / "bad.parquet")
    out = tmp_path / "out"
    result = cli(capsys, "reweight", src, "--out", out, "--shard-rows", "6")
    assert result.code == 0, result.err
    rejects = pq.read_table(out / "rejects.parquet").to_pylist()
    assert [r["row_index"] for r in rejects] == sorted(expected)
    for row in rejects:
        assert expected[row["row_index"]] in row["reject_reason"], row["reject_reason"]
        assert row["text"] == f"row {row['row_index']}"  # the original columns travel with the reject
    kept = read_output(out)
    assert kept.num_rows == 20 - len(expected)
    assert [t for t in kept.column("text").to_pylist()] == [f"row {r}" for r in range(20) if r not in expected]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["rows"] == {"in": 20, "out": 20 - len(expected), "rejected": len(expected)}


def test_missing_column_is_a_usage_error(capsys, tmp_path):
    src = write_parquet(scored_table(5).drop(["behavior_logprobs"]), tmp_path / "x.parquet")
    result = cli(capsys, "reweight", src, "--out", tmp_path / "out")
    assert result.code == 2
    assert "behavior_logprobs" in result.err
    assert not (tmp_path / "out" / "manifest.json").exists()


@pytest.mark.parametrize(
    "flags, fragment",
    [
        (["--gamma", "1.5"], "--gamma"),
        (["--log-ratio-clip", "abc"], "--log-ratio-clip"),
        (["--weight-clip", "5,1"], "--weight-clip"),
        (["--normalize", "global"], "--normalize"),
    ],
)
def test_bad_flags_exit_2_naming_the_flag(capsys, scored, tmp_path, flags, fragment):
    result = cli(capsys, "reweight", scored, "--out", tmp_path / "out", *flags)
    assert result.code == 2
    assert fragment in result.err


def test_existing_output_is_refused_without_overwrite(capsys, scored, default_run, tmp_path):
    result = cli(capsys, "reweight", scored, "--out", default_run)
    assert result.code == 2
    assert "overwrite" in result.err.lower() or "exists" in result.err.lower()


def test_same_input_and_flags_give_the_same_bytes(capsys, scored, default_run, tmp_path):
    out = tmp_path / "again"
    assert cli(capsys, "reweight", scored, "--out", out, "--shard-rows", "15").code == 0
    files = sorted(p.relative_to(default_run) for p in default_run.rglob("*") if p.is_file() and ".pear" not in p.parts)
    assert files == sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file() and ".pear" not in p.parts)
    for name in files:
        assert (default_run / name).read_bytes() == (out / name).read_bytes(), name


def test_reweight_of_an_output_dir_replaces_weight_columns(capsys, default_run, tmp_path):
    out = tmp_path / "chained"
    result = cli(capsys, "reweight", default_run, "--out", out, "--granularity", "sequence")
    assert result.code == 0, result.err
    table = read_output(out)
    assert table.column_names.count("pear_token_weight") == 1
    assert table.num_rows == 40
    assert json.loads((out / "manifest.json").read_text())["weights"]["granularity"] == "sequence"
