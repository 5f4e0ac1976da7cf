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

Several policies from one chunk (`policy_logprobs`): this step is memory
traffic, every pass reads (and maybe writes) the whole [C, V] chunk, so
everything that does not depend on the policy is done once: the row max, the
shift z - max (in place when the caller hands the chunk over), the gather of
the chosen tokens, and the first top-k of the nucleus search (the order of the
logits is the same at every temperature).
What depends on the temperature is one sum per distinct temperature:

    log sum_v exp((z_v - max) / tau)

"exp" computes it as exp into a scratch buffer, then sum (tau = 1), or
divide, exp, sum (tau != 1): per temperature 2 or 3 passes that write the
chunk and one that reads it. "power" (the default on CUDA, where every pass
is a kernel streaming the chunk through memory) writes e = exp(z - max) once,
sums it for tau = 1, and gets a temperature's sum as sum_v e_v^(1/tau) with
the power taken in place: one write pass less per temperature, and the
division by tau is not a pass of its own. Terms that underflow in e
(z - max < -87) are lost that way; they are below exp(-87 / tau) relative to
the largest term, negligible for tau <= 2, so a temperature above 2 uses
"exp". A policy's result does not depend on the other policies of the call;
the two strategies give the same bits at tau = 1 and agree to float rounding
otherwise. On CPU torch's fractional power is slower than its exp
(bench/score_throughput.py --logprob-step), so "exp" is the default there.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ..config import SamplingParams

_FIRST_TOP_K = 64
_TOP_K_GROWTH = 8
_POWER_SUM_MAX_TEMPERATURE = 2.0  # "power": above this, terms underflowed in exp(z - max) could matter
STRATEGIES = ("auto", "exp", "power")


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
    logits: torch.Tensor,
    log_z: torch.Tensor,
    temperature: float,
    top_p: float,
    first_top: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The top-p nucleus of softmax(logits / temperature), row by row.

    logits: float32 [C, V]; log_z: [C] = `log_normalizer(logits, temperature)`.
    Returns (threshold, log_mass), both [C]: the nucleus of row c is
    {v : logits[c, v] >= threshold[c]} (a raw, unscaled logit), and log_mass[c]
    is the log of its probability mass under softmax(logits[c] / temperature).
    first_top: optionally `logits.topk(k, sorted=True).values` for all rows,
    already computed (shared by several policies); it is the first round.
    On CUDA this syncs with the host once per round (whether every row is
    resolved); most chunks need one round.
    """
    num_rows, vocab = logits.shape
    if first_top is None:
        first_top = logits.topk(min(vocab, _FIRST_TOP_K), dim=-1, sorted=True).values
    k = first_top.shape[-1]
    threshold, log_mass, resolved = _nucleus_round(first_top, log_z, temperature, top_p, complete=k == vocab)
    if bool(resolved.all()):
        return threshold, log_mass
    pending = (~resolved).nonzero().squeeze(-1)  # rows whose nucleus, ties included, reaches beyond the top k
    while pending.numel() > 0:
        k = min(vocab, k * _TOP_K_GROWTH)
        top = logits.index_select(0, pending).topk(k, dim=-1, sorted=True).values
        row_threshold, row_log_mass, row_resolved = _nucleus_round(
            top, log_z.index_select(0, pending), temperature, top_p, complete=k == vocab
        )
        done = pending[row_resolved]
        threshold[done] = row_threshold[row_resolved]
        log_mass[done] = row_log_mass[row_resolved]
        pending = pending[~row_resolved]
    return threshold, log_mass


def _nucleus_round(
    top: torch.Tensor, log_z: torch.Tensor, temperature: float, top_p: float, complete: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One round of `nucleus` from the k largest logits of each row: (threshold, log_mass, resolved), each [P].

    top: [P, k], each row's k largest logits, descending. A row is resolved
    when its nucleus, ties included, ends inside the top k (the k-th value is
    below the threshold), or when k is the whole vocabulary (`complete`).
    """
    top_logp = top / temperature - log_z.unsqueeze(-1)
    cum = top_logp.exp().cumsum(dim=-1)
    mass_before = torch.nn.functional.pad(cum[:, :-1], (1, 0))  # mass of the tokens ranked before
    kept = mass_before < top_p
    kept[:, 0] = True  # min_tokens_to_keep = 1
    n_kept = kept.sum(dim=-1, keepdim=True)  # kept is a prefix: mass_before never decreases
    threshold = top.gather(-1, n_kept - 1).squeeze(-1)
    resolved = top[:, -1] < threshold
    if complete:
        resolved = torch.ones_like(resolved)
    in_nucleus = top >= threshold.unsqueeze(-1)
    log_mass = torch.where(in_nucleus, top_logp, -math.inf).logsumexp(dim=-1)
    return threshold, log_mass, resolved


def policy_logprobs(
    logits: torch.Tensor,
    tokens: torch.Tensor,
    policies: Sequence[SamplingParams],
    *,
    overwrite: bool = False,
    scratch: torch.Tensor | None = None,
    strategy: str = "auto",
) -> list[torch.Tensor]:
    """log q_p(tokens[c] | row c) for every policy p, sharing the passes over the chunk; float32 [C] each.

    logits: float32 [C, V], one row per scored position (after any softcapping
    the model applies). tokens: int64 [C], the token chosen at each position.
    Element p of the result is, bit for bit, what a call with policies[p]
    alone and the same strategy returns (a policy's result does not depend on
    which other policies are computed with it); `token_logprobs` is that call
    with the default strategy.
    overwrite: the function may overwrite `logits` (it subtracts the row max
    in place; a caller that owns the chunk saves a [C, V] buffer and a pass).
    scratch: a float32 tensor of at least C * V elements on the same device,
    used for the exp temporaries instead of a new [C, V] allocation (reusing
    one buffer across chunks avoids the page faults of a fresh allocation on
    CPU).
    strategy: "exp", "power" or "auto" (power on CUDA, exp elsewhere); see the
    module docstring. Both compute the same quantity, to float rounding.
    """
    if logits.dtype != torch.float32:
        raise TypeError(f"logits must be float32 (got {logits.dtype}): cast with .float() first")
    if logits.dim() != 2 or tokens.shape != logits.shape[:1]:
        raise ValueError(f"logits must be [C, V] and tokens [C], got {tuple(logits.shape)} and {tuple(tokens.shape)}")
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    if strategy == "auto":
        strategy = "power" if logits.is_cuda else "exp"
    num_rows, vocab = logits.shape
    peak = logits.amax(dim=-1, keepdim=True)
    shifted = logits.sub_(peak) if overwrite else logits - peak  # <= 0, each row's max is 0
    chosen = shifted.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    if scratch is None:
        work = torch.empty_like(shifted)
    else:
        if scratch.dtype != torch.float32 or scratch.device != logits.device or scratch.numel() < num_rows * vocab:
            raise ValueError(f"scratch must be float32 on {logits.device} with >= {num_rows * vocab} elements")
        work = scratch.reshape(-1)[: num_rows * vocab].view(num_rows, vocab)
    log_sums = _log_sums(shifted, list(dict.fromkeys(p.temperature for p in policies)), work, strategy)
    first_top = None
    if any(p.top_p < 1.0 for p in policies):
        first_top = shifted.topk(min(vocab, _FIRST_TOP_K), dim=-1, sorted=True).values
    out = []
    for params in policies:
        tau = params.temperature
        logp = chosen / tau - log_sums[tau]
        if params.top_p < 1.0:
            threshold, log_mass = nucleus(shifted, log_sums[tau], tau, params.top_p, first_top=first_top)
            logp = torch.where(chosen >= threshold, logp - log_mass, -math.inf)
        out.append(logp)
    return out


def _log_sums(
    shifted: torch.Tensor, temperatures: list[float], work: torch.Tensor, strategy: str
) -> dict[float, torch.Tensor]:
    """{tau: log sum_v exp(shifted[:, v] / tau)}, [C] each; shifted <= 0 with a 0 in every row, so sums are >= 1.

    Each temperature's value is computed by the same operations whatever the
    other temperatures are (so a policy's bits do not depend on its company).
    """
    powered = [t for t in temperatures if strategy == "power" and t != 1.0 and t <= _POWER_SUM_MAX_TEMPERATURE]
    sums: dict[float, torch.Tensor] = {}
    for tau in temperatures:
        if tau != 1.0 and tau not in powered:
            torch.div(shifted, tau, out=work).exp_()
            sums[tau] = work.sum(dim=-1).log_()
    if 1.0 in temperatures or powered:
        torch.exp(shifted, out=work)  # e = exp(z - max), in (0, 1]
        if 1.0 in temperatures:
            sums[1.0] = work.sum(dim=-1).log_()
        spare = torch.empty_like(work) if len(powered) > 1 else None  # e must outlive all but the last power
        for i, tau in enumerate(powered):
            scaled = work.pow_(1.0 / tau) if i == len(powered) - 1 else torch.pow(work, 1.0 / tau, out=spare)
            sums[tau] = scaled.sum(dim=-1).log_()
    return sums


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """log q(tokens[c] | row c) under the sampling distribution `params`; float32 [C].

    logits: float32 [C, V], one row per scored position (after any softcapping
    the model applies). tokens: int64 [C], the token chosen at each position.
    With top_p = 1 and temperature = 1 this is log_softmax(logits)[c, tokens[c]];
    a token outside the nucleus gets -inf. Results are <= 0. `logits` is not
    modified. Several policies of the same logits: `policy_logprobs`.
    """
    return policy_logprobs(logits, tokens, [params])[0]
