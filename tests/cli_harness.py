"""The one harness of the command-line tests: `pear-data ARGS` in this process (`cli`), or in a child process
(`cli_process`) where the process boundary is the point (signals, kill -9, locks, pipes, worker processes)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple


class Run(NamedTuple):
    """How a command ended: its exit code and what it printed (`code, out, err = cli(...)`)."""

    code: int
    out: str
    err: str

    @property
    def text(self) -> str:
        return self.out + self.err


def cli(capsys, *args: str | Path) -> Run:
    """`pear-data ARGS` in this process (the same `main` the console script runs), output captured by capsys
    (None: not captured, as in a module fixture; `out` and `err` are then empty)."""
    from pear_data import cli as pear_cli

    argv = sys.argv
    sys.argv = ["pear-data", *map(str, args)]
    try:
        pear_cli.main()
        code = 0
    except SystemExit as exc:
        code = 0 if exc.code is None else int(exc.code)
    finally:
        sys.argv = argv
    if capsys is None:
        return Run(code, "", "")
    captured = capsys.readouterr()
    return Run(code, captured.out, captured.err)


def cli_process(*args: str | Path, timeout: float = 600) -> Run:
    """`python -m pear_data ARGS` in a child process (offline)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-m", "pear_data", *map(str, args)], capture_output=True, text=True,
                            timeout=timeout, env=env)
    return Run(result.returncode, result.stdout, result.stderr)


def command(*args: str | Path) -> list[str]:
    """The argv of `python -m pear_data ARGS`, for a child process a test controls itself (Popen)."""
    return [sys.executable, "-m", "pear_data", *map(str, args)]


def assert_user_error(run: Run, *fragments: str) -> None:
    """Exit 2, no traceback, and the message names what it should."""
    assert run.code == 2, run.err
    assert "Traceback" not in run.err and "internal error" not in run.err, run.err
    flat = run.err.replace("\n", " ")
    for fragment in fragments:
        assert fragment in flat or fragment in run.err, (fragment, run.err)


def output_files(out: Path) -> dict[str, bytes]:
    """Every file of an output but its resume state, with its bytes."""
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*"))
            if p.is_file() and ".pear" not in p.parts}
