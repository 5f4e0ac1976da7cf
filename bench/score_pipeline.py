"""Where the time of `pear-data score` goes, stage by stage, and how much the overlap and a second worker save.

Two inputs:
  readme     the README example: examples/data/gsm8k_sample.jsonl, target SmolLM2-135M-Instruct, behavior
             Gemma-3-270M (the embedded pair, aligned by character offsets)
  synthetic  --rows GSM8K rows (the sample repeated), scored by two tiny random models that use the same two
             tokenizers (a 2-layer Llama with SmolLM2's tokenizer, a 2-layer Gemma-3 with Gemma's). On a CPU
             the score stage still dominates: the log-softmax over Gemma's 262k-token vocabulary costs the same
             per token whatever the model's width, so a narrower model saves only part of it. The CPU stages
             (read, prepare, weigh + write) become a large share next to a GPU's forward passes.

For each input it prints, in seconds:
  read, prepare (tokenize + align), score (both models), weigh + write   each stage alone, one after the other
  sum of the stages
  end to end, no overlap       the stages shard by shard in one thread (what `score` did before its workers)
  end to end, --workers 1      the engine: prepare one shard ahead in a thread, weigh + write in the driver
  end to end, --workers 2      two worker processes (on CPU the cores are split between them)

The outputs of the three end-to-end runs are compared byte for byte. Run: python bench/score_pipeline.py
(the MKL reproducibility mode is set here as the CLI sets it).
"""

from __future__ import annotations

import os

os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")  # before torch loads MKL, as the CLI does

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import itertools  # noqa: E402
import platform  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

from pear_data.config import BehaviorSpec, CorpusConfig, RunConfig, ScoreOptions, ScoringConfig  # noqa: E402
from pear_data.corpus import detect_shape, open_corpus  # noqa: E402
from pear_data.diagnostics import Diagnostics  # noqa: E402
from pear_data.engines.work import shard_tasks  # noqa: E402
from pear_data.models import load_tokenizer, resolve_model  # noqa: E402
from pear_data.output import DatasetWriter  # noqa: E402
from pear_data.policies import ModelSources, Policies, PolicyRecipe  # noqa: E402
from pear_data.score import commit, score  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
GSM8K = REPO / "examples" / "data" / "gsm8k_sample.jsonl"
SHAPE = CorpusConfig(prompt_field="question", completion_field="answer")


def tiny_models(folder: Path) -> tuple[Path, Path]:
    """Random 2-layer models with the embedded pair's tokenizers, saved as model directories."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    target_tokenizer = load_tokenizer(resolve_model("smollm2-135m-instruct"))
    behavior_tokenizer = load_tokenizer(resolve_model("gemma-3-270m"))
    target = LlamaForCausalLM(LlamaConfig(vocab_size=len(target_tokenizer), hidden_size=64, intermediate_size=128,
                                          num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                                          max_position_embeddings=4096, tie_word_embeddings=True))
    behavior = Gemma3ForCausalLM(Gemma3TextConfig(vocab_size=len(behavior_tokenizer), hidden_size=64,
                                                  intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                                                  num_key_value_heads=1, head_dim=32, max_position_embeddings=4096,
                                                  sliding_window=512))
    paths = []
    for name, model, tokenizer in (("target", target, target_tokenizer), ("behavior", behavior, behavior_tokenizer)):
        path = folder / name
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
        paths.append(path)
    return paths[0], paths[1]


def timed(fn) -> tuple[float, object]:
    start = time.perf_counter()
    value = fn()
    return time.perf_counter() - start, value


def load_policies(options: ScoreOptions) -> Policies:
    shape = detect_shape(None, **options.corpus.shape_flags)
    models = ModelSources.resolve(options.target, options.behavior)
    return PolicyRecipe(models, shape, None, options.scoring, options.tokenize, options.behavior).load()


def stages(corpus: Path, out: Path, options: ScoreOptions) -> dict[str, float]:
    """Each stage over the whole input, one after the other, in this process."""
    source = open_corpus(corpus)
    policies = load_policies(options)
    shard_rows = options.run.shard_rows
    times = {}
    times["read"], rows = timed(lambda: list(source.rows()))
    times["prepare"], prepared = timed(lambda: [policies.prepare(t.rows) for t in shard_tasks(iter(rows), 0,
                                                                                              shard_rows)])
    times["score"], scored = timed(lambda: [policies.score(p) for p in prepared])
    writer = DatasetWriter(out, {"bench": "stages"}, overwrite=True)
    ends = [t.input_end for t in shard_tasks(iter(rows), 0, shard_rows)]
    times["weigh + write"], _ = timed(lambda: [commit(writer, end, s, options.weights, Diagnostics(), False)
                                             for end, s in zip(ends, scored)])
    return times


def sequential(corpus: Path, out: Path, options: ScoreOptions) -> float:
    """Shard by shard, no overlap: read, prepare, score, weigh + write, then the next shard."""
    source = open_corpus(corpus)
    policies = load_policies(options)
    writer = DatasetWriter(out, {"bench": "sequential"}, overwrite=True)
    start = time.perf_counter()
    for task in shard_tasks(source.rows(), 0, options.run.shard_rows):
        commit(writer, task.input_end, policies.score(policies.prepare(task.rows)), options.weights, Diagnostics(),
               False)
    return time.perf_counter() - start


def end_to_end(corpus: Path, out: Path, options: ScoreOptions) -> float:
    """`score` itself (the engine), excluding model loading: timed from the first shard to the manifest."""
    marks = {}

    class Meter:
        def advance(self, rows: int, tokens: int) -> None:
            marks.setdefault("first", time.perf_counter())

    start = time.perf_counter()
    run = dataclasses.replace(options.run, overwrite=True)
    score(corpus, out, dataclasses.replace(options, run=run), progress_factory=lambda total: Meter())
    end = time.perf_counter()
    return end - marks.get("first", start)


def data_bytes(out: Path) -> list[bytes]:
    return [p.read_bytes() for p in sorted((out / "data").glob("part-*.parquet"))]


def bench(name: str, corpus: Path, options: ScoreOptions, work: Path) -> None:
    times = stages(corpus, work / f"{name}-stages", options)
    times["sum of the stages"] = sum(times.values())
    times["end to end, no overlap"] = sequential(corpus, work / f"{name}-sequential", options)
    times["end to end, --workers 1"] = end_to_end(corpus, work / f"{name}-w1", options)
    two = dataclasses.replace(options, run=dataclasses.replace(options.run, workers=2))
    times["end to end, --workers 2"] = end_to_end(corpus, work / f"{name}-w2", two)
    same = data_bytes(work / f"{name}-w1") == data_bytes(work / f"{name}-w2") == data_bytes(work / f"{name}-sequential")
    rows = sum(1 for line in corpus.read_text().splitlines() if line.strip())
    print(f"\n== {name}: {rows} rows, shards of {options.run.shard_rows}, target {options.target}, "
          f"behavior {options.behavior.model}")
    slowest = max(("read", "prepare", "score", "weigh + write"), key=times.get)
    for label, seconds in times.items():
        note = "  <- slowest stage" if label == slowest else ""
        print(f"  {label:26s} {seconds:8.2f} s{note}")
    print(f"  data files byte-identical across the three end-to-end runs: {same}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=2000, help="rows of the synthetic input")
    parser.add_argument("--shard-rows", type=int, default=250)
    parser.add_argument("--skip-readme", action="store_true", help="only the synthetic input")
    args = parser.parse_args()
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), load average {os.getloadavg()[0]:.2f}")
    work = Path(tempfile.mkdtemp(prefix="pear-pipeline-bench-"))
    try:
        if not args.skip_readme:
            readme = ScoreOptions(corpus=SHAPE, scoring=ScoringConfig(device="cpu"), run=RunConfig(shard_rows=16),
                                  behavior=BehaviorSpec(model="gemma-3-270m"))
            bench("readme", GSM8K, readme, work)
        target, behavior = tiny_models(work / "models")
        lines = GSM8K.read_text().splitlines()
        corpus = work / "synthetic.jsonl"
        corpus.write_text("".join(line + "\n" for line, _ in zip(itertools.cycle(lines), range(args.rows))))
        synthetic = ScoreOptions(target=str(target), behavior=BehaviorSpec(model=str(behavior)), corpus=SHAPE,
                                 scoring=ScoringConfig(device="cpu"), run=RunConfig(shard_rows=args.shard_rows))
        bench("synthetic", corpus, synthetic, work)
        print(f"\nload average at the end {os.getloadavg()[0]:.2f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
