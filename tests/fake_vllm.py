"""Stand-ins for vLLM's objects, copied from vLLM's own source (vLLM is not installed here).

Each class names the file it copies; the behaviour the backend relies on (shapes, indexing rules, the
errors) is kept as vLLM has it, the rest is left out.
"""

from __future__ import annotations

import types
from collections.abc import Iterator, MutableSequence, Sequence
from dataclasses import dataclass, field
from types import SimpleNamespace

import numpy as np
import torch


@dataclass
class Logprob:
    """vllm/logprobs.py `Logprob` (vLLM 0.8 to 0.34: unchanged)."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


@dataclass
class FlatLogprobs(MutableSequence):
    """vllm/logprobs.py `FlatLogprobs` (vLLM 0.12 to 0.34; `__getitem__` on an int is the same in all).

    What `prompt_logprobs` is when a request sets `flat_logprobs=True`. `__getitem__` takes a Python `int` or
    a slice and raises TypeError on anything else: a numpy integer is not an `int`.
    """

    start_indices: list[int] = field(default_factory=list)
    end_indices: list[int] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    ranks: list[int | None] = field(default_factory=list)
    decoded_tokens: list[str | None] = field(default_factory=list)

    def append(self, logprobs_one_position: dict[int, Logprob] | None) -> None:
        self.start_indices.append(len(self.logprobs))
        if logprobs_one_position:
            for token_id, logprob in logprobs_one_position.items():
                self.token_ids.append(token_id)
                self.logprobs.append(logprob.logprob)
                self.ranks.append(logprob.rank)
                self.decoded_tokens.append(logprob.decoded_token)
        self.end_indices.append(len(self.logprobs))

    def __len__(self) -> int:
        return len(self.start_indices)

    def __getitem__(self, index):
        if isinstance(index, int):
            return {
                self.token_ids[i]: Logprob(logprob=self.logprobs[i], rank=self.ranks[i],
                                           decoded_token=self.decoded_tokens[i])
                for i in range(self.start_indices[index], self.end_indices[index])
            }
        elif isinstance(index, slice):
            raise NotImplementedError("slices are not used by pear-data")
        else:
            raise TypeError(f"Invalid index type: {type(index)}")

    def __setitem__(self, item, value) -> None:
        raise TypeError("Cannot set logprobs in FlatLogprobs")

    def __delitem__(self, item) -> None:
        raise TypeError("Cannot delete logprobs from FlatLogprobs")

    def insert(self, index: int, value) -> None:
        raise TypeError("Cannot insert logprobs to FlatLogprobs")

    def __iter__(self) -> Iterator[dict[int, Logprob]]:
        for i in range(0, len(self.start_indices)):
            yield self.__getitem__(i)


def prompt_logprobs(token_ids: list[int], logprobs: list[float], *, flat: bool, rank: int = 3, start: int = 0):
    """A request's `prompt_logprobs` with `prompt_logprobs=0`, built as vLLM builds it.

    vllm/logprobs.py `create_prompt_logprobs` (a FlatLogprobs or a list, then None for the first token),
    v1/engine/logprobs.py (0.34: None for the rows before prompt_logprob_start) and
    `append_logprobs_for_next_position` (one dict per later position holding the prompt token only, whatever
    its rank, when the request asks for 0 top log-probs). logprobs[j] is the log-prob of token_ids[j + 1].
    """
    container = FlatLogprobs() if flat else []
    container.append(None)
    for j, (token, value) in enumerate(zip(token_ids[1:], logprobs)):
        container.append(None if j < start else {token: Logprob(logprob=value, rank=rank)})
    return container


# --------------------------------------------------------------------------- vllm.exceptions


def validation_error_class(version: tuple[int, int]) -> type[Exception]:
    """vllm/exceptions.py `VLLMValidationError`: a ValueError up to 0.26; from 0.27 a VLLMClientError, which is
    a VLLMError, which is a plain Exception (not a ValueError)."""
    if version <= (0, 26):
        base: tuple[type[Exception], ...] = (ValueError,)
    else:
        vllm_error = type("VLLMError", (Exception,), {})
        base = (type("VLLMClientError", (vllm_error,), {}),)

    def __init__(self, message: str, *, parameter: str | None = None, value=None) -> None:
        Exception.__init__(self, message)
        self.parameter, self.value = parameter, value

    return type("VLLMValidationError", base, {"__init__": __init__})


# --------------------------------------------------------------------------- vllm.SamplingParams


@dataclass(kw_only=True)
class SamplingParams:
    """vllm/sampling_params.py `SamplingParams`, the fields pear-data may set (0.26 to 0.30; `flat_logprobs`
    since 0.12). An unknown keyword is a TypeError, as msgspec's constructor raises."""

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int | None = 16
    prompt_logprobs: int | None = None
    flat_logprobs: bool = False
    detokenize: bool = True


@dataclass(kw_only=True)
class SamplingParams031(SamplingParams):
    """vLLM 0.31: `prompt_logprob_token_ids` is one list of ids, scored at every prompt row."""

    prompt_logprob_token_ids: list[int] | None = None
    prompt_logprob_start: int | None = None


@dataclass(kw_only=True)
class SamplingParams032(SamplingParams):
    """vLLM 0.32 on: `prompt_logprob_token_ids` is an integer array [rows, ids], row i holding the ids scored
    as predictions of prompt token prompt_logprob_start + i + 1 (-1 pads and scores -inf)."""

    prompt_logprob_token_ids: np.ndarray | None = None
    prompt_logprob_start: int | None = None


# --------------------------------------------------------------------------- vllm.LLM


def logprob(position: int, token: int) -> float:
    """The fake model's log-prob of `token` at `position` (given the tokens before it): position-dependent, so
    that a value read from the wrong position shows."""
    return -((token * 7 + position * 3) % 11 + 1) / 8


class LLM:
    """vllm/entrypoints/llm.py `LLM`, as far as pear-data uses it: `llm_engine.model_config` and
    `llm_engine.vllm_config`, and `generate`, which checks every request as vLLM does before running any
    (v1/engine/input_processor.py), aborts those already added when one is refused
    (entrypoints/common/offline.py `_render_and_add_requests`), and answers like `RequestOutput`
    (outputs.py). `calls` records the requests of each generate that ran; `aborted` those aborted."""

    version = (0, 34)
    error: type[Exception] = Exception  # the version's VLLMValidationError (make_vllm)

    def __init__(self, model: str, *, max_model_len: int = 64, dtype: str = "bfloat16", hf_overrides=None,
                 logprobs_mode: str = "raw_logprobs", vocab_size: int = 1000, **kwargs) -> None:
        self.kwargs = {"model": model, "max_model_len": max_model_len, "dtype": dtype, "hf_overrides": hf_overrides,
                       "logprobs_mode": logprobs_mode, **kwargs}
        # config/model.py _get_head_dtype: a generation model's head runs in the model dtype unless hf_overrides
        # names another (read by the lm_head from 0.26 on, model_executor/layers/logits_processor.py)
        head = (hf_overrides or {}).get("head_dtype") or dtype
        model_config = SimpleNamespace(max_model_len=max_model_len, logprobs_mode=logprobs_mode,
                                       head_dtype=getattr(torch, head), max_logprobs=20, runner_type="generate",
                                       get_vocab_size=lambda: vocab_size)
        vllm_config = SimpleNamespace(model_config=model_config,
                                      cache_config=SimpleNamespace(kv_sharing_fast_prefill=False))
        if (0, 31) <= self.version <= (0, 33):  # config/vllm.py: V2 by default, V1 where V2 lacks a feature
            vllm_config.use_v2_model_runner = True
        self.llm_engine = SimpleNamespace(model_config=model_config, vllm_config=vllm_config)
        self.calls: list[tuple[list, list]] = []
        self.aborted: list[list[int]] = []

    def generate(self, prompts, sampling_params, *, use_tqdm=True):
        error = self.error
        params = sampling_params if isinstance(sampling_params, Sequence) else [sampling_params] * len(prompts)
        if len(params) != len(prompts):
            raise error(f"The lengths of prompts ({len(prompts)}) and params ({len(params)}) must be the same.")
        added = []
        try:
            for prompt, request in zip(prompts, params):
                self._validate(list(prompt["prompt_token_ids"]), request, error)
                added.append(list(prompt["prompt_token_ids"]))
        except Exception:
            self.aborted.extend(added)
            raise
        self.calls.append((prompts, list(params)))
        return [self._output(list(p["prompt_token_ids"]), request) for p, request in zip(prompts, params)]

    def _validate(self, ids: list[int], params: SamplingParams, error) -> None:
        """v1/engine/input_processor.py `_validate_prompt_len` and the prompt_logprob_token_ids checks."""
        max_len = self.llm_engine.model_config.max_model_len
        if not ids:
            raise error("The decoder prompt cannot be empty")
        if len(ids) > max_len:
            raise error(f"The decoder prompt (length {len(ids)}) is longer than the maximum model length of "
                        f"{max_len}.")
        if len(ids) == max_len:
            raise error(f"The decoder prompt (length {len(ids)}) plus the number of requested output tokens (at "
                        f"least 1) is longer than the maximum model length of {max_len}.")
        if getattr(params, "prompt_logprob_token_ids", None) is not None or getattr(
                params, "prompt_logprob_start", None) is not None:
            self._validate_token_ids(len(ids), params, error)

    def _validate_token_ids(self, prompt_len: int, params, error) -> None:
        """sampling_params.py `_validate_logprobs` and input_processor.py, 0.31 to 0.34."""
        ids, start = params.prompt_logprob_token_ids, params.prompt_logprob_start or 0
        config = self.llm_engine.model_config
        if ids is None and (self.version < (0, 34) or params.prompt_logprobs is None):
            raise error("prompt_logprob_start requires prompt_logprob_token_ids.")
        if self.version >= (0, 34) and start and start >= prompt_len - 1:
            raise error(f"prompt_logprob_start must be less than prompt_len - 1 ({prompt_len - 1}).")
        if ids is None:
            return
        if self.version == (0, 31):
            if len(ids) > config.max_logprobs or len(set(ids)) != len(ids):
                raise error("prompt_logprob_token_ids: too many ids, or duplicates")
            return
        if not getattr(self.llm_engine.vllm_config, "use_v2_model_runner", True):
            raise error("prompt_logprob_token_ids requires the V2 model runner (VLLM_USE_V2_MODEL_RUNNER=1).")
        if not (isinstance(ids, np.ndarray) and ids.dtype.kind in "iu" and ids.ndim == 2 and ids.size):
            raise error("prompt_logprob_token_ids must be a non-empty integer array of shape [num_rows, num_ids].")
        if len(ids) > config.max_model_len - 1 or ids.shape[1] > config.max_logprobs:
            raise error("prompt_logprob_token_ids has too many rows or ids")
        if ids.min() < -1 or ids.max() >= config.get_vocab_size():
            raise error("prompt_logprob_token_ids contain out-of-vocab token ids (-1 pads a row).")
        if len(ids) != max(prompt_len - 1 - start, 0):
            raise error(f"prompt_logprob_token_ids has {len(ids)} rows, but the prompt has "
                        f"{max(prompt_len - 1 - start, 0)} scored rows (prompt_len - 1 - prompt_logprob_start).")

    def _output(self, ids: list[int], params: SamplingParams) -> SimpleNamespace:
        """outputs.py `RequestOutput`: prompt_token_ids, prompt_logprobs (v1/engine/logprobs.py: None up to
        prompt_logprob_start on 0.34) and, from 0.32, prompt_token_id_logprobs (float32 [rows, ids])."""
        output = SimpleNamespace(prompt_token_ids=ids, prompt_logprobs=None, outputs=[])
        start = getattr(params, "prompt_logprob_start", None) or 0
        if params.prompt_logprobs is not None:
            values = [logprob(i, ids[i]) for i in range(1, len(ids))]
            output.prompt_logprobs = prompt_logprobs(ids, values, flat=params.flat_logprobs, start=start)
        if self.version >= (0, 32):
            output.prompt_token_id_logprobs = None
            rows = params.prompt_logprob_token_ids
            if rows is not None:
                scores = [[logprob(start + j + 1, int(t)) if t >= 0 else -np.inf for t in row]
                          for j, row in enumerate(rows)]
                output.prompt_token_id_logprobs = np.array(scores, dtype=np.float32).reshape(rows.shape)
        return output


def make_vllm(version: str) -> types.ModuleType:
    """A stand-in `vllm` module of that version: __version__, LLM, SamplingParams, exceptions."""
    numbers = tuple(int(x) for x in version.split(".")[:2])
    module = types.ModuleType("vllm")
    module.__version__ = version
    module.exceptions = types.ModuleType("vllm.exceptions")
    module.exceptions.VLLMValidationError = validation_error_class(numbers)
    module.SamplingParams = (SamplingParams032 if numbers >= (0, 32) else SamplingParams031
                             if numbers == (0, 31) else SamplingParams)
    module.LLM = type("LLM", (LLM,), {"version": numbers, "error": module.exceptions.VLLMValidationError})
    return module
