"""One PearSFTTrainer step per case on this process's rank, for tests/test_ddp.py (run with torchrun, or alone).

    torchrun --nproc_per_node 2 tests/ddp_step.py SCORED_DIR MODEL_DIR OUT_JSON BATCH_PER_RANK

For each case of CASES: one SGD step over the 8 rows of SCORED_DIR (BATCH_PER_RANK rows on each rank; packed:
4 packed rows, accumulated over 4 // world micro-batches a rank); rank 0 writes the step's logged loss, its pear/*
diagnostics and the gradient before the step to OUT_JSON.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CASES = {
    "static-weights": ("static", {"granularity": "block"}, "weights"),
    "online-dataset": ("online", {"normalize": "dataset"}, "tokens"),
    "online-tokens-packed": ("online", {}, "tokens"),
}


def main(scored: str, model_dir: str, out: str, batch: int) -> None:
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig

    from pear_data.trainer import PearSFTTrainer
    from pear_data.weights import WeightConfig

    logging.disable(logging.WARNING)
    data = datasets.load_dataset("parquet", data_dir=f"{scored}/data", split="train",
                                 cache_dir=str(Path(out).parent / "hf"))

    class Grab(TrainerCallback):
        gradient = None

        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            self.gradient = [p.grad.flatten().tolist() for p in model.parameters() if p.grad is not None]

    results = {}
    world = int(os.environ.get("WORLD_SIZE", "1"))
    for name, (mode, config, normalize) in CASES.items():
        packed = name.endswith("packed")  # best-fit decreasing into 1024 tokens: 4 packed rows, 4 // world a rank
        args = SFTConfig(output_dir=str(Path(out).parent / name), max_length=1024 if packed else 4096,
                         per_device_train_batch_size=1 if packed else batch, packing=packed,
                         gradient_accumulation_steps=4 // world if packed else 1, max_steps=1,
                         learning_rate=1.0, optim="sgd", lr_scheduler_type="constant", logging_steps=1,
                         save_strategy="no", report_to=[], use_cpu=True, bf16=False, seed=0, disable_tqdm=True,
                         max_grad_norm=0.0)
        grab = Grab()
        trainer = PearSFTTrainer(model=AutoModelForCausalLM.from_pretrained(model_dir), args=args, train_dataset=data,
                                 processing_class=AutoTokenizer.from_pretrained(model_dir), pear_mode=mode,
                                 pear_config=WeightConfig(**config), pear_normalize=normalize, callbacks=[grab])
        trainer.train()
        log = next(h for h in trainer.state.log_history if "loss" in h)
        results[name] = {"log": {k: v for k, v in log.items() if k == "loss" or k.startswith("pear/")},
                         "gradient": [x for part in grab.gradient for x in part],
                         "world": trainer.accelerator.num_processes}
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
    if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
        Path(out).write_text(json.dumps(results))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]))
