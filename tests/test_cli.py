"""cli.py and shutdown.py: what ends a command maps to its exit code (Ctrl-C 130, a stray EOFError is a
bug, not Ctrl-C)."""

from __future__ import annotations

import subprocess
import sys


def test_ctrl_c_exits_130_not_0() -> None:
    """Typer returns an Exit's code instead of raising it when not in standalone mode; main must pass it on."""
    code = ("import sys\nfrom pear_data import cli\n@cli.app.command('interrupted')\ndef interrupted():\n"
            "    raise KeyboardInterrupt\nsys.argv = ['pear-data', 'interrupted']\ncli.main()\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 130 and "aborted" in result.stderr


def test_a_stray_eof_error_is_a_bug_not_ctrl_c() -> None:
    """click turns an EOFError into an Abort; main must not report it as Ctrl-C (130)."""
    code = ("import sys\nfrom pear_data import cli\n@cli.app.command('eof')\ndef eof():\n"
            "    raise EOFError('ran out of input')\nsys.argv = ['pear-data', 'eof']\ncli.main()\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and "internal error: EOFError: ran out of input" in result.stderr
    assert "aborted" not in result.stderr
