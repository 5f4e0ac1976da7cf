"""Bounded hand-offs between threads that can be told to stop (the engines' queues, a reader's read-ahead).

Every wait polls its stop condition every STOP_POLL seconds, so that a thread told to stop (an error, Ctrl-C)
ends promptly and can be joined: no thread of pear-data outlives the call that started it.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any

# How often (s) a wait looks whether it was told to stop.
STOP_POLL = 0.1


def offer(items: queue.Queue, item: Any, stopped: Callable[[], bool]) -> bool:
    """Put `item` into the bounded queue `items`, waiting while it is full; False when `stopped()` first."""
    while not stopped():
        with contextlib.suppress(queue.Full):
            items.put(item, timeout=STOP_POLL)
            return True
    return False


def take(items: queue.Queue, stopped: Callable[[], bool]) -> Any:
    """The next item of `items`, or None once `stopped()` and nothing more comes."""
    while True:
        try:
            return items.get(timeout=STOP_POLL)
        except queue.Empty:
            if stopped():
                return None


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
                if not offer(ahead, item, closed.is_set):
                    return
            offer(ahead, done, closed.is_set)
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            offer(ahead, exc, closed.is_set)

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
