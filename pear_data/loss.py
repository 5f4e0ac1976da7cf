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

if TYPE_CHECKING:  # the engine's dataclass; imported lazily so this module needs only torch
    from .weights import WeightConfig

IGNORE_INDEX = -100
LossNormalize = Literal["tokens", "weights"]
LogprobsLayout = Literal["aligned", "shifted"]

# float32 elements of one [chunk, V] slab: 16M = 64 MiB (341 positions for a 49k vocab, 64 for 262k).
_CHUNK_ELEMENTS = 1 << 24


@dataclass
class PearLossOutput:
    """Result of `pear_loss`. Every [B, L] tensor is aligned with `labels` and detached.

    loss:            scalar, differentiable.
    weights:         float32 [B, L], the weight of each label token's NLL (0.0 where labels == -100 and at i = 0).
    token_logprobs:  float32 [B, L], log p_model(labels[b, i] | input_ids[b, :i]) from the live model
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
class Completion:
    """The completion tokens of a padded batch, packed left: the torch twin of `weights.CompletionIndex`.

    Row b's k-th completion token (k = 1..T_b, in position order, gaps such as user turns skipped) sits at
    [b, k - 1] of a [B, T] "completion space", T = max T_b.

    rows, positions: long [Nc], the (b, i) of every completion token (row-major order)
    ranks:           long [Nc], k - 1 of every completion token
    lengths:         long [B], T_b
    valid:           bool [B, T], k - 1 < T_b
    span_ends:       bool [B, T] or None, the tokens that close a span (design 3.7); None: every token
    """

    rows: torch.Tensor
    positions: torch.Tensor
    ranks: torch.Tensor
    lengths: torch.Tensor
    valid: torch.Tensor
    span_ends: torch.Tensor | None
    shape: tuple[int, int]

    @classmethod
    def from_mask(cls, completion_mask: torch.Tensor, shared_boundary: torch.Tensor | None = None) -> Completion:
        mask = completion_mask.bool()
        lengths = mask.sum(dim=1)
        t_max = int(lengths.max()) if mask.shape[0] else 0
        rows, positions = mask.nonzero(as_tuple=True)
        ranks = (mask.cumsum(dim=1) - 1)[rows, positions]
        valid = torch.arange(t_max, device=mask.device)[None, :] < lengths[:, None]
        completion = cls(rows, positions, ranks, lengths, valid, None, tuple(mask.shape))
        if shared_boundary is not None:
            ends = completion.pack(shared_boundary) > 0
            ends |= torch.arange(t_max, device=mask.device)[None, :] == (lengths[:, None] - 1)  # a row's last
            completion.span_ends = ends & valid  # token closes its last span
        return completion

    @property
    def t_max(self) -> int:
        return self.valid.shape[1]

    def pack(self, values: torch.Tensor) -> torch.Tensor:
        """[B, N] aligned with the mask -> float64 [B, T] in completion space (0 past T_b)."""
        out = torch.zeros(self.valid.shape, dtype=torch.float64, device=values.device)
        out[self.rows, self.ranks] = values[self.rows, self.positions].to(torch.float64)
        return out

    def unpack(self, values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """[B, T] in completion space -> [B, N] aligned with the mask (0 off the completion)."""
        out = torch.zeros(self.shape, dtype=dtype, device=values.device)
        out[self.rows, self.positions] = values[self.rows, self.ranks].to(dtype)
        return out


def log_ratios(lt: torch.Tensor, lb: torch.Tensor, completion: Completion, config: WeightConfig) -> torch.Tensor:
    """d_k of design 3.1 (centered if asked, then clipped; one d per span, design 3.7): float64 [B, T].

    lt, lb: float64 [B, T] target and behavior log-probs in completion space.
    """
    valid = completion.valid
    r = torch.where(valid, lt - lb, 0.0)
    if config.center:
        r = torch.where(valid, r - r.sum(dim=1, keepdim=True) / completion.lengths.clamp(min=1)[:, None], 0.0)
    lo, hi = config.log_ratio_clip
    ends = completion.span_ends
    if ends is None:
        return torch.where(valid, r.clamp(lo, hi), 0.0)
    # The span of every token: the number of span ends before it. Each span's summed ratio, clipped as
    # one, sits on the span's last token.
    span = (ends.long().cumsum(dim=1) - ends.long()).clamp(max=max(completion.t_max - 1, 0))
    span_sums = torch.zeros_like(r).scatter_add_(1, span, r)
    return torch.where(ends, span_sums.gather(1, span).clamp(lo, hi), 0.0)


def log_weights(d: torch.Tensor, completion: Completion, config: WeightConfig, granularity: str) -> torch.Tensor:
    """logW_k of design 3.2, float64 [B, T], before bounds. Suffix sums are differences of one cumulative
    sum over d_j + log(gamma) (the discount folded in, as in the engine)."""
    valid, lengths = completion.valid, completion.lengths
    batch, t_max = valid.shape
    if granularity == "sequence":
        logw = d.sum(dim=1, keepdim=True).expand(batch, t_max)
        return logw / lengths.clamp(min=1)[:, None] if config.length_normalize else logw
    if granularity not in ("token", "block"):
        raise ValueError(f"granularity must be token, block or sequence, got {granularity!r}")
    dg = torch.where(valid, d + math.log(config.gamma), 0.0)
    cs = torch.cat([dg.new_zeros(batch, 1), dg.cumsum(dim=1)], dim=1)  # cs[:, j] = sum of the first j terms
    i = torch.arange(t_max, device=d.device)[None, :]
    end = lengths[:, None]  # exclusive end (in cs terms) of the row
    if granularity == "token":
        start = i + 1  # the suffix excludes token k itself
        if config.horizon is not None:  # a horizon past the longest row changes nothing (and cannot overflow)
            end = torch.minimum(end, i + 1 + min(config.horizon, t_max))
    elif completion.span_ends is None:
        start = torch.minimum((i // config.block_size + 1) * config.block_size, end)  # first k after the block
    else:
        start = block_ends(completion, config.block_size) + 1
    return cs.gather(1, end.expand(batch, t_max)) - cs.gather(1, torch.minimum(start, end).expand(batch, t_max))


def block_ends(completion: Completion, block_size: int) -> torch.Tensor:
    """long [B, T]: the last k of each token's block, block ends snapped to the nearest span end (ties: the
    later one), as `pear_data.weights.block_ends`."""
    ends, valid, lengths = completion.span_ends, completion.valid, completion.lengths
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


def _next_true(flags: torch.Tensor) -> torch.Tensor:
    """[B, T]: the smallest j >= i with flags[b, j] (T where there is none)."""
    t_max = flags.shape[1]
    idx = torch.where(flags, torch.arange(t_max, device=flags.device)[None, :], t_max)
    return idx.flip(1).cummin(dim=1).values.flip(1)


def bounded_weights(logw: torch.Tensor, completion: Completion, config: WeightConfig
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Steps 1-2 of design 3.3: W = exp(clip(logW, log wmin, log wmax)); and which tokens sit at each bound."""
    wmin, wmax = config.weight_clip
    log_lo = math.log(wmin) if wmin > 0 else -math.inf
    log_hi = math.log(wmax)
    valid = completion.valid
    at_lower = valid & (logw <= log_lo)
    at_upper = valid & (logw >= log_hi)
    return torch.where(valid, logw.clamp(log_lo, log_hi).exp(), 0.0), at_lower, at_upper


def normalized_weights(w: torch.Tensor, at_upper: torch.Tensor, completion: Completion, config: WeightConfig
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Steps 3-4 of design 3.3: normalize (dataset -> over the batch's completion tokens, or per row), then
    the cap (which counts as the upper bound)."""
    valid = completion.valid
    if config.normalize == "dataset":
        w = w / (w.sum() / completion.lengths.sum().clamp(min=1))
    elif config.normalize == "sequence":
        w = w / (w.sum(dim=1, keepdim=True) / completion.lengths.clamp(min=1)[:, None])
    if config.max_weight is not None:
        at_upper = at_upper | (valid & (w >= config.max_weight))
        w = w.clamp(max=config.max_weight)
    return w, at_upper


@dataclass
class BatchWeights:
    """`pear_weights` output, all [B, N] aligned with the inputs, 0 / False off the completion.

    weights:    float32, the final W of the chosen granularity (design 3.3: bounds, normalization, cap).
    log_ratio:  float64, d_k of design 3.1 (centered if asked, clipped).
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
    config: WeightConfig,
    granularity: str | None = None,
    shared_boundary: torch.Tensor | None = None,
) -> BatchWeights:
    """PEAR weights of design section 3 for a padded batch: the torch twin of `pear_data.weights.weigh`.

    target_logprobs, behavior_logprobs: float [B, N], aligned with completion_mask.
    completion_mask: bool/int [B, N]; padding is simply 0.
    config: a `pear_data.weights.WeightConfig`; granularity overrides config.granularity.
    normalize="dataset" normalizes over the batch's completion tokens (the batch stands in for the dataset).
    shared_boundary: bool/int [B, N] or None, the dataset column of cross-tokenizer rows (design 3.7).

    Computed in float64, returned as float32, no loop over tokens or rows.
    Raises ValueError on a behavior log-prob that is NaN or > 0, or a log-ratio that stays infinite.
    """
    completion = Completion.from_mask(completion_mask, shared_boundary)
    lt, lb = completion.pack(target_logprobs), completion.pack(behavior_logprobs)
    d = log_ratios(lt, lb, completion, config)
    bad = completion.valid & (lb.isnan() | (lb > 0) | ~d.isfinite())
    if bool(bad.any()):
        b, k = (int(v) for v in bad.nonzero()[0])
        position = int(completion.positions[(completion.rows == b) & (completion.ranks == k)][0])
        if bool(lt[b, k].isnan()):  # the live model's own log-prob: the dataset column is not to blame
            raise ValueError(f"the target log-prob at [{b}, {position}] is NaN: the model's logits hold NaN (a "
                             "diverged model, or an overflow in half precision); check the model, not the dataset")
        raise ValueError(
            f"behavior_logprobs[{b}, {position}] = {float(lb[b, k])} with target log-prob {float(lt[b, k])}: "
            "a behavior log-prob must be a number <= 0, and -inf needs a finite --log-ratio-clip bound "
            "(WeightConfig.log_ratio_clip) on that side and no --center (design 3.1); check the dataset column "
            "and its alignment"
        )
    logw = log_weights(d, completion, config, granularity or config.granularity)
    w, at_lower, at_upper = bounded_weights(logw, completion, config)
    w, at_upper = normalized_weights(w, at_upper, completion, config)
    return BatchWeights(
        weights=completion.unpack(w, torch.float32),
        log_ratio=completion.unpack(d, torch.float64),
        at_lower=completion.unpack(at_lower, torch.bool),
        at_upper=completion.unpack(at_upper, torch.bool),
    )


# --------------------------------------------------------------------------- the loss


def _default_config() -> WeightConfig:
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


def _check_aligned(name: str, tensor: torch.Tensor | None, labels: torch.Tensor) -> None:
    if tensor is not None and tuple(tensor.shape) != tuple(labels.shape):
        raise ValueError(f"{name} has shape {tuple(tensor.shape)}, labels {tuple(labels.shape)}: both must be "
                         "[B, L] aligned with input_ids (pad it as PearCollator does)")


def _static_weights(weights: torch.Tensor, labels: torch.Tensor, label_mask: torch.Tensor) -> torch.Tensor:
    """A weight column as [B, L] float32, checked: a finite number >= 0 on every label token."""
    batch, length = labels.shape
    if weights.dim() == 1 and weights.shape[0] == batch:  # one weight per row (sequence level)
        weights = weights[:, None].expand(batch, length)
    if tuple(weights.shape) != (batch, length):
        raise ValueError(f"weights has shape {tuple(weights.shape)}, labels {(batch, length)}: pass [B, L] "
                         "aligned with input_ids (or [B], one per row)")
    w = weights.to(device=labels.device, dtype=torch.float32)
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
    config: WeightConfig | None = None,
    normalize: LossNormalize = "tokens",
    num_items_in_batch: int | torch.Tensor | None = None,
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
      weights: float [B, L] aligned with labels (a `pear_*_weight` column, padded) or [B] (one per row):
          static PEAR. Must be finite and >= 0 on label tokens.
      behavior_logprobs: float [B, L] aligned with labels (the dataset column, padded): online PEAR with
          `config` (a `pear_data.weights.WeightConfig`, default WeightConfig()); the weights come from the
          detached live log-probs. `shared_boundary` [B, L] (the dataset column, padded) for rows whose
          behavior was aligned from another tokenizer (design 3.7); None: every label token is its own span.
      neither: plain NLL, every weight 1.
    normalize: "tokens" divides by the label-token count, or by `num_items_in_batch` (transformers'
        gradient-accumulation convention) when given; "weights" by the sum of the weights.
    """
    if (logits is None) == (logprobs is None):
        raise ValueError("pass exactly one of logits= (causal-LM logits [B, L, V]) or logprobs= (label log-probs)")
    if normalize not in ("tokens", "weights"):
        raise ValueError(f"normalize must be 'tokens' or 'weights', got {normalize!r}")
    if weights is not None and behavior_logprobs is not None:
        raise ValueError("pass weights (static PEAR) or behavior_logprobs (online PEAR), not both")
    if shared_boundary is not None and behavior_logprobs is None:
        raise ValueError("shared_boundary only applies to online PEAR (behavior_logprobs=)")
    batch, length = labels.shape
    if logits is not None:
        logp = label_logprobs(logits, labels, chunk_tokens=chunk_tokens)
    elif logprobs_layout == "shifted":
        if tuple(logprobs.shape) != (batch, length - 1):
            raise ValueError(f"logprobs_layout='shifted' needs logprobs of shape {(batch, length - 1)} "
                             f"(index j = token j + 1), got {tuple(logprobs.shape)}")
        logp = torch.cat([logprobs.new_zeros(batch, 1), logprobs], dim=1)
    elif logprobs_layout == "aligned":
        _check_aligned("logprobs", logprobs, labels)
        logp = logprobs
    else:
        raise ValueError(f"logprobs_layout must be 'aligned' or 'shifted', got {logprobs_layout!r}")
    label_mask = labels != IGNORE_INDEX
    label_mask[:, 0] = False  # position 0 has no context: never a loss term
    logp = logp.float()
    diagnostics: dict[str, torch.Tensor] = {}

    if behavior_logprobs is not None:
        _check_aligned("behavior_logprobs", behavior_logprobs, labels)
        _check_aligned("shared_boundary", shared_boundary, labels)
        online = pear_weights(logp.detach(), behavior_logprobs, label_mask, config or _default_config(),
                              shared_boundary=shared_boundary)
        w = online.weights
        n = label_mask.sum().clamp(min=1)
        diagnostics["log_ratio_mean"] = online.log_ratio.sum() / n
        diagnostics["at_lower_bound"] = online.at_lower.sum().double() / n
        diagnostics["at_upper_bound"] = online.at_upper.sum().double() / n
    elif weights is not None:
        w = _static_weights(weights, labels, label_mask)
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
