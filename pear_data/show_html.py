"""The HTML page of `pear-data show --html`: one self-contained file, no script, no network.

    header        the output's name, the command and models that made it, its weight flags
    diagnostics   the manifest's table (design 3.5) and its warnings
    legend        the colour scale
    rows          each picked row: its figures, then one <span class="t"> per token (prompt tokens `p`, completion
                  tokens `c` on the colour scale) whose tooltip (`data-tip`, shown by CSS on hover) gives the
                  token's text, target and behavior log-probs, log-ratio and its three weights

Everything is inline (CSS in a <style> element); the same rows and options give the same bytes.
"""

from __future__ import annotations

import html
import json

import numpy as np

from .schema import GRANULARITIES
from .token_view import (
    LOGPROB_FLOOR,
    RowView,
    colour_scale,
    colours,
    hex_colour,
    ink,
    row_header,
    values_for,
    weight_summary,
)

STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 24px; color: #222; background: #fff; }
h1 { font-size: 20px; margin: 0 0 4px; } h2 { font-size: 15px; margin: 18px 0 6px; }
.meta { color: #555; margin: 2px 0; } .warn { color: #9a4a00; }
table { border-collapse: collapse; margin: 8px 0; } td, th { padding: 2px 10px; text-align: right; }
th { border-bottom: 1px solid #999; } td:first-child, th:first-child { text-align: left; }
.legend span.sw { display: inline-block; width: 22px; height: 14px; vertical-align: middle; }
.tokens { font: 13px/1.9 ui-monospace, monospace; white-space: pre-wrap; word-break: break-word;
          border: 1px solid #ddd; padding: 10px; border-radius: 4px; }
.t { position: relative; border-radius: 2px; }
.t.p { color: #999; }
.t:hover { outline: 1px solid #000; }
.t:hover::after { content: attr(data-tip); position: absolute; left: 0; top: 1.8em; z-index: 10;
                  white-space: pre; background: #222; color: #fff; padding: 6px 8px; border-radius: 4px;
                  font: 12px/1.4 ui-monospace, monospace; pointer-events: none; }
"""

DIAGNOSTIC_COLUMNS = (("ess_fraction", "ESS"), ("mean", "mean"), ("min", "min"), ("p01", "p01"), ("p50", "p50"),
                      ("p99", "p99"), ("max", "max"), ("share_at_lower_bound", "at lower"),
                      ("share_at_upper_bound", "at upper"))


def render_page(views: list[RowView], manifest: dict, by: str, primary: str, title: str) -> str:
    """The whole page (module docstring) as text."""
    scale = colour_scale(views, by, primary)
    body = [f"<h1>pear-data show: {_e(title)}</h1>", *_run_lines(manifest), *_diagnostics(manifest, primary),
            _legend(by, scale)]
    for view in views:
        body += [f"<h2>{_e(row_header(view))}</h2>", _tokens(view, by, primary, scale)]
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>pear-data show: {_e(title)}</title><style>{STYLE}</style></head>\n<body>\n"
            + "\n".join(body) + "\n</body></html>\n")


def _tokens(view: RowView, by: str, primary: str, scale: float) -> str:
    rgb = colours(values_for(view, by, primary), by, scale)
    spans = []
    for i, piece in enumerate(view.texts):
        tip = _e(weight_summary(view, i))
        if view.completion[i]:
            style = f"background:{hex_colour(rgb[i])};color:{ink(rgb[i])}"
            spans.append(f'<span class="t c" style="{style}" data-tip="{tip}">{_e(piece)}</span>')
        else:
            spans.append(f'<span class="t p" data-tip="{tip}">{_e(piece)}</span>')
    return f'<div class="tokens" data-row="{view.row}">' + "".join(spans) + "</div>"


def _run_lines(manifest: dict) -> list[str]:
    if not manifest:
        return ['<p class="meta">scored Parquet without a manifest</p>']
    rows = manifest.get("rows") or {}
    models = manifest.get("models") or {}
    named = ", ".join(f"{role} <b>{_e(str((m or {}).get('spec', '?')))}</b>" for role, m in sorted(models.items()))
    return [
        f'<p class="meta">{_e(str(manifest.get("command")))}: {rows.get("out", "?")} rows '
        f'({rows.get("rejected", 0)} rejected); {named}</p>',
        f'<p class="meta">weights: <code>{_e(json.dumps(manifest.get("weights") or {}, sort_keys=True))}</code></p>',
    ]


def _diagnostics(manifest: dict, primary: str) -> list[str]:
    summary = manifest.get("diagnostics") or {}
    if not summary:
        return []
    head = "".join(f"<th>{h}</th>" for _, h in DIAGNOSTIC_COLUMNS)
    lines = ["<h2>Weight diagnostics over completion tokens</h2>", f"<table><tr><th>granularity</th>{head}</tr>"]
    for g in GRANULARITIES:
        s = summary.get(g)
        if s:
            cells = "".join(f"<td>{_fmt(s.get(key))}</td>" for key, _ in DIAGNOSTIC_COLUMNS)
            lines.append(f"<tr><td>{g}{' *' if g == primary else ''}</td>{cells}</tr>")
    lines.append("</table>")
    if "mean_log_ratio" in summary:
        lines.append(f'<p class="meta">{summary.get("completion_tokens", 0):,} completion tokens; mean clipped '
                     f'log-ratio d = {summary["mean_log_ratio"]:.4g} per token</p>')
    lines += [f'<p class="warn">warning: {_e(w)}</p>' for w in manifest.get("warnings") or []]
    return lines


def _legend(by: str, scale: float) -> str:
    if by in ("target", "behavior"):
        steps, ends = np.linspace(0, LOGPROB_FLOOR, 9), (f"{by} log-prob 0", f"{LOGPROB_FLOOR:g} or less")
    elif by == "log-ratio":
        steps, ends = np.linspace(-scale, scale, 9), (f"log-ratio -{scale:.3g}", f"+{scale:.3g}")
    else:
        steps, ends = np.exp(np.linspace(-scale, scale, 9)), (f"weight e^-{scale:.3g}", f"e^{scale:.3g}")
        by = "token-weight"
    swatches = "".join(f'<span class="sw" style="background:{hex_colour(c)}"></span>'
                       for c in colours(steps, by, scale))
    return (f'<p class="legend">colour: {_e(ends[0])} {swatches} {_e(ends[1])}; prompt tokens grey; '
            "hover a token for its numbers</p>")


def _fmt(value) -> str:
    if value is None:
        return "-"
    return f"{value:,}" if isinstance(value, int) else f"{value:.3g}"


def _e(text: str) -> str:
    return html.escape(text, quote=True)
