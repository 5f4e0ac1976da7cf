"""Experimental: score token rows with vLLM's prompt log-probs (`VllmScorer`).

Status: experimental, never run by this project. vLLM needs a CUDA GPU and
pins its own torch build, so it lives in its own environment (`pip install
'pear-data[vllm]'` there: vLLM >= 0.26); this module imports it only when an
engine is built. What the code relies on was read in vLLM's own source (0.8,
0.26 to 0.34); the tests run it on stand-ins copied from that source, never on
vLLM.

The engine: `vllm.LLM(model, hf_overrides={"head_dtype": "float32"},
enable_prefix_caching=False, ...)`. vLLM computes a generation model's lm_head
in the model dtype unless `head_dtype` says otherwise (its LogitsProcessor
reads it from 0.26 on; older versions are refused): in float32 the head's
products are accumulated and returned in float32, the torch backend's
arithmetic on CUDA, where a bfloat16 head rounds every logit to 8 significant
bits before the log-softmax. A built engine is checked once (`check_engine`):
a float32 head, no `logprobs_mode` that returns logits.

A call: pear-data's own token ids go as `TokensPrompt`s (no re-tokenization)
in one `generate` call, `max_tokens=1` (the generated token is discarded),
temperature 1. vLLM refuses a prompt of `max_model_len` tokens or more and
then aborts the whole call, so rows are checked against `max_row_tokens()`
first (`pear-data score` fits them by its --on-overflow rule), and a request
vLLM refuses all the same is a UsageError naming vLLM's error. Every output's
`prompt_token_ids` must be the ids sent. The log-probs are asked for in one of
two ways (`request_format`):

- TOKEN_IDS, vLLM >= 0.32 on its V2 model runner: per row
  `prompt_logprob_start = first - 1` and `prompt_logprob_token_ids` = the
  row's tokens from `first` (its first completion position) as an
  [n - first, 1] column. vLLM runs the lm_head on those positions only, 1,024
  at a time, and returns `prompt_token_id_logprobs`, one float32
  [n - first, 1] array per row (`token_id_logprobs_to_arrays`).
- PROMPT_LOGPROBS otherwise (0.26 to 0.31, the V1 runner that 0.32 and 0.33
  fall back to, KV-sharing fast prefill): `prompt_logprobs=0` with
  `flat_logprobs=True`. `prompt_logprobs` has one entry per position, entry 0
  empty (the first token has no context), entry i a mapping token id ->
  `Logprob` holding the prompt's own token whatever its rank
  (`prompt_logprobs_to_arrays`, which reads the list format too). On the V1
  runner the logits of every position of a scheduled chunk are built at once,
  and vLLM's start-up memory profile computes logits for one position per
  request only: keep `max_num_batched_tokens` small enough for a float32
  [tokens, vocab] buffer.

Which policies: vLLM's prompt log-probs are the log-softmax of the raw logits,
whatever the request's temperature and top-p (temperature 1 is sent all the
same: the V0 engine of vLLM before 0.26 applied it). So this backend scores the target
policy (temperature 1, top-p 1) and nothing else: a behavior policy at another
temperature or with a nucleus must be scored by the torch backend, and asking
for one here is a ValueError that says so.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from pear_data.config import SamplingParams

INSTALL_HINT = (
    "pip install 'pear-data[vllm]' in an environment of its own: vLLM pins its own torch and CUDA build, "
    "which can replace the torch that the rest of pear-data uses"
)
# A vLLM log-prob may come out a rounding error above 0; beyond this it is not a log-prob.
_POSITIVE_TOLERANCE = 1e-4
# The first vLLM whose LogitsProcessor computes the lm_head in `ModelConfig.head_dtype` for generation models
# (vllm/model_executor/layers/logits_processor.py); before it head_dtype was read by pooling heads only.
MIN_VLLM = (0, 26)
HEAD_DTYPE = "float32"
# The first vLLM whose prompt_logprob_token_ids are per prompt row ([rows, ids], vllm/sampling_params.py); 0.31
# has the field with another meaning (one list of ids scored at every row).
TOKEN_IDS_VLLM = (0, 32)
# How the engine is asked (`request_format`).
TOKEN_IDS, PROMPT_LOGPROBS = "prompt_logprob_token_ids", "prompt_logprobs"
# vllm/config/model.py LogprobsMode values under which prompt log-probs are logits.
LOGITS_MODES = ("raw_logits", "processed_logits")


def prompt_logprobs_to_arrays(
    prompt_logprobs_per_row: Sequence[Sequence[Mapping[int, Any] | None] | None],
    sequences: Sequence[np.ndarray],
    completion_masks: Sequence[np.ndarray],
) -> list[np.ndarray]:
    """vLLM's per-row `prompt_logprobs` as pear-data's log-prob arrays, in row order.

    prompt_logprobs_per_row[r]: row r's `RequestOutput.prompt_logprobs`, in either of vLLM's formats (a list,
    or a `FlatLogprobs` when the request set flat_logprobs): one entry per token of sequences[r]; entry i maps
    token ids to `Logprob` objects (anything with a `.logprob`) or plain floats, and is read with a Python
    int index. Entry 0 is never read. A row without a completion position i >= 1 is not read at all (it may
    be None). Returns float32 [n_r] per row: the log-prob of sequences[r][i] at every completion position
    i >= 1 (completion_masks[r][i] != 0), 0.0 elsewhere and at position 0. -inf passes through (a token the
    model gives no probability). Raises ValueError, naming the row and position, for a missing entry, a
    mapping without the row's own token, NaN, or a value above 0 by more than rounding (tiny positive values
    become 0.0).
    """
    _check_counts(prompt_logprobs_per_row, sequences, completion_masks, "prompt_logprobs")
    arrays = []
    for r, (entries, sequence, mask) in enumerate(zip(prompt_logprobs_per_row, sequences, completion_masks)):
        sequence = np.asarray(sequence)
        out = np.zeros(len(sequence), dtype=np.float32)
        scored = _scored_positions(mask)
        if len(scored):
            if entries is None:
                raise ValueError(f"row {r}: vLLM returned no prompt_logprobs (was the request sent with "
                                 "prompt_logprobs=0?)")
            if len(entries) != len(sequence):
                raise ValueError(f"row {r}: {len(entries)} prompt log-prob entries for {len(sequence)} tokens")
            tokens = sequence[scored].tolist()
            # Python ints: vLLM's FlatLogprobs refuses numpy integers as indexes
            values = [_chosen_logprob(entries[i], t, r, i) for i, t in zip(scored.tolist(), tokens)]
            out[scored] = _checked_logprobs(np.array(values, dtype=np.float64), r, scored)
        arrays.append(out)
    return arrays


def token_id_logprobs_to_arrays(
    token_id_logprobs_per_row: Sequence[np.ndarray | None],
    sequences: Sequence[np.ndarray],
    completion_masks: Sequence[np.ndarray],
) -> list[np.ndarray]:
    """vLLM's per-row `prompt_token_id_logprobs` as pear-data's log-prob arrays, in row order.

    token_id_logprobs_per_row[r]: row r's `RequestOutput.prompt_token_id_logprobs` for the request that
    `request_params` builds (vLLM >= 0.32): float32 [n_r - first, 1], row j the log-prob of
    sequences[r][first + j] given the tokens before it, first being the row's first completion position
    >= 1. A row without a completion position i >= 1 is not read (it may be None). Returns what
    `prompt_logprobs_to_arrays` returns, with the same ValueErrors, and a ValueError for a missing array or
    one of another shape.
    """
    _check_counts(token_id_logprobs_per_row, sequences, completion_masks, "prompt_token_id_logprobs")
    arrays = []
    for r, (scores, sequence, mask) in enumerate(zip(token_id_logprobs_per_row, sequences, completion_masks)):
        out = np.zeros(len(sequence), dtype=np.float32)
        scored = _scored_positions(mask)
        if len(scored):
            first = int(scored[0])
            if scores is None:
                raise ValueError(f"row {r}: vLLM returned no prompt_token_id_logprobs (was the request sent "
                                 "with prompt_logprob_token_ids, and the prompt not read from a prefix cache?)")
            scores = np.asarray(scores)
            if scores.shape != (len(sequence) - first, 1):
                raise ValueError(f"row {r}: prompt_token_id_logprobs has shape {scores.shape}, expected "
                                 f"({len(sequence) - first}, 1) for {len(sequence)} tokens scored from {first}")
            out[scored] = _checked_logprobs(scores[scored - first, 0].astype(np.float64), r, scored)
        arrays.append(out)
    return arrays


def _check_counts(per_row: Sequence, sequences: Sequence, completion_masks: Sequence, what: str) -> None:
    if not (len(per_row) == len(sequences) == len(completion_masks)):
        raise ValueError(f"{len(per_row)} {what} for {len(sequences)} sequences and "
                         f"{len(completion_masks)} completion masks")


def _scored_positions(mask: np.ndarray) -> np.ndarray:
    """int64 [k]: the completion positions i >= 1 of a row (position 0 has no log-prob)."""
    return np.flatnonzero(np.asarray(mask)[1:] != 0) + 1


def _checked_logprobs(values: np.ndarray, row: int, positions: np.ndarray) -> np.ndarray:
    """values as float32 log-probs: ValueError naming the row and the first position of a NaN or a value
    above 0 by more than rounding; tiny positive values become 0.0, -inf stays."""
    bad = np.flatnonzero(np.isnan(values) | (values > _POSITIVE_TOLERANCE))
    if len(bad):
        raise ValueError(f"row {row}, position {int(positions[bad[0]])}: vLLM returned log-prob "
                         f"{float(values[bad[0]])}, not a log-prob")
    return np.minimum(values, 0.0).astype(np.float32)


def check_prompt_token_ids(row: int, sent: list[int], returned: Sequence[int] | None) -> None:
    """ValueError, naming the row and the first position that differs, unless vLLM's
    `RequestOutput.prompt_token_ids` are the ids sent for that row (the outputs belong to these rows)."""
    returned = [] if returned is None else list(returned)
    if returned == sent:
        return
    at = next((i for i, (a, b) in enumerate(zip(sent, returned)) if a != b), min(len(sent), len(returned)))
    raise ValueError(f"row {row}: vLLM's prompt_token_ids are not the {len(sent)} ids sent (they have "
                     f"{len(returned)}, and differ from position {at} on): were the outputs paired with other rows?")


def _chosen_logprob(entry: Mapping[int, Any] | None, token: int, row: int, position: int) -> float:
    """The log-prob of `token` in one position's mapping token id -> Logprob (or float)."""
    if not entry or token not in entry:
        have = "no entry" if not entry else f"only token ids {sorted(entry)[:8]}"
        raise ValueError(f"row {row}, position {position}: vLLM's prompt log-probs hold {have}, not the row's own "
                         f"token {token} (vLLM always includes the prompt token; were these outputs paired with "
                         "other rows, or tokenized differently?)")
    value = entry[token]
    return float(getattr(value, "logprob", value))


def _check_policies(policies: list[SamplingParams]) -> None:
    """ValueError unless there is at least one policy and every one is the raw distribution (T = 1, top-p = 1)."""
    if not policies:
        raise ValueError("policies is empty: pass at least one SamplingParams (the target is SamplingParams())")
    for params in policies:
        if params.temperature != 1.0 or params.top_p != 1.0:
            raise ValueError(
                f"the vllm backend scores log-probs of the raw model distribution only (temperature 1, top_p 1), "
                f"got temperature={params.temperature}, top_p={params.top_p}: vLLM's prompt log-probs ignore "
                "the sampling temperature and top-p. Score this policy with the torch backend (--backend torch)."
            )


def request_format(vllm: Any, llm: Any) -> str:
    """How this engine is asked for the log-probs: TOKEN_IDS where the vLLM version and its engine take
    per-row prompt_logprob_token_ids (0.32 on, the V2 model runner, no KV-sharing fast prefill: vLLM refuses
    them otherwise), else PROMPT_LOGPROBS (prompt_logprobs=0 in the flat format)."""
    config = llm.llm_engine.vllm_config
    if (_version(vllm.__version__) >= TOKEN_IDS_VLLM and getattr(config, "use_v2_model_runner", True)
            and not config.cache_config.kv_sharing_fast_prefill):
        return TOKEN_IDS
    return PROMPT_LOGPROBS


def request_params(vllm: Any, how: str, sequences: list[np.ndarray], completion_masks: list[np.ndarray],
                   sent: list[int]) -> Any:
    """vLLM's SamplingParams for rows `sent`: one throwaway generated token at temperature 1 and the prompt
    tokens' log-probs.

    PROMPT_LOGPROBS: one SamplingParams for all rows, prompt_logprobs=0 (the prompt token at every position,
    whatever its rank) with flat_logprobs. TOKEN_IDS: one per row, prompt_logprob_start = first - 1 and
    prompt_logprob_token_ids = the row's tokens from `first` on as an int [n - first, 1] column (first: the
    row's first completion position >= 1), so the lm_head runs from the first completion position only and
    the result is one array per row.
    """
    common = {"max_tokens": 1, "temperature": 1.0, "detokenize": False}
    if how != TOKEN_IDS:
        return vllm.SamplingParams(**common, prompt_logprobs=0, flat_logprobs=True)
    params = []
    for r in sent:
        first = int(_scored_positions(completion_masks[r])[0])
        ids = np.asarray(sequences[r])[first:].astype(np.int64).reshape(-1, 1)
        params.append(vllm.SamplingParams(**common, prompt_logprob_token_ids=ids, prompt_logprob_start=first - 1))
    return params


def _import_vllm() -> Any:
    """The vllm module, once its version is one this backend supports (ImportError otherwise)."""
    try:
        import vllm
    except ImportError as exc:
        raise ImportError(f"the vllm scoring backend needs vLLM, which is not installed ({exc}): "
                          f"{INSTALL_HINT}") from None
    problem = version_problem(vllm.__version__)
    if problem:
        raise ImportError(problem)
    return vllm


def installed_vllm_version() -> str | None:
    """The installed vLLM's version from its package metadata (vLLM is not imported), None if unknown."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("vllm")
    except PackageNotFoundError:
        return None


def _version(version: str) -> tuple[int, int]:
    """(major, minor) of a vLLM version string; (0, 0) when it has none."""
    numbers = re.match(r"(\d+)\.(\d+)", version)
    return (int(numbers[1]), int(numbers[2])) if numbers else (0, 0)


def version_problem(version: str) -> str | None:
    """Why this vLLM version cannot score for pear-data (a sentence that says what to do), None if it can."""
    if _version(version) >= MIN_VLLM:
        return None
    floor = ".".join(map(str, MIN_VLLM))
    return (f"vLLM {version} is older than {floor}, the first whose lm_head honours "
            f"hf_overrides={{'head_dtype': 'float32'}} (older ones round every logit to the model dtype): "
            f"pip install 'vllm>={floor}' in the vLLM environment")


def engine_settings(engine_kwargs: dict[str, Any]) -> dict[str, Any]:
    """The keyword arguments for `vllm.LLM`: engine_kwargs with prefix caching off unless asked for, and
    `hf_overrides` holding `head_dtype: float32` (the lm_head's output in float32, as the torch backend's).

    Raises ValueError for a `logprobs_mode` that returns logits, an `hf_overrides` that is not a dict, or one
    that asks for another head dtype.
    """
    refuse_logits_mode(engine_kwargs.get("logprobs_mode"))
    overrides = engine_kwargs.get("hf_overrides") or {}
    if not isinstance(overrides, dict):
        raise ValueError("hf_overrides must be a dict for the vllm backend: it adds head_dtype='float32' to it")
    if str(overrides.get("head_dtype", HEAD_DTYPE)).removeprefix("torch.") != HEAD_DTYPE:
        raise ValueError(f"hf_overrides asks for head_dtype={overrides['head_dtype']!r}: the vllm backend "
                         "computes the lm_head in float32, as the torch backend does; leave head_dtype out")
    return {"enable_prefix_caching": False, **engine_kwargs, "hf_overrides": {**overrides, "head_dtype": HEAD_DTYPE}}


def refuse_logits_mode(mode: str | None) -> None:
    """ValueError for a vLLM `logprobs_mode` under which prompt log-probs are logits, not log-probs."""
    if mode in LOGITS_MODES:
        raise ValueError(f"logprobs_mode={mode!r} makes vLLM return logits in place of log-probs: leave it "
                         "unset (raw_logprobs) or use processed_logprobs")


def check_engine(llm: Any) -> None:
    """UsageError unless a built engine returns float32-head log-probs: its `logprobs_mode` is not a logits
    mode and its lm_head runs in float32 (vLLM falls back to the model dtype, with a warning, on a platform
    without float32)."""
    from pear_data.errors import UsageError

    config = llm.llm_engine.model_config
    try:
        refuse_logits_mode(config.logprobs_mode)
    except ValueError as exc:
        raise UsageError(f"the vLLM engine: {exc}") from None
    head = str(config.head_dtype).removeprefix("torch.")
    if head != HEAD_DTYPE:
        raise UsageError(f"the vLLM engine computes the lm_head in {head}, not float32: build it with "
                         "hf_overrides={'head_dtype': 'float32'} on a platform that supports float32 (vLLM "
                         "falls back to the model dtype where it does not)")


def _json_ready(value: Any) -> Any:
    """value with its dicts kept, its scalars as they are and anything else as its str()."""
    if isinstance(value, dict):
        return {str(k): _json_ready(v) for k, v in value.items()}
    return value if isinstance(value, (str, int, float, bool, type(None))) else str(value)


class VllmScorer:
    """Experimental `Scorer` on a vLLM engine: target-policy (T = 1, top-p = 1) log-probs only.

    model: what `vllm.LLM(model=...)` loads (a Hub id or a local HF
    directory). engine_kwargs go to `vllm.LLM` through `engine_settings`
    (dtype, max_model_len, gpu_memory_utilization, tensor_parallel_size, ...;
    prefix caching off unless asked for, `head_dtype: float32` added to
    hf_overrides). llm: an engine already built (a `vllm.LLM`, with that
    float32 head); then `model` is only a label. The engine is built on first
    use (`score` or `max_row_tokens`). vocab_size: when given, token ids
    outside [0, vocab_size) are refused before anything is sent (as
    `TorchScorer` does). progress: called once per `score` call, when it is
    done, with (rows, real tokens). See the module docstring for what vLLM
    computes and why other policies are refused.
    """

    def __init__(self, model: str, *, llm: Any = None, vocab_size: int | None = None,
                 progress: Callable[[int, int], None] | None = None, **engine_kwargs: Any) -> None:
        self.model = model
        self.engine_kwargs = engine_settings(engine_kwargs)
        self.vocab_size = vocab_size
        self.progress = progress
        self._llm = llm
        self.request_format: str | None = None  # `request_format`, once the engine is built and checked

    def score(
        self,
        sequences: list[np.ndarray],
        completion_masks: list[np.ndarray],
        policies: list[SamplingParams],
    ) -> list[list[np.ndarray]]:
        """Same contract as `TorchScorer.score`, for target policies only (every policy T = 1, top-p = 1).

        Every row with a completion position goes to the engine in one `generate` call, and only once all of
        them are checked: a row longer than `max_row_tokens()` is a ValueError naming it before anything is
        sent (vLLM would refuse it and abort the whole call). A request vLLM refuses all the same is a
        UsageError that names vLLM's error.
        """
        _check_policies(policies)
        self._check_rows(sequences, completion_masks)
        # Only rows with something to score go to the engine (vLLM refuses an empty prompt).
        sent = [r for r, mask in enumerate(completion_masks) if np.any(np.asarray(mask)[1:] != 0)]
        per_row: list[Any] = [None] * len(sequences)
        token_ids = False
        if sent:
            outputs = self._generate(sequences, completion_masks, sent)  # builds the engine, sets request_format
            token_ids = self.request_format == TOKEN_IDS
            for r, output in zip(sent, outputs):
                per_row[r] = output.prompt_token_id_logprobs if token_ids else output.prompt_logprobs
        convert = token_id_logprobs_to_arrays if token_ids else prompt_logprobs_to_arrays
        values = convert(per_row, sequences, completion_masks)
        if self.progress is not None:
            self.progress(len(sequences), int(sum(len(s) for s in sequences)))
        return [values] + [[v.copy() for v in values] for _ in policies[1:]]

    def max_row_tokens(self) -> int:
        """The longest row the engine takes: its `max_model_len` less one, since vLLM's `generate` refuses a
        prompt of max_model_len tokens or more (it reserves one output token). Builds the engine."""
        return int(self._engine().llm_engine.model_config.max_model_len) - 1

    def _check_rows(self, sequences: list[np.ndarray], completion_masks: list[np.ndarray]) -> None:
        """ValueError naming the first row that is not a 1-D integer array with a mask of its shape and, when
        vocab_size is known, ids in [0, vocab_size)."""
        if len(sequences) != len(completion_masks):
            raise ValueError(f"{len(sequences)} sequences but {len(completion_masks)} completion masks")
        for r, (sequence, mask) in enumerate(zip(sequences, completion_masks)):
            sequence, mask = np.asarray(sequence), np.asarray(mask)
            if sequence.ndim != 1 or not np.issubdtype(sequence.dtype, np.integer):
                raise ValueError(f"row {r}: input_ids must be a 1-D integer array, got {sequence.dtype} "
                                 f"{sequence.shape}")
            if mask.shape != sequence.shape:
                raise ValueError(f"row {r}: completion_mask has shape {mask.shape}, input_ids {sequence.shape}")
            outside = len(sequence) and (sequence.min() < 0 or sequence.max() >= (self.vocab_size or 0))
            if self.vocab_size is not None and outside:
                bad = int(sequence.max() if sequence.max() >= self.vocab_size else sequence.min())
                raise ValueError(f"row {r}: token id {bad} is outside the model's vocabulary [0, {self.vocab_size}): "
                                 "was the row tokenized with another tokenizer?")

    def _generate(self, sequences: list[np.ndarray], completion_masks: list[np.ndarray], sent: list[int]) -> list[Any]:
        """vLLM's outputs for rows `sent`, in that order, each checked to hold its row's token ids."""
        from pear_data.errors import UsageError

        llm = self._engine()
        limit = self.max_row_tokens()
        too_long = next((r for r in sent if len(sequences[r]) > limit), None)
        if too_long is not None:
            raise ValueError(f"row {too_long}: {len(sequences[too_long])} tokens, more than the vLLM engine takes "
                             f"({limit}: max_model_len less the one output token); nothing was sent: cut or drop "
                             "such rows first (pear-data score does, by its --on-overflow rule)")
        prompts = [{"prompt_token_ids": np.asarray(sequences[r]).tolist()} for r in sent]  # a vllm TokensPrompt
        vllm = _import_vllm()
        params = request_params(vllm, self.request_format, sequences, completion_masks, sent)
        try:
            outputs = list(llm.generate(prompts, params, use_tqdm=False))
        except (vllm.exceptions.VLLMValidationError, ValueError) as exc:
            raise UsageError(f"vLLM refused a request of a batch of {len(sent)} rows, and so the whole batch: "
                             f"{type(exc).__name__}: {exc}") from exc
        if len(outputs) != len(sent):
            raise RuntimeError(f"vLLM returned {len(outputs)} outputs for {len(sent)} prompts")
        for r, prompt, output in zip(sent, prompts, outputs):
            check_prompt_token_ids(r, prompt["prompt_token_ids"], output.prompt_token_ids)
        return outputs

    def describe(self) -> dict:
        """The settings that decide the numbers, for a manifest (JSON-ready; the vLLM version once it is loaded)."""
        vllm = sys.modules.get("vllm")
        return {
            "backend": "vllm",
            "model": self.model,
            "engine": _json_ready(self.engine_kwargs),
            "vllm_version": getattr(vllm, "__version__", None),
            "request": {"max_tokens": 1, "temperature": 1.0, "prompt_log_probs": self.request_format},
        }

    def _engine(self) -> Any:
        """The engine, built on first use, checked once (`check_engine`) and its `request_format` chosen; vLLM's
        version is checked first."""
        vllm = _import_vllm()
        if self._llm is None:
            self._llm = vllm.LLM(model=self.model, **self.engine_kwargs)
        if self.request_format is None:
            check_engine(self._llm)
            self.request_format = request_format(vllm, self._llm)
        return self._llm
