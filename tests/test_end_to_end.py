"""The embedded models end to end: what only real models prove (their templates, the default pair's two
tokenizers aligned by character offsets). Everything else runs on tiny models (tests/test_score.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from .cli_harness import cli

ROOT = Path(__file__).resolve().parents[1]
GSM8K = ROOT / "examples" / "data" / "gsm8k_sample.jsonl"
FIELDS = ["--prompt-field", "question", "--completion-field", "answer"]

pytestmark = pytest.mark.slow


def test_the_default_pair_is_gemma_behavior_aligned_to_smollm2_targets(capsys, tmp_path, smollm2_source,
                                                                       gemma_source):
    """No model flags: target SmolLM2-135M-Instruct (ChatML), behavior Gemma-3-270M base (raw template)."""
    corpus = tmp_path / "gsm8k4.jsonl"
    corpus.write_text("".join(line + "\n" for line in GSM8K.read_text().splitlines()[:4]))
    out = tmp_path / "out"
    run = cli(capsys, "score", corpus, "--out", out, *FIELDS, "--device", "cpu")
    assert run.code == 0, run.err
    assert "aligned by character offsets" in run.out
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["rows"] == {"in": 4, "out": 4, "rejected": 0}
    assert manifest["models"]["target"]["spec"] == "smollm2-135m-instruct"
    assert manifest["models"]["behavior"]["spec"] == "gemma-3-270m"
    assert manifest["behavior"]["template"] == "raw"
    assert manifest["behavior"]["tokenizer"]["fingerprint"] != manifest["tokenizer"]["fingerprint"]
    alignment = manifest["alignment"]
    assert alignment["mode"] == "char-offsets" and alignment["rows"] == 4
    answers = [json.loads(line)["answer"] for line in corpus.read_text().splitlines()]
    assert alignment["completion_chars"] == sum(len(a) for a in answers)
    assert (alignment["chars_in_one_token_spans"] + alignment["chars_in_multi_token_spans"]
            == alignment["completion_chars"])
    assert 0.8 < alignment["share_chars_in_one_token_spans"] < 1.0
    assert "char-offsets" in (out / "README.md").read_text()
    rows = pq.read_table(out / "data").to_pylist()
    for row in rows:
        mask, shared = np.array(row["completion_mask"]), np.array(row["shared_boundary"])
        behavior = np.array(row["behavior_logprobs"])
        assert shared[mask == 0].sum() == 0 and shared[np.flatnonzero(mask)[-1]] == 1
        assert np.all(behavior[(mask == 1) & (shared == 0)] == 0)  # a span's log-prob sits on its last token
        assert np.all(behavior[shared == 1] < 0)
    assert rows[0]["shared_boundary"].count(0) > len(rows[0]["input_ids"]) // 2  # the prompt and span insides
