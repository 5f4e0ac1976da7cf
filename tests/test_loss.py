"""pear_data.loss: the weighted NLL (static), the torch PEAR weights (online) and their contracts. No model needed."""

from __future__ import annotations

import dataclasses
import itertools
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pear_data.loss import label_logprobs, pear_loss, pear_weights
from pear_data.weights import GRANULARITIES, TokenRows, WeightConfig, weigh, weight_sums

VOCAB = 11


def _batch(seed: int = 0, batch: int = 3, length: int = 9, vocab: int = VOCAB):
    """logits [B, L, V] float32 with grad, labels [B, L] (-100 on a prompt and on right padding), weights [B, L]."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, length, vocab, generator=g, requires_grad=True)
    labels = torch.randint(0, vocab, (batch, length), generator=g)
    labels[:, :3] = -100  # prompt
    labels[1, 7:] = -100  # padding of a shorter row
    labels[2, 5] = -100  # a user turn inside the completion
    weights = torch.rand(batch, length, generator=g) * 3
    return logits, labels, weights


def _hand_weighted_nll(logits, labels, weights, normalizer):
    """sum_i w_i * -log softmax(logits[b, i - 1])[labels[b, i]] / normalizer, one token at a time in float64."""
    total = 0.0
    z = logits.detach().double()
    for b in range(labels.shape[0]):
        for i in range(1, labels.shape[1]):
            if labels[b, i] == -100:
                continue
            row = z[b, i - 1]
            logp = float(row[labels[b, i]] - torch.logsumexp(row, 0))
            total += float(weights[b, i]) * -logp
    return total / normalizer


def test_static_loss_equals_hand_computed_weighted_nll():
    logits, labels, weights = _batch()
    logits = logits.detach()
    n_labels = int((labels[:, 1:] != -100).sum())
    assert math.isclose(
        float(pear_loss(labels, logits=logits, weights=weights).loss),
        _hand_weighted_nll(logits, labels, weights, n_labels),
        rel_tol=1e-6,
    )
    assert math.isclose(
        float(pear_loss(labels, logits=logits, weights=weights, num_items_in_batch=50).loss),
        _hand_weighted_nll(logits, labels, weights, 50),
        rel_tol=1e-6,
    )
    w_sum = float(weights[:, 1:][labels[:, 1:] != -100].sum())
    assert math.isclose(
        float(pear_loss(labels, logits=logits, weights=weights, normalize="weights", num_items_in_batch=50).loss),
        _hand_weighted_nll(logits, labels, weights, w_sum),
        rel_tol=1e-6,
    )


def test_weight_at_index_i_weights_the_prediction_of_token_i_from_logits_i_minus_1():
    logits, labels, _ = _batch()
    logits = logits.detach()
    labels = torch.full_like(labels, -100)
    labels[0, 6] = 4
    weights = torch.zeros(labels.shape)
    weights[0, 6] = 2.0
    expected = -2.0 * float(torch.log_softmax(logits[0, 5].detach().double(), 0)[4])
    assert math.isclose(float(pear_loss(labels, logits=logits, weights=weights).loss), expected, rel_tol=1e-6)
    weights[0, 6], weights[0, 5] = 0.0, 2.0  # the same weight one position early weights nothing
    assert float(pear_loss(labels, logits=logits, weights=weights).loss) == 0.0


def test_label_at_position_zero_is_never_a_loss_term():
    logits, labels, weights = _batch()
    with_first = labels.clone()
    with_first[:, 0] = 1
    assert torch.equal(
        pear_loss(with_first, logits=logits, weights=weights).loss,
        pear_loss(labels, logits=logits, weights=weights).loss,
    )
    assert torch.equal(label_logprobs(logits, with_first)[:, 0], torch.zeros(3))


def test_zero_weight_on_a_row_removes_exactly_that_rows_gradient():
    logits, labels, weights = _batch()
    weights[1] = 0.0
    n = int((labels[:, 1:] != -100).sum())
    pear_loss(labels, logits=logits, weights=weights, num_items_in_batch=n).loss.backward()
    grad_zeroed = logits.grad.clone()
    assert torch.count_nonzero(grad_zeroed[1]) == 0
    assert torch.count_nonzero(grad_zeroed[0]) > 0

    # The same as if row 1 had no labels at all (same normalizer): bit for bit.
    logits.grad = None
    dropped = labels.clone()
    dropped[1] = -100
    pear_loss(dropped, logits=logits, weights=weights, num_items_in_batch=n).loss.backward()
    assert torch.equal(logits.grad, grad_zeroed)


def test_all_ones_weights_equal_plain_cross_entropy():
    logits, labels, _ = _batch()
    ones = torch.ones(labels.shape)
    ours = pear_loss(labels, logits=logits, weights=ones).loss
    (grad_ours,) = torch.autograd.grad(ours, logits)
    ce = F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), labels[:, 1:].reshape(-1), ignore_index=-100)
    (grad_ce,) = torch.autograd.grad(ce, logits)
    torch.testing.assert_close(ours, ce, rtol=1e-6, atol=0)
    torch.testing.assert_close(grad_ours, grad_ce, rtol=1e-5, atol=1e-8)
    assert torch.equal(pear_loss(labels, logits=logits).loss, ours)  # no weights = weights of 1
    summed = F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), labels[:, 1:].reshape(-1), reduction="sum")
    torch.testing.assert_close(
        pear_loss(labels, logits=logits, weights=ones, num_items_in_batch=40).loss, summed / 40, rtol=1e-6, atol=0
    )


def test_per_row_weights_broadcast_over_the_row():
    logits, labels, _ = _batch()
    per_row = torch.tensor([0.5, 2.0, 1.5])
    torch.testing.assert_close(
        pear_loss(labels, logits=logits, weights=per_row).loss,
        pear_loss(labels, logits=logits, weights=per_row[:, None].expand(labels.shape)).loss,
        rtol=0,
        atol=0,
    )


def test_chunk_size_changes_nothing_and_bf16_logits_keep_their_dtype():
    logits, labels, weights = _batch(length=40, batch=4)
    one = pear_loss(labels, logits=logits, weights=weights, chunk_tokens=1).loss
    (g1,) = torch.autograd.grad(one, logits)
    whole = pear_loss(labels, logits=logits, weights=weights, chunk_tokens=10_000).loss
    (g2,) = torch.autograd.grad(whole, logits)
    torch.testing.assert_close(one, whole, rtol=1e-6, atol=0)
    torch.testing.assert_close(g1, g2, rtol=1e-6, atol=1e-9)

    half = logits.detach().bfloat16().requires_grad_()
    loss = pear_loss(labels, logits=half, weights=weights, chunk_tokens=7).loss
    loss.backward()
    assert loss.dtype == torch.float32 and half.grad.dtype == torch.bfloat16
    reference = pear_loss(labels, logits=half.detach().float(), weights=weights).loss
    torch.testing.assert_close(loss, reference, rtol=1e-6, atol=0)  # float32 math on the bf16 values


def test_no_float32_allocation_of_the_full_batch_by_vocab():
    from torch.profiler import ProfilerActivity, profile

    batch, length, vocab = 2, 64, 4096
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(batch, length, vocab, generator=g).bfloat16().requires_grad_()
    labels = torch.randint(0, vocab, (batch, length), generator=g)
    weights = torch.rand(batch, length, generator=g)

    def largest_allocation(fn) -> int:
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            fn().backward()
        return max(e.cpu_memory_usage for e in prof.events())

    full_float32 = batch * (length - 1) * vocab * 4
    # The naive loss upcasts the whole batch: the check below can tell the difference.
    naive = largest_allocation(
        lambda: F.cross_entropy(logits[:, :-1].reshape(-1, vocab).float(), labels[:, 1:].reshape(-1))
    )
    assert naive >= full_float32
    ours = largest_allocation(lambda: pear_loss(labels, logits=logits, weights=weights, chunk_tokens=16).loss)
    # Only the bf16 gradient of the logits (the size of the logits themselves) is batch x seq x vocab.
    assert ours <= batch * length * vocab * 2


# --------------------------------------------------------------------------- online PEAR


def _scored_batch(seed: int, batch: int = 6, length: int = 50):
    """Padded [B, N] target/behavior log-probs and completion masks with gaps (user turns) and ragged lengths."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(6, length + 1, batch)
    lengths[0] = length
    mask = np.zeros((batch, length), dtype=np.int8)
    for b, n in enumerate(lengths):
        prompt = int(rng.integers(1, n - 2))
        mask[b, prompt:n] = 1
        if b % 2 and n - prompt > 6:
            mask[b, prompt + 2 : prompt + 4] = 0
    lt = np.log(rng.uniform(0.01, 1.0, (batch, length)))
    lb = np.minimum(lt + rng.normal(0, 0.3, (batch, length)), 0.0)
    lt[mask == 0] = 0.0
    lb[mask == 0] = 0.0
    return lengths, mask, lt.astype(np.float32), lb.astype(np.float32)


def _spans(mask: np.ndarray, seed: int) -> np.ndarray:
    """A cross-tokenizer shared_boundary column for the batch: random span ends, each row's last one set."""
    rng = np.random.default_rng(seed + 1)
    shared = ((rng.random(mask.shape) < 0.5) & (mask == 1)).astype(np.int8)
    for b in range(len(mask)):
        shared[b, np.flatnonzero(mask[b])[-1]] = 1
    return shared


def _engine(lengths, mask, lt, lb, config, shared=None):
    """The numpy engine on the same rows (dataset normalization over exactly these rows)."""
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    rows = TokenRows(
        offsets=offsets,
        completion_mask=np.concatenate([m[:n] for m, n in zip(mask, lengths)]),
        target_logprobs=np.concatenate([x[:n] for x, n in zip(lt, lengths)]),
        behavior_logprobs=np.concatenate([x[:n] for x, n in zip(lb, lengths)]),
        shared_boundary=None if shared is None else np.concatenate([x[:n] for x, n in zip(shared, lengths)]),
    )
    means = weight_sums(rows, config).means() if config.normalize == "dataset" else None
    return offsets, weigh(rows, config, means)


FLAGS = list(
    itertools.product(
        GRANULARITIES,
        [None, 3],  # horizon
        [1, 4],  # block size
        [False, True],  # center
        ["none", "sequence", "dataset"],
        [None, 3.0],  # cap
    )
)


@pytest.mark.parametrize("spans", [False, True], ids=["direct", "cross-tokenizer"])
@pytest.mark.parametrize("granularity,horizon,block_size,center,normalize,cap", FLAGS)
def test_online_weights_equal_the_numpy_engine(granularity, horizon, block_size, center, normalize, cap, spans):
    seed = FLAGS.index((granularity, horizon, block_size, center, normalize, cap))
    lengths, mask, lt, lb = _scored_batch(seed=seed)
    shared = _spans(mask, seed) if spans else None
    config = WeightConfig(
        granularity=granularity,
        horizon=horizon,
        block_size=block_size,
        center=center,
        normalize=normalize,
        max_weight=cap,
        length_normalize=granularity == "sequence" and center,
        gamma=0.98,
        log_ratio_clip=(-0.4, 0.5),
        weight_clip=(0.02, 40.0),
    )
    ours = pear_weights(
        torch.from_numpy(lt),
        torch.from_numpy(lb),
        torch.from_numpy(mask),
        config,
        shared_boundary=None if shared is None else torch.from_numpy(shared),
    ).weights.numpy()
    offsets, expected = _engine(lengths, mask, lt, lb, config, shared)
    for b, n in enumerate(lengths):
        if granularity == "sequence":
            want = np.where(mask[b, :n] == 1, expected.sequence[b], 0.0)
        else:
            want = expected.column(granularity)[offsets[b] : offsets[b + 1]]
        np.testing.assert_allclose(ours[b, :n], want, rtol=1e-6, atol=0)
        assert not ours[b, n:].any()  # padding gets no weight


def test_online_loss_is_static_loss_with_the_detached_online_weights():
    logits, labels, _ = _batch(seed=3, length=30)
    g = torch.Generator().manual_seed(1)
    behavior = torch.where(labels != -100, -torch.rand(labels.shape, generator=g) * 3, 0.0)
    config = WeightConfig(log_ratio_clip=(-1.0, 1.0), gamma=0.9)
    out = pear_loss(labels, logits=logits, behavior_logprobs=behavior, config=config)
    (grad_online,) = torch.autograd.grad(out.loss, logits)
    static = pear_loss(labels, logits=logits, weights=out.weights).loss
    (grad_static,) = torch.autograd.grad(static, logits)
    assert torch.equal(out.loss, static)
    assert torch.equal(grad_online, grad_static)  # the weights carry no gradient
    # ...and they are the engine's weights for the live target log-probs.
    expected = pear_weights(label_logprobs(logits, labels).detach(), behavior, labels != -100, config).weights
    expected[:, 0] = 0.0
    assert torch.equal(out.weights, expected)
    assert set(out.diagnostics) >= {"weight_mean", "weight_ess", "log_ratio_mean", "at_lower_bound"}
    assert 0.0 < float(out.diagnostics["weight_ess"]) <= 1.0


def test_trl_shifted_log_probs_give_the_same_loss():
    logits, labels, weights = _batch()
    aligned = label_logprobs(logits, labels)
    a = pear_loss(labels, logprobs=aligned, weights=weights).loss
    b = pear_loss(
        labels, logprobs=aligned[:, 1:], logprobs_layout="shifted", weights=weights
    ).loss  # TRL FusedCausalLMOutput layout
    assert torch.equal(a, b)
    torch.testing.assert_close(a, pear_loss(labels, logits=logits, weights=weights).loss, rtol=0, atol=0)


def test_online_rejects_bad_behavior_logprobs_with_their_position():
    logits, labels, _ = _batch()
    behavior = torch.where(labels != -100, -1.0, 0.0)
    behavior[0, 4] = float("nan")
    with pytest.raises(ValueError, match=r"behavior_logprobs\[0, 4\]"):
        pear_loss(labels, logits=logits, behavior_logprobs=behavior)
    behavior[0, 4] = -math.inf  # probability 0 under behavior: the finite upper clip bound absorbs it
    assert torch.isfinite(pear_loss(labels, logits=logits, behavior_logprobs=behavior).loss)
    with pytest.raises(ValueError, match="finite --log-ratio-clip"):
        pear_loss(
            labels, logits=logits, behavior_logprobs=behavior, config=WeightConfig(log_ratio_clip=(-1.0, math.inf))
        )
    with pytest.raises(ValueError, match="not both"):
        pear_loss(labels, logits=logits, weights=torch.ones(labels.shape), behavior_logprobs=behavior)


def test_online_blames_the_model_for_a_nan_target_logprob():
    logits, labels, _ = _batch()
    behavior = torch.where(labels != -100, -1.0, 0.0)
    logits = logits.detach().clone()
    logits[1, 2] = float("nan")  # the logits that predict token 3 of row 1
    with pytest.raises(ValueError, match=r"the target log-prob at \[1, 3\] is NaN: the model") as info:
        pear_loss(labels, logits=logits, behavior_logprobs=behavior)
    assert "behavior_logprobs" not in str(info.value)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf, -0.5])
def test_static_weights_that_are_not_finite_and_non_negative_on_a_label_token_are_refused(bad):
    logits, labels, weights = _batch()
    weights[1, 4] = bad  # a label token of row 1
    with pytest.raises(ValueError, match=r"weights\[1, 4\] = .* on a label token"):
        pear_loss(labels, logits=logits, weights=weights)
    per_row = torch.ones(labels.shape[0])
    per_row[2] = bad  # one weight per row: the row's first label token is named
    with pytest.raises(ValueError, match=r"weights\[2, 3\]"):
        pear_loss(labels, logits=logits, weights=per_row)


def test_static_weights_off_the_labels_are_ignored_and_a_wrong_shape_is_refused():
    logits, labels, weights = _batch()
    clean = pear_loss(labels, logits=logits, weights=weights).loss
    weights[0, 1] = math.nan  # prompt
    weights[1, 8] = math.inf  # padding
    weights[2, 5] = -3.0  # a user turn inside the completion
    torch.testing.assert_close(pear_loss(labels, logits=logits, weights=weights).loss, clean, rtol=0, atol=0)
    with pytest.raises(ValueError, match="weights has shape"):
        pear_loss(labels, logits=logits, weights=weights[:, :-1])


def test_a_shared_boundary_of_the_wrong_shape_is_refused():
    logits, labels, _ = _batch()
    behavior = torch.where(labels != -100, -1.0, 0.0)
    shared = (labels != -100).to(torch.int8)
    assert torch.isfinite(pear_loss(labels, logits=logits, behavior_logprobs=behavior, shared_boundary=shared).loss)
    for wrong in (shared[:, :-1], shared[:2], shared[0]):
        with pytest.raises(ValueError, match="shared_boundary has shape"):
            pear_loss(labels, logits=logits, behavior_logprobs=behavior, shared_boundary=wrong)
    with pytest.raises(ValueError, match="only applies to online PEAR"):
        pear_loss(labels, logits=logits, weights=torch.ones(labels.shape), shared_boundary=shared)


def test_batch_normalization_replaces_dataset_normalization():
    lengths, mask, lt, lb = _scored_batch(seed=5)
    config = WeightConfig(normalize="dataset")
    w = pear_weights(torch.from_numpy(lt), torch.from_numpy(lb), torch.from_numpy(mask), config).weights
    assert math.isclose(float(w[torch.from_numpy(mask) == 1].double().mean()), 1.0, rel_tol=1e-6)
    raw = pear_weights(
        torch.from_numpy(lt),
        torch.from_numpy(lb),
        torch.from_numpy(mask),
        dataclasses.replace(config, normalize="none"),
    ).weights
    assert not torch.allclose(w, raw)


def test_loss_module_imports_only_torch():
    heavy = ("transformers", "trl", "datasets", "pyarrow", "pear_data.weights")
    code = f"import sys, pear_data.loss; bad = [m for m in {heavy!r} if m in sys.modules]; assert not bad, bad"
    subprocess.run([sys.executable, "-c", code], check=True)
