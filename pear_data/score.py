"""`pear-data score`: corpus -> token rows -> log-probs under target and behavior -> PEAR weights -> dataset.

The recipe, shard by shard (`shard_rows` input rows at a time):

    read rows (corpus.py) -> conversation (corpus.py) -> input_ids + completion_mask (tokenize.py)
      -> target / behavior log-probs (scoring/) -> validate + weigh (validate.py, weights.py)
      -> commit the shard (writer.py)

A shard is the unit of resume: a killed run restarts after its last committed
shard and, because batches never cross a shard, produces the same bytes.
With `--normalize dataset` the shards are first written with the unnormalized
weights, then rewritten once every shard is in (the global mean comes from the
per-shard weight sums recorded at commit).
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from . import __version__
from .card import render_card
from .corpus import CorpusRow, RowError, RowShape, detect_shape, open_corpus, to_conversation
from .diagnostics import Diagnostics, degeneracy_warnings
from .reweight import UsageError
from .tokenize import ConversationTokenizer, TokenizeConfig, TokenizedRow
from .validate import token_rows, validate, weight_columns, with_columns
from .weights import GRANULARITIES, WeightConfig, WeightSums, weigh, weight_sums
from .writer import DatasetWriter, data_files

DEFAULT_TARGET = "smollm2-135m-instruct"


@dataclass(frozen=True)
class BehaviorSpec:
    """Where behavior log-probs come from: a model (None = the target itself) or a recorded field."""

    model: str | None = None
    logprobs_field: str | None = None
    temperature: float = 1.0
    top_p: float = 1.0


@dataclass(frozen=True)
class ScoreOptions:
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


@dataclass
class Prepared:
    """A shard's rows after tokenization: what goes to the scorer, and what was rejected."""

    rows: list[tuple[CorpusRow, TokenizedRow, np.ndarray | None]] = field(default_factory=list)
    rejects: list[tuple[CorpusRow, str]] = field(default_factory=list)


def _source_text(row: CorpusRow) -> str:
    if row.record is None:
        return row.raw or ""
    return json.dumps(row.record, ensure_ascii=False, sort_keys=True, default=str)


def recorded_behavior(record: dict, name: str, tokenized: TokenizedRow) -> np.ndarray:
    """Behavior log-probs supplied with the data, placed on the completion positions.

    The field holds one log-prob per completion token of the *target*
    tokenization (in order), or one per token of the whole row (index i ->
    input_ids[i], values at prompt positions are ignored).
    """
    if name not in record or record[name] is None:
        raise RowError(f"missing field {name!r} (--behavior-logprobs-field)")
    value = record[name]
    if isinstance(value, dict):
        raise RowError(f"{name!r} holds {{tokens, logprobs}} in the behavior's own tokens: cross-tokenizer "
                       "alignment is not supported yet; give one log-prob per target completion token")
    try:
        values = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise RowError(f"{name!r} must be a list of numbers") from None
    mask = tokenized.completion_mask == 1
    out = np.zeros(tokenized.num_tokens, dtype=np.float32)
    if values.ndim == 1 and len(values) == int(mask.sum()) + tokenized.truncated_completion_tokens:
        out[mask] = values[: int(mask.sum())]  # truncation cut completion tokens from the right
    elif values.ndim == 1 and len(values) == tokenized.num_tokens:
        out[mask] = values[mask]
    else:
        raise RowError(f"{name!r} has {values.size} log-probs but the completion has {int(mask.sum())} "
                       f"target tokens (and the row {tokenized.num_tokens})")
    return out


class Policies:
    """The loaded scorers and which one computes the behavior log-probs.

    Behavior log-probs come from, in this order: the recorded field; a second
    model; the target's own forward pass (same model: scored once, the
    behavior's temperature/top-p applied to the same logits).
    """

    def __init__(self, options: ScoreOptions, sources: "ModelSources",
                 progress: Callable[[int, int], None] | None) -> None:
        from .models import load_model, load_tokenizer, tokenizer_fingerprint
        from .scoring import SamplingParams, TorchScorer, resolve_device, scoring_dtype

        if options.backend != "torch":
            raise UsageError(f"--backend {options.backend}: only 'torch' is available in this build")
        self.device = resolve_device(options.device)
        self.dtype = scoring_dtype(self.device)
        self.sources = sources
        self.tokenizer = load_tokenizer(sources.target, trust_remote_code=options.trust_remote_code)
        self.target_policy = SamplingParams()
        self.behavior_policy = SamplingParams(options.behavior.temperature, options.behavior.top_p)

        def scorer(source, report):
            model = load_model(source, device=self.device, dtype=self.dtype, trust_remote_code=options.trust_remote_code)
            return TorchScorer(model, device=self.device, batch_tokens=options.batch_tokens, progress=report)

        self.target = scorer(sources.target, progress)
        self.behavior = None  # None: the target's forward pass also gives the behavior log-probs
        if sources.behavior is not None and sources.behavior.fingerprint != sources.target.fingerprint:
            behavior_tokenizer = load_tokenizer(sources.behavior, trust_remote_code=options.trust_remote_code)
            if tokenizer_fingerprint(behavior_tokenizer) != tokenizer_fingerprint(self.tokenizer):
                raise UsageError(
                    f"--behavior {sources.behavior.spec} uses a different tokenizer than --target "
                    f"{sources.target.spec}: per-token ratios need the same tokenization (cross-tokenizer "
                    "alignment is not supported yet); pick a behavior model with the target's tokenizer, "
                    "or pass --behavior-logprobs-field"
                )
            self.behavior = scorer(sources.behavior, None)

    def score(self, prepared: Prepared) -> tuple[list[np.ndarray], list[np.ndarray]]:
        ids = [t.input_ids for _, t, _ in prepared.rows]
        masks = [t.completion_mask for _, t, _ in prepared.rows]
        if not ids:
            return [], []
        recorded = [b for _, _, b in prepared.rows]
        if recorded[0] is not None:
            (target,) = self.target.score(ids, masks, [self.target_policy])
            return target, recorded
        if self.behavior is None:
            target, behavior = self.target.score(ids, masks, [self.target_policy, self.behavior_policy])
            return target, behavior
        (target,) = self.target.score(ids, masks, [self.target_policy])
        (behavior,) = self.behavior.score(ids, masks, [self.behavior_policy])
        return target, behavior

    def describe(self, options: ScoreOptions) -> dict:
        from .models import chat_template_hash, tokenizer_fingerprint

        behavior = {"temperature": options.behavior.temperature, "top_p": options.behavior.top_p}
        if options.behavior.logprobs_field is not None:
            behavior["recorded_field"] = options.behavior.logprobs_field
        dtype = str(self.dtype).removeprefix("torch.")
        models = {"target": {**self.sources.target.to_dict(), "dtype": dtype}}
        if self.sources.behavior is not None:
            models["behavior"] = {**self.sources.behavior.to_dict(), "dtype": dtype}
        return {
            "models": models,
            "behavior": behavior,
            "tokenizer": {"fingerprint": tokenizer_fingerprint(self.tokenizer),
                          "chat_template_hash": chat_template_hash(self.tokenizer)},
        }


@dataclass(frozen=True)
class ModelSources:
    """Resolved target and behavior models (behavior None: recorded log-probs)."""

    target: Any
    behavior: Any | None

    @classmethod
    def resolve(cls, options: ScoreOptions) -> "ModelSources":
        from .models import resolve_model

        target = resolve_model(options.target)
        if options.behavior.logprobs_field is not None:
            if options.behavior.model is not None:
                raise UsageError("--behavior and --behavior-logprobs-field are exclusive: pick one source of "
                                 "behavior log-probs")
            return cls(target, None)
        behavior = target if options.behavior.model is None else resolve_model(options.behavior.model)
        return cls(target, behavior)

    def fingerprints(self) -> dict:
        return {"target": self.target.fingerprint,
                "behavior": None if self.behavior is None else self.behavior.fingerprint}


def _shards(rows: Iterator[CorpusRow], start: int, shard_rows: int) -> Iterator[list[CorpusRow]]:
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


def prepare(shard: list[CorpusRow], shape: RowShape, tokenizer: ConversationTokenizer, behavior_field: str | None) -> Prepared:
    """Decode, normalize and tokenize a shard's rows; every row lands in `rows` or `rejects`."""
    prepared = Prepared()
    for row in shard:
        if row.error is not None:
            prepared.rejects.append((row, row.error))
            continue
        try:
            tokenized = tokenizer(to_conversation(row.record, shape))
            recorded = None if behavior_field is None else recorded_behavior(row.record, behavior_field, tokenized)
        except RowError as exc:
            prepared.rejects.append((row, exc.reason))
            continue
        prepared.rows.append((row, tokenized, recorded))
    return prepared


def records_table(records: list[dict]) -> pa.Table:
    """The input rows' own columns, in order of first appearance.

    A column Arrow cannot type (mixed str/int values across rows, say) is kept
    as JSON text rather than failing the shard.
    """
    names = list(dict.fromkeys(key for record in records for key in record))
    columns = {}
    for name in names:
        values = [record.get(name) for record in records]
        try:
            columns[name] = pa.array(values)
        except (pa.ArrowInvalid, pa.ArrowTypeError):
            columns[name] = pa.array([None if v is None else json.dumps(v, ensure_ascii=False, sort_keys=True)
                                      for v in values], pa.string())
    return pa.table(columns)


def scored_table(prepared: Prepared, target: list[np.ndarray], behavior: list[np.ndarray]) -> pa.Table:
    """Original columns + the scored columns of design section 2 (no weights yet)."""
    table = records_table([row.record for row, _, _ in prepared.rows])
    tokenized = [t for _, t, _ in prepared.rows]
    scored = {
        "input_ids": pa.array([t.input_ids for t in tokenized], pa.list_(pa.int32())),
        "completion_mask": pa.array([t.completion_mask for t in tokenized], pa.list_(pa.int8())),
        "target_logprobs": pa.array(target, pa.list_(pa.float32())),
        "behavior_logprobs": pa.array(behavior, pa.list_(pa.float32())),
    }
    return with_columns(table, scored)


def reject_table(rejects: list[tuple[int, str, str]]) -> pa.Table:
    """rejects.parquet rows: the input row's index, why, and the row itself as JSON (or the raw line)."""
    return pa.table({
        "row_index": pa.array([r[0] for r in rejects], pa.int64()),
        "reject_reason": pa.array([r[1] for r in rejects], pa.string()),
        "source": pa.array([r[2] for r in rejects], pa.string()),
    })


def _weigh_table(table: pa.Table, config: WeightConfig, means: dict | None, observer=None) -> pa.Table:
    rows = token_rows(table)
    return with_columns(table, weight_columns(rows, weigh(rows, config, means, observer=observer)))


def score(corpus: str | Path, out: str | Path, options: ScoreOptions = ScoreOptions(), *,
          progress_factory: Callable[[int | None], Any] | None = None) -> dict:
    """Run the whole recipe; returns the manifest. See the module docstring."""
    source = open_corpus(corpus, split=options.split)
    fingerprint = source.fingerprint()
    first = next((r.record for r in source.rows() if r.record is not None), None)
    shape = detect_shape(first, **options.shape)
    config = options.weights
    # With dataset normalization the shards hold unnormalized weights until the final rewrite.
    shard_config = dataclasses.replace(config, normalize="none", max_weight=None) if config.normalize == "dataset" else config

    sources = ModelSources.resolve(options)
    run_key = {
        "command": "score",
        "input_fingerprint": fingerprint,
        "shape": shape.describe(),
        "models": sources.fingerprints(),
        "behavior": dataclasses.asdict(options.behavior),
        "weights": config.to_dict(),
        "tokenize": dataclasses.asdict(options.tokenize),
        "shard_rows": options.shard_rows,
        "batch_tokens": options.batch_tokens,
        "device": options.device,
        "backend": options.backend,
    }
    writer = DatasetWriter(out, run_key, resume=options.resume, overwrite=options.overwrite)
    meter = progress_factory(source.num_rows()) if progress_factory else None
    policies = Policies(options, sources, meter.scored_batch if meter else None)
    tokenizer = ConversationTokenizer(policies.tokenizer, options.tokenize)
    if meter:
        meter.advance(writer.next_input_row, 0)

    for shard in _shards(source.rows(), writer.next_input_row, options.shard_rows):
        prepared = prepare(shard, shape, tokenizer, options.behavior.logprobs_field)
        if meter:
            meter.start_call()
            meter.advance(len(prepared.rejects), 0)
        target, behavior = policies.score(prepared)
        rejects = [(row.index, reason, _source_text(row)) for row, reason in prepared.rejects]
        stats = {"tokens": 0, "completion_tokens": 0, "truncated_prompt_tokens": 0,
                 "truncated_completion_tokens": 0, "rows_truncated": 0, "weight_sums": None}
        with writer.shard() as handle:
            if prepared.rows:
                table = scored_table(prepared, target, behavior)
                reasons = validate(table, shard_config)
                good = [i for i, r in enumerate(reasons) if r is None]
                for i, reason in enumerate(reasons):
                    if reason is not None:
                        row = prepared.rows[i][0]
                        rejects.append((row.index, reason, _source_text(row)))
                if good:
                    kept = table.take(pa.array(good, pa.int64())) if len(good) < len(reasons) else table
                    rows = token_rows(kept)
                    handle.write(with_columns(kept, weight_columns(rows, weigh(rows, shard_config))))
                    if config.normalize == "dataset":
                        stats["weight_sums"] = weight_sums(rows, config).sums
                    stats["tokens"] = int(rows.offsets[-1])
                    stats["completion_tokens"] = int(np.count_nonzero(rows.completion_mask == 1))
                    for i in good:
                        t = prepared.rows[i][1]
                        stats["truncated_prompt_tokens"] += t.truncated_prompt_tokens
                        stats["truncated_completion_tokens"] += t.truncated_completion_tokens
                        stats["rows_truncated"] += int(t.truncated_prompt_tokens + t.truncated_completion_tokens > 0)
            if rejects:
                handle.reject(reject_table(sorted(rejects)))
            handle.commit(shard[-1].index + 1, stats)

    totals = {key: sum(r.stats.get(key) or 0 for r in writer.committed)
              for key in ("tokens", "completion_tokens", "truncated_prompt_tokens",
                          "truncated_completion_tokens", "rows_truncated")}
    means = None
    diagnostics = Diagnostics()
    if config.normalize == "dataset":
        sums = WeightSums(count=totals["completion_tokens"])
        for record in writer.committed:
            for g in GRANULARITIES:
                sums.sums[g] += (record.stats.get("weight_sums") or {}).get(g, 0.0)
        means = sums.means()
        writer.rewrite_data_files(lambda t: _weigh_table(t, config, means, diagnostics), name="normalize-dataset")
    else:
        import pyarrow.parquet as pq

        for path in data_files(out):
            for batch in pq.ParquetFile(path).iter_batches(batch_size=512, columns=["completion_mask", "target_logprobs", "behavior_logprobs"]):
                weigh(token_rows(batch), config, observer=diagnostics)

    summary = diagnostics.summary()
    manifest = {
        "tool": {"name": "pear-data", "version": __version__},
        "command": "score",
        "input": {"path": str(corpus), "kind": source.kind, "split": source.split, "fingerprint": fingerprint,
                  "shape": shape.describe()},
        **policies.describe(options),
        "scoring": {"backend": options.backend, "device": policies.device, "batch_tokens": options.batch_tokens},
        "tokenize": {**dataclasses.asdict(options.tokenize), "mode": tokenizer.mode},
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
