"""dataset.py: reading a pear-data output back. A damaged shard or manifest is named; every reader refuses an
unfinished output or one another process is writing; a derived output records its source (docs/design.md 6)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pear_data.weights import WeightConfig

from .cli_harness import cli
from .outputs import (
    ROOT,
    assert_user_error,
    copy_output,
    truncate_file,
)
from .scored_data import scored_table, write_parquet


def _corrupt_pages(path: Path) -> None:
    """Overwrite the data pages, keep the footer: the schema reads, the rows do not."""
    data = bytearray(path.read_bytes())
    footer = int.from_bytes(data[-8:-4], "little") + 8
    for i in range(4, len(data) - footer):
        data[i] = 0x41
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", [truncate_file, _corrupt_pages], ids=["truncated", "corrupt-pages"])
@pytest.mark.parametrize("command", [["reweight", "--out", "{tmp}/new"], ["stats", "--plot", "{tmp}/w.png"]])
def test_a_damaged_shard_is_named(monkeypatch, capsys, output, tmp_path, damage, command):
    src = copy_output(output, tmp_path / "src")
    shard = src / "data" / "part-00001.parquet"
    damage(shard)
    args = [arg.format(tmp=tmp_path) for arg in command]
    code, _, err = cli(capsys, args[0], src, *args[1:])
    assert_user_error(code, err, "part-00001.parquet")
    assert "--resume" not in err


def test_a_string_input_ids_column_exits_2_naming_the_column(monkeypatch, capsys, tmp_path):
    table = scored_table(6, seed=4)
    table = table.set_column(1, "input_ids", pa.array([str(x) for x in table["input_ids"].to_pylist()]))
    src = write_parquet(table, tmp_path / "strings.parquet")
    code, _, err = cli(capsys, "reweight", src, "--out", tmp_path / "out")
    assert_user_error(code, err, "input_ids", "strings.parquet")


@pytest.mark.parametrize("text", ["{\"rows\": 5", "[1, 2]", json.dumps({"rows": 5, "shards": 3}),
                                  json.dumps({"shards": [{"data_file": 7}]})])
@pytest.mark.parametrize("command", [["stats"], ["reweight", "--out", "{tmp}/new"], ["push", "me/x", "--dry-run"]])
def test_a_corrupt_manifest_exits_2_naming_it(monkeypatch, capsys, output, tmp_path, text, command):
    import shutil

    src = copy_output(output, tmp_path / "src")
    shutil.rmtree(src / ".pear")
    (src / "manifest.json").write_text(text)
    args = [arg.format(tmp=tmp_path) for arg in command]
    code, _, err = cli(capsys, args[0], src, *args[1:])
    assert_user_error(code, err, "manifest.json")


def unfinished(output: Path, dest: Path, how: str) -> Path:
    """A copy of `output` as a run that did not finish leaves it: killed before its manifest, or after its data
    changed (progress.json says finished: false), or an interrupted `score` with no manifest."""
    out = copy_output(output, dest)
    progress_path = out / ".pear" / "progress.json"
    progress = json.loads(progress_path.read_text())
    if how == "no-manifest":
        (out / "manifest.json").unlink()
        (out / "README.md").unlink()
    elif how == "score-killed":
        (out / "manifest.json").unlink()
        (out / "README.md").unlink()
        progress["run_key"]["command"] = "score"
        progress["finished"] = False
        progress["shards"] = progress["shards"][:2]
        (out / "data" / "part-00002.parquet").unlink()
    else:
        progress["finished"] = False
    progress_path.write_text(json.dumps(progress))
    return out


READERS = [["reweight", "{src}", "--out", "{tmp}/derived"], ["stats", "{src}"], ["stats", "{src}", "--json"],
           ["stats", "{src}", "--plot", "{tmp}/w.png"], ["push", "{src}", "me/data", "--dry-run"]]


@pytest.mark.parametrize("how", ["no-manifest", "score-killed", "progress-unfinished"])
@pytest.mark.parametrize("command", READERS, ids=lambda c: " ".join(c[:1] + c[2:]).replace("{tmp}/", ""))
def test_every_reader_refuses_an_unfinished_output(monkeypatch, capsys, output, tmp_path, how, command):
    src = unfinished(output, tmp_path / "src", how)
    args = [arg.format(src=src, tmp=tmp_path) for arg in command]
    code, out, err = cli(capsys, *args)
    assert_user_error(code, err, str(src), "Finish it first")
    if how == "score-killed":
        assert "--resume" in err
    assert not (tmp_path / "derived").exists() and not (tmp_path / "w.png").exists()
    assert out == ""


@pytest.mark.parametrize("inside", ["data", "data/part-00000.parquet"])
def test_a_reweight_of_files_inside_an_unfinished_output_is_refused(monkeypatch, capsys, output, tmp_path, inside):
    src = unfinished(output, tmp_path / "src", "score-killed")
    code, _, err = cli(capsys, "reweight", src / inside, "--out", tmp_path / "derived")
    assert_user_error(code, err, str(src), "--resume")
    holder = tmp_path / "runs"
    holder.mkdir()
    (src).rename(holder / "src")  # an unfinished output among plain Parquet files
    code, _, err = cli(capsys, "reweight", holder, "--out", tmp_path / "derived")
    assert_user_error(code, err, str(holder / "src"))
    assert not (tmp_path / "derived").exists()


WRITING = textwrap.dedent(
    """
    import json, sys, time
    from pathlib import Path
    from pear_data.output import DatasetWriter
    out = Path(sys.argv[1])
    key = json.loads((out / ".pear" / "progress.json").read_text())["run_key"]
    w = DatasetWriter(out, key, resume=True)  # a run resuming this output: it holds the lock
    print("ready", flush=True)
    time.sleep(120)
    """
)


def test_every_reader_refuses_an_output_another_process_is_writing(monkeypatch, capsys, output, tmp_path):
    src = copy_output(output, tmp_path / "src")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    holder = subprocess.Popen([sys.executable, "-c", WRITING, str(src)], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert holder.stdout.readline().strip() == "ready"
        for command in READERS:
            args = [arg.format(src=src, tmp=tmp_path) for arg in command]
            code, _, err = cli(capsys, *args)
            assert_user_error(code, err, str(src), f"process {holder.pid}")
        assert not (tmp_path / "derived").exists()
    finally:
        holder.kill()
        holder.wait()
    code, _, err = cli(capsys, "reweight", src, "--out", tmp_path / "derived")  # the lock died with it
    assert code == 0, err


def test_a_derived_output_records_its_source(output, tmp_path):
    import hashlib

    from pear_data.config import ReweightOptions
    from pear_data.dataset import finished_manifest
    from pear_data.reweight import reweight

    derived = reweight(output, tmp_path / "derived", WeightConfig(gamma=0.9), ReweightOptions())
    source = finished_manifest(output)
    assert derived["source"] == {
        "command": "reweight", "input": source["input"], "rows": source["rows"],
        "manifest": "sha256:" + hashlib.sha256((output / "manifest.json").read_bytes()).hexdigest()}
    assert derived["rows"]["in"] == source["rows"]["out"]


def test_reweight_refuses_a_source_whose_files_hold_other_rows_than_its_manifest(output, tmp_path):
    from pear_data.config import ReweightOptions
    from pear_data.errors import InputError
    from pear_data.reweight import reweight

    src = copy_output(output, tmp_path / "src")
    shard = src / "data" / "part-00001.parquet"
    pq.write_table(pq.read_table(shard).slice(0, 3), shard)
    with pytest.raises(InputError, match="hold 28 rows, but its manifest.json counts 40"):
        reweight(src, tmp_path / "derived", WeightConfig(), ReweightOptions())
    assert not (tmp_path / "derived").exists()
