"""Two CPU ranks (torchrun, gloo) give the step of one rank with twice the batch (design 4.3).

The process boundary is the point here: tests/ddp_step.py runs one PearSFTTrainer step per case under
`torchrun --nproc_per_node 2` and alone, and the two are compared: the loss as logged, the gradient before the
optimizer step (after DDP's all-reduce), and the pear/* diagnostics, which are reduced over the ranks.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("trl")
SCRIPT = Path(__file__).with_name("ddp_step.py")


def _run(command: list[str], tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]


def test_two_ranks_give_the_step_of_one_rank_with_twice_the_batch(tiny_scored, tmp_path):
    args = [str(tiny_scored.out), str(tiny_scored.model)]
    _run([sys.executable, str(SCRIPT), *args, str(tmp_path / "one.json"), "8"], tmp_path)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    _run([*torchrun, str(SCRIPT), *args, str(tmp_path / "two.json"), "4"], tmp_path)
    one = json.loads((tmp_path / "one.json").read_text())
    two = json.loads((tmp_path / "two.json").read_text())
    assert set(one) == set(two) == {"static-weights", "online-dataset", "online-tokens-packed"}
    for case in one:
        assert (one[case]["world"], two[case]["world"]) == (1, 2)
        a, b = np.array(one[case]["gradient"]), np.array(two[case]["gradient"])
        assert np.linalg.norm(a - b) / np.linalg.norm(a) < 1e-5, case
        for name, value in one[case]["log"].items():
            assert two[case]["log"][name] == pytest.approx(value, rel=1e-5, abs=1e-9), (case, name)
