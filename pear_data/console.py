"""The consoles of the command line: stdout that goes quiet when its reader leaves, and stderr (cli.py)."""

from __future__ import annotations

import os
import sys

from rich.console import Console


class _PipeSafeStdout:
    """sys.stdout that goes quiet once the reader has closed the pipe (`pear-data stats OUT | head`).

    Every write is flushed at once, so a closed pipe shows here (not at interpreter exit); from then
    on the output goes to /dev/null and the command goes on with its other work.
    """

    closed = False

    def write(self, text: str) -> int:
        if not self.closed:
            try:
                sys.stdout.write(text)
                sys.stdout.flush()
            except BrokenPipeError:
                self.silence()
        return len(text)

    def flush(self) -> None:
        if not self.closed:
            try:
                sys.stdout.flush()
            except BrokenPipeError:
                self.silence()

    def silence(self) -> None:
        self.closed = True
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())  # what Python flushes at exit goes nowhere
            os.close(devnull)
        except (OSError, ValueError, AttributeError):
            pass

    def isatty(self) -> bool:
        return sys.stdout.isatty()

    @property
    def encoding(self) -> str:
        return getattr(sys.stdout, "encoding", None) or "utf-8"


STDOUT = _PipeSafeStdout()
err = Console(stderr=True)
out = Console(file=STDOUT) if sys.stdout.isatty() else Console(file=STDOUT, width=120)  # logs, pipes: whole table
