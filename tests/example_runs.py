"""The SFT -> RL examples (examples/sft_then_rl) run as a user runs them: `run.py --preset NAME --out DIR`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "sft_then_rl"


def run_preset(preset: str, out: Path) -> dict:
    """Run a preset in a child process (one job at a time) and return its results.json."""
    command = [sys.executable, str(EXAMPLE / "run.py"), "--preset", preset, "--out", str(out), "--jobs", "1"]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "wall time" in proc.stdout
    return json.loads((out / "results.json").read_text())
