"""Rich progress bar for long steps: rows, tokens and tokens/s."""

from __future__ import annotations

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

    `scored_batch(rows_done, tokens_done)` takes the cumulative counts a
    scorer reports within one call (`start_call()` resets them), so it can be
    passed as a scorer's progress callback directly.
    """

    def __init__(self, total_rows: int | None, description: str = "scoring", console: Console | None = None) -> None:
        self.progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("rows"),
            TokensColumn(), TimeElapsedColumn(), TimeRemainingColumn(),
            console=console or Console(stderr=True), transient=False,
        )
        self.task = self.progress.add_task(description, total=total_rows, tokens=0)
        self._call_rows = self._call_tokens = 0

    def __enter__(self) -> RowProgress:
        self.progress.start()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.stop()

    def advance(self, rows: int, tokens: int) -> None:
        task = self.progress.tasks[0]
        self.progress.update(self.task, advance=rows, tokens=task.fields.get("tokens", 0) + tokens)

    def start_call(self) -> None:
        self._call_rows = self._call_tokens = 0

    def scored_batch(self, rows_done: int, tokens_done: int) -> None:
        self.advance(rows_done - self._call_rows, tokens_done - self._call_tokens)
        self._call_rows, self._call_tokens = rows_done, tokens_done
