"""pear-data command line (docs/design.md section 5): thin Typer commands over the pipeline modules.

Exit codes (docs/design.md section 6): 0 ok; 2 for anything the user can fix
(a `PearDataError`, a click usage error, or an OSError of the environment: a
full disk, a read-only or forbidden path; the message names the flag, file,
row or column and says what to do; no traceback); 1 for a bug in pear-data,
with a traceback; 130 after Ctrl-C, 143 after SIGTERM, once the run has
stopped cleanly (`shutdown.py`). A reader that closes the pipe early
(`pear-data stats OUT | head`) is not an error: the command finishes its other
work (a `--plot` is still written) without printing, and exits 0.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated

from . import shutdown

if __name__ == "__main__":  # `python -m pear_data.cli`: signals handled from here on, before typer and rich load
    shutdown.install()

import typer
from rich.markup import escape

from . import __version__
from .cli_outputs import print_alignment, report, rescore, resumable_run, select, show
from .config import DEFAULT_TARGET, WeightConfig
from .console import STDOUT, err, out
from .errors import USER_OS_ERRORS, OutputError, PearDataError, UsageError

app = typer.Typer(
    name="pear-data",
    help="Prepare SFT data for a downstream RL stage with PEAR importance weights (arXiv 2602.01058).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

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

CardTitleOpt = Annotated[
    str | None,
    typer.Option(
        "--card-title",
        help="Title of the dataset card (its `pretty_name` on the Hub). Default: '<corpus name> (PEAR-weighted)'.",
    ),
]


def weight_config(log_ratio_clip: str, weight_clip: str, **flags) -> WeightConfig:
    """WeightConfig from the weight flags (the two clips as 'lo,hi' text); WeightConfig checks them."""
    return WeightConfig(log_ratio_clip=_pair(log_ratio_clip, "--log-ratio-clip"),
                        weight_clip=_pair(weight_clip, "--weight-clip"), **flags)


@app.command()
def score(
    corpus: Annotated[
        str, typer.Argument(help="JSONL, Parquet (file or dir), a `datasets` save_to_disk dir, or a Hub dataset id.")
    ],
    out_dir: Annotated[Path, typer.Option("--out", help="Output directory.")],
    target: Annotated[
        str, typer.Option(help="Target policy: embedded alias, local dir, .gguf file or Hub id.")
    ] = DEFAULT_TARGET,
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
            help="Rows over --max-length: truncate (keep the first N tokens), skip (reject), or error.",
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
        int | None,
        typer.Option(help="Padded tokens per forward pass (default 8192 on CPU, 32768 on CUDA).", min=1,
                     rich_help_panel="Scoring"),
    ] = None,
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
    backend: Annotated[
        str,
        typer.Option(help="torch, or vllm (EXPERIMENTAL, never run by this project: CUDA only, the target's log-probs "
                     "only, so the behavior must come from --behavior-logprobs-field; pip install "
                     "'pear-data[vllm]' in an environment of its own).", rich_help_panel="Scoring"),
    ] = "torch",
    vllm_gpu_memory_utilization: Annotated[
        float, typer.Option(help="--backend vllm: share of GPU memory the engine takes.", min=0.05, max=1.0,
                            rich_help_panel="Scoring")
    ] = 0.9,
    vllm_tensor_parallel_size: Annotated[
        int, typer.Option(help="--backend vllm: GPUs one model is split over.", min=1, rich_help_panel="Scoring")
    ] = 1,
    trust_remote_code: Annotated[
        bool, typer.Option(help="Allow model code from the model's repo.", rich_help_panel="Scoring")
    ] = False,
    shard_rows: Annotated[
        int, typer.Option(help="Input rows per committed shard (the unit of --resume).", min=1)
    ] = 1000,
    resume: Annotated[bool, typer.Option(help="Continue a killed run after its last committed shard.")] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing pear-data output dir.")] = False,
    license: Annotated[str | None, typer.Option(help="License id for the dataset card (e.g. mit).")] = None,
    card_title: CardTitleOpt = None,
) -> None:
    """Tokenize a corpus, score it under target and behavior policies, and write the PEAR-weighted dataset."""
    from .config import BehaviorSpec, CorpusConfig, RunConfig, ScoreOptions, ScoringConfig, TokenizeConfig
    from .score import score as run

    options = ScoreOptions(
        target=target,
        behavior=BehaviorSpec(behavior, behavior_logprobs_field, behavior_temperature, behavior_top_p,
                              behavior_template, alignment),
        weights=weight_config(log_ratio_clip, weight_clip, granularity=granularity, gamma=gamma, horizon=horizon,
                              block_size=block_size, normalize=normalize, max_weight=max_weight,
                              length_normalize=length_normalize, center=center),
        tokenize=TokenizeConfig(max_length=max_length, on_overflow=on_overflow, template=template),
        corpus=CorpusConfig(split, messages_field, prompt_field, completion_field, system_field),
        scoring=ScoringConfig(device, backend, batch_tokens, trust_remote_code, vllm_gpu_memory_utilization,
                              vllm_tensor_parallel_size),
        run=RunConfig(shard_rows, workers, ray, resume, overwrite),
        license=license,
        card_title=card_title,
    )
    with resumable_run(out_dir) as progress:
        manifest = run(corpus, out_dir, options, progress_factory=progress)
    report(manifest, out_dir)


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
    max_length: Annotated[
        int | None,
        typer.Option(help="Cut rows to their first N tokens (the truncation rule of `score` and the trainers) and "
                     "recompute their weights for the cut; a row left with no completion token is a reject.",
                     min=2),
    ] = None,
    shard_rows: Annotated[int, typer.Option(help="Input rows per output shard.", min=1)] = 10_000,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing pear-data output dir.")] = False,
    card_title: CardTitleOpt = None,
) -> None:
    """Recompute the PEAR weights of scored rows with new hyperparameters (no model needed)."""
    from .config import ReweightOptions
    from .reweight import reweight as run

    config = weight_config(log_ratio_clip, weight_clip, granularity=granularity, gamma=gamma, horizon=horizon,
                           block_size=block_size, normalize=normalize, max_weight=max_weight,
                           length_normalize=length_normalize, center=center)
    options = ReweightOptions(shard_rows=shard_rows, overwrite=overwrite, max_length=max_length,
                              card_title=card_title)
    manifest = run(src, out_dir, config, options)
    report(manifest, out_dir)


def _count(value) -> str:
    return f"{value:,}" if isinstance(value, int) else "?"


def plot_path(plot: Path) -> Path:
    """Where `stats --plot` writes: the path itself when it ends in .png, DIR/weights.png for an existing
    directory; anything else is a usage error (matplotlib would pick the format from the suffix)."""
    if plot.is_dir():
        return plot / "weights.png"
    if plot.suffix.lower() != ".png":
        raise UsageError(f"--plot {plot}: the plot is a PNG image; give a file name ending in .png, or an "
                         "existing directory (the plot is then written as DIR/weights.png)")
    return plot


@app.command()
def stats(
    src: Annotated[Path, typer.Argument(help="A pear-data output dir (or Parquet with weight columns).")],
    plot: Annotated[
        Path | None,
        typer.Option(
            "--plot",
            help="Write a PNG (a .png path, or a directory: DIR/weights.png): weight distribution and mean weight "
            "by position.",
        ),
    ] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print the diagnostics as JSON instead of a table.")] = False,
) -> None:
    """Show the weight diagnostics (ESS, quantiles, share at bounds) of an output dir."""
    from .dataset import source_manifest
    from .diagnostics import degeneracy_warnings
    from .stats import plot as draw
    from .stats import print_table, stored_diagnostics

    if plot is not None:
        plot = plot_path(plot)
    manifest = source_manifest(src)
    summary = manifest.get("diagnostics")
    stored = None
    if summary is None or plot is not None:
        stored = stored_diagnostics(src, positions=plot is not None)
        summary = summary or stored.summary()
    if json_out:
        STDOUT.write(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    else:
        if manifest:
            rows = manifest.get("rows") or {}
            out.print(
                f"[bold]{escape(str(src))}[/]: {_count(rows.get('out'))} rows, "
                f"{_count(rows.get('rejected'))} rejected; "
                f"weights {escape(json.dumps(manifest.get('weights', {}), sort_keys=True))}"
            )
            print_alignment(manifest)
        print_table(summary, (manifest.get("weights") or {}).get("granularity"), out)
    for warning in degeneracy_warnings(summary):
        err.print(f"[yellow]warning:[/] {escape(warning)}")
    if plot is not None:
        try:
            draw(stored, plot, title=str(src))
        except OSError as exc:
            raise OutputError(f"--plot {plot}: cannot write the plot ({exc.strerror or exc}); choose another path") \
                from None
        err.print(f"wrote {escape(str(plot))}", soft_wrap=True)


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


app.command()(show)
app.command()(select)
app.command()(rescore)


@app.callback(invoke_without_command=True)
def _root(version: Annotated[bool, typer.Option("--version", help="Print the version.")] = False) -> None:
    if version:
        typer.echo(f"pear-data {__version__}")
        raise typer.Exit()


def main() -> None:
    """The `pear-data` command: run it, map what ends it to an exit code (module docstring)."""
    # MKL's strict reproducible mode, set before torch loads MKL: CPU matmuls give the same bits whatever the
    # number of threads, so a shard scores to the same bytes with --workers 1 or N (worker processes inherit it).
    os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")
    # transformers loads weights in a thread pool that a Ctrl-C abandons (shutdown without waiting) while the
    # main thread unwinds and closes the files those threads still read: load in the main thread instead
    # (no slower on CPU), so that a stop during loading is as clean as anywhere else (pear_data/shutdown.py).
    os.environ.setdefault("HF_DEACTIVATE_ASYNC_LOAD", "1")
    with shutdown.handled():
        try:
            _main()
        except KeyboardInterrupt:  # a signal while main itself was reporting
            _stopped()


def _stopped() -> None:
    """After Ctrl-C or SIGTERM (the run has unwound): say so, exit 130 or 143."""
    code = shutdown.exit_code()
    err.print("aborted" if code == 130 else "terminated")
    STDOUT.flush()
    shutdown.leave(code)


def _main() -> None:
    try:
        try:
            code = app(standalone_mode=False)  # Typer returns the code of an Exit (Ctrl-C: 130) in this mode
        finally:
            STDOUT.flush()
        if isinstance(code, int) and code:
            if code == 130:
                _stopped()
            sys.exit(code)
    except BrokenPipeError:
        STDOUT.silence()  # the reader has what it wanted (`| head`): not an error
        sys.exit(0)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except (typer.Abort, KeyboardInterrupt) as exc:
        if isinstance(exc.__cause__, EOFError):  # click calls a stray EOFError "Abort": it is no Ctrl-C
            _internal_error(exc.__cause__)
        _stopped()
    except Exception as exc:  # noqa: BLE001 - the top level decides the exit code
        from typer.exceptions import TyperException

        if isinstance(exc, TyperException) and hasattr(exc, "show"):  # click's usage errors, vendored by Typer
            exc.show()
            sys.exit(exc.exit_code)
        if isinstance(exc, PearDataError):
            err.print(f"[red]error:[/] {escape(str(exc))}", soft_wrap=True)
            sys.exit(2)
        if isinstance(exc, OSError) and exc.errno in USER_OS_ERRORS:
            where = f"{exc.filename}: " if exc.filename else ""
            err.print(f"[red]error:[/] {escape(where + (exc.strerror or str(exc)))}; fix it (free space, "
                      "permissions, another path) and rerun", soft_wrap=True)
            sys.exit(2)
        _internal_error(exc)


def _internal_error(exc: BaseException) -> None:
    """A bug in pear-data: exit 1 with the traceback of the exception being handled (and its cause)."""
    err.print(f"[red]internal error:[/] {escape(type(exc).__name__)}: {escape(str(exc))}", soft_wrap=True)
    err.print_exception()
    sys.exit(1)


if __name__ == "__main__":
    shutdown.run_process(main)
