"""output/layout.py and lock.py: what --overwrite may replace (only pear-data's own outputs and names), an
output apart from its input, one run at a time, an --out through a broken symlink (docs/design.md 6)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from pear_data.errors import OutputError, OutputExistsError, UsageError
from pear_data.output import DatasetWriter, layout

from .cli_harness import cli
from .outputs import (
    FIELDS,
    ROOT,
    assert_named,
    assert_user_error,
    copy_output,
    gsm8k,
    score,
    tree,
    write_jsonl,
)


@pytest.mark.parametrize("link", ["loop", "loop/sub", "dangling", "dangling/sub"])
@pytest.mark.parametrize("command", ["score", "reweight"])
def test_an_out_through_a_broken_symlink_exits_2_naming_it(capsys, tmp_path, tiny_model_dir, link, command):
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    out = tmp_path / link
    if command == "score":
        corpus = write_jsonl(tmp_path / "c.jsonl", gsm8k(2))
        code, text = score(capsys, corpus, out, tiny_model_dir, *FIELDS)
    else:
        from .scored_data import scored_table, write_parquet

        src = write_parquet(scored_table(5), tmp_path / "scored.parquet")
        run = cli(capsys, "reweight", src, "--out", out)
        code, text = run.code, run.text
    assert_named(code, text, "--out", out)
    assert "File exists" not in text
    assert ("loop of symbolic links" if link.startswith("loop") else "does not exist") in text
    assert not (tmp_path / "nowhere").exists()


def test_every_manifest_and_progress_record_the_tool_and_format(output):
    manifest = json.loads((output / "manifest.json").read_text())
    assert manifest["tool"]["name"] == "pear-data"
    assert manifest["tool"]["format"] == layout.OUTPUT_FORMAT == "pear-data/output/1"
    assert manifest["tool"]["version"]
    progress = json.loads((output / ".pear" / "progress.json").read_text())
    assert progress["format"] == layout.PROGRESS_FORMAT
    assert progress["tool"] == manifest["tool"]


@pytest.mark.parametrize("flags", [[], ["--overwrite"]])
def test_overwrite_refuses_a_folder_whose_manifest_json_is_not_ours(monkeypatch, capsys, scored, tmp_path, flags):
    project = tmp_path / "project"
    (project / "data").mkdir(parents=True)
    (project / "manifest.json").write_text(json.dumps({"name": "my web app", "version": 3}))
    (project / "README.md").write_text("# my project\n")
    (project / "data" / "users.csv").write_text("id,name\n1,ada\n")
    before = tree(project)
    code, _, err = cli(capsys, "reweight", scored, "--out", project, *flags)
    assert_user_error(code, err, "not a pear-data output", str(project))
    assert tree(project) == before
    with pytest.raises(OutputExistsError, match="not a pear-data output"):
        DatasetWriter(project, {"k": 1}, overwrite=True)
    assert tree(project) == before


def test_overwrite_refuses_a_corrupt_or_foreign_manifest_even_next_to_data(tmp_path):
    for text in ("{not json", json.dumps({"tool": {"name": "other-tool", "format": "x/1"}}), "[1, 2]"):
        folder = tmp_path / f"f{len(text)}"
        (folder / "data").mkdir(parents=True)
        (folder / "manifest.json").write_text(text)
        (folder / "data" / "part-00000.parquet").write_bytes(b"someone else's file")
        before = tree(folder)
        with pytest.raises(OutputExistsError):
            DatasetWriter(folder, {"k": 1}, overwrite=True)
        assert tree(folder) == before


def test_overwrite_replaces_our_output_recognized_by_manifest_or_by_progress(output, tmp_path):
    import shutil

    by_manifest = copy_output(output, tmp_path / "by_manifest")
    shutil.rmtree(by_manifest / ".pear")  # e.g. downloaded from the Hub
    (by_manifest / "notes.txt").write_text("mine")
    DatasetWriter(by_manifest, {"k": 1}, overwrite=True).close()
    assert sorted(p.name for p in by_manifest.iterdir()) == [".pear", "data", "notes.txt"]
    assert list((by_manifest / "data").iterdir()) == []

    by_progress = copy_output(output, tmp_path / "by_progress")
    for name in ("manifest.json", "README.md"):
        (by_progress / name).unlink()  # killed before finalize
    DatasetWriter(by_progress, {"k": 1}, overwrite=True).close()
    assert list((by_progress / "data").iterdir()) == []


def test_overwrite_refuses_files_it_did_not_write_inside_data_and_state(output, tmp_path):
    out = copy_output(output, tmp_path / "out")
    (out / "data" / "my-notes.txt").write_text("do not delete")
    before = tree(out)
    with pytest.raises(OutputExistsError, match="my-notes.txt"):
        DatasetWriter(out, {"k": 1}, overwrite=True)
    assert tree(out) == before


def test_reweight_into_its_own_source_is_refused_and_the_source_is_intact(monkeypatch, capsys, output, tmp_path):
    src = copy_output(output, tmp_path / "src")
    (tmp_path / "link").symlink_to(src)
    before = tree(src)
    for out in (src, tmp_path / "link", src / "data", src / "sub" / "out"):
        code, _, err = cli(capsys, "reweight", src, "--out", out, "--overwrite")
        assert_user_error(code, err, "--out")
        assert tree(src) == before
    # the input inside the output
    code, _, err = cli(capsys, "reweight", src / "data" / "part-00000.parquet", "--out", src,
                        "--overwrite")
    assert_user_error(code, err, "--out")
    assert tree(src) == before


def test_score_refuses_an_output_that_overlaps_its_input_before_touching_anything(output, tmp_path):
    from pear_data.config import RunConfig, ScoreOptions
    from pear_data.score import score

    src = copy_output(output, tmp_path / "src")
    before = tree(src)
    for corpus, out in ((src / "data" / "part-00000.parquet", src), (src, src / "scored"), (src, src)):
        with pytest.raises(UsageError, match="--out"):
            score(corpus, out, ScoreOptions(run=RunConfig(overwrite=True)))
        assert tree(src) == before


def test_an_output_with_no_committed_shard_is_reused_without_flags(tmp_path):
    """A run that stopped before its first shard (a model that did not load, ...) left nothing to keep."""
    out = tmp_path / "out"
    DatasetWriter(out, {"k": 1}).close()
    fresh = DatasetWriter(out, {"k": 2})
    assert fresh.next_input_row == 0
    fresh.close()


HOLDER = textwrap.dedent(
    """
    import sys, time
    from pear_data.output import DatasetWriter
    w = DatasetWriter(sys.argv[1], {"k": 1})
    print("ready", flush=True)
    time.sleep(120)
    """
)


def test_a_second_run_on_a_locked_output_is_refused_until_the_first_dies(monkeypatch, capsys, scored, tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(out)], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert holder.stdout.readline().strip() == "ready"
        with pytest.raises(OutputError, match=f"another pear-data run .*{holder.pid}"):
            DatasetWriter(out, {"k": 1}, resume=True)
        code, _, err = cli(capsys, "reweight", scored, "--out", out, "--overwrite")
        assert_user_error(code, err, "another pear-data run", str(holder.pid))
    finally:
        holder.kill()
        holder.wait()
    # kill -9 releases the lock: the output resumes
    w = DatasetWriter(out, {"k": 1}, resume=True)
    assert w.next_input_row == 0
    w.close()


def test_overwrite_keeps_the_lock_file_it_holds(output, tmp_path):
    out = copy_output(output, tmp_path / "out")
    w = DatasetWriter(out, {"k": 1}, overwrite=True)
    assert (out / ".pear" / layout.LOCK_FILE).is_file()
    w.close()
