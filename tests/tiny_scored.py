"""Outputs of `pear-data score` with the tiny models (tiny_model.py), for trainer and truncation tests.

`score_tiny(out, behavior, rows=8, **flags)` scores the first GSM8K sample rows (question -> answer; byte-level
tokens, 250-830 per row) with the tiny ChatML target through `pear_data.score.score`, the python API of
`pear-data score`. Session fixtures (import them: `from .tiny_scored import tiny_scored_fixture, ...`):

- `tiny_scored`: behavior = the target itself at temperature 0.7 (direct: one token per span);
- `tiny_scored_cross`: behavior = a tiny Gemma-style model whose tokenizer has BPE merges, aligned by character
  offsets: rows with spans of several target tokens (design 3.7).

Each fixture is a `TinyScored`: the output directory and the target's model directory.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from .tiny_model import make_tiny_model

GSM8K = Path(__file__).resolve().parents[1] / "examples" / "data" / "gsm8k_sample.jsonl"


@dataclass(frozen=True)
class TinyScored:
    out: Path
    model: Path

    def dataset(self, cache: Path):
        import datasets

        return datasets.load_dataset("parquet", data_dir=str(self.out / "data"), split="train", cache_dir=str(cache))


def score_tiny(out: Path, target: Path, behavior: Path, temperature: float = 1.0, rows: int = 8,
               max_length: int | None = None) -> Path:
    from pear_data.config import (
        BehaviorSpec,
        CorpusConfig,
        RunConfig,
        ScoreOptions,
        ScoringConfig,
        TokenizeConfig,
        WeightConfig,
    )
    from pear_data.score import score

    corpus = out.parent / f"{out.name}.jsonl"
    corpus.write_text("".join(line + "\n" for line in GSM8K.read_text().splitlines()[:rows]))
    options = ScoreOptions(
        target=str(target),
        behavior=BehaviorSpec(model=str(behavior), logprobs_field=None, temperature=temperature, top_p=1.0),
        weights=WeightConfig(),
        corpus=CorpusConfig(prompt_field="question", completion_field="answer"),
        tokenize=TokenizeConfig(max_length=max_length),
        scoring=ScoringConfig(device="cpu"),
        run=RunConfig(shard_rows=64),
    )
    score(corpus, out, options)
    return out


@pytest.fixture(scope="session", name="tiny_target_dir")
def tiny_target_dir_fixture(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("models") / "target", "chatml")


@pytest.fixture(scope="session", name="tiny_merged_dir")
def tiny_merged_dir_fixture(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("models") / "merged", "turns", seed=1, merges=True)


@pytest.fixture(scope="session", name="tiny_scored")
def tiny_scored_fixture(tmp_path_factory, tiny_target_dir) -> TinyScored:
    out = score_tiny(tmp_path_factory.mktemp("scored") / "same", tiny_target_dir, tiny_target_dir, temperature=0.7)
    return TinyScored(out, tiny_target_dir)


@pytest.fixture(scope="session", name="tiny_scored_cross")
def tiny_scored_cross_fixture(tmp_path_factory, tiny_target_dir, tiny_merged_dir) -> TinyScored:
    out = score_tiny(tmp_path_factory.mktemp("scored") / "cross", tiny_target_dir, tiny_merged_dir)
    return TinyScored(out, tiny_target_dir)
