"""`pear-data show`: rows token by token in the terminal and as one HTML page, checked in headless Chromium
(docs/design.md 5). Tiny models: the outputs of tiny_scored.py."""

from __future__ import annotations

import io
import subprocess
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from .cli_harness import cli
from .tiny_scored import (  # noqa: F401
    tiny_merged_dir_fixture,
    tiny_scored_cross_fixture,
    tiny_scored_fixture,
    tiny_target_dir_fixture,
)

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run"]


def rows(out: Path) -> list[dict]:
    return pq.read_table(out / "data").to_pylist()


def test_terminal_view_spells_every_token_and_colours_the_completion(tiny_scored):
    from rich.console import Console

    from pear_data.config import ShowOptions
    from pear_data.models import load_tokenizer, resolve_model
    from pear_data.show import show

    buffer = io.StringIO()
    console = Console(file=buffer, force_terminal=True, color_system="truecolor", width=100, record=True)
    show(tiny_scored.out, ShowOptions(rows=(2,), tokenizer=str(tiny_scored.model)), console)
    row = rows(tiny_scored.out)[2]
    tokenizer = load_tokenizer(resolve_model(str(tiny_scored.model)))
    completion = [i for i, m in enumerate(row["completion_mask"]) if m]
    prompt_text = tokenizer.decode(row["input_ids"][:completion[0]])
    completion_text = (tokenizer.decode(row["input_ids"][completion[0]:completion[-1] + 1]).replace("\n", "\u21b5\n")
                       + tokenizer.decode(row["input_ids"][completion[-1] + 1:]))
    plain = console.export_text()
    lines = plain.splitlines()
    assert lines[0].startswith("colour: W = e^-") and lines[0].endswith("prompt tokens dimmed")
    log_ratio = (np.sum(row["target_logprobs"], dtype=np.float64)
                 - np.sum(row["behavior_logprobs"], dtype=np.float64)) / len(completion)
    assert lines[1] == (f"row 2 · {len(completion)} completion tokens · mean log-ratio {log_ratio:+.3f}"
                        f" · token ESS {_ess(row):.3f} · sequence weight {row['pear_seq_weight']:.4g}")
    assert "\n".join(lines[2:]).strip() == (prompt_text + completion_text).strip()
    ansi = buffer.getvalue()
    assert "\x1b[2m" in ansi  # the prompt, dimmed
    assert ansi.count("\x1b[38;2;") >= 10 and ";48;2;" in ansi  # completion tokens on colour backgrounds


def _ess(row: dict) -> float:
    w = np.asarray(row["pear_token_weight"], dtype=np.float64)
    return float(w.sum() ** 2 / (sum(row["completion_mask"]) * (w * w).sum()))


def test_span_log_ratios_put_the_span_ratio_on_every_token_of_the_span(tiny_scored_cross):
    from pear_data.token_view import span_log_ratios

    for row in rows(tiny_scored_cross.out):
        completion = np.asarray(row["completion_mask"]) == 1
        ends = completion & (np.asarray(row["shared_boundary"]) == 1)
        target, behavior = (np.asarray(row[c], dtype=np.float64) for c in ("target_logprobs", "behavior_logprobs"))
        ratio, span_behavior, tokens = span_log_ratios(target, behavior, completion, ends)
        assert np.isclose(ratio[ends].sum(), target.sum() - behavior.sum())  # each span once, at its end
        assert np.isclose(span_behavior[ends].sum(), behavior.sum()) and tokens[ends].sum() == completion.sum()
    assert tokens.max() > 1  # rows with spans of several target tokens


def page(capsys, scored, path: Path, *args) -> str:
    code, _, text = cli(capsys, "show", scored.out, "--tokenizer", scored.model, "--html", path, *args)
    assert code == 0, text
    return path.read_text()


def chromium(path: Path, tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(CHROMIUM), *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}",
                           "--enable-logging=stderr", "--v=0", *args, path.as_uri()],
                          capture_output=True, text=True, timeout=120)


@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Chromium (/usr/bin/chromium: apt-get install chromium; "
                    ".ci/run installs it)")
def test_html_page_loads_in_chromium_with_one_element_per_token(capsys, tiny_scored_cross, tmp_path):
    path = tmp_path / "show.html"
    text = page(capsys, tiny_scored_cross, path, "--row", "0", "--row", "3")
    assert "<script" not in text and "http://" not in text and "https://" not in text and "<link" not in text
    assert "Weight diagnostics" in text and "data-tip=" in text
    result = chromium(path, tmp_path, "--dump-dom")
    assert result.returncode == 0, result.stderr
    assert ":CONSOLE" not in result.stderr, result.stderr  # no console message at all, errors included
    shown = rows(tiny_scored_cross.out)
    expected = len(shown[0]["input_ids"]) + len(shown[3]["input_ids"])
    dom = result.stdout
    assert dom.count('<span class="t ') == expected
    assert dom.count('<span class="t c"') == sum(shown[0]["completion_mask"]) + sum(shown[3]["completion_mask"])
    # the check can fail: a page with a console error shows up in the same log
    bad = tmp_path / "bad.html"
    bad.write_text(text.replace("</body>", "<script>console.error('broken page')</script></body>"))
    assert "broken page" in chromium(bad, tmp_path, "--dump-dom").stderr


def test_html_is_the_same_bytes_every_time(capsys, tiny_scored, tmp_path):
    assert (page(capsys, tiny_scored, tmp_path / "a.html", "--lowest-ess", "2")
            == page(capsys, tiny_scored, tmp_path / "b.html", "--lowest-ess", "2"))


@pytest.mark.parametrize("by", ["log-ratio", "target", "behavior", "block-weight"])
def test_every_colouring_renders(capsys, tiny_scored_cross, tmp_path, by):
    assert "colour:" in page(capsys, tiny_scored_cross, tmp_path / f"{by}.html", "--highest", "1", "--by", by)


def test_where_picks_rows_by_a_condition(capsys, tiny_scored, tmp_path):
    text = page(capsys, tiny_scored, tmp_path / "w.html", "--where", "n_completion_tokens > 150 AND row >= 1")
    picked = [i for i, r in enumerate(rows(tiny_scored.out)) if sum(r["completion_mask"]) > 150 and i >= 1]
    assert [int(x.split('"')[0]) for x in text.split('data-row="')[1:]] == picked


@pytest.mark.parametrize(("args", "named"), [
    (["--where", "nope > 1"], "nope"), (["--row", "99"], "--row 99"), (["--by", "colour"], "--by"),
    (["--row", "1", "--highest", "2"], "give one of them"),
])
def test_bad_flags_exit_2_naming_them(capsys, tiny_scored, args, named):
    code, _, text = cli(capsys, "show", tiny_scored.out, "--tokenizer", tiny_scored.model, *args)
    assert code == 2 and named in text.replace("\n", ""), text


def test_a_tokenizer_is_needed_and_checked(capsys, tiny_scored, tiny_merged_dir):
    code, _, text = cli(capsys, "show", tiny_scored.out)
    assert code == 2 and "--tokenizer" in text, text  # a local target: the manifest has its name, not its path
    code, _, text = cli(capsys, "show", tiny_scored.out, "--tokenizer", tiny_merged_dir)
    assert code == 2 and "fingerprint" in text.replace("\n", ""), text
