"""`pear-data score` end to end (score.py, through the command line): exit codes, rows, columns, rejects, resume.

Tiny ChatML models (tests/tiny_model.py) score in milliseconds, so every run here goes through the real recipe
and the real writer in this process; only the kill -9 test starts a child process. The embedded models run in
tests/test_end_to_end.py.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from pear_data.errors import UsageError

from .cli_harness import assert_user_error, cli, command, output_files

ROOT = Path(__file__).resolve().parents[1]
GSM8K = ROOT / "examples" / "data" / "gsm8k_sample.jsonl"
FIELDS = ["--prompt-field", "question", "--completion-field", "answer"]
SCORED = ["input_ids", "completion_mask", "target_logprobs", "behavior_logprobs", "shared_boundary",
          "pear_token_weight", "pear_block_weight", "pear_seq_weight"]


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


def flags(model: Path, *extra: str) -> list[str]:
    """The tiny model as target and as behavior (at --behavior-temperature 0.7: another distribution)."""
    return [*FIELDS, "--target", str(model), "--behavior", str(model), "--behavior-temperature", "0.7",
            "--shard-rows", "4", "--device", "cpu", *extra]


@pytest.fixture(scope="module")
def scored(corpus, tmp_path_factory, tiny_model_dir) -> Path:
    out = tmp_path_factory.mktemp("score") / "out"
    run = cli(None, "score", corpus, "--out", out, *flags(tiny_model_dir, "--license", "mit"))
    assert run.code == 0, run.err
    return out


def read_data(out: Path) -> list[dict]:
    return pq.read_table(out / "data").to_pylist() if (out / "data").exists() else []


def manifest(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())


def test_every_row_is_written_once_or_rejected_with_its_reason(scored):
    assert manifest(scored)["rows"] == {"in": 13, "out": 10, "rejected": 3}
    rows = read_data(scored)
    assert len(rows) == 10
    assert set(SCORED) <= set(rows[0]) and {"question", "answer"} <= set(rows[0])
    rejects = pq.read_table(scored / "rejects.parquet").to_pylist()
    assert [r["row_index"] for r in rejects] == [3, 6, 12]
    assert "invalid JSON" in rejects[0]["reject_reason"]
    assert "answer" in rejects[1]["reject_reason"]
    assert "empty" in rejects[2]["reject_reason"]


def test_rows_are_in_input_order_and_well_formed(scored, corpus):
    questions = [json.loads(line).get("question") for line in corpus.read_text().splitlines()
                 if line.startswith('{"question": "') and line.endswith("}")]
    rows = read_data(scored)
    assert [r["question"] for r in rows] == [q for q in questions if q not in ("no answer here", "empty")]
    for row in rows:
        mask = np.array(row["completion_mask"])
        assert all(len(row[c]) == len(row["input_ids"]) for c in SCORED if c != "pear_seq_weight")
        assert mask[0] == 0 and mask.sum() > 0
        target, behavior = np.array(row["target_logprobs"]), np.array(row["behavior_logprobs"])
        assert np.all(target[mask == 0] == 0) and np.all(behavior[mask == 0] == 0)
        assert np.all(target[mask == 1] <= 0) and np.all(np.isfinite(target))
        assert np.any(target[mask == 1] != behavior[mask == 1])  # T=0.7 differs from T=1
        assert np.all(np.array(row["pear_token_weight"])[mask == 0] == 0)


def test_the_manifest_records_models_tokenizer_behavior_and_the_card_the_license(scored):
    record = manifest(scored)
    assert record["models"]["target"]["kind"] == "dir" and len(record["models"]["target"]["fingerprint"]) >= 16
    assert record["behavior"] == {"temperature": 0.7, "top_p": 1.0,
                                  "mode_reason": "same weights and tokenizer as the target"}
    assert record["alignment"] == {"mode": "direct"}
    assert record["tokenizer"]["fingerprint"] and record["tokenizer"]["chat_template_hash"]
    assert record["license"] == "mit"
    assert set(record["diagnostics"]) >= {"token", "block", "sequence", "mean_log_ratio"}
    card = (scored / "README.md").read_text()
    assert card.startswith("---\n") and "license: mit" in card


def test_a_run_killed_with_sigkill_resumes_to_the_same_bytes(corpus, scored, tmp_path, tiny_model_dir):
    out = tmp_path / "killed"
    args = command("score", corpus, "--out", out, *flags(tiny_model_dir, "--license", "mit", "--shard-rows", "1"))
    process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               env={**os.environ, "HF_HUB_OFFLINE": "1"})
    progress = out / ".pear" / "progress.json"
    deadline = time.time() + 300
    while time.time() < deadline and process.poll() is None:
        if progress.exists() and len(json.loads(progress.read_text()).get("shards", [])) >= 2:
            break
        time.sleep(0.02)
    assert process.poll() is None, "the run finished before it could be killed"
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert not (out / "manifest.json").exists()
    # --shard-rows is part of the run: the uninterrupted twin of this run shards by 1 too
    whole = tmp_path / "whole"
    assert cli(None, "score", corpus, "--out", whole,
               *flags(tiny_model_dir, "--license", "mit", "--shard-rows", "1")).code == 0
    resumed = cli(None, "score", corpus, "--out", out,
                  *flags(tiny_model_dir, "--license", "mit", "--shard-rows", "1", "--resume"))
    assert resumed.code == 0, resumed.err
    assert output_files(out) == output_files(whole)


def test_a_resume_with_other_flags_is_refused_naming_them(capsys, corpus, scored, tiny_model_dir):
    run = cli(capsys, "score", corpus, "--out", scored, *flags(tiny_model_dir, "--resume"),
              "--behavior-temperature", "0.9")
    assert_user_error(run, "temperature")


def test_over_length_rows_are_cut_skipped_or_stop_the_run(capsys, corpus, tmp_path, tiny_model_dir):
    skipped = cli(capsys, "score", corpus, "--out", tmp_path / "skip",
                  *flags(tiny_model_dir, "--max-length", "300", "--on-overflow", "skip"))
    assert skipped.code == 0, skipped.err
    over = [r for r in pq.read_table(tmp_path / "skip" / "rejects.parquet").to_pylist()
            if "over max length" in r["reject_reason"]]
    assert over
    record = manifest(tmp_path / "skip")
    assert record["rows"]["in"] == record["rows"]["out"] + record["rows"]["rejected"] == 13

    cut = cli(capsys, "score", corpus, "--out", tmp_path / "cut", *flags(tiny_model_dir, "--max-length", "300"))
    assert cut.code == 0, cut.err
    assert manifest(tmp_path / "cut")["tokens"]["rows_truncated"] > 0
    assert all(len(r["input_ids"]) <= 300 for r in read_data(tmp_path / "cut"))

    error = cli(capsys, "score", corpus, "--out", tmp_path / "err",
                *flags(tiny_model_dir, "--max-length", "300", "--on-overflow", "error"))
    assert_user_error(error, "max length")


def test_recorded_behavior_logprobs_of_the_wrong_length_are_rejected(capsys, tmp_path, tiny_model_dir):
    rows = [json.loads(line) for line in GSM8K.read_text().splitlines()[:3]]
    rows[0]["behavior"] = [-0.5] * 3  # far fewer than the completion's tokens
    rows[2]["behavior"] = None
    # row 1: one log-prob per target completion token, recorded from a run of row 1 alone (which is how the
    # second run batches it too: rows 0 and 2 are rejected before scoring), so both give the same bits
    alone = tmp_path / "row1.jsonl"
    alone.write_text(json.dumps(rows[1]) + "\n")
    base = [*FIELDS, "--target", tiny_model_dir, "--device", "cpu"]
    assert cli(capsys, "score", alone, "--out", tmp_path / "plain", *base, "--behavior", tiny_model_dir).code == 0
    row1 = read_data(tmp_path / "plain")[0]
    rows[1]["behavior"] = np.array(row1["target_logprobs"])[np.array(row1["completion_mask"]) == 1].tolist()
    corpus = tmp_path / "recorded.jsonl"
    corpus.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    run = cli(capsys, "score", corpus, "--out", tmp_path / "out", *base, "--behavior-logprobs-field", "behavior")
    assert run.code == 0, run.err
    rejects = pq.read_table(tmp_path / "out" / "rejects.parquet").to_pylist()
    assert [r["row_index"] for r in rejects] == [0, 2]
    assert "has 3 log-probs" in rejects[0]["reject_reason"]
    (kept,) = read_data(tmp_path / "out")
    np.testing.assert_allclose(kept["behavior_logprobs"], kept["target_logprobs"], atol=1e-6)


def test_dataset_normalization_resumes_after_its_rewrite_and_on_a_finished_run(capsys, corpus, tmp_path,
                                                                               tiny_model_dir):
    """--normalize dataset rewrites the shards once at the end; a run stopped after that rewrite (before the
    manifest), and a finished run, both --resume to the same bytes."""
    options = flags(tiny_model_dir, "--normalize", "dataset", "--max-weight", "2")
    out = tmp_path / "norm"
    assert cli(capsys, "score", corpus, "--out", out, *options).code == 0
    finished = output_files(out)
    progress = json.loads((out / ".pear" / "progress.json").read_text())
    assert progress["rewrites"] == ["normalize-dataset"] and progress["finished"]
    rows = read_data(out)
    weights = np.concatenate([np.array(r["pear_token_weight"])[np.array(r["completion_mask"]) == 1] for r in rows])
    assert weights.max() <= 2.0 and 0.5 < weights.mean() <= 1.0 + 1e-6  # normalized to mean 1, then capped

    assert cli(capsys, "score", corpus, "--out", out, *options, "--resume").code == 0
    assert output_files(out) == finished
    # The state right after the rewrite's commit point: shards rewritten, no manifest, card or rejects yet.
    for name in ("manifest.json", "README.md", "rejects.parquet"):
        (out / name).unlink()
    progress["finished"] = False
    (out / ".pear" / "progress.json").write_text(json.dumps(progress))
    assert cli(capsys, "score", corpus, "--out", out, *options, "--resume").code == 0
    assert output_files(out) == finished


def test_a_missing_corpus_and_bad_flags_exit_2(capsys, tmp_path):
    assert_user_error(cli(capsys, "score", tmp_path / "nope.jsonl", "--out", tmp_path / "o"), "nope.jsonl")
    assert_user_error(cli(capsys, "score", GSM8K, "--out", tmp_path / "o", *FIELDS, "--behavior-top-p", "1.5"),
                      "--behavior-top-p")


def test_the_same_tokenizer_through_the_alignment_path_gives_the_direct_bytes(capsys, corpus, scored, tmp_path,
                                                                              tiny_model_dir):
    out = tmp_path / "aligned"
    run = cli(capsys, "score", corpus, "--out", out, *flags(tiny_model_dir, "--license", "mit", "--alignment",
                                                             "char-offsets"))
    assert run.code == 0, run.err
    direct, aligned = pq.read_table(scored / "data"), pq.read_table(out / "data")
    for name in SCORED:
        assert aligned.column(name).equals(direct.column(name)), name
    assert manifest(out)["alignment"]["mode"] == "char-offsets"
    assert manifest(out)["alignment"]["chars_in_multi_token_spans"] == 0


def test_a_behavior_with_another_tokenizer_is_aligned_by_characters(capsys, corpus, tmp_path, tiny_model_dir,
                                                                    tiny_merged_dir):
    out = tmp_path / "cross"
    run = cli(capsys, "score", corpus, "--out", out, *FIELDS, "--target", tiny_model_dir, "--behavior",
              tiny_merged_dir, "--device", "cpu")
    assert run.code == 0, run.err
    assert "aligned by character offsets" in run.out
    alignment = manifest(out)["alignment"]
    assert alignment["mode"] == "char-offsets" and alignment["chars_in_multi_token_spans"] > 0
    for row in read_data(out):
        mask, shared = np.array(row["completion_mask"]), np.array(row["shared_boundary"])
        behavior = np.array(row["behavior_logprobs"])
        assert shared[mask == 0].sum() == 0 and shared[np.flatnonzero(mask)[-1]] == 1
        assert np.all(behavior[(mask == 1) & (shared == 0)] == 0)  # a span's log-prob sits on its last token
        assert np.all(behavior[shared == 1] < 0)
    assert "aligned by character offsets" in cli(capsys, "stats", out).out


def test_recorded_logprobs_in_coarser_tokens_are_exact_at_shared_boundaries(capsys, scored, tmp_path,
                                                                            tiny_model_dir):
    """A behavior whose tokens merge 1-3 consecutive target tokens (log-probs added: the chain rule), recorded
    as {text_offsets, logprobs}: sequence weights equal the direct path's, and token weights equal at every
    shared boundary (unclipped flags, where the span rule is the only difference)."""
    from transformers import AutoTokenizer

    from pear_data.align import turn_tokens
    from pear_data.tokenize import ConversationTokenizer

    unclipped = ["--log-ratio-clip=-inf,inf", "--weight-clip", "0,inf"]
    assert cli(capsys, "reweight", scored, "--out", tmp_path / "direct", *unclipped).code == 0
    direct = read_data(tmp_path / "direct")
    rng = np.random.default_rng(0)
    tokenizer = ConversationTokenizer(AutoTokenizer.from_pretrained(tiny_model_dir))
    records = []
    for row in direct:
        conversation = [{"role": "user", "content": row["question"]}, {"role": "assistant", "content": row["answer"]}]
        (turn,) = turn_tokens(tokenizer(conversation), [row["answer"]], "target")
        behavior = np.array(row["behavior_logprobs"], dtype=np.float64)[turn.positions]
        content = int(np.sum(turn.starts < len(row["answer"])))  # the rest is the end marker
        starts, logprobs, k = [], [], 0
        while k < content:
            stop = min(k + int(rng.integers(1, 4)), content)
            starts.append(int(turn.starts[k]))
            logprobs.append(float(behavior[k:stop].sum()))
            k = stop
        starts.append(len(row["answer"]))  # a recorded stop token: offsets at the end of the text are the end marker
        logprobs.append(float(behavior[content:].sum()))
        records.append({"question": row["question"], "answer": row["answer"],
                        "recorded": {"text_offsets": starts, "logprobs": logprobs}})
    recorded = tmp_path / "recorded.jsonl"
    recorded.write_text("".join(json.dumps(r) + "\n" for r in records))
    out = tmp_path / "recorded"
    run = cli(capsys, "score", recorded, "--out", out, *FIELDS, "--target", tiny_model_dir,
              "--behavior-logprobs-field", "recorded", "--device", "cpu", *unclipped)
    assert run.code == 0, run.err
    assert manifest(out)["alignment"]["mode"] == "char-offsets"
    assert manifest(out)["alignment"]["target_tokens_in_multi_token_spans"] > 0
    aligned = read_data(out)
    assert len(aligned) == len(direct)
    for a, d in zip(aligned, direct):
        shared, mask = np.array(a["shared_boundary"]) == 1, np.array(a["completion_mask"]) == 1
        assert shared.sum() < mask.sum()  # the merges left multi-token spans
        # Exact up to float32 storage of the span sums (|error| <= |lb_S| 2^-24 each) and the float drift of the
        # target log-probs between two batchings; every step after the log-ratio is 1-Lipschitz in log space.
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


def test_score_with_cuda_and_no_gpu_exits_2_and_writes_nothing(monkeypatch, tmp_path):
    import torch

    from pear_data.config import ScoreOptions, ScoringConfig
    from pear_data.score import score

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    corpus = tmp_path / "c.jsonl"
    corpus.write_text('{"prompt": "a", "completion": "b"}\n')
    for device in ("cuda", "cuda:0"):
        with pytest.raises(UsageError, match="--device"):
            score(corpus, tmp_path / "out", ScoreOptions(scoring=ScoringConfig(device=device)))
        assert not (tmp_path / "out").exists()


def test_score_with_a_cuda_index_past_the_gpus_exits_2(monkeypatch, tmp_path):
    import torch

    from pear_data.config import ScoreOptions, ScoringConfig
    from pear_data.score import score

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    corpus = tmp_path / "c.jsonl"
    corpus.write_text('{"prompt": "a", "completion": "b"}\n')
    with pytest.raises(UsageError, match="cuda:3"):
        score(corpus, tmp_path / "out", ScoreOptions(scoring=ScoringConfig(device="cuda:3")))
    assert not (tmp_path / "out").exists()
