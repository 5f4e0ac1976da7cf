"""The loss shim: PEAR-weighted SFT loss for any trainer (design.md section 4). Depends only on torch.

Alignment (the Hugging Face causal-LM convention, and the dataset's): `labels`,
`weights` and `behavior_logprobs` are [B, L] tensors aligned with `input_ids`,
index i refers to token input_ids[i]; labels[b, i] = -100 where token i is not
trained on. The model's logits[b, i] predict token i + 1, so the loss term of
token i (i >= 1) is

    nll[b, i] = -log softmax(logits[b, i - 1])[labels[b, i]]

and position 0 never has a loss term. The shim shifts internally; pass
unshifted tensors, exactly as they come out of `pear_data.collator.PearCollator`.

Static mode (weights from the dataset columns `pear_token_weight`, ...):

    loss = sum_i w_i * nll_i / normalizer
    normalizer = number of label tokens, or num_items_in_batch when given     (normalize="tokens")
               = sum_i w_i over the label tokens                              (normalize="weights")

Online mode (paper-exact): the target log-probs lt_i = -nll_i are taken from
the *live* logits, detached, and turned into weights with the design section-3
math (`pear_weights`, the torch twin of `pear_data.weights.weigh`) against the
stored `behavior_logprobs`; normalize="dataset" in the weight config becomes
normalization over the batch's label tokens. At the starting checkpoint the
online weights equal the static columns `pear-data score` wrote with the same
model and config.

Memory and speed: the log-softmax runs in float32 on chunks of at most
`chunk_tokens` consecutive label positions (views of the logits, no gather),
forward and backward, never on [B, L, V] at once; positions without a label
(prompts, padding) are never touched. Nothing [*, V]-sized is saved for the
backward but the logits themselves, which stay in the model's dtype. On CPU
this is faster than transformers' float32 cross-entropy over the whole batch
(bench/loss_overhead.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import torch

if TYPE_CHECKING:  # the engine's dataclass; imported lazily so this module needs only torch
    from .weights import WeightConfig

IGNORE_INDEX = -100
LossNormalize = Literal["tokens", "weights"]

# float32 elements of one [chunk, V] slab: 16M = 64 MiB (341 positions for a 49k vocab, 64 for 262k).
_CHUNK_ELEMENTS = 1 << 24


@dataclass
class PearLossOutput:
    """Result of `pear_loss_output`. Every [B, L] tensor is aligned with `labels` and detached.

    loss:            scalar, differentiable.
    weights:         float32 [B, L], the weight of each label token's NLL (0.0 where labels == -100 and at i = 0).
    token_logprobs:  float32 [B, L], log p_model(labels[b, i] | input_ids[b, :i]) from the live logits
                     (0.0 where there is no label): in online mode, the target log-probs.
    diagnostics:     0-dim float64 tensors over the batch's label tokens, for logging:
                     weight_mean, weight_ess (ESS fraction (sum w)^2 / (n sum w^2)), weight_min, weight_max,
                     label_tokens; online also log_ratio_mean (mean d_k), at_lower_bound / at_upper_bound (shares).
    """

    loss: torch.Tensor
    weights: torch.Tensor
    token_logprobs: torch.Tensor
    diagnostics: dict[str, torch.Tensor] = field(default_factory=dict)


# --------------------------------------------------------------------------- log-probs of the labels


class _ChunkedLabelLogprob(torch.autograd.Function):
    """log softmax(logits[r])[target] for selected rows r of a [N, V] logits matrix, in float32 chunks.

    `spans` lists (i0, i1, r0): selected rows i0..i1-1 are the consecutive logits rows r0..r0+(i1-i0)-1,
    so every chunk is a view of the logits, never a gathered copy (completion tokens are consecutive
    within a sequence). Saves only the logits (no copy); the backward recomputes the softmax chunk by
    chunk: d logp / d z = onehot(target) - softmax(z).
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor, spans: list[tuple[int, int, int]]) -> torch.Tensor:
        logp = torch.empty(targets.numel(), dtype=torch.float32, device=logits.device)
        for i0, i1, r0 in spans:
            z = logits[r0 : r0 + i1 - i0].float()
            logp[i0:i1] = torch.log_softmax(z, dim=-1).gather(-1, targets[i0:i1, None]).squeeze(-1)
        ctx.save_for_backward(logits, targets)
        ctx.spans = spans
        return logp

    @staticmethod
    def backward(ctx, grad_logp: torch.Tensor):
        logits, targets = ctx.saved_tensors
        grad = torch.zeros_like(logits)
        for i0, i1, r0 in ctx.spans:
            g = grad_logp[i0:i1, None].float()
            p = torch.softmax(logits[r0 : r0 + i1 - i0].float(), dim=-1)
            grad[r0 : r0 + i1 - i0] = p.mul_(-g).scatter_add_(-1, targets[i0:i1, None], g)
        return grad, None, None


def _spans(rows: torch.Tensor, chunk: int) -> list[tuple[int, int, int]]:
    """Split sorted row indices into runs of consecutive rows, each cut into pieces of at most `chunk`."""
    if rows.numel() == 0:
        return []
    starts = torch.cat([rows.new_zeros(1), (rows[1:] != rows[:-1] + 1).nonzero().squeeze(-1) + 1])
    ends = torch.cat([starts[1:], rows.new_tensor([rows.numel()])])
    first_rows = rows.index_select(0, starts)
    spans = []
    for i0, i1, r0 in zip(starts.tolist(), ends.tolist(), first_rows.tolist()):  # a few runs per sequence
        for j in range(i0, i1, chunk):
            spans.append((j, min(j + chunk, i1), r0 + j - i0))
    return spans


def label_logprobs(logits: torch.Tensor, labels: torch.Tensor, *, chunk_tokens: int | None = None) -> torch.Tensor:
    """log p(labels[b, i] | input_ids[b, :i]) from causal-LM logits.

    Returns float32 [B, L] aligned with labels, 0.0 where labels == -100 and at i = 0.

    logits: [B, L, V] any float dtype, logits[b, i] predicting token i + 1.
    labels: int [B, L], aligned with input_ids, -100 = no label.
    Differentiable w.r.t. logits. Only label positions are computed, `chunk_tokens`
    of them at a time (default: 64 MiB of float32 per chunk).
    """
    if logits.dim() != 3 or labels.shape != logits.shape[:2]:
        raise ValueError(f"logits must be [B, L, V] and labels [B, L]; got logits {tuple(logits.shape)}, "
                         f"labels {tuple(labels.shape)}")
    batch, length, vocab = logits.shape
    # Label of the prediction at position i is labels[i + 1]; the last position predicts nothing.
    shifted = torch.full_like(labels, IGNORE_INDEX)
    shifted[:, :-1] = labels[:, 1:]
    flat = shifted.reshape(-1)
    rows = (flat != IGNORE_INDEX).nonzero().squeeze(-1)
    targets = flat.index_select(0, rows)
    if targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= vocab):
        raise ValueError(f"labels hold token ids outside [0, {vocab}) (and not -100): was the data tokenized "
                         "with another tokenizer, or padded with a negative id other than -100?")
    spans = _spans(rows, chunk_tokens or max(1, _CHUNK_ELEMENTS // vocab))
    logp = _ChunkedLabelLogprob.apply(logits.reshape(batch * length, vocab), targets, spans)
    # Back to [B, L] aligned with labels: prediction at i - 1 belongs to token i.
    out = logp.new_zeros(batch * length).index_put((rows,), logp).view(batch, length)
    return torch.cat([out.new_zeros(batch, 1), out[:, :-1]], dim=1)


# --------------------------------------------------------------------------- PEAR weights in torch


@dataclass
class BatchWeights:
    """`pear_weights` output, all [B, N] aligned with the inputs, 0 / False off the completion.

    weights:    float32, the final W of the chosen granularity (section 3.3: bounds, normalization, cap).
    log_ratio:  float64, d_k of section 3.1 (centered if asked, clipped).
    at_lower:   bool, W at the lower weight bound wmin.
    at_upper:   bool, W at the upper weight bound wmax or at the cap.
    """

    weights: torch.Tensor
    log_ratio: torch.Tensor
    at_lower: torch.Tensor
    at_upper: torch.Tensor


def pear_weights(
    target_logprobs: torch.Tensor,
    behavior_logprobs: torch.Tensor,
    completion_mask: torch.Tensor,
    config: "WeightConfig",
    granularity: str | None = None,
    shared_boundary: torch.Tensor | None = None,
) -> BatchWeights:
    """PEAR weights of design.md section 3 for a padded batch: the torch twin of `pear_data.weights.weigh`.

    target_logprobs, behavior_logprobs: float [B, N], aligned with completion_mask.
    completion_mask: bool/int [B, N]; the completion tokens c_1 < ... < c_T of row b are its nonzero positions
    (gaps such as user turns are skipped, as in the engine; padding is simply 0).
    config: a `pear_data.weights.WeightConfig`; granularity overrides config.granularity.
    normalize="dataset" normalizes over the batch's completion tokens (the batch stands in for the dataset).
    shared_boundary: bool/int [B, N] or None, the dataset column of cross-tokenizer rows (design 3.7): a
    span's log-ratio (sum over its tokens) is clipped as one and charged to its last token, and block ends
    snap to the nearest span end, as in the engine. None: every completion token ends its own span.

    Computed in float64, returned as float32, no loop over tokens or rows: the completion tokens are
    packed left into a [B, Tmax] completion space where every suffix sum is a difference of one
    cumulative sum (the discount log(gamma) is folded into it, as in the engine).
    Raises ValueError on a behavior log-prob that is NaN or > 0, or a log-ratio that stays infinite.
    """
    granularity = granularity or config.granularity
    mask = completion_mask.bool()
    batch = mask.shape[0]
    lengths = mask.sum(dim=1)  # T per row
    t_max = int(lengths.max()) if batch else 0
    b_idx, pos = mask.nonzero(as_tuple=True)
    k_idx = (mask.cumsum(dim=1) - 1)[b_idx, pos]  # completion rank k - 1 of each token
    f64 = torch.float64
    device = target_logprobs.device

    def packed(values: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(batch, t_max, dtype=f64, device=device)
        out[b_idx, k_idx] = values.to(f64)
        return out

    lt = packed(target_logprobs[b_idx, pos])
    lb = packed(behavior_logprobs[b_idx, pos])
    i_all = torch.arange(t_max, device=device)[None, :]
    valid = i_all < lengths[:, None]
    t = lengths.to(f64).clamp(min=1)[:, None]

    # 3.1 per-token log-ratio (optionally centered per row), clipped.
    r = lt - lb
    if config.center:
        r = r - (torch.where(valid, r, 0.0).sum(dim=1, keepdim=True) / t)
    lo, hi = config.log_ratio_clip
    ends = None
    if shared_boundary is not None:
        ends = packed(shared_boundary[b_idx, pos].to(f64)) > 0
        ends |= i_all == (lengths[:, None] - 1)  # a row's last token closes its last span
        span = (ends.long().cumsum(dim=1) - ends.long()).clamp(max=max(t_max - 1, 0))  # span of each token
        span_sum = torch.zeros_like(r).scatter_add_(1, span, torch.where(valid, r, 0.0))
        r = torch.where(ends, span_sum.gather(1, span), 0.0)
    d = torch.where(valid, r.clamp(lo, hi), 0.0)
    if ends is not None:
        d = torch.where(ends, d, 0.0)
    bad = valid & (lb.isnan() | (lb > 0) | ~d.isfinite())
    if bool(bad.any()):
        b, k = (int(v) for v in bad.nonzero()[0])
        position = int(pos[(b_idx == b) & (k_idx == k)][0])
        raise ValueError(
            f"behavior_logprobs[{b}, {position}] = {float(lb[b, k])} with target log-prob {float(lt[b, k])}: "
            "a behavior log-prob must be a number <= 0, and -inf needs a finite --log-ratio-clip bound on "
            "that side and no --center (design 3.1); check the dataset column and its alignment"
        )

    # 3.2 log-weights. cs[:, j] = sum of the first j terms of the row.
    i = torch.arange(t_max, device=device)[None, :]
    end = lengths[:, None]  # exclusive end (in cs terms) of the row
    if granularity == "sequence":
        logw = d.sum(dim=1, keepdim=True).expand(batch, t_max)
        if config.length_normalize:
            logw = logw / t
    elif granularity in ("token", "block"):
        dg = torch.where(valid, d + math.log(config.gamma), 0.0)
        cs = torch.cat([dg.new_zeros(batch, 1), dg.cumsum(dim=1)], dim=1)
        if granularity == "token":
            start = i + 1  # the suffix excludes token k itself
            if config.horizon is not None:  # a horizon past the longest row changes nothing (and cannot overflow)
                end = torch.minimum(end, i + 1 + min(config.horizon, t_max))
        elif ends is None:
            start = torch.minimum((i // config.block_size + 1) * config.block_size, end)  # first k after the block
        else:
            start = _snapped_block_ends(ends, valid, lengths, config.block_size) + 1
        logw = cs.gather(1, end.expand(batch, t_max)) - cs.gather(1, torch.minimum(start, end).expand(batch, t_max))
    else:
        raise ValueError(f"granularity must be token, block or sequence, got {granularity!r}")

    # 3.3 bounds, normalization, cap.
    wmin, wmax = config.weight_clip
    log_lo = math.log(wmin) if wmin > 0 else -math.inf
    log_hi = math.log(wmax)
    at_lower = valid & (logw <= log_lo)
    at_upper = valid & (logw >= log_hi)
    w = torch.where(valid, logw.clamp(log_lo, log_hi).exp(), 0.0)
    if config.normalize == "dataset":
        w = w / (w.sum() / lengths.sum().clamp(min=1))
    elif config.normalize == "sequence":
        w = w / (w.sum(dim=1, keepdim=True) / t)
    if config.max_weight is not None:
        at_upper = at_upper | (valid & (w >= config.max_weight))
        w = w.clamp(max=config.max_weight)

    def unpacked(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        out = torch.zeros(mask.shape, dtype=dtype, device=device)
        out[b_idx, pos] = values[b_idx, k_idx].to(dtype)
        return out

    return BatchWeights(
        weights=unpacked(w, torch.float32),
        log_ratio=unpacked(d, f64),
        at_lower=unpacked(at_lower, torch.bool),
        at_upper=unpacked(at_upper, torch.bool),
    )


def _next_true(flags: torch.Tensor) -> torch.Tensor:
    """[B, T]: the smallest j >= i with flags[b, j] (T where there is none)."""
    t_max = flags.shape[1]
    idx = torch.where(flags, torch.arange(t_max, device=flags.device)[None, :], t_max)
    return idx.flip(1).cummin(dim=1).values.flip(1)


def _snapped_block_ends(ends: torch.Tensor, valid: torch.Tensor, lengths: torch.Tensor, block_size: int) -> torch.Tensor:
    """[B, T]: the last k of each token's block, block ends snapped to the nearest span end (ties: the later),
    as `pear_data.weights.block_ends`."""
    batch, t_max = ends.shape
    i = torch.arange(t_max, device=ends.device)[None, :].expand(batch, t_max)
    nominal = valid & (((i + 1) % block_size == 0) | (i == lengths[:, None] - 1))
    after = _next_true(ends).clamp(max=t_max - 1)
    before = torch.where(ends, i, -1).cummax(dim=1).values
    use_before = (before >= 0) & (i - before < after - i)
    snapped = torch.where(use_before, before, after)
    boundary = torch.zeros_like(ends)
    boundary[nominal.nonzero(as_tuple=True)[0], snapped[nominal]] = True
    return _next_true(boundary).clamp(max=t_max - 1)


# --------------------------------------------------------------------------- the loss


def _default_config() -> "WeightConfig":
    from .weights import WeightConfig

    return WeightConfig()


def _weight_diagnostics(w: torch.Tensor, label_mask: torch.Tensor) -> dict[str, torch.Tensor]:
    wl = w[label_mask].double()
    n = wl.numel()
    if n == 0:
        zero = torch.zeros((), dtype=torch.float64, device=w.device)
        return {"weight_mean": zero, "weight_ess": zero, "weight_min": zero, "weight_max": zero, "label_tokens": zero}
    total = wl.sum()
    return {
        "weight_mean": total / n,
        "weight_ess": total.square() / (n * wl.square().sum()).clamp(min=torch.finfo(torch.float64).tiny),
        "weight_min": wl.min(),
        "weight_max": wl.max(),
        "label_tokens": torch.tensor(float(n), dtype=torch.float64, device=w.device),
    }


def pear_loss_from_logprobs(
    token_logprobs: torch.Tensor,
    labels: torch.Tensor,
    weights: torch.Tensor | None = None,
    *,
    behavior_logprobs: torch.Tensor | None = None,
    config: "WeightConfig | None" = None,
    num_items_in_batch: int | torch.Tensor | None = None,
    normalize: LossNormalize = "tokens",
    shared_boundary: torch.Tensor | None = None,
) -> PearLossOutput:
    """The weighted loss from label log-probs already computed (e.g. TRL's fused LM head).

    token_logprobs: float [B, L] aligned with labels (index i = log-prob of token i, as `label_logprobs`
    returns), differentiable; or [B, L - 1] in the shifted layout (index j = token j + 1), as TRL's
    `FusedCausalLMOutput.log_probs`. Everything else as in `pear_loss`.
    """
    if normalize not in ("tokens", "weights"):
        raise ValueError(f"normalize must be 'tokens' or 'weights', got {normalize!r}")
    batch, length = labels.shape
    if token_logprobs.shape == (batch, length - 1):
        token_logprobs = torch.cat([token_logprobs.new_zeros(batch, 1), token_logprobs], dim=1)
    if token_logprobs.shape != labels.shape:
        raise ValueError(f"token_logprobs has shape {tuple(token_logprobs.shape)}, labels {tuple(labels.shape)}")
    label_mask = labels != IGNORE_INDEX
    label_mask[:, 0] = False  # position 0 has no context: never a loss term
    logp = token_logprobs.float()
    diagnostics: dict[str, torch.Tensor] = {}

    if behavior_logprobs is not None:
        if weights is not None:
            raise ValueError("pass weights (static PEAR) or behavior_logprobs (online PEAR), not both")
        if behavior_logprobs.shape != labels.shape:
            raise ValueError(f"behavior_logprobs has shape {tuple(behavior_logprobs.shape)}, labels "
                             f"{tuple(labels.shape)}: both must be [B, L] aligned with input_ids")
        online = pear_weights(logp.detach(), behavior_logprobs, label_mask, config or _default_config(),
                              shared_boundary=shared_boundary)
        w = online.weights
        n = label_mask.sum().clamp(min=1)
        diagnostics["log_ratio_mean"] = online.log_ratio.sum() / n
        diagnostics["at_lower_bound"] = online.at_lower.sum().double() / n
        diagnostics["at_upper_bound"] = online.at_upper.sum().double() / n
    elif weights is not None:
        if weights.dim() == 1 and weights.shape[0] == batch:  # one weight per row (sequence level)
            weights = weights[:, None].expand(batch, length)
        if weights.shape != labels.shape:
            raise ValueError(f"weights has shape {tuple(weights.shape)}, labels {tuple(labels.shape)}: pass "
                             "[B, L] aligned with input_ids (or [B], one per row)")
        w = torch.where(label_mask, weights.to(device=logp.device, dtype=torch.float32), 0.0)
    else:
        w = label_mask.float()
    w = w.detach()

    weighted = -(w * torch.where(label_mask, logp, 0.0)).sum()
    if normalize == "weights":
        loss = weighted / w.sum().clamp(min=torch.finfo(torch.float32).tiny)
    elif num_items_in_batch is not None:
        loss = weighted / torch.as_tensor(num_items_in_batch, device=logp.device).clamp(min=1)
    else:
        loss = weighted / label_mask.sum().clamp(min=1)
    diagnostics.update(_weight_diagnostics(w, label_mask))
    return PearLossOutput(loss=loss, weights=w, token_logprobs=torch.where(label_mask, logp.detach(), 0.0),
                          diagnostics=diagnostics)


def pear_loss_output(
    logits: torch.Tensor,
    labels: torch.Tensor,
    weights: torch.Tensor | None = None,
    *,
    behavior_logprobs: torch.Tensor | None = None,
    config: "WeightConfig | None" = None,
    num_items_in_batch: int | torch.Tensor | None = None,
    normalize: LossNormalize = "tokens",
    chunk_tokens: int | None = None,
    shared_boundary: torch.Tensor | None = None,
) -> PearLossOutput:
    """`pear_loss` with the weights, live log-probs and diagnostics (see `PearLossOutput`)."""
    logp = label_logprobs(logits, labels, chunk_tokens=chunk_tokens)
    return pear_loss_from_logprobs(logp, labels, weights, behavior_logprobs=behavior_logprobs, config=config,
                                   num_items_in_batch=num_items_in_batch, normalize=normalize,
                                   shared_boundary=shared_boundary)


def pear_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    weights: torch.Tensor | None = None,
    *,
    behavior_logprobs: torch.Tensor | None = None,
    config: "WeightConfig | None" = None,
    num_items_in_batch: int | torch.Tensor | None = None,
    normalize: LossNormalize = "tokens",
    shared_boundary: torch.Tensor | None = None,
) -> torch.Tensor:
    """PEAR-weighted causal-LM NLL, a scalar: sum_i w_i * nll_i / normalizer (module docstring).

    logits: [B, L, V] (any float dtype; logits[b, i] predicts token i + 1).
    labels: int [B, L] aligned with input_ids, -100 = not trained on.
    weights: float [B, L] aligned with labels (a `pear_*_weight` column, padded) or [B] (one per row):
        static PEAR. None and no behavior_logprobs: plain NLL (all weights 1).
    behavior_logprobs: float [B, L] aligned with labels (the dataset column, padded): online PEAR with
        `config` (a `pear_data.weights.WeightConfig`, default WeightConfig()); the weights come from the
        detached live log-probs. Exclusive with weights.
    num_items_in_batch: label tokens of the whole accumulated batch (transformers' gradient-accumulation
        convention) for normalize="tokens"; ignored with normalize="weights".
    normalize: "tokens" divides by the label-token count, "weights" by the sum of the weights.
    shared_boundary: int/bool [B, L], the dataset column (padded), for online PEAR on rows whose behavior
        was aligned from another tokenizer (design 3.7); None treats every label token as its own span.
    """
    return pear_loss_output(logits, labels, weights, behavior_logprobs=behavior_logprobs, config=config,
                            num_items_in_batch=num_items_in_batch, normalize=normalize,
                            shared_boundary=shared_boundary).loss
