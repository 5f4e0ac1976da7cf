"""The two policies a corpus is scored under: load them, prepare a shard's rows, score them.

    recipe = PolicyRecipe(models, shape, columns, scoring, tokenize, behavior)   # picklable: any process loads it
    policies = recipe.load()       target tokenizer + target scorer + behavior source (behavior.py)
    policies.prepare(rows)         CPU: decode, normalize and tokenize each row, prepare it for the behavior
    policies.score(prepared)       models: log-probs under both policies -> an Arrow table of scored rows

Every input row of a shard ends in the scored table or in the shard's rejects.
The weigh stage (weigh.py) and the writer take it from there.
"""

from __future__ import annotations

import copy
import dataclasses
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from .align import AlignmentStats
from .behavior import BehaviorRow, BehaviorSource, choose_behavior
from .config import DEFAULT_BEHAVIOR, BehaviorSpec, SamplingParams, ScoringConfig, TokenizeConfig
from .corpus import (
    Conversation,
    CorpusRow,
    InputColumnError,
    InputColumns,
    RowShape,
    json_text,
    records_table,
    to_conversation,
)
from .errors import RowError, UsageError
from .schema import BEHAVIOR_LOGPROBS, COLUMNS, COMPLETION_MASK, INPUT_IDS, SHARED_BOUNDARY, TARGET_LOGPROBS
from .tokenize import ConversationTokenizer, TokenizedRow, chat_template_hash
from .weigh import with_columns

if TYPE_CHECKING:
    from .models import ModelSource


@dataclass(frozen=True)
class ModelSources:
    """The resolved target and behavior models (behavior None: recorded log-probs)."""

    target: ModelSource
    behavior: ModelSource | None

    @classmethod
    def resolve(cls, target: str, behavior: BehaviorSpec) -> ModelSources:
        """The `--target` spec and the behavior's model (none with recorded log-probs), resolved."""
        from .models import resolve_model

        target_source = resolve_model(target)
        if behavior.logprobs_field is not None:
            return cls(target_source, None)
        spec = behavior.model or DEFAULT_BEHAVIOR
        return cls(target_source, target_source if spec == target else resolve_model(spec))

    @property
    def same_weights(self) -> bool:
        """Whether the behavior model has the target's weights (and config). That alone does not make it the
        target: its tokenizer and template decide too (`behavior.choose_behavior`)."""
        return self.behavior is not None and self.behavior.fingerprint == self.target.fingerprint

    def fingerprints(self) -> dict:
        return {"target": self.target.fingerprint,
                "behavior": None if self.behavior is None else self.behavior.fingerprint}


@dataclass
class PreparedRow:
    """One row ready to score: the input row, its target tokens, what the behavior source prepared."""

    row: CorpusRow
    target: TokenizedRow
    behavior: BehaviorRow


@dataclass
class PreparedShard:
    """A shard's rows after preparation: what goes to the models, and what was rejected (row, reason).

    records: the prepared rows' own columns as an Arrow table (`records_table`), None before it is built.
    """

    rows: list[PreparedRow] = field(default_factory=list)
    rejects: list[tuple[CorpusRow, str]] = field(default_factory=list)
    records: pa.Table | None = None


@dataclass
class ScoredShard:
    """A shard's rows with their log-probs.

    table:   one row per scored row: the input's own columns + input_ids, completion_mask,
             target_logprobs, behavior_logprobs, shared_boundary (no weights yet)
    rows:    the input row behind each table row
    rejects: (row index, reason, source text) of the rows rejected before scoring
    """

    table: pa.Table
    rows: list[PreparedRow]
    rejects: list[tuple[int, str, str]]

    def reject(self, i: int, reason: str) -> tuple[int, str, str]:
        """A rejects entry for table row i (rejected by the weigh stage)."""
        row = self.rows[i].row
        return row.index, reason, source_text(row)

    def stats(self, kept: np.ndarray) -> dict:
        """Manifest counts over the kept table rows: truncation and cross-tokenizer alignment."""
        stats = {"truncated_prompt_tokens": 0, "truncated_completion_tokens": 0, "rows_truncated": 0}
        aligned = AlignmentStats()
        for i in kept:
            target, alignment = self.rows[i].target, self.rows[i].behavior.alignment
            stats["truncated_prompt_tokens"] += target.truncated_prompt_tokens
            stats["truncated_completion_tokens"] += target.truncated_completion_tokens
            stats["rows_truncated"] += int(target.truncated_prompt_tokens + target.truncated_completion_tokens > 0)
            if alignment is not None:
                aligned.add(alignment.stats)
        stats["alignment"] = dataclasses.asdict(aligned)
        return stats


def source_text(row: CorpusRow) -> str:
    """The input row as rejects.parquet keeps it: JSON of the decoded record, or the raw undecoded line."""
    if row.record is None:
        return row.raw or ""
    return json_text(row.record, sort_keys=True)


@dataclass(frozen=True)
class ScoringDescription:
    """What the manifest says about the policies (design 2.5): the same whichever engine or worker scored.

    models: per role, the model record and its dtype; behavior: temperature, top-p, why the mode was chosen and
    the source's own entries; tokenizer: fingerprint and chat template hash; scoring: backend, device type and
    budget (`scoring_record`); template: the target's template mode; alignment: "direct" or "char-offsets".
    """

    models: dict
    behavior: dict
    tokenizer: dict
    scoring: dict
    template: str
    alignment: str


@dataclass(frozen=True)
class PolicyRecipe:
    """Everything that loads the policies, in any process (the driver, a worker process, a Ray actor).

    models: the resolved model sources; shape: how rows become conversations; columns: the input columns'
    types, decided over the whole corpus (`Corpus.columns`; None: decided shard by shard, for a library caller
    with no corpus pass); scoring, tokenize, behavior: the narrow configs of the policies.
    """

    models: ModelSources
    shape: RowShape
    columns: InputColumns | None
    scoring: ScoringConfig
    tokenize: TokenizeConfig
    behavior: BehaviorSpec

    def on(self, device: str) -> PolicyRecipe:
        """The same recipe on another device (a worker's GPU)."""
        return dataclasses.replace(self, scoring=dataclasses.replace(self.scoring, device=device))

    def load(self, progress: Callable[[int, int], None] | None = None, *, models: bool = True,
             stop: threading.Event | None = None) -> Policies:
        """Load tokenizers first (cheap; bad flags fail here), then the models (not with models=False: such
        policies only `prepare`, as the CPU stage of a Ray run does). stop: once set, `score` stops at the next
        batch (ScoringStopped; the engines cancel with it)."""
        from .models import load_tokenizer
        from .scoring import resolve_device

        check_backend(self.scoring)
        try:
            device = resolve_device(self.scoring.device) if models else "cpu"
        except ValueError as exc:
            raise UsageError(f"--device {self.scoring.device}: {exc}") from None
        hf_tokenizer = load_tokenizer(self.models.target, trust_remote_code=self.scoring.trust_remote_code)
        try:
            target_tokenizer = ConversationTokenizer(hf_tokenizer, self.tokenize, name="target tokenizer")
        except ValueError as exc:
            raise UsageError(f"--target {self.models.target.spec}: {exc} (--template)") from None
        scorers = _Scorers(self, device, stop) if models else None
        behavior = self._behavior(target_tokenizer, scorers)
        target_scorer = scorers.get("target", self.models.target, progress) if scorers else None
        description = self._describe(device, hf_tokenizer, target_tokenizer, behavior)
        row_limit = getattr(target_scorer, "max_row_tokens", None)
        return Policies(target_tokenizer, target_scorer, behavior, self.shape, description, self.columns,
                        row_limit=row_limit() if row_limit else None)

    def _behavior(self, target_tokenizer: ConversationTokenizer, scorers: _Scorers | None) -> BehaviorSource:
        from .models import load_tokenizer

        models, trust = self.models, self.scoring.trust_remote_code
        return choose_behavior(
            self.behavior, target_tokenizer,
            behavior_tokenizer=None if models.behavior is None or models.behavior is models.target
            else (lambda: load_tokenizer(models.behavior, trust_remote_code=trust)),
            load_scorer=lambda: scorers.get("behavior", models.behavior, None) if scorers else None,
            behavior_name=self.behavior.model or DEFAULT_BEHAVIOR,
            same_weights=models.same_weights,
        )

    def _describe(self, device: str, hf_tokenizer: Any, target_tokenizer: ConversationTokenizer,
                  behavior: BehaviorSource) -> ScoringDescription:
        from .models import tokenizer_fingerprint
        from .scoring import scoring_dtype

        vllm = self.scoring.backend == "vllm"
        dtype_name = "bfloat16" if vllm else str(scoring_dtype(device)).removeprefix("torch.")
        sources = (("target", self.models.target), ("behavior", self.models.behavior))
        return ScoringDescription(
            models={role: {**source.to_dict(), "dtype": dtype_name} for role, source in sources if source},
            behavior={"temperature": self.behavior.temperature, "top_p": self.behavior.top_p,
                      "mode_reason": behavior.reason, **behavior.describe()},
            tokenizer={"fingerprint": tokenizer_fingerprint(hf_tokenizer),
                       "chat_template_hash": chat_template_hash(hf_tokenizer)},
            # the device type only: the same manifest whichever GPU (or how many workers) scored the rows
            scoring=scoring_record(self.scoring, device.split(":")[0]),
            template=target_tokenizer.mode,
            alignment=behavior.alignment,
        )


class _Scorers:
    """The scorers of one load, one per role; a behavior with the target's weights shares the loaded model."""

    def __init__(self, recipe: PolicyRecipe, device: str, stop: threading.Event | None) -> None:
        self.recipe, self.device, self.stop = recipe, device, stop
        self.scorers: dict[str, Any] = {}
        self.loaded: dict[str, Any] = {}  # weight fingerprint -> model

    def get(self, role: str, source: ModelSource, progress: Callable | None) -> Any:
        from .models import load_model
        from .scoring import TorchScorer, scoring_dtype

        config = self.recipe.scoring
        if role in self.scorers:
            return self.scorers[role]
        if config.backend == "vllm":
            self.scorers[role] = vllm_scorer(source, config, progress)
            return self.scorers[role]
        if source.fingerprint not in self.loaded:
            self.loaded[source.fingerprint] = load_model(source, device=self.device, dtype=scoring_dtype(self.device),
                                                         trust_remote_code=config.trust_remote_code)
        self.scorers[role] = TorchScorer(self.loaded[source.fingerprint], device=self.device,
                                         batch_tokens=config.batch_tokens, progress=progress,
                                         name=f"--{role} {source.spec}", stop=self.stop)
        return self.scorers[role]


class Policies:
    """The loaded target (tokenizer and scorer) and the behavior source; see the module docstring."""

    def __init__(self, target_tokenizer: ConversationTokenizer, target_scorer: Any, behavior: BehaviorSource,
                 shape: RowShape, description: ScoringDescription, columns: InputColumns | None = None, *,
                 row_limit: int | None = None) -> None:
        self.target_tokenizer = target_tokenizer
        self.target_scorer = target_scorer
        self.behavior = behavior
        self.shape = shape
        self.description = description
        self.columns = columns
        # The longest row the target scorer takes (vLLM's engine: max_model_len - 1), None: no limit.
        self.row_limit = row_limit

    def prepare(self, shard: list[CorpusRow]) -> PreparedShard:
        """Decode, normalize and tokenize a shard's rows; every row lands in `rows` or `rejects`."""
        prepared = PreparedShard()
        for row in shard:
            if row.error is not None:
                prepared.rejects.append((row, row.error))
                continue
            try:
                conversation = to_conversation(row.record, self.shape)
                target = self.target_tokenizer(conversation)
                if self.row_limit is not None and target.num_tokens > self.row_limit:
                    target = self._fit_row_limit(conversation, target.num_tokens)
                behavior = self.behavior.prepare(row.record, conversation, target)
            except RowError as exc:
                prepared.rejects.append((row, exc.reason))
                continue
            prepared.rows.append(PreparedRow(row, target, behavior))
        if prepared.rows:
            self._records(prepared)
        return prepared

    def _fit_row_limit(self, conversation: Conversation, n_tokens: int) -> TokenizedRow:
        """A row longer than the scorer takes (`row_limit`), under the run's --on-overflow rule against that
        limit: truncate keeps its first row_limit tokens (design 2.6), skip is a RowError, error a UsageError."""
        limit, rule = self.row_limit, self.target_tokenizer.config.on_overflow
        what = f"{n_tokens} tokens, more than the vLLM engine takes ({limit}: its max_model_len less one)"
        if rule == "error":
            raise UsageError(f"a row has {what}: pass --max-length {limit}, or --on-overflow truncate or skip")
        if rule == "skip":
            raise RowError(f"over the vLLM engine's length: {what}")
        cut = copy.copy(self.target_tokenizer)
        cut.config = dataclasses.replace(cut.config, max_length=limit)
        try:
            return cut(conversation)
        except RowError as exc:
            raise RowError(f"the vLLM engine takes {limit} tokens: {exc.reason}") from None

    def _records(self, prepared: PreparedShard) -> None:
        """Build the prepared rows' own columns (`records_table`); a row whose value does not fit its column's
        type (only when the corpus changed after the column pass) is rejected, naming the column."""
        columns = self.columns or InputColumns.infer(r.row.record for r in prepared.rows)
        try:
            prepared.records = records_table([r.row.record for r in prepared.rows], columns)
            return
        except InputColumnError:
            pass
        kept = []
        for row in prepared.rows:
            try:
                records_table([row.row.record], columns)
                kept.append(row)
            except InputColumnError as exc:
                prepared.rejects.append((row.row, exc.reason))
        prepared.rows = kept
        prepared.records = records_table([r.row.record for r in kept], columns) if kept else None

    def score(self, prepared: PreparedShard) -> ScoredShard:
        """Log-probs of every prepared row under both policies, as an Arrow table (`ScoredShard`)."""
        rows = prepared.rows
        rejects = [(row.index, reason, source_text(row)) for row, reason in prepared.rejects]
        if not rows:
            return ScoredShard(pa.table({}), rows, rejects)
        targets = [r.target for r in rows]
        policies = [SamplingParams(), *self.behavior.target_policies]  # the target at T=1, then the extra ones
        target, *extra = self.target_scorer.score([t.input_ids for t in targets],
                                                  [t.completion_mask for t in targets], policies)
        behavior = self.behavior.logprobs(targets, [r.behavior for r in rows], extra)
        return ScoredShard(scored_table(rows, target, behavior, prepared.records), rows, rejects)


def check_backend(scoring: ScoringConfig) -> None:
    """UsageError unless this environment can score with the backend (before any output is written).

    vllm (experimental): a CUDA device and a vLLM this backend supports (`vllm_backend.MIN_VLLM` on) installed
    in this environment; the flags it needs are checked by `config.ScoreOptions`.
    """
    if scoring.backend != "vllm":
        return
    import importlib.util

    from .scoring.vllm_backend import INSTALL_HINT, installed_vllm_version, version_problem

    if importlib.util.find_spec("vllm") is None:
        raise UsageError(f"--backend vllm needs vLLM: {INSTALL_HINT}")
    version = installed_vllm_version()
    if version is not None and version_problem(version):
        raise UsageError(f"--backend vllm: {version_problem(version)}")


def vllm_scorer(source: ModelSource, scoring: ScoringConfig, progress: Callable | None) -> Any:
    """A VllmScorer on the target's local files: its HF directory, its Hub snapshot, or the converted cache
    of a GGUF model (vLLM is not given the GGUF itself)."""
    from .models import ensure_converted
    from .scoring import VllmScorer

    path = ensure_converted(source) if source.gguf_file else source.path
    return VllmScorer(str(path), progress=progress, dtype="bfloat16", trust_remote_code=scoring.trust_remote_code,
                      gpu_memory_utilization=scoring.vllm_gpu_memory_utilization,
                      tensor_parallel_size=scoring.vllm_tensor_parallel_size)


def scoring_record(scoring: ScoringConfig, device_type: str) -> dict:
    """The manifest's `scoring`: what decides the numbers, the same for any worker count or engine."""
    if scoring.backend == "vllm":
        return {"backend": "vllm", "device": "cuda", "dtype": "bfloat16", "head_dtype": "float32",
                "engine": {"gpu_memory_utilization": scoring.vllm_gpu_memory_utilization,
                           "tensor_parallel_size": scoring.vllm_tensor_parallel_size}}
    from .scoring import default_batch_tokens

    return {"backend": "torch", "device": device_type,
            "batch_tokens": scoring.batch_tokens or default_batch_tokens(device_type)}


def scored_table(rows: list[PreparedRow], target: list[np.ndarray], behavior: list[np.ndarray],
                 records: pa.Table | None = None) -> pa.Table:
    """The input rows' own columns (`records`, else `records_table` of the rows) + the scored columns
    (schema.py), no weights yet.

    shared_boundary is the completion mask itself when behavior and target share the tokens (every
    completion token ends its own span).
    """
    table = records if records is not None else records_table([r.row.record for r in rows])
    scored = {
        INPUT_IDS: [r.target.input_ids for r in rows],
        COMPLETION_MASK: [r.target.completion_mask for r in rows],
        TARGET_LOGPROBS: target,
        BEHAVIOR_LOGPROBS: behavior,
        SHARED_BOUNDARY: [r.target.completion_mask if r.behavior.alignment is None
                          else r.behavior.alignment.shared_boundary for r in rows],
    }
    return with_columns(table, {name: pa.array(values, COLUMNS[name].type) for name, values in scored.items()})
