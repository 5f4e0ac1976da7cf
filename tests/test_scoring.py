"""Per-token log-probs: the sampling math (temperature, top-p) and the torch scoring backend.

Fast tests use tiny random-weight transformers models (Llama, Gemma3 with
final-logit softcapping, Granite) and small logits tensors; tests marked
`slow` score GSM8K rows with the embedded SmolLM2-135M-Instruct (float32, CPU)
through the session fixtures of conftest.py.

Tolerances against a naive float32 `model(ids).logits.log_softmax(-1)`:
torch's CPU log_softmax over SmolLM2's 49,152-token vocabulary is itself
~3e-5 away from a float64 log-softmax of the same logits (the scorer's
logsumexp is ~4e-6 away), and padding a row into a batch changes the matmul
shapes, which moves log-probs by up to ~4e-5 (measured). So the scorer must
agree with the naive reference to 1e-4 (log-probs go down to about -25), and
with a float64 log-softmax of the model's own logits to 1e-5 when it scores
rows one at a time.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach the network

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from pear_data.scoring import (  # noqa: E402
    SamplingParams,
    TorchScorer,
    default_batch_tokens,
    default_vocab_chunk_tokens,
    model_flops_per_token,
    plan_batches,
    policy_logprobs,
    resolve_device,
    scoring_flops,
    token_logprobs,
)
from pear_data.scoring.sampling import log_normalizer, nucleus  # noqa: E402

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "data"


# --------------------------------------------------------------------------- references


def numpy_sampling_logprobs(logits: np.ndarray, temperature: float, top_p: float) -> np.ndarray:
    """Direct float64 log q over the whole vocabulary, [C, V]: softmax(z / tau), nucleus by definition.

    Nucleus: in descending probability order, the smallest prefix whose mass is
    >= top_p (at least one token); -inf outside it, renormalized inside.
    """
    z = logits.astype(np.float64) / temperature
    logp = z - z.max(axis=-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(axis=-1, keepdims=True))
    if top_p >= 1.0:
        return logp
    out = np.full_like(logp, -np.inf)
    for c in range(logp.shape[0]):  # a reference, not the code under test: plain loops
        order = np.argsort(-logp[c], kind="stable")
        mass, kept = 0.0, []
        for v in order:
            kept.append(v)
            mass += math.exp(logp[c, v])
            if mass >= top_p:
                break
        kept_mass = math.log(sum(math.exp(logp[c, v]) for v in kept))
        out[c, kept] = logp[c, kept] - kept_mass
    return out


def hf_warped_logprobs(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """What transformers' generate() samples from: TemperatureLogitsWarper, then TopPLogitsWarper, then softmax."""
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopPLogitsWarper

    scores = logits
    if temperature != 1.0:
        scores = TemperatureLogitsWarper(temperature)(None, scores)
    if top_p < 1.0:
        scores = TopPLogitsWarper(top_p)(None, scores)
    return scores.log_softmax(dim=-1)


def every_token_logprob(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """token_logprobs for every (row, vocab id) pair: [C, V]."""
    num_rows, vocab = logits.shape
    repeated = logits.repeat_interleave(vocab, dim=0)
    tokens = torch.arange(vocab).repeat(num_rows)
    return token_logprobs(repeated, tokens, params).reshape(num_rows, vocab)


def peaked_logits(num_rows: int, vocab: int, seed: int, scale: float = 3.0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(num_rows, vocab, generator=generator) * scale


def naive_logprobs(model: Any, sequence: np.ndarray, mask: np.ndarray, float64: bool = False) -> np.ndarray:
    """The straightforward reference: one row, full logits, log_softmax, gather; 0.0 off the completion."""
    ids = torch.as_tensor(sequence, dtype=torch.long)[None]
    with torch.inference_mode():
        logits = model(input_ids=ids).logits[0].float()
        if float64:
            logits = logits.double()
        logp = logits.log_softmax(dim=-1)[:-1].gather(-1, ids[0, 1:, None])[:, 0]
    out = np.zeros(len(sequence), dtype=np.float64 if float64 else np.float32)
    out[1:] = logp.numpy()
    out[np.asarray(mask) == 0] = 0.0
    return out


# --------------------------------------------------------------------------- sampling math


def test_default_policy_equals_log_softmax() -> None:
    logits = peaked_logits(16, 300, seed=0)
    tokens = torch.randint(0, 300, (16,), generator=torch.Generator().manual_seed(1))
    ours = token_logprobs(logits, tokens, SamplingParams())
    reference = logits.double().log_softmax(-1).gather(-1, tokens[:, None])[:, 0]
    assert ours.dtype == torch.float32
    np.testing.assert_allclose(ours.numpy(), reference.numpy(), atol=2e-6, rtol=0)


@pytest.mark.parametrize("temperature", [0.3, 0.7, 1.5])
def test_temperature_matches_direct_softmax(temperature: float) -> None:
    logits = peaked_logits(8, 200, seed=2)
    ours = every_token_logprob(logits, SamplingParams(temperature=temperature))
    reference = numpy_sampling_logprobs(logits.numpy(), temperature, 1.0)
    np.testing.assert_allclose(ours.numpy(), reference, atol=1e-5, rtol=0)
    plain = every_token_logprob(logits, SamplingParams())
    assert (ours - plain).abs().max() > 0.1  # the temperature does change the distribution


@pytest.mark.parametrize("temperature", [1.0, 0.7, 1.3])
@pytest.mark.parametrize("top_p", [0.05, 0.5, 0.9, 0.95])
def test_top_p_matches_direct_definition_and_hf_warpers(temperature: float, top_p: float) -> None:
    logits = peaked_logits(12, 120, seed=3)  # continuous random logits: no ties
    params = SamplingParams(temperature, top_p)
    ours = every_token_logprob(logits, params).numpy()
    direct = numpy_sampling_logprobs(logits.numpy(), temperature, top_p)
    hf = hf_warped_logprobs(logits, temperature, top_p).numpy()
    for reference in (direct, hf):
        assert np.array_equal(np.isneginf(ours), np.isneginf(reference))  # the same nucleus
        finite = np.isfinite(reference)
        np.testing.assert_allclose(ours[finite], reference[finite], atol=1e-5, rtol=0)
    assert np.isneginf(ours).any()  # some tokens are outside the nucleus
    mass = np.exp(ours.astype(np.float64)).sum(axis=-1)
    np.testing.assert_allclose(mass, 1.0, atol=1e-5)  # renormalized over the nucleus


def test_token_outside_nucleus_is_minus_inf_and_inside_is_renormalized() -> None:
    # probabilities 0.5, 0.3, 0.15, 0.05 at T=1: top_p=0.75 keeps {0, 1} (0.5 < 0.75 <= 0.8)
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    logits = probs.log()
    got = every_token_logprob(logits, SamplingParams(top_p=0.75))[0]
    assert torch.isneginf(got[2]) and torch.isneginf(got[3])
    np.testing.assert_allclose(got[:2].exp().numpy(), [0.5 / 0.8, 0.3 / 0.8], rtol=1e-6)
    # top_p=0.85 needs the third token (0.8 < 0.85 <= 0.95); an exact boundary (0.8) is up to float rounding
    got = every_token_logprob(logits, SamplingParams(top_p=0.85))[0]
    assert torch.isfinite(got[:3]).all() and torch.isneginf(got[3])
    np.testing.assert_allclose(got[:3].exp().numpy(), [0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95], rtol=1e-6)


def test_top_p_one_is_plain_log_softmax() -> None:
    logits = peaked_logits(4, 50, seed=4)
    assert torch.equal(
        every_token_logprob(logits, SamplingParams(0.8, 1.0)),
        every_token_logprob(logits, SamplingParams(0.8)),
    )
    assert torch.isfinite(every_token_logprob(logits, SamplingParams(0.8, 1.0))).all()


def test_tiny_top_p_keeps_only_the_most_probable_token() -> None:
    logits = peaked_logits(6, 40, seed=5)
    got = every_token_logprob(logits, SamplingParams(top_p=1e-6))
    best = logits.argmax(-1)
    assert torch.equal(got.gather(-1, best[:, None])[:, 0], torch.zeros(6))
    assert torch.isneginf(got).sum() == 6 * 39


def test_top_p_keeps_every_token_tied_at_the_boundary() -> None:
    # probabilities 0.4, 0.2, 0.2, 0.2: top_p=0.5 ends inside the tied group; all three tied tokens are kept
    logits = torch.tensor([[0.4, 0.2, 0.2, 0.2]]).log()
    got = every_token_logprob(logits, SamplingParams(top_p=0.5))[0]
    assert torch.isfinite(got).all()
    np.testing.assert_allclose(got.exp().numpy(), [0.4, 0.2, 0.2, 0.2], rtol=1e-6)


def test_top_p_with_a_nucleus_larger_than_the_first_top_k() -> None:
    # a flat distribution over 5000 tokens: the 0.95 nucleus has ~4700 tokens, beyond the first topk rounds (64, 512)
    logits = peaked_logits(3, 5000, seed=6, scale=0.3)
    threshold, log_mass = nucleus(logits, log_normalizer(logits), 1.0, 0.95)
    reference = numpy_sampling_logprobs(logits.numpy(), 1.0, 0.95)
    sizes = np.isfinite(reference).sum(-1)
    assert (sizes > 512).all()
    np.testing.assert_array_equal((logits >= threshold[:, None]).sum(-1).numpy(), sizes)
    tokens = torch.tensor([0, 1, 2])
    ours = token_logprobs(logits, tokens, SamplingParams(top_p=0.95)).numpy()
    np.testing.assert_allclose(ours, reference[[0, 1, 2], [0, 1, 2]], atol=1e-5)


def test_sampling_params_reject_invalid_values() -> None:
    for bad in (0.0, -1.0, math.inf, math.nan):
        with pytest.raises(ValueError, match="temperature"):
            SamplingParams(temperature=bad)
    for bad in (0.0, 1.5, -0.1):
        with pytest.raises(ValueError, match="top-p"):
            SamplingParams(top_p=bad)


def test_token_logprobs_refuses_low_precision_logits() -> None:
    with pytest.raises(TypeError, match="float32"):
        token_logprobs(torch.zeros(2, 5, dtype=torch.bfloat16), torch.zeros(2, dtype=torch.long), SamplingParams())


MIXED_POLICIES = [
    SamplingParams(), SamplingParams(0.7), SamplingParams(0.7, 0.9), SamplingParams(1.3, 0.5),
    SamplingParams(2.5), SamplingParams(1.0, 0.95), SamplingParams(0.4, 0.3),
]


def per_policy_reference(logits: torch.Tensor, tokens: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The per-policy computation on raw logits: logsumexp and nucleus of its own, nothing shared."""
    log_z = log_normalizer(logits, params.temperature)
    chosen = logits.gather(-1, tokens[:, None])[:, 0]
    logp = chosen / params.temperature - log_z
    if params.top_p < 1.0:
        threshold, log_mass = nucleus(logits, log_z, params.temperature, params.top_p)
        logp = torch.where(chosen >= threshold, logp - log_mass, -math.inf)
    return logp


@pytest.mark.parametrize("strategy", ["exp", "power"])
def test_one_pass_over_the_chunk_matches_each_policy_alone(strategy: str) -> None:
    logits = peaked_logits(24, 700, seed=11)
    logits[:, :5] += 6.0  # a few likely tokens per row, as in a trained model; the 0.95 nucleus still grows past 64
    tokens = torch.randint(0, 700, (24,), generator=torch.Generator().manual_seed(12))
    tokens[:8] = logits[:8].argmax(-1)  # some chosen tokens inside every nucleus
    original = logits.clone()
    together = policy_logprobs(logits, tokens, MIXED_POLICIES, strategy=strategy)
    assert torch.equal(logits, original)  # not overwritten unless asked
    for params, got in zip(MIXED_POLICIES, together):
        alone = policy_logprobs(logits, tokens, [params], strategy=strategy)[0]
        assert torch.equal(got, alone)  # a policy's bits do not depend on the other policies of the call
        reference = per_policy_reference(logits, tokens, params)
        direct = numpy_sampling_logprobs(logits.numpy(), params.temperature, params.top_p)
        direct = direct[np.arange(24), tokens.numpy()]
        for expected in (reference.numpy(), direct):
            assert np.array_equal(np.isneginf(got.numpy()), np.isneginf(expected))  # the same nucleus
            finite = np.isfinite(expected)
            np.testing.assert_allclose(got.numpy()[finite], expected[finite], atol=2e-6, rtol=0)
    assert any(torch.isneginf(g).any() for g in together) and all(torch.isfinite(g[:8]).all() for g in together)


def test_strategies_agree_and_are_bit_identical_at_temperature_one() -> None:
    logits = peaked_logits(16, 5000, seed=13)
    tokens = torch.randint(0, 5000, (16,), generator=torch.Generator().manual_seed(14))
    exp_values = policy_logprobs(logits, tokens, MIXED_POLICIES, strategy="exp")
    power_values = policy_logprobs(logits, tokens, MIXED_POLICIES, strategy="power")
    assert torch.equal(exp_values[0], power_values[0]) and torch.equal(exp_values[5], power_values[5])
    for a, b in zip(exp_values, power_values):
        assert torch.equal(torch.isneginf(a), torch.isneginf(b))
        finite = torch.isfinite(a)
        np.testing.assert_allclose(a[finite].numpy(), b[finite].numpy(), atol=2e-6, rtol=0)
    assert policy_logprobs(logits, tokens, [SamplingParams()], strategy="auto")[0].equal(exp_values[0])  # CPU: exp


def test_overwrite_and_scratch_give_the_same_bits() -> None:
    logits = peaked_logits(10, 300, seed=15)
    tokens = torch.randint(0, 300, (10,), generator=torch.Generator().manual_seed(16))
    expected = policy_logprobs(logits, tokens, MIXED_POLICIES)
    scratch = torch.full((4000,), math.nan)  # larger than needed, any contents
    consumed = logits.clone()
    got = policy_logprobs(consumed, tokens, MIXED_POLICIES, overwrite=True, scratch=scratch)
    assert all(torch.equal(a, b) for a, b in zip(expected, got))
    assert torch.equal(consumed, logits - logits.amax(-1, keepdim=True))  # overwrite: the row max was subtracted
    with pytest.raises(ValueError, match="scratch must be float32"):
        policy_logprobs(logits, tokens, MIXED_POLICIES, scratch=torch.empty(10))
    with pytest.raises(ValueError, match="strategy must be one of"):
        policy_logprobs(logits, tokens, MIXED_POLICIES, strategy="fast")


def test_shared_first_top_k_gives_the_same_nucleus() -> None:
    logits = peaked_logits(8, 3000, seed=17, scale=0.5)  # flat: nuclei beyond the first top-k round
    log_z = log_normalizer(logits, 0.8)
    first_top = logits.topk(64, dim=-1, sorted=True).values
    own = nucleus(logits, log_z, 0.8, 0.9)
    shared = nucleus(logits, log_z, 0.8, 0.9, first_top=first_top)
    assert torch.equal(own[0], shared[0]) and torch.equal(own[1], shared[1])
    assert ((logits >= own[0][:, None]).sum(-1) > 64).all()


# --------------------------------------------------------------------------- batch planning


def test_plan_batches_respects_budget_and_covers_every_row() -> None:
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 400, size=500).tolist() + [5000]  # one row longer than the budget
    batches = plan_batches(lengths, batch_tokens=1024)
    seen = np.sort(np.concatenate(batches))
    np.testing.assert_array_equal(seen, np.arange(len(lengths)))
    for batch in batches:
        padded = len(batch) * max(lengths[i] for i in batch)
        assert padded <= 1024 or len(batch) == 1
        assert padded <= 1.1 * sum(lengths[i] for i in batch) or len(batch) == 1
    assert [len(b) for b in batches if 500 in b.tolist()] == [1]  # the long row goes alone
    assert max(len(b) for b in batches) > 5  # short rows do share batches


def test_plan_batches_is_longest_first_and_stable() -> None:
    batches = plan_batches([3, 7, 7, 2, 7], batch_tokens=100)
    assert batches[0].tolist() == [1, 2, 4]  # equal lengths keep input order
    assert np.concatenate(batches).tolist() == [1, 2, 4, 0, 3]


# --------------------------------------------------------------------------- tiny models


@pytest.fixture(scope="module")
def tiny_llama() -> Any:
    config = transformers.LlamaConfig(
        vocab_size=300,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(40.0)  # peaked next-token distributions, like a trained model
    return model


def random_rows(count: int, vocab: int, seed: int, min_len: int = 2, max_len: int = 60) -> tuple[list, list]:
    rng = np.random.default_rng(seed)
    sequences, masks = [], []
    for _ in range(count):
        n = int(rng.integers(min_len, max_len))
        sequences.append(rng.integers(0, vocab, size=n).astype(np.int32))
        mask = np.zeros(n, dtype=np.int8)
        mask[int(rng.integers(1, n)) :] = 1  # a prompt, then the completion
        if n > 8:
            mask[n // 2 : n // 2 + 2] = 0  # a user turn inside the completion
        masks.append(mask)
    return sequences, masks


def test_tiny_llama_matches_full_softmax_with_padding(tiny_llama: Any) -> None:
    sequences, masks = random_rows(12, 300, seed=1)
    scorer = TorchScorer(tiny_llama, batch_tokens=4096, max_padding=math.inf)  # one batch, rows 2..60 tokens
    (ours,) = scorer.score(sequences, masks, [SamplingParams()])
    for sequence, mask, got in zip(sequences, masks, ours):
        assert got.dtype == np.float32 and got.shape == sequence.shape
        np.testing.assert_allclose(got, naive_logprobs(tiny_llama, sequence, mask), atol=2e-5, rtol=0)
        assert np.all(got[mask == 0] == 0.0) and got[0] == 0.0
        assert np.all(got[1:][mask[1:] == 1] < 0.0)


def test_results_are_in_input_order(tiny_llama: Any) -> None:
    sequences, masks = random_rows(10, 300, seed=2)
    scorer = TorchScorer(tiny_llama)
    (forward,) = scorer.score(sequences, masks, [SamplingParams()])
    (backward,) = scorer.score(sequences[::-1], masks[::-1], [SamplingParams()])
    for a, b in zip(forward, backward[::-1]):
        np.testing.assert_allclose(a, b, atol=2e-5, rtol=0)


def test_tiny_budget_gives_many_batches_and_the_same_numbers(tiny_llama: Any) -> None:
    sequences, masks = random_rows(9, 300, seed=3)
    calls: list[tuple[int, int]] = []
    small = TorchScorer(tiny_llama, batch_tokens=60, vocab_chunk_tokens=7, progress=lambda r, t: calls.append((r, t)))
    big = TorchScorer(tiny_llama, batch_tokens=100_000)
    (few,) = small.score(sequences, masks, [SamplingParams()])
    (one,) = big.score(sequences, masks, [SamplingParams()])
    assert len(calls) >= 5
    for a, b in zip(few, one):
        np.testing.assert_allclose(a, b, atol=2e-5, rtol=0)


def test_progress_reports_cumulative_rows_and_real_tokens(tiny_llama: Any) -> None:
    sequences, masks = random_rows(7, 300, seed=4)
    calls: list[tuple[int, int]] = []
    TorchScorer(tiny_llama, batch_tokens=80, progress=lambda r, t: calls.append((r, t))).score(
        sequences, masks, [SamplingParams()]
    )
    assert calls[-1] == (7, sum(len(s) for s in sequences))
    assert all(a[0] < b[0] and a[1] < b[1] for a, b in zip(calls, calls[1:]))


def test_several_policies_in_one_call_equal_separate_calls(tiny_llama: Any) -> None:
    sequences, masks = random_rows(6, 300, seed=5)
    policies = [SamplingParams(), SamplingParams(0.7), SamplingParams(0.7, 0.9), SamplingParams(1.2, 0.5)]
    scorer = TorchScorer(tiny_llama)
    together = scorer.score(sequences, masks, policies)
    for params, got in zip(policies, together):
        (alone,) = scorer.score(sequences, masks, [params])
        for a, b in zip(got, alone):
            np.testing.assert_array_equal(a, b)
    assert any(np.isneginf(row).any() for row in together[3])  # top_p=0.5 leaves some tokens out
    assert not any(np.isneginf(row).any() for row in together[1])


def test_behavior_policy_matches_warped_full_softmax(tiny_llama: Any) -> None:
    sequences, masks = random_rows(5, 300, seed=6)
    (got,) = TorchScorer(tiny_llama).score(sequences, masks, [SamplingParams(0.7, 0.8)])
    for sequence, mask, row in zip(sequences, masks, got):
        ids = torch.as_tensor(sequence, dtype=torch.long)
        with torch.inference_mode():
            logits = tiny_llama(input_ids=ids[None]).logits[0, :-1]
        reference = hf_warped_logprobs(logits, 0.7, 0.8).gather(-1, ids[1:, None])[:, 0].numpy()
        scored = mask[1:] == 1
        expected, actual = reference[scored], row[1:][scored]
        assert np.array_equal(np.isneginf(actual), np.isneginf(expected))
        np.testing.assert_allclose(actual[np.isfinite(expected)], expected[np.isfinite(expected)], atol=2e-5)


def test_scoring_is_deterministic(tiny_llama: Any) -> None:
    sequences, masks = random_rows(8, 300, seed=7)
    scorer = TorchScorer(tiny_llama)
    first = scorer.score(sequences, masks, [SamplingParams(), SamplingParams(0.6, 0.9)])
    second = scorer.score(sequences, masks, [SamplingParams(), SamplingParams(0.6, 0.9)])
    for a_rows, b_rows in zip(first, second):
        for a, b in zip(a_rows, b_rows):
            assert a.tobytes() == b.tobytes()


def test_empty_short_and_prompt_only_rows(tiny_llama: Any) -> None:
    sequences = [
        np.zeros(0, np.int32),
        np.array([5], np.int32),
        np.array([5, 6, 7], np.int32),
        np.array([1, 2], np.int32),
    ]
    masks = [np.zeros(0, np.int8), np.array([1], np.int8), np.zeros(3, np.int8), np.array([0, 1], np.int8)]
    (got,) = TorchScorer(tiny_llama).score(sequences, masks, [SamplingParams()])
    assert [len(g) for g in got] == [0, 1, 3, 2]
    assert got[1][0] == 0.0 and np.all(got[2] == 0.0)  # position 0 has no context; no completion tokens
    assert got[3][0] == 0.0 and got[3][1] < 0.0
    assert TorchScorer(tiny_llama).score([], [], [SamplingParams(), SamplingParams(0.5)]) == [[], []]


def test_a_scorer_told_to_stop_stops_before_its_next_batch(tiny_llama: Any) -> None:
    import threading

    from pear_data.scoring import ScoringStopped

    stop = threading.Event()
    batches = []

    def progress(rows: int, tokens: int) -> None:  # called after each batch: stop after the first
        batches.append(rows)
        stop.set()

    scorer = TorchScorer(tiny_llama, batch_tokens=8, progress=progress, stop=stop)
    sequences = [np.arange(1, 7, dtype=np.int32)] * 5  # one row per batch
    with pytest.raises(ScoringStopped):
        scorer.score(sequences, [np.array([0, 0, 1, 1, 1, 1], np.int8)] * 5, [SamplingParams()])
    assert batches == [1]


def test_bad_inputs_raise_actionable_errors(tiny_llama: Any) -> None:
    scorer = TorchScorer(tiny_llama)
    with pytest.raises(ValueError, match="the model: token id 300 is outside the model.s vocabulary"):
        scorer.score([np.array([1, 2]), np.array([1, 300])], [np.array([0, 1])] * 2, [SamplingParams()])
    with pytest.raises(ValueError, match="row 0: completion_mask has shape"):
        scorer.score([np.array([1, 2, 3])], [np.array([0, 1])], [SamplingParams()])
    with pytest.raises(ValueError, match="policies is empty"):
        scorer.score([np.array([1, 2])], [np.array([0, 1])], [])
    with pytest.raises(ValueError, match="batch_tokens"):
        TorchScorer(tiny_llama, batch_tokens=0)
    with pytest.raises(ValueError, match="unknown device"):
        TorchScorer(tiny_llama, device="tpu:banana")


def test_resolve_device() -> None:
    assert resolve_device("cpu") == "cpu"
    assert resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device"):
            resolve_device("cuda")


def test_model_flops_per_token_counts_decoder_without_embeddings(tiny_llama: Any) -> None:
    h, i, layers, kv = 64, 128, 2, 2 * (64 // 4)  # kv heads x head dim
    per_layer = h * h + 2 * h * kv + h * h + 3 * h * i + 2 * h  # q, k, v, o, gate/up/down, two norms
    assert model_flops_per_token(tiny_llama) == 2 * (layers * per_layer + h)  # + final norm


def test_scoring_flops_by_hand(tiny_llama: Any) -> None:
    counts = scoring_flops(tiny_llama)
    h, i, layers, vocab, kv = 64, 128, 2, 300, 2 * (64 // 4)
    per_layer = h * h + 2 * h * kv + h * h + 3 * h * i + 2 * h
    assert counts.dense_per_token == 2 * (layers * per_layer + h) == model_flops_per_token(tiny_llama)
    assert counts.head_per_scored_token == 2 * h * vocab  # the lm_head, only where a token is scored
    assert counts.attention_per_token_per_position == 4 * layers * 4 * 16  # 4 x layers x heads x head_dim
    # a row of 10 tokens with 7 scored, and one of 4 with 0: dense on every token, head on 7, causal attention n^2 / 2
    expected = 14 * counts.dense_per_token + 7 * 2 * 64 * 300 + 4 * 2 * 64 * (10 * 10 + 4 * 4) / 2
    assert counts.total([10, 4], [7, 0]) == expected
    assert counts.row(10, 7) + counts.row(4, 0) == expected


def test_default_budgets_by_device(tiny_llama: Any) -> None:
    assert (default_batch_tokens("cpu"), default_vocab_chunk_tokens("cpu")) == (8192, 256)
    scorer = TorchScorer(tiny_llama)
    assert (scorer.batch_tokens, scorer.vocab_chunk_tokens) == (8192, 256)
    assert scorer.describe() == {
        "backend": "torch", "device": "cpu", "dtype": "float32", "batch_tokens": 8192, "vocab_chunk_tokens": 256,
        "logprob_strategy": "exp", "head_logits": "head output cast to float32", "fused_head": False,
    }
    json.dumps(scorer.describe())
    if torch.cuda.is_available():
        assert (default_batch_tokens("cuda"), default_vocab_chunk_tokens("cuda")) == (32768, 1024)


def test_scorer_strategies_agree(tiny_llama: Any) -> None:
    sequences, masks = random_rows(6, 300, seed=9)
    policies = [SamplingParams(), SamplingParams(0.7, 0.9)]
    exp_rows = TorchScorer(tiny_llama, logprob_strategy="exp").score(sequences, masks, policies)
    power_rows = TorchScorer(tiny_llama, logprob_strategy="power").score(sequences, masks, policies)
    for a_rows, b_rows in zip(exp_rows, power_rows):
        for a, b in zip(a_rows, b_rows):
            assert np.array_equal(np.isneginf(a), np.isneginf(b))
            np.testing.assert_allclose(a[np.isfinite(a)], b[np.isfinite(b)], atol=2e-6, rtol=0)
    with pytest.raises(ValueError, match="logprob_strategy"):
        TorchScorer(tiny_llama, logprob_strategy="fast")


def test_fused_head_needs_cuda_and_liger(tiny_llama: Any) -> None:
    if torch.cuda.is_available():
        pytest.skip("this checks the refusal on a CPU-only machine")
    with pytest.raises(ValueError, match="fused_head needs a CUDA device"):
        TorchScorer(tiny_llama, fused_head=True)


def test_float32_output_head_falls_back_where_torch_lacks_it(tiny_llama: Any) -> None:
    # The CUDA path multiplies a bf16 head with float32 output; CPU torch has no such kernel, which must fall back.
    model = transformers.LlamaForCausalLM(tiny_llama.config).eval()
    model.load_state_dict(tiny_llama.state_dict())
    model = model.to(torch.bfloat16)
    sequences, masks = random_rows(4, 300, seed=10)
    (plain,) = TorchScorer(model).score(sequences, masks, [SamplingParams()])
    forced = TorchScorer(model)
    forced._fp32_out_mm = True
    (got,) = forced.score(sequences, masks, [SamplingParams()])
    assert forced._fp32_out_mm is False
    for a, b in zip(plain, got):
        assert a.tobytes() == b.tobytes()


def test_gemma3_final_logit_softcapping_is_applied() -> None:
    config = transformers.Gemma3TextConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=16,
        max_position_embeddings=256,
        sliding_window=8,
        final_logit_softcapping=5.0,
    )
    torch.manual_seed(0)
    model = transformers.Gemma3ForCausalLM(config).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(50.0)  # logits well beyond the cap, so capping matters
    sequences, masks = random_rows(5, 256, seed=8, min_len=10, max_len=40)  # longer than the sliding window
    scorer = TorchScorer(model)
    assert scorer.final_logit_softcapping == 5.0
    (got,) = scorer.score(sequences, masks, [SamplingParams()])
    uncapped_gap = 0.0
    for sequence, mask, row in zip(sequences, masks, got):
        np.testing.assert_allclose(row, naive_logprobs(model, sequence, mask), atol=2e-5, rtol=0)
        ids = torch.as_tensor(sequence, dtype=torch.long)[None]
        with torch.inference_mode():
            raw = model.lm_head(model.model(input_ids=ids).last_hidden_state)[0, :-1].float()
        uncapped = raw.log_softmax(-1).gather(-1, ids[0, 1:, None])[:, 0].numpy()
        uncapped_gap = max(uncapped_gap, float(np.abs(uncapped - row[1:])[mask[1:] == 1].max()))
    assert uncapped_gap > 0.5  # without the cap the log-probs would be far off


def test_model_that_scales_logits_otherwise_is_refused() -> None:
    # Granite divides its logits by `logits_scaling` after the lm_head; the scorer does not mirror that
    config = transformers.GraniteConfig(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        logits_scaling=4.0,
    )
    torch.manual_seed(0)
    model = transformers.GraniteForCausalLM(config).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(30.0)
    with pytest.raises(ValueError, match="does not mirror"):
        TorchScorer(model)


# --------------------------------------------------------------------------- the embedded SmolLM2


def gsm8k_rows(tokenizer: Any, count: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """GSM8K question (user) + answer (assistant) with the chat template; mask = the assistant turn onwards."""
    rows = [json.loads(line) for line in (EXAMPLES / "gsm8k_sample.jsonl").read_text().splitlines()[:count]]
    sequences, masks = [], []
    for row in rows:
        user = [{"role": "user", "content": row["question"]}]
        prompt = tokenizer.apply_chat_template(user, add_generation_prompt=True, tokenize=False)
        full = tokenizer.apply_chat_template(user + [{"role": "assistant", "content": row["answer"]}], tokenize=False)
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        ids = tokenizer(full, add_special_tokens=False)["input_ids"]
        assert ids[: len(prompt_ids)] == prompt_ids
        mask = np.zeros(len(ids), dtype=np.int8)
        mask[len(prompt_ids) :] = 1
        sequences.append(np.asarray(ids, dtype=np.int32))
        masks.append(mask)
    return sequences, masks


@pytest.fixture(scope="module")
def smollm2_rows(smollm2_tokenizer: Any) -> tuple[list[np.ndarray], list[np.ndarray]]:
    sequences, masks = gsm8k_rows(smollm2_tokenizer, 6)
    assert len({len(s) for s in sequences}) >= 5  # different lengths (132 to 265 tokens): padding is exercised
    assert [len(s) for s in sequences] != sorted(len(s) for s in sequences)  # not already in length order
    return sequences, masks


@pytest.mark.slow
def test_smollm2_matches_full_softmax_forward_in_one_padded_batch(smollm2_model: Any, smollm2_rows: Any) -> None:
    sequences, masks = smollm2_rows
    calls: list[tuple[int, int]] = []
    scorer = TorchScorer(
        smollm2_model, batch_tokens=8192, max_padding=math.inf, progress=lambda r, t: calls.append((r, t))
    )
    (got,) = scorer.score(sequences, masks, [SamplingParams()])
    assert calls == [(6, sum(len(s) for s in sequences))]  # one batch, padded to the longest row
    worst = 0.0
    for sequence, mask, row in zip(sequences, masks, got):
        reference = naive_logprobs(smollm2_model, sequence, mask)
        worst = max(worst, float(np.abs(row - reference).max()))
        assert np.all(row[mask == 0] == 0.0) and row[0] == 0.0  # prompt positions exactly 0.0
        assert np.all(row[mask == 1] < 0.0)
    assert worst < 1e-4, worst


@pytest.mark.slow
def test_smollm2_one_by_one_matches_float64_log_softmax(smollm2_model: Any, smollm2_rows: Any) -> None:
    sequences, masks = smollm2_rows
    (got,) = TorchScorer(smollm2_model, batch_tokens=1).score(sequences[:2], masks[:2], [SamplingParams()])
    for sequence, mask, row in zip(sequences, masks, got):
        reference = naive_logprobs(smollm2_model, sequence, mask, float64=True)
        np.testing.assert_allclose(row, reference, atol=1e-5, rtol=0)


@pytest.mark.slow
def test_smollm2_target_and_behavior_in_one_call(smollm2_model: Any, smollm2_rows: Any) -> None:
    sequences, masks = smollm2_rows[0][:3], smollm2_rows[1][:3]
    behavior = SamplingParams(temperature=0.7, top_p=0.9)
    target, warped = TorchScorer(smollm2_model, batch_tokens=256).score(sequences, masks, [SamplingParams(), behavior])
    for sequence, mask, row in zip(sequences, masks, warped):
        ids = torch.as_tensor(sequence, dtype=torch.long)
        with torch.inference_mode():
            logits = smollm2_model(input_ids=ids[None]).logits[0, :-1].float()
        reference = hf_warped_logprobs(logits, 0.7, 0.9).gather(-1, ids[1:, None])[:, 0].numpy()
        scored = mask[1:] == 1
        expected, actual = reference[scored], row[1:][scored]
        assert np.array_equal(np.isneginf(actual), np.isneginf(expected))
        finite = np.isfinite(expected)
        np.testing.assert_allclose(actual[finite], expected[finite], atol=1e-4, rtol=0)
    assert any(np.isneginf(row).any() for row in warped)  # GSM8K answers hold tokens outside the 0.9 nucleus
    # sharpening raises the log-prob of tokens the model already likes
    flat_target = np.concatenate([r[m == 1] for r, m in zip(target, masks)])
    flat_behavior = np.concatenate([r[m == 1] for r, m in zip(warped, masks)])
    likely = flat_target > math.log(0.9)
    assert np.all(flat_behavior[likely] >= flat_target[likely])


@pytest.mark.slow
def test_smollm2_flops_per_token(smollm2_model: Any) -> None:
    total = sum(p.numel() for p in smollm2_model.parameters())  # tied lm_head counted once
    embedding = smollm2_model.get_input_embeddings().weight.numel()
    assert model_flops_per_token(smollm2_model) == 2 * (total - embedding) == 212_406_912


@pytest.mark.slow
def test_gemma3_270m_matches_float64_reference_past_the_sliding_window(gemma_model: Any, gemma_tokenizer: Any) -> None:
    # Gemma-3-270M: 262,144-token vocabulary, sliding-window layers (512); a 600+ token row padded next to a short one
    text = (EXAMPLES / "gsm8k_sample.jsonl").read_text()
    long_ids = gemma_tokenizer(text[:4000])["input_ids"][:640]
    short_ids = gemma_tokenizer("Natalia sold clips to 48 of her friends in April.")["input_ids"]
    assert len(long_ids) > gemma_model.config.get_text_config().sliding_window
    sequences = [np.asarray(short_ids, np.int32), np.asarray(long_ids, np.int32)]
    masks = [np.r_[np.zeros(3, np.int8), np.ones(len(s) - 3, np.int8)] for s in sequences]
    (got,) = TorchScorer(gemma_model, max_padding=math.inf).score(sequences, masks, [SamplingParams()])
    for sequence, mask, row in zip(sequences, masks, got):
        reference = naive_logprobs(gemma_model, sequence, mask, float64=True)
        np.testing.assert_allclose(row, reference, atol=1e-4, rtol=0)
