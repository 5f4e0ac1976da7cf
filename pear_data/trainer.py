"""PEAR loss in `transformers.Trainer` and TRL's `SFTTrainer` (docs/design.md 4).

    from pear_data.trainer import PearTrainer, PearSFTTrainer   # PearSFTTrainer imports trl on first use

    trainer = PearSFTTrainer(model=model, args=SFTConfig(...), train_dataset=scored, processing_class=tokenizer,
                             pear_mode="static")   # or "online", pear_config=WeightConfig(...)

Both are `pear_data.loss_mixin.PearLossMixin` on the framework's trainer. `PearTrainer` computes the loss from the
model's logits, as `transformers.Trainer` does (the log-softmax runs in float32 chunks, but the [B, L, V] logits
are built once in the model's dtype); `PearSFTTrainer` (sft_trainer.py) scores the labels through TRL's fused
LM head and never builds them.
"""

from __future__ import annotations

from typing import Any

import transformers

from .loss_mixin import PearLossMixin

__all__ = ["PearLossMixin", "PearTrainer"]  # and PearSFTTrainer, loaded on first access


class PearTrainer(PearLossMixin, transformers.Trainer):
    """`transformers.Trainer` with the PEAR loss (see `PearLossMixin` for the extra arguments)."""


def __getattr__(name: str) -> Any:
    # PearSFTTrainer lives in sft_trainer.py and imports trl: loaded on first access, so this module never needs trl.
    if name == "PearSFTTrainer":
        from .sft_trainer import PearSFTTrainer

        return PearSFTTrainer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
