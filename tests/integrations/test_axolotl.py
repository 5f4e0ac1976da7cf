"""axolotl 0.19's trainer with the PEAR plugin on a pear-data output (opt-in: tests/integrations/frameworks.py).

Each run is axolotl's own path for a YAML config: `load_cfg` (the plugin registered, the `pear:` section
validated), the plugin manager's `load_datasets`, and `axolotl.train.train`, which builds axolotl's trainer with
the plugin's trainer class and collator, multipack sampler included. One step on 8 rows (one multipack bin, or
one padded batch), compared with `pear_loss` on the same rows padded.
"""

from __future__ import annotations

import pytest
import torch
import yaml

from pear_data.errors import TrainingError
from pear_data.weights import WeightConfig

from ..tiny_scored import (  # noqa: F401 - session fixtures
    tiny_merged_dir_fixture,
    tiny_scored_cross_fixture,
    tiny_scored_fixture,
    tiny_target_dir_fixture,
)
from .frameworks import reference_loss, require

require("axolotl")
PLUGIN = "pear_data.integrations.axolotl.PearPlugin"


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    monkeypatch.setenv("AXOLOTL_DO_NOT_TRACK", "1")  # axolotl's telemetry waits on the network otherwise
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf"))


def _cfg(scored, tmp_path, pear, plugins=(PLUGIN,), **overrides):
    from axolotl.cli.config import load_cfg

    config = {
        "base_model": str(scored.model), "plugins": list(plugins), "pear": pear,
        "datasets": [{"path": str(scored.out), "type": "pear_data"}], "sequence_len": 4096, "sample_packing": True,
        "micro_batch_size": 1, "gradient_accumulation_steps": 1, "max_steps": 1, "num_epochs": 1,
        "learning_rate": 1e-3, "optimizer": "adamw_torch", "lr_scheduler": "constant", "val_set_size": 0,
        "output_dir": str(tmp_path / "out"), "save_strategy": "no", "logging_steps": 1,
        "dataset_prepared_path": str(tmp_path / "prepared"), "attn_implementation": "sdpa",
        "bf16": False, "fp16": False, "tf32": False, **overrides,
    }
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "config.yml"
    path.write_text(yaml.safe_dump(config))
    return load_cfg(str(path))


def _datasets(cfg):
    from axolotl.integrations.base import PluginManager

    return PluginManager.get_instance().load_datasets(cfg, preprocess=False)


RUNS = {
    "static-token-packed": ("tiny_scored", {"mode": "static"}, {}),
    "static-sequence-padded": ("tiny_scored", {"mode": "static", "granularity": "sequence"},
                               {"sample_packing": False, "micro_batch_size": 8}),
    "online-block-cross-tokenizer-packed": ("tiny_scored_cross", {"mode": "online", "granularity": "block",
                                                                  "normalize": "sequence"}, {}),
}


@pytest.mark.parametrize("run", RUNS)
def test_the_first_step_of_axolotls_trainer_is_pear_loss(run, request, tmp_path):
    from axolotl.train import train

    fixture, pear, overrides = RUNS[run]
    scored = request.getfixturevalue(fixture)
    cfg = _cfg(scored, tmp_path, pear, **overrides)
    _, _, trainer = train(cfg=cfg, dataset_meta=_datasets(cfg))
    assert type(trainer).__name__ == "PearAxolotlTrainer"
    log = trainer.state.log_history[0]
    config = WeightConfig(**{k: v for k, v in pear.items() if k != "mode"})
    assert log["loss"] == pytest.approx(reference_loss(scored, pear["mode"], config, tmp_path / "hf-ref"), rel=1e-5)
    assert {"pear/weight_mean", "pear/nll"} <= set(log)


def test_a_multipack_batch_keeps_every_rows_weights_aligned(tiny_scored, tmp_path):
    from axolotl.train import setup_model_and_trainer

    cfg = _cfg(tiny_scored, tmp_path, {"mode": "static", "granularity": "block"})
    trainer = setup_model_and_trainer(cfg, _datasets(cfg))[0]
    batch = next(iter(trainer.get_train_dataloader()))
    rows = {tuple(r["input_ids"]): r for r in tiny_scored.dataset(tmp_path / "hf-rows")}
    starts = (batch["position_ids"][0] == 0).nonzero().flatten().tolist() + [batch["input_ids"].shape[1]]
    seen = 0
    for start, end in zip(starts[:-1], starts[1:]):
        ids = tuple(batch["input_ids"][0, start:end].tolist())
        if ids not in rows:  # the padding at the end of the packed row
            continue
        mask = torch.tensor(rows[ids]["completion_mask"]).bool()
        mask[0] = False
        assert torch.equal(batch["labels"][0, start:end] != -100, mask)
        assert torch.equal(batch["pear_weights"][0, start:end],
                           torch.tensor(rows[ids]["pear_block_weight"]) * mask)
        seen += 1
    assert seen == len(rows) and batch["pear_weights"].dtype == torch.float32


def test_a_batch_that_lost_its_weights_stops_training(tiny_scored, tmp_path):
    from axolotl.train import setup_model_and_trainer

    cfg = _cfg(tiny_scored, tmp_path, {"mode": "static"})
    trainer = setup_model_and_trainer(cfg, _datasets(cfg))[0]
    batch = next(iter(trainer.get_train_dataloader()))
    del batch["pear_weights"]
    with pytest.raises(TrainingError, match="axolotl's trainer has no 'pear_weights'"):
        trainer.compute_loss(trainer.model, batch)


def test_a_dataset_of_another_type_is_refused_and_without_the_plugin_axolotl_stops(tiny_scored, tmp_path):
    from axolotl.common.datasets import load_datasets

    cfg = _cfg(tiny_scored, tmp_path, {"mode": "static"})
    cfg.datasets[0]["type"] = "alpaca"
    with pytest.raises(TrainingError, match=r"datasets\[0\].type is 'alpaca'"):
        _datasets(cfg)
    plain = _cfg(tiny_scored, tmp_path / "plain", {"mode": "static"}, plugins=())
    with pytest.raises(ValueError, match="unhandled prompt tokenization strategy: pear_data"):
        load_datasets(cfg=plain)


def test_a_bad_pear_section_is_refused_when_the_config_loads(tiny_scored, tmp_path):
    with pytest.raises(ValueError, match="gamma have no effect in static mode"):
        _cfg(tiny_scored, tmp_path, {"mode": "static", "gamma": 0.9})
