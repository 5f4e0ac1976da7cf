"""SFT -> RL in miniature: does PEAR-weighted SFT prepare a model for RL better than plain SFT?

    python examples/sft_then_rl/run.py --preset small --out OUT          # the experiment (docs/results.md)
    python examples/sft_then_rl/run.py --preset small --out OUT --grid   # the weight-flag grid, on validation

The recipe, top to bottom:
 1. problems: disjoint test, validation, SFT-corpus and RL-prompt sets (task.py), fixed by the preset;
 2. base target: a small Llama with its own tokenizer, pretrained briefly on left-chain text (model.py);
 3. corpus: a programmatic teacher with other style preferences writes one completion per SFT problem and
    records its exact per-token log-probs;
 4. weights: `pear-data score CORPUS --target BASE --behavior-logprobs-field teacher_logprobs` (the command's main);
 5. arms x seeds, each from the same base: SFT (plain, PEAR static token/block/sequence, PEAR online,
    plain 3x and 10x longer), pass@1/pass@8 on the test set, one identical GRPO stage (TRL), pass@k again;
 6. OUT/results.json, OUT/results.png, and the table on stdout.

Every job runs on one CPU thread in its own process (`--jobs` at a time), so results do not depend on
the job count. A job's result is kept in OUT/runs/ and reused when the run is repeated with the same
preset; the same preset and seeds give the same results.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pear_cli  # noqa: E402
import report  # noqa: E402
from model import ModelShape  # noqa: E402
from task import PRETRAIN_WRITER, TEACHER, problems, prompt_text, reward  # noqa: E402
from train import ARMS, MAIN_ARMS, RLConfig, Sets, SFTConfig  # noqa: E402

TASK = "digit sums in a symbolic language: left chains, right chains or a direct answer (task.py)"


@dataclass(frozen=True)
class Preset:
    shape: ModelShape
    pretrain_steps: int
    corpus_rows: int
    sft: SFTConfig
    rl: RLConfig
    test_problems: int = 200
    val_problems: int = 200
    rl_problems: int = 1000
    k: int = 8
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    grid_seeds: tuple[int, ...] = (0, 1)
    arms: tuple[str, ...] = MAIN_ARMS


PRESETS = {
    "smoke": Preset(shape=ModelShape(hidden=32, layers=1, heads=2, intermediate=64), pretrain_steps=60,
                    corpus_rows=128, sft=SFTConfig(steps=4, batch=16), rl=RLConfig(steps=2, prompts_per_step=2),
                    test_problems=32, val_problems=32, rl_problems=64, seeds=(0,), grid_seeds=(0,)),
    "small": Preset(shape=ModelShape(hidden=96, layers=3, heads=4, intermediate=256), pretrain_steps=400,
                    corpus_rows=2000, sft=SFTConfig(steps=150), rl=RLConfig(steps=60, prompts_per_step=8)),
    "gpu": Preset(shape=ModelShape(hidden=256, layers=6, heads=8, intermediate=768), pretrain_steps=2000,
                  corpus_rows=20000, sft=SFTConfig(steps=300, batch=64), rl=RLConfig(steps=300, prompts_per_step=16),
                  test_problems=1000, val_problems=500, rl_problems=10000, seeds=(0, 1, 2, 3, 4)),
}

# The weight-flag grid: one change at a time from the paper's defaults (docs/design.md 3.4), on validation.
GRID = {
    "paper_defaults": [],
    "clip_narrow": ["--log-ratio-clip=-0.02,0.1"],
    "clip_wide": ["--log-ratio-clip=-0.3,1.0"],
    "center": ["--center"],
    "normalize_dataset": ["--normalize", "dataset"],
    "center_normalize_dataset": ["--center", "--normalize", "dataset"],
}
GRID_GRANULARITIES = ("token", "sequence")


def make_sets(preset: Preset) -> Sets:
    test = problems(preset.test_problems, seed=101)
    val = problems(preset.val_problems, seed=102, exclude=set(test))
    held_out = set(test) | set(val)
    corpus = problems(preset.corpus_rows, seed=103, exclude=held_out)
    rl = problems(preset.rl_problems, seed=104, exclude=held_out)
    pretrain = problems(20000, seed=105, exclude=held_out)
    return Sets(test, val, corpus, rl, pretrain)


def build_base(preset: Preset, sets: Sets, out: Path) -> Path:
    """The base target: built from a config, pretrained on left-chain text, saved as a model directory."""
    import model as M

    base = out / "base"
    if (base / "config.json").exists():
        return base
    tokenizer = M.build_tokenizer()
    target = M.build_model(tokenizer, preset.shape, seed=0)
    losses = M.pretrain(target, tokenizer, M.writer_texts(PRETRAIN_WRITER, sets.pretrain), preset.pretrain_steps,
                        batch=64, lr=3e-3, seed=0)
    M.save(target, tokenizer, base)
    print(f"base target: {sum(p.numel() for p in target.parameters()):,} parameters, pretraining loss "
          f"{losses[0]:.3f} -> {losses[-1]:.3f} in {preset.pretrain_steps} steps", flush=True)
    return base


def write_corpus(sets: Sets, out: Path) -> Path:
    """The SFT corpus: the teacher's completions with their exact per-token log-probs (and the end's)."""
    corpus = out / "corpus.jsonl"
    rng = random.Random(7)
    with corpus.open("w") as f:
        for digits in sets.corpus:
            completion, logprobs = TEACHER.sample(digits, rng)
            f.write(json.dumps({"prompt": prompt_text(digits), "completion": completion,
                                "teacher_logprobs": logprobs}) + "\n")
    return corpus


def pear_data(*args: str) -> None:
    """`pear-data ARGS`, in this process (pear_cli.py), its report kept out of the experiment's."""
    print("$ pear-data " + " ".join(args[:1] + tuple(Path(a).name if "/" in a else a for a in args[1:])), flush=True)
    pear_cli.pear_data(*args)


def score(corpus: Path, base: Path, out: Path) -> Path:
    scored = out / "scored"
    if not (scored / "manifest.json").exists():
        pear_data("score", str(corpus), "--out", str(scored), "--target", str(base),
                  "--behavior-logprobs-field", "teacher_logprobs", "--device", "cpu", "--overwrite")
    return scored


def _start_worker(preset: Preset, base: Path, eval_set: str):
    """In a job's process: one thread, quiet trainers; the problem sets, the evaluation set, the base target."""
    import torch
    import train
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(1)
    train.quiet()
    sets = make_sets(preset)
    problems_ = sets.test if eval_set == "test" else sets.val
    tokenizer = AutoTokenizer.from_pretrained(base)
    target = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    return sets, problems_, tokenizer, target


def job(preset: Preset, arm: str, seed: int, base: Path, scored: Path, eval_set: str, work: Path) -> dict:
    """One arm, one seed: SFT from the base, pass@k, GRPO, pass@k. One thread, its own process."""
    import model as M
    import train

    sets, problems_, tokenizer, target = _start_worker(preset, base, eval_set)
    start = time.perf_counter()
    weights = train.sft(target, tokenizer, scored, ARMS[arm], preset.sft, seed, work)
    pre = M.pass_at_k(target, tokenizer, problems_, preset.k, temperature=1.0, seed=1000 + seed)
    rl = train.grpo(target, tokenizer, [prompt_text(d) for d in sets.rl], [list(d) for d in sets.rl],
                    lambda completion, digits: reward(completion, tuple(digits)), preset.rl, seed, work)
    post = M.pass_at_k(target, tokenizer, problems_, preset.k, temperature=1.0, seed=2000 + seed)
    return {"pre_rl": pre, "post_rl": post, "rl_reward": rl["reward"], "online_weights": weights or None,
            "seconds": time.perf_counter() - start}


def reference(preset: Preset, base: Path, eval_set: str, out: Path, pool: ProcessPoolExecutor) -> dict:
    """pass@k of the untrained model (chance: the base's initial weights) and of the base target, before SFT."""
    path = out / "runs" / f"reference-{eval_set}.json"
    if path.exists():
        return json.loads(path.read_text())
    result = pool.submit(_reference, preset, base, eval_set).result()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1, sort_keys=True))
    return result


def _reference(preset: Preset, base: Path, eval_set: str) -> dict:
    import model as M

    _, problems_, tokenizer, target = _start_worker(preset, base, eval_set)
    untrained = M.build_model(tokenizer, preset.shape, seed=0)
    return {"untrained": M.pass_at_k(untrained, tokenizer, problems_, preset.k, temperature=1.0, seed=999),
            "base_target": M.pass_at_k(target, tokenizer, problems_, preset.k, temperature=1.0, seed=999)}


def run_jobs(preset: Preset, specs: list[tuple[str, str, int, Path]], base: Path, eval_set: str, out: Path,
             pool: ProcessPoolExecutor) -> dict[tuple[str, int], dict]:
    """Run (name, arm, seed, scored) jobs in `pool`, longest first; reuse results already in out/runs/EVAL_SET
    (a job's result depends on its name, seed, the evaluation set and the preset)."""
    results, pending = {}, []
    for name, arm, seed, scored in specs:
        path = out / "runs" / eval_set / name / f"seed-{seed}.json"
        if path.exists():
            results[name, seed] = json.loads(path.read_text())
        else:
            pending.append((name, arm, seed, scored, path))
    pending.sort(key=lambda s: -ARMS[s[1]]["steps"])
    futures = {pool.submit(job, preset, arm, seed, base, scored, eval_set, path.parent / f"work-{seed}"):
               (name, seed, path) for name, arm, seed, scored, path in pending}
    for done, future in enumerate(futures, 1):
        name, seed, path = futures[future]
        result = future.result()
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=1, sort_keys=True))
        results[name, seed] = result
        print(f"[{done}/{len(pending)}] {name} seed {seed}: pre {report.fmt(result['pre_rl'])}  "
              f"post {report.fmt(result['post_rl'])}  ({result['seconds']:.0f} s)", flush=True)
    return results


def main() -> None:
    import mechanism

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS) + sorted(mechanism.PRESETS), default="small")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--grid", action="store_true", help="run the weight-flag grid (validation set) instead")
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="jobs at a time (processes)")
    parser.add_argument("--arms", nargs="+", choices=list(ARMS),
                        help="only these arms, and plain (default: the preset's; pear_sequence_static_10x and "
                             "pear_token_online_10x run only when named)")
    parser.add_argument("--seeds", nargs="+", type=int, help="only these seeds (default: the preset's)")
    parser.add_argument("--validation-only", action="store_true",
                        help="mechanism presets: stop after the gates and the clip choice (validation set)")
    parser.add_argument("--rl-lrs", nargs="+", type=float,
                        help="mechanism presets: only RL from the base at these learning rates (validation set)")
    args = parser.parse_args()
    if args.preset in mechanism.PRESETS:
        if args.grid or args.arms:
            parser.error("--grid and --arms belong to the first experiment's presets")
        mechanism.main(args.preset, args.out, args.jobs, args.seeds, args.validation_only, args.rl_lrs)
        return
    if args.validation_only or args.rl_lrs:
        parser.error("--validation-only and --rl-lrs belong to the mechanism presets")
    preset = PRESETS[args.preset]
    if args.arms:
        preset = dataclasses.replace(preset, arms=tuple(a for a in ARMS if a in args.arms or a == "plain"))
    if args.seeds:
        preset = dataclasses.replace(preset, seeds=tuple(args.seeds), grid_seeds=tuple(args.seeds))
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    fixed = {k: v for k, v in dataclasses.asdict(preset).items() if k not in ("arms", "seeds", "grid_seeds")}
    key = json.dumps({"preset": args.preset, **fixed}, sort_keys=True, default=list)  # what a job's result depends on
    stamp = out / "preset.json"
    if stamp.exists() and stamp.read_text() != key:
        sys.exit(f"{out} holds a run of another preset; use another --out")
    stamp.write_text(key)
    start = time.perf_counter()

    sets = make_sets(preset)
    base = build_base(preset, sets, out)
    corpus = write_corpus(sets, out)
    scored = score(corpus, base, out)
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:  # the jobs' processes, reused from job to job
        run_stages(args, preset, base, scored, out, pool)
    print(f"wall time {time.perf_counter() - start:.0f} s; results in {out}")


def run_stages(args: argparse.Namespace, preset: Preset, base: Path, scored: Path, out: Path,
               pool: ProcessPoolExecutor) -> None:
    """The grid (`--grid`), or the preset's arms: the jobs, then the reference rows, then the report."""
    if args.grid:
        specs = [("plain", "plain", seed, scored) for seed in preset.grid_seeds]
        for name, flags in GRID.items():
            grid_dir = out / "grid" / name
            if not (grid_dir / "manifest.json").exists():
                pear_data("reweight", str(scored), "--out", str(grid_dir), "--overwrite", *flags)
            specs += [(f"{name}/{g}", f"pear_{g}_static", seed, grid_dir)
                      for g in GRID_GRANULARITIES for seed in preset.grid_seeds]
        results = run_jobs(preset, specs, base, "val", out, pool)
        summary = report.grid_results(args.preset, preset, results, out, reference(preset, base, "val", out, pool))
        (out / "grid.json").write_text(json.dumps(summary, indent=1, sort_keys=True) + "\n")
        (out / "grid.md").write_text(report.grid_markdown(summary))
        report.print_grid(summary)
    else:
        specs = []
        for arm in preset.arms:
            data = scored
            if ARMS[arm].get("reweight"):
                data = out / "reweighted" / arm
                if not (data / "manifest.json").exists():
                    pear_data("reweight", str(scored), "--out", str(data), "--overwrite", *ARMS[arm]["reweight"])
            specs += [(arm, arm, seed, data) for seed in preset.seeds]
        results = run_jobs(preset, specs, base, "test", out, pool)
        summary = report.results(args.preset, TASK, preset, results, out, reference(preset, base, "test", out, pool))
        (out / "results.json").write_text(json.dumps(summary, indent=1, sort_keys=True) + "\n")
        report.plot(summary, results, out / "results.png")
        (out / "results.md").write_text(report.markdown(summary))
        report.print_table(summary)


if __name__ == "__main__":
    main()
