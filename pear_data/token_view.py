"""Rows of an output token by token, for `pear-data show` (show.py): pick them, spell them, colour them.

    pick rows      --row N ... | --lowest-ess K | --highest K | --where SQL (query.py), else the first row
    token views    per token: text, target and behavior log-probs, log-ratio, the three weights (`RowView`)
    colours        a diverging scale for weights and log-ratios, a sequential one for log-probs
    the terminal   rich text: completion tokens on the colour scale, prompt tokens dimmed (show_html.py: the page)

The log-ratio of a token is the log-ratio of its span (design 3.7): with one tokenizer each completion token is
its own span (target - behavior log-prob); across tokenizers a span's behavior log-prob sits on its last token,
so every token of the span shows the span's whole log-ratio and its behavior log-prob.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
from rich.console import Console
from rich.text import Text

from .config import ShowOptions
from .errors import UsageError
from .query import ROW, condition, scan_files
from .schema import (
    BEHAVIOR_LOGPROBS,
    COMPLETION_MASK,
    INPUT_IDS,
    SHARED_BOUNDARY,
    TARGET_LOGPROBS,
    WEIGHT_COLUMNS,
)

COLOUR_LOW, COLOUR_MID, COLOUR_HIGH = (49, 130, 189), (240, 240, 240), (230, 85, 13)
LIKELY, UNLIKELY = (199, 233, 192), (203, 24, 29)
LOGPROB_FLOOR = -10.0  # log-probs at or below this get the darkest colour


@dataclass
class RowView:
    """One row, token by token (arrays aligned with its input_ids); `summary` holds its per-row figures."""

    row: int
    texts: list[str]
    completion: np.ndarray
    target: np.ndarray
    behavior: np.ndarray
    log_ratio: np.ndarray
    span_tokens: np.ndarray
    token_weight: np.ndarray
    block_weight: np.ndarray
    seq_weight: float
    summary: dict


def pick_rows(frame: pl.LazyFrame, options: ShowOptions) -> list[int]:
    """The output rows (0-based) the options name, in the order shown."""
    if options.rows:
        n_rows = frame.select(pl.len()).collect().item()
        beyond = [r for r in options.rows if r >= n_rows]
        if beyond:
            raise UsageError(f"--row {beyond[0]}: the output has {n_rows} rows (0 to {n_rows - 1})")
        return list(options.rows)
    if options.lowest_ess:
        ranked = frame.select(ROW, "token_ess").sort("token_ess", ROW, nulls_last=True).head(options.lowest_ess)
    elif options.highest:
        ranked = frame.select(ROW, WEIGHT_COLUMNS["sequence"]).sort(
            WEIGHT_COLUMNS["sequence"], ROW, descending=[True, False], nulls_last=True).head(options.highest)
    elif options.where:
        ranked = frame.filter(condition(frame, options.where)).select(ROW).head(options.limit)
    else:
        ranked = frame.select(ROW).head(1)
    rows = ranked.collect()[ROW].to_list()
    if not rows:
        raise UsageError(f"--where {options.where!r}: no row of the output meets it")
    return rows


def row_views(files: list[Path], rows: list[int], tokenizer: Any) -> list[RowView]:
    """The picked rows as token views, in the order of `rows`."""
    frame = scan_files(files, derived=True)
    table = frame.filter(pl.col(ROW).is_in(rows)).collect()
    by_row = {r[ROW]: r for r in table.iter_rows(named=True)}
    return [_view(by_row[r], tokenizer) for r in rows]


def _view(record: dict, tokenizer: Any) -> RowView:
    ids = record[INPUT_IDS]
    completion = np.asarray(record[COMPLETION_MASK], dtype=np.int8) == 1
    target = np.asarray(record[TARGET_LOGPROBS], dtype=np.float64)
    behavior = np.asarray(record[BEHAVIOR_LOGPROBS], dtype=np.float64)
    shared = record.get(SHARED_BOUNDARY)
    ends = completion if shared is None else completion & (np.asarray(shared, dtype=np.int8) == 1)
    log_ratio, span_behavior, span_tokens = span_log_ratios(target, behavior, completion, ends)
    summary = {key: record.get(key) for key in ("n_completion_tokens", "mean_log_ratio", "token_ess")}
    return RowView(record[ROW], token_texts(tokenizer, ids), completion, target, span_behavior, log_ratio,
                   span_tokens, np.asarray(record[WEIGHT_COLUMNS["token"]], dtype=np.float64),
                   np.asarray(record[WEIGHT_COLUMNS["block"]], dtype=np.float64),
                   float(record[WEIGHT_COLUMNS["sequence"]]), summary)


def span_log_ratios(target: np.ndarray, behavior: np.ndarray, completion: np.ndarray,
                    ends: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per token of one row: its span's raw log-ratio (sum of target log-probs over the span minus the span's
    behavior log-prob), the span's behavior log-prob and its number of tokens; 0 off the completion."""
    positions = np.flatnonzero(completion)
    out = [np.zeros(len(target)) for _ in range(3)]
    if not len(positions):
        return out[0], out[1], out[2].astype(np.int64)
    is_end = ends[positions]
    span = np.cumsum(is_end) - is_end  # tokens up to and including a span end share its id
    n_spans = int(span.max()) + 1
    target_sum = np.bincount(span, weights=target[positions], minlength=n_spans)
    behavior_sum = np.bincount(span, weights=behavior[positions], minlength=n_spans)
    out[0][positions] = (target_sum - behavior_sum)[span]
    out[1][positions] = behavior_sum[span]
    out[2][positions] = np.bincount(span, minlength=n_spans)[span]
    return out[0], out[1], out[2].astype(np.int64)


def token_texts(tokenizer: Any, ids: list[int]) -> list[str]:
    """The text each token adds, decoded incrementally: a token that ends inside a character (a byte-level
    piece) adds "" and the token that completes the character adds all of it."""
    texts, prefix, read = [], 0, 0
    for i in range(len(ids)):
        before = tokenizer.decode(ids[prefix:read], skip_special_tokens=False)
        after = tokenizer.decode(ids[prefix:i + 1], skip_special_tokens=False)
        if after.endswith("\ufffd") and i + 1 < len(ids):
            texts.append("")
            continue
        texts.append(after[len(before):] if after.startswith(before) else after)
        prefix, read = read, i + 1
    return texts


# --------------------------------------------------------------------------- colours


def values_for(view: RowView, by: str, primary: str) -> np.ndarray:
    """The per-token values the colour scale shows (`ShowOptions.by`)."""
    if by == "weight":
        by = "block-weight" if primary == "block" else "token-weight"
    return {"token-weight": view.token_weight, "block-weight": view.block_weight, "log-ratio": view.log_ratio,
            "target": view.target, "behavior": view.behavior}[by]


def colours(values: np.ndarray, by: str, scale: float) -> list[tuple[int, int, int]]:
    """An RGB colour per value. Weights: log W on a diverging scale (blue < 1 < orange, +-scale in log);
    log-ratio: the same around 0; log-probs: green (likely) to red (at or below LOGPROB_FLOOR)."""
    if by in ("target", "behavior"):
        x = np.clip(np.asarray(values) / LOGPROB_FLOOR, 0.0, 1.0)
        return [_mix(LIKELY, UNLIKELY, t) for t in x]
    with np.errstate(divide="ignore"):
        x = np.log(np.maximum(values, 1e-300)) if by.endswith("weight") else np.asarray(values, dtype=np.float64)
    x = np.clip(np.nan_to_num(x, nan=0.0) / scale, -1.0, 1.0)
    return [_mix(COLOUR_MID, COLOUR_HIGH, t) if t >= 0 else _mix(COLOUR_MID, COLOUR_LOW, -t) for t in x]


def colour_scale(views: list[RowView], by: str, primary: str) -> float:
    """The half-width of the diverging scale: the largest |log W| or |log-ratio| shown (at least 0.1)."""
    if by in ("target", "behavior"):
        return -LOGPROB_FLOOR
    largest = 0.1
    for view in views:
        values = values_for(view, by, primary)[view.completion]
        with np.errstate(divide="ignore"):
            shown = np.log(values[values > 0]) if by.endswith("weight") else values
        finite = np.abs(shown[np.isfinite(shown)])
        largest = max(largest, float(finite.max()) if len(finite) else 0.0)
    return largest


def _mix(a: tuple[int, int, int], b: tuple[int, int, int], t: float) -> tuple[int, int, int]:
    return tuple(round(x + (y - x) * float(t)) for x, y in zip(a, b))


def hex_colour(rgb: tuple[int, int, int]) -> str:
    return "#{:02x}{:02x}{:02x}".format(*rgb)


def ink(rgb: tuple[int, int, int]) -> str:
    """Black or white text, whichever reads on the background."""
    return "#000000" if 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2] > 140 else "#ffffff"


# --------------------------------------------------------------------------- the terminal


def render_terminal(views: list[RowView], by: str, primary: str, console: Console) -> None:
    """Each row: a header with its figures, then its tokens (prompt dimmed, completion on the colour scale)."""
    scale = colour_scale(views, by, primary)
    console.print(legend(by, scale))
    for view in views:
        console.print(Text(row_header(view), style="bold"), soft_wrap=True)
        text = Text()
        rgb = colours(values_for(view, by, primary), by, scale)
        for i, piece in enumerate(view.texts):
            if view.completion[i]:
                shown = piece.replace("\n", "\u21b5\n")
                text.append(shown, style=f"{ink(rgb[i])} on {hex_colour(rgb[i])}")
            else:
                text.append(piece, style="dim")
        console.print(text, soft_wrap=True)  # the terminal wraps; lines break where the text does
        console.print()


def row_header(view: RowView) -> str:
    s = view.summary
    parts = [f"row {view.row}", f"{s.get('n_completion_tokens')} completion tokens"]
    if s.get("mean_log_ratio") is not None:
        parts.append(f"mean log-ratio {s['mean_log_ratio']:+.3f}")
    if s.get("token_ess") is not None:
        parts.append(f"token ESS {s['token_ess']:.3f}")
    parts.append(f"sequence weight {view.seq_weight:.4g}")
    return " · ".join(parts)


def legend(by: str, scale: float) -> Text:
    """One line: the colour scale and what its ends mean."""
    text = Text("colour: ")
    if by in ("target", "behavior"):
        ends, steps = (f"{by} log-prob 0 ", f" {LOGPROB_FLOOR:g} or less"), np.linspace(0, LOGPROB_FLOOR, 9)
    elif by.endswith("weight") or by == "weight":
        ends, steps = (f"W = e^-{scale:.3g} ", f" e^{scale:.3g}"), np.exp(np.linspace(-scale, scale, 9))
        by = "token-weight"
    else:
        ends, steps = (f"log-ratio -{scale:.3g} ", f" +{scale:.3g}"), np.linspace(-scale, scale, 9)
    text.append(ends[0])
    for rgb in colours(steps, by, scale):
        text.append("  ", style=f"on {hex_colour(rgb)}")
    text.append(ends[1] + "; prompt tokens dimmed")
    return text


def weight_summary(view: RowView, i: int) -> str:
    """The tooltip of token i: its text and every number behind its colour."""
    lines = [f"token {i}: {view.texts[i]!r}"]
    if not view.completion[i]:
        return "\n".join(lines + ["prompt (not trained)"])
    span = f" (span of {view.span_tokens[i]} tokens)" if view.span_tokens[i] > 1 else ""
    lines += [f"target log-prob {view.target[i]:.4f}", f"behavior log-prob {view.behavior[i]:.4f}{span}",
              f"log-ratio {view.log_ratio[i]:+.4f}{span}", f"token weight {view.token_weight[i]:.4g}",
              f"block weight {view.block_weight[i]:.4g}", f"sequence weight {view.seq_weight:.4g}"]
    return "\n".join(lines)
