"""pear-data command line (docs/design.md section 5): thin Typer commands over the pipeline modules.

Exit codes: 0 ok, 2 usage or bad input (the message names the row, column or
flag), 1 internal error.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from . import __version__
from .errors import PearDataError
from .weights import WeightConfig

app = typer.Typer(
    name="pear-data",
    help="Prepare SFT data for a downstream RL stage with PEAR importance weights (arXiv 2602.01058).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
err = Console(stderr=True)
out = Console() if sys.stdout.isatty() else Console(width=120)  # logs and pipes get the whole table

_D = WeightConfig()
WEIGHTS = "Weight flags (docs/design.md section 3)"


def _pair(text: str, flag: str) -> tuple[float, float]:
    try:
        lo, hi = (float(part) for part in text.split(","))
    except ValueError:
        raise typer.BadParameter(f"{flag} takes two numbers 'lo,hi', got {text!r}") from None
    return lo, hi


def _fmt_pair(pair: tuple[float, float]) -> str:
    return ",".join(f"{v:.6g}" for v in pair)


# One definition per weight flag, shared by `score` and `reweight`.
GranularityOpt = Annotated[
    str,
    typer.Option(
        "--granularity",
        help="Primary granularity: token, block or sequence (all three are always written).",
        rich_help_panel=WEIGHTS,
    ),
]
GammaOpt = Annotated[
    float, typer.Option("--gamma", help="Discount per suffix token, in (0, 1].", rich_help_panel=WEIGHTS)
]
HorizonOpt = Annotated[
    int | None,
    typer.Option("--horizon", help="Token level: suffix length H (default unbounded).", rich_help_panel=WEIGHTS),
]
BlockSizeOpt = Annotated[
    int, typer.Option("--block-size", help="Block level: completion tokens per block B.", rich_help_panel=WEIGHTS)
]
LogRatioClipOpt = Annotated[
    str,
    typer.Option(
        "--log-ratio-clip",
        help="Per-token log-ratio clip 'lo,hi' (inf allowed). Use --log-ratio-clip=-0.08,0.3 for a negative lo.",
        rich_help_panel=WEIGHTS,
    ),
]
WeightClipOpt = Annotated[
    str,
    typer.Option(
        "--weight-clip", help="Weight bounds 'wmin,wmax' applied to W before normalization.", rich_help_panel=WEIGHTS
    ),
]
NormalizeOpt = Annotated[
    str,
    typer.Option(
        "--normalize",
        help="dataset (mean W = 1 over the output), sequence (per row), or none.",
        rich_help_panel=WEIGHTS,
    ),
]
MaxWeightOpt = Annotated[
    float | None, typer.Option("--max-weight", help="Cap applied after normalization.", rich_help_panel=WEIGHTS)
]
LengthNormalizeOpt = Annotated[
    bool,
    typer.Option(
        "--length-normalize",
        help="Sequence level: divide the summed log-ratio by T (geometric mean).",
        rich_help_panel=WEIGHTS,
    ),
]
CenterOpt = Annotated[
    bool,
    typer.Option(
        "--center",
        help="Subtract the row's mean log-ratio before clipping (drops the global model gap).",
        rich_help_panel=WEIGHTS,
    ),
]


def weight_config(
    granularity,
    gamma,
    horizon,
    block_size,
    log_ratio_clip,
    weight_clip,
    normalize,
    max_weight,
    length_normalize,
    center,
) -> WeightConfig:
    """WeightConfig from the CLI flags; a bad value is a usage error naming the flag."""
    try:
        return WeightConfig(
            granularity=granularity,
            gamma=gamma,
            horizon=horizon,
            block_size=block_size,
            log_ratio_clip=_pair(log_ratio_clip, "--log-ratio-clip"),
            weight_clip=_pair(weight_clip, "--weight-clip"),
            normalize=normalize,
            max_weight=max_weight,
            length_normalize=length_normalize,
            center=center,
        )
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None


def _print_alignment(manifest: dict) -> None:
    alignment = manifest.get("alignment") or {}
    if alignment.get("mode") == "char-offsets":
        out.print(
            f"behavior aligned by character offsets: {alignment['spans']:,} spans, "
            f"{alignment['share_chars_in_one_token_spans']:.1%} of {alignment['completion_chars']:,} completion "
            "characters in spans of one target token"
        )


def _report(manifest: dict, out_dir: Path) -> None:
    from .stats import print_table

    rows = manifest["rows"]
    out.print(f"[bold]{out_dir}[/]: {rows['out']:,} rows written, {rows['rejected']:,} rejected (of {rows['in']:,})")
    _print_alignment(manifest)
    print_table(manifest.get("diagnostics", {}), manifest.get("weights", {}).get("granularity"), out)
    for warning in manifest.get("warnings", []):
        err.print(f"[yellow]warning:[/] {warning}")


@app.command()
def score(
    corpus: Annotated[
        str, typer.Argument(help="JSONL, Parquet (file or dir), a `datasets` save_to_disk dir, or a Hub dataset id.")
    ],
    out_dir: Annotated[Path, typer.Option("--out", help="Output directory.")],
    target: Annotated[
        str, typer.Option(help="Target policy: embedded alias, local dir, .gguf file or Hub id.")
    ] = "smollm2-135m-instruct",
    behavior: Annotated[
        str | None,
        typer.Option(
            help="Behavior policy model (any tokenizer: another one is aligned by character offsets). "
            "Default: gemma-3-270m; the target's own name scores the target at "
            "--behavior-temperature/--behavior-top-p."
        ),
    ] = None,
    behavior_logprobs_field: Annotated[
        str | None,
        typer.Option(
            help="Column with behavior log-probs recorded at generation time: one per target completion token, "
            "or {tokens, logprobs} / {text_offsets, logprobs} in the behavior's own tokens."
        ),
    ] = None,
    behavior_template: Annotated[
        str,
        typer.Option(
            help="How the behavior model renders a row: auto (its chat template if it has one), chat, "
            "or raw (base models)."
        ),
    ] = "auto",
    alignment: Annotated[
        str,
        typer.Option(
            help="auto (direct when the behavior renders the target's tokens, else by character offsets), "
            "direct, or char-offsets."
        ),
    ] = "auto",
    behavior_temperature: Annotated[
        float, typer.Option(help="Temperature the behavior sampled at (design 3.6).")
    ] = 1.0,
    behavior_top_p: Annotated[float, typer.Option(help="Top-p the behavior sampled with (design 3.6).")] = 1.0,
    prompt_field: Annotated[
        str | None, typer.Option(help="Field mapping: the prompt column (e.g. question).", rich_help_panel="Corpus")
    ] = None,
    completion_field: Annotated[
        str | None, typer.Option(help="Field mapping: the completion column (e.g. answer).", rich_help_panel="Corpus")
    ] = None,
    system_field: Annotated[
        str | None, typer.Option(help="Field mapping: an optional system-prompt column.", rich_help_panel="Corpus")
    ] = None,
    messages_field: Annotated[
        str | None,
        typer.Option(
            help="Conversational rows: the messages column (default: auto-detected `messages`).",
            rich_help_panel="Corpus",
        ),
    ] = None,
    split: Annotated[
        str, typer.Option(help="Split of a DatasetDict dir or a Hub dataset.", rich_help_panel="Corpus")
    ] = "train",
    max_length: Annotated[int | None, typer.Option(help="Longest row in tokens.", rich_help_panel="Corpus")] = None,
    on_overflow: Annotated[
        str,
        typer.Option(
            help="Rows over --max-length: truncate (prompt from the left first), skip (reject), or error.",
            rich_help_panel="Corpus",
        ),
    ] = "truncate",
    template: Annotated[
        str,
        typer.Option(
            help="auto (chat template if the tokenizer has one), chat, or raw (prompt + completion text).",
            rich_help_panel="Corpus",
        ),
    ] = "auto",
    granularity: GranularityOpt = _D.granularity,
    gamma: GammaOpt = _D.gamma,
    horizon: HorizonOpt = _D.horizon,
    block_size: BlockSizeOpt = _D.block_size,
    log_ratio_clip: LogRatioClipOpt = _fmt_pair(_D.log_ratio_clip),
    weight_clip: WeightClipOpt = _fmt_pair(_D.weight_clip),
    normalize: NormalizeOpt = _D.normalize,
    max_weight: MaxWeightOpt = _D.max_weight,
    length_normalize: LengthNormalizeOpt = _D.length_normalize,
    center: CenterOpt = _D.center,
    batch_tokens: Annotated[
        int, typer.Option(help="Padded tokens per forward pass.", min=1, rich_help_panel="Scoring")
    ] = 8192,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.", rich_help_panel="Scoring")] = "auto",
    workers: Annotated[
        int,
        typer.Option(
            help="Scoring workers, each with its own copy of the models: one per GPU on a GPU node (cuda:0..N-1), "
            "N processes sharing the cores on CPU. The output is the same for any N.",
            min=1,
            rich_help_panel="Scoring",
        ),
    ] = 1,
    ray: Annotated[
        str | None,
        typer.Option(
            help="Run the scoring on a Ray cluster through Ray Data (a CPU stage prepares the rows, --workers "
            "actors score them): its address, or 'local' to start one here. Needs pear-data[ray].",
            rich_help_panel="Scoring",
        ),
    ] = None,
    backend: Annotated[str, typer.Option(help="torch (vllm: not in this build).", rich_help_panel="Scoring")] = "torch",
    trust_remote_code: Annotated[
        bool, typer.Option(help="Allow model code from the model's repo.", rich_help_panel="Scoring")
    ] = False,
    shard_rows: Annotated[
        int, typer.Option(help="Input rows per committed shard (the unit of --resume).", min=1)
    ] = 1000,
    resume: Annotated[bool, typer.Option(help="Continue a killed run after its last committed shard.")] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing pear-data output dir.")] = False,
    license: Annotated[str | None, typer.Option(help="License id for the dataset card (e.g. mit).")] = None,
) -> None:
    """Tokenize a corpus, score it under target and behavior policies, and write the PEAR-weighted dataset."""
    from .behavior import BehaviorSpec
    from .progress import RowProgress
    from .score import ScoreOptions
    from .score import score as run
    from .tokenize import TokenizeConfig

    config = weight_config(
        granularity,
        gamma,
        horizon,
        block_size,
        log_ratio_clip,
        weight_clip,
        normalize,
        max_weight,
        length_normalize,
        center,
    )
    try:
        tokenize = TokenizeConfig(max_length=max_length, on_overflow=on_overflow, template=template)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    behavior_spec = BehaviorSpec(
        behavior, behavior_logprobs_field, behavior_temperature, behavior_top_p, behavior_template, alignment
    )
    if device not in ("auto", "cpu", "cuda") and not device.startswith("cuda:"):
        raise typer.BadParameter(f"--device must be auto, cpu or cuda, got {device!r}")
    options = ScoreOptions(
        target=target,
        behavior=behavior_spec,
        weights=config,
        tokenize=tokenize,
        shape={
            "messages_field": messages_field,
            "prompt_field": prompt_field,
            "completion_field": completion_field,
            "system_field": system_field,
        },
        split=split,
        device=device,
        backend=backend,
        batch_tokens=batch_tokens,
        workers=workers,
        ray=ray,
        shard_rows=shard_rows,
        resume=resume,
        overwrite=overwrite,
        trust_remote_code=trust_remote_code,
        license=license,
    )
    bars: list[RowProgress] = []

    def progress(total_rows):
        bars.append(RowProgress(total_rows, console=err).__enter__())
        return bars[0]

    try:
        manifest = run(corpus, out_dir, options, progress_factory=progress)
    finally:
        for bar in bars:
            bar.__exit__(None, None, None)
    _report(manifest, out_dir)


@app.command()
def reweight(
    src: Annotated[
        Path,
        typer.Argument(
            help="A pear-data output dir, or Parquet file(s) with input_ids, completion_mask, target_logprobs, "
            "behavior_logprobs."
        ),
    ],
    out_dir: Annotated[Path, typer.Option("--out", help="Output directory.")],
    granularity: GranularityOpt = _D.granularity,
    gamma: GammaOpt = _D.gamma,
    horizon: HorizonOpt = _D.horizon,
    block_size: BlockSizeOpt = _D.block_size,
    log_ratio_clip: LogRatioClipOpt = _fmt_pair(_D.log_ratio_clip),
    weight_clip: WeightClipOpt = _fmt_pair(_D.weight_clip),
    normalize: NormalizeOpt = _D.normalize,
    max_weight: MaxWeightOpt = _D.max_weight,
    length_normalize: LengthNormalizeOpt = _D.length_normalize,
    center: CenterOpt = _D.center,
    shard_rows: Annotated[int, typer.Option(help="Input rows per output shard.", min=1)] = 10_000,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing pear-data output dir.")] = False,
) -> None:
    """Recompute the PEAR weights of scored rows with new hyperparameters (no model needed)."""
    from .reweight import ReweightOptions
    from .reweight import reweight as run

    config = weight_config(
        granularity,
        gamma,
        horizon,
        block_size,
        log_ratio_clip,
        weight_clip,
        normalize,
        max_weight,
        length_normalize,
        center,
    )
    manifest = run(src, out_dir, config, ReweightOptions(shard_rows=shard_rows, overwrite=overwrite))
    _report(manifest, out_dir)


@app.command()
def stats(
    src: Annotated[Path, typer.Argument(help="A pear-data output dir (or Parquet with weight columns).")],
    plot: Annotated[
        Path | None, typer.Option("--plot", help="Write a PNG: weight distribution and mean weight by position.")
    ] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print the diagnostics as JSON instead of a table.")] = False,
) -> None:
    """Show the weight diagnostics (ESS, quantiles, share at bounds) of an output dir."""
    from .diagnostics import degeneracy_warnings
    from .stats import plot as draw
    from .stats import print_table, stored_diagnostics
    from .writer import read_manifest

    manifest = read_manifest(src) if (src / "manifest.json").exists() else {}
    summary = manifest.get("diagnostics")
    stored = None
    if summary is None or plot is not None:
        stored = stored_diagnostics(src)
        summary = summary or stored.summary()
    if json_out:
        typer.echo(json.dumps(summary, indent=2, sort_keys=True))
    else:
        if manifest:
            rows = manifest["rows"]
            out.print(
                f"[bold]{src}[/]: {rows['out']:,} rows, {rows['rejected']:,} rejected; "
                f"weights {json.dumps(manifest.get('weights', {}), sort_keys=True)}"
            )
            _print_alignment(manifest)
        print_table(summary, manifest.get("weights", {}).get("granularity"), out)
    for warning in degeneracy_warnings(summary):
        err.print(f"[yellow]warning:[/] {warning}")
    if plot is not None:
        draw(stored, plot, title=str(src))
        err.print(f"wrote {plot}")


@app.command()
def push(
    src: Annotated[Path, typer.Argument(help="A finished pear-data output dir.")],
    repo_id: Annotated[str, typer.Argument(help="Hub dataset repo, e.g. my-org/gsm8k-pear.")],
    private: Annotated[bool, typer.Option("--private", help="Create the repo private.")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print what would be uploaded; touch no network.")] = False,
) -> None:
    """Publish an output dir (data, rejects, manifest, dataset card) to the Hugging Face Hub."""
    from .push import push as run

    result = run(src, repo_id, private=private, dry_run=dry_run)
    out.print(result.describe())


@app.callback(invoke_without_command=True)
def _root(version: Annotated[bool, typer.Option("--version", help="Print the version.")] = False) -> None:
    if version:
        typer.echo(f"pear-data {__version__}")
        raise typer.Exit()


def main() -> None:
    # MKL's strict reproducible mode, set before torch loads MKL: CPU matmuls give the same bits whatever the
    # number of threads, so a shard scores to the same bytes with --workers 1 or N (worker processes inherit it).
    os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")
    try:
        app(standalone_mode=False)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except (typer.Abort, KeyboardInterrupt):
        err.print("aborted")
        sys.exit(130)
    except Exception as exc:  # noqa: BLE001 - the top level decides the exit code
        from typer.exceptions import TyperException

        if isinstance(exc, TyperException) and hasattr(exc, "show"):  # click's usage errors, vendored by Typer
            exc.show()
            sys.exit(exc.exit_code)
        if isinstance(exc, PearDataError):
            err.print(f"[red]error:[/] {exc}")
            sys.exit(2)
        err.print(f"[red]internal error:[/] {type(exc).__name__}: {exc}")
        if not isinstance(exc, (OSError,)):
            err.print_exception()
        sys.exit(1)


if __name__ == "__main__":
    main()
