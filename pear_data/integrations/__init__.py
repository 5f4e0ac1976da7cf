"""PEAR weights in other frameworks' SFT trainers: what the adapters share (docs/integrations.md).

Each adapter is a module of its own that imports its framework:

- `pear_data.integrations.verl`: a verl SFT dataset class (`data.custom_cls`) that installs the PEAR loss in
  the slot of verl's SFT loss;
- `pear_data.integrations.axolotl`: an axolotl plugin (`plugins: [pear_data.integrations.axolotl.PearPlugin]`).

This module imports no framework. It loads a pear-data output (`load_output`), reads the `pear:` section of
a framework's config into `PearSettings`, and checks, on the first batch that reaches the loss, that the
weight column is in it (`check_batch`): a framework that filters columns or repacks rows must never train on
plain NLL while the user asked for PEAR. The weights always travel as float32 tensors of their own, never
folded into an integer loss mask.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from ..errors import TrainingError
from ..schema import BEHAVIOR_LOGPROBS, WEIGHT_COLUMNS
from ..training_data import TrainingData
from ..weights import WeightConfig

PEAR_WEIGHTS = "pear_weights"  # the batch key of static weights (as pear_data.collator.PearCollator names it)
_WEIGHT_FLAGS = tuple(f.name for f in dataclasses.fields(WeightConfig))
_SECTION_KEYS = ("mode", "loss_normalize", *_WEIGHT_FLAGS)


@dataclass(frozen=True)
class PearSettings:
    """What a framework config's `pear:` section asks for.

    mode: "static" (the weight column of `config.granularity`, written by `pear-data score` / `reweight`) or
        "online" (weights from the live target log-probs and the stored `behavior_logprobs`, with all of
        `config`: paper-exact).
    config: the `WeightConfig`; static training reads only its granularity.
    loss_normalize: "tokens" (divide by the step's label tokens) or "weights" (by the step's weight sum).
    """

    mode: Literal["static", "online"] = "static"
    config: WeightConfig = dataclasses.field(default_factory=WeightConfig)
    loss_normalize: Literal["tokens", "weights"] = "tokens"

    @property
    def weight_column(self) -> str | None:
        """The dataset column of static weights (None online)."""
        return WEIGHT_COLUMNS[self.config.granularity] if self.mode == "static" else None

    @property
    def batch_key(self) -> str:
        """The batch key the loss cannot do without: `pear_weights` (static) or `behavior_logprobs` (online)."""
        return PEAR_WEIGHTS if self.mode == "static" else BEHAVIOR_LOGPROBS

    def training_data(self, max_length: int | None) -> TrainingData:
        """What `pear_data.training_data.prepare_dataset` checks and cuts for these settings (no packing)."""
        return TrainingData(self.mode, self.weight_column, max_length)

    @classmethod
    def from_section(cls, section: Mapping[str, Any] | None, where: str) -> PearSettings:
        """Settings from a config section such as `{"mode": "online", "granularity": "block", "gamma": 0.99}`.

        Keys: `mode`, `loss_normalize` and the fields of `WeightConfig` (`granularity`, `gamma`, `horizon`,
        `block_size`, `log_ratio_clip`, `weight_clip`, `normalize`, `max_weight`, `length_normalize`,
        `center`; bounds as two-item lists, "inf" allowed). `where` names the section in errors
        ("data.pear", "pear"). Raises `TrainingError` on an unknown key, a bad value, or a weight flag in
        static mode (the static columns were computed when the data was scored: `pear-data reweight` changes
        them).
        """
        section = dict(section or {})
        unknown = sorted(set(section) - set(_SECTION_KEYS))
        if unknown:
            raise TrainingError(f"{where} has unknown key(s) {', '.join(unknown)}; known: {', '.join(_SECTION_KEYS)}")
        mode = section.pop("mode", "static")
        loss_normalize = section.pop("loss_normalize", "tokens")
        if mode not in ("static", "online"):
            raise TrainingError(f"{where}.mode must be 'static' or 'online', got {mode!r}")
        if loss_normalize not in ("tokens", "weights"):
            raise TrainingError(f"{where}.loss_normalize must be 'tokens' or 'weights', got {loss_normalize!r}")
        flags = sorted(set(section) - {"granularity"})
        if mode == "static" and flags:
            raise TrainingError(
                f"{where}: {', '.join(flags)} have no effect in static mode: the static weight columns were computed "
                "by `pear-data score` with the flags in the output's manifest. Recompute them with `pear-data "
                "reweight OUT --out OUT2 [weight flags]` (no model), or train with mode: online"
            )
        try:
            config = WeightConfig.from_dict(section)
        except (TypeError, ValueError) as exc:
            raise TrainingError(f"{where}: {exc}") from exc
        return cls(mode, config, loss_normalize)


def check_batch(keys: Collection[str], settings: PearSettings, where: str) -> None:
    """`TrainingError` unless the keys of the batch that reaches the loss hold `settings.batch_key` (the static
    weights, or the behavior log-probs); `where` names the framework path, for the message."""
    if settings.batch_key in keys:
        return
    raise TrainingError(
        f"the batch that reached the PEAR loss in {where} has no {settings.batch_key!r} (it has {sorted(keys)}): "
        f"the {'weights' if settings.mode == 'static' else 'behavior log-probs'} were dropped on the way (a column "
        "filter, a collator or a packing step of the framework that does not know them). Training stops rather "
        "than train on plain NLL; see docs/integrations.md for the dataset class / collator to use"
    )


def load_output(paths: str | Path | Collection[str | Path], where: str, cache_dir: str | Path | None = None) -> Any:
    """The rows of pear-data outputs as one `datasets.Dataset`. `paths`: output directories (OUT, whose rows are
    in OUT/data), their data/ directories, or Parquet files; `where` names the config key in errors;
    `cache_dir`: the `datasets` cache (None: its default)."""
    import datasets

    paths = [paths] if isinstance(paths, str | Path) else list(paths)
    files: list[str] = []
    for path in map(Path, paths):
        if path.is_dir():
            directory = path / "data" if (path / "data").is_dir() else path
            files += sorted(str(p) for p in directory.glob("*.parquet"))
        elif path.is_file():
            files.append(str(path))
        else:
            raise TrainingError(f"{where}: {path} does not exist (give a pear-data output directory, its data/ "
                                "directory, or Parquet files)")
    if not files:
        raise TrainingError(f"{where}: no Parquet file in {', '.join(map(str, paths))} (give the directory that "
                            "`pear-data score --out` wrote)")
    return datasets.Dataset.from_parquet(files, cache_dir=str(cache_dir) if cache_dir else None)
