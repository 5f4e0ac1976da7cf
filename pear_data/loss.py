"""The loss shim: PEAR-weighted SFT loss for any trainer (docs/design.md section 4). Depends only on torch.

One entry point, `pear_loss`, with the layout of what it is given spelled out:

    pear_loss(labels, logits=logits)                                 # causal-LM logits [B, L, V]
    pear_loss(labels, logprobs=lp)                                   # lp[b, i] = log p(token i), [B, L]
    pear_loss(labels, logprobs=lp, logprobs_layout="shifted")        # lp[b, j] = log p(token j + 1), [B, L - 1]
                                                                     #   (TRL's fused LM head)
and which weights:

    weights=W                                    static: a weight column, [B, L] aligned with labels, or [B]
    behavior_logprobs=lb, config=WeightConfig()  online (paper-exact): weights from the live log-probs
    (neither)                                    plain SFT, every weight 1

It returns a `PearLossOutput`: the differentiable loss, the weights it used,
the live label log-probs and diagnostics for logging.

Alignment (the Hugging Face causal-LM convention, and the dataset's): `labels`,
`weights`, `behavior_logprobs` and `shared_boundary` are [B, L] tensors
aligned with `input_ids`, index i refers to token input_ids[i]; labels[b, i] =
-100 where token i is not trained on. The model's logits[b, i] predict token
i + 1, so the loss term of token i (i >= 1) is

    nll[b, i] = -log softmax(logits[b, i - 1])[labels[b, i]]

and position 0 never has a loss term. The shim shifts internally; pass
unshifted tensors, exactly as they come out of `pear_data.collator.PearCollator`.

    loss = sum_i w_i * nll_i / normalizer
    normalizer = number of label tokens, or num_items_in_batch when given     (normalize="tokens")
               = sum_i w_i over the label tokens                              (normalize="weights")

Online mode: the target log-probs lt_i = -nll_i are taken from the live
logits, detached, and turned into weights with the math of design section 3,
in torch and in the same named steps as `pear_data.weights` (`log_ratios` ->
`log_weights` -> `bounded_weights` -> `normalized_weights`; `pear_weights`
composes them), against the stored `behavior_logprobs`; normalize="dataset"
becomes normalization over the batch's label tokens. At the starting
checkpoint the online weights equal the static columns `pear-data score`
wrote with the same model and config.

Memory: the log-softmax runs in float32 on chunks of at most `chunk_tokens`
consecutive label positions (views of the logits, no gather), forward and
backward, never on [B, L, V] at once; positions without a label (prompts,
padding) are never touched. Nothing [*, V]-sized is saved for the backward but
the logits themselves, which stay in the model's dtype (bench/loss_overhead.py
measures the cost against transformers' own cross-entropy).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import torch

from .torch_weights import BatchWeights, pear_weights, segment_starts

__all__ = ["IGNORE_INDEX", "LossStats", "PearLossOutput", "label_logprobs", "pear_loss", "pear_weights"]

if TYPE_CHECKING:  # the engine's dataclass; imported lazily so this module needs only torch
    from .weights import WeightConfig

IGNORE_INDEX = -100
LossNormalize = Literal["tokens", "weights"]
LogprobsLayout = Literal["aligned", "shifted"]

# float32 elements of one [chunk, V] slab: 16M = 64 MiB (341 positions for a 49k vocab, 64 for 262k).
_CHUNK_ELEMENTS = 1 << 24


@dataclass
class LossStats:
    """Sufficient statistics of a batch's label tokens, so that diagnostics add up exactly over micro-batches,
    logging steps and ranks (`+`, and a sum / min / max all-reduce of the three tensors).

    sums:       float64 [7]: label_tokens, weight_sum, weight_sq_sum, nll_sum (unweighted NLL), log_ratio_sum,
                at_lower, at_upper (online only: the clipped d_k and the tokens at each weight bound)
    weight_min: float64 0-dim (+inf with no label token); weight_max: float64 0-dim (-inf with none)
    """

    FIELDS = ("label_tokens", "weight_sum", "weight_sq_sum", "nll_sum", "log_ratio_sum", "at_lower", "at_upper")

    sums: torch.Tensor
    weight_min: torch.Tensor
    weight_max: torch.Tensor

    def __add__(self, other: LossStats) -> LossStats:
        return LossStats(self.sums + other.sums, torch.minimum(self.weight_min, other.weight_min),
                         torch.maximum(self.weight_max, other.weight_max))

    def scaled(self, factor: float) -> LossStats:
        """The stats of the same tokens with every weight multiplied by `factor` (> 0)."""
        scale = self.sums.new_tensor([1.0, factor, factor * factor, 1.0, 1.0, 1.0, 1.0])
        return LossStats(self.sums * scale, self.weight_min * factor, self.weight_max * factor)

    def summary(self, online: bool = False) -> dict[str, float]:
        """weight_mean, weight_ess ((sum w)^2 / (n sum w^2)), weight_min, weight_max, nll (mean unweighted NLL);
        online also log_ratio_mean, at_lower_bound, at_upper_bound (shares). Empty ({}) with no label token."""
        n, w_sum, w_sq, nll, d_sum, lower, upper = self.sums.tolist()
        if n == 0:
            return {}
        out = {"weight_mean": w_sum / n, "weight_ess": w_sum * w_sum / (n * w_sq) if w_sq > 0 else 0.0,
               "weight_min": float(self.weight_min), "weight_max": float(self.weight_max), "nll": nll / n}
        if online:
            out.update(log_ratio_mean=d_sum / n, at_lower_bound=lower / n, at_upper_bound=upper / n)
        return out


@dataclass
class PearLossOutput:
    """Result of `pear_loss`. Every [B, L] tensor is aligned with `labels` and detached.

    loss:            scalar, differentiable.
    weights:         float32 [B, L], the weight of each label token's NLL (0.0 where labels == -100 and at i = 0).
    token_logprobs:  float32 [B, L], log p_model(labels[b, i] | input_ids[b, :i]) from the live model
                     (0.0 where there is no label): in online mode, the target log-probs.
    stats:           `LossStats` of the label tokens (for logging over steps and ranks).
    diagnostics:     0-dim float64 tensors over the batch's label tokens, for logging:
                     weight_mean, weight_ess (ESS fraction (sum w)^2 / (n sum w^2)), weight_min, weight_max,
                     label_tokens; online also log_ratio_mean (mean d_k), at_lower_bound / at_upper_bound (shares).
    """

    loss: torch.Tensor
    weights: torch.Tensor
    token_logprobs: torch.Tensor
    stats: LossStats
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


# --------------------------------------------------------------------------- the loss


def _default_config() -> WeightConfig:
    from .weights import WeightConfig

    return WeightConfig()


def _loss_stats(w: torch.Tensor, nll: torch.Tensor, label_mask: torch.Tensor,
                online: BatchWeights | None) -> LossStats:
    wl = w[label_mask].double()
    zero = torch.zeros((), dtype=torch.float64, device=w.device)
    sums = [wl.new_tensor(float(wl.numel())), wl.sum(), wl.square().sum(), nll[label_mask].double().sum()]
    if online is not None:
        sums += [online.log_ratio.sum(), online.at_lower.sum().double(), online.at_upper.sum().double()]
    else:
        sums += [zero, zero, zero]
    empty = wl.numel() == 0
    return LossStats(torch.stack(sums), wl.new_tensor(math.inf) if empty else wl.min(),
                     wl.new_tensor(-math.inf) if empty else wl.max())


def _diagnostics(stats: LossStats, online: bool) -> dict[str, torch.Tensor]:
    """The per-batch diagnostics as 0-dim tensors (all 0.0 with no label token)."""
    n, w_sum, w_sq, _, d_sum, lower, upper = stats.sums.unbind()
    m = n.clamp(min=1)
    has = n > 0
    out = {"weight_mean": w_sum / m, "weight_ess": torch.where(w_sq > 0, w_sum.square() / (m * w_sq), 0.0),
           "weight_min": torch.where(has, stats.weight_min, 0.0), "weight_max": torch.where(has, stats.weight_max, 0.0),
           "label_tokens": n}
    if online:
        out.update(log_ratio_mean=d_sum / m, at_lower_bound=lower / m, at_upper_bound=upper / m)
    return out


def _check_aligned(name: str, tensor: torch.Tensor | None, labels: torch.Tensor) -> None:
    if tensor is not None and tuple(tensor.shape) != tuple(labels.shape):
        raise ValueError(f"{name} has shape {tuple(tensor.shape)}, labels {tuple(labels.shape)}: both must be "
                         "[B, L] aligned with input_ids (pad it as PearCollator does)")


def _static_weights(weights: torch.Tensor, label_mask: torch.Tensor) -> torch.Tensor:
    """A weight column as [B, L] float32, checked: a finite number >= 0 on every label token."""
    batch, length = label_mask.shape
    if weights.dim() == 1 and weights.shape[0] == batch:  # one weight per row (sequence level)
        weights = weights[:, None].expand(batch, length)
    if tuple(weights.shape) != (batch, length):
        raise ValueError(f"weights has shape {tuple(weights.shape)}, labels {(batch, length)}: pass [B, L] "
                         "aligned with input_ids (or [B], one per row)")
    w = weights.to(device=label_mask.device, dtype=torch.float32)
    bad = label_mask & ~(w.isfinite() & (w >= 0))
    if bool(bad.any()):
        b, i = (int(v) for v in bad.nonzero()[0])
        raise ValueError(f"weights[{b}, {i}] = {float(w[b, i])} on a label token: a PEAR weight must be a finite "
                         "number >= 0 (was the weight column read from another dataset, or padded with NaN?)")
    return torch.where(label_mask, w, 0.0)


def pear_loss(
    labels: torch.Tensor,
    *,
    logits: torch.Tensor | None = None,
    logprobs: torch.Tensor | None = None,
    logprobs_layout: LogprobsLayout = "aligned",
    weights: torch.Tensor | None = None,
    behavior_logprobs: torch.Tensor | None = None,
    shared_boundary: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    config: WeightConfig | None = None,
    normalize: LossNormalize = "tokens",
    num_items_in_batch: int | torch.Tensor | None = None,
    normalizer: float | torch.Tensor | None = None,
    chunk_tokens: int | None = None,
) -> PearLossOutput:
    """PEAR-weighted causal-LM NLL: sum_i w_i * nll_i / normalizer (module docstring).

    labels: int [B, L] aligned with input_ids, -100 = not trained on.
    The model's predictions, exactly one of:
      logits: [B, L, V] (any float dtype; logits[b, i] predicts token i + 1); the label log-probs are
          computed from them in float32 chunks of `chunk_tokens` positions (`label_logprobs`).
      logprobs: the label log-probs already computed, differentiable; `logprobs_layout` says how they are laid
          out: "aligned" [B, L], index i = log p(token i) (what `label_logprobs` returns), or "shifted"
          [B, L - 1], index j = log p(token j + 1) (TRL's `FusedCausalLMOutput.log_probs`).
    The weights, at most one of:
      weights: float [B, L] aligned with labels (a `pear_*_weight` column, padded) or [B] (one per row of a
          padded batch): static PEAR. Must be finite and >= 0 on label tokens.
      behavior_logprobs: float [B, L] aligned with labels (the dataset column, padded): online PEAR with
          `config` (a `pear_data.weights.WeightConfig`, default WeightConfig()); the weights come from the
          detached live log-probs. `shared_boundary` [B, L] (the dataset column, padded) for rows whose
          behavior was aligned from another tokenizer (design 3.7); None: every label token is its own span.
      neither: plain NLL, every weight 1.
    position_ids: long [B, L] of a packed or padding-free batch (several rows in one batch row, each restarting
        at position 0): online suffix sums, blocks, sequence sums and per-row normalization restart at every
        row, and the first token of a row is never a label. None: each batch row is one row.
    normalize: "tokens" divides by the label-token count, or by `num_items_in_batch` (transformers'
        gradient-accumulation convention) when given; "weights" by the sum of the weights.
    normalizer: the denominator itself, instead of this batch's (a trainer passes the total over every
        micro-batch of an accumulation step and every rank); excludes num_items_in_batch.
    """
    if (logits is None) == (logprobs is None):
        raise ValueError("pass exactly one of logits= (causal-LM logits [B, L, V]) or logprobs= (label log-probs)")
    if normalize not in ("tokens", "weights"):
        raise ValueError(f"normalize must be 'tokens' or 'weights', got {normalize!r}")
    if weights is not None and behavior_logprobs is not None:
        raise ValueError("pass weights (static PEAR) or behavior_logprobs (online PEAR), not both")
    if shared_boundary is not None and behavior_logprobs is None:
        raise ValueError("shared_boundary only applies to online PEAR (behavior_logprobs=)")
    if normalizer is not None and num_items_in_batch is not None:
        raise ValueError("pass normalizer= or num_items_in_batch=, not both")
    logp = _label_logprobs(labels, logits, logprobs, logprobs_layout, chunk_tokens)
    starts = segment_starts(tuple(labels.shape), position_ids, labels.device)
    label_mask = (labels != IGNORE_INDEX) & ~starts  # a row's first token has no context: never a loss term
    w, online = _loss_weights(logp, label_mask, weights, behavior_logprobs, shared_boundary, position_ids, config)
    nll = -torch.where(label_mask, logp, 0.0)
    if normalizer is None:
        normalizer = _batch_normalizer(w, label_mask, normalize, num_items_in_batch)
    loss = (w * nll).sum() / torch.as_tensor(normalizer, device=logp.device)
    stats = _loss_stats(w, nll.detach(), label_mask, online)
    return PearLossOutput(loss=loss, weights=w, token_logprobs=torch.where(label_mask, logp.detach(), 0.0),
                          stats=stats, diagnostics=_diagnostics(stats, online is not None))


def _loss_weights(logp: torch.Tensor, label_mask: torch.Tensor, weights: torch.Tensor | None,
                  behavior_logprobs: torch.Tensor | None, shared_boundary: torch.Tensor | None,
                  position_ids: torch.Tensor | None, config: WeightConfig | None
                  ) -> tuple[torch.Tensor, BatchWeights | None]:
    """The detached weight of every label token: online (from the live log-probs), static, or 1 (plain SFT)."""
    if behavior_logprobs is not None:
        _check_aligned("behavior_logprobs", behavior_logprobs, label_mask)
        _check_aligned("shared_boundary", shared_boundary, label_mask)
        online = pear_weights(logp.detach(), behavior_logprobs, label_mask, config or _default_config(),
                              shared_boundary=shared_boundary, position_ids=position_ids)
        return online.weights.detach(), online
    if weights is not None:
        if weights.dim() == 1 and position_ids is not None:
            raise ValueError("weights of shape [B] (one per batch row) cannot be used with position_ids: a packed "
                             "batch row holds several rows; pass [B, L] weights aligned with input_ids")
        return _static_weights(weights, label_mask).detach(), None
    return label_mask.float(), None


def _batch_normalizer(w: torch.Tensor, label_mask: torch.Tensor, normalize: LossNormalize,
                      num_items_in_batch: int | torch.Tensor | None) -> torch.Tensor:
    """This batch's own denominator (module docstring)."""
    if normalize == "weights":
        return w.sum().clamp(min=torch.finfo(torch.float32).tiny)
    if num_items_in_batch is not None:
        return torch.as_tensor(num_items_in_batch, device=w.device).clamp(min=1)
    return label_mask.sum().clamp(min=1)


def _label_logprobs(labels: torch.Tensor, logits: torch.Tensor | None, logprobs: torch.Tensor | None,
                    layout: LogprobsLayout, chunk_tokens: int | None) -> torch.Tensor:
    """The label log-probs as float32 [B, L] aligned with labels, from whichever form the caller has."""
    batch, length = labels.shape
    if logits is not None:
        return label_logprobs(logits, labels, chunk_tokens=chunk_tokens)
    if layout == "shifted":
        if tuple(logprobs.shape) != (batch, length - 1):
            raise ValueError(f"logprobs_layout='shifted' needs logprobs of shape {(batch, length - 1)} "
                             f"(index j = token j + 1), got {tuple(logprobs.shape)}")
        return torch.cat([logprobs.new_zeros(batch, 1), logprobs], dim=1).float()
    if layout == "aligned":
        _check_aligned("logprobs", logprobs, labels)
        return logprobs.float()
    raise ValueError(f"logprobs_layout must be 'aligned' or 'shifted', got {layout!r}")
