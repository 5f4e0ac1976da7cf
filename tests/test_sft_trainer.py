"""PearSFTTrainer at scale (design 4.2-4.4): packing, padding-free, accumulation, options, evaluation.

Real TRL SFTTrainer runs on datasets written by `pear-data score` with the tiny models (tiny_scored.py): 8 GSM8K
rows of 250-830 byte-level tokens, one optimizer step of SGD, the gradient read before the step. Float32 on CPU:
the same rows give the same loss and gradient whatever the layout, to float rounding (~1e-7 relative; the
tolerance is 1e-5). TRL's default bf16 autocast is turned off: its matmuls round to 8 bits of mantissa, so two
layouts of the same rows differ by ~1e-4 there, in plain TRL as in PEAR.
"""

from __future__ import annotations

import copy
import logging
import math

import pytest
import torch

from pear_data.errors import TrainingError
from pear_data.weights import WeightConfig

trl = pytest.importorskip("trl")
ROWS = 8


@pytest.fixture(scope="module", autouse=True)
def quiet():
    logging.getLogger("pear_data").setLevel(logging.ERROR)
    yield
    logging.getLogger("pear_data").setLevel(logging.NOTSET)


def _args(tmp_path, **overrides):
    from trl import SFTConfig

    settings = dict(output_dir=str(tmp_path / "run"), max_length=4096, per_device_train_batch_size=ROWS, max_steps=1,
                    learning_rate=1.0, optim="sgd", lr_scheduler_type="constant", warmup_steps=0, logging_steps=1,
                    save_strategy="no", report_to=[], use_cpu=True, bf16=False, seed=0, disable_tqdm=True,
                    max_grad_norm=0.0)
    settings.update(overrides)
    return SFTConfig(**settings)


class _Gradient:
    """A callback keeping the gradient of the optimizer step (before the step)."""

    def __new__(cls):
        from transformers import TrainerCallback

        class Grab(TrainerCallback):
            gradient = None

            def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
                self.gradient = torch.cat([p.grad.flatten().clone() for p in model.parameters() if p.grad is not None])

        return Grab()


def _trainer(scored, tmp_path, mode="static", config=None, normalize="tokens", callbacks=(), **overrides):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pear_data.trainer import PearSFTTrainer

    model = AutoModelForCausalLM.from_pretrained(scored.model)
    return PearSFTTrainer(model=model, args=_args(tmp_path, **overrides), train_dataset=scored.dataset(tmp_path / "hf"),
                          processing_class=AutoTokenizer.from_pretrained(scored.model), pear_mode=mode,
                          pear_config=config or WeightConfig(), pear_normalize=normalize, callbacks=list(callbacks))


def _step(scored, tmp_path, **kwargs) -> tuple[dict, torch.Tensor]:
    """(the step's log, its gradient) of one training step."""
    grab = _Gradient()
    trainer = _trainer(scored, tmp_path, callbacks=[grab], **kwargs)
    trainer.train()
    log = next(h for h in trainer.state.log_history if "loss" in h)
    return log, grab.gradient


def _same_step(a: tuple[dict, torch.Tensor], b: tuple[dict, torch.Tensor]) -> None:
    assert b[0]["loss"] == pytest.approx(a[0]["loss"], rel=1e-5)
    relative = float((b[1] - a[1]).norm() / a[1].norm())
    assert relative < 1e-5, relative
    for name in ("pear/weight_mean", "pear/nll"):
        assert b[0][name] == pytest.approx(a[0][name], rel=1e-5), name


LAYOUTS = {
    "padding_free": dict(padding_free=True),
    "packing_bfd": dict(packing=True, per_device_train_batch_size=1),
    "packing_bfd_split": dict(packing=True, packing_strategy="bfd_split", per_device_train_batch_size=1),
}
CASES = {
    "static-token": ("tiny_scored", "static", WeightConfig(granularity="token")),
    "static-block": ("tiny_scored", "static", WeightConfig(granularity="block")),
    "static-sequence": ("tiny_scored", "static", WeightConfig(granularity="sequence")),
    "online-token": ("tiny_scored", "online", WeightConfig(granularity="token")),
    "cross-static-block": ("tiny_scored_cross", "static", WeightConfig(granularity="block")),
    "cross-online-block": ("tiny_scored_cross", "online", WeightConfig(granularity="block", normalize="sequence")),
}


@pytest.mark.parametrize("case", CASES)
def test_packed_padding_free_and_padded_batches_give_the_same_step(case, request, tmp_path):
    """8 rows in one padded batch, in one padding-free row, and packed (best-fit decreasing, one 4096-token
    sequence): the same loss, gradient and weight diagnostics."""
    fixture, mode, config = CASES[case]
    scored = request.getfixturevalue(fixture)
    padded = _step(scored, tmp_path / "padded", mode=mode, config=config)
    for name, layout in LAYOUTS.items():
        _same_step(padded, _step(scored, tmp_path / name, mode=mode, config=config, **layout))


NORMALIZERS = {
    "static-tokens": ("static", WeightConfig(), "tokens"),
    "static-weights": ("static", WeightConfig(granularity="block"), "weights"),
    "online-tokens": ("online", WeightConfig(), "tokens"),
    "online-weights": ("online", WeightConfig(), "weights"),
    "online-dataset": ("online", WeightConfig(normalize="dataset"), "tokens"),
    "online-sequence-weights": ("online", WeightConfig(normalize="sequence", granularity="block"), "weights"),
}


@pytest.mark.parametrize("normalizer", NORMALIZERS)
def test_gradient_accumulation_gives_the_step_of_one_batch(normalizer, tiny_scored, tmp_path):
    """4 micro-batches of 2 rows (padded, then packed) == 1 batch of 8: every normalizer covers the whole step."""
    mode, config, normalize = NORMALIZERS[normalizer]
    whole = _step(tiny_scored, tmp_path / "one", mode=mode, config=config, normalize=normalize)
    accumulated = _step(tiny_scored, tmp_path / "ga", mode=mode, config=config, normalize=normalize,
                        per_device_train_batch_size=2, gradient_accumulation_steps=4)
    _same_step(whole, accumulated)
    packed = _step(tiny_scored, tmp_path / "ga-packed", mode=mode, config=config, normalize=normalize,
                   per_device_train_batch_size=1, gradient_accumulation_steps=2, packing=True, max_length=2048)
    _same_step(whole, packed)


@pytest.mark.parametrize("option, value, message", [
    ("completion_only_loss", False, "completion_only_loss=False"),
    ("loss_type", "dft", "loss_type='dft'"),
    ("label_smoothing_factor", 0.1, "label_smoothing_factor=0.1"),
    ("truncation_mode", "keep_end", "truncation_mode='keep_end'"),
    ("packing_strategy", "wrapped", "packing_strategy='wrapped'"),
])
def test_an_option_the_loss_cannot_honour_is_refused_by_name(option, value, message, tiny_scored, tmp_path):
    overrides = {option: value, **({"packing": True} if option == "packing_strategy" else {})}
    with pytest.raises(TrainingError, match=message.replace("(", r"\(")):
        _trainer(tiny_scored, tmp_path, **overrides)


def test_the_config_passed_in_is_not_modified_and_plain_trl_still_takes_it(tiny_scored, tmp_path):
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pear_data.trainer import PearSFTTrainer

    args = _args(tmp_path, packing=True, per_device_train_batch_size=1, assistant_only_loss=False)
    before = copy.deepcopy(args.to_dict())
    tokenizer = AutoTokenizer.from_pretrained(tiny_scored.model)
    trainer = PearSFTTrainer(model=AutoModelForCausalLM.from_pretrained(tiny_scored.model), args=args,
                             train_dataset=tiny_scored.dataset(tmp_path / "hf"), processing_class=tokenizer)
    assert args.to_dict() == before
    assert trainer.args.packing and trainer.args.dataset_kwargs == {"skip_prepare_dataset": True}
    text = datasets.Dataset.from_dict({"text": ["one two three", "four five six seven"] * 4})
    plain = trl.SFTTrainer(model=AutoModelForCausalLM.from_pretrained(tiny_scored.model), args=args,
                           train_dataset=text, processing_class=tokenizer)
    plain.train()


def test_pad_to_multiple_of_and_assistant_only_loss_are_honoured(tiny_scored, tmp_path):
    trainer = _trainer(tiny_scored, tmp_path, pad_to_multiple_of=64, assistant_only_loss=True)
    batch = next(iter(trainer.get_train_dataloader()))
    assert batch["input_ids"].shape[1] % 64 == 0
    rows = trainer.train_dataset
    assert int((batch["labels"] != -100).sum()) == sum(sum(r["completion_mask"]) for r in rows)


def test_trl_metrics_and_evaluation_are_logged(tiny_scored, tmp_path):
    trainer = _trainer(tiny_scored, tmp_path, packing=True, per_device_train_batch_size=1, eval_strategy="no")
    trainer.train()
    log = next(h for h in trainer.state.log_history if "loss" in h)
    assert {"entropy", "mean_token_accuracy", "num_tokens", "pear/weight_ess", "pear/nll"} <= set(log)
    assert log["num_tokens"] == sum(len(r["input_ids"]) for r in tiny_scored.dataset(tmp_path / "hf"))
    metrics = trainer.evaluate(tiny_scored.dataset(tmp_path / "hf2"))
    assert {"eval_loss", "eval_pear/nll", "eval_pear/weight_mean", "eval_mean_token_accuracy"} <= set(metrics)
    assert math.isfinite(metrics["eval_loss"]) and metrics["eval_pear/nll"] > 0


def test_static_rows_longer_than_max_length_are_refused_online_rows_are_cut(tiny_scored, tmp_path, caplog):
    with pytest.raises(TrainingError, match=r"pear-data reweight OUT --out OUT-300 --max-length 300"):
        _trainer(tiny_scored, tmp_path, max_length=300)
    with caplog.at_level(logging.WARNING, logger="pear_data"):
        trainer = _trainer(tiny_scored, tmp_path, mode="online", max_length=300)
    report = trainer.pear_reports["train"]
    assert (report.rows_in, report.cut, report.dropped, report.rows_out) == (8, 6, 1, 7)
    assert max(len(r["input_ids"]) for r in trainer.train_dataset) == 300
    with pytest.raises(TrainingError, match="bfd_split"):
        _trainer(tiny_scored, tmp_path, mode="online", max_length=300, packing=True, packing_strategy="bfd_split")
    split = _trainer(tiny_scored, tmp_path, max_length=300, packing=True, packing_strategy="bfd_split")
    assert split.pear_reports["train"].split == 6


def test_a_missing_column_names_it_and_the_command_that_writes_it(tiny_scored, tmp_path):
    from transformers import AutoModelForCausalLM

    from pear_data.trainer import PearSFTTrainer

    data = tiny_scored.dataset(tmp_path / "hf").remove_columns(["pear_block_weight"])
    with pytest.raises(TrainingError, match=r"no column 'pear_block_weight'.*pear-data reweight"):
        PearSFTTrainer(model=AutoModelForCausalLM.from_pretrained(tiny_scored.model), args=_args(tmp_path),
                       train_dataset=data, pear_config=WeightConfig(granularity="block"))


def test_a_capped_dataset_normalization_over_several_micro_batches_is_refused(tiny_scored, tmp_path):
    with pytest.raises(TrainingError, match="cap"):
        _trainer(tiny_scored, tmp_path, mode="online", config=WeightConfig(normalize="dataset", max_weight=3.0),
                 gradient_accumulation_steps=2)


@pytest.mark.parametrize("mode", ["static", "online"])
def test_pear_trainer_with_a_padding_free_collator_gives_the_padded_step(mode, tiny_scored_cross, tmp_path):
    """`transformers.Trainer` (PearTrainer): the loss from full logits, padding-free through the collator."""
    from transformers import AutoModelForCausalLM, TrainingArguments

    from pear_data.collator import PearCollator
    from pear_data.trainer import PearTrainer

    def step(padding_free: bool):
        grab = _Gradient()
        args = TrainingArguments(output_dir=str(tmp_path / "hf"), per_device_train_batch_size=ROWS, max_steps=1,
                                 learning_rate=1.0, optim="sgd", logging_steps=1, save_strategy="no", report_to=[],
                                 use_cpu=True, max_grad_norm=0.0, disable_tqdm=True)
        online = mode == "online"
        collator = PearCollator(0, weights=None if online else "block", behavior=online, padding_free=padding_free)
        trainer = PearTrainer(model=AutoModelForCausalLM.from_pretrained(tiny_scored_cross.model), args=args,
                              train_dataset=tiny_scored_cross.dataset(tmp_path / "cache"), data_collator=collator,
                              pear_mode=mode, pear_config=WeightConfig(granularity="block"), callbacks=[grab])
        trainer.train()
        return next(h for h in trainer.state.log_history if "loss" in h), grab.gradient

    _same_step(step(False), step(True))
