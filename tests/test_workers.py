"""Scale-out: --workers N (processes) and --ray local give the bytes of --workers 1, and resume after a worker or
the driver is killed. Plus the engine's ordering and backpressure on a stand-in for the policies."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import pyarrow as pa
import pytest

from pear_data.corpus import CorpusRow
from pear_data.engines.local import ThreadEngine, worker_devices
from pear_data.errors import UsageError
from pear_data.policies import PreparedShard, ScoredShard

from .cli_harness import cli_process, command, output_files

ROOT = Path(__file__).resolve().parents[1]
GSM8K = ROOT / "examples" / "data" / "gsm8k_sample.jsonl"


# --------------------------------------------------------------------------- the engine, no model


class Rows:
    """What an engine needs of a corpus: its rows, in order."""

    def __init__(self, count: int) -> None:
        self.count = count

    def rows(self):
        return (CorpusRow(i, {}) for i in range(self.count))


class StandIn:
    """What an engine needs of Policies: prepare (here: sleeps a little, longer for early shards so that they
    finish out of order) and score; records the most shards in flight at once."""

    description = {"stand-in": True}

    def __init__(self) -> None:
        self.in_flight = self.most = 0
        self.lock = threading.Lock()

    def prepare(self, rows: list[CorpusRow]) -> PreparedShard:
        with self.lock:
            self.in_flight += 1
            self.most = max(self.most, self.in_flight)
        time.sleep(0.002 * (rows[0].index % 3))
        return PreparedShard(rejects=[(row, f"row {row.index}") for row in rows])

    def score(self, prepared: PreparedShard) -> ScoredShard:
        with self.lock:
            self.in_flight -= 1
        return ScoredShard(pa.table({}), [], [(row.index, reason, "") for row, reason in prepared.rejects])


def test_results_come_back_in_shard_order_with_bounded_work_in_flight() -> None:
    policies = StandIn()
    with ThreadEngine(policies, Rows(80), shard_rows=2) as engine:
        results = list(engine.results(0))
    assert [end for end, _ in results] == [2 * (n + 1) for n in range(40)]
    assert [s.rejects[0][0] for _, s in results] == [2 * n for n in range(40)]
    assert policies.most <= 2  # the shard being scored and the one prepared ahead


def test_a_worker_error_reaches_the_driver_as_itself() -> None:
    class Failing(StandIn):
        def prepare(self, rows):
            raise UsageError("--max-length 3: over max length")

    engine = ThreadEngine(Failing(), Rows(1), shard_rows=1)
    with pytest.raises(UsageError, match="over max length"), engine:
        list(engine.results(0))


def test_one_gpu_cannot_hold_several_workers() -> None:
    assert worker_devices("cpu", 2)[0] == ["cpu", "cpu"]
    with pytest.raises(UsageError):
        worker_devices("mps", 2)


def test_a_resumed_run_cuts_the_shards_a_whole_run_cuts() -> None:
    from pear_data.engines.work import shard_tasks

    whole = [(t.number, [r.index for r in t.rows]) for t in shard_tasks(Rows(7).rows(), 0, 3)]
    resumed = [(t.number, [r.index for r in t.rows]) for t in shard_tasks(Rows(7).rows(), 3, 3)]
    assert whole == [(0, [0, 1, 2]), (1, [3, 4, 5]), (2, [6])]
    assert resumed == [(0, [3, 4, 5]), (1, [6])]


# --------------------------------------------------------------------------- end to end, in processes


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    """A byte-level model large enough that a shard takes a moment to score (a worker can be killed mid-run)."""
    from .tiny_model import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("models") / "slow", hidden_size=384, num_layers=4)


def flags(model: Path) -> list[str]:
    return ["--prompt-field", "question", "--completion-field", "answer", "--target", str(model), "--behavior",
            str(model), "--behavior-temperature", "0.7", "--shard-rows", "3", "--device", "cpu"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """16 GSM8K rows and two rows that are rejected (an undecodable line, a missing answer): 6 shards of 3."""
    lines = GSM8K.read_text().splitlines()[:16]
    lines.insert(2, '{"question": "broken')
    lines.insert(7, json.dumps({"question": "no answer"}))
    path = tmp_path_factory.mktemp("corpus") / "rows.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def reference(corpus, model, tmp_path_factory) -> dict[str, bytes]:
    out = tmp_path_factory.mktemp("one") / "out"
    result = cli_process("score", corpus, "--out", out, *flags(model), "--workers", "1")
    assert result.code == 0, result.err
    files = output_files(out)
    assert "rejects.parquet" in files and len([f for f in files if f.startswith("data/")]) == 6
    return files


def test_two_worker_processes_write_the_bytes_of_one(corpus, model, reference, tmp_path) -> None:
    result = cli_process("score", corpus, "--out", tmp_path / "two", *flags(model), "--workers", "2")
    assert result.code == 0, result.err
    assert output_files(tmp_path / "two") == reference


def _wait_for_commits(out: Path, process: subprocess.Popen, count: int) -> bool:
    """Wait until the run committed `count` shards (True) or ended (False)."""
    progress = out / ".pear" / "progress.json"
    deadline = time.time() + 600
    while time.time() < deadline and process.poll() is None:
        if progress.exists():
            try:
                if len(json.loads(progress.read_text()).get("shards", [])) >= count:
                    return True
            except json.JSONDecodeError:
                pass
        time.sleep(0.02)
    return False


def test_a_killed_worker_stops_the_run_cleanly_and_resume_finishes_it(corpus, model, reference, tmp_path) -> None:
    out = tmp_path / "killed"
    process = subprocess.Popen(command("score", corpus, "--out", out, *flags(model), "--workers", "2"),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert _wait_for_commits(out, process, 1), process.communicate()[1]
    children = subprocess.run(["pgrep", "-P", str(process.pid)], capture_output=True, text=True).stdout.split()
    workers = [int(pid) for pid in children if "spawn_main" in Path(f"/proc/{pid}/cmdline").read_text(errors="replace")]
    assert workers, children
    os.kill(workers[-1], signal.SIGKILL)
    _, stderr = process.communicate(timeout=600)
    if process.returncode == 0:  # the worker had already finished its last shard: nothing was lost
        assert output_files(out) == reference
        return
    assert process.returncode == 2, stderr
    assert "died" in stderr and "--resume" in stderr and "Traceback" not in stderr
    # resumed by one worker (a thread): the shards two processes committed and the rest give the bytes of one
    resumed = cli_process("score", corpus, "--out", out, *flags(model), "--resume")
    assert resumed.code == 0, resumed.err
    assert output_files(out) == reference


@pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="--ray needs pear-data[ray]")
def test_a_ray_run_killed_with_its_driver_resumes_to_the_bytes_of_one_worker(corpus, model, reference,
                                                                            tmp_path) -> None:
    """--ray local: the driver killed after its first commit, then the run resumed on Ray: every shard scored by
    Ray actors, committed by the driver, gives the bytes of --workers 1."""
    out = tmp_path / "ray-killed"
    process = subprocess.Popen(command("score", corpus, "--out", out, *flags(model), "--ray", "local", "--workers",
                                       "2"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if _wait_for_commits(out, process, 1):
        os.kill(process.pid, signal.SIGKILL)
    process.wait()
    resumed = cli_process("score", corpus, "--out", out, *flags(model), "--ray", "local", "--workers", "2", "--resume")
    assert resumed.code == 0, resumed.err
    assert output_files(out) == reference
