"""Ctrl-C and SIGTERM in the `pear-data` command: a clean stop, then exit 130 or 143 (docs/design.md section 6).

    first signal      KeyboardInterrupt in the main thread, wherever it is: the run unwinds (an open shard
                      is dropped, as after kill -9: commits are atomic), the scoring threads are told to stop
                      and are joined (a torch op finishes its batch), worker processes are told to stop too
                      (the engines' close)
    second signal     (during that clean-up) the process ends at once, as safely as after kill -9
    exit              130 (SIGINT) or 143 (SIGTERM): the atexit handlers run, stdout and stderr are flushed,
                      and the process ends through os._exit, without the interpreter's finalization
    after the command signals are ignored (`run_process`): a finished run keeps its exit code

Why os._exit: the interpreter's finalization is where a stopped run could still go wrong. A daemon thread
that wakes up there (one that could not be joined, running torch, tokenizers or pyarrow code) is ended by
`pthread_exit`, which unwinds through C++ frames ("terminate called without an active exception", exit
134) or touches freed state (exit 139); and after a KeyboardInterrupt that passed through an `exec` of
source text (dataclasses build their methods so, and libraries load lazily), `python -m` ends the process
by SIGINT after finalizing, whatever exit code it was given. Joining every thread is the rule; skipping
finalization is the guarantee. Nothing needed is skipped: every file the run keeps was committed
atomically, the atexit handlers (multiprocessing's clean-up included) have run, and the kernel releases
the output's lock.

Only stdlib imports, so that `python -m pear_data.cli` can install the handlers before it loads anything.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator

SIGNALS = (signal.SIGINT, signal.SIGTERM)
_received: list[int] = []  # the signals that arrived, in order
_armed = [False]  # True inside `handled()`: the first signal raises KeyboardInterrupt there
_whole_process = [False]  # True under `run_process`: the CLI is the process (not a call inside a test, say)


def _on_signal(signum: int, frame: object) -> None:
    _received.append(signum)
    if _armed[0] and len(_received) == 1:
        raise KeyboardInterrupt
    exit_now(128 + _received[0])  # a second signal, or one before the command started: nothing to clean up


def install() -> dict[int, object]:
    """Handle SIGINT and SIGTERM as the module docstring says; returns the handlers they replace.

    A no-op outside the main thread (Python delivers signals to the main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    return {signum: signal.signal(signum, _on_signal) for signum in SIGNALS}


def run_process(main: Callable[[], None]) -> None:
    """Run `main` as the whole process: signals handled from now on, and ignored once `main` is over.

    Python's finalization puts back the default action of a signal that has a Python handler (death by the
    signal, exit -2 or -15), not of an ignored one: a late Ctrl-C must not turn a finished run's exit code
    into a kill."""
    install()
    _whole_process[0] = True
    try:
        main()
    finally:
        if threading.current_thread() is threading.main_thread():
            for signum in SIGNALS:
                signal.signal(signum, signal.SIG_IGN)


@contextlib.contextmanager
def handled() -> Iterator[None]:
    """While inside: the first SIGINT or SIGTERM raises KeyboardInterrupt, a second one ends the process.
    The previous handlers come back on the way out (the CLI may run inside another program, a test say)."""
    previous = install()
    _received.clear()
    _armed[0] = True
    try:
        yield
    finally:
        _armed[0] = False
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def exit_code() -> int:
    """The exit code of a run stopped by a signal: 128 + the first signal's number (130, 143); 130 when the
    KeyboardInterrupt came from elsewhere."""
    return 128 + _received[0] if _received else 130


def leave(code: int) -> None:
    """Exit with `code` after a signal. The CLI as a whole process: run the atexit handlers, then `exit_now`
    (the module docstring says why); inside another program (a test, say), which goes on: sys.exit."""
    if not _whole_process[0]:
        sys.exit(code)
    with contextlib.suppress(Exception):
        atexit._run_exitfuncs()  # what a normal exit runs first: multiprocessing's clean-up, logging, ...
    exit_now(code)


def exit_now(code: int) -> None:
    """Flush stdout and stderr as far as they let us, then end the process without finalizing."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


@contextlib.contextmanager
def sigint_ignored() -> Iterator[None]:
    """SIGINT ignored while inside (in the main thread): processes started here inherit that through exec,
    so a Ctrl-C at the terminal, which reaches the whole process group, stops only the driver, which then
    ends its workers itself."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
