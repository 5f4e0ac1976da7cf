"""Log-prob of the chosen token under a sampling distribution (docs/design.md section 3.6).

A behavior policy that sampled at temperature tau with nucleus (top-p) p drew
token x from

    q(x) = softmax(z / tau)[x] / M      if x is in the nucleus N, else 0
    M    = sum over y in N of softmax(z / tau)[y]

where z are the model's logits. So

    log q(x) = z[x] / tau - logsumexp(z / tau) - log M     (x in N)
    log q(x) = -inf                                         (x not in N)

and with p = 1 the nucleus is the whole vocabulary (M = 1): plain
`log_softmax(z / tau)`.

The nucleus follows Hugging Face's `TopPLogitsWarper` and vLLM's native
`apply_top_k_top_p` (both: sort ascending, cumulative probability, drop the
tokens whose cumulative probability is <= 1 - p, always keep the most probable
token, i.e. `min_tokens_to_keep=1`), applied after the temperature, as both
libraries do. Written from the top: rank the temperature-scaled probabilities
in descending order; token k (1-based) is kept when the mass of the tokens
ranked before it is < p, and the first token is always kept. That is the
smallest set of most probable tokens whose mass is >= p. Ties: HF and vLLM
break ties at the boundary by the (unstable) sort order, so which of two
equal-probability tokens is kept is unspecified there; here every token whose
logit equals the last kept logit is kept too (the nucleus is a threshold on
the logit, `z >= z_threshold`), which makes the result independent of sort
order. Without ties at the boundary the sets are the same, up to float
rounding of the cumulative sum for a token exactly at the boundary.

Everything here works on one chunk of positions, `logits` float32 [C, V], so
that the memory of a call is a few [C, V] tensors, never [tokens, V] for a whole
batch. The nucleus is found with `torch.topk` over a growing k (64, 512, ...)
rather than a full sort of the vocabulary, which would also allocate int64
[C, V] indices.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

_FIRST_TOP_K = 64
_TOP_K_GROWTH = 8


@dataclass(frozen=True)
class SamplingParams:
    """How a policy sampled its tokens. The target policy is scored at the defaults (1.0, 1.0).

    temperature: tau > 0 (finite); the logits are divided by it.
    top_p: nucleus mass p in (0, 1]; 1.0 means no nucleus truncation.
    """

    temperature: float = 1.0
    top_p: float = 1.0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise ValueError(
                f"temperature must be a finite number > 0, got {self.temperature!r} "
                "(greedy decoding, temperature 0, has no log-probs to weight by)"
            )
        if not (0.0 < self.top_p <= 1.0):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")


def log_normalizer(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """logsumexp(logits / temperature) over the last dim: float32 [C, V] -> [C].

    Uses one [C, V] temporary (the max-shifted, scaled, exponentiated logits),
    where `torch.logsumexp(logits / tau)` would use three.
    """
    peak = logits.amax(dim=-1, keepdim=True)
    shifted = logits - peak
    if temperature != 1.0:
        shifted.div_(temperature)
    return shifted.exp_().sum(dim=-1).log_() + peak.squeeze(-1) / temperature


def nucleus(
    logits: torch.Tensor, log_z: torch.Tensor, temperature: float, top_p: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The top-p nucleus of softmax(logits / temperature), row by row.

    logits: float32 [C, V]; log_z: [C] = `log_normalizer(logits, temperature)`.
    Returns (threshold, log_mass), both [C]: the nucleus of row c is
    {v : logits[c, v] >= threshold[c]} (a raw, unscaled logit), and log_mass[c]
    is the log of its probability mass under softmax(logits[c] / temperature).
    """
    num_rows, vocab = logits.shape
    threshold = torch.empty(num_rows, dtype=logits.dtype, device=logits.device)
    log_mass = torch.empty_like(threshold)
    pending = None  # row indices still to resolve; None = all rows (no copy of the chunk)
    k = min(vocab, _FIRST_TOP_K)
    while True:
        rows = logits if pending is None else logits[pending]
        top = rows.topk(k, dim=-1, sorted=True).values  # [P, k] descending raw logits
        top_logp = top / temperature - (log_z if pending is None else log_z[pending]).unsqueeze(-1)
        cum = top_logp.exp().cumsum(dim=-1)
        mass_before = torch.nn.functional.pad(cum[:, :-1], (1, 0))  # mass of the tokens ranked before
        kept = mass_before < top_p
        kept[:, 0] = True  # min_tokens_to_keep = 1
        n_kept = kept.sum(dim=-1, keepdim=True)  # kept is a prefix: mass_before never decreases
        row_threshold = top.gather(-1, n_kept - 1).squeeze(-1)
        # Resolved when the nucleus, ties included, ends inside the top k: the k-th value is below the threshold.
        resolved = top[:, -1] < row_threshold
        if k == vocab:
            resolved[:] = True
        in_nucleus = top >= row_threshold.unsqueeze(-1)
        row_log_mass = torch.where(in_nucleus, top_logp, -math.inf).logsumexp(dim=-1)
        index = torch.arange(num_rows, device=logits.device) if pending is None else pending
        threshold[index[resolved]] = row_threshold[resolved]
        log_mass[index[resolved]] = row_log_mass[resolved]
        pending = index[~resolved]
        if pending.numel() == 0:
            return threshold, log_mass
        k = min(vocab, k * _TOP_K_GROWTH)


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """log q(tokens[c] | row c) under the sampling distribution `params`; float32 [C].

    logits: float32 [C, V], one row per scored position (after any softcapping
    the model applies). tokens: int64 [C], the token chosen at each position.
    With top_p = 1 and temperature = 1 this is log_softmax(logits)[c, tokens[c]];
    a token outside the nucleus gets -inf. Results are <= 0.
    """
    if logits.dtype != torch.float32:
        raise TypeError(f"logits must be float32 (got {logits.dtype}): cast with .float() first")
    tau = params.temperature
    log_z = log_normalizer(logits, tau)
    chosen = logits.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    logp = chosen / tau - log_z
    if params.top_p < 1.0:
        threshold, log_mass = nucleus(logits, log_z, tau, params.top_p)
        logp = torch.where(chosen >= threshold, logp - log_mass, -math.inf)
    return logp
