"""Who does the per-shard work of `score`, and how it overlaps (docs/design.md section 5, "Workers").

The recipe (score.py) gets the scored shards of the corpus from an `Engine`, in shard order, and weighs and
commits each one (weigh.py, the output writer) while the engine goes on with the next ones. Three engines, one
interface, one factory:

    --workers 1   ThreadEngine (local.py): a worker thread in the driver process, with the models it loaded
    --workers N   ProcessEngine (local.py): N worker processes, each with its own copy of the models
    --ray ADDR    RayEngine (ray_data.py): the same two steps as Ray Data stages on a cluster

Batches never cross a shard and a shard's rows are scored the same way whichever worker gets it, so the output
is byte-identical for any engine and worker count. Workers never write to the output directory: only the driver
commits.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, Protocol

from .work import ScorerProgress, ShardTask, WorkerFailed, WorkerLost

if TYPE_CHECKING:
    from ..config import RunConfig
    from ..corpus import Corpus
    from ..policies import PolicyRecipe, ScoredShard, ScoringDescription

__all__ = ["Engine", "ScorerProgress", "ShardTask", "WorkerFailed", "WorkerLost", "make_engine"]


class Engine(Protocol):
    """Scores a corpus shard by shard. Use it as a context manager: leaving it by an exception (Ctrl-C
    included) cancels the work, each worker stopping at its scorer's next batch."""

    description: ScoringDescription  # what the manifest says about the policies

    def results(self, start: int) -> Iterator[tuple[int, ScoredShard]]:
        """(input_end, scored shard) of every shard from input row `start` on, in shard order."""

    def close(self, cancel: bool = False) -> None:
        """Stop the workers: let them finish what they hold, or (cancel) stop them at their next batch."""

    def __enter__(self) -> Engine: ...

    def __exit__(self, exc_type: Any, *exc: Any) -> None: ...


def make_engine(run: RunConfig, recipe: PolicyRecipe, corpus: Corpus,
                advance: Callable[[int, int], None] | None = None) -> Engine:
    """The engine of `run` (`--workers`, `--ray`) scoring `corpus` with the policies of `recipe`; `advance(rows,
    tokens)` is told the progress. With one local worker the policies are loaded here, in the driver."""
    if run.ray:
        from .ray_data import RayEngine

        return RayEngine(run.ray, run.workers, recipe, corpus, run.shard_rows, advance)
    from .local import ProcessEngine, ThreadEngine

    if run.workers > 1:
        return ProcessEngine(recipe, corpus, run.shard_rows, run.workers, advance)
    progress = ScorerProgress(advance or (lambda rows, tokens: None))
    stop = threading.Event()
    return ThreadEngine(recipe.load(progress, stop=stop), corpus, run.shard_rows, progress, advance, stop)
