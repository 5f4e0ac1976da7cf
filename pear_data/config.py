"""Every option of pear-data as a dataclass, checked once, at construction (docs/design.md sections 3-5).

The command line maps its flags to these and does nothing else; the pipeline stages take the narrow config they
need (`ScoringConfig` for the scorers, `RunConfig` for the engines and the writer, ...). A bad value or a
combination that cannot work raises `ConfigError` (exit code 2) naming the flag as the command line spells it.
This module imports no pipeline stage: only the errors and the column names.

    ScoreOptions     pear-data score: target, BehaviorSpec, WeightConfig, TokenizeConfig, CorpusConfig,
                     ScoringConfig, RunConfig, license, card_title
    ReweightOptions  pear-data reweight (with a WeightConfig)
    TrainingData     what a trainer reads from a dataset (pear_data.training_data)
"""

from __future__ import annotations

import math
import unicodedata
from dataclasses import asdict, dataclass, field
from typing import Literal

from .errors import ConfigError
from .schema import (
    BEHAVIOR_LOGPROBS,
    COMPLETION_MASK,
    GRANULARITIES,
    INPUT_IDS,
    SHARED_BOUNDARY,
    WEIGHT_COLUMNS,
    Granularity,
)

DEFAULT_TARGET = "smollm2-135m-instruct"
DEFAULT_BEHAVIOR = "gemma-3-270m"

Normalize = Literal["dataset", "sequence", "none"]
OnOverflow = Literal["truncate", "skip", "error"]
ON_OVERFLOW: tuple[OnOverflow, ...] = ("truncate", "skip", "error")
TEMPLATES = ("auto", "chat", "raw")
ALIGNMENTS = ("auto", "direct", "char-offsets")
BACKENDS = ("torch", "vllm")
PACKING = ("bfd", "bfd_split")

# No row has more tokens than this (Arrow list offsets are int32): a larger block size is the same as this one.
MAX_BLOCK_SIZE = 2**31 - 1
# A finite log-ratio bound beyond this could overflow the float64 suffix sums of a long row (inf - inf = NaN).
MAX_LOG_RATIO_BOUND = 1e100


def _refuse(problems: list[str]) -> None:
    if problems:
        raise ConfigError("; ".join(problems))


def _card_title_problems(title: str | None) -> list[str]:
    """`--card-title`: one line of text (the card's heading and its Hub `pretty_name`)."""
    if title is None:
        return []
    if not title.strip():
        return ["--card-title must not be empty: give the dataset's name, or leave the flag out (the card is then "
                "titled after the corpus)"]
    if any(unicodedata.category(c) == "Cc" for c in title):
        return [f"--card-title must be one line of text without control characters, got {title!r}"]
    return []


# --------------------------------------------------------------------------- the weights (design 3)


@dataclass(frozen=True)
class WeightConfig:
    """Every hyperparameter of docs/design.md section 3 (defaults: section 3.4).

    Checked at construction (ConfigError naming each flag at fault):

    - `weight_clip` (wmin, wmax): 0 <= wmin <= wmax, wmax > 0, wmin finite. wmax = inf means no upper bound
      (then a weight beyond float32's range, e^88.7, is stored as inf, which `pear_loss` refuses as a static
      weight: training data wants a finite wmax); wmin = inf (`--weight-clip inf,inf`) would make every
      weight inf.
    - `log_ratio_clip` (lo, hi): lo <= hi, lo < +inf, hi > -inf (a bound at the far infinity makes every d
      infinite, and the suffix sums inf - inf = NaN), finite bounds within +-MAX_LOG_RATIO_BOUND (inf is the
      way to say "no bound").
    - `block_size` >= 1; a block size above MAX_BLOCK_SIZE is stored as MAX_BLOCK_SIZE: both mean one block
      per row, since no row is longer. `horizon` may be any int >= 0.
    - `normalize` sequence|dataset with wmin = 0: every weight of a row can underflow to 0 (a long trace's
      sequence weight e^(sum d)), and normalizing would divide 0 by 0; give wmin > 0.
    """

    granularity: Granularity = "token"
    gamma: float = 0.999
    horizon: int | None = None  # None = unbounded
    block_size: int = 4
    log_ratio_clip: tuple[float, float] = (-0.08, 0.3)
    weight_clip: tuple[float, float] = (math.exp(-10.0), math.exp(5.0))
    normalize: Normalize = "none"
    max_weight: float | None = None  # None = no cap
    length_normalize: bool = False
    center: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.block_size, int) and self.block_size > MAX_BLOCK_SIZE:
            object.__setattr__(self, "block_size", MAX_BLOCK_SIZE)  # one block per row either way
        _refuse([*self._flag_problems(), *self._clip_problems()])

    def _flag_problems(self) -> list[str]:
        problems = []
        if self.granularity not in GRANULARITIES:
            problems.append(f"--granularity must be one of {', '.join(GRANULARITIES)}, got {self.granularity!r}")
        if not 0.0 < self.gamma <= 1.0:
            problems.append(f"--gamma must be in (0, 1], got {self.gamma}")
        if self.horizon is not None and self.horizon < 0:
            problems.append(f"--horizon must be >= 0, got {self.horizon}")
        if self.block_size < 1:
            problems.append(f"--block-size must be >= 1, got {self.block_size}")
        if self.normalize not in ("dataset", "sequence", "none"):
            problems.append(f"--normalize must be dataset, sequence or none, got {self.normalize!r}")
        if self.max_weight is not None and not self.max_weight > 0:
            problems.append(f"--max-weight must be > 0, got {self.max_weight}")
        return problems

    def _clip_problems(self) -> list[str]:
        (lo, hi), (wmin, wmax) = self.log_ratio_clip, self.weight_clip
        problems = []
        if math.isnan(lo) or math.isnan(hi) or lo > hi:
            problems.append(f"--log-ratio-clip needs lo <= hi, got {lo},{hi}")
        elif lo == math.inf or hi == -math.inf:
            problems.append(f"--log-ratio-clip {lo},{hi} makes every log-ratio infinite: give lo < inf and hi > -inf "
                            "(-inf,inf means no clip)")
        elif any(math.isfinite(v) and abs(v) > MAX_LOG_RATIO_BOUND for v in (lo, hi)):
            problems.append(f"--log-ratio-clip bounds must lie within +-{MAX_LOG_RATIO_BOUND:g} or be +-inf "
                            f"(no bound), got {lo},{hi}")
        if math.isnan(wmin) or math.isnan(wmax) or not 0.0 <= wmin <= wmax or wmax == 0.0:
            problems.append(f"--weight-clip needs 0 <= wmin <= wmax and wmax > 0, got {wmin},{wmax}")
        elif math.isinf(wmin):
            problems.append(f"--weight-clip needs a finite wmin (every weight would be inf), got {wmin},{wmax}")
        elif self.normalize in ("dataset", "sequence") and wmin == 0.0:
            problems.append(
                f"--normalize {self.normalize} with --weight-clip wmin = 0: when every weight of a "
                f"{'row' if self.normalize == 'sequence' else 'granularity'} reaches 0 (a long trace's sequence "
                "weight underflows), its mean is 0 and normalizing divides by zero. Give wmin > 0, e.g. "
                f"--weight-clip 1e-30,{wmax:g} (the default wmin is e^-10)")
        return problems

    def to_dict(self) -> dict:
        """JSON-ready, with float('inf') spelled as the string 'inf'."""
        def plain(value):
            if isinstance(value, float) and math.isinf(value):
                return "inf" if value > 0 else "-inf"
            if isinstance(value, tuple):
                return [plain(v) for v in value]
            return value

        return {key: plain(value) for key, value in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict) -> WeightConfig:
        def num(value):
            return float(value) if isinstance(value, str) else value

        data = dict(data)
        for key in ("log_ratio_clip", "weight_clip"):
            if key in data:
                data[key] = tuple(num(v) for v in data[key])
        if data.get("max_weight") is not None:
            data["max_weight"] = num(data["max_weight"])
        return cls(**data)


# --------------------------------------------------------------------------- what score reads and renders


@dataclass(frozen=True)
class SamplingParams:
    """How a policy sampled its tokens (design 3.6). The target policy is scored at the defaults (1.0, 1.0).

    temperature: tau > 0 (finite); the logits are divided by it.
    top_p: nucleus mass p in (0, 1]; 1.0 means no nucleus truncation.
    """

    temperature: float = 1.0
    top_p: float = 1.0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise ConfigError(f"--behavior-temperature must be a finite number > 0, got {self.temperature!r} "
                              "(greedy decoding, temperature 0, has no log-probs to weight by)")
        if not (0.0 < self.top_p <= 1.0):
            raise ConfigError(f"--behavior-top-p must be in (0, 1], got {self.top_p!r}")


@dataclass(frozen=True)
class BehaviorSpec:
    """What the user said about the behavior policy (the `score` flags).

    model:          None = DEFAULT_BEHAVIOR (unless logprobs_field is set); the target's own spec = the target
                    itself
    logprobs_field: column with recorded behavior log-probs (exclusive with model)
    temperature, top_p: how the behavior sampled (design 3.6)
    template:       how a behavior model renders a row: "auto" (its chat template if it has one, else raw),
                    "chat" or "raw" (base models)
    alignment:      "auto" (direct when the behavior renders the target's exact tokens, else by character
                    offsets), "direct", or "char-offsets" (always by characters)
    """

    model: str | None = None
    logprobs_field: str | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    template: str = "auto"
    alignment: str = "auto"

    def __post_init__(self) -> None:
        if self.template not in TEMPLATES:
            raise ConfigError(f"--behavior-template must be auto, chat or raw, got {self.template!r}")
        if self.alignment not in ALIGNMENTS:
            raise ConfigError(f"--alignment must be one of {', '.join(ALIGNMENTS)}, got {self.alignment!r}")
        if self.model is not None and self.logprobs_field is not None:
            raise ConfigError("--behavior and --behavior-logprobs-field are exclusive: pick one source of "
                              "behavior log-probs")
        SamplingParams(self.temperature, self.top_p)

    @property
    def sampling(self) -> SamplingParams:
        return SamplingParams(self.temperature, self.top_p)


@dataclass(frozen=True)
class TokenizeConfig:
    """How rows are tokenized.

    max_length:    longest row in tokens (None = no limit); at least 2 (one prompt + one completion token).
    on_overflow:   a longer row: "truncate" (the truncation rule, design 2.6) | "skip" (reject) | "error".
    template:      "auto" (chat template when the tokenizer has one, else raw) | "chat" | "raw".
    raw_separator: text between consecutive messages in raw mode.
    """

    max_length: int | None = None
    on_overflow: OnOverflow = "truncate"
    template: Literal["auto", "chat", "raw"] = "auto"
    raw_separator: str = "\n\n"

    def __post_init__(self) -> None:
        if self.max_length is not None and self.max_length < 2:
            raise ConfigError(
                f"--max-length must be at least 2 (one prompt and one completion token), got {self.max_length}")
        if self.on_overflow not in ON_OVERFLOW:
            raise ConfigError(f"--on-overflow must be one of {', '.join(ON_OVERFLOW)}, got {self.on_overflow!r}")
        if self.template not in TEMPLATES:
            raise ConfigError(f"--template must be auto, chat or raw, got {self.template!r}")


@dataclass(frozen=True)
class CorpusConfig:
    """Which rows of the corpus, and how they map to conversations (design 2.1): `split` of a DatasetDict dir
    or a Hub dataset, and the row-shape flags (None: detected from the first row)."""

    split: str = "train"
    messages_field: str | None = None
    prompt_field: str | None = None
    completion_field: str | None = None
    system_field: str | None = None

    def __post_init__(self) -> None:
        if (self.prompt_field is None) != (self.completion_field is None):
            raise ConfigError("--prompt-field and --completion-field must be given together")
        if self.messages_field is not None and self.prompt_field is not None:
            raise ConfigError("--messages-field cannot be combined with --prompt-field/--completion-field")
        if self.messages_field is not None and self.system_field is not None:
            raise ConfigError("--system-field applies to prompt/completion fields, not to --messages-field")

    @property
    def shape_flags(self) -> dict[str, str | None]:
        """The row-shape flags, as `corpus.detect_shape` takes them."""
        return {"messages_field": self.messages_field, "prompt_field": self.prompt_field,
                "completion_field": self.completion_field, "system_field": self.system_field}


@dataclass(frozen=True)
class ScoringConfig:
    """How the scorers run (the narrow config of `pear_data.scoring` and `policies`).

    device: "auto", "cpu", "cuda" or "cuda:N". backend: "torch", or "vllm" (experimental). batch_tokens: padded
    tokens per forward pass (None: the device's default). The vLLM engine's share of GPU memory and tensor
    parallel size apply to --backend vllm only.
    """

    device: str = "auto"
    backend: str = "torch"
    batch_tokens: int | None = None
    trust_remote_code: bool = False
    vllm_gpu_memory_utilization: float = 0.9
    vllm_tensor_parallel_size: int = 1

    def __post_init__(self) -> None:
        device = self.device
        if device not in ("auto", "cpu", "cuda") and not (device.startswith("cuda:") and device[5:].isdigit()):
            raise ConfigError(f"--device must be auto, cpu, cuda or cuda:N, got {device!r}")
        if self.backend not in BACKENDS:
            raise ConfigError(f"--backend {self.backend}: choose one of {', '.join(BACKENDS)}")
        if self.batch_tokens is not None and self.batch_tokens < 1:
            raise ConfigError(f"--batch-tokens must be >= 1, got {self.batch_tokens}")
        if not 0.0 < self.vllm_gpu_memory_utilization <= 1.0:
            raise ConfigError(f"--vllm-gpu-memory-utilization must be in (0, 1], got "
                              f"{self.vllm_gpu_memory_utilization}")
        if self.vllm_tensor_parallel_size < 1:
            raise ConfigError(f"--vllm-tensor-parallel-size must be >= 1, got {self.vllm_tensor_parallel_size}")
        if self.backend == "vllm" and self.device == "cpu":
            raise ConfigError("--backend vllm runs on CUDA GPUs only; use --backend torch on CPU")


@dataclass(frozen=True)
class RunConfig:
    """How a run goes (the engines and the writer): `shard_rows` input rows per committed shard, `workers`
    scoring workers, a Ray address (`ray`), and what to do with an existing output (`resume`, `overwrite`)."""

    shard_rows: int = 1000
    workers: int = 1  # not part of the run key: the output does not depend on it
    ray: str | None = None  # a Ray cluster address, or "local"; None: workers on this machine
    resume: bool = False
    overwrite: bool = False

    def __post_init__(self) -> None:
        if self.resume and self.overwrite:
            raise ConfigError("--resume and --overwrite exclude each other: --resume continues the output in --out, "
                              "--overwrite replaces it; pick one")
        if self.shard_rows < 1:
            raise ConfigError(f"--shard-rows must be >= 1, got {self.shard_rows}")
        if self.workers < 1:
            raise ConfigError(f"--workers must be >= 1, got {self.workers}")


@dataclass(frozen=True)
class ScoreOptions:
    """Every flag of `pear-data score` (docs/design.md section 5), grouped by the stage that reads it."""

    target: str = DEFAULT_TARGET
    behavior: BehaviorSpec = field(default_factory=BehaviorSpec)
    weights: WeightConfig = field(default_factory=WeightConfig)
    tokenize: TokenizeConfig = field(default_factory=TokenizeConfig)
    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    scoring: ScoringConfig = field(default_factory=ScoringConfig)
    run: RunConfig = field(default_factory=RunConfig)
    license: str | None = None
    card_title: str | None = None  # the dataset card's title (None: after the corpus)

    def __post_init__(self) -> None:
        _refuse(_card_title_problems(self.card_title))
        if self.scoring.backend == "vllm" and (self.run.ray or self.run.workers > 1):
            raise ConfigError("--backend vllm (experimental) runs in one process: use --vllm-tensor-parallel-size "
                              "for several GPUs, not --workers or --ray")
        if self.scoring.backend == "vllm" and self.behavior.logprobs_field is None:
            raise ConfigError(
                "--backend vllm scores the target only (vLLM's prompt log-probs are the raw model distribution, at "
                "temperature 1 and top-p 1): give the behavior log-probs with --behavior-logprobs-field, or score "
                "a behavior model with --backend torch")


@dataclass(frozen=True)
class ReweightOptions:
    """`pear-data reweight` beyond the weight flags: shard_rows input rows per output shard, batch_rows rows
    per read, overwrite an existing output, max_length: cut rows by the truncation rule first (None: whole),
    card_title: the dataset card's title (None: after the corpus)."""

    shard_rows: int = 10_000
    batch_rows: int = 1024
    overwrite: bool = False
    max_length: int | None = None
    card_title: str | None = None

    def __post_init__(self) -> None:
        _refuse(_card_title_problems(self.card_title))
        if self.shard_rows < 1 or self.batch_rows < 1:
            raise ConfigError(f"--shard-rows must be >= 1, got {self.shard_rows}")
        if self.max_length is not None and self.max_length < 2:
            raise ConfigError(f"--max-length must be at least 2, got {self.max_length}")


# --------------------------------------------------------------------------- the trainers (design 4.2)


@dataclass(frozen=True)
class TrainingData:
    """What a trainer reads from the dataset and how (`pear_data.training_data.prepare_dataset`).

    mode: "static" (a weight column) or "online" (behavior_logprobs, and shared_boundary).
    weights: the static weight column (a `pear_*_weight` name); None online.
    max_length: the longest row a training sequence may hold; None: no limit (no packing).
    packing: None, "bfd" or "bfd_split" (TRL's strategies that keep rows apart).
    shuffle_seed: shuffle before packing with this seed (TRL's `shuffle_dataset`); None keeps the order.
    """

    mode: Literal["static", "online"]
    weights: str | None = None
    max_length: int | None = None
    packing: Literal["bfd", "bfd_split"] | None = None
    shuffle_seed: int | None = None

    def __post_init__(self) -> None:
        if self.mode not in ("static", "online"):
            raise ConfigError(f"pear_mode must be 'static' or 'online', got {self.mode!r}")
        if self.mode == "static" and self.weights not in WEIGHT_COLUMNS.values():
            raise ConfigError(f"static training needs a weight column ({', '.join(WEIGHT_COLUMNS.values())}), "
                              f"got {self.weights!r}")
        if self.packing is not None and self.packing not in PACKING:
            raise ConfigError(f"packing_strategy={self.packing!r} cannot train on PEAR weights: only "
                              f"{' and '.join(PACKING)} keep every row whole in one sequence")
        if self.packing is not None and self.max_length is None:
            raise ConfigError("packing needs max_length (the length of a packed row)")
        if self.max_length is not None and self.max_length < 2:
            raise ConfigError(f"max_length must be >= 2 (a prompt token and a completion token), got "
                              f"{self.max_length}")

    @property
    def columns(self) -> list[str]:
        """The dataset columns training reads."""
        names = [INPUT_IDS, COMPLETION_MASK]
        names += [self.weights] if self.mode == "static" else [BEHAVIOR_LOGPROBS, SHARED_BOUNDARY]
        return names


# --------------------------------------------------------------------------- looking at an output, acting on it


SHOW_BY = ("weight", "token-weight", "block-weight", "log-ratio", "target", "behavior")


@dataclass(frozen=True)
class ShowOptions:
    """`pear-data show`: which rows (`rows`, `lowest_ess`, `highest`, `where`: one way, or none for the first
    row), what colours the tokens (`by`: SHOW_BY; "weight" is the primary granularity's per-token column), the
    tokenizer that spells the tokens (None: the output's target model), and an HTML page to write."""

    rows: tuple[int, ...] = ()
    lowest_ess: int | None = None
    highest: int | None = None
    where: str | None = None
    by: str = "weight"
    tokenizer: str | None = None
    html: str | None = None
    limit: int = 20

    def __post_init__(self) -> None:
        if self.by not in SHOW_BY:
            raise ConfigError(f"--by must be one of {', '.join(SHOW_BY)}, got {self.by!r}")
        picks = [flag for flag, value in (("--row", self.rows), ("--lowest-ess", self.lowest_ess),
                                          ("--highest", self.highest), ("--where", self.where)) if value]
        if len(picks) > 1:
            raise ConfigError(f"{' and '.join(picks)} each pick rows: give one of them")
        if any(r < 0 for r in self.rows):
            raise ConfigError(f"--row counts from 0, got {min(self.rows)}")
        for flag, value in (("--lowest-ess", self.lowest_ess), ("--highest", self.highest), ("--limit", self.limit)):
            if value is not None and value < 1:
                raise ConfigError(f"{flag} must be >= 1, got {value}")


@dataclass(frozen=True)
class SelectOptions:
    """`pear-data select`: `where` (a polars SQL condition over the columns and the derived ones), then at most
    one of `top_frac` (the ceil(F x n) rows with the largest `by`) and `sample` (N rows drawn without
    replacement, uniformly or, with `by_weight`, with probability proportional to `by`, from `seed`).
    `by` defaults to pear_seq_weight where it is needed. shard_rows: input rows per output shard."""

    where: str | None = None
    top_frac: float | None = None
    by: str | None = None
    sample: int | None = None
    by_weight: bool = False
    seed: int = 0
    shard_rows: int = 10_000
    batch_rows: int = 1024
    overwrite: bool = False

    def __post_init__(self) -> None:
        if self.where is None and self.top_frac is None and self.sample is None:
            raise ConfigError("select needs --where, --top-frac or --sample: say which rows to keep")
        if self.top_frac is not None and self.sample is not None:
            raise ConfigError("--top-frac and --sample exclude each other: give one (--where may go with either)")
        if self.top_frac is not None and not 0.0 < self.top_frac <= 1.0:
            raise ConfigError(f"--top-frac must be in (0, 1], got {self.top_frac}")
        if self.sample is not None and self.sample < 1:
            raise ConfigError(f"--sample must be >= 1, got {self.sample}")
        if self.by_weight and self.sample is None:
            raise ConfigError("--by-weight goes with --sample N (it draws the N rows in proportion to --by)")
        if self.by is not None and self.top_frac is None and not self.by_weight:
            raise ConfigError("--by names the column that --top-frac ranks by or --sample --by-weight draws by")
        if self.shard_rows < 1 or self.batch_rows < 1:
            raise ConfigError(f"--shard-rows must be >= 1, got {self.shard_rows}")

    @property
    def rank_column(self) -> str:
        return self.by or WEIGHT_COLUMNS["sequence"]

    def describe(self) -> dict:
        """The query as the manifest records it."""
        return {"where": self.where, "top_frac": self.top_frac, "sample": self.sample, "by_weight": self.by_weight,
                "by": self.rank_column if (self.top_frac is not None or self.by_weight) else None,
                "seed": self.seed if self.sample is not None else None}


@dataclass(frozen=True)
class RescoreOptions:
    """`pear-data rescore`: the new target (a model spec), how it is scored (`scoring`), and the run
    (`run`: shard_rows, resume, overwrite; one worker)."""

    target: str
    scoring: ScoringConfig = field(default_factory=ScoringConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def __post_init__(self) -> None:
        if self.scoring.backend != "torch":
            raise ConfigError("rescore scores with the torch backend (--backend vllm is not supported here)")
        if self.run.workers != 1 or self.run.ray:
            raise ConfigError("rescore runs one scoring worker: --workers and --ray are not supported here")
