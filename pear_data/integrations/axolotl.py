"""PEAR weights in axolotl's SFT trainer: an axolotl plugin (axolotl 0.19).

    base_model: ./my-model                  # the target model the data was scored with
    plugins:
      - pear_data.integrations.axolotl.PearPlugin
    pear:
      mode: static                          # or online (paper-exact)
      granularity: token                    # block, sequence; online: the other WeightConfig flags too
    datasets:
      - path: gsm8k-pear                    # a pear-data output directory (or OUT/data, or Parquet files)
        type: pear_data
    sequence_len: 2048                      # the truncation rule: a row keeps its first sequence_len tokens
    sample_packing: true

The plugin uses axolotl's hooks only:

- `get_input_args`: the `pear:` section (`PearArgs`, checked by `PearSettings.from_section`);
- `load_datasets`: the `type: pear_data` datasets, read and prepared by pear-data (columns checked, the
  truncation rule, rows with no label dropped), plus the `length` column axolotl's multipack sampler reads;
  without the plugin axolotl stops on the unknown dataset type instead of training on something else;
- `get_collator_cls_and_kwargs`: `PearAxolotlCollator` (`pear_data.collator.PearCollator`), which turns
  axolotl's multipack bins into one padding-free row with `position_ids` restarting at every row;
- `get_training_args_mixin` / `get_training_args` / `get_trainer_cls`: `PearAxolotlTrainer`, axolotl's
  trainer with the loss of `pear_data.trainer.PearLossMixin` (its step normalizers and `pear/*` diagnostics).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow.compute as pc
from axolotl.common.datasets import TrainDatasetMeta
from axolotl.core.trainers.base import AxolotlTrainer
from axolotl.integrations.base import BasePlugin
from pydantic import BaseModel, field_validator

from ..collator import PearCollator
from ..errors import TrainingError
from ..schema import COMPLETION_MASK, INPUT_IDS
from ..trainer import PearLossMixin
from ..training_data import prepare_dataset
from . import PearSettings, check_batch, load_output

DATASET_TYPE = "pear_data"


class PearArgs(BaseModel):
    """The `pear:` section of an axolotl config: the keys of `PearSettings.from_section`."""

    pear: dict[str, Any] | None = None

    @field_validator("pear")
    @classmethod
    def _check(cls, section: dict[str, Any] | None) -> dict[str, Any] | None:
        PearSettings.from_section(section, "pear")  # TrainingError is a ValueError: pydantic reports it
        return section


@dataclass
class PearTrainingArgsMixin:
    """Carries the `pear:` section from the config to `PearAxolotlTrainer` (axolotl's training arguments)."""

    pear_section: dict[str, Any] | None = field(default=None, metadata={"help": "the pear: section of the config"})


def _settings(cfg: Any) -> PearSettings:
    return PearSettings.from_section(cfg.get("pear"), "pear")


class PearPlugin(BasePlugin):
    """Train on a pear-data output with PEAR weights (module docstring)."""

    def get_input_args(self) -> str:
        return f"{__name__}.PearArgs"

    def get_training_args_mixin(self) -> str:
        return f"{__name__}.PearTrainingArgsMixin"

    def get_training_args(self, cfg: Any) -> dict[str, Any]:
        return {"pear_section": dict(cfg.get("pear") or {})}

    def load_datasets(self, cfg: Any, preprocess: bool = False) -> TrainDatasetMeta:
        return load_pear_datasets(cfg)

    def get_collator_cls_and_kwargs(self, cfg: Any, is_eval: bool = False) -> tuple[type, dict[str, Any]]:
        settings = _settings(cfg)
        packing = bool(cfg.sample_packing and (not is_eval or cfg.eval_sample_packing is not False))
        return PearAxolotlCollator, {"weights": settings.weight_column, "behavior": settings.mode == "online",
                                     "max_length": cfg.sequence_len, "padding_free": packing}

    def get_trainer_cls(self, cfg: Any) -> type:
        return PearAxolotlTrainer


def load_pear_datasets(cfg: Any) -> TrainDatasetMeta:
    """The train (and eval) datasets of an axolotl config whose datasets are pear-data outputs.

    `datasets` (and `test_datasets`) entries must have `type: pear_data`; their rows are prepared for
    `cfg.pear` and `cfg.sequence_len` (`pear_data.training_data.prepare_dataset`); `val_set_size` splits the
    train rows (seed `cfg.seed`) when there is no `test_datasets`. Under `sample_packing` a `length` column
    is added for axolotl's multipack sampler (its dataloader drops it). The step count is axolotl's own
    (`calculate_total_num_steps`, capped by `max_steps`).
    """
    from axolotl.utils.trainer import calculate_total_num_steps

    data = _settings(cfg).training_data(cfg.sequence_len)
    train, _ = prepare_dataset(_read(cfg.datasets, "datasets"), data, "train")
    evaluation = None
    if cfg.test_datasets:
        evaluation, _ = prepare_dataset(_read(cfg.test_datasets, "test_datasets"), data, "eval")
    elif cfg.val_set_size:
        split = train.train_test_split(test_size=cfg.val_set_size, seed=cfg.seed or 42)
        train, evaluation = split["train"], split["test"]
    if cfg.sample_packing:
        train = _with_length(train)
        if evaluation is not None and cfg.eval_sample_packing is not False:
            evaluation = _with_length(evaluation)
    cfg.total_supervised_tokens = _label_tokens(train)  # axolotl would count a `labels` column
    steps = calculate_total_num_steps(cfg, train)
    return TrainDatasetMeta(train, evaluation, min(steps, cfg.max_steps) if cfg.max_steps else steps)


def _read(entries: list[Any], key: str) -> Any:
    """The rows of the config's dataset entries, each a pear-data output with `type: pear_data`."""
    import datasets

    parts = []
    for i, entry in enumerate(entries):
        if entry.get("type") != DATASET_TYPE:
            raise TrainingError(f"{key}[{i}].type is {entry.get('type')!r}: with the PEAR plugin every dataset is a "
                                f"pear-data output with type: {DATASET_TYPE} (other data has no PEAR weights)")
        parts.append(load_output(entry.get("data_files") or entry["path"], f"{key}[{i}].path"))
    return parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)


def _with_length(dataset: Any) -> Any:
    lengths = pc.list_value_length(dataset.data.column(INPUT_IDS)).to_numpy().astype(np.int64)
    return dataset.add_column("length", lengths)


def _label_tokens(dataset: Any) -> int:
    return int(pc.sum(pc.list_flatten(dataset.data.column(COMPLETION_MASK))).as_py() or 0)


class PearAxolotlCollator:
    """`pear_data.collator.PearCollator` behind axolotl's collator interface, `(tokenizer, **kwargs)`.

    Takes a list of rows, or under `sample_packing` axolotl's multipack bins (a list of lists of rows): the rows
    of every bin go into one padding-free batch row, `position_ids` restarting at 0 on every row (the model keeps
    the rows apart, and `pear_loss` restarts every PEAR sum), as TRL's padding-free collator. Output: see
    `PearCollator` (`labels` from `completion_mask`, `pear_weights` float32 or `behavior_logprobs` +
    `shared_boundary`, all aligned with `input_ids`). `padding` and `return_tensors` are axolotl's arguments:
    rows are always padded (or packed) into torch tensors.
    """

    def __init__(self, tokenizer: Any, *, weights: str | None, behavior: bool, max_length: int | None,
                 padding_free: bool, pad_to_multiple_of: int | None = None, padding: Any = True,
                 return_tensors: str = "pt") -> None:
        pad = getattr(tokenizer, "pad_token_id", None)
        pad = pad if isinstance(pad, int) else getattr(tokenizer, "eos_token_id", None)
        self.collator = PearCollator(pad if isinstance(pad, int) else 0, weights=weights, behavior=behavior,
                                     max_length=max_length, pad_to_multiple_of=pad_to_multiple_of,
                                     padding_free=padding_free)

    @property
    def columns(self) -> list[str]:
        return self.collator.columns

    @property
    def optional_columns(self) -> list[str]:
        return self.collator.optional_columns

    @property
    def max_length(self) -> int | None:
        return self.collator.max_length

    def __call__(self, features: list[Any]) -> dict[str, Any]:
        if features and isinstance(features[0], list):  # multipack bins
            features = [row for bin_rows in features for row in bin_rows]
        return self.collator(features)


class PearAxolotlTrainer(PearLossMixin, AxolotlTrainer):
    """axolotl's trainer with the PEAR loss (`pear_data.trainer.PearLossMixin`), for the settings of the config's
    `pear:` section (carried by `args.pear_section`). The first batch that reaches the loss is checked to hold
    the weights (`check_batch`); axolotl's token-per-second count is not kept (its `compute_loss` is replaced)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        training_args = kwargs.get("args", args[1] if len(args) > 1 else None)  # Trainer's (model, args, ...)
        self.pear_settings = PearSettings.from_section(getattr(training_args, "pear_section", None), "pear")
        self._pear_checked = False
        super().__init__(*args, pear_mode=self.pear_settings.mode, pear_config=self.pear_settings.config,
                         pear_normalize=self.pear_settings.loss_normalize, **kwargs)

    def compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Any:
        if not self._pear_checked:
            check_batch(list(inputs), self.pear_settings, "axolotl's trainer")
            self._pear_checked = True
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
