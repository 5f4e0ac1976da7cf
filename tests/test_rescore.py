"""`pear-data rescore`: a new target on the stored rows, the behavior kept (docs/design.md 5, 6). Tiny models: the
source is scored with one tiny target and a behavior with another tokenizer (spans of several tokens)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from .cli_harness import cli
from .tiny_model import make_tiny_model
from .tiny_scored import score_tiny, tiny_merged_dir_fixture, tiny_target_dir_fixture  # noqa: F401

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_target_dir, tiny_merged_dir) -> dict[str, Path]:
    """source: scored with the tiny target; reference: `score` of the same corpus with the new target (same
    tokenizer, other weights) and the same behavior; new: the new target's directory."""
    folder = tmp_path_factory.mktemp("rescore")
    new = make_tiny_model(folder / "checkpoint", "chatml", seed=5)
    return {"source": score_tiny(folder / "source", tiny_target_dir, tiny_merged_dir),
            "reference": score_tiny(folder / "reference", new, tiny_merged_dir), "new": new}


def rescore_args(runs: dict[str, Path], out: Path, *extra) -> list:
    return ["rescore", runs["source"], "--target", runs["new"], "--out", out, "--device", "cpu", *extra]


def flat(table, column: str) -> np.ndarray:
    return np.concatenate([np.asarray(v, dtype=np.float64) for v in table[column].to_pylist()])


def test_rescore_equals_a_full_score_under_the_new_target(capsys, runs, tmp_path):
    out = tmp_path / "rescored"
    code, _, text = cli(capsys, *rescore_args(runs, out, "--shard-rows", "3"))
    assert code == 0, text
    got, expected = pq.read_table(out / "data"), pq.read_table(runs["reference"] / "data")
    source = pq.read_table(runs["source"] / "data")
    assert got.column_names == expected.column_names and got.num_rows == expected.num_rows == 8
    for column in ("input_ids", "completion_mask", "shared_boundary", "behavior_logprobs", "answer"):
        assert got[column].to_pylist() == expected[column].to_pylist()
    assert got["behavior_logprobs"].to_pylist() == source["behavior_logprobs"].to_pylist()  # never rescored
    # torch_backend.py: a row scored in another batch drifts in the last float32 bits (< 1e-4 vs a naive forward)
    np.testing.assert_allclose(flat(got, "target_logprobs"), flat(expected, "target_logprobs"), atol=1e-4)
    assert not np.allclose(flat(got, "target_logprobs"), flat(source, "target_logprobs"))
    for column in ("pear_token_weight", "pear_block_weight"):
        np.testing.assert_allclose(flat(got, column), flat(expected, column), rtol=1e-3, atol=1e-6)
    np.testing.assert_allclose(got["pear_seq_weight"].to_numpy(), expected["pear_seq_weight"].to_numpy(), rtol=1e-3)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["command"] == "rescore" and manifest["rows"] == {"in": 8, "out": 8, "rejected": 0}
    assert manifest["models"]["target"]["spec"] == "checkpoint"
    assert manifest["models"]["previous_target"]["spec"] == "target"
    assert manifest["models"]["behavior"] == json.loads((runs["source"] / "manifest.json").read_text())["models"][
        "behavior"]
    assert manifest["source"]["manifest"].startswith("sha256:")


def test_a_target_with_another_tokenizer_is_refused_naming_both(capsys, runs, tiny_merged_dir, tmp_path):
    code, _, text = cli(capsys, "rescore", runs["source"], "--target", tiny_merged_dir, "--out", tmp_path / "x",
                     "--device", "cpu")
    text = text.replace("\n", "")
    assert code == 2, text
    assert f"--target {tiny_merged_dir}" in text and "(target, fingerprint" in text and "tokenizer" in text
    assert not (tmp_path / "x").exists()


KILLED_AT_THIRD_SHARD = """
import os, signal, sys
from pear_data.scoring import torch_backend
score, calls = torch_backend.TorchScorer.score, [0]
def killing_score(self, *args, **kwargs):
    calls[0] += 1
    if calls[0] == 3:  # shards 0 and 1 committed, shard 2 being scored
        os.kill(os.getpid(), signal.SIGKILL)
    return score(self, *args, **kwargs)
torch_backend.TorchScorer.score = killing_score
from pear_data.cli import main
sys.argv = ["pear-data", *sys.argv[1:]]
main()
"""


def output_bytes(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*"))
            if p.is_file() and ".pear" not in p.parts}


def test_kill_9_then_resume_gives_the_bytes_of_a_run_never_stopped(capsys, runs, tmp_path):
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    assert cli(capsys, *rescore_args(runs, whole, "--shard-rows", "2"))[0] == 0
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    args = [str(a) for a in rescore_args(runs, killed, "--shard-rows", "2")]
    result = subprocess.run([sys.executable, "-c", KILLED_AT_THIRD_SHARD, *args], env=env, cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == -signal.SIGKILL, result.stderr
    progress = json.loads((killed / ".pear" / "progress.json").read_text())
    assert len(progress["shards"]) == 2 and not (killed / "manifest.json").exists()
    code, _, text = cli(capsys, *rescore_args(runs, killed, "--shard-rows", "2", "--resume"))
    assert code == 0, text
    assert output_bytes(killed) == output_bytes(whole)
    code, _, text = cli(capsys, "rescore", runs["source"], "--target", runs["new"], "--out", killed, "--device", "cpu",
                     "--shard-rows", "3", "--resume")
    assert code == 2 and "shard_rows" in text
