"""DatasetWriter: layout, determinism, crash safety / resume, rejects, row conservation, loading."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

import pear_data.output.rewrite as rewrite_module
from pear_data.errors import OutputError, OutputExistsError, PushError, ResumeMismatchError, UsageError
from pear_data.output import (
    DatasetWriter,
    data_files,
    read_manifest,
    rewrite_data_files,
)
from pear_data.output import shard as shard_module
from pear_data.push import plan_push

from .cli_harness import cli
from .outputs import assert_user_error, copy_output
from .scored_data import scored_table

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

N_ROWS = 100
SHARD_ROWS = 16
WRITE_ROWS = 5  # several write() calls (row groups) per shard
RUN_KEY = {
    "input": {"fingerprint": "sha256:abc"},
    "weights": {"gamma": 0.999, "granularity": "token"},
    "max_length": 512,
}
MANIFEST = {
    "tool_version": "0.1.0",
    "input": {"fingerprint": "sha256:abc"},
    "weights": {"gamma": 0.999, "granularity": "token"},
}


def make_rows(start: int, end: int) -> pa.Table:
    """Synthetic scored rows; every value is a function of the row index only."""
    cols: dict[str, list] = {
        k: []
        for k in (
            "row_index",
            "text",
            "input_ids",
            "completion_mask",
            "target_logprobs",
            "pear_token_weight",
            "pear_seq_weight",
        )
    }
    for r in range(start, end):
        rng = np.random.default_rng(r)
        n = int(rng.integers(3, 12))
        mask = np.zeros(n, np.int8)
        mask[n // 2 :] = 1
        cols["row_index"].append(r)
        cols["text"].append(f"row {r}")
        cols["input_ids"].append(rng.integers(0, 50_000, n).astype(np.int32))
        cols["completion_mask"].append(mask)
        cols["target_logprobs"].append((-rng.random(n) * mask).astype(np.float32))
        cols["pear_token_weight"].append((rng.random(n) * mask).astype(np.float32))
        cols["pear_seq_weight"].append(np.float32(rng.random()))
    schema = pa.schema(
        [
            ("row_index", pa.int64()),
            ("text", pa.string()),
            ("input_ids", pa.list_(pa.int32())),
            ("completion_mask", pa.list_(pa.int8())),
            ("target_logprobs", pa.list_(pa.float32())),
            ("pear_token_weight", pa.list_(pa.float32())),
            ("pear_seq_weight", pa.float32()),
        ]
    )
    return pa.Table.from_pydict(cols, schema=schema)


def is_rejected(row_index: np.ndarray) -> np.ndarray:
    return row_index % 7 == 3


def process_shard(shard, start: int, end: int) -> None:
    rows = make_rows(start, end)
    bad = is_rejected(rows["row_index"].to_numpy())
    good = rows.filter(pa.array(~bad))
    for i in range(0, good.num_rows, WRITE_ROWS):
        shard.write(good.slice(i, WRITE_ROWS))
    rejected = rows.filter(pa.array(bad)).select(["row_index", "text"])
    if rejected.num_rows:
        reasons = pa.array([f"bad row {r}" for r in rejected["row_index"].to_pylist()], pa.string())
        # reverse order on purpose: the merged rejects.parquet must be sorted anyway
        shard.reject(
            rejected.append_column("reject_reason", reasons).take(pa.array(range(rejected.num_rows - 1, -1, -1)))
        )
    tokens = int(pc.sum(pc.list_value_length(good["input_ids"])).as_py() or 0)
    shard.commit(end, {"tokens": tokens, "weight_sum": float(pc.sum(good["pear_seq_weight"]).as_py() or 0.0)})


def halve_seq_weight(table: pa.Table) -> pa.Table:
    i = table.schema.get_field_index("pear_seq_weight")
    return table.set_column(i, "pear_seq_weight", pc.multiply(table["pear_seq_weight"], pa.scalar(0.5, pa.float32())))


def full_run(out: Path, *, resume: bool = False, run_key: dict = RUN_KEY) -> dict:
    """The reference pipeline: shards, a named second pass (like dataset normalization), finalize."""
    writer = DatasetWriter(out, run_key, resume=resume)
    for start in range(writer.next_input_row, N_ROWS, SHARD_ROWS):
        with writer.shard() as shard:
            process_shard(shard, start, min(start + SHARD_ROWS, N_ROWS))
    if "halve" not in writer.rewrites:
        writer.rewrite_data_files(halve_seq_weight, name="halve")
    return writer.finalize(MANIFEST)


def output_bytes(out: Path) -> dict[str, bytes]:
    """Every file of the output except the resume state."""
    return {
        p.relative_to(out).as_posix(): p.read_bytes()
        for p in sorted(out.rglob("*"))
        if p.is_file() and p.relative_to(out).parts[0] != ".pear"
    }


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict[str, bytes]:
    out = tmp_path_factory.mktemp("reference") / "out"
    full_run(out)
    return output_bytes(out)


def test_layout_and_manifest_rows(tmp_path):
    out = tmp_path / "out"
    manifest = full_run(out)
    n_rejected = int(is_rejected(np.arange(N_ROWS)).sum())
    assert manifest["rows"] == {"in": N_ROWS, "out": N_ROWS - n_rejected, "rejected": n_rejected}
    assert read_manifest(out) == manifest
    names = sorted(p.name for p in (out / "data").iterdir())
    assert names == [f"part-{i:05d}.parquet" for i in range(7)]
    assert [Path(p).name for p in data_files(out)] == names
    assert (out / "rejects.parquet").is_file() and (out / "README.md").is_file()
    shards = manifest["shards"]
    assert [s["input_start"] for s in shards] == list(range(0, N_ROWS, SHARD_ROWS))
    assert shards[-1]["input_end"] == N_ROWS
    assert all(s["stats"]["tokens"] > 0 for s in shards)
    # row groups are the write() calls (5 rows each), and the row order is the input order
    first = pq.ParquetFile(out / "data" / "part-00000.parquet")
    assert first.metadata.num_row_groups == 3
    assert first.schema_arrow.metadata is None or b"pandas" not in first.schema_arrow.metadata
    row_index = pa.concat_tables([pq.read_table(p) for p in data_files(out)])["row_index"].to_pylist()
    assert row_index == [r for r in range(N_ROWS) if not is_rejected(np.array(r))]
    progress = json.loads((out / ".pear" / "progress.json").read_text())
    assert progress["finished"] is True and progress["rewrites"] == ["halve"]


def test_two_identical_runs_give_identical_bytes(tmp_path, reference):
    out = tmp_path / "again"
    full_run(out)
    again = output_bytes(out)
    assert sorted(again) == sorted(reference)
    for name in reference:
        assert again[name] == reference[name], name


def test_manifest_is_sorted_indented_json(tmp_path):
    out = tmp_path / "out"
    full_run(out)
    text = (out / "manifest.json").read_text()
    data = json.loads(text)
    assert text == json.dumps(data, sort_keys=True, indent=2, ensure_ascii=False) + "\n"


def test_exception_inside_shard_commits_nothing_then_resume_is_identical(tmp_path, reference):
    out = tmp_path / "out"
    writer = DatasetWriter(out, RUN_KEY)
    for start in range(0, 3 * SHARD_ROWS, SHARD_ROWS):
        with writer.shard() as shard:
            process_shard(shard, start, start + SHARD_ROWS)
    with pytest.raises(ValueError, match="boom"):
        with writer.shard() as shard:
            shard.write(make_rows(48, 53))
            shard.reject(make_rows(53, 54).select(["row_index"]).append_column("reject_reason", pa.array(["x"])))
            raise ValueError("boom")
    assert len(writer.committed) == 3 and writer.next_input_row == 48
    assert sorted(p.name for p in (out / ".pear").iterdir()) == [
        "lock",
        "progress.json",
        "rejects-00000.parquet",
        "rejects-00001.parquet",
        "rejects-00002.parquet",
    ]
    assert len(list((out / "data").iterdir())) == 3
    del writer

    manifest = full_run(out, resume=True)
    assert manifest["rows"]["in"] == N_ROWS
    assert output_bytes(out) == reference


def test_same_writer_continues_after_a_failed_shard(tmp_path, reference):
    out = tmp_path / "out"
    writer = DatasetWriter(out, RUN_KEY)
    with pytest.raises(RuntimeError, match="boom"):
        with writer.shard() as shard:
            shard.write(make_rows(0, 7))
            raise RuntimeError("boom")
    for start in range(writer.next_input_row, N_ROWS, SHARD_ROWS):
        with writer.shard() as shard:
            process_shard(shard, start, min(start + SHARD_ROWS, N_ROWS))
    writer.rewrite_data_files(halve_seq_weight, name="halve")
    writer.finalize(MANIFEST)
    assert output_bytes(out) == reference


def test_resume_deletes_stray_temp_and_uncommitted_files(tmp_path, reference):
    out = tmp_path / "out"
    writer = DatasetWriter(out, RUN_KEY)
    for start in (0, SHARD_ROWS):
        with writer.shard() as shard:
            process_shard(shard, start, start + SHARD_ROWS)
    # What a kill -9 can leave behind: an open shard's temp, a data file renamed in place
    # just before progress.json was rewritten, its rejects, half-written atomic temps.
    strays = [
        out / ".pear" / "shard-00002.parquet.tmp",
        out / ".pear" / "rejects-00002.parquet",
        out / "data" / "part-00002.parquet",
        out / "data" / ".part-00001.parquet.tmp",
        out / ".manifest.json.tmp",
    ]
    shutil.copy(out / "data" / "part-00000.parquet", strays[2])
    for p in strays:
        if not p.exists():
            p.write_bytes(b"garbage")
    resumed = DatasetWriter(out, RUN_KEY, resume=True)
    assert resumed.next_input_row == 2 * SHARD_ROWS
    assert [p for p in strays if p.exists()] == []
    del resumed
    full_run(out, resume=True)
    assert output_bytes(out) == reference


KILL_SCRIPT = """
import os, signal, sys
from pathlib import Path
sys.path.insert(0, {tests!r})
import tests.test_writer as t
import pear_data.output.rewrite as r
import pear_data.output.writer as w

point, out = sys.argv[1], Path(sys.argv[2])
def die():
    os.kill(os.getpid(), signal.SIGKILL)

if point == "mid_shard":                     # rows of shard 2 half written to the temp file
    write, calls = w.ShardHandle.write, [0]
    def killing_write(self, table):
        calls[0] += 1
        if calls[0] == 8:
            die()
        write(self, table)
    w.ShardHandle.write = killing_write
elif point == "before_progress":             # shard 2's data file renamed into data/, progress.json not yet
    save, calls = w.DatasetWriter._save_progress, [0]
    def killing_save(self, committed):
        calls[0] += 1
        if calls[0] == 4:                    # 1 = fresh start, 2..3 = shards 0..1
            die()
        save(self, committed)
    w.DatasetWriter._save_progress = killing_save
elif point == "rewrite_before_commit":       # second pass: some temp files written, none in place
    halve, calls = t.halve_seq_weight, [0]
    def killing_halve(table):
        calls[0] += 1
        if calls[0] == 10:                   # first row group of the 4th file
            die()
        return halve(table)
    t.halve_seq_weight = killing_halve
elif point == "rewrite_after_commit":        # second pass recorded in progress.json, renames not done
    finish = r.finish_pending_rewrite
    def killing_finish(out_dir, progress):
        pending = progress.get("pending_rewrite") or []
        if pending:
            os.replace(out_dir / pending[0][0], out_dir / pending[0][1])  # one rename done, then killed
            die()
        finish(out_dir, progress)
    r.finish_pending_rewrite = killing_finish
elif point == "finalize_before_card":        # rejects.parquet and manifest.json written, README.md not
    write_text = w.atomic_write_text
    def killing_write_text(path, text):
        if Path(path).name == "README.md":
            die()
        write_text(path, text)
    w.atomic_write_text = killing_write_text
t.full_run(out)
print("not killed")
"""


# What the killed run must have left behind, so each case really tests its crash point.
KILLED_STATE = {
    "mid_shard": lambda out, progress: (
        len(progress["shards"]) == 2 and (out / ".pear" / "shard-00002.parquet.tmp").exists()
    ),
    "before_progress": lambda out, progress: (
        len(progress["shards"]) == 2 and (out / "data" / "part-00002.parquet").exists()
    ),
    "rewrite_before_commit": lambda out, progress: (
        progress["rewrites"] == [] and (out / "data" / ".part-00000.parquet.tmp").exists()
    ),
    "rewrite_after_commit": lambda out, progress: (
        len(progress["pending_rewrite"]) == 7 and (out / "data" / ".part-00006.parquet.tmp").exists()
    ),
    "finalize_before_card": lambda out, progress: (out / "manifest.json").exists() and not (out / "README.md").exists(),
}


@pytest.mark.parametrize("point", sorted(KILLED_STATE))
def test_kill_9_then_resume_gives_the_uninterrupted_bytes(tmp_path, reference, point):
    out = tmp_path / "out"
    script = KILL_SCRIPT.format(tests=str(Path(__file__).parents[1]))
    proc = subprocess.run([sys.executable, "-c", script, point, str(out)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stdout + proc.stderr
    progress = json.loads((out / ".pear" / "progress.json").read_text())
    assert not progress["finished"] and KILLED_STATE[point](out, progress)
    full_run(out, resume=True)
    assert output_bytes(out) == reference
    assert not [p for p in out.rglob("*.tmp")]


class SimulatedKill(BaseException):
    """Stands for a kill -9 at a chosen line (the writer must not rely on cleanup code running)."""


@pytest.mark.parametrize("stop", ["after_the_rewrite", "in_the_renames"])
def test_resume_after_a_committed_rewrite_gives_the_same_bytes_and_a_pushable_output(tmp_path, reference,
                                                                                    monkeypatch, stop):
    """`score --normalize dataset` killed after its normalization rewrite committed (the recipe then skips
    the rewrite, `"halve" in writer.rewrites` here) finishes to the bytes of an uninterrupted run."""
    out = tmp_path / "out"
    writer = DatasetWriter(out, RUN_KEY)
    for start in range(0, N_ROWS, SHARD_ROWS):
        with writer.shard() as shard:
            process_shard(shard, start, min(start + SHARD_ROWS, N_ROWS))
    if stop == "in_the_renames":
        def one_rename_then_killed(out_dir, progress):
            tmp, dest = progress["pending_rewrite"][0]
            os.replace(out_dir / tmp, out_dir / dest)
            raise SimulatedKill

        monkeypatch.setattr(rewrite_module, "finish_pending_rewrite", one_rename_then_killed)
        with pytest.raises(SimulatedKill):
            writer.rewrite_data_files(halve_seq_weight, name="halve")
        monkeypatch.undo()
        progress = json.loads((out / ".pear" / "progress.json").read_text())
        assert progress["rewrites"] == ["halve"] and len(progress["pending_rewrite"]) == 7
    else:
        writer.rewrite_data_files(halve_seq_weight, name="halve")
    writer.close()
    with pytest.raises(PushError, match="no manifest.json"):
        plan_push(out)

    resumed = DatasetWriter(out, RUN_KEY, resume=True)
    assert resumed.rewrites == ["halve"] and resumed.next_input_row == N_ROWS and not resumed.finished
    assert "pending_rewrite" not in json.loads((out / ".pear" / "progress.json").read_text())
    resumed.close()
    full_run(out, resume=True)  # skips the applied rewrite, writes rejects, manifest and card
    assert output_bytes(out) == reference
    assert not list(out.rglob("*.tmp"))
    assert [f.path_in_repo for f in plan_push(out)] == sorted(reference)


def test_resume_with_other_flags_names_the_differing_keys(tmp_path):
    out = tmp_path / "out"
    writer = DatasetWriter(out, RUN_KEY)
    with writer.shard() as shard:
        process_shard(shard, 0, SHARD_ROWS)
    changed = json.loads(json.dumps(RUN_KEY))
    changed["weights"]["gamma"] = 0.99
    changed["center"] = True
    with pytest.raises(ResumeMismatchError) as err:
        DatasetWriter(out, changed, resume=True)
    message = str(err.value)
    assert "weights.gamma: 0.999 -> 0.99" in message
    assert "center: <absent> -> true" in message
    assert "max_length" not in message and "fingerprint" not in message
    # same key resumes
    assert DatasetWriter(out, RUN_KEY, resume=True).next_input_row == SHARD_ROWS


def test_output_exists_error(tmp_path):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    for kwargs in ({}, {"resume": True}, {"overwrite": True}):
        with pytest.raises(OutputExistsError, match="not a pear-data output"):
            DatasetWriter(foreign, RUN_KEY, **kwargs)
    assert (foreign / "notes.txt").read_text() == "mine"

    out = tmp_path / "out"
    full_run(out)
    with pytest.raises(OutputExistsError, match="--resume .* or --overwrite"):
        DatasetWriter(out, RUN_KEY)
    with pytest.raises(UsageError, match="exclude each other"):
        DatasetWriter(out, RUN_KEY, resume=True, overwrite=True)

    # overwrite deletes what pear-data wrote and nothing else
    (out / "notes.txt").write_text("keep me")
    writer = DatasetWriter(out, {"other": 1}, overwrite=True)
    assert writer.next_input_row == 0
    assert sorted(p.name for p in out.iterdir()) == [".pear", "data", "notes.txt"]
    assert list((out / "data").iterdir()) == []

    # a finished output without resume state cannot be resumed
    bare = tmp_path / "bare"
    full_run(bare)
    shutil.rmtree(bare / ".pear")
    with pytest.raises(OutputExistsError, match="without resume state"):
        DatasetWriter(bare, RUN_KEY, resume=True)


def test_resume_on_missing_or_empty_out_starts_fresh(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert DatasetWriter(empty, RUN_KEY, resume=True).next_input_row == 0
    assert DatasetWriter(tmp_path / "missing", RUN_KEY, resume=True).committed == []


def test_commit_checks_row_conservation(tmp_path):
    writer = DatasetWriter(tmp_path / "out", RUN_KEY)
    with pytest.raises(RuntimeError, match="every input row must end up"):
        with writer.shard() as shard:
            shard.write(make_rows(0, 5))
            shard.commit(6)  # row 5 went nowhere
    assert writer.committed == [] and list((tmp_path / "out" / ".pear").glob("*.tmp")) == []
    with pytest.raises(RuntimeError, match="outside the shard"):
        with writer.shard() as shard:
            shard.write(make_rows(0, 4))
            shard.reject(pa.table({"row_index": [9], "reject_reason": ["x"]}))
            shard.commit(5)


def test_finalize_checks_row_conservation(tmp_path):
    out = tmp_path / "out"
    writer = DatasetWriter(out, RUN_KEY)
    with writer.shard() as shard:
        process_shard(shard, 0, SHARD_ROWS)
    # An edited (or corrupted) progress.json: the counts no longer add up.
    progress_path = out / ".pear" / "progress.json"
    progress = json.loads(progress_path.read_text())
    progress["shards"][0]["input_end"] += 1
    progress_path.write_text(json.dumps(progress))
    with pytest.raises(OutputError, match=r"rows_in 17 != rows_out \d+ \+ rows_rejected \d+"):
        DatasetWriter(out, RUN_KEY, resume=True).finalize(MANIFEST)
    assert not (out / "manifest.json").exists()


def test_rejects_are_merged_sorted_and_schema_promoted(tmp_path):
    out = tmp_path / "out"
    writer = DatasetWriter(out, RUN_KEY)
    with writer.shard() as shard:
        shard.write(make_rows(0, 1))
        shard.reject(
            pa.table({"row_index": pa.array([3, 1], pa.int32()), "reject_reason": ["too long", "empty completion"]})
        )
        shard.reject(pa.table({"row_index": [2], "reject_reason": ["nan logprob"], "text": [None]}))
        shard.commit(4)
    with writer.shard() as shard:  # all rows of this shard rejected: no data file
        shard.reject(pa.table({"row_index": [6, 4, 5], "reject_reason": ["a", "b", "c"], "text": ["x", "y", "z"]}))
        shard.commit(7)
    with writer.shard() as shard:
        shard.write(make_rows(7, 9))
        shard.commit(9)
    manifest = writer.finalize(MANIFEST)
    rejects = pq.read_table(out / "rejects.parquet")
    assert rejects["row_index"].to_pylist() == [1, 2, 3, 4, 5, 6]
    assert rejects["reject_reason"].to_pylist() == ["empty completion", "nan logprob", "too long", "b", "c", "a"]
    assert rejects.schema.field("row_index").type == pa.int64()
    assert rejects.schema.field("text").type == pa.string()
    assert rejects["text"].to_pylist() == [None, None, None, "y", "z", "x"]
    assert [s["data_file"] for s in manifest["shards"]] == ["data/part-00000.parquet", None, "data/part-00001.parquet"]
    assert manifest["rows"] == {"in": 9, "out": 3, "rejected": 6}


def test_no_rejects_means_no_rejects_file(tmp_path):
    out = tmp_path / "out"
    writer = DatasetWriter(out, RUN_KEY)
    with writer.shard() as shard:
        shard.write(make_rows(0, 3))
        shard.commit(3)
    (out / "rejects.parquet").write_bytes(b"stale")  # e.g. left by an earlier finalize
    writer.finalize(MANIFEST)
    assert not (out / "rejects.parquet").exists()


def test_reject_requires_row_index_and_reason(tmp_path):
    writer = DatasetWriter(tmp_path / "out", RUN_KEY)
    with pytest.raises(ValueError, match="reject_reason"):
        with writer.shard() as shard:
            shard.reject(pa.table({"row_index": [0]}))


def test_leaving_shard_without_commit_is_an_error(tmp_path):
    writer = DatasetWriter(tmp_path / "out", RUN_KEY)
    with pytest.raises(RuntimeError, match="without commit"):
        with writer.shard() as shard:
            shard.write(make_rows(0, 2))
    assert writer.committed == [] and list((tmp_path / "out" / ".pear").glob("*.tmp")) == []


def test_column_types_are_promoted_within_and_across_shards(tmp_path):
    out = tmp_path / "out"
    writer = DatasetWriter(out, RUN_KEY)
    with writer.shard() as shard:
        rows = make_rows(0, 4)
        shard.write(rows.slice(0, 2).append_column("source", pa.nulls(2)))  # null-typed: all missing so far
        shard.write(rows.slice(2, 2).append_column("source", pa.array(["gsm8k", None])))
        shard.commit(4)
    with writer.shard() as shard:
        shard.write(make_rows(4, 6).append_column("source", pa.nulls(2)))
        shard.commit(6)
    writer.finalize(MANIFEST)
    for path in data_files(out):
        assert pq.read_schema(path).field("source").type == pa.string()
    table = pa.concat_tables([pq.read_table(p) for p in data_files(out)])
    assert table["source"].to_pylist() == [None, None, "gsm8k", None, None, None]
    assert table["row_index"].to_pylist() == list(range(6))


def test_rewrite_data_files_keeps_rows_and_row_groups(tmp_path):
    out = tmp_path / "out"
    writer = DatasetWriter(out, RUN_KEY)
    with writer.shard() as shard:
        process_shard(shard, 0, SHARD_ROWS)
    before = pq.read_table(data_files(out)[0])
    groups = pq.ParquetFile(data_files(out)[0]).metadata.num_row_groups
    writer.rewrite_data_files(halve_seq_weight, name="halve")
    after = pq.read_table(data_files(out)[0])
    np.testing.assert_array_equal(
        after["pear_seq_weight"].to_numpy(), before["pear_seq_weight"].to_numpy() * np.float32(0.5)
    )
    assert after.drop_columns(["pear_seq_weight"]).equals(before.drop_columns(["pear_seq_weight"]))
    assert pq.ParquetFile(data_files(out)[0]).metadata.num_row_groups == groups
    assert writer.rewrites == ["halve"] and writer.finished is False
    with pytest.raises(RuntimeError, match="already applied"):
        writer.rewrite_data_files(halve_seq_weight, name="halve")
    with pytest.raises(RuntimeError, match="must keep every row"):
        rewrite_data_files(out, lambda t: t.slice(1))
    assert pq.read_table(data_files(out)[0]).equals(after)  # a failed rewrite changes nothing
    assert not list(out.rglob("*.tmp"))


def test_load_dataset_reads_rows_in_input_order(tmp_path):
    datasets = pytest.importorskip("datasets")
    out = tmp_path / "out"
    writer = DatasetWriter(out, RUN_KEY)
    expected = []
    for start in range(0, 60, 5):  # 12 data files: part-00010 must come after part-00009
        with writer.shard() as shard:
            process_shard(shard, start, start + 5)
        expected.append(make_rows(start, start + 5))
    writer.finalize(MANIFEST)
    assert len(data_files(out)) == 12
    expected = pa.concat_tables(expected)
    expected = expected.filter(pa.array(~is_rejected(expected["row_index"].to_numpy())))
    ds = datasets.load_dataset("parquet", data_dir=str(out / "data"), split="train", cache_dir=str(tmp_path / "cache"))
    assert ds["row_index"] == expected["row_index"].to_pylist()
    assert ds["input_ids"] == expected["input_ids"].to_pylist()
    assert ds.features["completion_mask"] == datasets.List(datasets.Value("int8"))
    assert ds.features["pear_seq_weight"] == datasets.Value("float32")
    from_parquet = datasets.Dataset.from_parquet(str(out / "data" / "*.parquet"), cache_dir=str(tmp_path / "cache2"))
    assert from_parquet["row_index"] == expected["row_index"].to_pylist()


def _no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_a_full_disk_in_reweight_exits_2_without_suggesting_resume(monkeypatch, capsys, scored, tmp_path):
    monkeypatch.setattr(shard_module, "write_rows", _no_space)
    code, _, err = cli(capsys, "reweight", scored, "--out", tmp_path / "out")
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
    code, _, err = cli(capsys, "reweight", scored, "--out", tmp_path / "ro" / "out")
    assert_user_error(code, err, "Read-only file system", "ro")


def test_a_failed_reweight_never_suggests_resume(monkeypatch, capsys, scored, output, tmp_path):
    existing = copy_output(output, tmp_path / "existing")
    code, _, err = cli(capsys, "reweight", scored, "--out", existing)
    assert_user_error(code, err, "--overwrite")
    assert "--resume" not in err
