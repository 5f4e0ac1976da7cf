"""`pear-data` (the console script) and `python -m pear_data`: the signal handlers first, then the CLI.

Loading the CLI (typer, rich) takes a moment; a Ctrl-C in that moment must already end in exit 130, not in
a traceback from the middle of an import (pear_data/shutdown.py).
"""

from __future__ import annotations


def main() -> None:
    from . import shutdown

    shutdown.install()
    from .cli import main as cli_main

    shutdown.run_process(cli_main)


if __name__ == "__main__":
    main()
