"""Who does the per-shard work of `score`, and how it overlaps (docs/design.md section 5, "Workers").

The recipe (score.py) hands shards of input rows to *workers* and gets their
scored shards back in shard order; it weighs and commits each one (weigh.py,
writer.py) while the workers go on with the next ones. A worker does the two
steps of policies.py: prepare (CPU: conversation, target tokens, behavior
row) and score (the models). Inside a worker a prepare thread works one shard
ahead of the scoring, so the CPU steps overlap the forward passes; queues
between the steps are bounded, so at most a few shards are in memory.

    --workers 1   one worker thread in the driver process, with the models the driver loaded
    --workers N   N worker processes, each with its own copy of the models: cuda:0..N-1 on a GPU node;
                  on CPU the cores are split between them
    --ray         ray_engine.py: the same two steps as Ray Data stages on a cluster

Batches never cross a shard and a shard's rows are scored the same way
whichever worker gets it, so the output is byte-identical for any worker
count. Workers never write to the output directory: only the driver commits.
A worker that dies (killed, out of memory) stops the run with a `WorkerLost`
(exit 2); every shard committed before it is kept, and `--resume` goes on.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import os
import queue
import threading
import traceback
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .errors import PearDataError, UsageError

if TYPE_CHECKING:
    from .corpus import CorpusRow, InputColumns, RowShape
    from .policies import ModelSources, Policies, ScoredShard
    from .score import ScoreOptions

# Shards a worker holds beyond the one it scores: the next one, prepared while the current one is scored.
PREPARED_AHEAD = 1
# How often (s) the driver checks that its workers are alive while it waits for a result.
LIVENESS_POLL = 1.0


def prefetch(items: Iterable, depth: int = 2) -> Iterator:
    """The items of `items`, produced by a thread up to `depth` ahead of the consumer (reading the next
    Parquet batch while this one is weighed, say). An error in the producer is raised to the consumer."""
    done = object()
    ahead: queue.Queue = queue.Queue(maxsize=depth)

    def produce() -> None:
        try:
            for item in items:
                ahead.put(item)
            ahead.put(done)
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            ahead.put(exc)

    threading.Thread(target=produce, name="pear-prefetch", daemon=True).start()
    while (item := ahead.get()) is not done:
        if isinstance(item, BaseException):
            raise item
        yield item


class WorkerLost(PearDataError):
    """A worker process died (killed, or out of memory) before it returned its shard."""


class WorkerFailed(RuntimeError):
    """A worker raised an unexpected error (a bug); carries the worker's traceback."""


@dataclass(frozen=True)
class ShardTask:
    """A shard sent to a worker: its number in this run and its input rows (all rows of one shard)."""

    number: int
    rows: list[CorpusRow]

    @property
    def input_end(self) -> int:
        return self.rows[-1].index + 1


class Progress:
    """Turns a scorer's cumulative (rows, tokens) within one `score` call into increments for a sink."""

    def __init__(self, sink: Callable[[int, int], None]) -> None:
        self.sink = sink
        self.rows = self.tokens = 0

    def start_call(self) -> None:
        self.rows = self.tokens = 0

    def __call__(self, rows: int, tokens: int) -> None:
        self.sink(rows - self.rows, tokens - self.tokens)
        self.rows, self.tokens = rows, tokens


def work(policies: Policies, tasks: Callable[[], ShardTask | None], send: Callable[[tuple], None],
         progress: Progress | None) -> None:
    """The worker loop: prepare shards one ahead in a thread, score them here, send ("done", ...) per shard.

    `tasks()` returns the next task, or None when there are no more. Messages: ("progress", rows, tokens),
    ("done", number, input_end, scored), and a final ("exit",).
    """
    prepared: queue.Queue = queue.Queue(maxsize=PREPARED_AHEAD)

    def prepare() -> None:
        try:
            while (task := tasks()) is not None:
                shard = policies.prepare(task.rows)
                if shard.rejects:
                    send(("progress", len(shard.rejects), 0))
                prepared.put((task, shard))
            prepared.put(None)
        except BaseException as exc:  # noqa: BLE001 - handed to the scoring thread, which reports it
            prepared.put(exc)

    threading.Thread(target=prepare, name="pear-prepare", daemon=True).start()
    while (item := prepared.get()) is not None:
        if isinstance(item, BaseException):
            raise item
        task, shard = item
        if progress is not None:
            progress.start_call()
        send(("done", task.number, task.input_end, policies.score(shard)))
    send(("exit",))


def _failure(exc: BaseException) -> tuple:
    """A ("failed", ...) message: a user-fixable error travels as itself, anything else as its traceback."""
    if isinstance(exc, PearDataError):
        try:
            import pickle

            pickle.loads(pickle.dumps(exc))
            return ("failed", exc)
        except Exception:  # noqa: BLE001 - an error that does not pickle travels as its message
            return ("failed", UsageError(str(exc)))
    return ("failed", WorkerFailed("".join(traceback.format_exception(exc))))


def _process_main(options: ScoreOptions, sources: ModelSources, shape: RowShape, columns: InputColumns | None,
                  device: str, threads: int, inbox: Any, outbox: Any) -> None:
    """A worker process: load the policies on `device`, then `work` until the driver sends None."""
    if threads:
        import torch

        torch.set_num_threads(threads)
    from .policies import Policies

    parent = multiprocessing.parent_process()

    def tasks() -> ShardTask | None:
        while True:  # wake up now and then: a driver killed with -9 must not leave this process behind
            try:
                return inbox.get(timeout=LIVENESS_POLL)
            except queue.Empty:
                if parent is not None and not parent.is_alive():
                    os._exit(1)

    try:
        progress = Progress(lambda rows, tokens: outbox.put(("progress", rows, tokens)))
        policies = Policies.load(dataclasses.replace(options, device=device), sources, shape, progress, columns)
        outbox.put(("ready", policies.description))
        work(policies, tasks, outbox.put, progress)
    except BaseException as exc:  # noqa: BLE001 - reported to the driver, which stops the run
        outbox.put(_failure(exc))


class Workers:
    """Run shards through `count` workers and yield (input_end, ScoredShard) in shard order.

    count 1: a thread of this process, with `policies` (already loaded). count > 1: processes, each loading
    its own copy of the models on its device (`worker_devices`).
    """

    def __init__(self, count: int, options: ScoreOptions, sources: ModelSources, shape: RowShape,
                 columns: InputColumns | None = None, *,
                 policies: Policies | None = None, progress: Progress | None = None,
                 advance: Callable[[int, int], None] | None = None) -> None:
        if count < 1:
            raise UsageError(f"--workers must be >= 1, got {count}")
        self.count = count
        self.advance = advance or (lambda rows, tokens: None)
        self.capacity = count * (2 + PREPARED_AHEAD)  # shards sent and not yet committed, at most
        self._processes: list[multiprocessing.process.BaseProcess] = []
        if count == 1:
            if policies is None:
                raise ValueError("one worker runs in this process: pass the policies (loaded with `progress`)")
            self.inbox: Any = queue.Queue()
            self.outbox: Any = queue.Queue()
            self.description = policies.description

            def run() -> None:
                try:
                    work(policies, self.inbox.get, self.outbox.put, progress)
                except BaseException as exc:  # noqa: BLE001 - reported to the driver
                    self.outbox.put(_failure(exc))

            self._thread = threading.Thread(target=run, name="pear-worker", daemon=True)
            self._thread.start()
            return
        context = multiprocessing.get_context("spawn")
        self.inbox = context.Queue()
        self.outbox = context.Queue()
        devices, threads = worker_devices(options.device, count)
        for device in devices:
            process = context.Process(target=_process_main, name=f"pear-worker-{device}", daemon=True,
                                      args=(options, sources, shape, columns, device, threads, self.inbox,
                                            self.outbox))
            process.start()
            self._processes.append(process)
        self.description = None
        ready = 0
        while ready < count:
            message = self._receive()
            if message[0] == "ready":
                ready += 1
                self.description = self.description or message[1]

    def map(self, tasks: Iterable[ShardTask]) -> Iterator[tuple[int, ScoredShard]]:
        """Send the tasks, at most `capacity` ahead of the commits, and yield the results in task order."""
        tasks = iter(tasks)
        results: dict[int, tuple[int, ScoredShard]] = {}
        sent = done = 0
        first: int | None = None
        exhausted = False
        while True:
            while not exhausted and sent - done < self.capacity:
                task = next(tasks, None)
                if task is None:
                    exhausted = True
                    break
                first = task.number if first is None else first
                self.inbox.put(task)
                sent += 1
            if done == sent and exhausted:
                return
            while first + done not in results:
                message = self._receive()
                if message[0] == "done":
                    results[message[1]] = (message[2], message[3])
            yield results.pop(first + done)
            done += 1

    def _receive(self) -> tuple:
        """The next message from the workers; progress goes to the bar, failures are raised here."""
        while True:
            try:
                message = self.outbox.get(timeout=LIVENESS_POLL)
            except queue.Empty:
                dead = [p for p in self._processes if not p.is_alive()]
                if dead:
                    raise WorkerLost(
                        f"scoring worker {dead[0].name} died (exit code {dead[0].exitcode}): killed, or out of "
                        "memory (try a smaller --batch-tokens or fewer --workers). The shards committed so far are "
                        "kept: rerun with --resume to go on."
                    ) from None
                continue
            if message[0] == "progress":
                self.advance(message[1], message[2])
            elif message[0] == "failed":
                raise message[1]
            else:
                return message

    def close(self) -> None:
        """Stop the workers (each finishes nothing more; unfinished shards are simply not committed)."""
        for _ in range(self.count):
            self.inbox.put(None)
        for process in self._processes:
            process.join(timeout=5)
            if process.is_alive():
                process.terminate()
                process.join(timeout=5)

    def __enter__(self) -> Workers:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def worker_devices(device: str, count: int) -> tuple[list[str], int]:
    """The device of each of `count` worker processes, and the torch threads each gets (0: torch's default).

    CUDA (`--device cuda` or auto with a GPU): one GPU per worker, cuda:0..count-1. CPU: every worker on the
    CPU, the cores split evenly between them. A single device (`cuda:1`) cannot hold several workers.
    """
    from .scoring import resolve_device

    try:
        resolved = resolve_device(device)
    except ValueError as exc:
        raise UsageError(f"--device {device}: {exc}") from None
    if resolved.startswith("cuda"):
        import torch

        if ":" in resolved:
            raise UsageError(f"--device {device} names one GPU; --workers {count} needs --device cuda (one GPU each)")
        available = torch.cuda.device_count()
        if count > available:
            raise UsageError(f"--workers {count} needs {count} GPUs, this machine has {available}")
        return [f"cuda:{i}" for i in range(count)], 0
    return ["cpu"] * count, max(1, (os.cpu_count() or 1) // count)
