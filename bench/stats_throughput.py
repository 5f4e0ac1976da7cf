"""`pear-data stats` on the scored dataset of bench/reweight_throughput.py (about --tokens tokens, plain Parquet
shards: no manifest, so `stats` reads every weight), best of --repeats, with and without --plot:

  stats SRC --json              the diagnostics of the stored weights (no position profile)
  stats SRC --plot FILE.png     the same with the position profile, and the plot

Each is timed as the whole command (`python -m pear_data.cli`, imports included) and as the in-process call
`pear_data.stats.stored_diagnostics`. `--baseline DIR` times the same commands with another checkout's
`pear_data` (DIR on PYTHONPATH), interleaved with this one, so that both see the same machine load.

Run: python bench/stats_throughput.py [--baseline /path/to/other/checkout]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from reweight_throughput import describe, scored_files  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

IN_PROCESS = ("import sys, time; from pear_data.stats import stored_diagnostics as d; t = time.perf_counter(); "
              "{call}; print(time.perf_counter() - t)")


def timed(command: list[str], checkout: Path) -> tuple[float, str]:
    env = {**os.environ, "PYTHONPATH": str(checkout)}
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=checkout, check=True)
    return time.perf_counter() - start, result.stdout


def commands(src: Path, png: Path, checkout: Path) -> dict[str, list[str]]:
    # an older stored_diagnostics has no `positions` argument: it always builds the position profile
    env = {**os.environ, "PYTHONPATH": str(checkout)}
    probe = ("import inspect, pear_data.stats as s; "
             "print('positions' in inspect.signature(s.stored_diagnostics).parameters)")
    has_positions = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env,
                                   cwd=checkout).stdout.strip() == "True"
    summary_call = f"d({str(src)!r}, positions=False)" if has_positions else f"d({str(src)!r})"
    return {
        "stats --json (command)": [sys.executable, "-m", "pear_data.cli", "stats", str(src), "--json"],
        "stats --plot (command)": [sys.executable, "-m", "pear_data.cli", "stats", str(src), "--plot", str(png)],
        "stored_diagnostics, summary (in process)": [sys.executable, "-c", IN_PROCESS.format(call=summary_call)],
        "stored_diagnostics, with positions (in process)": [
            sys.executable, "-c", IN_PROCESS.format(call=f"d({str(src)!r})")],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=8_000_000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--baseline", type=Path, help="another checkout of pear-data to time the same way")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="pear-stats-bench-"))
    try:
        files = scored_files(work / "src", args.tokens)
        tokens = describe(work / "src", files)
        checkouts = {"this checkout": ROOT}
        if args.baseline:
            checkouts["baseline"] = args.baseline.resolve()
        plans = {name: commands(work / "src", work / f"{i}.png", path)
                 for i, (name, path) in enumerate(checkouts.items())}
        best: dict[tuple[str, str], float] = {}
        for _ in range(args.repeats):
            for name, plan in plans.items():
                for label, command in plan.items():
                    seconds, stdout = timed(command, checkouts[name])
                    if "in process" in label:
                        seconds = float(stdout.strip().splitlines()[-1])
                    best[name, label] = min(best.get((name, label), float("inf")), seconds)
        for (name, label), seconds in best.items():
            print(f"{name:14s} {label:50s} {seconds:6.2f} s  {tokens / seconds / 1e6:6.2f} M tokens/s")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
