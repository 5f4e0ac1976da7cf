"""Queries over the rows of a pear-data output with polars: derived per-row columns and SQL conditions.

`select` and `show` pick rows with these, and `pear_data.dataset.scan(OUT, derived=True)` hands the same lazy
frame to users. Everything here is lazy (a `polars.LazyFrame` over the data files, in row order): a query reads
only the columns it names, and a per-row result holds one value per row, never a token list.

Derived columns (design 5, `select`), one value per row, computed from the list columns (design 2.2, whose
values are 0.0 off the completion, so a sum over the row is a sum over its completion tokens):

    row                    0-based position of the row in the output (input order, across data files)
    n_tokens               len(input_ids)
    n_completion_tokens    completion tokens T (completion_mask == 1)
    n_prompt_tokens        n_tokens - T
    sum_log_ratio          sum over the completion of target_logprobs - behavior_logprobs (raw: before the
                           --log-ratio-clip; across tokenizers the sum of the span log-ratios, design 3.7)
    mean_log_ratio         sum_log_ratio / T
    mean_target_logprob    sum of target_logprobs / T
    mean_behavior_logprob  sum of behavior_logprobs / T
    mean_token_weight      sum of pear_token_weight / T
    max_token_weight       max of pear_token_weight
    token_ess              effective sample size fraction of the row's token weights, (sum W)^2 / (T sum W^2)

A stored column of the same name wins over a derived one. A row with T = 0 (none is written by pear-data) gets
nulls in the means.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import polars as pl

from .errors import UsageError
from .schema import BEHAVIOR_LOGPROBS, COMPLETION_MASK, INPUT_IDS, TARGET_LOGPROBS, WEIGHT_COLUMNS

ROW = "row"
TOKEN_WEIGHT = WEIGHT_COLUMNS["token"]


def _list_sum(name: str) -> pl.Expr:
    return pl.col(name).cast(pl.List(pl.Float64)).list.sum()


def _completion() -> pl.Expr:
    return pl.col(COMPLETION_MASK).cast(pl.List(pl.Int64)).list.sum()


def _per_token(expr: pl.Expr) -> pl.Expr:
    return pl.when(_completion() > 0).then(expr / _completion())


# name -> (the stored columns it reads, the expression)
DERIVED: dict[str, tuple[tuple[str, ...], Callable[[], pl.Expr]]] = {
    "n_tokens": ((INPUT_IDS,), lambda: pl.col(INPUT_IDS).list.len().cast(pl.Int64)),
    "n_completion_tokens": ((COMPLETION_MASK,), _completion),
    "n_prompt_tokens": ((INPUT_IDS, COMPLETION_MASK),
                        lambda: pl.col(INPUT_IDS).list.len().cast(pl.Int64) - _completion()),
    "sum_log_ratio": ((TARGET_LOGPROBS, BEHAVIOR_LOGPROBS),
                      lambda: _list_sum(TARGET_LOGPROBS) - _list_sum(BEHAVIOR_LOGPROBS)),
    "mean_log_ratio": ((TARGET_LOGPROBS, BEHAVIOR_LOGPROBS, COMPLETION_MASK),
                       lambda: _per_token(_list_sum(TARGET_LOGPROBS) - _list_sum(BEHAVIOR_LOGPROBS))),
    "mean_target_logprob": ((TARGET_LOGPROBS, COMPLETION_MASK), lambda: _per_token(_list_sum(TARGET_LOGPROBS))),
    "mean_behavior_logprob": ((BEHAVIOR_LOGPROBS, COMPLETION_MASK),
                              lambda: _per_token(_list_sum(BEHAVIOR_LOGPROBS))),
    "mean_token_weight": ((TOKEN_WEIGHT, COMPLETION_MASK), lambda: _per_token(_list_sum(TOKEN_WEIGHT))),
    "max_token_weight": ((TOKEN_WEIGHT,), lambda: pl.col(TOKEN_WEIGHT).list.max().cast(pl.Float64)),
    "token_ess": ((TOKEN_WEIGHT, COMPLETION_MASK), lambda: _token_ess()),
}


def _token_ess() -> pl.Expr:
    weights = pl.col(TOKEN_WEIGHT).cast(pl.List(pl.Float64))
    squares = weights.list.eval(pl.element() * pl.element()).list.sum()
    return pl.when(squares > 0).then(weights.list.sum() ** 2 / (_completion() * squares))


def derived_names() -> list[str]:
    """Every derived column, `row` first."""
    return [ROW, *DERIVED]


def scan_files(files: list[Path], *, derived: bool = False) -> pl.LazyFrame:
    """A lazy frame over the rows of `files`, in order; with `derived`, plus the derived columns their stored
    columns allow (module docstring). The files are read only when the frame is collected."""
    frame = pl.scan_parquet([str(p) for p in files])
    if not derived:
        return frame
    names = frame.collect_schema().names()
    if ROW not in names:
        frame = frame.with_row_index(ROW).with_columns(pl.col(ROW).cast(pl.Int64))
    extra = {name: build() for name, (needs, build) in DERIVED.items()
             if name not in names and all(n in names for n in needs)}
    return frame.with_columns(**extra) if extra else frame


def condition(frame: pl.LazyFrame, where: str, flag: str = "--where") -> pl.Expr:
    """The SQL condition `where` (polars SQL, e.g. "n_completion_tokens > 100 AND mean_log_ratio < 0") as an
    expression over `frame`; UsageError naming the flag and the unknown column, the SQL error, or a condition
    that is not true/false."""
    try:
        expr = pl.sql_expr(where)
    except (pl.exceptions.PolarsError, ValueError) as exc:
        raise UsageError(f"{flag} {where!r}: not a SQL condition ({_first_line(exc)})") from None
    names = frame.collect_schema().names()
    unknown = [name for name in expr.meta.root_names() if name not in names]
    if unknown:
        raise UsageError(f"{flag} {where!r}: no column {unknown[0]!r}; the columns are "
                         f"{', '.join(names)}")
    dtype = _dtype(frame, expr, f"{flag} {where!r}")
    if dtype != pl.Boolean:
        raise UsageError(f"{flag} {where!r} is a {dtype}, not a condition: compare it, e.g. "
                         f"\"{where} > 0\"")
    return expr


def numeric_column(frame: pl.LazyFrame, name: str, flag: str) -> pl.Expr:
    """pl.col(name) as float64, for ranking or weighting rows; UsageError naming the flag when the frame has no
    such column or it is not one number per row."""
    names = frame.collect_schema().names()
    if name not in names:
        raise UsageError(f"{flag} {name}: no such column; the columns are {', '.join(names)}")
    dtype = frame.collect_schema()[name]
    if not dtype.is_numeric():
        raise UsageError(f"{flag} {name}: the column is {dtype}, not one number per row (e.g. pear_seq_weight, "
                         "mean_log_ratio, token_ess)")
    return pl.col(name).cast(pl.Float64)


def _dtype(frame: pl.LazyFrame, expr: pl.Expr, what: str) -> pl.DataType:
    try:
        return frame.select(expr.alias("_value")).collect_schema()["_value"]
    except pl.exceptions.PolarsError as exc:
        raise UsageError(f"{what}: {_first_line(exc)}") from None


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]
