"""What the opt-in framework tests share: their gate, and the reference loss they compare each framework with.

A framework test module runs only with PEAR_INTEGRATION_TESTS=1 in the framework's own environment:

    scripts/make_integration_env.sh verl
    PEAR_INTEGRATION_TESTS=1 .venvs/verl/bin/python -m pytest -q -p no:cacheprovider tests/integrations/test_verl.py

and is skipped, saying so, anywhere else (the default test run).
"""

from __future__ import annotations

import os

import pytest


def require(framework: str) -> None:
    """Skip the calling module unless PEAR_INTEGRATION_TESTS=1 and `framework` is importable."""
    how = (f"scripts/make_integration_env.sh {framework}, then PEAR_INTEGRATION_TESTS=1 .venvs/{framework}/bin/python "
           f"-m pytest tests/integrations/test_{framework}.py")
    if os.environ.get("PEAR_INTEGRATION_TESTS") != "1":
        pytest.skip(f"opt-in {framework} tests: {how}", allow_module_level=True)
    pytest.importorskip(framework, reason=f"{framework} is not installed here: {how}")


def reference_loss(scored, mode: str, config, cache) -> float:
    """`pear_loss` on every row of a tiny scored output, padded (`PearCollator`), with the model it was scored with:
    the loss a framework's first step must give when that step's batch holds every row (float32, sdpa)."""
    import torch
    from transformers import AutoModelForCausalLM

    from pear_data.collator import PearCollator
    from pear_data.loss import pear_loss

    rows = list(scored.dataset(cache))
    online = mode == "online"
    batch = PearCollator(0, weights=None if online else config.granularity, behavior=online)(rows)
    model = AutoModelForCausalLM.from_pretrained(scored.model, attn_implementation="sdpa")
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return float(pear_loss(batch["labels"], logits=logits, weights=batch.get("pear_weights"), config=config,
                           behavior_logprobs=batch.get("behavior_logprobs"),
                           shared_boundary=batch.get("shared_boundary")).loss)
