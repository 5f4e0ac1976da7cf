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
from .align import AlignmentStats, RowAlignment, TurnTokens, align_row, recorded_turn_tokens, turn_tokens
from .corpus import Conversation, CorpusRow, RowError, RowShape, detect_shape, is_completion_turn, open_corpus, to_conversation
from .diagnostics import Diagnostics, degeneracy_warnings
from .reweight import UsageError
from .tokenize import ConversationTokenizer, TokenizeConfig, TokenizedRow, chat_template_hash
from .validate import token_rows, validate, weight_columns, with_columns
from .weights import GRANULARITIES, WeightConfig, WeightSums, weigh, weight_sums
from .writer import DatasetWriter, data_files

DEFAULT_TARGET = "smollm2-135m-instruct"
DEFAULT_BEHAVIOR = "gemma-3-270m"
ALIGNMENTS = ("auto", "direct", "char-offsets")


@dataclass(frozen=True)
class BehaviorSpec:
    """Where behavior log-probs come from: a model or a recorded field.

    model:     None = DEFAULT_BEHAVIOR (unless logprobs_field is set); the
               target's own spec = the target itself (one forward pass)
    template:  how the behavior model renders a row: "auto" (its chat template
               if it has one, else raw), "chat" or "raw" (base models)
    alignment: "auto" (direct when the behavior renders the same tokens as the
               target, else by character offsets), "direct", or "char-offsets"
               (always align by characters, even for the same tokenizer)
    """

    model: str | None = None
    logprobs_field: str | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    template: str = "auto"
    alignment: str = "auto"

    def __post_init__(self) -> None:
        if self.template not in ("auto", "chat", "raw"):
            raise ValueError(f"--behavior-template must be auto, chat or raw, got {self.template!r}")
        if self.alignment not in ALIGNMENTS:
            raise ValueError(f"--alignment must be one of {', '.join(ALIGNMENTS)}, got {self.alignment!r}")


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
class PreparedRow:
    """One row ready to score.

    target:    the row in target tokens (what is written)
    behavior:  the row in the behavior's own tokens (a behavior model aligned by characters), else None
    recorded:  recorded behavior log-probs: per target token (alignment None), or in the
               behavior's own tokens (indexed by alignment.behavior_positions)
    alignment: how behavior tokens map onto target tokens (None: the same tokens)
    """

    row: CorpusRow
    target: TokenizedRow
    behavior: TokenizedRow | None = None
    recorded: np.ndarray | None = None
    alignment: RowAlignment | None = None


@dataclass
class Prepared:
    """A shard's rows after tokenization: what goes to the scorer, and what was rejected."""

    rows: list[PreparedRow] = field(default_factory=list)
    rejects: list[tuple[CorpusRow, str]] = field(default_factory=list)


def _source_text(row: CorpusRow) -> str:
    if row.record is None:
        return row.raw or ""
    return json.dumps(row.record, ensure_ascii=False, sort_keys=True, default=str)


def recorded_behavior(
    record: dict, name: str, tokenized: TokenizedRow, contents: list[str]
) -> tuple[np.ndarray, RowAlignment | None]:
    """Behavior log-probs supplied with the data: (log-probs, alignment).

    The field holds one log-prob per completion token of the *target*
    tokenization (in order), or one per token of the whole row (index i ->
    input_ids[i], values at prompt positions are ignored): returned placed on
    the target positions, alignment None. Or, in the behavior's own tokens,
    `{tokens, logprobs}` / `{text_offsets, logprobs}` (a list of them for
    several trained assistant turns): returned as recorded, with the
    character alignment onto the target tokens (align.py).
    """
    if name not in record or record[name] is None:
        raise RowError(f"missing field {name!r} (--behavior-logprobs-field)")
    value = record[name]
    if isinstance(value, dict) or (isinstance(value, list) and value and isinstance(value[0], dict)):
        turns = [value] if isinstance(value, dict) else value
        if len(turns) != len(contents):
            raise RowError(f"{name!r} holds {len(turns)} recorded turns for {len(contents)} trained assistant turns")
        tokens, logprobs, start = [], [], 0
        for turn, content in zip(turns, contents):
            recorded, values = recorded_turn_tokens(turn, content, name)
            tokens.append(TurnTokens(recorded.positions + start, recorded.starts, recorded.ends))
            logprobs.append(values)
            start += len(values)
        alignment = align_row(tokenized, tokens, contents, behavior_name=f"recorded {name!r}")
        return np.concatenate(logprobs), alignment
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
    return out, None


PROBE = [
    {"role": "user", "content": "Natalia sold clips to 48 of her friends in April. How many?"},
    {"role": "assistant", "content": "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n\n  Héllo wörld 😀\t\tx  ok\n#### 72"},
]


class Policies:
    """The loaded scorers, and how behavior log-probs are obtained and aligned.

    Behavior log-probs come from, in this order: the recorded field; the
    target's own forward pass when the behavior is the target model (scored
    once, the behavior's temperature/top-p applied to the same logits); a
    second model on the target's tokens (same tokenizer and template:
    alignment "direct"); a second model on its own tokens and template,
    aligned by character offsets (alignment "char-offsets", align.py).
    """

    def __init__(self, options: ScoreOptions, sources: "ModelSources",
                 progress: Callable[[int, int], None] | None) -> None:
        from .models import load_model, load_tokenizer
        from .scoring import SamplingParams, TorchScorer, resolve_device, scoring_dtype

        if options.backend != "torch":
            raise UsageError(f"--backend {options.backend}: only 'torch' is available in this build")
        spec = options.behavior
        self.device = resolve_device(options.device)
        self.dtype = scoring_dtype(self.device)
        self.sources = sources
        self.tokenizer = load_tokenizer(sources.target, trust_remote_code=options.trust_remote_code)
        try:
            self.target_tokenizer = ConversationTokenizer(self.tokenizer, options.tokenize)
        except ValueError as exc:
            raise UsageError(f"--target {sources.target.spec}: {exc} (--template)") from None
        self.target_policy = SamplingParams()
        self.behavior_policy = SamplingParams(spec.temperature, spec.top_p)

        def scorer(source, report):
            model = load_model(source, device=self.device, dtype=self.dtype, trust_remote_code=options.trust_remote_code)
            return TorchScorer(model, device=self.device, batch_tokens=options.batch_tokens, progress=report)

        self.recorded = sources.behavior is None
        other_model = not self.recorded and sources.behavior.fingerprint != sources.target.fingerprint
        self.behavior_tokenizer: ConversationTokenizer | None = None  # set: align by character offsets
        if not self.recorded:
            tokenizer = (load_tokenizer(sources.behavior, trust_remote_code=options.trust_remote_code)
                         if other_model else self.tokenizer)
            try:
                behavior_tokenizer = ConversationTokenizer(tokenizer, TokenizeConfig(template=spec.template))
            except ValueError as exc:
                raise UsageError(f"--behavior {sources.behavior.spec}: {exc} (--behavior-template)") from None
            if aligns_by_characters(spec.alignment, self.target_tokenizer, behavior_tokenizer, sources.behavior.spec):
                self.behavior_tokenizer = behavior_tokenizer
                self._probe(sources.behavior.spec)
        self.target = scorer(sources.target, progress)
        self.behavior = None  # None: the target's forward pass also gives the behavior log-probs
        if other_model:
            self.behavior = scorer(sources.behavior, None)
        elif self.behavior_tokenizer is not None:
            self.behavior = self.target  # the target model on its own re-rendering of the row

    @property
    def alignment(self) -> str:
        return "direct" if self.behavior_tokenizer is None else "char-offsets"

    def _probe(self, name: str) -> None:
        """Align a probe row once, so that a tokenizer whose offsets are unusable stops the run (exit 2)."""
        whole = ConversationTokenizer(self.tokenizer, dataclasses.replace(self.target_tokenizer.config, max_length=None))
        try:
            self.align(PROBE, whole(PROBE))
        except RowError as exc:
            raise UsageError(f"--behavior {name}: cannot align its tokens to the target's by character offsets: "
                             f"{exc.reason}") from None

    def align(self, conversation: Conversation, target: TokenizedRow) -> tuple[TokenizedRow, RowAlignment]:
        """The row in the behavior's tokens, and its alignment onto the target tokens."""
        behavior = self.behavior_tokenizer(conversation)
        contents = completion_contents(conversation)
        turns = turn_tokens(behavior, contents, "behavior tokenizer")
        return behavior, align_row(target, turns, contents, behavior_name="behavior tokenizer")

    def prepare(self, shard: list[CorpusRow], shape: RowShape, behavior_field: str | None) -> Prepared:
        """Decode, normalize and tokenize a shard's rows; every row lands in `rows` or `rejects`."""
        prepared = Prepared()
        for row in shard:
            if row.error is not None:
                prepared.rejects.append((row, row.error))
                continue
            try:
                conversation = to_conversation(row.record, shape)
                item = PreparedRow(row, self.target_tokenizer(conversation))
                if behavior_field is not None:
                    item.recorded, item.alignment = recorded_behavior(
                        row.record, behavior_field, item.target, completion_contents(conversation))
                elif self.behavior_tokenizer is not None:
                    item.behavior, item.alignment = self.align(conversation, item.target)
            except RowError as exc:
                prepared.rejects.append((row, exc.reason))
                continue
            prepared.rows.append(item)
        return prepared

    def score(self, prepared: Prepared) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """Per row, float32 [n] target log-probs and behavior log-probs on the target tokens (aligned)."""
        rows = prepared.rows
        if not rows:
            return [], []
        ids = [r.target.input_ids for r in rows]
        masks = [r.target.completion_mask for r in rows]
        if self.recorded:
            (target,) = self.target.score(ids, masks, [self.target_policy])
            return target, [r.recorded if r.alignment is None else r.alignment.behavior_logprobs(r.recorded)
                            for r in rows]
        if self.behavior is None:
            target, behavior = self.target.score(ids, masks, [self.target_policy, self.behavior_policy])
            return target, behavior
        (target,) = self.target.score(ids, masks, [self.target_policy])
        if self.behavior_tokenizer is None:
            (behavior,) = self.behavior.score(ids, masks, [self.behavior_policy])
            return target, behavior
        (own,) = self.behavior.score([r.behavior.input_ids for r in rows],
                                     [r.behavior.completion_mask for r in rows], [self.behavior_policy])
        return target, [r.alignment.behavior_logprobs(b) for r, b in zip(rows, own)]

    def describe(self, options: ScoreOptions) -> dict:
        from .models import tokenizer_fingerprint

        spec = options.behavior
        behavior = {"temperature": spec.temperature, "top_p": spec.top_p}
        if spec.logprobs_field is not None:
            behavior["recorded_field"] = spec.logprobs_field
        if self.behavior_tokenizer is not None:
            behavior["template"] = self.behavior_tokenizer.mode
            behavior["tokenizer"] = {"fingerprint": tokenizer_fingerprint(self.behavior_tokenizer.tokenizer),
                                     "chat_template_hash": chat_template_hash(self.behavior_tokenizer.tokenizer)}
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


def aligns_by_characters(alignment: str, target: ConversationTokenizer, behavior: ConversationTokenizer,
                         name: str) -> bool:
    """Whether behavior log-probs must be aligned by character offsets (`--alignment`, BehaviorSpec).

    "auto": when the behavior does not render rows into the target's exact tokens (another tokenizer,
    template mode or chat template); "direct" with such a behavior is a UsageError.
    """
    from .models import tokenizer_fingerprint

    same_tokens = (behavior.mode == target.mode
                   and (behavior.tokenizer is target.tokenizer
                        or (tokenizer_fingerprint(behavior.tokenizer) == tokenizer_fingerprint(target.tokenizer)
                            and chat_template_hash(behavior.tokenizer) == chat_template_hash(target.tokenizer))))
    if alignment == "direct" and not same_tokens:
        raise UsageError(f"--alignment direct: --behavior {name} does not render rows into the target's tokens "
                         "(another tokenizer or template); use --alignment auto or char-offsets")
    return alignment == "char-offsets" or not same_tokens


def completion_contents(conversation: Conversation) -> list[str]:
    """The content strings of the trained assistant turns, in order (the text alignment works on)."""
    return [m["content"] for m in conversation if is_completion_turn(m)]


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
        behavior_spec = options.behavior.model or DEFAULT_BEHAVIOR
        behavior = target if behavior_spec == options.target else resolve_model(behavior_spec)
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
    """Original columns + the scored columns of design section 2 (no weights yet).

    shared_boundary is the completion mask itself when behavior and target
    share the tokens (every completion token ends its own span).
    """
    table = records_table([r.row.record for r in prepared.rows])
    tokenized = [r.target for r in prepared.rows]
    shared = [r.target.completion_mask if r.alignment is None else r.alignment.shared_boundary for r in prepared.rows]
    scored = {
        "input_ids": pa.array([t.input_ids for t in tokenized], pa.list_(pa.int32())),
        "completion_mask": pa.array([t.completion_mask for t in tokenized], pa.list_(pa.int8())),
        "target_logprobs": pa.array(target, pa.list_(pa.float32())),
        "behavior_logprobs": pa.array(behavior, pa.list_(pa.float32())),
        "shared_boundary": pa.array(shared, pa.list_(pa.int8())),
    }
    return with_columns(table, scored)


def reject_table(rejects: list[tuple[int, str, str]]) -> pa.Table:
    """rejects.parquet rows: the input row's index, why, and the row itself as JSON (or the raw line)."""
    return pa.table({
        "row_index": pa.array([r[0] for r in rejects], pa.int64()),
        "reject_reason": pa.array([r[1] for r in rejects], pa.string()),
        "source": pa.array([r[2] for r in rejects], pa.string()),
    })


def alignment_summary(mode: str, committed: list) -> dict:
    """Manifest `alignment`: the mode, and how the completion characters fell into spans (align.py)."""
    totals = AlignmentStats()
    for record in committed:
        if record.stats.get("alignment"):
            totals.add(AlignmentStats(**record.stats["alignment"]))
    if mode == "direct" and totals.rows:
        mode = "char-offsets"  # recorded log-probs in the behavior's own tokens
    summary = {"mode": mode}
    if mode != "direct":
        summary.update(totals.to_dict())
    return summary


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
    if meter:
        meter.advance(writer.next_input_row, 0)

    for shard in _shards(source.rows(), writer.next_input_row, options.shard_rows):
        prepared = policies.prepare(shard, shape, options.behavior.logprobs_field)
        if meter:
            meter.start_call()
            meter.advance(len(prepared.rejects), 0)
        target, behavior = policies.score(prepared)
        rejects = [(row.index, reason, _source_text(row)) for row, reason in prepared.rejects]
        stats = {"tokens": 0, "completion_tokens": 0, "truncated_prompt_tokens": 0,
                 "truncated_completion_tokens": 0, "rows_truncated": 0, "weight_sums": None, "alignment": None}
        with writer.shard() as handle:
            if prepared.rows:
                table = scored_table(prepared, target, behavior)
                reasons = validate(table, shard_config)
                good = [i for i, r in enumerate(reasons) if r is None]
                for i, reason in enumerate(reasons):
                    if reason is not None:
                        row = prepared.rows[i].row
                        rejects.append((row.index, reason, _source_text(row)))
                if good:
                    kept = table.take(pa.array(good, pa.int64())) if len(good) < len(reasons) else table
                    rows = token_rows(kept)
                    handle.write(with_columns(kept, weight_columns(rows, weigh(rows, shard_config))))
                    if config.normalize == "dataset":
                        stats["weight_sums"] = weight_sums(rows, config).sums
                    stats["tokens"] = int(rows.offsets[-1])
                    stats["completion_tokens"] = int(np.count_nonzero(rows.completion_mask == 1))
                    aligned = AlignmentStats()
                    for i in good:
                        t = prepared.rows[i].target
                        stats["truncated_prompt_tokens"] += t.truncated_prompt_tokens
                        stats["truncated_completion_tokens"] += t.truncated_completion_tokens
                        stats["rows_truncated"] += int(t.truncated_prompt_tokens + t.truncated_completion_tokens > 0)
                        if prepared.rows[i].alignment is not None:
                            aligned.add(prepared.rows[i].alignment.stats)
                    stats["alignment"] = dataclasses.asdict(aligned)
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
            columns = ["completion_mask", "target_logprobs", "behavior_logprobs", "shared_boundary"]
            for batch in pq.ParquetFile(path).iter_batches(batch_size=512, columns=columns):
                weigh(token_rows(batch), config, observer=diagnostics)

    summary = diagnostics.summary()
    manifest = {
        "tool": {"name": "pear-data", "version": __version__},
        "command": "score",
        "input": {"path": str(corpus), "kind": source.kind, "split": source.split, "fingerprint": fingerprint,
                  "shape": shape.describe()},
        **policies.describe(options),
        "scoring": {"backend": options.backend, "device": policies.device, "batch_tokens": options.batch_tokens},
        "tokenize": {**dataclasses.asdict(options.tokenize), "mode": policies.target_tokenizer.mode},
        "alignment": alignment_summary(policies.alignment, writer.committed),
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
