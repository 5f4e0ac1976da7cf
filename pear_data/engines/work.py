"""The per-shard work every engine does, and what travels between an engine's workers and the driver.

A worker does the two steps of policies.py on each shard it is sent: prepare (CPU: conversation, target tokens,
behavior row) and score (the models). Inside a worker a prepare thread works one shard ahead of the scoring, so
the CPU steps overlap the forward passes; the queue between them is bounded (`work`).
"""

from __future__ import annotations

import contextlib
import queue
import threading
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..errors import PearDataError, UsageError
from ..threads import STOP_POLL, offer, take

if TYPE_CHECKING:
    from ..corpus import CorpusRow
    from ..policies import Policies

# Shards a worker holds beyond the one it scores: the next one, prepared while the current one is scored.
PREPARED_AHEAD = 1


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


class ScorerProgress:
    """Turns a scorer's cumulative (rows, tokens) within one `score` call into increments for a sink."""

    def __init__(self, sink: Callable[[int, int], None]) -> None:
        self.sink = sink
        self.rows = self.tokens = 0

    def start_call(self) -> None:
        self.rows = self.tokens = 0

    def __call__(self, rows: int, tokens: int) -> None:
        self.sink(rows - self.rows, tokens - self.tokens)
        self.rows, self.tokens = rows, tokens


def shard_tasks(rows: Iterator[CorpusRow], start: int, shard_rows: int) -> Iterator[ShardTask]:
    """The input rows from `start` on as numbered tasks of `shard_rows` rows (shard boundaries at multiples of
    shard_rows, so a resumed run cuts the shards a whole run cuts)."""
    shard: list[CorpusRow] = []
    number = 0
    for row in rows:
        if row.index < start:
            continue
        shard.append(row)
        if (row.index + 1) % shard_rows == 0:
            yield ShardTask(number, shard)
            shard, number = [], number + 1
    if shard:
        yield ShardTask(number, shard)


def work(policies: Policies, tasks: Callable[[float], ShardTask | None], send: Callable[[tuple], None],
         progress: ScorerProgress | None, stop: Any = None) -> None:
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
                offer(prepared, (task, shard), stopped)
            offer(prepared, None, stopped)
        except BaseException as exc:  # noqa: BLE001 - handed to the scoring thread, which reports it
            offer(prepared, exc, stopped)

    thread = threading.Thread(target=prepare, name="pear-prepare", daemon=True)
    thread.start()
    try:
        while (item := take(prepared, stopped)) is not None:
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


def failure(exc: BaseException) -> tuple:
    """A ("failed", ...) message: a user-fixable error travels as itself, anything else as its traceback."""
    if isinstance(exc, PearDataError):
        try:
            import pickle

            pickle.loads(pickle.dumps(exc))
            return ("failed", exc)
        except Exception:  # noqa: BLE001 - an error that does not pickle travels as its message
            return ("failed", UsageError(str(exc)))
    return ("failed", WorkerFailed("".join(traceback.format_exception(exc))))
