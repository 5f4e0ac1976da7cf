"""`score --ray ADDRESS`: the per-shard work of the recipe as a Ray Data pipeline (docs/design.md 5, "Workers").

    shard ranges (driver)
      -> Prepare: CPU actors read their shard's rows from the corpus and prepare them (tokenizers loaded once)
      -> Score:   --workers actors, one GPU each (or a share of the CPUs), the models loaded once
      -> driver:  results in shard order (preserve_order), weighed and committed as in a local run

The two stages run the same `Policies.prepare` and `Policies.score` as the
local engines (local.py), so the output is byte-identical to a local run,
and resumable the same way: the driver commits, and a resumed run starts its
ranges after the last committed shard. The corpus must be readable from every
node (a shared filesystem, or a Hub dataset in each node's cache), and
pear-data installed in every node's Python environment. Ray is an optional
dependency (`pip install 'pear-data[ray]'`), imported only by `make_engine` with `--ray`.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import pickle
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from ..errors import PearDataError, UsageError

if TYPE_CHECKING:
    from ..corpus import Corpus
    from ..policies import PolicyRecipe, ScoredShard, ScoringDescription

# The same reproducible MKL mode as the CLI (cli.main): CPU matmuls do not depend on the thread count.
WORKER_ENV = {"MKL_CBWR": "AUTO,STRICT", "TOKENIZERS_PARALLELISM": "false"}


def _payload(number: int, end: int, value: Any) -> pa.Table:
    return pa.table({"number": pa.array([number], pa.int64()), "end": pa.array([end], pa.int64()),
                     "payload": pa.array([pickle.dumps(value, protocol=5)], pa.large_binary())})


class Prepare:
    """CPU stage: read a shard's rows from the corpus and prepare them (tokenizers only, no model)."""

    def __init__(self, recipe: PolicyRecipe, corpus: Corpus) -> None:
        self.policies = recipe.load(models=False)
        self.corpus = corpus

    def __call__(self, batch: pa.Table) -> pa.Table:
        from ..corpus import RowRange

        (task,) = batch.to_pylist()
        rows = self.corpus.read_range(RowRange(**pickle.loads(task["range"])))
        return _payload(task["number"], rows[-1].index + 1, self.policies.prepare(rows))


class Score:
    """Model stage: score prepared shards with this actor's own copy of the models."""

    def __init__(self, recipe: PolicyRecipe, threads: int) -> None:
        import torch

        if threads:
            torch.set_num_threads(threads)
        self.policies = recipe.load()

    def __call__(self, batch: pa.Table) -> pa.Table:
        (task,) = batch.to_pylist()
        return _payload(task["number"], task["end"], self.policies.score(pickle.loads(task["payload"])))


class RayEngine:
    """The Ray Data engine: `results(start)` yields (input_end, ScoredShard) in shard order."""

    description: ScoringDescription

    def __init__(self, address: str, count: int, recipe: PolicyRecipe, corpus: Corpus, shard_rows: int,
                 advance: Callable[[int, int], None] | None = None) -> None:
        try:
            import ray
        except ImportError:
            raise UsageError("--ray needs Ray Data: pip install 'pear-data[ray]'") from None
        self.ray = ray
        self.count, self.recipe, self.corpus, self.shard_rows = count, recipe, corpus, shard_rows
        self.advance = advance or (lambda rows, tokens: None)
        self.started = self._connect(address, count)
        gpus = int(ray.cluster_resources().get("GPU", 0))
        cpus = int(ray.cluster_resources().get("CPU", 1))
        device = recipe.scoring.device
        self.gpu = device in ("auto", "cuda") and gpus > 0
        if device.startswith("cuda") and not self.gpu:
            raise UsageError(f"--device {device}: the Ray cluster at {address} has no GPU")
        if self.gpu and count > gpus:
            raise UsageError(f"--workers {count} needs {count} GPUs, the Ray cluster has {gpus}")
        self.threads = 0 if self.gpu else max(1, (cpus - 1) // count)
        self.description = self._description()

    def _connect(self, address: str, count: int) -> bool:
        """Join the cluster at `address` (or start one here for "local"); True when this call started Ray."""
        ray = self.ray
        if ray.is_initialized():
            return False
        runtime_env = {"env_vars": WORKER_ENV}
        if address == "local":
            cores = os.cpu_count() or 1
            # one logical CPU per scorer plus one for the prepare stage, whatever the core count
            ray.init(num_cpus=max(cores, count + 1), include_dashboard=False, runtime_env=runtime_env,
                     log_to_driver=False, logging_level=logging.WARNING)
        else:
            ray.init(address=address, runtime_env=runtime_env, log_to_driver=False, logging_level=logging.WARNING)
        return True

    def _description(self) -> ScoringDescription:
        """The manifest's view of the policies, from a Prepare-stage load on the driver (no model)."""
        from ..policies import scoring_record

        description = self.recipe.load(models=False).description
        return dataclasses.replace(description,
                                   scoring=scoring_record(self.recipe.scoring, "cuda" if self.gpu else "cpu"))

    def results(self, start: int) -> Iterator[tuple[int, ScoredShard]]:
        """Score the corpus from input row `start` on; results in shard order."""
        ray = self.ray
        ranges = list(self.corpus.ranges(self.shard_rows, start))
        if not ranges:
            return
        context = ray.data.DataContext.get_current()
        context.execution_options.preserve_order = True
        context.enable_progress_bars = False  # pear-data's own bar counts rows and tokens
        logging.getLogger("ray.data").setLevel(logging.WARNING)
        items = [{"number": i, "range": pickle.dumps(dataclasses.asdict(r))} for i, r in enumerate(ranges)]
        dataset = ray.data.from_items(items, override_num_blocks=len(items))
        dataset = dataset.map_batches(
            Prepare, fn_constructor_args=(self.recipe, self.corpus),
            batch_size=1, batch_format="pyarrow", concurrency=1, num_cpus=1)
        dataset = dataset.map_batches(
            Score, fn_constructor_args=(self.recipe.on("cuda" if self.gpu else "cpu"), self.threads),
            batch_size=1, batch_format="pyarrow", concurrency=self.count,
            num_gpus=1 if self.gpu else 0, num_cpus=0 if self.gpu else self.threads)
        try:
            for batch in dataset.iter_batches(batch_size=1, batch_format="pyarrow", prefetch_batches=1):
                (result,) = batch.to_pylist()
                scored = pickle.loads(result["payload"])
                rows = ranges[result["number"]]
                self.advance(rows.end - rows.start, int(sum(len(r.target.input_ids) for r in scored.rows)))
                yield result["end"], scored
        except ray.exceptions.RayTaskError as exc:
            cause = getattr(exc, "cause", None)
            if isinstance(cause, PearDataError):
                raise cause from None
            raise

    def close(self, cancel: bool = False) -> None:
        """Shut down the Ray instance this engine started (its actors with it)."""
        if self.started:
            self.ray.shutdown()

    def __enter__(self) -> RayEngine:
        return self

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        self.close(cancel=exc_type is not None)
