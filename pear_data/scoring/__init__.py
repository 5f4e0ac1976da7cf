"""Scoring backends: per-token log-probs of token rows under one or more sampling policies.

Every backend implements `Scorer`; `TorchScorer` (plain PyTorch + transformers)
is the reference backend; `VllmScorer` (experimental, target policy only) runs
on a vLLM engine in an environment of its own. The math of a sampling policy
(temperature, top-p) is in `sampling.py`.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from pear_data.config import SamplingParams
from pear_data.scoring.sampling import policy_logprobs, token_logprobs
from pear_data.scoring.torch_backend import (
    FlopCounts,
    ScoringStopped,
    TorchScorer,
    check_device,
    default_batch_tokens,
    default_vocab_chunk_tokens,
    model_flops_per_token,
    plan_batches,
    resolve_device,
    scoring_dtype,
    scoring_flops,
)
from pear_data.scoring.vllm_backend import VllmScorer, prompt_logprobs_to_arrays


class Scorer(Protocol):
    """A model that scores token rows under several sampling policies with one forward pass per batch."""

    def score(
        self,
        sequences: list[np.ndarray],
        completion_masks: list[np.ndarray],
        policies: list[SamplingParams],
    ) -> list[list[np.ndarray]]:
        """For each policy, for each sequence: float32 [n] log-prob of token i given tokens[:i].

        Under that policy's sampling distribution, at completion positions
        (mask == 1); 0.0 elsewhere, and position 0 is always 0.0. -inf for a
        token outside a top-p nucleus. Results are in input order.
        """
        ...


__all__ = [
    "FlopCounts",
    "SamplingParams",
    "Scorer",
    "ScoringStopped",
    "TorchScorer",
    "VllmScorer",
    "check_device",
    "default_batch_tokens",
    "default_vocab_chunk_tokens",
    "model_flops_per_token",
    "plan_batches",
    "policy_logprobs",
    "prompt_logprobs_to_arrays",
    "resolve_device",
    "scoring_dtype",
    "scoring_flops",
    "token_logprobs",
]
