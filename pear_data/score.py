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
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from .align import AlignmentStats
from .card import render_card
from .config import ScoreOptions, WeightConfig
from .corpus import Corpus, RowShape, detect_shape, open_corpus
from .dataset import read_schema, read_table
from .diagnostics import Diagnostics, degeneracy_warnings
from .engines import Engine, make_engine
from .output import DatasetWriter, check_output_apart, data_files
from .policies import ModelSources, PolicyRecipe, ScoredShard, check_backend
from .schema import ENGINE_COLUMNS, GRANULARITIES, INPUT_IDS, REJECTS
from .scoring import check_device
from .weigh import weigh_table
from .weights import WeightSums

NORMALIZE_REWRITE = "normalize-dataset"
ProgressFactory = Callable[[int | None], Any]


def score(corpus: str | Path, out: str | Path, options: ScoreOptions = ScoreOptions(), *,
          progress_factory: ProgressFactory | None = None) -> dict:
    """Run the whole recipe; returns the manifest. See the module docstring.

    The flags were checked when `options` was built (`pear_data.config`). Checked here, before anything is
    written (exit 2): an output that is, contains or lies inside a local corpus, that this environment can
    run the backend and the device (and the worker devices), the corpus, its row shape and the models.
    """
    if Path(corpus).exists():
        check_output_apart([corpus], out, "the corpus")
    check_backend(options.scoring)
    if not options.run.ray:  # on a Ray cluster the GPUs are the cluster's, not this machine's
        check_device(options.scoring.device, options.run.workers)
    reader = open_corpus(corpus, split=options.corpus.split)
    shape = detect_shape(reader.first_record(), source=reader.source, **options.corpus.shape_flags)
    models = ModelSources.resolve(options.target, options.behavior)
    # design 2.2: one type per input column for the whole output; refuses reserved names
    recipe = PolicyRecipe(models, shape, reader.columns(), options.scoring, options.tokenize, options.behavior)
    run_key = _run_key(reader, shape, models, options)
    writer = DatasetWriter(out, run_key, resume=options.run.resume, overwrite=options.run.overwrite)
    try:
        return _run(writer, reader, recipe, options, progress_factory)
    finally:
        writer.close()


def _run_key(reader: Corpus, shape: RowShape, models: ModelSources, options: ScoreOptions) -> dict:
    """What a resumed run must share with the run it continues (the writer compares them)."""
    scoring = options.scoring
    key = {
        "command": "score", "input_fingerprint": reader.fingerprint(), "shape": shape.describe(),
        "models": models.fingerprints(), "behavior": dataclasses.asdict(options.behavior),
        "weights": options.weights.to_dict(), "tokenize": dataclasses.asdict(options.tokenize),
        "shard_rows": options.run.shard_rows, "batch_tokens": scoring.batch_tokens, "device": scoring.device,
        "backend": scoring.backend,
    }
    if scoring.backend == "vllm":
        key["vllm"] = {"gpu_memory_utilization": scoring.vllm_gpu_memory_utilization,
                       "tensor_parallel_size": scoring.vllm_tensor_parallel_size}
    return key


def _run(writer: DatasetWriter, reader: Corpus, recipe: PolicyRecipe, options: ScoreOptions,
         progress_factory: ProgressFactory | None) -> dict:
    config = options.weights
    dataset_normalization = config.normalize == "dataset"
    bar = progress_factory(reader.num_rows()) if progress_factory else None
    # entered at once: the worker starts in the constructor, and a Ctrl-C from here on must stop and join it
    with make_engine(options.run, recipe, reader, bar.advance if bar else None) as engine:
        diagnostics = Diagnostics()
        if not dataset_normalization:  # the shards committed before a resume
            observe_files(data_files(writer.out_dir), config, None, diagnostics, by_row_group=False)
        if bar:
            bar.advance(writer.next_input_row, 0)
        score_shards(writer, engine, config, diagnostics)
    means = normalize_dataset(writer, config, diagnostics) if dataset_normalization else None
    return writer.finalize(manifest(writer, reader, recipe, engine, options, diagnostics, means), render_card)


def score_shards(writer: DatasetWriter, engine: Engine, config: WeightConfig, diagnostics: Diagnostics) -> None:
    """Weigh and commit the engine's scored shards as they come. With dataset normalization the shards hold
    unnormalized weights (and record their sums) until the final rewrite (`normalize_dataset`)."""
    dataset_normalization = config.normalize == "dataset"
    if dataset_normalization:
        config = dataclasses.replace(config, normalize="none", max_weight=None)
    for input_end, scored in engine.results(writer.next_input_row):
        commit(writer, input_end, scored, config, None if dataset_normalization else diagnostics,
               dataset_normalization)


def manifest(writer: DatasetWriter, reader: Corpus, recipe: PolicyRecipe, engine: Engine, options: ScoreOptions,
             diagnostics: Diagnostics, means: dict | None) -> dict:
    """The manifest of a finished score run (design 2.5)."""
    totals = {key: sum(r.stats.get(key) or 0 for r in writer.committed)
              for key in ("tokens", "completion_tokens", "truncated_prompt_tokens", "truncated_completion_tokens",
                          "rows_truncated")}
    summary = diagnostics.summary()
    description = engine.description
    record = {
        "command": "score",
        "input": {"name": reader.name, "kind": reader.kind, "split": reader.split,
                  "fingerprint": writer.run_key["input_fingerprint"], "shape": recipe.shape.describe()},
        "models": description.models, "behavior": description.behavior, "tokenizer": description.tokenizer,
        "scoring": description.scoring,
        "tokenize": {**dataclasses.asdict(options.tokenize), "mode": description.template},
        "alignment": alignment_summary(description.alignment, writer.committed),
        "weights": options.weights.to_dict(),
        "tokens": {"total": totals["tokens"], "completion": totals["completion_tokens"],
                   "truncated_prompt": totals["truncated_prompt_tokens"],
                   "truncated_completion": totals["truncated_completion_tokens"],
                   "rows_truncated": totals["rows_truncated"]},
        "diagnostics": summary,
        "warnings": degeneracy_warnings(summary),
        "dataset_means": means,
    }
    if options.license:
        record["license"] = options.license
    if options.card_title:
        record["card_title"] = options.card_title
    return record


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
        writer.rewrite_data_files(lambda rows: reweigh_committed(rows, config, means, diagnostics),
                                  name=NORMALIZE_REWRITE)
    return means


def reweigh_committed(table: pa.Table, config: WeightConfig, means: dict | None, diagnostics: Diagnostics) -> pa.Table:
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
                reweigh_committed(read_table(path, columns, row_group=i), config, means, diagnostics)
        else:
            reweigh_committed(read_table(path, columns), config, means, diagnostics)


def alignment_summary(mode: str, committed: list) -> dict:
    """Manifest `alignment`: the mode, and how the completion characters fell into spans (align.py)."""
    totals = AlignmentStats()
    for record in committed:
        if record.stats.get("alignment"):
            totals.add(AlignmentStats(**record.stats["alignment"]))
    if mode == "direct" and totals.rows:
        mode = "char-offsets"  # recorded log-probs in the behavior's own tokens
    return {"mode": mode, **(totals.to_dict() if mode != "direct" else {})}
