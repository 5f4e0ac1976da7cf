"""Shared fixtures. Real embedded models, loaded at most once per test session.

The model fixtures use the user cache (`~/.cache/pear-data`, or
$PEAR_DATA_CACHE), so a GGUF file is converted once per machine, not once per
run: the first run pays the conversion (SmolLM2 ~20-40 s, Gemma ~1-3 min on
2 CPU cores), later runs load the converted cache in seconds.
"""

from __future__ import annotations

import os
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach the network
if os.environ.get("PYTEST_XDIST_WORKER"):
    # `-n auto` already runs one test per core: torch's own threads on top would only contend for them (set
    # before torch loads; the CLI subprocesses of the tests inherit it)
    os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest

# Output and tiny-model fixtures, registered here once for every test module.
from .outputs import output_fixture, scored_fixture  # noqa: F401
from .tiny_model import (  # noqa: F401
    tiny_model_dir_fixture,
    tiny_strict_model_dir_fixture,
    tiny_turns_model_dir_fixture,
)
from .tiny_scored import (  # noqa: F401
    tiny_merged_dir_fixture,
    tiny_scored_cross_fixture,
    tiny_scored_fixture,
    tiny_target_dir_fixture,
)


def _embedded_source(alias: str) -> Any:
    from pear_data.models import ModelSpecError, resolve_model

    try:
        return resolve_model(alias)
    except ModelSpecError as exc:  # the embedded-model package is not installed
        pytest.skip(str(exc))


@pytest.fixture(scope="session")
def smollm2_source() -> Any:
    """ModelSource of the embedded SmolLM2-135M-Instruct (GGUF Q4_1, ChatML template)."""
    return _embedded_source("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_source: Any) -> Any:
    """SmolLM2's tokenizer via pear_data.models.load_tokenizer (cached, 49,152 tokens)."""
    from pear_data.models import load_tokenizer

    return load_tokenizer(smollm2_source)


@pytest.fixture(scope="session")
def smollm2_model(smollm2_source: Any) -> Any:
    """SmolLM2 as a float32 CPU LlamaForCausalLM in eval mode, from the converted cache. Do not mutate it."""
    import torch

    from pear_data.models import load_model

    return load_model(smollm2_source, device="cpu", dtype=torch.float32)


@pytest.fixture(scope="session")
def gemma_source() -> Any:
    """ModelSource of the embedded Gemma-3-270M base (GGUF Q4_K_M, 262,144 tokens, no chat template)."""
    return _embedded_source("gemma-3-270m")


@pytest.fixture(scope="session")
def gemma_tokenizer(gemma_source: Any) -> Any:
    from pear_data.models import load_tokenizer

    return load_tokenizer(gemma_source)


@pytest.fixture(scope="session")
def gemma_model(gemma_source: Any) -> Any:
    """Gemma-3-270M as a float32 CPU Gemma3ForCausalLM in eval mode, from the converted cache. Do not mutate it."""
    import torch

    from pear_data.models import load_model

    return load_model(gemma_source, device="cpu", dtype=torch.float32)


REAL_MODEL_FIXTURES = frozenset(
    {"smollm2_source", "smollm2_tokenizer", "smollm2_model", "gemma_source", "gemma_tokenizer", "gemma_model"}
)


def pytest_collection_modifyitems(config, items) -> None:
    """Every test that uses an embedded model is `slow`, whatever its module says: `-m "not slow"` skips them all."""
    for item in items:
        if REAL_MODEL_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
