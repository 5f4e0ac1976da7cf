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
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from . import __version__
from .align import AlignmentStats
from .behavior import BehaviorSpec
from .card import render_card
from .corpus import CorpusRow, detect_shape, open_corpus
from .diagnostics import Diagnostics, degeneracy_warnings
from .policies import DEFAULT_TARGET, ModelSources, Policies
from .schema import ENGINE_COLUMNS, GRANULARITIES, INPUT_IDS, REJECTS
from .tokenize import TokenizeConfig
from .weigh import weigh_table
from .weights import WeightConfig, WeightSums
from .writer import DatasetWriter, data_files

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
    batch_tokens: int = 8192
    shard_rows: int = 1000
    resume: bool = False
    overwrite: bool = False
    trust_remote_code: bool = False
    license: str | None = None


def score(corpus: str | Path, out: str | Path, options: ScoreOptions = ScoreOptions(), *,
          progress_factory: Callable[[int | None], Any] | None = None) -> dict:
    """Run the whole recipe; returns the manifest. See the module docstring."""
    source = open_corpus(corpus, split=options.split)
    shape = detect_shape(next((r.record for r in source.rows() if r.record is not None), None), **options.shape)
    sources = ModelSources.resolve(options)
    columns = source.columns()  # design 2.2: one type per input column for the whole output; refuses reserved names
    config = options.weights
    dataset_normalization = config.normalize == "dataset"
    # With dataset normalization the shards hold unnormalized weights until the final rewrite.
    shard_config = dataclasses.replace(config, normalize="none", max_weight=None) if dataset_normalization else config
    run_key = {
        "command": "score", "input_fingerprint": source.fingerprint(), "shape": shape.describe(),
        "models": sources.fingerprints(), "behavior": dataclasses.asdict(options.behavior),
        "weights": config.to_dict(), "tokenize": dataclasses.asdict(options.tokenize),
        "shard_rows": options.shard_rows, "batch_tokens": options.batch_tokens, "device": options.device,
        "backend": options.backend,
    }
    writer = DatasetWriter(out, run_key, resume=options.resume, overwrite=options.overwrite)
    meter = progress_factory(source.num_rows()) if progress_factory else None
    policies = Policies.load(options, sources, shape, meter.scored_batch if meter else None, columns=columns)
    diagnostics = Diagnostics()
    if not dataset_normalization:  # the shards committed before a resume
        observe_files(data_files(out), config, None, diagnostics, by_row_group=False)
    if meter:
        meter.advance(writer.next_input_row, 0)

    for shard in shards(source.rows(), writer.next_input_row, options.shard_rows):
        prepared = policies.prepare(shard)
        if meter:
            meter.start_call()
            meter.advance(len(prepared.rejects), 0)
        scored = policies.score(prepared)
        with writer.shard() as handle:
            rejects, stats = scored.rejects, {"tokens": 0, "completion_tokens": 0}
            if scored.rows:
                weighed = weigh_table(scored.table, shard_config,
                                      observer=None if dataset_normalization else diagnostics)
                handle.write(weighed.kept)
                rejects = rejects + [scored.reject(i, r) for i, r in zip(weighed.rejected_rows, weighed.reasons)]
                stats = {"tokens": weighed.tokens, "completion_tokens": weighed.completion_tokens,
                         "weight_sums": weighed.sums.sums if dataset_normalization else None,
                         **scored.stats(weighed.kept_rows)}
            if rejects:
                handle.reject(reject_table(sorted(rejects)))
            handle.commit(shard[-1].index + 1, stats)

    means = normalize_dataset(writer, config, diagnostics) if dataset_normalization else None
    totals = {key: sum(r.stats.get(key) or 0 for r in writer.committed)
              for key in ("tokens", "completion_tokens", "truncated_prompt_tokens", "truncated_completion_tokens",
                          "rows_truncated")}
    summary = diagnostics.summary()
    description = policies.description
    manifest = {
        "tool": {"name": "pear-data", "version": __version__},
        "command": "score",
        "input": {"name": source.name, "kind": source.kind, "split": source.split,
                  "fingerprint": run_key["input_fingerprint"], "shape": shape.describe()},
        **{key: description[key] for key in ("models", "behavior", "tokenizer", "scoring")},
        "tokenize": {**dataclasses.asdict(options.tokenize), "mode": description["template"]},
        "alignment": alignment_summary(policies.behavior.alignment, writer.committed),
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
    or one row group at a time (the dataset-normalization rewrite), so the float sums match a fresh run."""
    for path in paths:
        parquet = pq.ParquetFile(path)
        columns = [name for name in (INPUT_IDS, *ENGINE_COLUMNS) if name in parquet.schema_arrow.names]
        if by_row_group:
            for i in range(parquet.num_row_groups):
                weigh_all(parquet.read_row_group(i, columns=columns), config, means, diagnostics)
        else:
            weigh_all(parquet.read(columns=columns), config, means, diagnostics)


def alignment_summary(mode: str, committed: list) -> dict:
    """Manifest `alignment`: the mode, and how the completion characters fell into spans (align.py)."""
    totals = AlignmentStats()
    for record in committed:
        if record.stats.get("alignment"):
            totals.add(AlignmentStats(**record.stats["alignment"]))
    if mode == "direct" and totals.rows:
        mode = "char-offsets"  # recorded log-probs in the behavior's own tokens
    return {"mode": mode, **(totals.to_dict() if mode != "direct" else {})}
