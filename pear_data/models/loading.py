"""Loading a `ModelSource`: its tokenizer and its model, through the on-disk cache of converted GGUF models
(written crash-safe: a temporary directory renamed into place). Every loader error of a damaged model becomes a
`ModelSpecError` naming its path (`_loading`).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import os
import shutil
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import USER_OS_ERRORS, ModelSpecError, PearDataError
from .sources import EMBEDDED_MODELS, ModelSource, cache_dir, converted_dir, log

if TYPE_CHECKING:  # torch and transformers are imported lazily: `reweight` needs no model
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

_CACHE_MARKER = "pear_cache.json"

_CONVERTED_WEIGHTS = "model.safetensors"


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

    log(f"reading the tokenizer of {source.gguf_file} from its GGUF metadata (once, ~10-60 s)")
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

    log(f"converting {source.gguf_file} to a torch cache at {entry} (once, {_estimate(source)})")
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
    log(f"converted {source.gguf_file} in {time.perf_counter() - started:.0f} s")
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
