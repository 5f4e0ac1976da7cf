"""The torch twin of the weight engine (docs/design.md section 3), for online PEAR in the loss shim.

The same named steps as `pear_data.weights` (`log_ratios` -> `log_weights` -> `bounded_weights` ->
`normalized_weights`; `pear_weights` composes them) on a batch of [B, L] tensors, in float64, with no loop
over tokens or rows. A batch row may hold several packed rows (`segment_starts` from `position_ids`): every sum
restarts at each of them. Depends only on torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # the engine's dataclass; imported lazily so this module needs only torch
    from .weights import WeightConfig


def segment_starts(shape: tuple[int, int], position_ids: torch.Tensor | None, device: torch.device | None = None
                   ) -> torch.Tensor:
    """bool [B, L]: True where a packed row (a segment) begins.

    Without position_ids every batch row is one segment (a padded batch). With position_ids (packing,
    padding-free batches: several rows concatenated in one batch row), a segment begins where the position
    restarts at 0, as transformers' attention reads packed sequences. Position 0 of a batch row always begins one.
    """
    if position_ids is None:
        starts = torch.zeros(shape, dtype=torch.bool, device=device)
    else:
        if tuple(position_ids.shape) != tuple(shape):
            raise ValueError(f"position_ids has shape {tuple(position_ids.shape)}, labels {tuple(shape)}: pass the "
                             "[B, L] position_ids the model gets (packed rows restart at 0)")
        starts = position_ids == 0
    starts[:, 0] = True
    return starts


@dataclass
class Completion:
    """The completion tokens of a batch, per segment (a padded row, or one row of a packed batch), packed left:
    the torch twin of `weights.CompletionIndex`.

    Segment s's k-th completion token (k = 1..T_s, in position order, gaps such as user turns skipped) sits at
    [s, k - 1] of an [S, T] "completion space", T = max T_s. Segments are numbered in flat (row-major) order of
    the [B, L] batch, so every weight sum, block boundary and per-row normalization restarts at each packed row.

    positions: long [Nc], flat index b * L + i of every completion token (row-major order)
    rows:      long [Nc], the segment of every completion token
    ranks:     long [Nc], k - 1 of every completion token
    lengths:   long [S], T_s
    valid:     bool [S, T], k - 1 < T_s
    span_ends: bool [S, T] or None, the tokens that close a span (design 3.7); None: every token
    shape:     (B, L) of the batch
    """

    positions: torch.Tensor
    rows: torch.Tensor
    ranks: torch.Tensor
    lengths: torch.Tensor
    valid: torch.Tensor
    span_ends: torch.Tensor | None
    shape: tuple[int, int]

    @classmethod
    def from_mask(cls, completion_mask: torch.Tensor, shared_boundary: torch.Tensor | None = None,
                  starts: torch.Tensor | None = None) -> Completion:
        """`starts`: bool [B, L] where segments begin (`segment_starts`); None: one segment per batch row."""
        mask = completion_mask.bool()
        if starts is None:
            starts = segment_starts(tuple(mask.shape), None, mask.device)
        segment = starts.reshape(-1).long().cumsum(0) - 1
        n_segments = int(segment[-1]) + 1 if segment.numel() else 0
        positions = mask.reshape(-1).nonzero().squeeze(-1)
        rows = segment.index_select(0, positions)
        lengths = torch.bincount(rows, minlength=n_segments)
        before = lengths.cumsum(0) - lengths  # completion tokens of the earlier segments
        ranks = torch.arange(positions.numel(), device=mask.device) - before.index_select(0, rows)
        t_max = int(lengths.max()) if n_segments else 0
        valid = torch.arange(t_max, device=mask.device)[None, :] < lengths[:, None]
        completion = cls(positions, rows, ranks, lengths, valid, None, tuple(mask.shape))
        if shared_boundary is not None:
            ends = completion.pack(shared_boundary) > 0
            ends |= torch.arange(t_max, device=mask.device)[None, :] == (lengths[:, None] - 1)  # a row's last
            completion.span_ends = ends & valid  # token closes its last span
        return completion

    @property
    def t_max(self) -> int:
        return self.valid.shape[1]

    def pack(self, values: torch.Tensor) -> torch.Tensor:
        """[B, L] aligned with the mask -> float64 [S, T] in completion space (0 past T_s)."""
        out = torch.zeros(self.valid.shape, dtype=torch.float64, device=values.device)
        out[self.rows, self.ranks] = values.reshape(-1).index_select(0, self.positions).to(torch.float64)
        return out

    def unpack(self, values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """[S, T] in completion space -> [B, L] aligned with the mask (0 off the completion)."""
        out = torch.zeros(self.shape[0] * self.shape[1], dtype=dtype, device=values.device)
        out[self.positions] = values[self.rows, self.ranks].to(dtype)
        return out.view(self.shape)

    def where(self, s: int, k: int) -> tuple[int, int]:
        """(b, i) in the batch of segment s's completion token k."""
        flat = int(self.positions[(self.rows == s) & (self.ranks == k)][0])
        return divmod(flat, self.shape[1])


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
    position_ids: torch.Tensor | None = None,
) -> BatchWeights:
    """PEAR weights of design section 3 for a batch: the torch twin of `pear_data.weights.weigh`.

    target_logprobs, behavior_logprobs: float [B, N], aligned with completion_mask.
    completion_mask: bool/int [B, N]; padding is simply 0.
    config: a `pear_data.weights.WeightConfig`; granularity overrides config.granularity.
    normalize="dataset" normalizes over the batch's completion tokens (the batch stands in for the dataset).
    shared_boundary: bool/int [B, N] or None, the dataset column of cross-tokenizer rows (design 3.7).
    position_ids: long [B, N] or None; packed rows restart at 0 and get their own sums (`segment_starts`).

    Computed in float64, returned as float32, no loop over tokens or rows.
    Raises ValueError on a target log-prob that is NaN, a behavior log-prob that is NaN or > 0, or a log-ratio
    that stays infinite.
    """
    starts = segment_starts(tuple(completion_mask.shape), position_ids, completion_mask.device)
    completion = Completion.from_mask(completion_mask, shared_boundary, starts)
    lt, lb = completion.pack(target_logprobs), completion.pack(behavior_logprobs)
    d = log_ratios(lt, lb, completion, config)
    _check_log_ratios(lt, lb, d, completion)
    logw = log_weights(d, completion, config, granularity or config.granularity)
    w, at_lower, at_upper = bounded_weights(logw, completion, config)
    w, at_upper = normalized_weights(w, at_upper, completion, config)
    return BatchWeights(
        weights=completion.unpack(w, torch.float32),
        log_ratio=completion.unpack(d, torch.float64),
        at_lower=completion.unpack(at_lower, torch.bool),
        at_upper=completion.unpack(at_upper, torch.bool),
    )


def _check_log_ratios(lt: torch.Tensor, lb: torch.Tensor, d: torch.Tensor, completion: Completion) -> None:
    """ValueError naming the first bad position: the live target log-prob (the model's), or the stored
    behavior log-prob (the dataset's)."""
    valid = completion.valid
    bad_target = valid & (lt.isnan() | (lt == math.inf))
    bad_behavior = valid & (lb.isnan() | (lb > 0) | ~d.isfinite())
    if bool(bad_target.any()):
        s, k = (int(v) for v in bad_target.nonzero()[0])
        b, i = completion.where(s, k)
        raise ValueError(
            f"the model's log-prob of label token [{b}, {i}] is {float(lt[s, k])}: the live target log-probs "
            "hold NaN (the model's forward pass diverged: check the learning rate, the loss scale, bf16/fp16 "
            "overflow, or NaN parameters); the dataset's behavior_logprobs are not the cause"
        )
    if bool(bad_behavior.any()):
        s, k = (int(v) for v in bad_behavior.nonzero()[0])
        b, i = completion.where(s, k)
        raise ValueError(
            f"behavior_logprobs[{b}, {i}] = {float(lb[s, k])} with target log-prob {float(lt[s, k])}: "
            "a behavior log-prob must be a number <= 0, and -inf needs a finite --log-ratio-clip bound "
            "(WeightConfig.log_ratio_clip) on that side and no --center (design 3.1); check the dataset column "
            "and its alignment"
        )
