"""`PearLossMixin`: the PEAR loss for any `transformers.Trainer` subclass, through the hooks TRL overrides
(docs/design.md 4.2-4.4). `pear_data.trainer.PearTrainer` and `pear_data.sft_trainer.PearSFTTrainer` are this
mixin on `transformers.Trainer` and TRL's `SFTTrainer`; put it first in your own subclass's bases.

What the mixin changes, and nothing else:
- `__init__`: the datasets are prepared for the mode (`pear_data.training_data`: columns checked, the
  truncation rule, rows with no label dropped); `data_collator` defaults to `PearCollator`.
- `_set_signature_columns_if_needed`: the collator's columns are kept by `remove_unused_columns`.
- `get_batch_samples` / `compute_loss` / `training_step`: every normalizer is the one of the whole
  optimizer step, all micro-batches of gradient accumulation and all ranks together, so k micro-batches
  or n ranks give the update of one batch of the same rows (`_StepTotals`).
- `log`: the weight diagnostics (`pear/weight_mean`, `pear/weight_ess`, `pear/nll`, ...), summed over the
  logging window and reduced over ranks.
`eval_loss` is the PEAR-weighted loss of each evaluation batch (the objective being trained, averaged over
batches as transformers does); `eval_pear/nll` is the plain mean NLL of the label tokens.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

import torch

from .collator import PearCollator
from .errors import TrainingError
from .loss import LossStats, PearLossOutput, pear_loss
from .schema import ADDED_NAMES, BEHAVIOR_LOGPROBS, SHARED_BOUNDARY, WEIGHT_COLUMNS
from .training_data import TrainingData, prepare_dataset
from .weights import WeightConfig

PearMode = Literal["static", "online"]
# Collator outputs that are not model inputs.
_BATCH_COLUMNS = ("labels", "pear_weights", BEHAVIOR_LOGPROBS, SHARED_BOUNDARY)


def _pad_token_id(processing_class: Any) -> int:
    tokenizer = getattr(processing_class, "tokenizer", processing_class)  # a processor wraps its tokenizer
    for name in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, name, None)
        if isinstance(value, int):
            return value
    return 0  # any valid id: padding is masked out of attention and labels


@dataclass
class _StepTotals:
    """The normalizers of one optimizer step, over its micro-batches and every rank (design 4.3).

    tokens: label tokens; static_weight: the sum of the static weights on them. `rescale`: the online weight
    sum is known only after every forward, so each micro-batch is normalized by `tokens` and the gradients
    are rescaled by tokens / (sum of the online weights) after the last one (exact: the weights are detached,
    so the gradient is linear in 1 / normalizer).
    """

    micro_batches: int
    tokens: torch.Tensor
    static_weight: torch.Tensor
    rescale: bool
    done: int = 0
    online_weight: float = 0.0
    returned: float = 0.0
    stats: LossStats | None = None  # rescale: the step's stats, logged once its weights are known


class PearLossMixin:
    """The PEAR loss for a `transformers.Trainer` subclass (put the mixin first).

    Extra keyword arguments, all optional:
    pear_mode: "static" (weights stored in the dataset) or "online" (weights from the live target log-probs
        and the stored `behavior_logprobs`: paper-exact).
    pear_config: a `WeightConfig`. Static: its granularity picks the weight column. Online: the whole config
        drives the weights; normalize="dataset" normalizes over the optimizer step's batch (every
        micro-batch and rank). Default WeightConfig().
    pear_normalize: "tokens" (divide by the step's label tokens) or "weights" (by the step's weight sum).
    """

    def __init__(self, model: Any = None, args: Any = None, data_collator: Any = None, train_dataset: Any = None,
                 eval_dataset: Any = None, *more: Any, pear_mode: PearMode = "static",
                 pear_config: WeightConfig | None = None, pear_normalize: Literal["tokens", "weights"] = "tokens",
                 **kwargs: Any) -> None:
        if pear_normalize not in ("tokens", "weights"):
            raise TrainingError(f"pear_normalize must be 'tokens' or 'weights', got {pear_normalize!r}")
        self.pear_mode = pear_mode
        self.pear_config = pear_config or WeightConfig()
        self.pear_normalize = pear_normalize
        self.pear_data = self._pear_training_data(args, data_collator)
        self._check_accumulation(args)
        self.pear_reports = {}
        train_dataset = self._pear_prepare(train_dataset, "train", args)
        if isinstance(eval_dataset, dict):
            eval_dataset = {key: self._pear_prepare(value, key, args, True) for key, value in eval_dataset.items()}
        elif eval_dataset is not None:
            eval_dataset = self._pear_prepare(eval_dataset, "eval", args, True)
        if data_collator is None:
            data_collator = self._pear_collator(args, kwargs.get("processing_class"))
        self._pear_step: _StepTotals | None = None
        self._pear_stats: dict[str, LossStats | None] = {"train": None, "eval": None}
        trainer_args = self._trainer_args(args)
        super().__init__(model, trainer_args, data_collator, train_dataset, eval_dataset, *more, **kwargs)
        if trainer_args is not args:
            self.args = args
        self._check_parallelism()

    # ------------------------------------------------------------------ set-up

    def _pear_training_data(self, args: Any, data_collator: Any) -> TrainingData:
        """What training reads (subclasses add packing)."""
        max_length = getattr(data_collator, "max_length", None) or getattr(args, "max_length", None)
        column = WEIGHT_COLUMNS.get(self.pear_config.granularity) if self.pear_mode == "static" else None
        return TrainingData(self.pear_mode, column, max_length)

    def _pear_prepare(self, dataset: Any, name: str, args: Any, evaluation: bool = False) -> Any:
        if dataset is None:
            return None
        dataset, self.pear_reports[name] = prepare_dataset(dataset, self.pear_data, name)
        return dataset

    def _pear_collator(self, args: Any, processing_class: Any) -> PearCollator:
        data = self.pear_data
        return PearCollator(pad_token_id=_pad_token_id(processing_class), weights=data.weights,
                            behavior=data.mode == "online", max_length=data.max_length)

    def _trainer_args(self, args: Any) -> Any:
        """The arguments the base trainer's `__init__` sees (subclasses hand it a copy)."""
        return args

    def _check_accumulation(self, args: Any) -> None:
        """Refuse what the step normalizers cannot make exact (design 4.3)."""
        config = self.pear_config
        several = getattr(args, "gradient_accumulation_steps", 1) > 1 or getattr(args, "world_size", 1) > 1
        rescale = self.pear_mode == "online" and (config.normalize == "dataset" or self.pear_normalize == "weights")
        if not (several and rescale):
            return
        if getattr(args, "deepspeed", None):
            raise TrainingError(
                "online weights normalized over the step (normalize='dataset' or pear_normalize='weights') with "
                "gradient accumulation or several ranks rescale the gradients after the last micro-batch, which "
                "DeepSpeed's partitioned gradients do not allow; use pear_normalize='tokens' with "
                "normalize='none' or 'sequence', or static weights"
            )
        if config.normalize == "dataset" and config.max_weight is not None:
            raise TrainingError(
                "online weights with normalize='dataset' and a cap (max_weight) cannot be normalized over an "
                "optimizer step of several micro-batches or ranks: the cap applies after the step's mean, which "
                "is known only after the last forward. Use gradient_accumulation_steps=1 on one rank, drop the "
                "cap, or normalize='sequence' / 'none'"
            )

    def _check_parallelism(self) -> None:
        """Tensor, context and sequence parallelism split a row's tokens or its vocabulary across ranks: the
        PEAR sums of a row (and the step normalizers, which count each row once per data-parallel rank) would
        be computed on pieces. Refused by name."""
        config = getattr(self.accelerator, "parallelism_config", None)
        for name in ("tp_size", "cp_size", "sp_size"):
            size = getattr(config, name, None) or 1
            if size > 1:
                raise TrainingError(f"the PEAR trainers do not support {name}={size} (tensor, context or sequence "
                                    "parallelism): a row's tokens or logits would be split across ranks; use data "
                                    "parallelism (DDP, FSDP, DeepSpeed ZeRO)")

    def _set_signature_columns_if_needed(self) -> None:
        # remove_unused_columns keeps only these: add what the collator reads (all added columns when the
        # collator does not say).
        super()._set_signature_columns_if_needed()
        extra = getattr(self.data_collator, "columns", ADDED_NAMES)
        extra = [*extra, *getattr(self.data_collator, "optional_columns", ())]
        self._signature_columns = list(dict.fromkeys([*self._signature_columns, *extra]))

    # ------------------------------------------------------------------ the step's normalizers

    def get_batch_samples(self, epoch_iterator: Any, num_batches: int, device: Any) -> tuple[list, Any]:
        batches, num_items = super().get_batch_samples(epoch_iterator, num_batches, device)
        tokens = torch.zeros((), dtype=torch.float64, device=device)
        static = torch.zeros((), dtype=torch.float64, device=device)
        for batch in batches:
            labels = batch["labels"].to(device) != -100
            tokens += labels.sum()
            if "pear_weights" in batch:
                static += torch.where(labels, batch["pear_weights"].to(device).double(), 0.0).sum()
        if self.accelerator.num_processes > 1:
            tokens, static = self._sum_over_ranks(torch.stack([tokens, static])).unbind()
        config = self.pear_config
        rescale = self.pear_mode == "online" and (config.normalize == "dataset" or self.pear_normalize == "weights")
        rescale = rescale and (len(batches) > 1 or self.accelerator.num_processes > 1)
        self._pear_step = _StepTotals(len(batches), tokens, static, rescale)
        return batches, num_items

    def _normalizer(self, num_items_in_batch: Any = None) -> tuple[torch.Tensor | None, WeightConfig]:
        """The loss denominator of this micro-batch and the weight config it is computed with. Outside a
        training step (evaluation, a direct call): transformers' `num_items_in_batch` with normalize="tokens"
        when given, else None (the batch's own)."""
        step = self._pear_step if self.model.training else None
        if step is None:
            by_items = num_items_in_batch is not None and self.pear_normalize == "tokens"
            return (torch.as_tensor(num_items_in_batch) if by_items else None), self.pear_config
        if step.rescale:  # normalized after the last micro-batch (_StepTotals)
            unnormalized = "none" if self.pear_config.normalize == "dataset" else self.pear_config.normalize
            return step.tokens.clamp(min=1), dataclasses.replace(self.pear_config, normalize=unnormalized)
        if self.pear_normalize == "weights":
            if self.pear_mode == "online":  # one micro-batch on one rank: its own weight sum is the step's
                return None, self.pear_config
            return step.static_weight.clamp(min=torch.finfo(torch.float32).tiny), self.pear_config
        return step.tokens.clamp(min=1), self.pear_config

    def training_step(self, model: Any, inputs: dict[str, Any], num_items_in_batch: Any = None) -> torch.Tensor:
        loss = super().training_step(model, inputs, num_items_in_batch)
        step = self._pear_step
        if step is None:
            return loss
        step.done += 1
        if not step.rescale:
            if step.done == step.micro_batches:
                self._pear_step = None
            return loss
        if step.done < step.micro_batches:
            step.returned += float(loss)
            return loss
        self._pear_step = None
        weight = torch.tensor(step.online_weight, dtype=torch.float64, device=step.tokens.device)
        if self.accelerator.num_processes > 1:
            weight = self._sum_over_ranks(weight[None])[0]
        factor = float(step.tokens.clamp(min=1) / weight.clamp(min=torch.finfo(torch.float32).tiny))
        for parameter in model.parameters():
            if parameter.grad is not None:
                parameter.grad.mul_(factor)
        if step.stats is not None:  # normalize="dataset": the step's weights are the micro-batches' times factor
            self._add_stats("train", step.stats.scaled(factor) if self.pear_config.normalize == "dataset"
                            else step.stats)
        # What the Trainer adds up and logs: the step's loss with the step's normalizer.
        return loss * factor + (factor - 1.0) * step.returned

    # ------------------------------------------------------------------ the loss

    def _pear_batch(self, inputs: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """(model inputs, pear_loss arguments) of a collated batch."""
        needed = BEHAVIOR_LOGPROBS if self.pear_mode == "online" else "pear_weights"
        if "labels" not in inputs or needed not in inputs:
            raise KeyError(
                f"pear_mode={self.pear_mode!r} needs 'labels' and {needed!r} in every batch, got {sorted(inputs)}: "
                "use pear_data.collator.PearCollator (weights=... for static, behavior=True for online) as "
                "data_collator"
            )
        model_inputs = {k: v for k, v in inputs.items() if k not in _BATCH_COLUMNS}
        model_inputs["use_cache"] = False
        online = self.pear_mode == "online"
        loss_inputs = {
            "weights": None if online else inputs["pear_weights"],
            "behavior_logprobs": inputs[BEHAVIOR_LOGPROBS] if online else None,
            "shared_boundary": inputs.get(SHARED_BOUNDARY) if online else None,
            "position_ids": inputs.get("position_ids"),
        }
        return model_inputs, loss_inputs

    def _pear_forward(self, model: Any, model_inputs: dict[str, Any], labels: torch.Tensor, **loss_kwargs: Any
                      ) -> tuple[PearLossOutput, Any]:
        """Forward + PEAR loss. Here: from the full logits; PearSFTTrainer uses TRL's fused head instead."""
        outputs = model(**model_inputs)
        return pear_loss(labels, logits=outputs.logits, **loss_kwargs), outputs

    def compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: torch.Tensor | int | None = None) -> Any:
        model_inputs, loss_inputs = self._pear_batch(inputs)
        normalizer, config = self._normalizer(num_items_in_batch)
        result, outputs = self._pear_forward(model, model_inputs, inputs["labels"], config=config,
                                             normalize=self.pear_normalize, normalizer=normalizer, **loss_inputs)
        loss = result.loss
        step = self._pear_step if self.model.training else None
        if normalizer is not None:
            # The normalizer covers every micro-batch and rank: Trainer must not divide by the accumulation
            # steps, and DDP's gradient average over ranks is undone here.
            self.loss_is_scaled_for_ga = True
            loss = loss * self.accelerator.num_processes
        if step is not None and step.rescale:
            step.online_weight += float(result.stats.sums[1])
            step.stats = result.stats if step.stats is None else step.stats + result.stats
        else:
            self._add_stats("train" if self.model.training else "eval", result.stats)
        if return_outputs and getattr(outputs, "logits", None) is None:
            with torch.no_grad():  # callers asking for outputs want logits (evaluation with compute_metrics)
                outputs = model(**model_inputs)
        return (loss, outputs) if return_outputs else loss

    # ------------------------------------------------------------------ logging

    def _add_stats(self, mode: str, stats: LossStats) -> None:
        total = self._pear_stats[mode]
        self._pear_stats[mode] = stats if total is None else total + stats

    def _sum_over_ranks(self, values: torch.Tensor) -> torch.Tensor:
        """float64 [K] summed over every rank (a collective: every rank calls it at the same point)."""
        world = self.accelerator.num_processes
        return self.accelerator.gather(values.double()).view(world, -1).sum(dim=0)

    def _stats_over_ranks(self, stats: LossStats | None) -> LossStats | None:
        device = self.accelerator.device
        if stats is None:
            stats = LossStats(torch.zeros(len(LossStats.FIELDS), dtype=torch.float64, device=device),
                              torch.tensor(float("inf"), dtype=torch.float64, device=device),
                              torch.tensor(float("-inf"), dtype=torch.float64, device=device))
        world = self.accelerator.num_processes
        bounds = self.accelerator.gather(torch.stack([stats.weight_min, stats.weight_max]).to(device)).view(world, 2)
        total = LossStats(self._sum_over_ranks(stats.sums.to(device)), bounds[:, 0].min(), bounds[:, 1].max())
        return total if float(total.sums[0]) > 0 else None

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "train" if self.model.training else "eval"
        stats, self._pear_stats[mode] = self._pear_stats[mode], None
        if self.accelerator.num_processes > 1:  # every rank logs together: each brings its stats, or empty ones
            stats = self._stats_over_ranks(stats)
        prefix = "eval_" if mode == "eval" else ""
        if stats is not None:
            for name, value in stats.summary(online=self.pear_mode == "online").items():
                logs[f"{prefix}pear/{name}"] = value
        super().log(logs, start_time)
