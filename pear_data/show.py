"""`pear-data show`: a few rows of an output with every token coloured by its weight (docs/design.md 5).

    pick rows      --row N ... | --lowest-ess K | --highest K | --where SQL (token_view.py, query.py)
    spell tokens   the target tokenizer (the output's, or --tokenizer), checked against the manifest's fingerprint
    render         the terminal (token_view.py: rich), or one self-contained HTML page (show_html.py)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console

from .config import ShowOptions
from .dataset import check_scored, source_files, source_manifest
from .errors import UsageError
from .output import atomic_write_text
from .query import scan_files
from .schema import REQUIRED_SCORED, WEIGHT_COLUMNS
from .show_html import render_page
from .token_view import pick_rows, render_terminal, row_views


def show(src: str | Path, options: ShowOptions, console: Console) -> Path | None:
    """Show the picked rows of SRC in the terminal, or write them as one HTML page (returns its path).

    Refused (exit 2): SRC unfinished or being written, without the scored and weight columns; a --where naming
    an unknown column or not a condition; a --row past the end; a tokenizer that is not the one the rows were
    tokenized with, or none to be found (a local target model: pass --tokenizer)."""
    files = source_files(src)
    manifest = source_manifest(src)
    check_scored(files, (*REQUIRED_SCORED, *WEIGHT_COLUMNS.values()))
    rows = pick_rows(scan_files(files, derived=True), options)
    views = row_views(files, rows, show_tokenizer(src, manifest, options.tokenizer))
    primary = (manifest.get("weights") or {}).get("granularity") or "token"
    if options.html is None:
        render_terminal(views, options.by, primary, console)
        return None
    path = Path(options.html)
    atomic_write_text(path, render_page(views, manifest, options.by, primary, title=Path(src).resolve().name))
    return path


def show_tokenizer(src: str | Path, manifest: dict, spec: str | None) -> Any:
    """The tokenizer that spells SRC's tokens: `spec` (--tokenizer), else the output's target when the manifest
    names it (an embedded alias or a Hub id); checked against the manifest's tokenizer fingerprint."""
    from .models import load_tokenizer, resolve_model, tokenizer_fingerprint

    target = (manifest.get("models") or {}).get("target") or {}
    if spec is None:
        if target.get("kind") not in ("alias", "hub") or not target.get("spec"):
            named = f" ({target['spec']}, a local model)" if target.get("spec") else ""
            raise UsageError(f"{src}: show needs the target's tokenizer to spell the tokens{named}: pass --tokenizer "
                             "with the model directory, .gguf file or Hub id the rows were tokenized with")
        spec = target["spec"]
    tokenizer = load_tokenizer(resolve_model(spec))
    recorded = (manifest.get("tokenizer") or {}).get("fingerprint")
    found = tokenizer_fingerprint(tokenizer)
    if recorded and found != recorded:
        raise UsageError(f"--tokenizer {spec}: its fingerprint {found[:16]} is not the one the rows of {src} were "
                         f"tokenized with ({target.get('spec', 'the target')}, {recorded[:16]}); give that one")
    return tokenizer
