"""`pear-data stats`: diagnostics table (docs/design.md 3.5) and a weight plot of an output dir."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
from rich.console import Console
from rich.table import Table

from .dataset import check_scored, read_batches, source_files
from .diagnostics import MANTISSA_SHIFT, POSITION_BINS, Diagnostics, bin_edges
from .errors import InputError
from .schema import COMPLETION_MASK, GRANULARITIES, WEIGHT_COLUMNS

# (summary key, header): headers stay short so the table fits 80 columns
COLUMNS = (
    ("ess_fraction", "ESS"), ("mean", "mean"), ("min", "min"), ("p01", "p01"),
    ("p50", "p50"), ("p99", "p99"), ("max", "max"), ("share_at_lower_bound", "at lower"),
    ("share_at_upper_bound", "at upper"),
)


def stored_diagnostics(src: str | Path, *, positions: bool = True) -> Diagnostics:
    """Diagnostics of the weights stored in SRC's weight columns (with the position profile when `positions`).

    InputError (naming the file) for a file that lacks the columns, holds other types, or is damaged."""
    files = source_files(src)
    check_scored(files, (COMPLETION_MASK, *WEIGHT_COLUMNS.values()))
    return files_diagnostics(files, positions=positions)


def files_diagnostics(files: list[Path], *, positions: bool = False) -> Diagnostics:
    """Diagnostics of the stored weights of `files` (checked scored Parquet), over a polars lazy scan of the
    mask and the weight columns: a few aggregations and the histograms, read in one pass. The weights are
    those stored, so their bounds are unknown (no share at a bound). A file with nulls, weight lists not
    aligned with completion_mask, or damaged bytes is named (InputError)."""
    diagnostics = Diagnostics(positions=positions)
    frame = pl.scan_parquet([str(p) for p in files]).select(COMPLETION_MASK, *WEIGHT_COLUMNS.values())
    try:
        results = pl.collect_all(_granularity_queries(frame, positions))
    except pl.exceptions.PolarsError as exc:
        _check_files(files)
        raise InputError(f"{files[0].parent}: cannot read the weight columns ({exc}); restore the files, or "
                         "write them again") from None
    per_granularity = 3 if positions else 2
    for i, g in enumerate(GRANULARITIES):
        if results[per_granularity * i]["nulls"][0]:
            _check_files(files)
        _fill(diagnostics.stats[g], *results[per_granularity * i: per_granularity * (i + 1)])
    return diagnostics


_W, _N, _BIN, _POS = "_w", "_n", "_bin", "_pos"


def _granularity_queries(frame: pl.LazyFrame, positions: bool) -> list[pl.LazyFrame]:
    """Per granularity: (count, sums, min, max, nulls), the weight histogram and (positions) the position
    profile. Every granularity is a frame of (weight, tokens it stands for, relative position bin)."""
    mask, listed = pl.col(COMPLETION_MASK), [COMPLETION_MASK, WEIGHT_COLUMNS["token"], WEIGHT_COLUMNS["block"]]
    tokens = frame.select(*listed, WEIGHT_COLUMNS["sequence"])
    if positions:  # k and T of every completion token, for its relative position (k - 1) / T
        tokens = tokens.with_columns(mask.list.eval(pl.element().cast(pl.Int64).cum_sum()).alias("_k"),
                                     mask.cast(pl.List(pl.Int64)).list.sum().alias("_t"))
        listed.append("_k")
    tokens = tokens.explode(listed).filter(mask.is_null() | (mask == 1))
    if positions:
        tokens = tokens.with_columns(pl.min_horizontal(
            ((pl.col("_k") - 1) * POSITION_BINS // pl.col("_t")), POSITION_BINS - 1).alias(_POS))
    rows = frame.select(pl.col(WEIGHT_COLUMNS["sequence"]).alias(_W),
                        mask.cast(pl.List(pl.Int64)).list.sum().alias(_N)).filter(pl.col(_N) > 0)
    queries = []
    for g in GRANULARITIES:
        if g == "sequence":
            queries += _weight_queries(rows, False)
            if positions:
                queries.append(tokens.group_by(_POS).agg(
                    pl.col(WEIGHT_COLUMNS["sequence"]).cast(pl.Float64).sum().alias("s"), pl.len().alias("c")))
        else:
            weighted = tokens.select(pl.col(WEIGHT_COLUMNS[g]).alias(_W), pl.lit(1, pl.Int64).alias(_N),
                                     mask.is_null().alias("_null_mask"), *([_POS] if positions else []))
            queries += _weight_queries(weighted, positions)
    return queries


def _weight_queries(weighted: pl.LazyFrame, positions: bool) -> list[pl.LazyFrame]:
    w, n = pl.col(_W).cast(pl.Float64), pl.col(_N)
    nulls = w.null_count() + (pl.col("_null_mask").sum() if "_null_mask" in weighted.collect_schema() else 0)
    bins = (pl.col(_W).cast(pl.Float32).reinterpret(dtype=pl.Int32) // (1 << MANTISSA_SHIFT)).alias(_BIN)
    queries = [
        weighted.select(n.sum().alias("count"), (w * n).sum().alias("s"), (w * w * n).sum().alias("s2"),
                        w.min().alias("min"), w.max().alias("max"), nulls.alias("nulls")),
        weighted.drop_nulls(_W).group_by(bins).agg(n.sum().alias("c")),
    ]
    if positions:
        queries.append(weighted.group_by(_POS).agg(w.sum().alias("s"), pl.len().alias("c")))
    return queries


def _fill(stats, totals: pl.DataFrame, histogram: pl.DataFrame, profile: pl.DataFrame | None = None) -> None:
    """Set a WeightStats from the aggregates of one granularity (bounds unknown: stored weights)."""
    stats.bounds_known = False
    count = int(totals["count"][0] or 0)
    if not count:
        return
    stats.count, stats.sum_w, stats.sum_w2 = count, float(totals["s"][0]), float(totals["s2"][0])
    stats.min_w, stats.max_w = float(totals["min"][0]), float(totals["max"][0])
    np.add.at(stats.histogram, histogram[_BIN].to_numpy().astype(np.int64), histogram["c"].to_numpy())
    if profile is not None:
        bins = profile[_POS].to_numpy().astype(np.int64)
        np.add.at(stats.position_sum, bins, profile["s"].to_numpy())
        np.add.at(stats.position_count, bins, profile["c"].to_numpy())


def _check_files(files: list[Path]) -> None:
    """Name the first file with damaged bytes, nulls, or weight lists not aligned with completion_mask
    (InputError); the slow path, taken only when the scan found a problem."""
    names = [COMPLETION_MASK, *WEIGHT_COLUMNS.values()]
    for path in files:
        for batch in read_batches(path, 1024, names):
            lengths = pc.list_value_length(batch.column(COMPLETION_MASK))
            for name in names:
                column = batch.column(name)
                listed = pa.types.is_list(column.type) or pa.types.is_large_list(column.type)
                if column.null_count or (listed and column.flatten().null_count):
                    raise InputError(f"{path}: column {name} holds nulls; pear-data writes every weight and mask "
                                     "in full (was the file edited?)")
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
        table.caption = (f"{summary.get('completion_tokens', 0):,} completion tokens; mean clipped log-ratio "
                         f"d_k = {summary['mean_log_ratio']:.5g} (> 0: the target finds this data likelier than the "
                         "behavior; only for data sampled from the behavior is it about -KL(behavior‖target))")
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
