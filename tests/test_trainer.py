"""The trainer side end to end: `pear-data score` output -> PearCollator -> pear_loss in transformers / TRL.

Real components throughout: the embedded SmolLM2-135M-Instruct, a dataset
written by `pear_data.score.score` (the python API of `pear-data score`) on 4
GSM8K rows, and real `transformers.Trainer` / TRL `SFTTrainer` instances.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from pear_data.collator import PearCollator
from pear_data.loss import label_logprobs, pear_loss, pear_weights
from pear_data.schema import GRANULARITIES, WEIGHT_COLUMNS
from pear_data.weights import WeightConfig

pytestmark = pytest.mark.slow

GSM8K = Path(__file__).resolve().parents[1] / "examples" / "data" / "gsm8k_sample.jsonl"
SHORTEST_ROWS = [1, 4, 14, 0]  # the 4 shortest GSM8K sample rows: ~150 tokens each, never truncated below
MAX_LENGTH = 256


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Run this module's model work on one thread, then restore the setting.

    On a shared or oversubscribed CPU (other jobs, pytest-xdist workers) two
    OpenMP threads spin-wait on each other: a SmolLM2 forward+backward of 135
    tokens measured 8 s + 19 s with 2 threads against 0.9 s + 1.8 s with 1, on
    2 cores under load ~4. Idle, one thread costs at most ~2x.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _score_gsm8k(tmp: Path, behavior: str, temperature: float) -> Path:
    """`pear-data score` output (weights unnormalized) for the 4 shortest GSM8K rows, target SmolLM2."""
    from pear_data.config import BehaviorSpec, CorpusConfig, RunConfig, ScoreOptions, ScoringConfig
    from pear_data.score import score

    lines = GSM8K.read_text().splitlines()
    corpus = tmp / "gsm8k4.jsonl"
    corpus.write_text("".join(lines[i] + "\n" for i in SHORTEST_ROWS))
    options = ScoreOptions(
        target="smollm2-135m-instruct",
        behavior=BehaviorSpec(model=behavior, logprobs_field=None, temperature=temperature, top_p=1.0),
        weights=WeightConfig(normalize="none"),
        corpus=CorpusConfig(prompt_field="question", completion_field="answer"),
        run=RunConfig(shard_rows=64),
        scoring=ScoringConfig(device="cpu"),
    )
    score(corpus, tmp / "out", options)
    return tmp / "out"


def _load(scored_dir: Path, cache: Path):
    import datasets

    return datasets.load_dataset("parquet", data_dir=str(scored_dir / "data"), split="train", cache_dir=str(cache))


@pytest.fixture(scope="module")
def scored_dir(one_torch_thread, tmp_path_factory, smollm2_source) -> Path:
    """Behavior = the target itself at T=0.7 (same tokens: every completion token is a shared boundary)."""
    return _score_gsm8k(tmp_path_factory.mktemp("scored"), "smollm2-135m-instruct", 0.7)


@pytest.fixture(scope="module")
def scored(scored_dir, tmp_path_factory):
    return _load(scored_dir, tmp_path_factory.mktemp("hf-cache"))


@pytest.fixture(scope="module")
def cross_scored(one_torch_thread, tmp_path_factory, smollm2_source, gemma_source):
    """Behavior = Gemma-3-270M (another tokenizer, raw template), aligned by character offsets."""
    out = _score_gsm8k(tmp_path_factory.mktemp("cross"), "gemma-3-270m", 1.0)
    return _load(out, tmp_path_factory.mktemp("hf-cache"))


@pytest.fixture(scope="module")
def train_rows(scored):
    """The 2 shortest rows (~120 tokens each): a training step costs seconds, not minutes, on 2 CPU cores."""
    return scored.select([0, 1])


def _padded(rows, column: str, length: int) -> torch.Tensor:
    out = torch.zeros(len(rows), length)
    for b, row in enumerate(rows):
        out[b, : len(row[column])] = torch.tensor(row[column])
    return out


def test_collator_builds_labels_and_pads_the_pear_columns(scored):
    rows = list(scored)
    assert max(len(r["input_ids"]) for r in rows) <= MAX_LENGTH
    batch = PearCollator(pad_token_id=7, weights="sequence", behavior=True)(rows)
    length = max(len(r["input_ids"]) for r in rows)
    assert batch["input_ids"].shape == (4, length) and batch["input_ids"].dtype == torch.int64
    for b, row in enumerate(rows):
        n = len(row["input_ids"])
        mask = torch.tensor(row["completion_mask"]).bool()
        assert torch.equal(batch["input_ids"][b, :n], torch.tensor(row["input_ids"]))
        assert torch.equal(batch["attention_mask"][b], (torch.arange(length) < n).long())
        assert torch.equal(batch["labels"][b, :n], torch.where(mask, torch.tensor(row["input_ids"]), -100))
        assert (batch["labels"][b, n:] == -100).all() and (batch["input_ids"][b, n:] == 7).all()
        # pear_seq_weight (one float per row) spreads over the completion positions only
        assert torch.equal(batch["pear_weights"][b, :n], torch.where(mask, row["pear_seq_weight"], 0.0))
        assert torch.equal(batch["behavior_logprobs"][b, :n], torch.tensor(row["behavior_logprobs"]))
        assert not batch["pear_weights"][b, n:].any() and not batch["behavior_logprobs"][b, n:].any()

    # Online rows are cut by the truncation rule (their weights follow the cut); static weights were computed
    # for the whole row, so a static row longer than max_length is refused (tests/test_collator.py).
    short = PearCollator(pad_token_id=0, weights=None, behavior=True, max_length=100)(rows)
    assert short["input_ids"].shape == (4, 100)
    assert torch.equal(short["behavior_logprobs"][0], torch.tensor(rows[0]["behavior_logprobs"][:100]))


def test_collator_names_a_misaligned_or_missing_column(scored):
    row = dict(scored[0])
    row["pear_token_weight"] = row["pear_token_weight"][:-1]
    with pytest.raises(ValueError, match=r"batch row 0: pear_token_weight has shape"):
        PearCollator(pad_token_id=0)([row])
    del row["pear_token_weight"]
    with pytest.raises(KeyError, match="remove_unused_columns"):
        PearCollator(pad_token_id=0)([row])


def _row(**changes) -> dict:
    """One synthetic scored row as `datasets` yields it (no model needed)."""
    row = {
        "input_ids": [5, 6, 7, 8, 9],
        "completion_mask": [0, 0, 1, 1, 1],
        "behavior_logprobs": [0.0, 0.0, -0.5, -0.25, -1.0],
        "shared_boundary": [0, 0, 1, 1, 1],
        "pear_token_weight": [0.0, 0.0, 0.5, 1.0, 2.0],
        "pear_block_weight": [0.0, 0.0, 1.0, 1.0, 1.0],
        "pear_seq_weight": 1.5,
    }
    row.update(changes)
    return row


@pytest.mark.parametrize(
    "changes, collator, column",
    [
        ({"pear_seq_weight": None}, {"weights": "sequence"}, "pear_seq_weight"),
        ({"pear_token_weight": None}, {"weights": "token"}, "pear_token_weight"),
        ({"pear_token_weight": [0.0, 0.0, None, 1.0, 2.0]}, {"weights": "token"}, "pear_token_weight"),
        ({"behavior_logprobs": [0.0, 0.0, -0.5, None, -1.0]}, {"weights": None, "behavior": True},
         "behavior_logprobs"),
        ({"shared_boundary": [0, 0, 1, None, 1]}, {"weights": None, "behavior": True}, "shared_boundary"),
        ({"completion_mask": [0, 0, None, 1, 1]}, {"weights": "token"}, "completion_mask"),
        ({"input_ids": None}, {"weights": "token"}, "input_ids"),
    ],
)
def test_collator_refuses_a_null_weight_or_a_null_inside_a_list_column(changes, collator, column):
    good = PearCollator(pad_token_id=0, **collator)([_row(), _row()])
    assert good["input_ids"].shape == (2, 5)
    with pytest.raises(ValueError, match=rf"batch row 1: {column} is null or holds nulls"):
        PearCollator(pad_token_id=0, **collator)([_row(), _row(**changes)])


@pytest.mark.parametrize("dataset", ["scored", "cross_scored"])
def test_online_weights_at_the_starting_checkpoint_equal_the_scored_columns(dataset, request, smollm2_model):
    """Online PEAR from live logits == the static columns `pear-data score` wrote, same model and config.

    Tolerance: the scorer ran the rows in a padded, length-sorted batch, so its
    target log-probs differ from this forward's by float rounding (~1e-5). The
    behavior log-probs are the stored ones on both sides, every step after the
    log-ratio (clip, suffix sums, weight clip, exp) is 1-Lipschitz in log space,
    so |log W_live - log W_stored| <= sum over the row of |lt_live - lt_stored|:
    the per-row relative tolerance is expm1 of that sum (+ float32 storage rounding).
    A misalignment by one position would move lt by whole nats and fail the first check.
    """
    rows = list(request.getfixturevalue(dataset))
    batch = PearCollator(pad_token_id=0, weights=None, behavior=True)(rows)
    labels, behavior, shared = batch["labels"], batch["behavior_logprobs"], batch["shared_boundary"]
    if dataset == "cross_scored":  # Gemma's tokens differ: some spans hold several SmolLM2 tokens
        assert (shared[labels != -100] == 0).any()
    with torch.no_grad():
        logits = smollm2_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    mask = labels != -100
    stored_lt = _padded(rows, "target_logprobs", labels.shape[1])
    drift = torch.where(mask, (label_logprobs(logits, labels) - stored_lt).abs(), 0.0)
    assert float(drift.max()) < 1e-4, "live target log-probs do not match the scored ones: alignment or model differ"
    row_tolerance = torch.expm1(drift.double().sum(dim=1)) + 2e-6
    assert float(row_tolerance.max()) < 1e-2  # the tolerance is tight enough to mean something

    for granularity in GRANULARITIES:
        config = WeightConfig(normalize="none", granularity=granularity)
        column = WEIGHT_COLUMNS[granularity]
        stored = PearCollator(pad_token_id=0, weights=column)(rows)["pear_weights"].double()
        online = pear_loss(
            labels, logits=logits, behavior_logprobs=behavior, config=config, shared_boundary=shared
        ).weights.double()
        relative = torch.where(mask, (online - stored).abs() / stored.clamp(min=1e-30), 0.0)
        assert (relative.amax(dim=1) <= row_tolerance).all(), (granularity, relative.amax(dim=1), row_tolerance)
        # The torch math itself on the *stored* target log-probs reproduces the columns to float32 rounding.
        twin = pear_weights(stored_lt, behavior, mask, config, shared_boundary=shared).weights.double()
        torch.testing.assert_close(twin, stored, rtol=2e-6, atol=0)


def _sft_args(tmp_path: Path, steps: int, **overrides):
    pytest.importorskip("trl")
    from trl import SFTConfig

    return SFTConfig(
        output_dir=str(tmp_path / "run"),
        max_length=MAX_LENGTH,
        per_device_train_batch_size=4,
        max_steps=steps,
        learning_rate=5e-5,
        lr_scheduler_type="constant",
        warmup_steps=0,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        bf16=False,
        seed=0,
        dataloader_num_workers=0,
        disable_tqdm=True,
        **overrides,
    )


def _fresh_model(source):
    from pear_data.models import load_model

    return load_model(source, device="cpu", dtype=torch.float32)  # a copy to train; the session fixture stays intact


def _row_order(batch, rows) -> list[int]:
    """Which dataset row each batch row is (the trainer's sampler shuffles)."""
    index = {tuple(r["input_ids"]): i for i, r in enumerate(rows)}
    return [index[tuple(ids[mask == 1].tolist())] for ids, mask in zip(batch["input_ids"], batch["attention_mask"])]


def _completion_mean(scored, column: str) -> float:
    weights = np.concatenate([np.asarray(r[column])[np.asarray(r["completion_mask"]) == 1] for r in scored])
    return float(weights.astype(np.float64).mean())


def _stored_weighted_nll(batch, rows, column: str, normalizer: float) -> float:
    """The weighted NLL at the starting checkpoint from the *scored* target log-probs (no extra forward needed)."""
    length = batch["labels"].shape[1]
    lt = _padded(rows, "target_logprobs", length).double()
    w = _padded(rows, column, length).double()
    return float(-(w * lt).sum() / normalizer)


def test_sft_trainer_static_run_lowers_the_loss_and_uses_the_stored_weights(
    train_rows, smollm2_source, smollm2_tokenizer, tmp_path
):
    from pear_data.trainer import PearSFTTrainer

    model = _fresh_model(smollm2_source)
    args = _sft_args(tmp_path, steps=2)
    assert args.remove_unused_columns  # the default: the trainer must keep the PEAR columns by itself
    trainer = PearSFTTrainer(
        model=model, args=args, train_dataset=train_rows, processing_class=smollm2_tokenizer, pear_mode="static"
    )

    # The batch as the trainer builds it (its dataloader, its column removal, its collator) carries the weights...
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    assert "pear_weights" in batch
    rows = [train_rows[i] for i in _row_order(batch, train_rows)]
    assert torch.equal(batch["pear_weights"], PearCollator(pad_token_id=0)(rows)["pear_weights"])
    # ...and they reach the loss: compute_loss == the weighted NLL, far from the plain one.
    labels = int((batch["labels"][:, 1:] != -100).sum())
    with torch.no_grad():
        trainer_loss = float(trainer.compute_loss(model, dict(batch)))
    weighted = _stored_weighted_nll(batch, rows, "pear_token_weight", labels)
    plain = _stored_weighted_nll(batch, rows, "completion_mask", labels)
    assert math.isclose(trainer_loss, weighted, rel_tol=1e-4), (trainer_loss, weighted, plain)
    assert abs(weighted - plain) > 0.1 * plain

    trainer.train()
    steps = [h for h in trainer.state.log_history if "loss" in h]
    assert len(steps) == 2
    losses = [h["loss"] for h in steps]
    assert losses[1] < losses[0], losses  # both steps see the same rows (batch = dataset): one update lowered it
    assert math.isclose(steps[0]["pear/weight_mean"], _completion_mean(train_rows, "pear_token_weight"), rel_tol=1e-5)
    assert 0.0 < steps[0]["pear/weight_ess"] <= 1.0


def test_sft_trainer_online_run_starts_from_the_scored_weights(train_rows, smollm2_source, smollm2_tokenizer, tmp_path):
    from pear_data.trainer import PearSFTTrainer

    model = _fresh_model(smollm2_source)
    one_row = train_rows.select([0])  # the cheapest real run: 2 steps of 1 row
    trainer = PearSFTTrainer(
        model=model,
        args=_sft_args(tmp_path, steps=2),
        train_dataset=one_row,
        processing_class=smollm2_tokenizer,
        pear_mode="online",
        pear_config=WeightConfig(normalize="none"),
        pear_normalize="weights",
    )
    trainer.train()
    steps = [h for h in trainer.state.log_history if "loss" in h]
    assert len(steps) == 2 and all(math.isfinite(h["loss"]) for h in steps)
    # Step 1 runs at the starting checkpoint: the online weights are the scored ones (see the tolerance above).
    assert math.isclose(steps[0]["pear/weight_mean"], _completion_mean(one_row, "pear_token_weight"), rel_tol=1e-3)
    assert "pear/log_ratio_mean" in steps[0] and "pear/at_lower_bound" in steps[0]
    # After one update the target moved, and so did its weights (they are live, not read from the dataset).
    assert steps[1]["pear/weight_mean"] != pytest.approx(steps[0]["pear/weight_mean"], rel=1e-3)


def test_hf_trainer_keeps_the_columns_and_weights_the_loss(train_rows, smollm2_model, tmp_path):
    from transformers import TrainingArguments

    from pear_data.trainer import PearTrainer

    args = TrainingArguments(
        output_dir=str(tmp_path / "hf"), per_device_train_batch_size=2, use_cpu=True, report_to=[], save_strategy="no"
    )
    trainer = PearTrainer(
        model=smollm2_model, args=args, train_dataset=train_rows, pear_config=WeightConfig(granularity="block")
    )
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    rows = [train_rows[i] for i in _row_order(batch, train_rows)]
    assert torch.equal(batch["pear_weights"], PearCollator(pad_token_id=0, weights="block")(rows)["pear_weights"])
    with torch.no_grad():
        loss = float(trainer.compute_loss(smollm2_model, dict(batch), num_items_in_batch=100))
    assert math.isclose(loss, _stored_weighted_nll(batch, rows, "pear_block_weight", 100), rel_tol=1e-4)
    assert trainer.loss_is_scaled_for_ga  # normalized by num_items_in_batch: Trainer must not divide again
