"""Fine-tune the embedded SmolLM2-135M-Instruct with TRL's SFTTrainer on a PEAR-weighted dataset, on CPU.

    # 1. a weighted dataset (any `pear-data score` / `reweight` output directory):
    pear-data score examples/data/gsm8k_sample.jsonl --out gsm8k-pear \\
        --prompt-field question --completion-field answer --behavior-temperature 0.7 --device cpu
    # 2. a few SFT steps, static weights (read from the dataset) or online (paper-exact: live target log-probs):
    python examples/train_trl.py --data gsm8k-pear --mode static
    python examples/train_trl.py --data gsm8k-pear --mode online

Without --data, the first --score-rows rows of examples/data/gsm8k_sample.jsonl
are scored first (the same as the command above), so the example runs on a
fresh checkout. The model defaults to the dataset's target model (from its
manifest), and online mode uses the dataset's weight hyperparameters, so that
the first step's online weights are the dataset's static ones. Logs the loss
and the mean / ESS fraction of the weights at every step; nothing is saved
unless --save.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything here is local

HERE = Path(__file__).resolve().parent


def score_sample(rows: int, out: Path) -> Path:
    """Score the first `rows` GSM8K sample rows with the embedded model (behavior: the target at T=0.7)."""
    from pear_data.config import BehaviorSpec, CorpusConfig, ScoreOptions, ScoringConfig
    from pear_data.score import score

    corpus = out.parent / "gsm8k_head.jsonl"
    lines = (HERE / "data" / "gsm8k_sample.jsonl").read_text().splitlines()[:rows]
    corpus.write_text("".join(line + "\n" for line in lines))
    print(f"scoring {rows} GSM8K rows into {out} (pear-data score {corpus} --out {out} --prompt-field question "
          "--completion-field answer --behavior-temperature 0.7 --device cpu)")
    score(corpus, out, ScoreOptions(
        behavior=BehaviorSpec(temperature=0.7),
        corpus=CorpusConfig(prompt_field="question", completion_field="answer"),
        scoring=ScoringConfig(device="cpu"),
    ))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, help="a `pear-data score` output directory (default: score a sample)")
    parser.add_argument("--score-rows", type=int, default=8, help="rows to score when --data is not given")
    parser.add_argument("--mode", choices=["static", "online"], default="static")
    parser.add_argument("--granularity", choices=["token", "block", "sequence"], default=None,
                        help="weight level (default: the dataset's)")
    parser.add_argument("--normalize", choices=["tokens", "weights"], default="tokens",
                        help="loss normalizer: label tokens (HF convention) or the sum of the weights")
    parser.add_argument("--model", default=None, help="model spec (default: the dataset's target model)")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--max-length", type=int, default=1024,
                        help="longest training row; static weights need rows no longer (pear-data reweight "
                        "--max-length cuts them), online rows are cut")
    parser.add_argument("--packing", action="store_true", help="pack rows into --max-length tokens (bfd, padding-free)")
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--output-dir", type=Path, default=None, help="checkpoints and logs (default: a temp dir)")
    parser.add_argument("--save", action="store_true", help="save the final model to --output-dir")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (1 is much faster on a CPU shared with other jobs)")
    args = parser.parse_args()

    import datasets
    import torch
    from trl import SFTConfig

    from pear_data.dataset import finished_manifest
    from pear_data.models import load_model, load_tokenizer, resolve_model
    from pear_data.trainer import PearSFTTrainer
    from pear_data.weights import WeightConfig

    if args.threads:
        torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="pear-train-"))
    data = args.data or score_sample(args.score_rows, work / "scored")
    manifest = finished_manifest(data)  # refuses an output whose run has not finished, or that a run is writing
    config = WeightConfig.from_dict(manifest["weights"])
    if args.granularity:
        config = dataclasses.replace(config, granularity=args.granularity)
    source = resolve_model(args.model or manifest["models"]["target"]["spec"])
    tokenizer = load_tokenizer(source)
    model = load_model(source, device="cpu", dtype=torch.float32)
    train = datasets.load_dataset("parquet", data_dir=str(data / "data"), split="train",
                                  cache_dir=str(work / "hf-cache"))
    print(f"{len(train)} rows, model {source.name}, mode {args.mode}, {config.granularity} weights, "
          f"normalize={args.normalize}")

    output_dir = args.output_dir or work / "run"
    sft_args = SFTConfig(
        output_dir=str(output_dir),
        max_length=args.max_length,
        per_device_train_batch_size=args.batch_size,
        max_steps=args.steps,
        learning_rate=args.lr,
        lr_scheduler_type="constant",
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        bf16=False,
        seed=0,
        packing=args.packing,
    )
    trainer = PearSFTTrainer(model=model, args=sft_args, train_dataset=train, processing_class=tokenizer,
                             pear_mode=args.mode, pear_config=config, pear_normalize=args.normalize)
    start = time.perf_counter()
    trainer.train()
    elapsed = time.perf_counter() - start

    print(f"\n{'step':>4} {'loss':>9} {'w mean':>8} {'w ESS':>6} {'w max':>8}")
    for log in trainer.state.log_history:
        if "loss" in log:
            print(f"{log['step']:>4} {log['loss']:>9.4f} {log['pear/weight_mean']:>8.3f} "
                  f"{log['pear/weight_ess']:>6.3f} {log['pear/weight_max']:>8.2f}")
    print(f"{args.steps} steps in {elapsed:.1f} s")
    if args.save:
        trainer.save_model(str(output_dir))
        print(f"saved to {output_dir}")


if __name__ == "__main__":
    main()
