"""`pear-data score`: corpus -> token rows -> log-probs under target and behavior -> PEAR weights -> dataset.

The recipe (docs/design.md section 5), shard by shard (`--shard-rows` input rows at a time):

    read rows (corpus.py)
      -> prepare: conversation, target tokens, behavior row      (policies.py, behavior.py, tokenize.py)
      -> score: target and behavior log-probs                    (policies.py, scoring/)
      -> weigh: validate rows, PEAR weights                      (weigh.py)
      -> commit the shard: data file, rejects, stats             (writer.py)

A shard is the unit of resume: a killed run restarts after its last committed
shard and, because batches never cross a shard, writes the same bytes. The
weight diagnostics are accumulated shard by shard (after a resume, the shards
committed before it are read back). With `--normalize dataset` the shards
first hold the unnormalized weights; once every shard is in, one pass
rewrites them with the dataset means (from the weight sums recorded at each
commit).
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from .align import AlignmentStats
from .behavior import BehaviorSpec
from .card import render_card
from .corpus import CorpusRow, InputColumns, detect_shape, open_corpus
from .dataset import read_schema, read_table
from .diagnostics import Diagnostics, degeneracy_warnings
from .engine import Progress, ShardTask, Workers, worker_devices
from .errors import UsageError
from .policies import DEFAULT_TARGET, ModelSources, Policies, ScoredShard, check_backend
from .schema import ENGINE_COLUMNS, GRANULARITIES, INPUT_IDS, REJECTS
from .tokenize import TokenizeConfig
from .weigh import weigh_table
from .weights import WeightConfig, WeightSums
from .writer import DatasetWriter, check_output_apart, data_files

NORMALIZE_REWRITE = "normalize-dataset"


@dataclass(frozen=True)
class ScoreOptions:
    """Every flag of `pear-data score` (docs/design.md section 5)."""

    target: str = DEFAULT_TARGET
    behavior: BehaviorSpec = field(default_factory=BehaviorSpec)
    weights: WeightConfig = field(default_factory=WeightConfig)
    tokenize: TokenizeConfig = field(default_factory=TokenizeConfig)
    shape: dict[str, str | None] = field(default_factory=dict)  # detect_shape flags
    split: str = "train"
    device: str = "auto"
    backend: str = "torch"
    batch_tokens: int | None = None  # None: the device's default (scoring.default_batch_tokens)
    shard_rows: int = 1000
    workers: int = 1  # not part of the run key: the output does not depend on it
    ray: str | None = None  # a Ray cluster address, or "local"; None: workers on this machine (engine.py)
    resume: bool = False
    overwrite: bool = False
    trust_remote_code: bool = False
    license: str | None = None
    vllm_gpu_memory_utilization: float = 0.9  # --backend vllm (experimental)
    vllm_tensor_parallel_size: int = 1


def score(corpus: str | Path, out: str | Path, options: ScoreOptions = ScoreOptions(), *,
          progress_factory: Callable[[int | None], Any] | None = None) -> dict:
    """Run the whole recipe; returns the manifest. See the module docstring.

    Checked before anything is read or written (UsageError, exit 2): `--resume` with `--overwrite`, an output
    that is, contains or lies inside a local corpus, the weight flags (`WeightConfig.check_normalizable`), the
    backend and the device (`check_device`), so that a bad flag leaves no output behind.
    """
    if options.resume and options.overwrite:
        raise UsageError("--resume and --overwrite exclude each other: pick one")
    if Path(corpus).exists():
        check_output_apart([corpus], out, "the corpus")
    try:
        options.weights.check_normalizable()
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    check_backend(options)
    if options.backend == "vllm" and (options.ray or options.workers > 1):
        raise UsageError("--backend vllm (experimental) runs in one process: use --vllm-tensor-parallel-size for "
                         "several GPUs, not --workers or --ray")
    if not options.ray:  # on a Ray cluster the GPUs are the cluster's, not this machine's
        check_device(options.device)
    source = open_corpus(corpus, split=options.split)
    shape = detect_shape(source.first_record(), source=source.source, **options.shape)
    sources = ModelSources.resolve(options)
    columns = source.columns()  # design 2.2: one type per input column for the whole output; refuses reserved names
    config = options.weights
    run_key = {
        "command": "score", "input_fingerprint": source.fingerprint(), "shape": shape.describe(),
        "models": sources.fingerprints(), "behavior": dataclasses.asdict(options.behavior),
        "weights": config.to_dict(), "tokenize": dataclasses.asdict(options.tokenize),
        "shard_rows": options.shard_rows, "batch_tokens": options.batch_tokens, "device": options.device,
        "backend": options.backend,
    }
    if options.backend == "vllm":
        run_key["vllm"] = {"gpu_memory_utilization": options.vllm_gpu_memory_utilization,
                           "tensor_parallel_size": options.vllm_tensor_parallel_size}
    if options.workers > 1 and not options.ray:
        worker_devices(options.device, options.workers)  # bad --device / --workers: before anything is written
    writer = DatasetWriter(out, run_key, resume=options.resume, overwrite=options.overwrite)
    try:
        return _run(writer, source, shape, sources, columns, run_key, out, options, progress_factory)
    finally:
        writer.close()


def _run(writer: DatasetWriter, source: Any, shape: Any, sources: ModelSources, columns: InputColumns,
         run_key: dict, out: str | Path, options: ScoreOptions,
         progress_factory: Callable[[int | None], Any] | None) -> dict:
    config = options.weights
    dataset_normalization = config.normalize == "dataset"
    # With dataset normalization the shards hold unnormalized weights until the final rewrite.
    shard_config = dataclasses.replace(config, normalize="none", max_weight=None) if dataset_normalization else config
    meter = progress_factory(source.num_rows()) if progress_factory else None
    advance = meter.advance if meter else None
    if options.ray:
        from .ray_engine import RayWorkers

        workers = RayWorkers(options.ray, options.workers, options, sources, shape, columns, source, advance)
        results = workers.map(writer.next_input_row)
    else:
        if options.workers == 1:
            progress = Progress(advance or (lambda rows, tokens: None))
            stop = threading.Event()  # set when the run is cancelled: the scorers stop at their next batch
            policies = Policies.load(options, sources, shape, progress, columns, stop=stop)
            workers = Workers(1, options, sources, shape, columns, policies=policies, progress=progress,
                              advance=advance, stop=stop)
        else:
            workers = Workers(options.workers, options, sources, shape, columns, advance=advance)
        tasks = (ShardTask(number, rows)
                 for number, rows in enumerate(shards(source.rows(), writer.next_input_row, options.shard_rows)))
        results = workers.map(tasks)
    diagnostics = Diagnostics()
    if not dataset_normalization:  # the shards committed before a resume
        observe_files(data_files(out), config, None, diagnostics, by_row_group=False)
    if meter:
        meter.advance(writer.next_input_row, 0)

    with workers:
        for input_end, scored in results:
            commit(writer, input_end, scored, shard_config, None if dataset_normalization else diagnostics,
                   dataset_normalization)

    means = normalize_dataset(writer, config, diagnostics) if dataset_normalization else None

    totals = {key: sum(r.stats.get(key) or 0 for r in writer.committed)
              for key in ("tokens", "completion_tokens", "truncated_prompt_tokens", "truncated_completion_tokens",
                          "rows_truncated")}
    summary = diagnostics.summary()
    description = workers.description
    manifest = {
        "command": "score",
        "input": {"name": source.name, "kind": source.kind, "split": source.split,
                  "fingerprint": run_key["input_fingerprint"], "shape": shape.describe()},
        **{key: description[key] for key in ("models", "behavior", "tokenizer", "scoring")},
        "tokenize": {**dataclasses.asdict(options.tokenize), "mode": description["template"]},
        "alignment": alignment_summary(description["alignment"], writer.committed),
        "weights": config.to_dict(),
        "tokens": {"total": totals["tokens"], "completion": totals["completion_tokens"],
                   "truncated_prompt": totals["truncated_prompt_tokens"],
                   "truncated_completion": totals["truncated_completion_tokens"],
                   "rows_truncated": totals["rows_truncated"]},
        "diagnostics": summary,
        "warnings": degeneracy_warnings(summary),
        "dataset_means": means,
    }
    if options.license:
        manifest["license"] = options.license
    return writer.finalize(manifest, render_card)


def commit(writer: DatasetWriter, input_end: int, scored: ScoredShard, config: WeightConfig,
           diagnostics: Diagnostics | None, record_sums: bool) -> None:
    """Weigh a scored shard and commit it: its valid rows to data/, every other row to rejects, with the counts
    the manifest needs (and the weight sums of dataset normalization when `record_sums`)."""
    with writer.shard() as handle:
        rejects, stats = scored.rejects, {"tokens": 0, "completion_tokens": 0}
        if scored.rows:
            weighed = weigh_table(scored.table, config, observer=diagnostics)
            handle.write(weighed.kept)
            rejects = rejects + [scored.reject(i, r) for i, r in zip(weighed.rejected_rows, weighed.reasons)]
            stats = {"tokens": weighed.tokens, "completion_tokens": weighed.completion_tokens,
                     "weight_sums": weighed.sums.sums if record_sums else None, **scored.stats(weighed.kept_rows)}
        if rejects:
            handle.reject(reject_table(sorted(rejects)))
        handle.commit(input_end, stats)


def check_device(device: str) -> None:
    """UsageError unless torch can score on `device` (auto, cpu, cuda, cuda:N with N < the GPU count)."""
    import torch

    from .scoring import resolve_device

    try:
        resolved = resolve_device(device)
    except ValueError as exc:
        raise UsageError(f"--device {device}: {exc}") from None
    index = torch.device(resolved).index
    if index is not None and torch.device(resolved).type == "cuda" and index >= torch.cuda.device_count():
        count = torch.cuda.device_count()
        raise UsageError(f"--device {device}: torch sees {count} CUDA device(s) (cuda:0 to cuda:{count - 1}); "
                         "pick one of them, or --device cuda")


def shards(rows: Iterator[CorpusRow], start: int, shard_rows: int) -> Iterator[list[CorpusRow]]:
    """Input rows from `start` on, in lists of `shard_rows` (shard boundaries at multiples of shard_rows)."""
    shard: list[CorpusRow] = []
    for row in rows:
        if row.index < start:
            continue
        shard.append(row)
        if (row.index + 1) % shard_rows == 0:
            yield shard
            shard = []
    if shard:
        yield shard


def reject_table(rejects: list[tuple[int, str, str]]) -> pa.Table:
    """rejects.parquet rows of `score`: (row_index, reject_reason, source), schema.REJECTS."""
    return pa.table({c.name: pa.array([r[i] for r in rejects], c.type) for i, c in enumerate(REJECTS)})


def normalize_dataset(writer: DatasetWriter, config: WeightConfig, diagnostics: Diagnostics) -> dict[str, float]:
    """Divide every weight by its dataset mean (design 3.3), rewriting the shards once; returns the means.

    The means come from the weight sums each shard recorded at commit. A resumed run that already got
    past the rewrite's commit point only reads the shards back for the diagnostics.
    """
    sums = WeightSums(count=sum(r.stats.get("completion_tokens") or 0 for r in writer.committed))
    for record in writer.committed:
        for g in GRANULARITIES:
            sums.sums[g] += (record.stats.get("weight_sums") or {}).get(g, 0.0)
    means = sums.means()
    if NORMALIZE_REWRITE in writer.rewrites:
        observe_files(data_files(writer.out_dir), config, means, diagnostics, by_row_group=True)
    else:
        writer.rewrite_data_files(lambda rows: weigh_all(rows, config, means, diagnostics), name=NORMALIZE_REWRITE)
    return means


def weigh_all(table: pa.Table, config: WeightConfig, means: dict | None, diagnostics: Diagnostics) -> pa.Table:
    """Weigh rows that were valid when their shard was committed (a reject here is a bug, not bad input)."""
    weighed = weigh_table(table, config, means, diagnostics)
    if len(weighed.rejected_rows):
        raise RuntimeError(f"a committed row failed validation on the second pass: {weighed.reasons[0]}")
    return weighed.kept


def observe_files(paths: list[Path], config: WeightConfig, means: dict | None, diagnostics: Diagnostics, *,
                  by_row_group: bool) -> None:
    """Diagnostics of committed data files, weighed as they were when written: a whole shard at a time,
    or one row group at a time (the dataset-normalization rewrite), so the float sums match a fresh run.
    A damaged file is an InputError naming it."""
    for path in paths:
        names = read_schema(path).names
        columns = [name for name in (INPUT_IDS, *ENGINE_COLUMNS) if name in names]
        if by_row_group:
            for i in range(pq.read_metadata(path).num_row_groups):
                weigh_all(read_table(path, columns, row_group=i), config, means, diagnostics)
        else:
            weigh_all(read_table(path, columns), config, means, diagnostics)


def alignment_summary(mode: str, committed: list) -> dict:
    """Manifest `alignment`: the mode, and how the completion characters fell into spans (align.py)."""
    totals = AlignmentStats()
    for record in committed:
        if record.stats.get("alignment"):
            totals.add(AlignmentStats(**record.stats["alignment"]))
    if mode == "direct" and totals.rows:
        mode = "char-offsets"  # recorded log-probs in the behavior's own tokens
    return {"mode": mode, **(totals.to_dict() if mode != "direct" else {})}
