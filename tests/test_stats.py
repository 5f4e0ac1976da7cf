"""`pear-data stats` (stats.py): the diagnostics table, the plot, and a reader that closes the pipe early."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from .cli_harness import cli
from .outputs import (
    ROOT,
    assert_user_error,
)


def test_stats_on_parquet_without_weight_columns_exits_2(monkeypatch, capsys, scored):
    code, _, err = cli(capsys, "stats", scored)
    assert_user_error(code, err, "scored.parquet", "pear_token_weight")


@pytest.mark.parametrize("name", ["x.json", "plot", "x.PNG.txt"])
def test_stats_plot_needs_a_png_path(monkeypatch, capsys, output, tmp_path, name):
    code, _, err = cli(capsys, "stats", output, "--plot", tmp_path / name)
    assert_user_error(code, err, "--plot", ".png")
    assert not (tmp_path / name).exists()


def test_stats_plot_into_a_directory_writes_weights_png_there(monkeypatch, capsys, output, tmp_path):
    folder = tmp_path / "plots"
    folder.mkdir()
    code, _, err = cli(capsys, "stats", output, "--plot", folder)
    assert code == 0, err
    assert (folder / "weights.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert str(folder / "weights.png") in err.replace("\n", "")


@pytest.mark.parametrize("args", [[], ["--json"]])
def test_stats_into_a_closed_pipe_exits_0_quietly(output, args):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-m", "pear_data.cli", "stats", str(output), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    proc.stdout.close()  # like `| head` that has read enough
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 0, err
    assert "Traceback" not in err and "BrokenPipe" not in err and "Exception ignored" not in err, err


def test_stats_plot_into_a_closed_pipe_still_writes_the_plot(output, tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    png = tmp_path / "w.png"
    proc = subprocess.Popen([sys.executable, "-m", "pear_data.cli", "stats", str(output), "--plot", str(png)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 0, err
    assert png.is_file()


def test_stats_prints_the_table_and_plots(capsys, output, tmp_path):
    png = tmp_path / "weights.png"
    result = cli(capsys, "stats", output, "--plot", png)
    assert result.code == 0, result.err
    assert "ESS" in result.out and "token" in result.out and "sequence" in result.out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    as_json = json.loads(cli(capsys, "stats", output, "--json").out)
    assert as_json == json.loads((output / "manifest.json").read_text())["diagnostics"]


def test_stats_on_missing_dir_exits_2(capsys, tmp_path):
    assert cli(capsys, "stats", tmp_path / "nope").code == 2
