"""PEAR loss in `transformers.Trainer` and TRL's `SFTTrainer`: one `compute_loss` override (docs/design.md section 4).

    from pear_data.trainer import PearTrainer, PearSFTTrainer   # PearSFTTrainer imports trl on first use

    trainer = PearSFTTrainer(model=model, args=SFTConfig(...), train_dataset=scored, processing_class=tokenizer,
                             pear_mode="static")   # or "online", pear_config=WeightConfig(...)

What the mixin changes, and nothing else:
- `data_collator` defaults to `PearCollator` (static: the weight column of `pear_config.granularity`;
  online: `behavior_logprobs`), truncating to `args.max_length` when the config has one (SFTConfig).
- The collator's columns are added to the trainer's signature columns, so
  `remove_unused_columns=True` (the default) keeps them instead of silently dropping them.
- `compute_loss` runs the model without labels and applies `pear_data.loss` to
  the result; `normalize="tokens"` honours `num_items_in_batch` (gradient
  accumulation and multi-device token averaging, as `Trainer.compute_loss` does).
- The weight diagnostics (`pear/weight_mean`, `pear/weight_ess`, ...) are logged with the loss.
`PearSFTTrainer` also sets `dataset_kwargs["skip_prepare_dataset"] = True` on
its args (the rows are already tokenized and masked; TRL's preparation would
turn `completion_mask` into labels and drop it) and scores labels through TRL's
fused LM head when the installed TRL has one, so the [B, L, V] logits are never built.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Literal

import torch
import transformers

from .collator import PearCollator
from .loss import PearLossOutput, pear_loss
from .schema import ADDED_NAMES, BEHAVIOR_LOGPROBS, SHARED_BOUNDARY
from .weights import WeightConfig

PearMode = Literal["static", "online"]
_BATCH_COLUMNS = ("labels", "pear_weights", BEHAVIOR_LOGPROBS, SHARED_BOUNDARY)  # collator outputs, not model inputs
_REDUCE = {"pear/weight_min": min, "pear/weight_max": max}  # everything else is averaged over the logged steps


def _pad_token_id(processing_class: Any) -> int:
    tokenizer = getattr(processing_class, "tokenizer", processing_class)  # a processor wraps its tokenizer
    for name in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, name, None)
        if isinstance(value, int):
            return value
    return 0  # any valid id: padding is masked out of attention and labels


class PearLossMixin:
    """`compute_loss` with the PEAR shim, for a `transformers.Trainer` subclass (put the mixin first).

    Extra keyword arguments, all optional:
    pear_mode: "static" (weights stored in the dataset) or "online" (weights from the live target log-probs
        and the stored `behavior_logprobs`: paper-exact).
    pear_config: a `WeightConfig`. Static: its granularity picks the weight column. Online: the whole config
        drives the weights (normalize="dataset" becomes per-batch). Default WeightConfig().
    pear_normalize: "tokens" (divide by label tokens / num_items_in_batch) or "weights" (by the sum of weights).
    """

    def __init__(self, model: Any = None, args: Any = None, data_collator: Any = None, *more: Any,
                 pear_mode: PearMode = "static", pear_config: WeightConfig | None = None,
                 pear_normalize: Literal["tokens", "weights"] = "tokens", **kwargs: Any) -> None:
        if pear_mode not in ("static", "online"):
            raise ValueError(f"pear_mode must be 'static' or 'online', got {pear_mode!r}")
        if pear_normalize not in ("tokens", "weights"):
            raise ValueError(f"pear_normalize must be 'tokens' or 'weights', got {pear_normalize!r}")
        self.pear_mode = pear_mode
        self.pear_config = pear_config or WeightConfig()
        self.pear_normalize = pear_normalize
        self._pear_metrics: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
        if data_collator is None:
            online = pear_mode == "online"
            data_collator = PearCollator(
                pad_token_id=_pad_token_id(kwargs.get("processing_class")),
                weights=None if online else self.pear_config.granularity,
                behavior=online,
                max_length=getattr(args, "max_length", None),
            )
        super().__init__(model, args, data_collator, *more, **kwargs)

    def _set_signature_columns_if_needed(self) -> None:
        # remove_unused_columns keeps only these: add what the collator reads (all added columns when the
        # collator does not say).
        super()._set_signature_columns_if_needed()
        extra = getattr(self.data_collator, "columns", ADDED_NAMES)
        extra = [*extra, *getattr(self.data_collator, "optional_columns", ())]
        self._signature_columns = list(dict.fromkeys([*self._signature_columns, *extra]))

    def _pear_batch(self, inputs: dict[str, Any]) -> tuple[dict[str, Any], torch.Tensor, torch.Tensor | None,
                                                            torch.Tensor | None]:
        missing = BEHAVIOR_LOGPROBS if self.pear_mode == "online" else "pear_weights"
        if "labels" not in inputs or missing not in inputs:
            raise KeyError(
                f"pear_mode={self.pear_mode!r} needs 'labels' and {missing!r} in every batch, got {sorted(inputs)}: "
                "use pear_data.collator.PearCollator (weights=... for static, behavior=True for online) as "
                "data_collator"
            )
        model_inputs = {k: v for k, v in inputs.items() if k not in _BATCH_COLUMNS}
        model_inputs["use_cache"] = False
        weights = inputs.get("pear_weights") if self.pear_mode == "static" else None
        behavior = inputs.get("behavior_logprobs") if self.pear_mode == "online" else None
        return model_inputs, inputs["labels"], weights, behavior

    def _pear_forward(self, model: Any, model_inputs: dict[str, Any], labels: torch.Tensor, **loss_kwargs: Any
                      ) -> tuple[PearLossOutput, Any]:
        """Forward + PEAR loss. Here: from the full logits; PearSFTTrainer uses TRL's fused head instead."""
        outputs = model(**model_inputs)
        return pear_loss(labels, logits=outputs.logits, **loss_kwargs), outputs

    def compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: torch.Tensor | int | None = None) -> Any:
        model_inputs, labels, weights, behavior = self._pear_batch(inputs)
        by_tokens = self.pear_normalize == "tokens" and num_items_in_batch is not None
        result, outputs = self._pear_forward(
            model, model_inputs, labels, weights=weights, behavior_logprobs=behavior, config=self.pear_config,
            shared_boundary=inputs.get("shared_boundary") if behavior is not None else None,
            num_items_in_batch=num_items_in_batch if by_tokens else None, normalize=self.pear_normalize,
        )
        loss = result.loss
        # Normalized by the whole accumulated batch's token count: Trainer must not divide by the GA steps again.
        self.loss_is_scaled_for_ga = by_tokens
        if by_tokens and self.args.average_tokens_across_devices:
            # num_items_in_batch counts every rank's tokens and DDP averages gradients (as Trainer.compute_loss).
            loss = loss * (self.accelerator.num_processes // self.get_tp_size())
        mode = "train" if self.model.training else "eval"
        for name, value in result.diagnostics.items():
            if name != "label_tokens":
                self._pear_metrics[mode][f"pear/{name}"].append(float(value))
        if return_outputs and getattr(outputs, "logits", None) is None:
            with torch.no_grad():  # callers asking for outputs want logits (evaluation with compute_metrics)
                outputs = model(**model_inputs)
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "train" if self.model.training else "eval"
        prefix = "eval_" if mode == "eval" else ""
        for name, values in self._pear_metrics[mode].items():
            if values:
                reduce = _REDUCE.get(name)
                logs[prefix + name] = reduce(values) if reduce else sum(values) / len(values)
        self._pear_metrics[mode].clear()
        super().log(logs, start_time)


class PearTrainer(PearLossMixin, transformers.Trainer):
    """`transformers.Trainer` with the PEAR loss (see `PearLossMixin` for the extra arguments)."""


def _sft_trainer_class() -> type:
    try:
        import trl
        from trl.trainer import sft_trainer
    except ImportError as exc:
        raise ImportError("PearSFTTrainer needs TRL: pip install 'pear-data[trl]'") from exc

    # TRL versions whose SFTTrainer patches the model with a fused LM head (per-token log-probs without logits).
    fused = hasattr(sft_trainer, "add_fused_lm_head")

    class PearSFTTrainer(PearLossMixin, trl.SFTTrainer):
        """TRL `SFTTrainer` with the PEAR loss (see `PearLossMixin`); `args` (an `SFTConfig`) is required."""

        def __init__(self, model: Any = None, args: Any = None, data_collator: Any = None, *more: Any,
                     **kwargs: Any) -> None:
            if args is None:
                raise TypeError("PearSFTTrainer needs args=SFTConfig(output_dir=..., ...)")
            # The rows are tokenized and masked already; TRL's preparation would rebuild labels and drop columns.
            args.dataset_kwargs = {**(args.dataset_kwargs or {}), "skip_prepare_dataset": True}
            super().__init__(model, args, data_collator, *more, **kwargs)

        def _pear_forward(self, model: Any, model_inputs: dict[str, Any], labels: torch.Tensor, **loss_kwargs: Any
                          ) -> tuple[PearLossOutput, Any]:
            if not fused:
                return super()._pear_forward(model, model_inputs, labels, **loss_kwargs)
            outputs = model(**model_inputs, labels=labels, fused_lm_head=True)  # log_probs [B, L - 1], shifted
            return pear_loss(labels, logprobs=outputs.log_probs, logprobs_layout="shifted", **loss_kwargs), outputs

    PearSFTTrainer.__module__ = __name__
    return PearSFTTrainer


def __getattr__(name: str) -> Any:
    # PearSFTTrainer is built on first access, so importing this module never needs trl.
    if name == "PearSFTTrainer":
        cls = _sft_trainer_class()
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
