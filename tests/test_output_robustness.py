"""What a user feeds pear-data never loses data and never ends in a traceback (docs/design.md section 6).

No model is loaded here: `reweight`, `stats` and `push` run on synthetic scored Parquet, and the `score`
checks tested here all happen before any model is resolved. Most CLI runs go through `pear_data.cli.main`
in this process (fast, and monkeypatching works); the few that need a real process (a closed pipe, a lock
held by another process) run one.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pear_data import cli
from pear_data.errors import OutputError, OutputExistsError, PushError, UsageError
from pear_data.output import DatasetWriter, layout
from pear_data.output import shard as shard_module
from pear_data.push import plan_push, push
from pear_data.weights import WeightConfig

from .scored_data import scored_table, write_parquet

ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- helpers


def main(monkeypatch, capsys, *args) -> tuple[int, str, str]:
    """`pear-data ARGS` in this process: (exit code, stdout, stderr)."""
    monkeypatch.setattr(sys, "argv", ["pear-data", *map(str, args)])
    code = 0
    try:
        cli.main()
    except SystemExit as exc:
        code = 0 if exc.code is None else exc.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_user_error(code: int, err: str, *fragments: str) -> None:
    """Exit 2, no traceback, and the message names what it should."""
    assert code == 2, err
    assert "Traceback" not in err and "internal error" not in err, err
    for fragment in fragments:
        assert fragment in err.replace("\n", " ") or fragment in err, (fragment, err)


def tree(path: Path) -> dict[str, bytes]:
    """Every file under `path` with its bytes (to show that nothing was touched)."""
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def scored(tmp_path_factory) -> Path:
    return write_parquet(scored_table(40, seed=3), tmp_path_factory.mktemp("src") / "scored.parquet")


@pytest.fixture(scope="module")
def output(scored, tmp_path_factory) -> Path:
    """A finished pear-data output (reweight of `scored`, 3 shards). Tests copy it before changing it."""
    from pear_data.config import ReweightOptions
    from pear_data.reweight import reweight

    out = tmp_path_factory.mktemp("runs") / "out"
    reweight(scored, out, WeightConfig(), ReweightOptions(shard_rows=15))
    return out


def copy_output(output: Path, dest: Path) -> Path:
    import shutil

    shutil.copytree(output, dest)
    return dest


# ----------------------------------------------------------------------------- 1. --overwrite replaces only our own


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
    code, _, err = main(monkeypatch, capsys, "reweight", scored, "--out", project, *flags)
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


# ----------------------------------------------------------------------------- 2. output apart from the input


def test_reweight_into_its_own_source_is_refused_and_the_source_is_intact(monkeypatch, capsys, output, tmp_path):
    src = copy_output(output, tmp_path / "src")
    (tmp_path / "link").symlink_to(src)
    before = tree(src)
    for out in (src, tmp_path / "link", src / "data", src / "sub" / "out"):
        code, _, err = main(monkeypatch, capsys, "reweight", src, "--out", out, "--overwrite")
        assert_user_error(code, err, "--out")
        assert tree(src) == before
    # the input inside the output
    code, _, err = main(monkeypatch, capsys, "reweight", src / "data" / "part-00000.parquet", "--out", src,
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


# ----------------------------------------------------------------------------- 4. weight flags


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
    code, _, err = main(monkeypatch, capsys, "reweight", scored, "--out", tmp_path / "out", *flags)
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
    code, _, err = main(monkeypatch, capsys, "reweight", scored, "--out", tmp_path / "huge", "--block-size",
                        str(10**30), "--horizon", str(10**30))
    assert code == 0, err
    code, _, err = main(monkeypatch, capsys, "reweight", scored, "--out", tmp_path / "row", "--block-size", "100000")
    assert code == 0, err
    huge = pq.read_table(tmp_path / "huge" / "data" / "part-00000.parquet")
    row = pq.read_table(tmp_path / "row" / "data" / "part-00000.parquet")
    assert huge["pear_block_weight"].equals(row["pear_block_weight"])
    # one block per row: no later block, so W = 1 on every completion token
    for weights, mask in zip(huge["pear_block_weight"].to_pylist(), huge["completion_mask"].to_pylist()):
        assert [w for w, m in zip(weights, mask) if m] == [1.0] * sum(mask)


# ----------------------------------------------------------------------------- 5. user faults end in exit 2


def test_score_with_cuda_and_no_gpu_exits_2_and_writes_nothing(monkeypatch, tmp_path):
    import torch

    from pear_data.config import ScoreOptions, ScoringConfig
    from pear_data.score import score

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    corpus = tmp_path / "c.jsonl"
    corpus.write_text('{"prompt": "a", "completion": "b"}\n')
    for device in ("cuda", "cuda:0"):
        with pytest.raises(UsageError, match="--device"):
            score(corpus, tmp_path / "out", ScoreOptions(scoring=ScoringConfig(device=device)))
        assert not (tmp_path / "out").exists()


def test_score_with_a_cuda_index_past_the_gpus_exits_2(monkeypatch, tmp_path):
    import torch

    from pear_data.config import ScoreOptions, ScoringConfig
    from pear_data.score import score

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    corpus = tmp_path / "c.jsonl"
    corpus.write_text('{"prompt": "a", "completion": "b"}\n')
    with pytest.raises(UsageError, match="cuda:3"):
        score(corpus, tmp_path / "out", ScoreOptions(scoring=ScoringConfig(device="cuda:3")))
    assert not (tmp_path / "out").exists()


def test_an_output_with_no_committed_shard_is_reused_without_flags(tmp_path):
    """A run that stopped before its first shard (a model that did not load, ...) left nothing to keep."""
    out = tmp_path / "out"
    DatasetWriter(out, {"k": 1}).close()
    fresh = DatasetWriter(out, {"k": 2})
    assert fresh.next_input_row == 0
    fresh.close()


def test_score_resume_with_overwrite_exits_2_before_loading_anything(monkeypatch, capsys, tmp_path):
    corpus = tmp_path / "c.jsonl"
    corpus.write_text('{"prompt": "a", "completion": "b"}\n')
    code, _, err = main(monkeypatch, capsys, "score", corpus, "--out", tmp_path / "out", "--resume", "--overwrite")
    assert_user_error(code, err, "--resume", "--overwrite")
    assert not (tmp_path / "out").exists()


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _corrupt_pages(path: Path) -> None:
    """Overwrite the data pages, keep the footer: the schema reads, the rows do not."""
    data = bytearray(path.read_bytes())
    footer = int.from_bytes(data[-8:-4], "little") + 8
    for i in range(4, len(data) - footer):
        data[i] = 0x41
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", [_truncate, _corrupt_pages], ids=["truncated", "corrupt-pages"])
@pytest.mark.parametrize("command", [["reweight", "--out", "{tmp}/new"], ["stats", "--plot", "{tmp}/w.png"]])
def test_a_damaged_shard_is_named(monkeypatch, capsys, output, tmp_path, damage, command):
    src = copy_output(output, tmp_path / "src")
    shard = src / "data" / "part-00001.parquet"
    damage(shard)
    args = [arg.format(tmp=tmp_path) for arg in command]
    code, _, err = main(monkeypatch, capsys, args[0], src, *args[1:])
    assert_user_error(code, err, "part-00001.parquet")
    assert "--resume" not in err


def test_stats_on_parquet_without_weight_columns_exits_2(monkeypatch, capsys, scored):
    code, _, err = main(monkeypatch, capsys, "stats", scored)
    assert_user_error(code, err, "scored.parquet", "pear_token_weight")


@pytest.mark.parametrize("name", ["x.json", "plot", "x.PNG.txt"])
def test_stats_plot_needs_a_png_path(monkeypatch, capsys, output, tmp_path, name):
    code, _, err = main(monkeypatch, capsys, "stats", output, "--plot", tmp_path / name)
    assert_user_error(code, err, "--plot", ".png")
    assert not (tmp_path / name).exists()


def test_stats_plot_into_a_directory_writes_weights_png_there(monkeypatch, capsys, output, tmp_path):
    folder = tmp_path / "plots"
    folder.mkdir()
    code, _, err = main(monkeypatch, capsys, "stats", output, "--plot", folder)
    assert code == 0, err
    assert (folder / "weights.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert str(folder / "weights.png") in err.replace("\n", "")


def test_a_string_input_ids_column_exits_2_naming_the_column(monkeypatch, capsys, tmp_path):
    table = scored_table(6, seed=4)
    table = table.set_column(1, "input_ids", pa.array([str(x) for x in table["input_ids"].to_pylist()]))
    src = write_parquet(table, tmp_path / "strings.parquet")
    code, _, err = main(monkeypatch, capsys, "reweight", src, "--out", tmp_path / "out")
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
    code, _, err = main(monkeypatch, capsys, args[0], src, *args[1:])
    assert_user_error(code, err, "manifest.json")


def _no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_a_full_disk_in_reweight_exits_2_without_suggesting_resume(monkeypatch, capsys, scored, tmp_path):
    monkeypatch.setattr(shard_module, "write_rows", _no_space)
    code, _, err = main(monkeypatch, capsys, "reweight", scored, "--out", tmp_path / "out")
    assert_user_error(code, err, "No space left on device", str(tmp_path / "out"))
    assert "--resume" not in err and "--overwrite" in err


def test_a_full_disk_keeps_the_committed_shards_and_says_resume(monkeypatch, tmp_path):
    out = tmp_path / "out"
    w = DatasetWriter(out, {"k": 1})
    with w.shard() as shard:
        shard.write(scored_table(3))
        shard.commit(3)
    monkeypatch.setattr(shard_module, "write_rows", _no_space)
    with pytest.raises(OutputError, match="No space left on device") as info:
        with w.shard() as shard:
            shard.write(scored_table(3))
            shard.commit(6)
    assert "--resume" in str(info.value)
    assert not list((out / ".pear").glob("*.tmp"))
    w.close()
    monkeypatch.undo()
    resumed = DatasetWriter(out, {"k": 1}, resume=True)
    assert resumed.next_input_row == 3
    resumed.close()


def test_a_read_only_output_exits_2(monkeypatch, capsys, scored, tmp_path):
    real_mkdir = Path.mkdir

    def read_only(self, *args, **kwargs):
        if str(self).startswith(str(tmp_path / "ro")):
            raise OSError(errno.EROFS, "Read-only file system", str(self))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", read_only)
    code, _, err = main(monkeypatch, capsys, "reweight", scored, "--out", tmp_path / "ro" / "out")
    assert_user_error(code, err, "Read-only file system", "ro")


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
    code, _, err = main(monkeypatch, capsys, "push", output, "me/data")
    assert_user_error(code, err, "me/data", "Network is unreachable")


@pytest.mark.parametrize("args", [[], ["--json"]])
def test_stats_into_a_closed_pipe_exits_0_quietly(output, args):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-m", "pear_data.cli", "stats", str(output), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    proc.stdout.close()  # like `| head` that has read enough
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 0, err
    assert "Traceback" not in err and "BrokenPipe" not in err and "Exception ignored" not in err, err


def test_stats_plot_into_a_closed_pipe_still_writes_the_plot(output, tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    png = tmp_path / "w.png"
    proc = subprocess.Popen([sys.executable, "-m", "pear_data.cli", "stats", str(output), "--plot", str(png)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 0, err
    assert png.is_file()


def test_a_failed_reweight_never_suggests_resume(monkeypatch, capsys, scored, output, tmp_path):
    existing = copy_output(output, tmp_path / "existing")
    code, _, err = main(monkeypatch, capsys, "reweight", scored, "--out", existing)
    assert_user_error(code, err, "--overwrite")
    assert "--resume" not in err


# ----------------------------------------------------------------------------- 7. push checks the shards


def test_push_refuses_a_shard_whose_rows_differ_from_the_manifest(output, tmp_path):
    out = copy_output(output, tmp_path / "out")
    shard = out / "data" / "part-00001.parquet"
    table = pq.read_table(shard)
    pq.write_table(table.slice(0, table.num_rows - 2), shard)
    with pytest.raises(PushError, match=r"data/part-00001.parquet.*13 rows.*15"):
        plan_push(out)


def test_push_refuses_a_truncated_shard(output, tmp_path):
    out = copy_output(output, tmp_path / "out")
    _truncate(out / "data" / "part-00002.parquet")
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


# ----------------------------------------------------------------------------- 8. one run at a time


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
        code, _, err = main(monkeypatch, capsys, "reweight", scored, "--out", out, "--overwrite")
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



def test_ctrl_c_exits_130_not_0() -> None:
    """Typer returns an Exit's code instead of raising it when not in standalone mode; main must pass it on."""
    code = ("import sys\nfrom pear_data import cli\n@cli.app.command('interrupted')\ndef interrupted():\n"
            "    raise KeyboardInterrupt\nsys.argv = ['pear-data', 'interrupted']\ncli.main()\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 130 and "aborted" in result.stderr


# ----------------------------------------------------------------------------- 9. readers refuse unfinished outputs


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
    code, out, err = main(monkeypatch, capsys, *args)
    assert_user_error(code, err, str(src), "Finish it first")
    if how == "score-killed":
        assert "--resume" in err
    assert not (tmp_path / "derived").exists() and not (tmp_path / "w.png").exists()
    assert out == ""


@pytest.mark.parametrize("inside", ["data", "data/part-00000.parquet"])
def test_a_reweight_of_files_inside_an_unfinished_output_is_refused(monkeypatch, capsys, output, tmp_path, inside):
    src = unfinished(output, tmp_path / "src", "score-killed")
    code, _, err = main(monkeypatch, capsys, "reweight", src / inside, "--out", tmp_path / "derived")
    assert_user_error(code, err, str(src), "--resume")
    holder = tmp_path / "runs"
    holder.mkdir()
    (src).rename(holder / "src")  # an unfinished output among plain Parquet files
    code, _, err = main(monkeypatch, capsys, "reweight", holder, "--out", tmp_path / "derived")
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
            code, _, err = main(monkeypatch, capsys, *args)
            assert_user_error(code, err, str(src), f"process {holder.pid}")
        assert not (tmp_path / "derived").exists()
    finally:
        holder.kill()
        holder.wait()
    code, _, err = main(monkeypatch, capsys, "reweight", src, "--out", tmp_path / "derived")  # the lock died with it
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


def test_a_stray_eof_error_is_a_bug_not_ctrl_c() -> None:
    """click turns an EOFError into an Abort; main must not report it as Ctrl-C (130)."""
    code = ("import sys\nfrom pear_data import cli\n@cli.app.command('eof')\ndef eof():\n"
            "    raise EOFError('ran out of input')\nsys.argv = ['pear-data', 'eof']\ncli.main()\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and "internal error: EOFError: ran out of input" in result.stderr
    assert "aborted" not in result.stderr
