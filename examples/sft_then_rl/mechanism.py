"""SFT -> RL, second experiment: does a stronger SFT end worse after RL, and does PEAR weighting fix it?

    python examples/sft_then_rl/run.py --preset mechanism --out OUT                     # the experiment
    python examples/sft_then_rl/run.py --preset mechanism --out OUT --validation-only   # gates and clip only
    python examples/sft_then_rl/run.py --preset mechanism --out OUT --rl-lrs 3e-4 1e-3  # RL from the base

The recipe, top to bottom:
 1. problems: disjoint test, validation, SFT-corpus, RL-prompt and pretraining sets of the cup-swap task (cups.py);
 2. per seed, its own base target, pretrained on its own style: chains with slips (model.py);
 3. corpus: the oracle teacher's direct answers with their exact log-probs (all zero); per seed,
    `pear-data score` under that seed's base, then `pear-data reweight` for each candidate log-ratio clip;
 4. validation set: stage A (plain SFT at each budget, then the identical GRPO stage) for every seed, and the
    PEAR arms at the strong budget for every candidate clip on the clip seeds: the gates and the clip choice
    (OUT/validation.json);
 5. test set: stage B (the PEAR arms at the strong budget, the chosen clip) for every seed; every arm evaluated
    on the test set: OUT/results.json, OUT/results.md, OUT/results.png.

Every job (an arm and a seed: SFT, evaluation, GRPO, evaluation) runs on one CPU thread in its own process,
`--jobs` at a time, and keeps its checkpoints and evaluations in OUT/runs/, so a rerun into the same --out
reuses them and the test phase evaluates the validation phase's checkpoints without training them again.
"""

from __future__ import annotations

import dataclasses
import json
import random
import statistics
import time
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

import cups
import mechanism_report as report
import pear_cli
from model import ModelShape
from train import RLConfig, Sets, SFTConfig

PAPER_CLIP = (-0.08, 0.3)  # the paper's per-token log-ratio clip, sized for traces of thousands of tokens
PEAR_ARMS = {
    "pear_token_online": {"mode": "online", "granularity": "token"},
    "pear_token_static": {"mode": "static", "granularity": "token"},
    "pear_block_static": {"mode": "static", "granularity": "block"},
    "pear_sequence_static": {"mode": "static", "granularity": "sequence"},
}


@dataclass(frozen=True)
class Preset:
    shape: ModelShape
    pretrain_steps: int
    slip: float  # the share of chain steps that slip in the pretraining text
    corpus_rows: int
    sft: SFTConfig  # sft.steps: one epoch of the corpus at sft.batch
    rl: RLConfig
    budgets: tuple[float, ...] = (0, 0.3, 1, 3, 10)  # SFT epochs of stage A; 0 is RL from the base
    weak: float = 0.3
    strong: float = 10
    clip_scales: tuple[float, ...] = (10, 100)  # candidate clips: PAPER_CLIP times each, chosen on validation
    swaps: tuple[int, int] = (4, 8)
    test_problems: int = 200
    val_problems: int = 100
    rl_problems: int = 2000
    samples: int = 16  # per problem, at temperature 1
    k: int = 8
    pretrain_batch: int = 32
    pretrain_lr: float = 3e-3
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    clip_seeds: tuple[int, ...] = (0, 1)


PRESETS = {
    "mechanism_smoke": Preset(  # the plumbing only: every stage and file, on a tiny model, in seconds
        shape=ModelShape(hidden=16, layers=1, heads=2, intermediate=32), pretrain_steps=30, slip=0.3,
        corpus_rows=32, sft=SFTConfig(steps=2, batch=16, lr=1e-4),
        rl=RLConfig(steps=1, prompts_per_step=2, generations=4, lr=3e-4, max_completion_length=24),
        budgets=(0, 0.5, 1), weak=0.5, strong=1, clip_scales=(10, 100), swaps=(2, 3), test_problems=6,
        val_problems=6, rl_problems=16, samples=4, k=2, pretrain_batch=16, seeds=(0, 1), clip_seeds=(0,)),
    "mechanism": Preset(
        shape=ModelShape(hidden=64, layers=2, heads=4, intermediate=170), pretrain_steps=2000, slip=0.2,
        corpus_rows=1920, sft=SFTConfig(steps=60, batch=32, lr=1e-4),
        rl=RLConfig(steps=150, prompts_per_step=8, lr=3e-4, max_completion_length=64),
        test_problems=100, val_problems=64, clip_seeds=(0,)),  # sized to run within an hour on 2 cores
}


def plain_arm(epochs: float) -> str:
    return f"plain_{epochs:g}ep"


def clip_for(scale: float) -> tuple[float, float]:
    return (round(PAPER_CLIP[0] * scale, 6), round(PAPER_CLIP[1] * scale, 6))


def make_sets(preset: Preset) -> Sets:
    test = cups.problems(preset.test_problems, seed=201, swaps=preset.swaps)
    val = cups.problems(preset.val_problems, seed=202, swaps=preset.swaps, exclude=set(test))
    held_out = set(test) | set(val)
    corpus = cups.problems(preset.corpus_rows, seed=203, swaps=preset.swaps, exclude=held_out, distinct=False)
    rl = cups.problems(preset.rl_problems, seed=204, swaps=preset.swaps, exclude=held_out, distinct=False)
    pretrain = cups.problems(20000, seed=205, swaps=preset.swaps, exclude=held_out, distinct=False)
    return Sets(test, val, corpus, rl, pretrain)


# ---- 2. bases, 3. corpus and weights ------------------------------------------------------------------------

def pretrain_base(preset: Preset, seed: int, path: Path) -> dict:
    """In a worker: the seed's base target, built from a config and pretrained on chains with slips."""
    import model as M

    sets = make_sets(preset)

    def texts(rng: random.Random, batch: int) -> list[tuple[str, str]]:
        drawn = rng.choices(sets.pretrain, k=batch)
        return [(cups.prompt_text(p), cups.slipped_chain(p, preset.slip, rng)) for p in drawn]

    tokenizer = M.build_tokenizer(cups.ALPHABET, cups.MERGES)
    target = M.build_model(tokenizer, preset.shape, seed=seed)
    losses = M.pretrain(target, tokenizer, texts, preset.pretrain_steps, batch=preset.pretrain_batch,
                        lr=preset.pretrain_lr, seed=seed)
    M.save(target, tokenizer, path)
    return {"parameters": sum(p.numel() for p in target.parameters()), "loss_first": losses[0],
            "loss_last": losses[-1]}


def write_corpus(sets: Sets, out: Path) -> Path:
    """The SFT corpus: the oracle's direct answers with its exact per-token log-probs (and the end's)."""
    corpus = out / "corpus.jsonl"
    with corpus.open("w") as f:
        for problem in sets.corpus:
            completion, logprobs = cups.teacher(problem)
            f.write(json.dumps({"prompt": cups.prompt_text(problem), "completion": completion,
                                "teacher_logprobs": logprobs}) + "\n")
    return corpus


def data_dir(out: Path, seed: int, clip_scale: float | None) -> Path:
    """Where an arm's SFT rows are: scored under the seed's base (the paper's clip), or reweighted with another."""
    if clip_scale in (None, 1):
        return out / "scored" / f"seed-{seed}"
    return out / "reweighted" / f"seed-{seed}" / f"clip-{clip_scale:g}x"


def prepare_seed(preset: Preset, seed: int, corpus: Path, out: Path) -> list[str]:
    """In a worker: the seed's base (unless OUT/bases has it), then its weights (unless done): `pear-data score`
    under that base, `pear-data reweight` for each candidate clip. Returns what to print: the base's pretraining,
    pear-data's warnings."""
    base, scored, lines = base_dir(out, seed), data_dir(out, seed, None), []
    if not (base / "config.json").exists():
        info = pretrain_base(preset, seed, base)
        lines.append(f"base seed {seed}: {info['parameters']:,} parameters, pretraining loss {info['loss_first']:.3f}"
                     f" -> {info['loss_last']:.3f} in {preset.pretrain_steps} steps")
    if not (scored / "manifest.json").exists():
        lines.append(pear_data("score", str(corpus), "--out", str(scored), "--target", str(base),
                               "--behavior-logprobs-field", "teacher_logprobs", "--device", "cpu", "--overwrite"))
    for scale in preset.clip_scales:
        target = data_dir(out, seed, scale)
        if target != scored and not (target / "manifest.json").exists():
            lo, hi = clip_for(scale)
            lines.append(pear_data("reweight", str(scored), "--out", str(target), "--overwrite",
                                   f"--log-ratio-clip={lo},{hi}"))
    return [line for line in lines if line]


def pear_data(*args: str) -> str:
    """`pear-data ARGS` as a user runs it, in this process (pear_cli.py); its warnings as one line ("" if none)."""
    warnings = pear_cli.pear_data(*args)
    out = Path(args[args.index("--out") + 1])
    return f"  pear-data {args[0]} --out .../{out.parent.name}/{out.name}: {warnings}" if warnings else ""


def prepare(preset: Preset, corpus: Path, out: Path, pool: ProcessPoolExecutor) -> dict[int, Future]:
    """Every seed's base and weights, a seed a job, submitted first; returns each seed's future, which the jobs of
    that seed wait for (so the jobs of a seed that is ready use the workers the other seeds leave)."""
    print(f"per seed: its base; pear-data score corpus.jsonl --target bases/seed-S --behavior-logprobs-field "
          f"teacher_logprobs; pear-data reweight --log-ratio-clip for clips "
          f"x{', x'.join(f'{s:g}' for s in preset.clip_scales)}", flush=True)
    futures = {seed: pool.submit(prepare_seed, preset, seed, corpus, out) for seed in preset.seeds}
    for future in futures.values():
        future.add_done_callback(_print_prepared)
    return futures


def _print_prepared(future: Future) -> None:
    """A seed's lines once it is prepared; a failure is raised where its jobs are submitted (run_jobs)."""
    if future.exception() is None and future.result():
        print("\n".join(future.result()), flush=True)


def base_dir(out: Path, seed: int) -> Path:
    return out / "bases" / f"seed-{seed}"


# ---- 4, 5. jobs ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Arm:
    """One arm: SFT for `epochs` (plain, or a PEAR arm of PEAR_ARMS with a candidate clip), then GRPO."""

    name: str
    kind: str  # "plain" or a key of PEAR_ARMS
    epochs: float
    clip_scale: float | None = None
    rl_lr: float | None = None  # None: the preset's

    @property
    def key(self) -> str:
        """The job's directory under OUT/runs: what its training depends on, so equal jobs are trained once."""
        key = f"{self.kind}/{self.epochs:g}ep"
        if self.clip_scale is not None:
            key += f"/clip-{self.clip_scale:g}x"
        return key if self.rl_lr is None else key + f"/rl-lr-{self.rl_lr:g}"


def stage_a(preset: Preset) -> list[Arm]:
    return [Arm(plain_arm(e), "plain", e) for e in preset.budgets]


def pear_arms(preset: Preset, scale: float, candidate: bool) -> list[Arm]:
    return [Arm(f"{kind}@clip{scale:g}x" if candidate else kind, kind, preset.strong, scale) for kind in PEAR_ARMS]


def _worker_init() -> None:
    import torch
    import train

    torch.set_num_threads(1)
    train.quiet()


def _load(path: Path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoTokenizer.from_pretrained(path), AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


def _reward(completion: str, problem: list) -> float:
    return cups.reward(completion, tuple(tuple(pair) for pair in problem))


def job(preset: Preset, arm: Arm, seed: int, base: Path, data: Path, directory: Path, eval_set: str) -> None:
    """In a worker: train the arm (unless OUT/runs has it: SFT, checkpoint, GRPO, checkpoint), then evaluate both
    checkpoints on `eval_set` with sampling seeds shared by every arm (paired). Writes train.json, eval-SET.json."""
    import shutil

    import metrics
    import model as M
    import train

    sets = make_sets(preset)
    if not (directory / "train.json").exists():
        start = time.perf_counter()
        tokenizer, target = _load(base)
        weights = None
        if arm.epochs > 0:
            spec = {"mode": None, "granularity": None, **PEAR_ARMS.get(arm.kind, {}), "steps": arm.epochs}
            weights = train.sft(target, tokenizer, data, spec, preset.sft, seed, directory / "work") or None
        M.save(target, tokenizer, directory / "pre_rl")
        rl_config = preset.rl if arm.rl_lr is None else dataclasses.replace(preset.rl, lr=arm.rl_lr)
        rl = train.grpo(target, tokenizer, [cups.prompt_text(p) for p in sets.rl], [list(p) for p in sets.rl],
                        _reward, rl_config, seed, directory / "work")
        M.save(target, tokenizer, directory / "post_rl")
        shutil.rmtree(directory / "work", ignore_errors=True)
        record = {"sft_weights": weights, "rl": rl, "seconds": time.perf_counter() - start}
        (directory / "train.json").write_text(json.dumps(record, indent=1, sort_keys=True))
    problems = sets.test if eval_set == "test" else sets.val
    evaluation = {}
    for stage, sample_seed in (("pre_rl", 1000 + seed), ("post_rl", 2000 + seed)):
        tokenizer, model = _load(directory / stage)
        evaluation[stage] = metrics.evaluate(model, tokenizer, problems, preset.samples, preset.k, sample_seed,
                                             max_new_tokens=preset.rl.max_completion_length)
    (directory / f"eval-{eval_set}.json").write_text(json.dumps(evaluation, indent=1, sort_keys=True))


def run_jobs(pool: ProcessPoolExecutor, preset: Preset, specs: list[tuple[Arm, int]], eval_set: str, out: Path,
             bases: dict[int, Future]) -> dict[tuple[str, int], dict]:
    """Run the (arm, seed) jobs not yet done for `eval_set`, longest first, each once its seed's base is ready;
    returns each one's train.json record with its evaluation ("pre_rl", "post_rl"), by (arm name, seed)."""
    where = {(arm.name, seed): out / "runs" / arm.key / f"seed-{seed}" for arm, seed in specs}
    waiting = [(arm, seed) for arm, seed in specs if not (where[arm.name, seed] / f"eval-{eval_set}.json").exists()]
    waiting.sort(key=lambda s: ((where[s[0].name, s[1]] / "train.json").exists(), -s[0].epochs))
    futures, total = {}, len(waiting)
    while waiting:
        ready = [(arm, seed) for arm, seed in waiting if bases[seed].done()]
        for arm, seed in ready:
            bases[seed].result()  # a failed base or weighting stops the run here
            futures[pool.submit(job, preset, arm, seed, base_dir(out, seed), data_dir(out, seed, arm.clip_scale),
                                where[arm.name, seed], eval_set)] = (arm, seed)
        waiting = [spec for spec in waiting if spec not in ready]
        if waiting:
            wait({bases[seed] for _, seed in waiting}, return_when=FIRST_COMPLETED)
    for done, future in enumerate(futures, 1):
        future.result()
        arm, seed = futures[future]
        record = _record(where[arm.name, seed], eval_set)
        print(f"[{done}/{total}] {eval_set} {arm.name} seed {seed}: pre {report.fmt(record['pre_rl'])}  "
              f"post {report.fmt(record['post_rl'])}", flush=True)
    return {(arm.name, seed): _record(where[arm.name, seed], eval_set) for arm, seed in specs}


def _record(directory: Path, eval_set: str) -> dict:
    record = json.loads((directory / "train.json").read_text())
    return {**record, **json.loads((directory / f"eval-{eval_set}.json").read_text())}


# ---- the recipe ------------------------------------------------------------------------------------------------

def main(preset_name: str, out: Path, jobs: int, seeds: list[int] | None, validation_only: bool,
         rl_lrs: list[float] | None) -> None:
    preset = PRESETS[preset_name]
    if seeds:
        preset = dataclasses.replace(preset, seeds=tuple(seeds), clip_seeds=tuple(s for s in preset.clip_seeds
                                                                                  if s in seeds) or tuple(seeds[:1]))
    out.mkdir(parents=True, exist_ok=True)
    fixed = {k: v for k, v in dataclasses.asdict(preset).items() if k not in ("seeds", "clip_seeds")}
    key = json.dumps({"preset": preset_name, **fixed}, sort_keys=True, default=list)  # what a job's result depends on
    stamp = out / "preset.json"
    if stamp.exists() and stamp.read_text() != key:
        raise SystemExit(f"{out} holds a run of another preset; use another --out")
    stamp.write_text(key)
    start = time.perf_counter()

    sets = make_sets(preset)
    with ProcessPoolExecutor(max_workers=jobs, initializer=_worker_init) as pool:
        bases = prepare(preset, write_corpus(sets, out), out, pool)
        if rl_lrs:
            sweep_rl_lr(pool, preset, rl_lrs, out, bases)
        else:
            validation = validate(pool, preset, out, bases)
            if not validation_only:
                test(pool, preset_name, preset, validation, out, bases)
    print(f"wall time {time.perf_counter() - start:.0f} s; results in {out}")


def sweep_rl_lr(pool: ProcessPoolExecutor, preset: Preset, rl_lrs: list[float], out: Path,
                bases: dict[int, Future]) -> None:
    """RL from the base at each learning rate, on the validation set and the first two seeds (the RL lr's only
    choice). The run at the preset's lr is plain_0ep's own, which the validation phase then reuses."""
    seeds = preset.seeds[:2]
    arms = [Arm(f"plain_0ep@rl-lr{lr:g}", "plain", 0, rl_lr=None if lr == preset.rl.lr else lr) for lr in rl_lrs]
    runs = run_jobs(pool, preset, [(a, s) for a in arms for s in seeds], "val", out, bases)
    table = {a.name: {stage: report.mean(runs, a.name, seeds, report.pass1(stage)) for stage in report.STAGES}
             for a in arms}
    summary = {"seeds": list(seeds), "eval_set": "validation", "preset_rl_lr": preset.rl.lr, "pass@1": table}
    (out / "rl_lr.json").write_text(json.dumps(report._round(summary), indent=1, sort_keys=True) + "\n")
    for name, row in table.items():
        print(f"{name:<24} pre pass@1 {row['pre_rl']:.3f}  post pass@1 {row['post_rl']:.3f}")


def validate(pool: ProcessPoolExecutor, preset: Preset, out: Path, bases: dict[int, Future]) -> dict:
    """Stage A on every seed and the PEAR arms at every candidate clip on the clip seeds, on the validation set:
    the gates and the clip choice, written to OUT/validation.json before any test-set job starts."""
    plain = stage_a(preset)
    candidates = [arm for scale in preset.clip_scales for arm in pear_arms(preset, scale, candidate=True)]
    specs = [(a, s) for a in plain for s in preset.seeds] + [(a, s) for a in candidates for s in preset.clip_seeds]
    runs = run_jobs(pool, preset, specs, "val", out, bases)
    weak, strong = plain_arm(preset.weak), plain_arm(preset.strong)
    summary = {
        "eval_set": "validation", "seeds": list(preset.seeds), "clip_seeds": list(preset.clip_seeds),
        "weak": weak, "strong": strong,
        "gates": report.gates(runs, preset.seeds, plain_arm(0), weak, strong),
        "clip": report.choose_clip(runs, preset.clip_seeds, preset.clip_scales, list(PEAR_ARMS), weak),
        "arms": {a.name: report.arm_entry(runs, a.name, preset.seeds, strong, preset.k) for a in plain},
        "clip_candidates": {a.name: report.arm_entry(runs, a.name, preset.clip_seeds, strong, preset.k)
                            for a in candidates},
    }
    summary["clip"]["log_ratio_clip"] = list(clip_for(summary["clip"]["chosen_scale"]))
    summary = report._round(summary)
    (out / "validation.json").write_text(json.dumps(summary, indent=1, sort_keys=True) + "\n")
    report.print_gates(summary)
    return summary


def test(pool: ProcessPoolExecutor, preset_name: str, preset: Preset, validation: dict, out: Path, bases: dict
         ) -> None:
    """Stage B at the chosen clip on every seed, and every arm on the test set: OUT/results.json, .md, .png."""
    plain = stage_a(preset)
    pear = pear_arms(preset, validation["clip"]["chosen_scale"], candidate=False)
    runs = run_jobs(pool, preset, [(a, s) for a in plain + pear for s in preset.seeds], "test", out, bases)
    manifest = json.loads((data_dir(out, preset.seeds[0], pear[0].clip_scale) / "manifest.json").read_text())
    summary = report.results(preset_summary(preset_name, preset), validation, runs,
                             {a.name: a.epochs for a in plain + pear}, [a.name for a in plain],
                             {a.name: weight_diagnostics(preset, a, runs, out) for a in pear}, manifest["weights"])
    (out / "results.json").write_text(json.dumps(summary, indent=1, sort_keys=True) + "\n")
    (out / "results.md").write_text(report.markdown(summary))
    report.plot(summary, out / "results.png")
    report.print_table(summary)


def preset_summary(name: str, preset: Preset) -> dict:
    return {"preset": name, "seeds": list(preset.seeds), "test_problems": preset.test_problems,
            "samples": preset.samples, "k": preset.k, "budgets_epochs": list(preset.budgets),
            "sft": dataclasses.asdict(preset.sft), "rl": dataclasses.asdict(preset.rl),
            "corpus_rows": preset.corpus_rows, "swaps": list(preset.swaps), "pretrain_slip": preset.slip,
            "pretrain_steps": preset.pretrain_steps}


def weight_diagnostics(preset: Preset, arm: Arm, runs: dict, out: Path) -> dict:
    """Mean over the seeds of a PEAR arm's weight diagnostics: the static columns' from each seed's manifest,
    the online weights' as logged during SFT."""
    spec = PEAR_ARMS[arm.kind]
    per_seed = []
    for seed in preset.seeds:
        if spec["mode"] == "online":
            logged = runs[arm.name, seed]["sft_weights"] or {}
            per_seed.append({"ess_fraction": logged.get("weight_ess"), "mean": logged.get("weight_mean"),
                             "share_at_lower_bound": logged.get("at_lower_bound"),
                             "share_at_upper_bound": logged.get("at_upper_bound"),
                             "mean_log_ratio": logged.get("log_ratio_mean")})
        else:
            diagnostics = json.loads((data_dir(out, seed, arm.clip_scale) / "manifest.json").read_text())["diagnostics"]
            d = diagnostics[spec["granularity"]]
            per_seed.append({"ess_fraction": d["ess_fraction"], "mean": d["mean"],
                             "share_at_lower_bound": d["share_at_lower_bound"],
                             "share_at_upper_bound": d["share_at_upper_bound"],
                             "mean_log_ratio": diagnostics["mean_log_ratio"]})
    return {name: statistics.fmean(d[name] for d in per_seed) if all(d[name] is not None for d in per_seed) else None
            for name in per_seed[0]}
