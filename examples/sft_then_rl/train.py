"""The two training stages every arm goes through: SFT on the scored corpus, then one identical GRPO stage.

SFT reads the `pear-data score` output as any user would: the Parquet shards, the manifest's weight
config, `PearCollator` and `PearTrainer` (static weights from a column, or online weights from the live
model and the recorded behavior log-probs). Plain SFT is `transformers.Trainer` on the same collated
batches (labels only): the standard mean cross-entropy over completion tokens.
RL is TRL's `GRPOTrainer` with the task's verifier as the reward.
"""

from __future__ import annotations

import dataclasses
import logging
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow.parquet as pq
from task import SEPARATOR

# The arms of the experiment: how each one's SFT loss is weighted, how many SFT steps it takes (x base), and
# for an arm on other weight flags, the `pear-data reweight` flags that make its weights from the scored corpus.
ARMS = {
    "plain": {"mode": None, "granularity": None, "steps": 1},
    "pear_token_static": {"mode": "static", "granularity": "token", "steps": 1},
    "pear_block_static": {"mode": "static", "granularity": "block", "steps": 1},
    "pear_sequence_static": {"mode": "static", "granularity": "sequence", "steps": 1},
    "pear_token_online": {"mode": "online", "granularity": "token", "steps": 1},
    "plain_3x": {"mode": None, "granularity": None, "steps": 3},
    "plain_10x": {"mode": None, "granularity": None, "steps": 10},
    # the weight-flag grid's best configuration on the validation set (docs/results.md), checked on the test set
    "pear_sequence_static_clip_narrow": {"mode": "static", "granularity": "sequence", "steps": 1,
                                         "reweight": ["--log-ratio-clip=-0.02,0.1"]},
}
# Not in the presets' table: PEAR at the 10x SFT budget (run with --arms), next to plain_10x.
EXTRA_ARMS = {
    "pear_sequence_static_10x": {"mode": "static", "granularity": "sequence", "steps": 10},
    "pear_token_online_10x": {"mode": "online", "granularity": "token", "steps": 10},
}
MAIN_ARMS = tuple(ARMS)
ARMS.update(EXTRA_ARMS)


@dataclass(frozen=True)
class Sets:
    """An experiment's disjoint problem sets: test and validation (evaluated only), the SFT corpus's problems,
    the RL prompts, and the pretraining pool."""

    test: list
    val: list
    corpus: list
    rl: list
    pretrain: list = field(repr=False)


@dataclass(frozen=True)
class SFTConfig:
    steps: int
    batch: int = 32
    lr: float = 1e-3


@dataclass(frozen=True)
class RLConfig:
    steps: int
    prompts_per_step: int = 4
    generations: int = 8
    temperature: float = 1.0
    lr: float = 1e-4
    max_completion_length: int = 40


def quiet() -> None:
    """No per-step log lines, progress bars or library warnings from the trainers."""
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    logging.getLogger("trl").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")


def load_scored(scored: Path):
    """The weighted dataset (training columns only) and its weight config, as `pear-data score` wrote them."""
    import datasets

    from pear_data.dataset import finished_manifest
    from pear_data.weights import WeightConfig

    manifest = finished_manifest(scored)  # refuses an output whose run has not finished, or that a run is writing
    columns = ["input_ids", "completion_mask", "behavior_logprobs", "shared_boundary", "pear_token_weight",
               "pear_block_weight", "pear_seq_weight"]
    files = sorted((scored / "data").glob("*.parquet"))
    table = pq.ParquetDataset(files).read(columns=columns)
    return datasets.Dataset(table), WeightConfig.from_dict(manifest["weights"])


def sft(model, tokenizer, scored: Path, spec: dict, config: SFTConfig, seed: int, work: Path) -> dict:
    """Train `model` in place with an arm's SFT loss (`spec` as in ARMS: mode, granularity, and steps as a multiple
    of config.steps); returns the logged weight diagnostics (PEAR arms). The data order is drawn from `seed`."""
    import transformers

    from pear_data.collator import PearCollator
    from pear_data.trainer import PearTrainer

    quiet()
    train, weights = load_scored(scored)
    args = transformers.TrainingArguments(
        output_dir=str(work / "sft"), per_device_train_batch_size=config.batch,
        max_steps=round(config.steps * spec["steps"]), learning_rate=config.lr, lr_scheduler_type="constant",
        warmup_steps=0, weight_decay=0.0, logging_steps=10, save_strategy="no", report_to=[], use_cpu=True,
        seed=seed, data_seed=seed, disable_tqdm=True, dataloader_num_workers=0,
    )
    if spec["mode"] is None:
        collator = PearCollator(pad_token_id=tokenizer.pad_token_id, weights=None)
        args.remove_unused_columns = False
        trainer = transformers.Trainer(model=model, args=args, train_dataset=train, data_collator=collator)
    else:
        weights = dataclasses.replace(weights, granularity=spec["granularity"])
        trainer = PearTrainer(model=model, args=args, train_dataset=train, processing_class=tokenizer,
                              pear_mode=spec["mode"], pear_config=weights)
    trainer.remove_callback(transformers.PrinterCallback)
    trainer.train()
    model.eval()
    logged = [log for log in trainer.state.log_history if "pear/weight_ess" in log]
    names = sorted({k for log in logged for k in log if k.startswith("pear/")})
    return {name[5:]: sum(log[name] for log in logged) / len(logged) for name in names}


def grpo(model, tokenizer, prompts: list[str], problems: list, score: Callable[[str, object], float],
         config: RLConfig, seed: int, work: Path) -> dict[str, list[float]]:
    """One GRPO stage (TRL) on `prompts` with the reward `score(completion, problem)`; trains `model` in place.
    Returns TRL's per-step logs: the mean reward (`reward`) and the share of prompt groups whose rollouts all
    got the same reward, so no gradient (`frac_reward_zero_std`)."""
    import datasets
    import transformers
    from trl import GRPOConfig, GRPOTrainer

    quiet()
    batch = config.prompts_per_step * config.generations
    dataset = datasets.Dataset.from_dict({"prompt": [p + SEPARATOR for p in prompts], "problem": problems})

    def verifier(completions: list[str], problem: list, **_: object) -> list[float]:
        return [score(c, p) for c, p in zip(completions, problem)]

    args = GRPOConfig(
        output_dir=str(work / "rl"), per_device_train_batch_size=batch, num_generations=config.generations,
        max_completion_length=config.max_completion_length, temperature=config.temperature, top_k=0, top_p=1.0,
        learning_rate=config.lr, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, beta=0.0,
        max_steps=config.steps, logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, bf16=False,
        seed=seed, data_seed=seed, disable_tqdm=True, dataloader_num_workers=0,
    )
    trainer = GRPOTrainer(model=model, reward_funcs=verifier, args=args, train_dataset=dataset,
                          processing_class=tokenizer)
    trainer.remove_callback(transformers.PrinterCallback)
    trainer.train()
    model.eval()
    logged = [log for log in trainer.state.log_history if "reward" in log]
    return {key: [log[key] for log in logged] for key in ("reward", "frac_reward_zero_std")}
