"""verl 0.9's SFT trainer on a pear-data output (opt-in: tests/integrations/frameworks.py says how to run it).

The first step of verl's own trainer (`verl.trainer.sft_trainer`, FSDP2 engine, gloo on CPU, torchrun with one
process, through tests/integrations/verl_cpu_main.py) is compared with `pear_loss` on the same 8 rows padded;
verl's own dataset factory, collator and `sft_loss` check the data path and the unit-weight case.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pear_data.errors import TrainingError
from pear_data.weights import WeightConfig

from ..tiny_scored import (  # noqa: F401 - session fixtures
    tiny_merged_dir_fixture,
    tiny_scored_cross_fixture,
    tiny_scored_fixture,
    tiny_target_dir_fixture,
)
from .frameworks import reference_loss, require

require("verl")
ROOT = Path(__file__).resolve().parents[2]


def _data_config(**pear):
    from omegaconf import OmegaConf

    return OmegaConf.create({"pad_mode": "no_padding", "max_length": 4096, "truncation": "right", "pear": pear,
                             "custom_cls": {"path": "pkg://pear_data.integrations.verl", "name": "PearSFTDataset"}})


@pytest.fixture(autouse=True)
def verl_loss_slot():
    """verl's own SFT loss, restored after each test (PearSFTDataset replaces it)."""
    from verl.workers.utils import losses

    original = losses.sft_loss
    yield original
    losses.sft_loss = original


def _batch(scored, tmp_path, **pear):
    """verl's first batch of the output: its dataset factory (data.custom_cls), its no-padding collator and
    TensorDict, and the non-tensor fields its engine adds before the loss."""
    from verl.trainer.sft_trainer import create_sft_dataset
    from verl.utils import tensordict_utils as tu
    from verl.utils.dataset.dataset_utils import SFTTensorCollator

    os.environ["HF_DATASETS_CACHE"] = str(tmp_path / "hf")
    dataset = create_sft_dataset(str(scored.out), _data_config(**pear), None, None)
    data = tu.get_tensordict(SFTTensorCollator("no_padding")([dataset[i] for i in range(len(dataset))]),
                             {"pad_mode": "no_padding"})
    tu.assign_non_tensor(data, batch_num_tokens=int(data["loss_mask"].values().sum()), dp_size=1)
    return dataset, data


def _log_probs(scored, data):
    """The model's log-probs in verl's layout (use_remove_padding: the rows in one, position_ids restarting)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(scored.model, attn_implementation="sdpa")
    ids = data["input_ids"].values()
    logits = model(input_ids=ids[None], position_ids=data["position_ids"].values()[None]).logits[0]
    shifted = torch.log_softmax(logits, -1).gather(-1, torch.roll(ids, -1)[:, None]).squeeze(-1)
    return torch.nested.nested_tensor_from_jagged(shifted, data["input_ids"].offsets())


@pytest.mark.parametrize("granularity", ["token", "sequence"])
def test_verls_collator_keeps_every_rows_weights_aligned(granularity, tiny_scored, tmp_path):
    dataset, data = _batch(tiny_scored, tmp_path, mode="static", granularity=granularity)
    rows = tiny_scored.dataset(tmp_path / "hf2")
    column = f"pear_{'seq' if granularity == 'sequence' else granularity}_weight"
    for b, row in enumerate(rows):
        mask = torch.tensor(row["completion_mask"]).bool()
        expected = torch.tensor(row[column], dtype=torch.float32).expand(len(mask)) * mask
        assert torch.equal(data["input_ids"][b], torch.tensor(row["input_ids"]))
        assert torch.equal(data["loss_mask"][b].bool(), mask)
        assert data["pear_weights"][b].dtype == torch.float32
        assert torch.equal(data["pear_weights"][b], expected)


def test_unit_weights_give_verls_own_sft_loss(tiny_scored, tmp_path, verl_loss_slot):
    dataset, data = _batch(tiny_scored, tmp_path, mode="static")
    log_probs = _log_probs(tiny_scored, data)
    expected, _ = verl_loss_slot(None, {"log_probs": log_probs}, data)
    data["pear_weights"] = torch.nested.as_nested_tensor(
        [m.float() for m in data["loss_mask"].unbind()], layout=torch.jagged)
    got, _ = dataset.loss(None, {"log_probs": log_probs}, data)
    assert float(got.detach()) == pytest.approx(float(expected.detach()), rel=1e-6)


def test_the_dataset_installs_the_loss_and_a_batch_without_weights_stops(tiny_scored, tmp_path):
    from verl.workers.utils import losses

    dataset, data = _batch(tiny_scored, tmp_path, mode="static")
    assert losses.sft_loss is dataset.loss
    del data["pear_weights"]
    with pytest.raises(TrainingError, match="verl's SFT engine has no 'pear_weights'"):
        dataset.loss(None, {"log_probs": _log_probs(tiny_scored, data)}, data)


@pytest.mark.parametrize("overrides, message", [
    ({"pad_mode": "right"}, "pad_mode=right"),
    ({"truncation": "left"}, "truncation=left"),
    ({"pear": {"loss_normalize": "weights"}}, "loss_normalize=weights"),
    ({"pear": {"mode": "online", "normalize": "dataset"}}, "normalize=dataset"),
])
def test_what_verls_loss_slot_cannot_honour_is_refused(overrides, message):
    from pear_data.integrations.verl import verl_settings

    config = {"pad_mode": "no_padding", "truncation": "right", "pear": {}, **overrides}
    with pytest.raises(TrainingError, match=message):
        verl_settings(config)


def _verl_step(scored, tmp_path, overrides) -> float:
    """train/loss of the first step of verl's SFT trainer (file logger), on every row of the output."""
    log = tmp_path / "log.jsonl"
    command = [
        str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc_per_node", "1",
        str(ROOT / "tests" / "integrations" / "verl_cpu_main.py"),
        f"model.path={scored.model}", "model.enable_gradient_checkpointing=False",
        "+model.override_config.attn_implementation=sdpa", "engine.strategy=fsdp2", "engine.use_torch_compile=False",
        "+engine.mixed_precision.param_dtype=fp32", f"data.train_files={scored.out}",
        "data.custom_cls.path=pkg://pear_data.integrations.verl", "data.custom_cls.name=PearSFTDataset",
        "data.max_length=4096", "data.truncation=right", "data.train_batch_size=8", "data.num_workers=0",
        "trainer.total_training_steps=1", "trainer.logger=[console,file]", "trainer.device=cpu",
        f"trainer.default_local_dir={tmp_path / 'ckpt'}", "trainer.resume_mode=disable", *overrides,
    ]
    env = {**os.environ, "VERL_FILE_LOGGER_PATH": str(log), "HF_DATASETS_CACHE": str(tmp_path / "hf"),
           "PYTHONPATH": str(ROOT)}
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return json.loads(log.read_text().splitlines()[0])["data"]["train/loss"]


RUNS = {
    "static-token-rmpad": ("tiny_scored", {"mode": "static"}, ["model.use_remove_padding=True"]),
    "static-sequence-micro-batches": ("tiny_scored", {"mode": "static", "granularity": "sequence"},
                                      ["model.use_remove_padding=False", "data.max_token_len_per_gpu=1500"]),
    "online-block-cross-tokenizer": ("tiny_scored_cross", {"mode": "online", "granularity": "block",
                                                           "normalize": "sequence"},
                                     ["model.use_remove_padding=True", "data.max_token_len_per_gpu=1500"]),
}


@pytest.mark.parametrize("run", RUNS)
def test_the_first_step_of_verls_sft_trainer_is_pear_loss(run, request, tmp_path):
    """verl's real trainer, one step on 8 rows (one micro-batch, or several of at most 1500 tokens): its loss is
    pear_loss on the same rows, padded, with the model it starts from."""
    fixture, pear, overrides = RUNS[run]
    scored = request.getfixturevalue(fixture)
    flags = [f"+data.pear.{key}={value}" for key, value in pear.items()]
    got = _verl_step(scored, tmp_path, flags + overrides)
    config = WeightConfig(**{k: v for k, v in pear.items() if k != "mode"})
    assert got == pytest.approx(reference_loss(scored, pear["mode"], config, tmp_path / "hf-ref"), rel=1e-5)


def test_one_run_installs_one_loss(verl_loss_slot):
    from pear_data.integrations import PearSettings
    from pear_data.integrations.verl import install_pear_loss

    first = install_pear_loss(PearSettings())
    assert install_pear_loss(PearSettings()) is first  # the validation dataset, same data.pear
    with pytest.raises(TrainingError, match="other settings is installed already"):
        install_pear_loss(PearSettings(mode="online"))
