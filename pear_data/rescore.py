"""`pear-data rescore`: new target log-probs for a scored output, keeping its behavior (docs/design.md 5).

    read the output's rows in order, --shard-rows at a time
      -> score the stored input_ids under the new target (scoring/: the torch backend, as `score`)
      -> keep behavior_logprobs and shared_boundary as stored (the behavior and the alignment do not change)
      -> weigh with the output's own weight flags (weigh.py) -> commit the shard (output/)

The behavior pass, the expensive half when the teacher is large, is not repeated. The new target must tokenize
as the rows were tokenized: its tokenizer fingerprint must be the one the manifest records (else exit 2, naming
both models). Resumable like `score`: every shard is committed atomically and `--resume` continues after the
last one, to the bytes of a run never interrupted; with `--normalize dataset` the shards are rewritten once at the
end (score.normalize_dataset). Equal to `score --target NEW` with the same behavior on the same corpus, up to
the float drift of batches composed otherwise (scoring/torch_backend.py).
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .card import render_card
from .config import RescoreOptions, SamplingParams, WeightConfig
from .dataset import check_scored, files_fingerprint, finished_manifest, source_files
from .diagnostics import Diagnostics, degeneracy_warnings
from .errors import InputError, UsageError
from .output import DatasetWriter, check_output_apart, data_files
from .reweight import batches, check_rows, shard_slices, source_record
from .schema import COMPLETION_MASK, INPUT_IDS, REJECT_REASON, ROW_INDEX, TARGET_LOGPROBS
from .score import normalize_dataset, observe_files
from .weigh import weigh_table, with_columns

# What a rescored output keeps of its source's manifest (the target's own records are replaced).
CARRIED_KEYS = ("behavior", "alignment", "tokenize", "tokenizer", "license", "corpus")


def rescore(src: str | Path, out: str | Path, options: RescoreOptions, *,
            progress_factory: Callable[[int | None], Any] | None = None) -> dict:
    """Score SRC's rows under `options.target`, recompute the weights, write OUT; returns the manifest.

    Refused before anything is written (exit 2): SRC unfinished, being written, or not a pear-data output (its
    manifest records the tokenizer and the weight flags); OUT that is, contains or lies inside SRC; a target
    whose tokenizer is not the one SRC's rows were tokenized with (naming both), or whose vocabulary lacks a
    stored token id; a device torch cannot use. A --resume with another SRC, target or flags is refused naming
    what differs.
    """
    from .models import resolve_model
    from .scoring import check_device

    source = finished_manifest(src)
    files = source_files(src)
    check_output_apart([src, *files], out, "the input")
    check_scored(files)
    check_rows(src, files, source)
    config = WeightConfig.from_dict(source.get("weights") or {})
    check_device(options.scoring.device)
    model = resolve_model(options.target)
    _check_tokenizer(src, source, model, options)
    fingerprint = files_fingerprint(files)
    run_key = {"command": "rescore", "input_fingerprint": fingerprint, "target": model.fingerprint,
               "weights": config.to_dict(), "shard_rows": options.run.shard_rows,
               "batch_tokens": options.scoring.batch_tokens, "device": options.scoring.device}
    writer = DatasetWriter(out, run_key, resume=options.run.resume, overwrite=options.run.overwrite)
    try:
        scorer, device = _scorer(model, files, options)
        meter = progress_factory(int((source.get("rows") or {}).get("out") or 0)) if progress_factory else None
        diagnostics = Diagnostics()
        if config.normalize != "dataset":  # the shards committed before a resume
            observe_files(data_files(writer.out_dir), config, None, diagnostics, by_row_group=False)
        rescore_shards(writer, files, scorer, config, diagnostics, options.run.shard_rows, meter)
        means = normalize_dataset(writer, config, diagnostics) if config.normalize == "dataset" else None
        manifest = _manifest(writer, src, source, fingerprint, len(files), model, device, config, options,
                             diagnostics, means)
        return writer.finalize(manifest, render_card)
    finally:
        writer.close()


def _check_tokenizer(src: str | Path, source: dict, model: Any, options: RescoreOptions) -> None:
    """UsageError unless the target tokenizes as SRC's rows were tokenized (the manifest's fingerprint)."""
    from .models import load_tokenizer, tokenizer_fingerprint

    recorded = (source.get("tokenizer") or {}).get("fingerprint")
    if not recorded:
        raise InputError(f"{src}: its manifest records no tokenizer fingerprint, so a new target cannot be checked "
                         "against the stored input_ids; score the corpus with `pear-data score --target` instead")
    tokenizer = load_tokenizer(model, trust_remote_code=options.scoring.trust_remote_code)
    found = tokenizer_fingerprint(tokenizer)
    if found != recorded:
        scored_with = ((source.get("models") or {}).get("target") or {}).get("spec", "its target")
        raise UsageError(
            f"--target {options.target}: its tokenizer (fingerprint {found[:16]}) is not the one the rows of {src} "
            f"were tokenized with ({scored_with}, fingerprint {recorded[:16]}): the stored input_ids would mean "
            f"other tokens. Score the corpus again with `pear-data score --target {options.target}` instead")


def _scorer(model: Any, files: list[Path], options: RescoreOptions) -> tuple[Any, str]:
    """The torch scorer of the new target, and its device; UsageError when a stored id is beyond its vocabulary."""
    from .models import load_model
    from .scoring import TorchScorer, resolve_device, scoring_dtype

    device = resolve_device(options.scoring.device)
    loaded = load_model(model, device=device, dtype=scoring_dtype(device),
                        trust_remote_code=options.scoring.trust_remote_code)
    vocabulary = loaded.get_input_embeddings().num_embeddings
    largest = max((pc.max(pc.list_flatten(t[INPUT_IDS])).as_py() or 0) for t in batches(files, 8192, [INPUT_IDS]))
    if largest >= vocabulary:
        raise UsageError(f"--target {options.target}: the stored input_ids hold token id {largest}, beyond the "
                         f"model's vocabulary of {vocabulary}; give the model the rows were tokenized for")
    return TorchScorer(loaded, device=device, batch_tokens=options.scoring.batch_tokens,
                       name=f"--target {options.target}"), device


def rescore_shards(writer: DatasetWriter, files: list[Path], scorer: Any, config: WeightConfig,
                   diagnostics: Diagnostics, shard_rows: int, meter: Any = None) -> None:
    """Score, weigh and commit every shard from `writer.next_input_row` on. With dataset normalization the
    shards hold unnormalized weights and record their sums until the final rewrite."""
    dataset_normalization = config.normalize == "dataset"
    if dataset_normalization:
        config = dataclasses.replace(config, normalize="none", max_weight=None)
    start_row = writer.next_input_row
    if meter:
        meter.advance(start_row, 0)
    slices: Iterator[tuple[int, int, pa.Table]] = shard_slices(batches(files, 1024), shard_rows)
    for _, group in itertools.groupby(slices, key=lambda item: item[0]):
        parts = [(start, part) for _, start, part in group if start >= start_row]
        if not parts:
            continue
        table = pa.concat_tables([part for _, part in parts]).combine_chunks()
        table = with_columns(table, {TARGET_LOGPROBS: target_logprobs(scorer, table)})
        _commit(writer, parts[0][0], table, config, None if dataset_normalization else diagnostics,
                dataset_normalization)
        if meter:
            meter.advance(table.num_rows, int(pc.sum(pc.list_value_length(table[INPUT_IDS])).as_py() or 0))


def target_logprobs(scorer: Any, table: pa.Table) -> pa.Array:
    """The target's log-prob of every stored token (0.0 off the completion), as a list<float32> column."""
    ids, mask = table[INPUT_IDS].combine_chunks(), table[COMPLETION_MASK].combine_chunks()
    offsets = np.asarray(ids.offsets, dtype=np.int64)
    flat_ids = ids.flatten().to_numpy(zero_copy_only=False).astype(np.int64)
    flat_mask = mask.flatten().to_numpy(zero_copy_only=False).astype(np.int8)
    bounds = offsets[1:-1] - offsets[0]
    (scored,) = scorer.score(np.split(flat_ids, bounds), np.split(flat_mask, bounds), [SamplingParams()])
    values = np.concatenate(scored).astype(np.float32) if scored else np.zeros(0, np.float32)
    return pa.ListArray.from_arrays(pa.array((offsets - offsets[0]).astype(np.int32)), pa.array(values))


def _commit(writer: DatasetWriter, start: int, table: pa.Table, config: WeightConfig,
            diagnostics: Diagnostics | None, record_sums: bool) -> None:
    """Weigh a rescored shard and commit it: valid rows to data/, others to rejects (their own columns, with
    row_index in the source and reject_reason, as `reweight` writes them)."""
    with writer.shard() as handle:
        weighed = weigh_table(table, config, observer=diagnostics)
        if len(weighed.rejected_rows):
            rejected = table.take(pa.array(weighed.rejected_rows))
            rejected = rejected.append_column(ROW_INDEX, pa.array(start + weighed.rejected_rows, pa.int64()))
            handle.reject(rejected.append_column(REJECT_REASON, pa.array(weighed.reasons, pa.string())))
        handle.write(weighed.kept)
        handle.commit(start + table.num_rows, {
            "tokens": weighed.tokens, "completion_tokens": weighed.completion_tokens,
            "weight_sums": weighed.sums.sums if record_sums else None})


def _manifest(writer: DatasetWriter, src: str | Path, source: dict, fingerprint: str, n_files: int, model: Any,
              device: str, config: WeightConfig, options: RescoreOptions, diagnostics: Diagnostics,
              means: dict | None) -> dict:
    """The manifest of a finished rescore (design 2.5): the new target in `models.target`, the one the rows were
    scored with in `models.previous_target`, the source's behavior, alignment and tokenizer records."""
    from .policies import scoring_record
    from .scoring import scoring_dtype

    summary = diagnostics.summary()
    models = dict(source.get("models") or {})
    previous = models.get("target")
    models["target"] = {**model.to_dict(), "dtype": str(scoring_dtype(device)).removeprefix("torch.")}
    if previous is not None:
        models["previous_target"] = previous
    manifest = {key: source[key] for key in CARRIED_KEYS if key in source}
    manifest.update({
        "command": "rescore",
        "input": {"name": Path(src).resolve().name, "fingerprint": fingerprint, "files": n_files},
        "source": source_record(src, source),
        "models": models,
        "scoring": scoring_record(options.scoring, device.split(":")[0]),
        "weights": config.to_dict(),
        "tokens": {key: sum(r.stats.get(stat) or 0 for r in writer.committed)
                   for key, stat in (("total", "tokens"), ("completion", "completion_tokens"))},
        "diagnostics": summary,
        "warnings": degeneracy_warnings(summary),
        "dataset_means": means,
    })
    return manifest
