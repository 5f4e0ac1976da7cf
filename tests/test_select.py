"""`pear-data select`: the rows a query picks, as a full output (docs/design.md 2.5, 5, 6). No model: the source is
a `reweight` output of synthetic scored rows, some of them rejected."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest

from .cli_harness import cli, output_files
from .scored_data import corrupt, scored_table, write_parquet


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """A finished output of 60 scored rows, 5 of them rejected (rejects.parquet), in 3 data files."""
    from pear_data.config import ReweightOptions, WeightConfig
    from pear_data.reweight import reweight

    folder = tmp_path_factory.mktemp("select")
    table, _ = corrupt(scored_table(60, seed=3, max_len=80))
    out = folder / "src"
    reweight(write_parquet(table, folder / "scored.parquet"), out, WeightConfig(), ReweightOptions(shard_rows=25))
    return out


def data(out: Path) -> pl.DataFrame:
    return pl.read_parquet([str(p) for p in sorted((out / "data").glob("part-*.parquet"))])


WHERE = "n_completion_tokens > 20 AND mean_log_ratio < 0.15 AND pear_seq_weight > 0.5"


def test_where_keeps_what_a_polars_filter_keeps_in_input_order(capsys, source, tmp_path):
    out = tmp_path / "sub"
    code, _, text = cli(capsys, "select", source, "--out", out, "--where", WHERE, "--shard-rows", "20")
    assert code == 0, text
    rows = data(source)
    completion = np.array([sum(m) for m in rows["completion_mask"].to_list()])
    log_ratio = np.array([np.sum(np.array(t, np.float64)) - np.sum(np.array(b, np.float64))
                          for t, b in zip(rows["target_logprobs"].to_list(), rows["behavior_logprobs"].to_list())])
    keep = (completion > 20) & (log_ratio / completion < 0.15) & (rows["pear_seq_weight"].to_numpy() > 0.5)
    expected = rows.filter(pl.Series(keep))
    assert 0 < expected.height < rows.height
    assert data(out).equals(expected)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["query"]["where"] == WHERE
    assert manifest["rows"]["in"] == rows.height == manifest["rows"]["selected"] + manifest["rows"]["dropped"]
    assert manifest["rows"]["out"] == manifest["rows"]["selected"] == expected.height
    assert manifest["rows"]["rejected"] == 5
    carried, rejects = (pq.read_table(o / "rejects.parquet", columns=["row_index", "reject_reason", "text"])
                        for o in (out, source))
    assert carried.to_pylist() == rejects.to_pylist() and carried.num_rows == 5
    assert manifest["source"]["manifest"].startswith("sha256:") and manifest["weights"]["granularity"] == "token"
    assert "query" in manifest and (out / "README.md").read_text().startswith("---\n")
    assert cli(capsys, "push", out, "me/sub", "--dry-run")[0] == 0  # a complete, intact output


def test_select_gives_the_same_bytes_every_time(capsys, source, tmp_path):
    args = ["--sample", "12", "--by-weight", "--by", "mean_token_weight", "--seed", "7"]
    for name in ("a", "b"):
        assert cli(capsys, "select", source, "--out", tmp_path / name, *args)[0] == 0
    assert output_files(tmp_path / "a") == output_files(tmp_path / "b")
    assert data(tmp_path / "a").height == 12
    assert cli(capsys, "select", source, "--out", tmp_path / "c", *args[:-1], "8")[0] == 0
    assert not data(tmp_path / "c").equals(data(tmp_path / "a"))  # another seed, other rows


def test_top_frac_keeps_the_largest_rows_in_input_order(capsys, source, tmp_path):
    code, _, text = cli(capsys, "select", source, "--out", tmp_path / "top", "--top-frac", "0.25", "--by",
                     "pear_seq_weight")
    assert code == 0, text
    rows = data(source).with_row_index("i")
    k = int(np.ceil(0.25 * rows.height))
    expected = rows.sort("pear_seq_weight", "i", descending=[True, False], maintain_order=True).head(k).sort("i")
    assert data(tmp_path / "top").equals(expected.drop("i"))


def test_sample_by_weight_never_draws_a_zero_weight(capsys, source, tmp_path):
    code, _, text = cli(capsys, "select", source, "--out", tmp_path / "s", "--where", "row < 30", "--sample", "10",
                     "--by-weight", "--by", "n_prompt_tokens", "--seed", "1")
    assert code == 0, text
    kept = data(tmp_path / "s")
    prompt = kept["input_ids"].list.len() - kept["completion_mask"].list.sum()
    assert kept.height == 10 and (prompt > 0).all()


@pytest.mark.parametrize(("args", "named"), [
    (["--where", "no_such_column > 1"], "no_such_column"),
    (["--where", "n_tokens >> ) 1"], "not a SQL condition"),
    (["--where", "n_tokens + 1"], "not a condition"),
    (["--top-frac", "0.5", "--by", "input_ids"], "--by input_ids"),
    (["--top-frac", "0.5", "--by", "nope"], "--by nope"),
    (["--top-frac", "1.5"], "--top-frac"),
    (["--sample", "3", "--top-frac", "0.5"], "exclude each other"),
    ([], "--where, --top-frac or --sample"),
])
def test_a_bad_query_exits_2_naming_it(capsys, source, tmp_path, args, named):
    code, _, text = cli(capsys, "select", source, "--out", tmp_path / "bad", *args)
    assert code == 2, text
    assert named in text.replace("\n", "") and "Traceback" not in text
    assert not (tmp_path / "bad").exists()


def test_an_unfinished_source_is_refused(capsys, source, tmp_path):
    import shutil

    copy = tmp_path / "unfinished"
    shutil.copytree(source, copy)
    (copy / "manifest.json").unlink()
    code, _, text = cli(capsys, "select", copy, "--out", tmp_path / "x", "--where", "row < 3")
    assert code == 2 and "not a finished pear-data output" in text.replace("\n", " ")


def test_scan_is_a_lazy_frame_with_the_derived_columns(source):
    from pear_data.dataset import scan

    frame = scan(source, derived=True)
    assert isinstance(frame, pl.LazyFrame)
    rows = frame.select("row", "n_tokens", "n_completion_tokens", "token_ess").collect()
    assert rows["row"].to_list() == list(range(55))
    assert (rows["n_tokens"] > rows["n_completion_tokens"]).all() and rows["token_ess"].is_between(0, 1).all()
