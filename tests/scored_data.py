"""Synthetic scored rows (the columns `pear-data score` writes) for tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq


def scored_table(num_rows: int = 40, seed: int = 0, max_len: int = 60, spans: bool = False) -> pa.Table:
    """Valid scored rows: prompt, then one or two completion segments; an extra `text` column to keep.

    spans: add a cross-tokenizer `shared_boundary` column (random span ends, each row's last token one).
    """
    rng = np.random.default_rng(seed)
    ids, masks, target, behavior, texts, boundaries = [], [], [], [], [], []
    for r in range(num_rows):
        n = int(rng.integers(4, max_len))
        prompt = int(rng.integers(1, n - 1))
        mask = np.zeros(n, dtype=np.int8)
        mask[prompt:] = 1
        if r % 3 == 0 and n - prompt > 4:  # a user turn inside: two completion segments
            mask[prompt + 2 : prompt + 4] = 0
        lt = np.log(rng.uniform(0.01, 1.0, n)).astype(np.float32)
        lb = np.minimum(lt + rng.normal(0, 0.2, n), 0).astype(np.float32)
        lt[mask == 0] = 0.0
        lb[mask == 0] = 0.0
        ids.append(rng.integers(0, 1000, n).astype(np.int32).tolist())
        masks.append(mask.tolist())
        target.append(lt.tolist())
        behavior.append(lb.tolist())
        texts.append(f"row {r}")
        if spans:  # drawn only then, so that the rows without spans stay what they were
            shared = ((rng.random(n) < 0.5) & (mask == 1)).astype(np.int8)
            shared[np.flatnonzero(mask)[-1]] = 1
            boundaries.append(shared.tolist())
    columns = {
        "text": pa.array(texts, pa.string()),
        "input_ids": pa.array(ids, pa.list_(pa.int32())),
        "completion_mask": pa.array(masks, pa.list_(pa.int8())),
        "target_logprobs": pa.array(target, pa.list_(pa.float32())),
        "behavior_logprobs": pa.array(behavior, pa.list_(pa.float32())),
    }
    if spans:
        columns["shared_boundary"] = pa.array(boundaries, pa.list_(pa.int8()))
    return pa.table(columns)


def corrupt(table: pa.Table) -> tuple[pa.Table, dict[int, str]]:
    """Break some rows in ways design 3.1 rejects; returns the table and {row: expected reason fragment}."""
    rows = table.to_pylist()
    expected = {}

    def breaks(r: int, fragment: str) -> dict:
        expected[r] = fragment
        return rows[r]

    row = breaks(1, "behavior_logprobs[")
    row["behavior_logprobs"][-1] = float("nan")
    row = breaks(4, "target_logprobs[")
    row["target_logprobs"][-1] = 0.5
    row = breaks(7, "empty completion")
    row["completion_mask"] = [0] * len(row["completion_mask"])
    row = breaks(10, "lengths differ")
    row["target_logprobs"] = row["target_logprobs"][:-1]
    row = breaks(13, "completion_mask[0]")
    row["completion_mask"][0] = 1
    return pa.Table.from_pylist(rows, schema=table.schema), expected


def write_parquet(table: pa.Table, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)
    return path
