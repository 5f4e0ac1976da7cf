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
SELF = ["--behavior", "smollm2-135m-instruct"]  # behavior = the target itself (at --behavior-temperature)
SCORED = ["input_ids", "completion_mask", "target_logprobs", "behavior_logprobs", "shared_boundary",
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
    result = run(corpus, "--out", out, *FIELDS, *SELF, "--behavior-temperature", "0.7", "--shard-rows", "4",
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
    assert manifest["behavior"] == {"temperature": 0.7, "top_p": 1.0,
                                    "mode_reason": "same weights and tokenizer as the target"}
    assert manifest["alignment"] == {"mode": "direct"}
    assert manifest["tokenizer"]["fingerprint"] and manifest["tokenizer"]["chat_template_hash"]
    assert manifest["license"] == "mit"
    assert set(manifest["diagnostics"]) >= {"token", "block", "sequence", "mean_log_ratio"}
    card = (scored / "README.md").read_text()
    assert card.startswith("---\n") and "license: mit" in card


def test_kill_and_resume_gives_the_same_bytes(corpus, scored, tmp_path):
    out = tmp_path / "killed"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    args = command(corpus, "--out", out, *FIELDS, *SELF, "--behavior-temperature", "0.7", "--shard-rows", "4",
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
    result = run(corpus, "--out", out, *FIELDS, *SELF, "--behavior-temperature", "0.7", "--shard-rows", "4",
                 "--device", "cpu", "--license", "mit", "--resume")
    assert result.returncode == 0, result.stderr
    assert output_files(out) == output_files(scored)


def test_resume_with_other_flags_is_refused(corpus, scored):
    result = run(corpus, "--out", scored, *FIELDS, *SELF, "--behavior-temperature", "0.9", "--shard-rows", "4",
                 "--device", "cpu", "--resume")
    assert result.returncode == 2
    assert "temperature" in result.stderr


def test_over_length_rows_are_skipped_or_stop_the_run(corpus, tmp_path):
    skipped = run(corpus, "--out", tmp_path / "skip", *FIELDS, *SELF, "--max-length", "90", "--on-overflow", "skip",
                  "--device", "cpu")
    assert skipped.returncode == 0, skipped.stderr
    rejects = pq.read_table(tmp_path / "skip" / "rejects.parquet").to_pylist()
    over = [r for r in rejects if "over max length" in r["reject_reason"]]
    assert over, rejects
    manifest = json.loads((tmp_path / "skip" / "manifest.json").read_text())
    assert manifest["rows"]["in"] == manifest["rows"]["out"] + manifest["rows"]["rejected"] == 13

    truncated = run(corpus, "--out", tmp_path / "trunc", *FIELDS, *SELF, "--max-length", "90", "--device", "cpu")
    assert truncated.returncode == 0, truncated.stderr
    manifest = json.loads((tmp_path / "trunc" / "manifest.json").read_text())
    assert manifest["tokens"]["rows_truncated"] > 0
    assert all(len(r["input_ids"]) <= 90 for r in read_data(tmp_path / "trunc"))

    error = run(corpus, "--out", tmp_path / "err", *FIELDS, *SELF, "--max-length", "90", "--on-overflow", "error",
                "--device", "cpu")
    assert error.returncode == 2
    assert "max length" in error.stderr


def test_recorded_behavior_logprobs_of_the_wrong_length_are_rejected(tmp_path):
    rows = [json.loads(line) for line in GSM8K.read_text().splitlines()[:3]]
    rows[0]["behavior"] = [-0.5] * 3  # far fewer than the completion's tokens
    # row 1: one recorded log-prob per target completion token is accepted; recorded from a first run of row 1
    # alone, which is also how the second run batches it (rows 0 and 2 are rejected before scoring), so both
    # runs give the same bits (batch composition changes float rounding)
    rows[2]["behavior"] = None
    alone = tmp_path / "row1.jsonl"
    alone.write_text(json.dumps(rows[1]) + "\n")
    first = run(alone, "--out", tmp_path / "plain", *FIELDS, *SELF, "--device", "cpu")
    assert first.returncode == 0, first.stderr
    row1 = read_data(tmp_path / "plain")[0]
    mask = np.array(row1["completion_mask"])
    rows[1]["behavior"] = np.array(row1["target_logprobs"])[mask == 1].tolist()
    corpus = tmp_path / "recorded.jsonl"
    corpus.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    result = run(corpus, "--out", tmp_path / "out", *FIELDS, "--behavior-logprobs-field", "behavior", "--device", "cpu")
    assert result.returncode == 0, result.stderr
    rejects = pq.read_table(tmp_path / "out" / "rejects.parquet").to_pylist()
    assert [r["row_index"] for r in rejects] == [0, 2]
    assert "has 3 log-probs" in rejects[0]["reject_reason"]
    (kept,) = read_data(tmp_path / "out")
    # behavior == target (recorded from the same model): every ratio is 1, weights are the discount alone
    np.testing.assert_allclose(kept["behavior_logprobs"], kept["target_logprobs"], atol=1e-6)


def test_dataset_normalization_resumes_after_its_rewrite_and_on_a_finished_run(corpus, tmp_path):
    """--normalize dataset rewrites the shards once at the end; a run stopped after that rewrite (before the
    manifest), and a finished run, both --resume to the same bytes."""
    flags = [*FIELDS, *SELF, "--behavior-temperature", "0.7", "--shard-rows", "4", "--device", "cpu",
             "--normalize", "dataset", "--max-weight", "2"]
    out = tmp_path / "norm"
    result = run(corpus, "--out", out, *flags)
    assert result.returncode == 0, result.stderr
    finished = output_files(out)
    progress = json.loads((out / ".pear" / "progress.json").read_text())
    assert progress["rewrites"] == ["normalize-dataset"] and progress["finished"]
    rows = read_data(out)
    weights = np.concatenate([np.array(r["pear_token_weight"])[np.array(r["completion_mask"]) == 1] for r in rows])
    assert weights.max() <= 2.0 and 0.5 < weights.mean() <= 1.0 + 1e-6  # normalized to mean 1, then capped

    again = run(corpus, "--out", out, *flags, "--resume")
    assert again.returncode == 0, again.stderr
    assert output_files(out) == finished

    # The state right after the rewrite's commit point: shards rewritten, no manifest, card or rejects yet.
    for name in ("manifest.json", "README.md", "rejects.parquet"):
        (out / name).unlink()
    progress["finished"] = False
    (out / ".pear" / "progress.json").write_text(json.dumps(progress))
    resumed = run(corpus, "--out", out, *flags, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert output_files(out) == finished


def test_missing_corpus_and_bad_flags_exit_2(tmp_path):
    assert run(tmp_path / "nope.jsonl", "--out", tmp_path / "o").returncode == 2
    bad = run(GSM8K, "--out", tmp_path / "o", *FIELDS, "--behavior-top-p", "1.5")
    assert bad.returncode == 2 and "top" in bad.stderr


# --------------------------------------------------------------------------- cross-tokenizer behavior (design 3.7)


def test_default_pair_is_gemma_behavior_aligned_to_smollm2_targets(tmp_path):
    """No model flags: target SmolLM2-135M-Instruct (ChatML), behavior Gemma-3-270M base (raw template)."""
    corpus = tmp_path / "gsm8k6.jsonl"
    corpus.write_text("".join(line + "\n" for line in GSM8K.read_text().splitlines()[:6]))
    out = tmp_path / "out"
    result = run(corpus, "--out", out, *FIELDS, "--device", "cpu")
    assert result.returncode == 0, result.stderr
    assert "aligned by character offsets" in result.stdout
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["rows"] == {"in": 6, "out": 6, "rejected": 0}
    assert manifest["models"]["target"]["spec"] == "smollm2-135m-instruct"
    assert manifest["models"]["behavior"]["spec"] == "gemma-3-270m"
    assert manifest["behavior"]["template"] == "raw"
    assert manifest["behavior"]["tokenizer"]["fingerprint"] != manifest["tokenizer"]["fingerprint"]
    alignment = manifest["alignment"]
    assert alignment["mode"] == "char-offsets" and alignment["rows"] == 6
    answers = [json.loads(line)["answer"] for line in corpus.read_text().splitlines()]
    assert alignment["completion_chars"] == sum(len(a) for a in answers)
    assert (alignment["chars_in_one_token_spans"] + alignment["chars_in_multi_token_spans"]
            == alignment["completion_chars"])
    assert 0.8 < alignment["share_chars_in_one_token_spans"] < 1.0
    assert "char-offsets" in (out / "README.md").read_text()
    for row in read_data(out):
        mask = np.array(row["completion_mask"])
        shared = np.array(row["shared_boundary"])
        behavior = np.array(row["behavior_logprobs"])
        assert shared[mask == 0].sum() == 0 and shared[np.flatnonzero(mask)[-1]] == 1
        assert np.all(behavior[(mask == 1) & (shared == 0)] == 0)  # a span's log-prob sits on its last token
        assert np.all(behavior[shared == 1] < 0)
    assert read_data(out)[0]["shared_boundary"].count(0) > len(read_data(out)[0]["input_ids"]) // 2  # prompt + inner
    stats = subprocess.run([sys.executable, "-m", "pear_data.cli", "stats", str(out)], capture_output=True, text=True)
    assert stats.returncode == 0 and "aligned by character offsets" in stats.stdout


def test_same_tokenizer_through_the_alignment_path_equals_the_direct_path(corpus, scored, tmp_path):
    """SmolLM2 against itself at T=0.7, forced through character-offset alignment: the same bytes of data."""
    out = tmp_path / "aligned"
    result = run(corpus, "--out", out, *FIELDS, *SELF, "--behavior-temperature", "0.7", "--shard-rows", "4",
                 "--device", "cpu", "--license", "mit", "--alignment", "char-offsets")
    assert result.returncode == 0, result.stderr
    direct, aligned = pq.read_table(scored / "data"), pq.read_table(out / "data")
    for name in SCORED:
        assert aligned.column(name).equals(direct.column(name)), name
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["alignment"]["mode"] == "char-offsets"
    assert manifest["alignment"]["chars_in_multi_token_spans"] == 0


def test_recorded_logprobs_in_coarser_tokens_are_exact_at_shared_boundaries(scored, smollm2_tokenizer, tmp_path):
    """A behavior whose tokens merge 1-3 consecutive target tokens (log-probs added: the chain rule), recorded
    as {text_offsets, logprobs}: sequence weights equal the direct path's, and token weights equal at every
    shared boundary (unclipped flags, where the span rule is the only difference)."""
    from pear_data.align import turn_tokens
    from pear_data.tokenize import ConversationTokenizer

    unclipped = ["--log-ratio-clip=-inf,inf", "--weight-clip", "0,inf"]
    direct_out = tmp_path / "direct"
    reweighted = subprocess.run([sys.executable, "-m", "pear_data.cli", "reweight", str(scored), "--out",
                                 str(direct_out), *unclipped], capture_output=True, text=True)
    assert reweighted.returncode == 0, reweighted.stderr
    direct = read_data(direct_out)

    rng = np.random.default_rng(0)
    tokenizer = ConversationTokenizer(smollm2_tokenizer)
    records = []
    for row in direct:
        conversation = [{"role": "user", "content": row["question"]}, {"role": "assistant", "content": row["answer"]}]
        (turn,) = turn_tokens(tokenizer(conversation), [row["answer"]], "target")
        behavior = np.array(row["behavior_logprobs"], dtype=np.float64)[turn.positions]
        L = len(row["answer"])
        content = int(np.sum(turn.starts < L))  # the rest is the end marker <|im_end|>
        starts, logprobs, k = [], [], 0
        while k < content:
            stop = min(k + int(rng.integers(1, 4)), content)
            starts.append(int(turn.starts[k]))
            logprobs.append(float(behavior[k:stop].sum()))
            k = stop
        starts.append(L)  # a recorded stop token: offsets at the end of the text are the end marker
        logprobs.append(float(behavior[content:].sum()))
        records.append({"question": row["question"], "answer": row["answer"],
                        "recorded": {"text_offsets": starts, "logprobs": logprobs}})
    recorded_corpus = tmp_path / "recorded.jsonl"
    recorded_corpus.write_text("".join(json.dumps(r) + "\n" for r in records))
    out = tmp_path / "recorded"
    result = run(recorded_corpus, "--out", out, *FIELDS, "--behavior-logprobs-field", "recorded", "--device", "cpu",
                 *unclipped)
    assert result.returncode == 0, result.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["alignment"]["mode"] == "char-offsets"
    assert manifest["alignment"]["target_tokens_in_multi_token_spans"] > 0
    aligned = read_data(out)
    assert len(aligned) == len(direct)
    for a, d in zip(aligned, direct):
        shared = np.array(a["shared_boundary"]) == 1
        mask = np.array(a["completion_mask"]) == 1
        assert shared.sum() < mask.sum()  # the merges left multi-token spans
        # Exact up to float32 storage: the span sums are stored as float32 (|error| <= |lb_S| 2^-24 each), and
        # the two runs batch the target differently (the target log-probs drift by float rounding); every step
        # after the log-ratio is 1-Lipschitz in log space, so |log W_a - log W_d| is at most the sum of both.
        drift = np.abs(np.array(a["target_logprobs"], np.float64) - np.array(d["target_logprobs"], np.float64)).sum()
        rounding = np.abs(np.array(a["behavior_logprobs"], np.float64)[shared]).sum() * 2.0**-23
        tolerance = np.expm1(drift + rounding) + 1e-6
        assert tolerance < 1e-3  # tight enough to catch a misplaced span (whole nats)
        np.testing.assert_allclose(a["pear_seq_weight"], d["pear_seq_weight"], rtol=tolerance)
        np.testing.assert_allclose(np.array(a["pear_token_weight"])[shared], np.array(d["pear_token_weight"])[shared],
                                   rtol=tolerance)
        inside = mask & ~shared
        assert not np.allclose(np.array(a["pear_token_weight"])[inside], np.array(d["pear_token_weight"])[inside],
                               rtol=1e-3)  # inside a span: the span rule, not the per-token suffix
