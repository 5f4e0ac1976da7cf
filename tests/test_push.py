"""push.py: only a finished, complete, intact output is uploaded; a network failure is a clear error."""

from __future__ import annotations

import errno

import pyarrow.parquet as pq
import pytest

from pear_data.errors import PushError
from pear_data.push import plan_push, push
from pear_data.weights import WeightConfig

from .cli_harness import cli
from .outputs import (
    assert_user_error,
    copy_output,
    truncate_file,
)
from .scored_data import scored_table, write_parquet


class FailingApi:
    def __init__(self, exc: Exception, on: str = "upload_folder"):
        self.exc, self.on = exc, on

    def create_repo(self, *args, **kwargs):
        if self.on == "create_repo":
            raise self.exc

    def upload_folder(self, **kwargs):
        raise self.exc


@pytest.mark.parametrize("on", ["create_repo", "upload_folder"])
def test_a_network_failure_in_push_is_a_push_error(output, on):
    import requests

    with pytest.raises(PushError, match="me/data") as info:
        push(output, "me/data", api=FailingApi(requests.ConnectionError("connection refused"), on))
    assert "connection refused" in str(info.value)


def test_push_cli_reports_a_network_failure_without_a_traceback(monkeypatch, capsys, output):
    import huggingface_hub

    class Offline(FailingApi):
        def __init__(self, *args, **kwargs):
            super().__init__(OSError(errno.ENETUNREACH, "Network is unreachable"))

    monkeypatch.setattr(huggingface_hub, "HfApi", Offline)
    code, _, err = cli(capsys, "push", output, "me/data")
    assert_user_error(code, err, "me/data", "Network is unreachable")


def test_push_refuses_a_shard_whose_rows_differ_from_the_manifest(output, tmp_path):
    out = copy_output(output, tmp_path / "out")
    shard = out / "data" / "part-00001.parquet"
    table = pq.read_table(shard)
    pq.write_table(table.slice(0, table.num_rows - 2), shard)
    with pytest.raises(PushError, match=r"data/part-00001.parquet.*13 rows.*15"):
        plan_push(out)


def test_push_refuses_a_truncated_shard(output, tmp_path):
    out = copy_output(output, tmp_path / "out")
    truncate_file(out / "data" / "part-00002.parquet")
    with pytest.raises(PushError, match="data/part-00002.parquet"):
        push(out, "me/data", dry_run=True)


def test_push_refuses_rejects_that_differ_from_the_manifest(tmp_path):
    from pear_data.config import ReweightOptions
    from pear_data.reweight import reweight

    from .scored_data import corrupt

    table, expected = corrupt(scored_table(20, seed=5))
    src = write_parquet(table, tmp_path / "bad.parquet")
    out = tmp_path / "out"
    reweight(src, out, WeightConfig(), ReweightOptions())
    rejects = pq.read_table(out / "rejects.parquet")
    assert rejects.num_rows == len(expected)
    pq.write_table(rejects.slice(0, 1), out / "rejects.parquet")
    with pytest.raises(PushError, match="rejects.parquet"):
        plan_push(out)


def test_push_dry_run_lists_the_files(capsys, output):
    result = cli(capsys, "push", output, "me/gsm8k-pear", "--dry-run", "--private")
    assert result.code == 0, result.err
    for name in ("data/part-00000.parquet", "manifest.json", "README.md"):
        assert name in result.out
    assert ".pear" not in result.out


def test_push_refuses_a_dir_that_is_not_an_output(capsys, tmp_path):
    (tmp_path / "x.txt").write_text("hi")
    assert cli(capsys, "push", tmp_path, "me/x", "--dry-run").code == 2
