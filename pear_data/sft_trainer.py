"""`PearSFTTrainer`: TRL's `SFTTrainer` with the PEAR loss, packing and padding-free included (docs/design.md 4).

Imports trl; `pear_data.trainer.PearSFTTrainer` loads this module on first use.

The rows are tokenized and masked already, so TRL's dataset preparation is skipped and pear-data's runs instead
(`pear_data.training_data`: the truncation rule, rows with no label dropped, and packing with TRL's own
`pack_dataset`, each PEAR column travelling with its tokens). TRL would refuse a custom collator with
`padding_free` or `bfd` packing, so `SFTTrainer.__init__` sees a copy of the config with packing and
padding-free off; the trainer keeps the caller's settings (`trainer.args`, a copy: the config passed in is
never modified) and its own `PearCollator(padding_free=...)`.

Every `SFTConfig` option that touches the loss is honoured or refused here, by name (`check_sft_options`).
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

import torch
import trl
from trl.trainer import sft_trainer

from .errors import TrainingError
from .loss import PearLossOutput, pear_loss
from .loss_mixin import PearLossMixin
from .training_data import TrainingData, prepare_dataset


def check_sft_options(args: Any, formatting_func: Any = None) -> None:
    """`TrainingError` naming the first SFTConfig option the PEAR loss cannot honour.

    Honoured: max_length (the truncation rule), packing with packing_strategy "bfd" / "bfd_split", eval_packing,
    padding_free, pad_to_multiple_of, assistant_only_loss and completion_only_loss None/True (the dataset's
    completion_mask holds exactly the assistant turns' tokens), shuffle_dataset, gradient accumulation,
    average_tokens_across_devices (the normalizers always cover every rank), use_liger_kernel (its layer
    kernels; the loss uses TRL's fused head, never liger's fused cross-entropy).
    """
    refused = [
        (args.completion_only_loss is False, "completion_only_loss=False",
         "PEAR weights exist only on completion tokens (completion_mask); leave it None or True"),
        (args.loss_type != "nll", f"loss_type={args.loss_type!r}",
         "the PEAR loss is the weighted NLL; use loss_type='nll'"),
        (args.label_smoothing_factor > 0, f"label_smoothing_factor={args.label_smoothing_factor}",
         "label smoothing changes each token's target; PEAR weighs the NLL of the label itself"),
        (args.truncation_mode != "keep_start", f"truncation_mode={args.truncation_mode!r}",
         "pear-data's one truncation rule keeps the start of a row (the stored log-probs of the kept tokens stay "
         "exact); use 'keep_start'"),
        (args.packing and args.packing_strategy not in ("bfd", "bfd_split"), f"packing_strategy="
         f"{args.packing_strategy!r}", "it cuts rows across packed sequences, which would lose their context and "
         "their suffix sums; use 'bfd' (or 'bfd_split', static only)"),
        (bool(args.dataset_kwargs and args.dataset_kwargs.get("skip_prepare_dataset") is False),
         "dataset_kwargs={'skip_prepare_dataset': False}", "the rows are tokenized and masked already"),
        (formatting_func is not None, "formatting_func", "the rows are tokenized and masked already"),
    ]
    for bad, option, why in refused:
        if bad:
            raise TrainingError(f"PearSFTTrainer cannot train with {option}: {why}")


class PearSFTTrainer(PearLossMixin, trl.SFTTrainer):
    """TRL `SFTTrainer` with the PEAR loss (see `PearLossMixin`); `args` (an `SFTConfig`) is required."""

    def __init__(self, model: Any = None, args: Any = None, data_collator: Any = None, train_dataset: Any = None,
                 eval_dataset: Any = None, *more: Any, **kwargs: Any) -> None:
        if args is None:
            raise TypeError("PearSFTTrainer needs args=SFTConfig(output_dir=..., ...)")
        check_sft_options(args, kwargs.get("formatting_func"))
        args = copy.copy(args)  # never modify the caller's config
        args.dataset_kwargs = {**(args.dataset_kwargs or {}), "skip_prepare_dataset": True}
        super().__init__(model, args, data_collator, train_dataset, eval_dataset, *more, **kwargs)
        self.padding_free = bool(args.padding_free or args.packing or args.eval_packing)

    def _pear_training_data(self, args: Any, data_collator: Any) -> TrainingData:
        data = super()._pear_training_data(args, data_collator)
        seed = args.seed if args.shuffle_dataset else None
        return dataclasses.replace(data, packing=args.packing_strategy if args.packing else None, shuffle_seed=seed)

    def _pear_prepare(self, dataset: Any, name: str, args: Any, evaluation: bool = False) -> Any:
        packing = args.packing if not evaluation or args.eval_packing is None else args.eval_packing
        if dataset is None or packing == bool(self.pear_data.packing):
            return super()._pear_prepare(dataset, name, args, evaluation)
        data = dataclasses.replace(self.pear_data, packing=args.packing_strategy if packing else None)
        dataset, self.pear_reports[name] = prepare_dataset(dataset, data, name)
        return dataset

    def _pear_collator(self, args: Any, processing_class: Any) -> Any:
        collator = super()._pear_collator(args, processing_class)
        collator.padding_free = bool(args.padding_free or args.packing or args.eval_packing)
        collator.pad_to_multiple_of = args.pad_to_multiple_of
        return collator

    def _trainer_args(self, args: Any) -> Any:
        # SFTTrainer refuses a custom collator with padding-free or bfd packing, and assistant_only_loss on rows
        # that are not conversations: pear-data packs, collates and masks itself.
        trl_args = copy.copy(args)
        trl_args.packing = trl_args.padding_free = trl_args.assistant_only_loss = False
        trl_args.eval_packing = None
        return trl_args

    def _pear_forward(self, model: Any, model_inputs: dict[str, Any], labels: torch.Tensor, **loss_kwargs: Any
                      ) -> tuple[PearLossOutput, Any]:
        outputs = model(**model_inputs, labels=labels, fused_lm_head=True)  # log_probs [B, L - 1], shifted
        result = pear_loss(labels, logprobs=outputs.log_probs, logprobs_layout="shifted", **loss_kwargs)
        self._trl_metrics(outputs, model_inputs)
        return result, outputs

    def _trl_metrics(self, outputs: Any, model_inputs: dict[str, Any]) -> None:
        """TRL's own metrics (entropy, mean_token_accuracy, num_tokens), as SFTTrainer.compute_loss logs them."""
        mode = "train" if self.model.training else "eval"
        gather = self.accelerator.gather_for_metrics
        valid = gather(outputs.label_mask.sum()).sum()
        entropy = gather(outputs.entropy.detach().sum()).sum()
        correct = gather(outputs.is_top1.sum()).sum()
        self._metrics[mode]["entropy"].append((entropy / valid).item() if valid > 0 else 0.0)
        self._metrics[mode]["mean_token_accuracy"].append((correct / valid).item() if valid > 0 else 0.0)
        if mode == "train":
            ids = model_inputs["input_ids"]
            tokens = model_inputs["attention_mask"].sum() if "attention_mask" in model_inputs else ids.new_tensor(
                ids.numel())
            self._total_train_tokens += int(gather(tokens).sum()) // self._tp_size
        self._metrics[mode]["num_tokens"] = [self._total_train_tokens]


assert hasattr(sft_trainer, "add_fused_lm_head"), "PearSFTTrainer needs a TRL whose SFTTrainer has the fused LM head"
