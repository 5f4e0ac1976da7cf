"""The experimental vLLM backend without vLLM: its output conversions, its requests and its checks.

vLLM is not installed here. The conversions are fed vLLM's output objects as vLLM builds them, and
`VllmScorer` runs on a stand-in `vllm` module of a given version (tests/fake_vllm.py): each stand-in copies
the shapes, indexing rules and refusals of that version's source, and the tests name the vLLM file a
behaviour comes from.
"""

from __future__ import annotations

import importlib.util
import math
import sys

import numpy as np
import pytest
import torch

from pear_data.scoring import SamplingParams, vllm_backend
from pear_data.scoring.vllm_backend import VllmScorer, prompt_logprobs_to_arrays

from . import fake_vllm
from .fake_vllm import FlatLogprobs, Logprob, make_vllm, prompt_logprobs


def entries_for(sequence: list[int], logprobs: list[float]) -> list[dict | None]:
    """prompt_logprobs=0 output in the list format: None at 0, then {token_i: Logprob(logprob_i, rank)}."""
    return prompt_logprobs(sequence, logprobs, flat=False)


def test_position_zero_and_prompt_positions_are_zero_and_completion_is_filled() -> None:
    sequence = np.array([5, 6, 7, 8, 9], np.int32)
    mask = np.array([1, 0, 1, 1, 0], np.int8)  # position 0 is never scored, even under the mask
    (got,) = prompt_logprobs_to_arrays([entries_for(sequence.tolist(), [-1.0, -2.0, -0.5, -3.0])], [sequence], [mask])
    assert got.dtype == np.float32 and got.shape == (5,)
    np.testing.assert_array_equal(got, np.array([0.0, 0.0, -2.0, -0.5, 0.0], np.float32))


def test_the_chosen_token_is_taken_even_when_it_is_not_the_top_token() -> None:
    sequence = np.array([1, 2, 3], np.int32)
    entries = [None, {2: Logprob(-0.25, rank=1)},
               {40: Logprob(-0.1, rank=1), 3: Logprob(-3.5, rank=7)}]  # top-1 first, the prompt token added after
    (got,) = prompt_logprobs_to_arrays([entries], [sequence], [np.array([0, 1, 1])])
    np.testing.assert_array_equal(got, np.array([0.0, -0.25, -3.5], np.float32))


def test_plain_float_values_are_accepted() -> None:
    sequence = np.array([10, 11, 12], np.int64)
    (got,) = prompt_logprobs_to_arrays([[None, {11: -1.5}, {12: Logprob(-2.5)}]], [sequence],
                                       [np.array([0, 1, 1], bool)])
    np.testing.assert_array_equal(got, np.array([0.0, -1.5, -2.5], np.float32))


def test_the_flat_format_is_indexed_with_python_ints() -> None:
    """vLLM's FlatLogprobs (vllm/logprobs.py) takes an int or a slice and raises TypeError on a numpy integer;
    the conversion reads it with Python ints, in both formats."""
    flat = prompt_logprobs([10, 11, 12, 13], [-1.5, -2.5, -0.5], flat=True)
    with pytest.raises(TypeError, match="Invalid index type"):
        flat[np.int64(1)]
    assert isinstance(flat, FlatLogprobs) and len(flat) == 4 and flat[0] == {}
    sequence, mask = np.array([10, 11, 12, 13], np.int64), np.array([0, 1, 0, 1], np.int8)
    (got,) = prompt_logprobs_to_arrays([flat], [sequence], [mask])
    np.testing.assert_array_equal(got, np.array([0.0, -1.5, 0.0, -0.5], np.float32))


def test_a_missing_chosen_token_is_a_clear_error() -> None:
    sequence = np.array([1, 2, 3], np.int32)
    entries = [None, {2: Logprob(-0.25)}, {40: Logprob(-0.1, rank=1)}]
    with pytest.raises(ValueError, match=r"row 0, position 2: .*only token ids \[40\].*own token 3"):
        prompt_logprobs_to_arrays([entries], [sequence], [np.array([0, 1, 1])])
    with pytest.raises(ValueError, match=r"row 0, position 1: .*no entry"):
        prompt_logprobs_to_arrays([[None, None, {3: Logprob(-1.0)}]], [sequence], [np.array([0, 1, 1])])
    with pytest.raises(ValueError, match="row 0: vLLM returned no prompt_logprobs"):
        prompt_logprobs_to_arrays([None], [sequence], [np.array([0, 1, 1])])
    with pytest.raises(ValueError, match="row 0: 2 prompt log-prob entries for 3 tokens"):
        prompt_logprobs_to_arrays([[None, {2: Logprob(-1.0)}]], [sequence], [np.array([0, 1, 1])])


def test_minus_inf_passes_through_and_nan_or_positive_values_are_refused() -> None:
    sequence = np.array([1, 2, 3, 4], np.int32)
    mask = np.array([0, 1, 1, 1])
    (got,) = prompt_logprobs_to_arrays([entries_for([1, 2, 3, 4], [-math.inf, -1.0, 1e-7])], [sequence], [mask])
    assert np.isneginf(got[1]) and got[2] == -1.0 and got[3] == 0.0  # a rounding error above 0 becomes 0.0
    for bad in (math.nan, 0.5):
        with pytest.raises(ValueError, match=r"row 0, position 2: vLLM returned log-prob"):
            prompt_logprobs_to_arrays([entries_for([1, 2, 3, 4], [-1.0, bad, -1.0])], [sequence], [mask])


def test_rows_keep_their_order_and_rows_without_completion_need_no_output() -> None:
    sequences = [np.array([7, 8, 9], np.int32), np.array([3], np.int32), np.array([4, 5], np.int32),
                 np.zeros(0, np.int32), np.array([1, 2, 3, 4], np.int32)]
    masks = [np.array([0, 1, 1]), np.array([1]), np.array([0, 0]), np.zeros(0), np.array([0, 0, 1, 1])]
    per_row = [entries_for([7, 8, 9], [-1.0, -2.0]), None, None, None, entries_for([1, 2, 3, 4], [-3.0, -4.0, -5.0])]
    got = prompt_logprobs_to_arrays(per_row, sequences, masks)
    assert [g.tolist() for g in got] == [[0.0, -1.0, -2.0], [0.0], [0.0, 0.0], [], [0.0, 0.0, -4.0, -5.0]]
    with pytest.raises(ValueError, match="2 prompt_logprobs for 5 sequences"):
        prompt_logprobs_to_arrays(per_row[:2], sequences, masks)


# --------------------------------------------------------------------------- VllmScorer on a stand-in vLLM


def install_vllm(monkeypatch: pytest.MonkeyPatch, version: str):
    """Put a stand-in vllm module of that version (tests/fake_vllm.py) where `import vllm` finds it."""
    module = make_vllm(version)
    monkeypatch.setitem(sys.modules, "vllm", module)
    monkeypatch.setitem(sys.modules, "vllm.exceptions", module.exceptions)
    return module


@pytest.fixture
def vllm(monkeypatch: pytest.MonkeyPatch):
    return install_vllm(monkeypatch, "0.34.0")


def scoring_engine(vllm, **engine_kwargs):
    """A stand-in engine built as VllmScorer builds its own (`engine_settings`: float32 head, no prefix cache)."""
    return vllm.LLM("m", **vllm_backend.engine_settings(engine_kwargs))


def expected_logprobs(sequence, mask) -> list[float]:
    """What the stand-in model gives at the completion positions (>= 1), 0.0 elsewhere."""
    return [fake_vllm.logprob(i, int(t)) if i and m else 0.0 for i, (t, m) in enumerate(zip(sequence, mask))]


def test_scorer_sends_token_ids_of_rows_with_completion_and_returns_input_order(vllm) -> None:
    engine = scoring_engine(vllm)
    sequences = [np.array([1, 2, 3], np.int32), np.array([9, 8], np.int32), np.array([4, 5, 6, 7], np.int32)]
    masks = [np.array([0, 1, 1], np.int8), np.array([0, 0], np.int8), np.array([0, 0, 1, 0], np.int8)]
    target, again = VllmScorer("some/model", llm=engine).score(sequences, masks, [SamplingParams(), SamplingParams()])
    assert len(engine.calls) == 1
    prompts, params = engine.calls[0]
    # row 1 has nothing to score
    assert prompts == [{"prompt_token_ids": [1, 2, 3]}, {"prompt_token_ids": [4, 5, 6, 7]}]
    assert all(type(t) is int for p in prompts for t in p["prompt_token_ids"])
    assert all(p.max_tokens == 1 and p.temperature == 1.0 and not p.detokenize for p in params)
    for got in (target, again):
        for row, sequence, mask in zip(got, sequences, masks):
            np.testing.assert_allclose(row, expected_logprobs(sequence, mask), rtol=1e-6)
            assert row.dtype == np.float32
    assert target[0] is not again[0]  # one array per policy


def test_outputs_for_other_token_ids_are_a_clear_error(vllm) -> None:
    """Each output's prompt_token_ids (vllm/outputs.py RequestOutput) must be the ids sent for its row."""
    class Shuffled(vllm.LLM):
        def generate(self, prompts, sampling_params, *, use_tqdm=True):
            return super().generate(prompts, sampling_params, use_tqdm=use_tqdm)[::-1]

    rows, masks = [np.array([1, 2, 3], np.int32), np.array([1, 2, 4], np.int32)], [np.array([0, 1, 1])] * 2
    scorer = VllmScorer("m", llm=Shuffled("m", hf_overrides={"head_dtype": "float32"}))
    with pytest.raises(ValueError, match=r"row 0: vLLM's prompt_token_ids are not the 3 ids sent .* position 2"):
        scorer.score(rows, masks, [SamplingParams()])


def test_scorer_refuses_tempered_or_nucleus_policies_and_points_to_torch(vllm) -> None:
    scorer = VllmScorer("some/model", llm=scoring_engine(vllm))
    rows, masks = [np.array([1, 2], np.int32)], [np.array([0, 1], np.int8)]
    for policy in (SamplingParams(temperature=0.7), SamplingParams(top_p=0.9)):
        with pytest.raises(ValueError, match=r"raw model distribution.*--backend torch"):
            scorer.score(rows, masks, [SamplingParams(), policy])
    with pytest.raises(ValueError, match="policies is empty"):
        scorer.score(rows, masks, [])
    with pytest.raises(ValueError, match="row 0: completion_mask has shape"):
        scorer.score(rows, [np.array([1])], [SamplingParams()])


def test_scorer_checks_the_vocabulary_and_reports_progress(vllm) -> None:
    calls: list[tuple[int, int]] = []
    scorer = VllmScorer("m", llm=scoring_engine(vllm), vocab_size=10, progress=lambda r, t: calls.append((r, t)))
    with pytest.raises(ValueError, match=r"row 1: token id 10 is outside the model's vocabulary \[0, 10\)"):
        scorer.score([np.array([1, 2], np.int32), np.array([3, 10], np.int32)], [np.array([0, 1])] * 2,
                     [SamplingParams()])
    scorer.score([np.array([1, 2], np.int32), np.array([3, 4, 5], np.int32)], [np.array([0, 1]), np.array([0, 0, 1])],
                 [SamplingParams()])
    assert calls == [(2, 5)]


def test_no_engine_call_when_nothing_is_scored(vllm) -> None:
    engine = scoring_engine(vllm)
    (got,) = VllmScorer("m", llm=engine).score([np.array([5], np.int32)], [np.array([1], np.int8)], [SamplingParams()])
    assert engine.calls == [] and got[0].tolist() == [0.0]


def test_describe_is_json_ready(vllm) -> None:
    import json

    scorer = VllmScorer("org/model", llm=scoring_engine(vllm), dtype="bfloat16", max_model_len=4096)
    described = scorer.describe()
    assert described["backend"] == "vllm" and described["model"] == "org/model"
    assert described["engine"] == {"enable_prefix_caching": False, "dtype": "bfloat16", "max_model_len": 4096,
                                   "hf_overrides": {"head_dtype": "float32"}}
    assert described["request"]["prompt_log_probs"] is None  # chosen once the engine is checked
    scorer.score([np.array([1, 2], np.int32)], [np.array([0, 1], np.int8)], [SamplingParams()])
    assert scorer.describe()["request"]["prompt_log_probs"] == "prompt_logprob_token_ids"
    json.dumps(scorer.describe())


# --------------------------------------------------------------------------- the engine's settings


def test_the_engine_is_built_with_a_float32_head(vllm) -> None:
    """vLLM runs a generation model's lm_head in the model dtype unless hf_overrides names head_dtype
    (vllm/config/model.py ModelConfig.head_dtype, read by model_executor/layers/logits_processor.py)."""
    scorer = VllmScorer("org/model", dtype="bfloat16", hf_overrides={"rope_theta": 1e6})
    scorer.score([np.array([1, 2], np.int32)], [np.array([0, 1], np.int8)], [SamplingParams()])
    built = scorer._llm
    assert built.kwargs["hf_overrides"] == {"rope_theta": 1e6, "head_dtype": "float32"}
    assert built.kwargs["enable_prefix_caching"] is False
    assert built.llm_engine.model_config.head_dtype == torch.float32
    with pytest.raises(ValueError, match="head_dtype='bfloat16'.*leave head_dtype out"):
        VllmScorer("m", hf_overrides={"head_dtype": "bfloat16"})
    with pytest.raises(ValueError, match="hf_overrides must be a dict"):
        VllmScorer("m", hf_overrides=lambda config: config)


def test_an_engine_whose_head_is_not_float32_is_refused(vllm) -> None:
    """An engine built without the override (or on a platform without float32, where vLLM falls back to the
    model dtype) would round every logit to bfloat16 before the log-softmax."""
    from pear_data.errors import UsageError

    scorer = VllmScorer("m", llm=vllm.LLM("m", dtype="bfloat16"))
    with pytest.raises(UsageError, match=r"lm_head in bfloat16, not float32.*head_dtype"):
        scorer.score([np.array([1, 2], np.int32)], [np.array([0, 1], np.int8)], [SamplingParams()])


def test_logprobs_modes_that_return_logits_are_refused(vllm) -> None:
    """vllm/config/model.py LogprobsMode: raw_logits and processed_logits put logits where log-probs go."""
    from pear_data.errors import UsageError

    for mode in ("raw_logits", "processed_logits"):
        with pytest.raises(ValueError, match=f"logprobs_mode='{mode}' makes vLLM return logits"):
            VllmScorer("m", logprobs_mode=mode)
        engine = vllm.LLM("m", logprobs_mode=mode, hf_overrides={"head_dtype": "float32"})
        with pytest.raises(UsageError, match=f"the vLLM engine: logprobs_mode='{mode}'"):
            VllmScorer("m", llm=engine).score([np.array([1, 2], np.int32)], [np.array([0, 1])], [SamplingParams()])
        assert engine.calls == []
    engine = vllm.LLM("m", logprobs_mode="processed_logprobs", hf_overrides={"head_dtype": "float32"})
    VllmScorer("m", llm=engine).score([np.array([1, 2], np.int32)], [np.array([0, 1])], [SamplingParams()])


def test_vllm_older_than_the_first_float32_head_is_refused(monkeypatch) -> None:
    """Up to 0.25 ModelConfig.head_dtype exists (from 0.10.2) but only pooling heads read it: the lm_head of a
    generation model ignores it (model_executor/layers/logits_processor.py of 0.25 vs 0.26)."""
    from pear_data.errors import UsageError
    from pear_data.policies import check_backend

    install_vllm(monkeypatch, "0.25.0")
    with pytest.raises(ImportError, match=r"vLLM 0.25.0 is older than 0.26.*pip install 'vllm>=0.26'"):
        VllmScorer("m").score([np.array([1, 2], np.int32)], [np.array([0, 1])], [SamplingParams()])
    assert vllm_backend.version_problem("0.26.0") is None and vllm_backend.version_problem("0.34.1.dev3+g1") is None
    assert vllm_backend.version_problem("0.8.5.post1") and vllm_backend.version_problem("0.9")
    monkeypatch.setattr(vllm_backend, "installed_vllm_version", lambda: "0.8.5")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "vllm" else None)
    with pytest.raises(UsageError, match=r"--backend vllm: vLLM 0.8.5 is older than 0.26"):
        check_backend(_options().scoring)


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed here")
def test_without_vllm_the_error_says_how_to_install_it() -> None:
    assert "vllm" not in sys.modules  # importing the backend does not import vLLM
    scorer = VllmScorer("some/model")
    with pytest.raises(ImportError, match=r"pip install 'pear-data\[vllm\]' in an environment of its own"):
        scorer.score([np.array([1, 2], np.int32)], [np.array([0, 1], np.int8)], [SamplingParams()])


# --------------------------------------------------------------------------- how each vLLM version is asked

# Rows with the shapes that matter: a completion from position 1, one after a prompt, two assistant turns
# (a gap in the mask), a row with nothing to score.
ROWS = [np.array([5, 6, 7], np.int32), np.array([1, 2, 3, 4, 5, 6], np.int64),
        np.array([9, 8, 7, 6, 5, 4, 3], np.int32), np.array([4, 4], np.int32)]
MASKS = [np.array([1, 1, 1], np.int8), np.array([0, 0, 0, 1, 1, 1], np.int8),
         np.array([0, 0, 1, 1, 0, 1, 1], bool), np.array([0, 0], np.int8)]


def score_on(monkeypatch, version: str, **engine_state):
    """Score ROWS on a stand-in vLLM of that version; returns (values, the engine, its one call's params)."""
    vllm = install_vllm(monkeypatch, version)
    engine = scoring_engine(vllm)
    for name, value in engine_state.items():
        target = engine.llm_engine.vllm_config
        setattr(target.cache_config if name == "kv_sharing_fast_prefill" else target, name, value)
    (values,) = VllmScorer("m", llm=engine).score(ROWS, MASKS, [SamplingParams()])
    for row, sequence, mask in zip(values, ROWS, MASKS):
        np.testing.assert_allclose(row, expected_logprobs(sequence, mask), rtol=1e-6)
        assert row.dtype == np.float32
    (prompts, params), = engine.calls
    assert [p["prompt_token_ids"] for p in prompts] == [r.tolist() for r in ROWS[:3]]
    return values, engine, params


@pytest.mark.parametrize("version,state", [("0.26.0", {}), ("0.30.0", {}), ("0.31.0", {}),
                                           ("0.33.0", {"use_v2_model_runner": False}),
                                           ("0.34.0", {"kv_sharing_fast_prefill": True})])
def test_prompt_logprobs_in_the_flat_format_where_token_ids_are_not_taken(monkeypatch, version, state) -> None:
    """prompt_logprobs=0 with flat_logprobs (vllm/sampling_params.py, since 0.12): before 0.32, where 0.31's
    prompt_logprob_token_ids is one id list for every row; on 0.32-0.33's V1 runner fallback
    (v1/engine/input_processor.py refuses token ids there) and with --kv-sharing-fast-prefill."""
    _, _, params = score_on(monkeypatch, version, **state)
    assert len(params) == 3 and all(p is params[0] for p in params)  # one SamplingParams for the call
    assert params[0].prompt_logprobs == 0 and params[0].flat_logprobs is True
    assert getattr(params[0], "prompt_logprob_token_ids", None) is None


@pytest.mark.parametrize("version", ["0.32.0", "0.33.0", "0.34.0"])
def test_token_ids_from_the_first_completion_position_where_vllm_takes_them(monkeypatch, version) -> None:
    """vllm/sampling_params.py (0.32 on): prompt_logprob_token_ids [rows, ids], row i scored as the prediction
    of prompt token prompt_logprob_start + i + 1; outputs.py: prompt_token_id_logprobs float32 [rows, ids];
    v1/worker/gpu/sample/prompt_logprob.py runs the lm_head on those rows only."""
    _, engine, params = score_on(monkeypatch, version)
    firsts = [1, 3, 2]
    assert [p.prompt_logprob_start for p in params] == [f - 1 for f in firsts]
    for p, sequence, first in zip(params, ROWS, firsts):
        assert p.prompt_logprobs is None and p.max_tokens == 1 and p.temperature == 1.0
        np.testing.assert_array_equal(p.prompt_logprob_token_ids, sequence[first:].reshape(-1, 1))
        assert p.prompt_logprob_token_ids.dtype.kind == "i"
    # the stand-in refuses what vLLM refuses: a row count that does not match the prompt and start
    bad = vllm_backend._import_vllm().SamplingParams(max_tokens=1, prompt_logprob_start=0,
                                                     prompt_logprob_token_ids=np.array([[6]]))
    with pytest.raises(engine.error, match="prompt_logprob_token_ids has 1 rows, but the prompt has 2"):
        engine.generate([{"prompt_token_ids": [5, 6, 7]}], bad)


def test_token_id_logprobs_convert_with_checks() -> None:
    sequence, mask = np.array([1, 2, 3, 4], np.int32), np.array([0, 0, 1, 1], np.int8)
    scores = np.array([[-0.5], [-np.inf]], np.float32)  # rows for positions 2 and 3
    (got,) = vllm_backend.token_id_logprobs_to_arrays([scores], [sequence], [mask])
    assert got.dtype == np.float32 and got[:3].tolist() == [0.0, 0.0, -0.5] and np.isneginf(got[3])
    (got,) = vllm_backend.token_id_logprobs_to_arrays([np.array([[1e-6], [-1.0]])], [sequence], [mask])
    assert got.tolist() == [0.0, 0.0, 0.0, -1.0]
    with pytest.raises(ValueError, match=r"row 0: prompt_token_id_logprobs has shape \(3, 1\), expected \(2, 1\)"):
        vllm_backend.token_id_logprobs_to_arrays([np.zeros((3, 1))], [sequence], [mask])
    with pytest.raises(ValueError, match="row 0: vLLM returned no prompt_token_id_logprobs"):
        vllm_backend.token_id_logprobs_to_arrays([None], [sequence], [mask])
    with pytest.raises(ValueError, match=r"row 0, position 3: vLLM returned log-prob nan"):
        vllm_backend.token_id_logprobs_to_arrays([np.array([[-1.0], [np.nan]])], [sequence], [mask])
    (nothing,) = vllm_backend.token_id_logprobs_to_arrays([None], [sequence], [np.zeros(4)])
    assert nothing.tolist() == [0.0] * 4


# --------------------------------------------------------------------------- row length and vLLM's refusals


def test_a_row_the_engine_cannot_take_is_refused_before_anything_is_sent(vllm) -> None:
    """vLLM's generate refuses a prompt of max_model_len tokens or more (v1/engine/input_processor.py
    `_validate_prompt_len`: one output token is reserved), and one refused prompt aborts every request already
    added (entrypoints/common/offline.py `_render_and_add_requests`)."""
    engine = scoring_engine(vllm, max_model_len=8)
    ok, long = np.arange(1, 8, dtype=np.int32), np.arange(1, 9, dtype=np.int32)
    error = vllm.exceptions.VLLMValidationError
    with pytest.raises(error, match=r"prompt \(length 8\) plus the number of requested output tokens"):
        engine.generate([{"prompt_token_ids": ok.tolist()}, {"prompt_token_ids": long.tolist()}], None)
    assert engine.aborted == [ok.tolist()] and engine.calls == []
    scorer = VllmScorer("m", llm=engine)
    assert scorer.max_row_tokens() == 7
    masks = [np.ones(7, np.int8), np.ones(8, np.int8)]
    with pytest.raises(ValueError, match=r"row 1: 8 tokens, more than the vLLM engine takes \(7: .*nothing was sent"):
        scorer.score([ok, long], masks, [SamplingParams()])
    assert engine.calls == [] and engine.aborted == [ok.tolist()]
    (got,) = scorer.score([ok], masks[:1], [SamplingParams()])
    np.testing.assert_allclose(got[0], expected_logprobs(ok, masks[0]), rtol=1e-6)


@pytest.mark.parametrize("version", ["0.26.0", "0.34.0"])
def test_a_request_vllm_refuses_is_a_usage_error_that_names_vllms_error(monkeypatch, version) -> None:
    """VLLMValidationError (vllm/exceptions.py) is a ValueError up to 0.26 and a plain VLLMError from 0.27:
    both are caught and named."""
    from pear_data.errors import UsageError

    vllm = install_vllm(monkeypatch, version)
    assert issubclass(vllm.exceptions.VLLMValidationError, ValueError) == (version == "0.26.0")
    scorer = VllmScorer("m", llm=scoring_engine(vllm, max_model_len=4))
    monkeypatch.setattr(VllmScorer, "max_row_tokens", lambda self: 100)  # let a row through that vLLM refuses
    with pytest.raises(UsageError, match=r"vLLM refused a request of a batch of 1 rows.*VLLMValidationError: The "
                                         r"decoder prompt \(length 5\) is longer"):
        scorer.score([np.arange(1, 6, dtype=np.int32)], [np.ones(5, np.int8)], [SamplingParams()])


# --------------------------------------------------------------------------- wiring into `score`


def _options(behavior=None, **scoring):
    """ScoreOptions for --backend vllm on CUDA with recorded behavior log-probs (`scoring` overrides the rest)."""
    from pear_data.config import BehaviorSpec, ScoreOptions, ScoringConfig

    config = ScoringConfig(**{"backend": "vllm", "device": "cuda", **scoring})
    return ScoreOptions(behavior=behavior or BehaviorSpec(logprobs_field="recorded"), scoring=config)


def test_backend_checks_refuse_what_vllm_cannot_score(monkeypatch) -> None:
    """An unknown backend, CPU, a behavior model (vLLM gives the raw target distribution only): ConfigErrors when
    the options are built; no vLLM installed: a UsageError of the environment check. Each says what to do,
    before anything is written."""
    from pear_data.config import BehaviorSpec
    from pear_data.errors import ConfigError, UsageError
    from pear_data.policies import check_backend

    with pytest.raises(ConfigError, match="choose one of torch, vllm"):
        _options(backend="jax")
    with pytest.raises(ConfigError, match="CUDA GPUs only"):
        _options(device="cpu")
    for spec in (BehaviorSpec(model="gemma-3-270m"), BehaviorSpec(), BehaviorSpec(model="x", temperature=0.7)):
        with pytest.raises(ConfigError, match="--behavior-logprobs-field"):
            _options(behavior=spec)
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else real_find_spec(name))
    with pytest.raises(UsageError, match=r"pip install 'pear-data\[vllm\]'"):
        check_backend(_options().scoring)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "vllm" else None)
    check_backend(_options().scoring)  # recorded behavior log-probs: fine


def test_vllm_loads_the_targets_local_directory_and_the_manifest_names_no_path(tmp_path) -> None:
    from pear_data.models import resolve_model
    from pear_data.policies import scoring_record, vllm_scorer

    from .tiny_model import make_tiny_model

    directory = make_tiny_model(tmp_path / "target")
    options = _options(vllm_gpu_memory_utilization=0.5, vllm_tensor_parallel_size=2).scoring
    scorer = vllm_scorer(resolve_model(str(directory)), options, None)
    assert scorer.model == str(directory)
    assert scorer.engine_kwargs["gpu_memory_utilization"] == 0.5 and scorer.engine_kwargs["tensor_parallel_size"] == 2
    assert "vllm" not in sys.modules  # the engine is built on the first score call, not here
    record = scoring_record(options, "cuda")
    assert record["backend"] == "vllm" and str(tmp_path) not in str(record)


def test_score_refuses_vllm_on_cpu_before_writing_anything(tmp_path) -> None:
    import subprocess

    corpus = tmp_path / "rows.jsonl"
    corpus.write_text('{"prompt": "a", "completion": "b", "lp": [-0.1]}\n')
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, "-m", "pear_data.cli", "score", str(corpus), "--out", str(out),
                             "--backend", "vllm", "--device", "cpu", "--behavior-logprobs-field", "lp"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "CUDA GPUs only" in result.stderr and "Traceback" not in result.stderr
    assert not out.exists()


def _vllm_policies(monkeypatch, model_dir, max_model_len: int, **tokenize):
    """PolicyRecipe.load for --backend vllm on the tiny model's tokenizer, its scorer on a stand-in engine."""
    from pear_data import policies, scoring
    from pear_data.config import TokenizeConfig
    from pear_data.corpus import RowShape
    from pear_data.policies import ModelSources, PolicyRecipe

    vllm = install_vllm(monkeypatch, "0.34.0")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "vllm" else None)
    monkeypatch.setattr(vllm_backend, "installed_vllm_version", lambda: "0.34.0")
    monkeypatch.setattr(scoring, "resolve_device", lambda device: device)  # no GPU here
    monkeypatch.setattr(scoring, "scoring_dtype", lambda device: torch.bfloat16)
    monkeypatch.setattr(policies, "vllm_scorer", lambda source, options, progress: VllmScorer(
        "m", llm=scoring_engine(vllm, max_model_len=max_model_len)))
    options = _options()
    models = ModelSources.resolve(str(model_dir), options.behavior)
    return PolicyRecipe(models, RowShape("prompt_completion"), None, options.scoring, TokenizeConfig(**tokenize),
                        options.behavior).load()


def test_score_fits_rows_to_the_vllm_engine_by_the_on_overflow_rule(monkeypatch, tiny_model_dir) -> None:
    """A row longer than the engine takes never reaches generate: --on-overflow truncate cuts it to the engine's
    limit (the one truncation rule), skip rejects it, error stops the run (exit code 2); --max-length within
    the limit leaves nothing to do."""
    from pear_data.corpus import CorpusRow
    from pear_data.errors import UsageError

    # byte-level tiny tokenizer: 83 and 25 tokens, of which 61 and 3 completion (the end-of-turn token included)
    rows = [CorpusRow(0, {"prompt": "hi", "completion": "x" * 60, "recorded": [-0.5] * 61}),
            CorpusRow(1, {"prompt": "hi", "completion": "ok", "recorded": [-0.5] * 3})]
    truncating = _vllm_policies(monkeypatch, tiny_model_dir, 32)
    assert truncating.row_limit == 31
    prepared = truncating.prepare(rows)
    assert prepared.rejects == [] and [r.target.num_tokens for r in prepared.rows][0] == 31
    assert prepared.rows[0].target.truncated_completion_tokens > 0
    scored = truncating.score(prepared)
    assert scored.table.num_rows == 2 and truncating.target_scorer._llm.calls
    skipping = _vllm_policies(monkeypatch, tiny_model_dir, 32, on_overflow="skip")
    prepared = skipping.prepare(rows)
    assert [r.index for r, _ in prepared.rejects] == [0] and len(prepared.rows) == 1
    reason = prepared.rejects[0][1]
    assert "over the vLLM engine's length" in reason and "(31: its max_model_len" in reason
    with pytest.raises(UsageError, match=r"more than the vLLM engine takes \(31.*pass --max-length 31"):
        _vllm_policies(monkeypatch, tiny_model_dir, 32, on_overflow="error").prepare(rows)
    within = _vllm_policies(monkeypatch, tiny_model_dir, 32, max_length=20, on_overflow="skip").prepare(rows)
    assert "over max length" in within.rejects[0][1]


def test_vllm_with_workers_or_ray_is_refused_when_the_options_are_built() -> None:
    from pear_data.config import BehaviorSpec, RunConfig, ScoreOptions, ScoringConfig
    from pear_data.errors import ConfigError

    for run in (RunConfig(workers=2), RunConfig(ray="local")):
        with pytest.raises(ConfigError, match="runs in one process: use --vllm-tensor-parallel-size"):
            ScoreOptions(behavior=BehaviorSpec(logprobs_field="recorded"), run=run,
                         scoring=ScoringConfig(backend="vllm", device="cuda"))
