"""Dataset card (README.md front matter + body) and `push` (plan, dry run, upload call)."""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

import pyarrow as pa
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from huggingface_hub import DatasetCard  # noqa: E402
from huggingface_hub.repocard import metadata_load  # noqa: E402
from huggingface_hub.utils import filter_repo_objects  # noqa: E402

from pear_data.card import features_yaml, render_card  # noqa: E402
from pear_data.output import DatasetWriter, data_schema  # noqa: E402
from pear_data.push import PushError, plan_push, push  # noqa: E402
from pear_data.weights import WeightConfig  # noqa: E402

RUN_KEY = {"input": {"fingerprint": "sha256:abc"}}
# The shape of pear_data.diagnostics.Diagnostics.summary(): per granularity, plus run-wide scalars.
DIAG = {
    "tokens": 10,
    "mean": 1.02,
    "ess_fraction": 0.81,
    "min": 0.0123,
    "p01": 0.05,
    "p50": 0.97,
    "p99": 3.1,
    "max": 12.5,
    "share_at_bound": 0.003,
    "share_at_lower_bound": 0.001,
    "share_at_upper_bound": 0.002,
}


def scored_table(start: int, end: int) -> pa.Table:
    n = end - start
    ids = [[1, 2, 3 + r, 4] for r in range(start, end)]
    return pa.table(
        {
            "messages": pa.array(
                [
                    [{"role": "user", "content": f"q{r}"}, {"role": "assistant", "content": f"a{r}"}]
                    for r in range(start, end)
                ]
            ),
            "input_ids": pa.array(ids, pa.list_(pa.int32())),
            "completion_mask": pa.array([[0, 0, 1, 1]] * n, pa.list_(pa.int8())),
            "target_logprobs": pa.array([[0.0, 0.0, -0.5, -0.25]] * n, pa.list_(pa.float32())),
            "behavior_logprobs": pa.array([[0.0, 0.0, -0.4, -0.5]] * n, pa.list_(pa.float32())),
            "pear_token_weight": pa.array([[0.0, 0.0, 0.99, 1.0]] * n, pa.list_(pa.float32())),
            "pear_block_weight": pa.array([[0.0, 0.0, 1.0, 1.0]] * n, pa.list_(pa.float32())),
            "pear_seq_weight": pa.array([1.1] * n, pa.float32()),
        }
    )


def manifest(**extra) -> dict:
    return {
        "tool_version": "0.1.0",
        "input": {"fingerprint": "sha256:abc", "source": "corpus.jsonl"},
        "models": {
            "target": {"spec": "HuggingFaceTB/SmolLM2-135M-Instruct", "kind": "hub", "fingerprint": "sha256:t",
                       "name": "HuggingFaceTB/SmolLM2-135M-Instruct", "revision": "sha256:t", "dtype": "float32"},
            "behavior": {"spec": "google/gemma-3-270m", "kind": "hub", "fingerprint": "sha256:b",
                         "name": "google/gemma-3-270m", "revision": "sha256:b", "dtype": "float32"},
        },
        "behavior": {"temperature": 1.0, "top_p": 1.0},
        "weights": WeightConfig(granularity="block").to_dict(),
        "diagnostics": {
            **{g: dict(DIAG) for g in ("token", "block", "sequence")},
            "mean_log_ratio": -0.013,
            "completion_tokens": 10,
        },
        **extra,
    }


def finished_output(out: Path, *, with_rejects: bool = True, **extra) -> dict:
    writer = DatasetWriter(out, RUN_KEY)
    with writer.shard() as shard:
        shard.write(scored_table(0, 3))
        if with_rejects:
            shard.reject(pa.table({"row_index": [3], "reject_reason": ["empty completion (T = 0)"]}))
        shard.commit(4 if with_rejects else 3)
    with writer.shard() as shard:
        shard.write(scored_table(4 if with_rejects else 3, 6))
        shard.commit(6)
    return writer.finalize(manifest(**extra))


def test_card_parses_as_hub_dataset_card(tmp_path):
    out = tmp_path / "out"
    written = finished_output(out)
    text = (out / "README.md").read_text()
    data = DatasetCard(text).data.to_dict()
    assert data["license"] == "other"
    assert data["tags"] == ["pear-data", "pear-weighted", "sft", "importance-weighting", "arxiv:2602.01058"]
    assert data["configs"] == [{"config_name": "default", "data_files": [{"split": "train", "path": "data/*.parquet"}]}]
    features = {f["name"]: f for f in data["dataset_info"]["features"]}
    assert features["input_ids"] == {"name": "input_ids", "list": "int32"}
    assert features["completion_mask"] == {"name": "completion_mask", "list": "int8"}
    assert features["pear_seq_weight"] == {"name": "pear_seq_weight", "dtype": "float32"}
    size = written["bytes"]
    assert size["parquet"] == sum(p.stat().st_size for p in (out / "data").iterdir()) and size["uncompressed"] > 0
    assert data["dataset_info"]["splits"] == [{"name": "train", "num_bytes": size["uncompressed"], "num_examples": 5}]
    assert data["dataset_info"]["download_size"] == size["parquet"]
    block = data["pear_data"]
    assert block["primary_granularity"] == "block" and block["primary_weight_column"] == "pear_block_weight"
    assert block["models"]["target"]["fingerprint"] == "sha256:t"
    assert block["weights"]["gamma"] == 0.999 and block["weights"]["block_size"] == 4
    assert block["diagnostics"]["token"] == DIAG and block["diagnostics"]["mean_log_ratio"] == -0.013
    assert "| block | 10 | 1.02 | 0.81 | 0.0123 | 0.05 | 0.97 | 3.1 | 12.5 | 0.001 | 0.002 |" in text
    assert "- `mean_log_ratio`: -0.013" in text
    assert block["rows"] == written["rows"] == {"in": 6, "out": 5, "rejected": 1}
    assert metadata_load(out / "README.md")["license"] == "other"
    # the body: columns, formula, loading, counts
    for needle in (
        "`completion_mask`",
        "prod_{j=k+1}^{e_k} exp(d_j)",
        'load_dataset("parquet"',
        "pear_data.loss",
        "rejected rows",
        "load_from_disk",
    ):
        assert needle in text, needle


def test_license_is_passed_through(tmp_path):
    out = tmp_path / "out"
    finished_output(out, license="apache-2.0", tags=["math", "sft"])
    data = DatasetCard((out / "README.md").read_text()).data.to_dict()
    assert data["license"] == "apache-2.0"
    assert data["tags"] == ["pear-data", "pear-weighted", "sft", "importance-weighting", "arxiv:2602.01058", "math"]


def test_card_rendered_before_finalize_claims_no_split_sizes(tmp_path):
    datasets = pytest.importorskip("datasets")
    out = tmp_path / "out"
    writer = DatasetWriter(out, RUN_KEY)
    with writer.shard() as shard:
        shard.write(scored_table(0, 3))
        shard.commit(3)
    early = render_card(manifest(), pa.schema(scored_table(0, 1).schema))  # no "rows" yet
    assert "splits" not in DatasetCard(early).data.to_dict()["dataset_info"]
    writer.finalize(manifest(), early)
    assert datasets.load_dataset(str(out), split="train", cache_dir=str(tmp_path / "cache")).num_rows == 3


def test_card_is_deterministic_and_undated(tmp_path):
    out = tmp_path / "out"
    written = finished_output(out)
    schema = data_schema(out)
    text = render_card(written, schema)
    assert text == render_card(json.loads(json.dumps(written)), schema) == (out / "README.md").read_text()
    assert not re.search(r"\d{4}-\d{2}-\d{2}", text)
    assert text.startswith("---\n")


def test_features_yaml_matches_datasets(tmp_path):
    datasets = pytest.importorskip("datasets")
    schema = pa.schema(
        [
            ("text", pa.string()),
            ("big_text", pa.large_string()),
            ("flag", pa.bool_()),
            ("row_index", pa.int64()),
            ("score", pa.float64()),
            ("half", pa.float16()),
            ("messages", pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))),
            ("meta", pa.struct([("source", pa.string()), ("ids", pa.list_(pa.int64()))])),
            ("input_ids", pa.list_(pa.int32())),
            ("completion_mask", pa.list_(pa.int8())),
            ("pear_token_weight", pa.list_(pa.float32())),
            ("nested", pa.list_(pa.list_(pa.int32()))),
            ("large", pa.large_list(pa.float32())),
            ("fixed", pa.list_(pa.int32(), 3)),
            ("label", pa.dictionary(pa.int32(), pa.string())),
            ("when", pa.timestamp("us", tz="UTC")),
            ("day", pa.date32()),
            ("blob", pa.binary()),
        ]
    )
    assert features_yaml(schema) == datasets.Features.from_arrow_schema(schema)._to_yaml_list()


def test_load_dataset_from_output_dir_uses_card_configs(tmp_path):
    datasets = pytest.importorskip("datasets")
    out = tmp_path / "out"
    finished_output(out)
    ds = datasets.load_dataset(str(out), split="train", cache_dir=str(tmp_path / "cache"))
    assert ds.num_rows == 5  # data/ only: rejects.parquet and .pear/ are not rows
    assert ds["input_ids"][3] == [1, 2, 7, 4]  # row 4 (row 3 was rejected)
    assert ds.features["completion_mask"] == datasets.List(datasets.Value("int8"))
    assert ds.features["messages"].feature["role"] == datasets.Value("string")
    assert ds.info.splits["train"].num_examples == 5  # read from the card's dataset_info


def all_files(out: Path) -> list[str]:
    return sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())


def test_plan_lists_data_manifest_card_rejects_and_excludes_state(tmp_path):
    out = tmp_path / "out"
    finished_output(out)
    (out / "notes.txt").write_text("not part of the dataset")
    plan = plan_push(out)
    paths = [f.path_in_repo for f in plan]
    assert paths == [
        "README.md",
        "data/part-00000.parquet",
        "data/part-00001.parquet",
        "manifest.json",
        "rejects.parquet",
    ]
    assert any(p.startswith(".pear/") for p in all_files(out))
    for f in plan:
        assert f.size == (out / f.path_in_repo).stat().st_size
        assert f.sha256 == hashlib.sha256((out / f.path_in_repo).read_bytes()).hexdigest()
    # the allow_patterns push() passes select exactly the plan with huggingface_hub's own matcher
    assert list(filter_repo_objects(all_files(out), allow_patterns=paths, ignore_patterns=[".pear/*"])) == paths

    clean = tmp_path / "clean"
    finished_output(clean, with_rejects=False)
    assert "rejects.parquet" not in [f.path_in_repo for f in plan_push(clean)]


def test_push_refuses_unfinished_output(tmp_path):
    out = tmp_path / "out"
    writer = DatasetWriter(out, RUN_KEY)
    with writer.shard() as shard:
        shard.write(scored_table(0, 2))
        shard.commit(2)
    with pytest.raises(PushError, match="no manifest.json"):
        plan_push(out)
    writer.finalize(manifest())
    assert plan_push(out)
    writer.rewrite_data_files(lambda t: t, name="noop")  # data changed after the manifest
    with pytest.raises(PushError, match="not finished"):
        push(out, "me/data", dry_run=True)
    writer.finalize(manifest())
    (out / "data" / "part-00000.parquet").unlink()
    with pytest.raises(PushError, match="missing: data/part-00000.parquet"):
        plan_push(out)


def test_dry_run_never_touches_the_hub(tmp_path, monkeypatch):
    import huggingface_hub

    class NoNetwork:
        def __init__(self, *args, **kwargs):
            raise AssertionError("dry run built an HfApi")

    monkeypatch.setattr(huggingface_hub, "HfApi", NoNetwork)
    out = tmp_path / "out"
    finished_output(out)
    result = push(out, "my-org/sft-pear", private=True, dry_run=True, token="hf_secret_token")
    assert result.dry_run and result.commit_url is None
    assert [f.path_in_repo for f in result.files] == [f.path_in_repo for f in plan_push(out)]
    assert result.total_bytes == sum((out / f.path_in_repo).stat().st_size for f in result.files)
    text = result.describe()
    assert "my-org/sft-pear" in text and "repo type dataset" in text and "private=True" in text
    assert f"{result.total_bytes} bytes" in text and "data/part-00001.parquet" in text
    assert "hf_secret_token" not in text + repr(result)
    with pytest.raises(PushError, match="invalid repo id"):
        push(out, "my org/bad name", dry_run=True)
    with pytest.raises(PushError, match="needs a namespace"):
        push(out, "sft-pear", dry_run=True)


class RecordingApi:
    """Stands in for the Hub (no network in tests); records what push() asks of HfApi."""

    def __init__(self):
        self.calls = []

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", repo_id, kwargs))

    def upload_folder(self, **kwargs):
        self.calls.append(("upload_folder", kwargs))

        class Info:
            commit_url = "https://huggingface.co/datasets/my-org/sft-pear/commit/0"

        return Info()


def test_push_creates_dataset_repo_and_uploads_the_plan(tmp_path):
    out = tmp_path / "out"
    finished_output(out)
    api = RecordingApi()
    result = push(out, "my-org/sft-pear", private=True, api=api)
    (_, repo_id, create_kwargs), (_, upload) = api.calls
    assert repo_id == "my-org/sft-pear"
    assert create_kwargs == {"repo_type": "dataset", "private": True, "exist_ok": True}
    assert upload["folder_path"] == str(out) and upload["repo_type"] == "dataset"
    assert upload["allow_patterns"] == [f.path_in_repo for f in plan_push(out)]
    assert ".pear/*" in upload["ignore_patterns"] and "data/*" in upload["delete_patterns"]
    assert upload["commit_message"] == "pear-data: 5 rows in 2 Parquet shards"
    assert result.commit_url.endswith("/commit/0") and not result.dry_run
