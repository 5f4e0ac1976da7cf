"""`pear-data stats`: diagnostics table (docs/design.md 3.5) and a weight plot of an output dir."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from rich.console import Console
from rich.table import Table

from .dataset import check_scored, read_batches, source_files
from .diagnostics import POSITION_BINS, Diagnostics, bin_edges
from .errors import InputError
from .schema import COMPLETION_MASK, GRANULARITIES, WEIGHT_COLUMNS
from .weights import CompletionIndex

# (summary key, header): headers stay short so the table fits 80 columns
COLUMNS = (
    ("ess_fraction", "ESS"), ("mean", "mean"), ("min", "min"), ("p01", "p01"),
    ("p50", "p50"), ("p99", "p99"), ("max", "max"), ("share_at_lower_bound", "at lower"),
    ("share_at_upper_bound", "at upper"),
)


def stored_diagnostics(src: str | Path, batch_rows: int = 1024) -> Diagnostics:
    """Diagnostics of the weights stored in SRC's weight columns (with the position profile).

    InputError (naming the file) for a file that lacks the columns, holds other types, or is damaged."""
    diagnostics = Diagnostics(positions=True)
    names = [COMPLETION_MASK, *WEIGHT_COLUMNS.values()]
    files = source_files(src)
    check_scored(files, tuple(names))
    for path in files:
        for batch in read_batches(path, batch_rows, names):
            _check_batch(batch, path)
            mask = batch.column("completion_mask")
            offsets = np.asarray(mask.offsets, dtype=np.int64)
            offsets = offsets - offsets[0]
            index = CompletionIndex.from_mask(offsets, mask.flatten().to_numpy())
            for g in GRANULARITIES:
                column = batch.column(WEIGHT_COLUMNS[g])
                if g == "sequence":
                    w = np.repeat(column.to_numpy().astype(np.float64), index.lengths)
                else:
                    w = column.flatten().to_numpy().astype(np.float64)[index.positions]
                diagnostics.observe(g, w, None, index)
    return diagnostics


def _check_batch(batch, path: Path) -> None:
    """InputError naming the file and column for nulls, or for weight lists not aligned with completion_mask."""
    lengths = pc.list_value_length(batch.column(COMPLETION_MASK))
    for name in batch.schema.names:
        column = batch.column(name)
        listed = pa.types.is_list(column.type) or pa.types.is_large_list(column.type)
        if column.null_count or (listed and column.flatten().null_count):
            raise InputError(f"{path}: column {name} holds nulls; pear-data writes every weight and mask in full "
                             "(was the file edited?)")
        if listed and len(column) and not pc.all(pc.equal(pc.list_value_length(column), lengths)).as_py():
            raise InputError(f"{path}: column {name} has rows whose length differs from completion_mask's "
                             "(every list column is aligned with input_ids)")


def diagnostics_table(summary: dict, primary: str | None = None) -> Table:
    table = Table(title="PEAR weight diagnostics over completion tokens (ESS = effective sample size fraction)")
    table.add_column("granularity")
    for _, header in COLUMNS:
        table.add_column(header, justify="right", no_wrap=True)
    for g in GRANULARITIES:
        s = summary.get(g)
        if not s:
            continue
        label = f"{g} *" if g == primary else g
        table.add_row(label, *(_fmt(s.get(key)) for key, _ in COLUMNS))
    if "mean_log_ratio" in summary:
        table.caption = (f"{summary.get('completion_tokens', 0):,} completion tokens; mean log-ratio "
                         f"d_k = {summary['mean_log_ratio']:.5g} (≈ -KL(behavior‖target) per token)")
    return table


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:.3g}"


def print_table(summary: dict, primary: str | None = None, console: Console | None = None) -> None:
    (console or Console()).print(diagnostics_table(summary, primary))


def plot(diagnostics: Diagnostics, path: str | Path, title: str = "") -> Path:
    """PNG: weight distribution (log x) and mean weight against relative position in the completion."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5), dpi=110)
    for g in GRANULARITIES:
        stats = diagnostics.stats[g]
        if not stats.count:
            continue
        # Coarsen the fine histogram to about 60 visible bins over the populated range.
        nonzero = np.flatnonzero(stats.histogram)
        lo, hi = nonzero[0], nonzero[-1] + 1
        step = max(1, math.ceil((hi - lo) / 60))
        counts = np.add.reduceat(stats.histogram[lo:hi], np.arange(0, hi - lo, step))
        edges = bin_edges(np.append(np.arange(lo, hi, step), hi))
        left.stairs(counts / stats.count, edges, label=g, linewidth=1.5)
        means = np.divide(stats.position_sum, stats.position_count, out=np.full(POSITION_BINS, np.nan),
                          where=stats.position_count > 0)
        centers = (np.arange(POSITION_BINS) + 0.5) / POSITION_BINS
        right.plot(centers, means, marker="o", label=g)
    left.set_xscale("log")
    left.set_xlabel("weight W (log scale)")
    left.set_ylabel("share of completion tokens")
    left.set_title("weight distribution")
    left.legend()
    right.set_xlabel("relative position in the completion (k-1)/T")
    right.set_ylabel("mean weight")
    right.set_yscale("log")
    right.set_title("mean weight by position")
    right.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, metadata={"Software": None})
    plt.close(fig)
    return path
