"""The engines on this machine: one worker thread (`--workers 1`), or N worker processes (`--workers N`).

    ThreadEngine    a thread of the driver process, with the policies the driver loaded
    ProcessEngine   N processes, each with its own copy of the models: cuda:0..N-1 on a GPU node; on CPU the
                    cores are split between them

Both send the corpus's shards (`work.shard_tasks`) to their workers, at most `capacity` ahead of the commits, and
yield the scored shards in shard order. A worker process that dies (killed, out of memory) stops the run with a
`WorkerLost` (exit 2). `close(cancel=True)` (an error or a Ctrl-C in the driver) stops every worker at its
scorer's next batch: the worker thread is joined, and worker processes (which ignore SIGINT: the driver stops
them) end normally or are killed after a grace period, so no torch work runs on while the interpreter exits
(pear_data/shutdown.py).
"""

from __future__ import annotations

import multiprocessing
import os
import queue
import signal
import threading
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from .. import shutdown
from .work import PREPARED_AHEAD, ScorerProgress, ShardTask, WorkerLost, failure, shard_tasks, work

if TYPE_CHECKING:
    from ..corpus import Corpus
    from ..policies import PolicyRecipe, ScoredShard, ScoringDescription

# How often (s) the driver checks that its workers are alive while it waits for a result.
LIVENESS_POLL = 1.0
# How long (s) `close` waits for its worker processes to end by themselves before it kills them.
PROCESS_GRACE = 5.0

Advance = Callable[[int, int], None]


class _QueueEngine:
    """What the thread and the process engines share: tasks out through `inbox`, messages back through
    `outbox`, results in shard order. Subclasses start the workers and say how they stop."""

    description: ScoringDescription

    def __init__(self, corpus: Corpus, shard_rows: int, count: int, advance: Advance | None) -> None:
        self.corpus, self.shard_rows, self.count = corpus, shard_rows, count
        self.advance = advance or (lambda rows, tokens: None)
        self.capacity = count * (2 + PREPARED_AHEAD)  # shards sent and not yet committed, at most

    def results(self, start: int) -> Iterator[tuple[int, ScoredShard]]:
        """Score the corpus from input row `start` on: (input_end, ScoredShard) in shard order."""
        tasks = shard_tasks(self.corpus.rows(), start, self.shard_rows)
        pending: dict[int, tuple[int, ScoredShard]] = {}
        sent = done = 0
        exhausted = False
        while True:
            while not exhausted and sent - done < self.capacity:
                task = next(tasks, None)
                if task is None:
                    exhausted = True
                    break
                self.inbox.put(task)
                sent += 1
            if done == sent and exhausted:
                return
            while done not in pending:
                message = self._receive()
                if message[0] == "done":
                    pending[message[1]] = (message[2], message[3])
            yield pending.pop(done)
            done += 1

    def _receive(self) -> tuple:
        """The next message from the workers; progress goes to the bar, failures are raised here."""
        while True:
            try:
                message = self.outbox.get(timeout=LIVENESS_POLL)
            except queue.Empty:
                self._check_alive()
                continue
            if message[0] == "progress":
                self.advance(message[1], message[2])
            elif message[0] == "failed":
                raise message[1]
            else:
                return message

    def _check_alive(self) -> None:
        """Raise WorkerLost when a worker died (processes only)."""

    def __enter__(self) -> _QueueEngine:
        return self

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        self.close(cancel=exc_type is not None)


class ThreadEngine(_QueueEngine):
    """One worker thread of this process, scoring with `policies` (loaded by the driver with the `progress` and
    the `stop` event given here, so that a cancel stops a shard at its next batch)."""

    def __init__(self, policies: Any, corpus: Corpus, shard_rows: int, progress: ScorerProgress | None = None,
                 advance: Advance | None = None, stop: threading.Event | None = None) -> None:
        super().__init__(corpus, shard_rows, 1, advance)
        self.stop = stop or threading.Event()
        self.inbox: Any = queue.Queue()
        self.outbox: Any = queue.Queue()
        self.description = policies.description

        def run() -> None:
            try:
                work(policies, lambda timeout: self.inbox.get(timeout=timeout), self.outbox.put, progress, self.stop)
            except BaseException as exc:  # noqa: BLE001 - reported to the driver (unless it stopped us)
                if not self.stop.is_set():
                    self.outbox.put(failure(exc))

        self._thread = threading.Thread(target=run, name="pear-worker", daemon=True)
        self._thread.start()

    def close(self, cancel: bool = False) -> None:
        """Stop the worker thread and join it: without `cancel` it finishes what it holds; with `cancel` it
        stops at its scorer's next batch. Unfinished shards are simply not committed."""
        if cancel:
            self.stop.set()
        self.inbox.put(None)
        self._thread.join()


class ProcessEngine(_QueueEngine):
    """`count` worker processes, each loading the policies of `recipe` on its device (`worker_devices`)."""

    def __init__(self, recipe: PolicyRecipe, corpus: Corpus, shard_rows: int, count: int,
                 advance: Advance | None = None) -> None:
        super().__init__(corpus, shard_rows, count, advance)
        context = multiprocessing.get_context("spawn")
        self.stop = context.Event()
        self.inbox, self.outbox = context.Queue(), context.Queue()
        self._processes: list[multiprocessing.process.BaseProcess] = []
        try:
            self._start(context, recipe)
        except BaseException:
            self.close(cancel=True)
            raise

    def _start(self, context: Any, recipe: PolicyRecipe) -> None:
        """Start the worker processes (SIGINT ignored from their first instruction on) and wait until each has
        loaded its models."""
        devices, threads = worker_devices(recipe.scoring.device, self.count)
        for device in devices:
            process = context.Process(target=_process_main, name=f"pear-worker-{device}", daemon=True,
                                      args=(recipe.on(device), threads, self.inbox, self.outbox, self.stop))
            with shutdown.sigint_ignored():
                process.start()
            self._processes.append(process)
        descriptions = [self._receive()[1] for _ in devices]  # ("ready", description) from each
        self.description = descriptions[0]

    def _check_alive(self) -> None:
        dead = [p for p in self._processes if not p.is_alive()]
        if dead:
            raise WorkerLost(
                f"scoring worker {dead[0].name} died (exit code {dead[0].exitcode}): killed, or out of memory (try "
                "a smaller --batch-tokens or fewer --workers). The shards committed so far are kept: rerun with "
                "--resume to go on."
            ) from None

    def close(self, cancel: bool = False) -> None:
        """Stop the workers: without `cancel` each finishes what it holds; with `cancel` each stops at its
        scorer's next batch. Processes that have not ended within PROCESS_GRACE seconds are killed (they write
        nothing, so nothing is lost)."""
        if cancel:
            self.stop.set()
        for _ in self._processes:
            self.inbox.put(None)
        deadline = time.monotonic() + PROCESS_GRACE
        for process in self._processes:
            process.join(timeout=max(0.0, deadline - time.monotonic()))
            if process.is_alive():
                process.kill()
                process.join(timeout=PROCESS_GRACE)


def _process_main(recipe: PolicyRecipe, threads: int, inbox: Any, outbox: Any, stop: Any) -> None:
    """A worker process: load the policies, then `work` until the driver sends None, or sets `stop` (a
    multiprocessing Event: the scorer stops at its next batch, and the process ends normally).

    It ignores SIGINT: a Ctrl-C reaches the whole process group, and the driver stops its workers itself."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if threads:
        import torch

        torch.set_num_threads(threads)
    parent = multiprocessing.parent_process()

    def tasks(timeout: float) -> ShardTask | None:
        try:
            return inbox.get(timeout=timeout)
        except queue.Empty:  # a driver killed with -9 must not leave this process behind
            if parent is not None and not parent.is_alive():
                os._exit(1)
            raise

    try:
        progress = ScorerProgress(lambda rows, tokens: outbox.put(("progress", rows, tokens)))
        policies = recipe.load(progress, stop=stop)
        outbox.put(("ready", policies.description))
        work(policies, tasks, outbox.put, progress, stop)
    except BaseException as exc:  # noqa: BLE001 - reported to the driver, which stops the run (unless it did)
        if not stop.is_set():
            outbox.put(failure(exc))


def worker_devices(device: str, count: int) -> tuple[list[str], int]:
    """The device of each of `count` worker processes, and the torch threads each gets (0: torch's default).

    CUDA (`--device cuda` or auto with a GPU): one GPU per worker, cuda:0..count-1. CPU: every worker on the
    CPU, the cores split evenly between them. The device was checked (`scoring.check_device`).
    """
    from ..scoring import check_device, resolve_device

    check_device(device, count)
    if resolve_device(device).startswith("cuda"):
        return [f"cuda:{i}" for i in range(count)], 0
    return ["cpu"] * count, max(1, (os.cpu_count() or 1) // count)
