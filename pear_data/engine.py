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
An error or a Ctrl-C in the driver cancels the workers (`Workers.close`): each
stops at its scorer's next batch; the worker thread is joined, and worker
processes (which ignore SIGINT: the driver stops them) end normally or are
killed after a grace period, so no torch work runs on while the interpreter
exits (pear_data/shutdown.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import multiprocessing
import os
import queue
import signal
import threading
import time
import traceback
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from . import shutdown
from .errors import PearDataError, UsageError

if TYPE_CHECKING:
    from .corpus import CorpusRow, InputColumns, RowShape
    from .policies import ModelSources, Policies, ScoredShard
    from .score import ScoreOptions

# Shards a worker holds beyond the one it scores: the next one, prepared while the current one is scored.
PREPARED_AHEAD = 1
# How often (s) the driver checks that its workers are alive while it waits for a result.
LIVENESS_POLL = 1.0
# How often (s) a worker's waits look whether it was told to stop.
STOP_POLL = 0.1
# How long (s) `Workers.close` waits for its worker processes to end by themselves before it kills them.
PROCESS_GRACE = 5.0


def prefetch(items: Iterable, depth: int = 2) -> Iterator:
    """The items of `items`, produced by a thread up to `depth` ahead of the consumer (reading the next
    Parquet batch while this one is weighed, say). An error in the producer is raised to the consumer.
    Closing the generator (or leaving it by an error, once it is closed) stops the thread and joins it."""
    done = object()
    ahead: queue.Queue = queue.Queue(maxsize=depth)
    closed = threading.Event()

    def produce() -> None:
        try:
            for item in items:
                if not _offer(ahead, item, closed.is_set):
                    return
            _offer(ahead, done, closed.is_set)
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            _offer(ahead, exc, closed.is_set)

    thread = threading.Thread(target=produce, name="pear-prefetch", daemon=True)
    thread.start()
    try:
        while (item := ahead.get()) is not done:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        closed.set()
        thread.join()


def _offer(items: queue.Queue, item: Any, stopped: Callable[[], bool]) -> bool:
    """Put `item` into the bounded queue `items`, waiting while it is full; False when `stopped()` first."""
    while not stopped():
        with contextlib.suppress(queue.Full):
            items.put(item, timeout=STOP_POLL)
            return True
    return False


def _take(items: queue.Queue, stopped: Callable[[], bool]) -> Any:
    """The next item of `items`, or None once `stopped()` and nothing more comes."""
    while True:
        try:
            return items.get(timeout=STOP_POLL)
        except queue.Empty:
            if stopped():
                return None


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


def work(policies: Policies, tasks: Callable[[float], ShardTask | None], send: Callable[[tuple], None],
         progress: Progress | None, stop: Any = None) -> None:
    """The worker loop: prepare shards one ahead in a thread, score them here, send ("done", ...) per shard.

    `tasks(timeout)` returns the next task, or None when there are no more, and raises queue.Empty when none
    came within `timeout` seconds (the prepare thread then looks whether to stop). Messages: ("progress", rows,
    tokens), ("done", number, input_end, scored), and a final ("exit",). Once `stop` (a threading or
    multiprocessing Event) is set the loop ends at its next step (the scorer, given the same event, at its next
    batch). The prepare thread is joined before this returns or raises: no thread of it outlives the call.
    """
    halt = threading.Event()  # set when this loop is over, for whatever reason: the prepare thread ends too

    def stopped() -> bool:
        return halt.is_set() or (stop is not None and stop.is_set())

    prepared: queue.Queue = queue.Queue(maxsize=PREPARED_AHEAD)

    def next_task() -> ShardTask | None:
        while not stopped():
            with contextlib.suppress(queue.Empty):
                return tasks(STOP_POLL)
        return None

    def prepare() -> None:
        try:
            while (task := next_task()) is not None:
                shard = policies.prepare(task.rows)
                if shard.rejects:
                    send(("progress", len(shard.rejects), 0))
                _offer(prepared, (task, shard), stopped)
            _offer(prepared, None, stopped)
        except BaseException as exc:  # noqa: BLE001 - handed to the scoring thread, which reports it
            _offer(prepared, exc, stopped)

    thread = threading.Thread(target=prepare, name="pear-prepare", daemon=True)
    thread.start()
    try:
        while (item := _take(prepared, stopped)) is not None:
            if isinstance(item, BaseException):
                raise item
            task, shard = item
            if progress is not None:
                progress.start_call()
            send(("done", task.number, task.input_end, policies.score(shard)))
        send(("exit",))
    finally:
        halt.set()
        thread.join()


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
                  device: str, threads: int, inbox: Any, outbox: Any, stop: Any) -> None:
    """A worker process: load the policies on `device`, then `work` until the driver sends None, or sets
    `stop` (a multiprocessing Event: the scorer stops at its next batch, and the process ends normally).

    It ignores SIGINT: a Ctrl-C reaches the whole process group, and the driver stops its workers itself."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if threads:
        import torch

        torch.set_num_threads(threads)
    from .policies import Policies

    parent = multiprocessing.parent_process()

    def tasks(timeout: float) -> ShardTask | None:
        try:
            return inbox.get(timeout=timeout)
        except queue.Empty:  # a driver killed with -9 must not leave this process behind
            if parent is not None and not parent.is_alive():
                os._exit(1)
            raise

    try:
        progress = Progress(lambda rows, tokens: outbox.put(("progress", rows, tokens)))
        policies = Policies.load(dataclasses.replace(options, device=device), sources, shape, progress, columns,
                                 stop=stop)
        outbox.put(("ready", policies.description))
        work(policies, tasks, outbox.put, progress, stop)
    except BaseException as exc:  # noqa: BLE001 - reported to the driver, which stops the run (unless it did)
        if not stop.is_set():
            outbox.put(_failure(exc))


class Workers:
    """Run shards through `count` workers and yield (input_end, ScoredShard) in shard order.

    count 1: a thread of this process, with `policies` (already loaded; give it the same `stop` event that
    their scorers were loaded with, so that a cancel stops a shard at its next batch). count > 1: processes,
    each loading its own copy of the models on its device (`worker_devices`). Use it as a context manager:
    leaving it by an exception (Ctrl-C included) cancels the work (`close`).
    """

    def __init__(self, count: int, options: ScoreOptions, sources: ModelSources, shape: RowShape,
                 columns: InputColumns | None = None, *,
                 policies: Policies | None = None, progress: Progress | None = None,
                 advance: Callable[[int, int], None] | None = None, stop: Any = None) -> None:
        if count < 1:
            raise UsageError(f"--workers must be >= 1, got {count}")
        self.count = count
        self.advance = advance or (lambda rows, tokens: None)
        self.capacity = count * (2 + PREPARED_AHEAD)  # shards sent and not yet committed, at most
        context = multiprocessing.get_context("spawn")
        self.stop = stop or (threading.Event() if count == 1 else context.Event())
        self._processes: list[multiprocessing.process.BaseProcess] = []
        self._thread: threading.Thread | None = None
        if count == 1:
            if policies is None:
                raise ValueError("one worker runs in this process: pass the policies (loaded with `progress`)")
            self.inbox: Any = queue.Queue()
            self.outbox: Any = queue.Queue()
            self.description = policies.description

            def run() -> None:
                try:
                    work(policies, lambda timeout: self.inbox.get(timeout=timeout), self.outbox.put, progress,
                         self.stop)
                except BaseException as exc:  # noqa: BLE001 - reported to the driver (unless it stopped us)
                    if not self.stop.is_set():
                        self.outbox.put(_failure(exc))

            self._thread = threading.Thread(target=run, name="pear-worker", daemon=True)
            self._thread.start()
            return
        try:
            self._start_processes(context, options, sources, shape, columns)
        except BaseException:
            self.close(cancel=True)
            raise

    def _start_processes(self, context: Any, options: ScoreOptions, sources: ModelSources, shape: RowShape,
                         columns: InputColumns | None) -> None:
        """Start `count` worker processes (SIGINT ignored from their first instruction on) and wait until each
        has loaded its models."""
        self.inbox = context.Queue()
        self.outbox = context.Queue()
        devices, threads = worker_devices(options.device, self.count)
        for device in devices:
            process = context.Process(target=_process_main, name=f"pear-worker-{device}", daemon=True,
                                      args=(options, sources, shape, columns, device, threads, self.inbox,
                                            self.outbox, self.stop))
            with shutdown.sigint_ignored():
                process.start()
            self._processes.append(process)
        self.description = None
        ready = 0
        while ready < self.count:
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

    def close(self, cancel: bool = False) -> None:
        """Stop the workers; unfinished shards are simply not committed.

        Without `cancel` each worker finishes what it holds and takes nothing more. With `cancel` (an error
        or Ctrl-C in the driver) each stops at its scorer's next batch. The worker thread is joined: no torch
        work of this run goes on after `close`; worker processes that have not ended within
        PROCESS_GRACE seconds are killed (they write nothing, so nothing is lost).
        """
        if cancel:
            self.stop.set()
        for _ in range(self.count):
            self.inbox.put(None)
        if self._thread is not None:
            self._thread.join()
        deadline = time.monotonic() + PROCESS_GRACE
        for process in self._processes:
            process.join(timeout=max(0.0, deadline - time.monotonic()))
            if process.is_alive():
                process.kill()
                process.join(timeout=PROCESS_GRACE)

    def __enter__(self) -> Workers:
        return self

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        self.close(cancel=exc_type is not None)


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
