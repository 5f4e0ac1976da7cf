"""`pear-data score` end to end on the real embedded SmolLM2: exit codes, rows, columns, rejects, resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

ROOT = Path(__file__).resolve().parents[1]
GSM8K = ROOT / "examples" / "data" / "gsm8k_sample.jsonl"
FIELDS = ["--prompt-field", "question", "--completion-field", "answer"]
SCORED = ["input_ids", "completion_mask", "target_logprobs", "behavior_logprobs",
          "pear_token_weight", "pear_block_weight", "pear_seq_weight"]

pytestmark = pytest.mark.slow


def command(*args) -> list[str]:
    return [sys.executable, "-m", "pear_data.cli", "score", *map(str, args)]


def run(*args) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run(command(*args), capture_output=True, text=True, timeout=900, env=env)


def output_files(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*"))
            if p.is_file() and ".pear" not in p.parts}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """10 GSM8K rows, an undecodable line, a row without `answer`, and an empty answer."""
    lines = GSM8K.read_text().splitlines()[:10]
    lines.insert(3, '{"question": "broken')
    lines.insert(6, json.dumps({"question": "no answer here"}))
    lines.append(json.dumps({"question": "empty", "answer": ""}))
    path = tmp_path_factory.mktemp("corpus") / "mixed.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def scored(corpus, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("score") / "out"
    result = run(corpus, "--out", out, *FIELDS, "--behavior-temperature", "0.7", "--shard-rows", "4",
                 "--device", "cpu", "--license", "mit")
    assert result.returncode == 0, result.stderr
    return out


def read_data(out: Path):
    return pq.read_table(out / "data").to_pylist() if (out / "data").exists() else []


def test_score_writes_every_row_once(scored):
    manifest = json.loads((scored / "manifest.json").read_text())
    assert manifest["rows"] == {"in": 13, "out": 10, "rejected": 3}
    rows = read_data(scored)
    assert len(rows) == 10
    assert set(SCORED) <= set(rows[0]) and {"question", "answer"} <= set(rows[0])
    rejects = pq.read_table(scored / "rejects.parquet").to_pylist()
    assert [r["row_index"] for r in rejects] == [3, 6, 12]
    assert "invalid JSON" in rejects[0]["reject_reason"]
    assert "answer" in rejects[1]["reject_reason"]
    assert "empty" in rejects[2]["reject_reason"]


def test_score_rows_are_in_input_order_and_well_formed(scored, corpus):
    questions = [json.loads(line).get("question") for line in corpus.read_text().splitlines()
                 if line.startswith('{"question": "') and line.endswith("}")]
    rows = read_data(scored)
    expected = [q for q in questions if q not in ("no answer here", "empty")]
    assert [r["question"] for r in rows] == expected
    for row in rows:
        mask = np.array(row["completion_mask"])
        n = len(row["input_ids"])
        assert all(len(row[c]) == n for c in SCORED if c != "pear_seq_weight")
        assert mask[0] == 0 and mask.sum() > 0
        target = np.array(row["target_logprobs"])
        behavior = np.array(row["behavior_logprobs"])
        assert np.all(target[mask == 0] == 0) and np.all(behavior[mask == 0] == 0)
        assert np.all(target[mask == 1] <= 0) and np.all(np.isfinite(target))
        assert np.any(target[mask == 1] != behavior[mask == 1])  # T=0.7 differs from T=1
        assert np.all(np.array(row["pear_token_weight"])[mask == 0] == 0)


def test_score_manifest_records_models_tokenizer_and_behavior(scored):
    manifest = json.loads((scored / "manifest.json").read_text())
    assert manifest["models"]["target"]["spec"] == "smollm2-135m-instruct"
    assert len(manifest["models"]["target"]["fingerprint"]) >= 16
    assert manifest["behavior"] == {"temperature": 0.7, "top_p": 1.0}
    assert manifest["tokenizer"]["fingerprint"] and manifest["tokenizer"]["chat_template_hash"]
    assert manifest["license"] == "mit"
    assert set(manifest["diagnostics"]) >= {"token", "block", "sequence", "mean_log_ratio"}
    card = (scored / "README.md").read_text()
    assert card.startswith("---\n") and "license: mit" in card


def test_kill_and_resume_gives_the_same_bytes(corpus, scored, tmp_path):
    out = tmp_path / "killed"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    args = command(corpus, "--out", out, *FIELDS, "--behavior-temperature", "0.7", "--shard-rows", "4",
                   "--device", "cpu", "--license", "mit")
    process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    progress = out / ".pear" / "progress.json"
    deadline = time.time() + 600
    while time.time() < deadline and process.poll() is None:
        if progress.exists() and len(json.loads(progress.read_text()).get("shards", [])) >= 1:
            break
        time.sleep(0.05)
    assert process.poll() is None, "the run finished before it could be killed"
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert not (out / "manifest.json").exists()
    result = run(corpus, "--out", out, *FIELDS, "--behavior-temperature", "0.7", "--shard-rows", "4",
                 "--device", "cpu", "--license", "mit", "--resume")
    assert result.returncode == 0, result.stderr
    assert output_files(out) == output_files(scored)


def test_resume_with_other_flags_is_refused(corpus, scored):
    result = run(corpus, "--out", scored, *FIELDS, "--behavior-temperature", "0.9", "--shard-rows", "4",
                 "--device", "cpu", "--resume")
    assert result.returncode == 2
    assert "temperature" in result.stderr


def test_over_length_rows_are_skipped_or_stop_the_run(corpus, tmp_path):
    skipped = run(corpus, "--out", tmp_path / "skip", *FIELDS, "--max-length", "90", "--on-overflow", "skip",
                  "--device", "cpu")
    assert skipped.returncode == 0, skipped.stderr
    rejects = pq.read_table(tmp_path / "skip" / "rejects.parquet").to_pylist()
    over = [r for r in rejects if "over max length" in r["reject_reason"]]
    assert over, rejects
    manifest = json.loads((tmp_path / "skip" / "manifest.json").read_text())
    assert manifest["rows"]["in"] == manifest["rows"]["out"] + manifest["rows"]["rejected"] == 13

    truncated = run(corpus, "--out", tmp_path / "trunc", *FIELDS, "--max-length", "90", "--device", "cpu")
    assert truncated.returncode == 0, truncated.stderr
    manifest = json.loads((tmp_path / "trunc" / "manifest.json").read_text())
    assert manifest["tokens"]["rows_truncated"] > 0
    assert all(len(r["input_ids"]) <= 90 for r in read_data(tmp_path / "trunc"))

    error = run(corpus, "--out", tmp_path / "err", *FIELDS, "--max-length", "90", "--on-overflow", "error",
                "--device", "cpu")
    assert error.returncode == 2
    assert "max length" in error.stderr


def test_recorded_behavior_logprobs_of_the_wrong_length_are_rejected(tmp_path):
    rows = [json.loads(line) for line in GSM8K.read_text().splitlines()[:3]]
    rows[0]["behavior"] = [-0.5] * 3  # far fewer than the completion's tokens
    # row 1: one recorded log-prob per target token of the whole row is accepted; built from a first run below
    rows[2]["behavior"] = None
    corpus = tmp_path / "recorded.jsonl"
    corpus.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    first = run(GSM8K, "--out", tmp_path / "plain", *FIELDS, "--device", "cpu", "--shard-rows", "2")
    assert first.returncode == 0, first.stderr
    row1 = read_data(tmp_path / "plain")[1]
    mask = np.array(row1["completion_mask"])
    rows[1]["behavior"] = np.array(row1["target_logprobs"])[mask == 1].tolist()
    corpus.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    result = run(corpus, "--out", tmp_path / "out", *FIELDS, "--behavior-logprobs-field", "behavior", "--device", "cpu")
    assert result.returncode == 0, result.stderr
    rejects = pq.read_table(tmp_path / "out" / "rejects.parquet").to_pylist()
    assert [r["row_index"] for r in rejects] == [0, 2]
    assert "has 3 log-probs" in rejects[0]["reject_reason"]
    (kept,) = read_data(tmp_path / "out")
    # behavior == target (recorded from the same model): every ratio is 1, weights are the discount alone
    np.testing.assert_allclose(kept["behavior_logprobs"], kept["target_logprobs"], atol=1e-6)


def test_missing_corpus_and_bad_flags_exit_2(tmp_path):
    assert run(tmp_path / "nope.jsonl", "--out", tmp_path / "o").returncode == 2
    bad = run(GSM8K, "--out", tmp_path / "o", *FIELDS, "--behavior-top-p", "1.5")
    assert bad.returncode == 2 and "top" in bad.stderr
