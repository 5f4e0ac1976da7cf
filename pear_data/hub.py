"""Whether the Hugging Face Hub may be contacted (the corpus and model readers ask before any download)."""

from __future__ import annotations

import os

OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")


def hub_offline() -> bool:
    """True when one of OFFLINE_VARIABLES is set now, or when huggingface_hub read HF_HUB_OFFLINE at its import
    (it then refuses downloads anyway)."""
    if any(os.environ.get(name, "").strip().lower() in {"1", "on", "yes", "true"} for name in OFFLINE_VARIABLES):
        return True
    try:
        from huggingface_hub import constants
    except ImportError:
        return False
    return bool(constants.HF_HUB_OFFLINE)
