"""`pear-data reweight` against the floor it cannot beat: reading and writing the same files with pyarrow.

Builds a scored dataset of about --tokens tokens (rows of 100-2000 tokens, a text column, every column
`pear-data score` writes, shards of 1,000 rows written with pear-data's own Parquet options), then times, best
of --repeats:

  floor     for every file: pyarrow.parquet.read_table, then write_table with pear-data's writer options
            (zstd level 3, dictionary, statistics: the options every pear-data output is written with)
  floor-defaults  the same with pyarrow's default write options (for reference)
  reweight  pear_data.reweight.reweight(SRC, OUT, WeightConfig()) (validate, weigh, write, manifest, card)
  reweight --normalize dataset   (a first pass over the engine columns, then the same)

and prints each time, tokens/s and the ratio to the floor. Run: python bench/reweight_throughput.py
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pear_data.output.files import PARQUET_OPTIONS, ROW_GROUP_ROWS
from pear_data.reweight import reweight
from pear_data.schema import COLUMNS, SCORED, WEIGHTS
from pear_data.weights import WeightConfig


def scored_files(folder: Path, tokens: int, seed: int = 0, shard_rows: int = 1000) -> list[Path]:
    """Scored shards like `pear-data score` writes, about `tokens` tokens in all."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    files, total, shard = [], 0, 0
    while total < tokens:
        lengths = rng.integers(100, 2000, shard_rows)
        n = int(lengths.sum())
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
        prompt = (lengths * rng.uniform(0.2, 0.6, shard_rows)).astype(np.int64)
        position = np.arange(n) - np.repeat(offsets[:-1], lengths)
        mask = (position >= np.repeat(prompt, lengths)).astype(np.int8)
        target = np.where(mask == 1, -rng.exponential(1.0, n), 0.0).astype(np.float32)
        behavior = np.where(mask == 1, -rng.exponential(1.2, n), 0.0).astype(np.float32)
        flat = {
            "input_ids": rng.integers(0, 49152, n).astype(np.int32), "completion_mask": mask,
            "target_logprobs": target, "behavior_logprobs": behavior, "shared_boundary": mask,
            "pear_token_weight": np.where(mask == 1, 1.0, 0.0).astype(np.float32),
            "pear_block_weight": np.where(mask == 1, 1.0, 0.0).astype(np.float32),
        }
        columns = {"question": pa.array([f"question {shard}-{r}: " + "x" * int(rng.integers(100, 600))
                                         for r in range(shard_rows)])}
        for column in (*SCORED, *WEIGHTS):
            if column.name in flat:
                columns[column.name] = pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat[column.name]))
            else:
                columns[column.name] = pa.array(np.ones(shard_rows, np.float32))
            assert columns[column.name].type == COLUMNS[column.name].type
        path = folder / f"part-{shard:05d}.parquet"
        pq.write_table(pa.table(columns), path, row_group_size=ROW_GROUP_ROWS, **PARQUET_OPTIONS)
        files.append(path)
        total += n
        shard += 1
    return files


def best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def describe(folder: Path, files: list[Path]) -> int:
    """Print the dataset's rows, tokens, files and size, and the machine; return its token count."""
    ids = pq.read_table(folder, columns=["input_ids"]).column("input_ids")
    tokens = int(pc.sum(pc.list_value_length(ids)).as_py())
    size = sum(p.stat().st_size for p in files)
    print(f"{len(ids):,} rows, {tokens:,} tokens, {len(files)} files, {size / 2**20:.1f} MiB on disk "
          f"({platform.processor() or platform.machine()}, {os.cpu_count()} cores, pyarrow {pa.__version__})")
    return tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=8_000_000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="pear-reweight-bench-"))
    try:
        files = scored_files(work / "src", args.tokens)
        tokens = describe(work / "src", files)

        def floor(options: dict) -> None:
            out = work / "floor"
            out.mkdir(exist_ok=True)
            for path in files:
                pq.write_table(pq.read_table(path), out / path.name, row_group_size=ROW_GROUP_ROWS, **options)

        def run(config: WeightConfig) -> None:
            out = work / "out"
            shutil.rmtree(out, ignore_errors=True)
            reweight(work / "src", out, config)

        results = {
            "floor (read + write, pear-data options)": best(lambda: floor(PARQUET_OPTIONS), args.repeats),
            "floor (read + write, pyarrow defaults)": best(lambda: floor({}), args.repeats),
            "reweight": best(lambda: run(WeightConfig()), args.repeats),
            "reweight --normalize dataset": best(lambda: run(WeightConfig(normalize="dataset")), args.repeats),
        }
        base = results["floor (read + write, pear-data options)"]
        for name, seconds in results.items():
            rate = tokens / seconds / 1e6
            print(f"{name:42s} {seconds:7.2f} s  {rate:6.2f} M tokens/s  {seconds / base:5.2f}x floor")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
