"""Ctrl-C and SIGTERM stop a run cleanly (pear_data/shutdown.py, docs/design.md section 6).

Every stop ends in exit 130 (SIGINT) or 143 (SIGTERM), never in a traceback or a native crash (134, 139:
torch still running in a thread while the interpreter exits), and the output resumes to the bytes of a run
never interrupted. The CLI runs in subprocesses here (signals, process groups and exit codes are the
point), on a tiny model (tests/tiny_model.py) and a corpus long enough that scoring takes a few seconds.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pyarrow as pa
import pytest

from pear_data.corpus import CorpusRow
from pear_data.engines.local import ThreadEngine
from pear_data.engines.work import ShardTask
from pear_data.output import DatasetWriter
from pear_data.policies import PreparedShard, ScoredShard

from .cli_harness import output_files
from .scored_data import scored_table

ROOT = Path(__file__).resolve().parents[1]
GSM8K = ROOT / "examples" / "data" / "gsm8k_sample.jsonl"
SHARD_ROWS = 64
CRASHES = ("Traceback", "terminate called", "Segmentation", "Fatal Python error", "Exception ignored", "core dumped")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """20 shards of GSM8K rows (the sample, repeated)."""
    lines = GSM8K.read_text().splitlines()
    path = tmp_path_factory.mktemp("corpus") / "long.jsonl"
    path.write_text("\n".join((lines * 20)[: 20 * SHARD_ROWS]) + "\n")
    return path


def command(corpus: Path, out: Path, model: Path, *extra) -> list[str]:
    return [sys.executable, "-m", "pear_data.cli", "score", str(corpus), "--out", str(out), "--target", str(model),
            "--behavior", str(model), "--behavior-temperature", "0.7", "--prompt-field", "question",
            "--completion-field", "answer", "--device", "cpu", "--shard-rows", str(SHARD_ROWS), *extra]


def start(args: list[str]) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONFAULTHANDLER": "1", "PYTHONPATH": os.pathsep.join([str(ROOT),
                                                                                os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)  # its own process group, as a terminal job has


def committed(out: Path) -> int:
    try:
        return len(json.loads((out / ".pear" / "progress.json").read_text())["shards"])
    except (OSError, ValueError, KeyError):
        return 0


def interrupt(process: subprocess.Popen, out: Path, point: tuple[str, float], signum: int,
              group: bool = False) -> tuple[int, str]:
    """Send `signum` at `point`: ("time", s after the start) or ("shards", n more committed shards), then a
    random fraction of a second more; (exit code, stderr)."""
    kind, value = point
    if kind == "shards":
        target, deadline = committed(out) + value, time.time() + 300
        while committed(out) < target and process.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        value = random.Random(target).uniform(0.0, 0.3)
    time.sleep(value)
    assert process.poll() is None, "the run ended before it was interrupted"
    (os.killpg if group else os.kill)(process.pid, signum)
    _, err = process.communicate(timeout=300)
    return process.returncode, err


def assert_clean(code: int, err: str, expected: int) -> None:
    assert code == expected, err
    for crash in CRASHES:
        assert crash not in err, err


@pytest.fixture(scope="module")
def uninterrupted(corpus, tiny_model_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "whole"
    process = start(command(corpus, out, tiny_model_dir))
    _, err = process.communicate(timeout=600)
    assert process.returncode == 0, err
    return out


def test_repeated_ctrl_c_at_random_points_exits_130_and_resumes_to_the_same_bytes(
        corpus, tiny_model_dir, uninterrupted, tmp_path):
    out = tmp_path / "out"
    rng = random.Random(23)
    points = [("time", rng.uniform(0.15, 0.6)),  # interpreter start, imports
              ("time", rng.uniform(1.0, 3.0)),  # torch, the model, the column pass
              ("shards", 1), ("shards", rng.randint(1, 3)), ("shards", rng.randint(1, 3))]
    for point in points:
        code, err = interrupt(start(command(corpus, out, tiny_model_dir, "--resume")), out, point, signal.SIGINT)
        assert_clean(code, err, 130)
    assert committed(out) < 20
    process = start(command(corpus, out, tiny_model_dir, "--resume"))
    _, err = process.communicate(timeout=600)
    assert process.returncode == 0, err
    assert output_files(out) == output_files(uninterrupted)


def test_sigterm_exits_143_and_the_run_resumes(corpus, tiny_model_dir, uninterrupted, tmp_path):
    out = tmp_path / "out"
    for point in [("time", 2.0), ("shards", 2)]:
        code, err = interrupt(start(command(corpus, out, tiny_model_dir, "--resume")), out, point, signal.SIGTERM)
        assert_clean(code, err, 143)
    process = start(command(corpus, out, tiny_model_dir, "--resume"))
    _, err = process.communicate(timeout=600)
    assert process.returncode == 0, err
    assert output_files(out) == output_files(uninterrupted)


def test_ctrl_c_in_reweight_exits_130_and_overwrite_gives_the_same_bytes(uninterrupted, tmp_path):
    """Reading (a prefetch thread), weighing and writing (an encoding thread) stop; the output is rerun."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}

    def reweight(out: Path, *extra) -> list[str]:
        return [sys.executable, "-m", "pear_data.cli", "reweight", str(uninterrupted), "--out", str(out),
                "--normalize", "dataset", "--shard-rows", "16", *extra]

    whole = subprocess.run(reweight(tmp_path / "whole"), capture_output=True, text=True, env=env, timeout=600)
    assert whole.returncode == 0, whole.stderr
    out = tmp_path / "out"
    process = start(reweight(out))
    code, err = interrupt(process, out, ("shards", 3), signal.SIGINT, group=True)
    assert_clean(code, err, 130)
    assert "--resume" not in err
    again = subprocess.run(reweight(out, "--overwrite"), capture_output=True, text=True, env=env, timeout=600)
    assert again.returncode == 0, again.stderr
    assert output_files(out) == output_files(tmp_path / "whole")


def test_ctrl_c_at_the_terminal_stops_the_worker_processes_too(corpus, tiny_model_dir, tmp_path):
    """A terminal's Ctrl-C reaches the whole process group: the workers ignore it, the driver stops them."""
    out = tmp_path / "out"
    process = start(command(corpus, out, tiny_model_dir, "--workers", "2"))
    code, err = interrupt(process, out, ("shards", 2), signal.SIGINT, group=True)
    assert_clean(code, err, 130)
    assert "leaked" not in err, err  # the workers ended normally (their semaphores are cleaned up)
    deadline = time.time() + 10
    while time.time() < deadline:  # nothing of the run is left in its process group
        try:
            os.killpg(process.pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        pytest.fail("processes of the interrupted run are still alive")


# --------------------------------------------------------------------------- the pieces, in this process


class Slow:
    """Stand-in policies whose scoring takes a while, one 'batch' at a time, and obeys a stop event."""

    description = {"stand-in": True}

    def __init__(self, stop: threading.Event) -> None:
        self.stop = stop
        self.started = threading.Event()
        self.batches = 0

    def prepare(self, rows: list[CorpusRow]) -> PreparedShard:
        return PreparedShard(rejects=[(row, "x") for row in rows])

    def score(self, prepared: PreparedShard) -> ScoredShard:
        self.started.set()
        for _ in range(1000):
            if self.stop.is_set():
                raise RuntimeError("stopped")  # as TorchScorer raises ScoringStopped
            self.batches += 1
            time.sleep(0.01)
        return ScoredShard(pa.table({}), [], [])


class OneRow:
    """A corpus of one row (what an engine reads of a corpus)."""

    def rows(self):
        return iter([CorpusRow(0, {})])


def test_a_cancelled_worker_thread_stops_at_its_next_batch_and_is_joined() -> None:
    stop = threading.Event()
    policies = Slow(stop)
    engine = ThreadEngine(policies, OneRow(), shard_rows=1, stop=stop)
    engine.inbox.put(ShardTask(0, [CorpusRow(0, {})]))
    with pytest.raises(KeyboardInterrupt), engine:
        assert policies.started.wait(10)
        raise KeyboardInterrupt  # Ctrl-C in the driver while a shard is being scored
    assert not engine._thread.is_alive()
    assert policies.batches < 1000
    assert not [t for t in threading.enumerate() if t.name.startswith("pear-")]


def test_a_scoring_error_reaches_the_driver_while_the_prepare_thread_waits_for_tasks() -> None:
    class Failing:
        description = {}

        def prepare(self, rows):
            return PreparedShard(rejects=[(row, "x") for row in rows])

        def score(self, prepared):
            raise ValueError("scoring failed")

    engine = ThreadEngine(Failing(), OneRow(), shard_rows=1)
    with pytest.raises(Exception, match="scoring failed"), engine:
        list(engine.results(0))
    assert not engine._thread.is_alive()


def test_an_interrupt_after_the_commit_point_keeps_the_committed_shard(monkeypatch, tmp_path) -> None:
    """A Ctrl-C can land between progress.json's rename and the end of the commit: the shard is committed
    then, and its files must stay (kill -9 at that point keeps them too)."""
    from pear_data.output import files as files_module

    out = tmp_path / "out"
    writer = DatasetWriter(out, {"k": 1})
    fsync_dir = files_module.fsync_dir

    def interrupted(path):
        fsync_dir(path)
        if path == out / ".pear":
            raise KeyboardInterrupt

    monkeypatch.setattr(files_module, "fsync_dir", interrupted)
    with pytest.raises(KeyboardInterrupt), writer.shard() as shard:
        shard.write(scored_table(3))
        shard.commit(3)
    writer.close()
    monkeypatch.undo()
    resumed = DatasetWriter(out, {"k": 1}, resume=True)
    assert resumed.next_input_row == 3
    assert (out / "data" / "part-00000.parquet").is_file()
    resumed.close()


def test_a_closed_prefetch_stops_its_thread_and_joins_it() -> None:
    from pear_data.threads import prefetch

    produced = []

    def items():
        for i in range(1000):
            produced.append(i)
            yield i

    ahead = prefetch(items(), depth=2)
    assert next(ahead) == 0
    ahead.close()  # the consumer stops early (an error, a Ctrl-C)
    assert not [t for t in threading.enumerate() if t.name == "pear-prefetch"]
    assert len(produced) < 10


STOPPED_IN_EXEC = textwrap.dedent(
    """
    from pear_data import shutdown

    def main():
        with shutdown.handled():
            try:
                exec("raise KeyboardInterrupt")  # as a Ctrl-C inside a dataclass being built
            except KeyboardInterrupt:
                shutdown.leave(shutdown.exit_code())

    shutdown.run_process(main)
    """
)


def test_a_stop_exits_130_even_after_an_interrupt_inside_exec(tmp_path) -> None:
    """`python -m` ends a process by SIGINT at exit once a KeyboardInterrupt passed through an `exec` of source
    text, whatever sys.exit said; leaving through os._exit keeps the code."""
    (tmp_path / "stopped_in_exec.py").write_text(STOPPED_IN_EXEC)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-m", "stopped_in_exec"], capture_output=True, text=True, env=env,
                            timeout=120)
    assert result.returncode == 130, result.stderr
