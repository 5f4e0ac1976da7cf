"""PEAR weights in verl's SFT trainer (verl 0.9: `verl.trainer.sft_trainer`, the engine-based trainer).

What a verl user adds to an SFT run, all in the `data:` section of the config:

    data.custom_cls.path=pkg://pear_data.integrations.verl data.custom_cls.name=PearSFTDataset
    data.train_files=OUT/data data.max_length=2048 data.truncation=right data.pad_mode=no_padding
    +data.pear.mode=static +data.pear.granularity=token          # or mode=online and the weight flags

verl's own extension points carry the rest:

- the dataset: verl builds `data.custom_cls` with its constructor arguments (`PearSFTDataset`), and its
  no-padding collator turns every tensor of an item into a jagged nested tensor, the weights included;
- the loss: verl's SFT trainers bind the loss when they build their engine, after the datasets, from the module
  attribute `verl.workers.utils.losses.sft_loss` (`SFTTrainer._build_engine`). There is no config key for it,
  so `PearSFTDataset` replaces that attribute when verl constructs it (`install_pear_loss`, which a script that
  builds its own datasets calls itself). That one attribute is the whole patch.

The loss sees what verl's own `sft_loss` sees: the log-probs of the micro-batch as a nested tensor in verl's
shifted layout (index t = log p(token t + 1 | tokens <= t), the same whether `model.use_remove_padding`
packed the rows into one or not), and the micro-batch's nested `loss_mask` and PEAR columns, whose values are
aligned token by token with `input_ids.values()` (checked). It concatenates the rows into one padding-free row
with `position_ids` restarting at every row, so every PEAR sum restarts per row, and divides by verl's
normalizer: the label tokens of the whole step over every data-parallel rank (`batch_num_tokens`), times
the data-parallel size, as verl's `sft_loss` does. With unit weights it is verl's `sft_loss`.

Not supported (refused by name): `loss_normalize: weights` and online `normalize: dataset` (each needs a sum
over the step that verl's loss slot does not see), `data.truncation=left`, `data.pad_mode=right`.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..errors import TrainingError
from ..loss import IGNORE_INDEX, pear_loss
from ..schema import BEHAVIOR_LOGPROBS, COMPLETION_MASK, INPUT_IDS, SHARED_BOUNDARY
from ..training_data import prepare_dataset
from . import PEAR_WEIGHTS, PearSettings, check_batch, load_output

logger = logging.getLogger(__name__)
NO_PADDING = "no_padding"  # verl's DatasetPadMode.NO_PADDING


@dataclass(frozen=True)
class PearVerlLoss:
    """verl's SFT loss signature, `(config, model_output, data, dp_group) -> (loss, metrics)`, with PEAR weights.

    model_output["log_probs"]: nested [B, j] (jagged), index t = log p(token t + 1); the last of a row is unused.
    data: the micro-batch TensorDict: nested `input_ids`, `loss_mask` and `pear_weights` (static) or
        `behavior_logprobs` + `shared_boundary` (online), each [B, j] with the offsets of `input_ids`; non-tensor
        `batch_num_tokens` (label tokens of the step, every data-parallel rank) and `dp_size`.
    Raises `TrainingError` when the PEAR column is missing or not aligned with `input_ids`.
    """

    settings: PearSettings

    def __call__(self, config: Any, model_output: Mapping[str, Any], data: Any, dp_group: Any = None
                 ) -> tuple[torch.Tensor, dict]:
        check_batch(list(data.keys()), self.settings, "verl's SFT engine")
        pad_mode = _non_tensor(data, "pad_mode", NO_PADDING)
        if str(getattr(pad_mode, "value", pad_mode)) != NO_PADDING:
            raise TrainingError(f"the PEAR loss needs data.pad_mode=no_padding, got {pad_mode!r}")
        labels, logprobs, position_ids = flat_rows(data, model_output["log_probs"])
        result = pear_loss(labels, logprobs=logprobs, logprobs_layout="aligned", position_ids=position_ids,
                           config=self.settings.config, normalizer=data["batch_num_tokens"],
                           **self._weights(data, labels.device))
        return result.loss * data["dp_size"], {}

    def _weights(self, data: Any, device: torch.device) -> dict[str, torch.Tensor]:
        offsets = data[INPUT_IDS].offsets()
        if self.settings.mode == "static":
            return {"weights": _aligned(data, PEAR_WEIGHTS, offsets).to(device)[None]}
        out = {"behavior_logprobs": _aligned(data, BEHAVIOR_LOGPROBS, offsets).to(device)[None]}
        if SHARED_BOUNDARY in data.keys():
            out["shared_boundary"] = _aligned(data, SHARED_BOUNDARY, offsets).to(device)[None]
        return out


def flat_rows(data: Any, log_probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The micro-batch's rows as one padding-free row, as `pear_loss` reads it: (labels, logprobs, position_ids),
    each [1, T] with T the micro-batch's tokens.

    labels: input_ids where loss_mask, else -100. logprobs: float, "aligned" (index t = log p(token t)): verl's
    shifted log-probs moved one to the right. position_ids: 0.. restarting at every row, from the offsets of
    `input_ids` (a row's first token is never a label, so the value moved in from the row before is unused).
    """
    offsets = data[INPUT_IDS].offsets()
    ids = data[INPUT_IDS].values()
    loss_mask = _aligned(data, "loss_mask", offsets)
    if log_probs.offsets().shape != offsets.shape or not torch.equal(log_probs.offsets(), offsets):
        raise TrainingError("verl's log_probs are not aligned with input_ids (another nested layout)")
    shifted = log_probs.values()
    logprobs = torch.cat([shifted.new_zeros(1), shifted[:-1]])
    lengths = offsets.diff()
    position_ids = torch.arange(ids.numel(), device=ids.device) - torch.repeat_interleave(offsets[:-1], lengths)
    labels = torch.where(loss_mask.bool(), ids, IGNORE_INDEX)
    return labels[None], logprobs[None], position_ids[None]


def _aligned(data: Any, key: str, offsets: torch.Tensor) -> torch.Tensor:
    """The values of a nested [B, j] column, checked to have the offsets of input_ids."""
    column = data[key]
    if not column.is_nested or not torch.equal(column.offsets().to(offsets.device), offsets):
        raise TrainingError(f"verl's batch column {key!r} is not aligned with input_ids token by token: the PEAR "
                            "columns must come from PearSFTDataset through verl's no-padding collator")
    return column.values()


def _non_tensor(data: Any, key: str, default: Any) -> Any:
    from verl.utils import tensordict_utils

    return tensordict_utils.get_non_tensor_data(data=data, key=key, default=default)


def install_pear_loss(settings: PearSettings) -> PearVerlLoss:
    """Put the PEAR loss in the slot of verl's SFT loss (`verl.workers.utils.losses.sft_loss`) and return it.

    Call it before verl's SFT trainer builds its engine (`PearSFTDataset` does, when verl constructs it).
    Raises `TrainingError` when a loss with other settings is installed already (train and validation
    datasets with different `data.pear`), or when this verl binds its SFT loss otherwise.
    """
    from verl.workers.utils import losses

    current = getattr(losses, "sft_loss", None)
    if isinstance(current, PearVerlLoss):
        if current.settings != settings:
            raise TrainingError(f"a PEAR loss with other settings is installed already ({current.settings}); one "
                                "run trains with one data.pear section")
        return current
    # A trainer module holding its own `sft_loss` name would never see the replacement.
    bound = [name for name in ("verl.trainer.sft_trainer", "verl.trainer.sft_trainer_ray")
             if getattr(sys.modules.get(name), "sft_loss", None) is not None]
    if current is None or bound:
        where = ", ".join(bound) or "verl.workers.utils.losses has no sft_loss"
        raise TrainingError(f"this verl binds its SFT loss otherwise ({where}): pear_data.integrations.verl supports "
                            "verl's engine SFT trainer (verl 0.9), which reads verl.workers.utils.losses.sft_loss "
                            "when it builds its engine")
    losses.sft_loss = PearVerlLoss(settings)
    logger.info("PEAR loss installed in verl's SFT loss slot (%s)", settings)
    return losses.sft_loss


def verl_settings(config: Mapping[str, Any]) -> PearSettings:
    """`PearSettings` from verl's `data` section (`data.pear`), checked against what verl's loss slot allows."""
    pear = config.get("pear")
    settings = PearSettings.from_section(dict(pear) if pear is not None else None, "data.pear")
    if settings.loss_normalize != "tokens":
        raise TrainingError("data.pear.loss_normalize=weights is not supported in verl: its loss slot sees one "
                            "micro-batch, not the weight sum of the step; use tokens (verl's own normalizer)")
    if settings.mode == "online" and settings.config.normalize == "dataset":
        raise TrainingError("data.pear.normalize=dataset (online) is not supported in verl: the mean over the "
                            "step is not known in its loss slot; use sequence or none, or static weights")
    pad_mode = str(config.get("pad_mode", NO_PADDING))
    if pad_mode.split(".")[-1].lower() != NO_PADDING:
        raise TrainingError(f"data.pad_mode={pad_mode}: PEAR trains with data.pad_mode=no_padding, the layout "
                            "verl's engines train on")
    truncation = config.get("truncation", "error")
    if truncation not in ("right", "error"):
        raise TrainingError(f"data.truncation={truncation}: pear-data's truncation rule keeps the first max_length "
                            "tokens (data.truncation=right); 'error' refuses longer rows")
    return settings


class PearSFTDataset(torch.utils.data.Dataset):
    """A pear-data output as verl's SFT trainer reads it (`data.custom_cls`), one row per item.

    verl constructs it as `PearSFTDataset(parquet_files=data.train_files, tokenizer=..., config=data,
    processor=..., max_samples=...)`. `parquet_files`: Parquet files or directories (a pear-data output OUT, or
    OUT/data). From `config`: `pear` (`PearSettings.from_section`), `max_length`, `truncation` ("right": the
    one truncation rule, keep the first max_length tokens: online rows are cut, static rows longer than
    max_length are refused naming `pear-data reweight --max-length`; "error": every longer row is refused),
    `pad_mode` ("no_padding"). The first `max_samples` rows are kept when it is > 0. Rows with no label token
    left are dropped and counted (`report`). Constructing it installs the PEAR loss (`install_pear_loss`).

    Item i, every tensor [n] aligned with the row's tokens (index t = token t):
        input_ids int64; position_ids int64 (0..n-1); loss_mask int64 (completion_mask, 0 at t = 0);
        static: pear_weights float32 (the weight column; pear_seq_weight spread over the completion);
        online: behavior_logprobs float32, shared_boundary int64.
    """

    def __init__(self, parquet_files: Any, tokenizer: Any = None, config: Mapping[str, Any] | None = None,
                 processor: Any = None, max_samples: int = -1) -> None:
        config = config or {}
        self.settings = verl_settings(config)
        dataset = load_output(parquet_files, "data.train_files / val_files")
        if max_samples is not None and 0 < max_samples < len(dataset):
            dataset = dataset.select(range(max_samples))
        max_length = config.get("max_length")
        dataset, self.report = prepare_dataset(dataset, self.settings.training_data(max_length))
        if self.report.cut and config.get("truncation", "error") == "error":
            raise TrainingError(f"{self.report.cut} row(s) are longer than data.max_length={max_length} and "
                                "data.truncation=error; set data.truncation=right to keep their first max_length "
                                "tokens (pear-data's truncation rule), or raise data.max_length")
        self.rows = dataset.select_columns(self.settings.training_data(None).columns).with_format("numpy")
        self.loss = install_pear_loss(self.settings)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        row = self.rows[int(index)]
        ids = torch.as_tensor(row[INPUT_IDS], dtype=torch.int64)
        mask = torch.as_tensor(row[COMPLETION_MASK] != 0, dtype=torch.int64)
        mask[0] = 0  # a row's first token has no context
        item = {"input_ids": ids, "position_ids": torch.arange(len(ids)), "loss_mask": mask}
        if self.settings.mode == "static":
            weights = np.asarray(row[self.settings.weight_column], dtype=np.float32)
            item[PEAR_WEIGHTS] = torch.as_tensor(weights, dtype=torch.float32) * mask  # [n]; a scalar spreads
        else:
            item[BEHAVIOR_LOGPROBS] = torch.as_tensor(row[BEHAVIOR_LOGPROBS], dtype=torch.float32)
            item[SHARED_BOUNDARY] = torch.as_tensor(row[SHARED_BOUNDARY], dtype=torch.int64)
        return item

