"""`pear-data` as the experiments run it: the command's own `main`, in the experiment's process.

Each call would otherwise start a process that imports torch and transformers again, which costs more than
scoring a small corpus.
"""

from __future__ import annotations

import contextlib
import io
import sys


def pear_data(*args: str) -> str:
    """Run `pear-data ARGS` in this process, on one torch thread (so the weights do not depend on the machine);
    its report on stdout and its progress on stderr are kept out of the experiment's. Returns its warnings on one
    line ("" when none). Raises SystemExit when the command fails. Not thread-safe: it swaps sys.argv and the
    standard streams, and the command installs its signal handlers (main thread only)."""
    import torch

    from pear_data import cli

    argv, threads = sys.argv, torch.get_num_threads()
    sys.argv = ["pear-data", *args]
    torch.set_num_threads(1)
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(stderr):
            cli.main()
    except SystemExit as exc:
        if exc.code:
            raise SystemExit(f"pear-data {args[0]} failed (exit code {exc.code}): {stderr.getvalue()[-2000:]}"
                             ) from None
    finally:
        sys.argv = argv
        torch.set_num_threads(threads)
    text = stderr.getvalue()
    return " ".join(text[text.index("warning:"):].split()) if "warning:" in text else ""
