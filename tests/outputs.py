"""Inputs and outputs the command-line tests share: GSM8K rows, a tiny-model `score`, a finished output to copy,
and readers of what a run wrote. Commands run through tests/cli_harness.py, the one harness."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pear_data.weights import WeightConfig

from .cli_harness import cli
from .scored_data import scored_table, write_parquet

ROOT = Path(__file__).resolve().parents[1]
GSM8K = ROOT / "examples" / "data" / "gsm8k_sample.jsonl"
FIELDS = ["--prompt-field", "question", "--completion-field", "answer"]


def score(capsys, corpus: Path, out: Path, model: Path, *extra, behavior: Path | None = None) -> tuple[int, str]:
    """`pear-data score` with `model` as target and behavior on CPU: (exit code, everything it printed)."""
    run = cli(capsys, "score", corpus, "--out", out, "--target", model, "--behavior", behavior or model,
              "--device", "cpu", *extra)
    return run.code, run.text


def assert_user_error(code: int, err: str, *fragments: str) -> None:
    """Exit 2, no traceback, and the message names what it should."""
    assert code == 2, err
    assert "Traceback" not in err and "internal error" not in err, err
    for fragment in fragments:
        assert fragment in err.replace("\n", " ") or fragment in err, (fragment, err)


def assert_named(code: int, text: str, *fragments) -> None:
    """Exit 2, no traceback, and everything it printed (lines joined) names each fragment."""
    flat = text.replace("\n", "")
    assert code == 2, text
    assert "Traceback" not in text and "internal error" not in text, text
    for fragment in fragments:
        assert str(fragment) in flat, (fragment, text)


def truncate_file(path: Path) -> None:
    """Keep the first half of a file's bytes (a truncated download, a disk that filled)."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def gsm8k(n: int) -> list[dict]:
    return [json.loads(line) for line in GSM8K.read_text().splitlines()[:n]]


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def data(out: Path) -> pa.Table:
    return pq.read_table(out / "data")


def rejects(out: Path) -> list[dict]:
    path = out / "rejects.parquet"
    return pq.read_table(path).to_pylist() if path.exists() else []


def manifest(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())


def output_bytes(out: Path) -> dict[str, bytes]:
    """Every file of an output but its resume state, with its bytes."""
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*"))
            if p.is_file() and ".pear" not in p.parts}


def tree(path: Path) -> dict[str, bytes]:
    """Every file under `path` with its bytes (to show that nothing was touched)."""
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def copy_output(output: Path, dest: Path) -> Path:
    shutil.copytree(output, dest)
    return dest


@pytest.fixture(scope="module", name="scored")
def scored_fixture(tmp_path_factory) -> Path:
    """Synthetic scored rows (tests/scored_data.py) in one Parquet file."""
    return write_parquet(scored_table(40, seed=3), tmp_path_factory.mktemp("src") / "scored.parquet")


@pytest.fixture(scope="module", name="output")
def output_fixture(scored, tmp_path_factory) -> Path:
    """A finished pear-data output (reweight of `scored`, 3 shards). Tests copy it before changing it."""
    from pear_data.config import ReweightOptions
    from pear_data.reweight import reweight

    out = tmp_path_factory.mktemp("runs") / "out"
    reweight(scored, out, WeightConfig(), ReweightOptions(shard_rows=15))
    return out
