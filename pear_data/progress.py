"""Rich progress bar for long steps: rows, tokens and tokens/s."""

from __future__ import annotations

import threading

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text


class TokensColumn(ProgressColumn):
    """Tokens done and tokens/s since the bar started."""

    def render(self, task: Task) -> Text:
        tokens = task.fields.get("tokens", 0)
        elapsed = task.elapsed or 0.0
        rate = tokens / elapsed if elapsed > 0 else 0.0
        return Text(f"{tokens:,} tok  {rate:,.0f} tok/s", style="progress.data.speed")


class RowProgress:
    """A progress bar over input rows that also counts tokens.

    `advance(rows, tokens)` adds increments; it may be called from several threads (the driver, and the
    worker thread that scores with `--workers 1`).
    """

    def __init__(self, total_rows: int | None, description: str = "scoring", console: Console | None = None) -> None:
        self.progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("rows"),
            TokensColumn(), TimeElapsedColumn(), TimeRemainingColumn(),
            console=console or Console(stderr=True), transient=False,
        )
        self.task = self.progress.add_task(description, total=total_rows, tokens=0)
        self._tokens = 0
        self._lock = threading.Lock()

    def __enter__(self) -> RowProgress:
        self.progress.start()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.stop()

    def advance(self, rows: int, tokens: int) -> None:
        with self._lock:
            self._tokens += tokens
            self.progress.update(self.task, advance=rows, tokens=self._tokens)
