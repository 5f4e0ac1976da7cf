"""The commands that act on a finished output: `show`, `select`, `rescore` (docs/design.md 5). Thin, as cli.py:
flags to the configs of config.py, the recipe, then what to print. cli.py registers them on its app."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape

from .console import err, out

SHOW_ROWS = "Which rows (one of these; default: the first row)"


@contextlib.contextmanager
def resumable_run(out_dir: Path) -> Iterator[Callable[[int | None], Any]]:
    """Around a `score` or `rescore` run: the progress factory it takes (a bar on stderr, closed at the end),
    and after Ctrl-C the line that says the committed shards are kept and how to go on."""
    from .progress import RowProgress

    bars: list[RowProgress] = []

    def progress(total_rows: int | None) -> RowProgress:
        bars.append(RowProgress(total_rows, console=err).__enter__())
        return bars[0]

    try:
        yield progress
    except KeyboardInterrupt:
        err.print(f"stopped: the shards committed to {escape(str(out_dir))} are kept; run the same command with "
                  "--resume to go on", soft_wrap=True)
        raise
    finally:
        for bar in bars:
            bar.__exit__(None, None, None)


def print_alignment(manifest: dict) -> None:
    """The alignment line of a run whose behavior had other tokens (design 3.7)."""
    alignment = manifest.get("alignment") or {}
    if alignment.get("mode") == "char-offsets":
        out.print(
            f"behavior aligned by character offsets: {alignment['spans']:,} spans, "
            f"{alignment['share_chars_in_one_token_spans']:.1%} of {alignment['completion_chars']:,} completion "
            "characters in spans of one target token"
        )


def report(manifest: dict, out_dir: Path) -> None:
    """What a command that wrote an output prints: its rows, the diagnostics table, the warnings."""
    from .stats import print_table

    rows = manifest["rows"]
    out.print(f"[bold]{out_dir}[/]: {rows['out']:,} rows written, {rows['rejected']:,} rejected (of {rows['in']:,})")
    print_alignment(manifest)
    print_table(manifest.get("diagnostics", {}), manifest.get("weights", {}).get("granularity"), out)
    for warning in manifest.get("warnings", []):
        err.print(f"[yellow]warning:[/] {escape(warning)}")


def show(
    src: Annotated[Path, typer.Argument(help="A finished pear-data output dir.")],
    row: Annotated[list[int] | None, typer.Option("--row", help="Show row N (0-based, input order); repeatable.",
                                                  rich_help_panel=SHOW_ROWS)] = None,
    lowest_ess: Annotated[int | None, typer.Option(help="The K rows whose token weights have the lowest effective "
                                                   "sample size fraction (weight piled on few tokens).",
                                                   rich_help_panel=SHOW_ROWS)] = None,
    highest: Annotated[int | None, typer.Option(help="The K rows with the highest sequence weight.",
                                                rich_help_panel=SHOW_ROWS)] = None,
    where: Annotated[str | None, typer.Option(help="Rows meeting a SQL condition over the columns and the derived "
                                              "ones (as `select --where`), the first --limit of them.",
                                              rich_help_panel=SHOW_ROWS)] = None,
    limit: Annotated[int, typer.Option(help="At most this many rows for --where.", rich_help_panel=SHOW_ROWS)] = 20,
    by: Annotated[str, typer.Option(help="What colours a completion token: weight (the primary granularity's), "
                                    "token-weight, block-weight, log-ratio, target or behavior (log-probs).")
                  ] = "weight",
    tokenizer: Annotated[str | None, typer.Option(help="The tokenizer that spells the tokens (default: the "
                                                  "output's target, when it is an alias or a Hub id).")] = None,
    html: Annotated[Path | None, typer.Option("--html", help="Write one self-contained HTML page (tooltips per "
                                              "token, the run's diagnostics) instead of printing.")] = None,
) -> None:
    """Show rows token by token, coloured by their PEAR weight, in the terminal or as an HTML page."""
    from .config import ShowOptions
    from .show import show as run

    options = ShowOptions(rows=tuple(row or ()), lowest_ess=lowest_ess, highest=highest, where=where, by=by,
                          tokenizer=tokenizer, html=None if html is None else str(html), limit=limit)
    written = run(src, options, out)
    if written is not None:
        err.print(f"wrote {escape(str(written))}", soft_wrap=True)


def select(
    src: Annotated[Path, typer.Argument(help="A finished pear-data output dir.")],
    out_dir: Annotated[Path, typer.Option("--out", help="Output directory for the selected rows.")],
    where: Annotated[str | None, typer.Option(help="Keep the rows meeting a polars SQL condition over the columns "
                                              "and the derived ones (n_completion_tokens, mean_log_ratio, "
                                              "token_ess, ...: docs/design.md section 5).")] = None,
    top_frac: Annotated[float | None, typer.Option(help="Then keep the fraction F of rows with the largest --by.")
                        ] = None,
    by: Annotated[str | None, typer.Option(help="The column --top-frac ranks by and --sample --by-weight draws by "
                                           "(default pear_seq_weight).")] = None,
    sample: Annotated[int | None, typer.Option(help="Then draw N rows without replacement (uniformly, or with "
                                               "--by-weight in proportion to --by).")] = None,
    by_weight: Annotated[bool, typer.Option("--by-weight", help="--sample in proportion to --by.")] = False,
    seed: Annotated[int, typer.Option(help="Seed of --sample.")] = 0,
    shard_rows: Annotated[int, typer.Option(help="Input rows per output shard.", min=1)] = 10_000,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing pear-data output dir.")] = False,
) -> None:
    """Write the rows a query picks as a new output (data, manifest with the query, card, rejects)."""
    from .config import SelectOptions
    from .select import select as run

    options = SelectOptions(where=where, top_frac=top_frac, by=by, sample=sample, by_weight=by_weight, seed=seed,
                            shard_rows=shard_rows, overwrite=overwrite)
    manifest = run(src, out_dir, options)
    rows = manifest["rows"]
    out.print(f"[bold]{escape(str(out_dir))}[/]: {rows['selected']:,} rows selected, {rows['dropped']:,} dropped "
              f"(of {rows['in']:,}); {rows['rejected']:,} rejects carried over")


def rescore(
    src: Annotated[Path, typer.Argument(help="A finished pear-data output dir (its behavior log-probs are kept).")],
    target: Annotated[str, typer.Option(help="The new target: an alias, local dir, .gguf file or Hub id with the "
                                        "tokenizer the rows were tokenized with.")],
    out_dir: Annotated[Path, typer.Option("--out", help="Output directory.")],
    batch_tokens: Annotated[int | None, typer.Option(help="Padded tokens per forward pass.", min=1)] = None,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    trust_remote_code: Annotated[bool, typer.Option(help="Allow model code from the model's repo.")] = False,
    shard_rows: Annotated[int, typer.Option(help="Rows per committed shard (the unit of --resume).", min=1)] = 1000,
    resume: Annotated[bool, typer.Option(help="Continue a killed run after its last committed shard.")] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing pear-data output dir.")] = False,
) -> None:
    """Score the stored rows under a new target and recompute the weights, without scoring the behavior again."""
    from .config import RescoreOptions, RunConfig, ScoringConfig
    from .rescore import rescore as run

    options = RescoreOptions(target=target, scoring=ScoringConfig(device, "torch", batch_tokens, trust_remote_code),
                             run=RunConfig(shard_rows=shard_rows, resume=resume, overwrite=overwrite))
    with resumable_run(out_dir) as progress:
        manifest = run(src, out_dir, options, progress_factory=progress)
    report(manifest, out_dir)
