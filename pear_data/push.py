"""`pear-data push DIR REPO_ID`: upload a finished output to a Hub dataset repo.

What is uploaded: README.md (the card), manifest.json, rejects.parquet (if
any) and the data files listed in the manifest. Never `.pear/` (resume state)
nor any other file a user left in DIR. On the Hub, remote `data/*` files and
`rejects.parquet` that this upload does not contain are deleted in the same
commit, so re-pushing a smaller run leaves no stale shards behind.

The token comes from huggingface_hub's usual places (`token=`, HF_TOKEN, the
`hf auth login` file); it is never printed or stored in a result.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pear_data.dataset import finished_manifest
from pear_data.errors import PushError, UnfinishedOutputError
from pear_data.output import CARD_FILE, DATA_DIR, MANIFEST_FILE, REJECTS_FILE, STATE_DIR, read_manifest

REPO_TYPE = "dataset"


@dataclass(frozen=True)
class PushFile:
    """One file to upload: its path in the repo (= relative to DIR), size in bytes, sha256 hex."""

    path_in_repo: str
    size: int
    sha256: str


@dataclass
class PushResult:
    """What was (or, with dry_run, would be) uploaded. `commit_url` is None on a dry run."""

    repo_id: str
    private: bool
    dry_run: bool
    files: list[PushFile]
    repo_type: str = REPO_TYPE
    commit_url: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)

    def describe(self) -> str:
        """Human-readable plan/result, one file per line (what `pear-data push --dry-run` prints)."""
        head = "would upload" if self.dry_run else "uploaded"
        lines = [
            f"{head} {len(self.files)} files, {self.total_bytes} bytes, to {self.repo_id} "
            f"(repo type {self.repo_type}, private={self.private})"
        ]
        lines += [f"  {f.path_in_repo}  {f.size} bytes  sha256:{f.sha256}" for f in self.files]
        if self.commit_url:
            lines.append(f"commit: {self.commit_url}")
        return "\n".join(lines)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def plan_push(out_dir: str | Path) -> list[PushFile]:
    """The files `push` uploads, sorted by path. PushError if DIR is not a finished, complete output.

    Finished means what it means for every reader of an output (`dataset.check_finished`): no other process
    is writing DIR, manifest.json exists and, when DIR has resume state, `.pear/progress.json` says finished
    (an output downloaded from the Hub has no `.pear/`). Complete means: README.md and every data file the
    manifest lists exist, and rejects.parquet exists iff the manifest counts rejects.
    Intact means: each data file's Parquet footer counts the rows its shard
    record in the manifest says (`rows_out`), and rejects.parquet counts
    `rows.rejected` (a truncated or replaced file is never published).
    """
    out_dir = Path(out_dir)
    try:
        manifest = finished_manifest(out_dir)
    except UnfinishedOutputError as exc:
        raise PushError(f"{exc} Then push.") from None
    paths = [CARD_FILE, MANIFEST_FILE]
    paths += [s["data_file"] for s in manifest.get("shards", []) if s.get("data_file")]
    if (manifest.get("rows") or {}).get("rejected"):
        paths.append(REJECTS_FILE)
    elif (out_dir / REJECTS_FILE).exists():
        raise PushError(f"{out_dir}/{REJECTS_FILE} exists but the manifest counts no rejects; rerun with --overwrite")
    missing = [p for p in paths if not (out_dir / p).is_file()]
    if missing:
        raise PushError(f"{out_dir} is incomplete, missing: {', '.join(missing)}. {AGAIN}")
    if not any(p.startswith(f"{DATA_DIR}/") for p in paths):
        raise PushError(f"{out_dir} has no data files (every row was rejected); nothing to push")
    expected = {s["data_file"]: s.get("rows_out") for s in manifest.get("shards", []) if s.get("data_file")}
    if REJECTS_FILE in paths:
        expected[REJECTS_FILE] = (manifest.get("rows") or {}).get("rejected")
    for path, rows in expected.items():
        found = _parquet_rows(out_dir / path, path)
        if rows is not None and found != rows:
            raise PushError(
                f"{out_dir}/{path} holds {found} rows, but {MANIFEST_FILE} records {rows} for it: the file was "
                f"truncated or replaced after the run, and would publish other data than the card describes. {AGAIN}"
            )
    return [PushFile(p, (out_dir / p).stat().st_size, _sha256(out_dir / p)) for p in sorted(paths)]


AGAIN = "Write the output again (`score` with --resume or --overwrite, `reweight` with --overwrite), then push."


def _parquet_rows(path: Path, name: str) -> int:
    """Row count from the Parquet footer (no data read); PushError naming the file when it is not Parquet."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return pq.read_metadata(path).num_rows
    except (OSError, pa.ArrowException) as exc:
        raise PushError(f"{path}: not a readable Parquet file ({exc}); the file is damaged or truncated. "
                        f"{AGAIN}") from None



def push(
    out_dir: str | Path,
    repo_id: str,
    *,
    private: bool = False,
    dry_run: bool = False,
    token: str | None = None,
    commit_message: str | None = None,
    api: Any = None,
) -> PushResult:
    """Upload DIR to the Hub dataset repo `repo_id` (created if missing); returns what was uploaded.

    `dry_run=True` validates DIR and `repo_id`, hashes the files and returns
    the plan without any network access. `api` is an `HfApi`-compatible object
    (default `HfApi(token=token)`), e.g. for a custom endpoint.
    """
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as exc:
        raise PushError(f"invalid repo id {repo_id!r}: {exc}. Use NAMESPACE/NAME, e.g. my-org/my-sft-pear") from exc
    if "/" not in repo_id:
        raise PushError(f"repo id {repo_id!r} needs a namespace: NAMESPACE/NAME, e.g. my-org/{repo_id}")
    files = plan_push(out_dir)
    result = PushResult(repo_id=repo_id, private=private, dry_run=dry_run, files=files)
    if dry_run:
        return result

    if api is None:
        from huggingface_hub import HfApi

        api = HfApi(token=token)
    manifest = read_manifest(out_dir)
    rows = (manifest.get("rows") or {}).get("out", "?")
    n_data = sum(f.path_in_repo.startswith(f"{DATA_DIR}/") for f in files)
    try:
        api.create_repo(repo_id, repo_type=REPO_TYPE, private=private, exist_ok=True)
        info = api.upload_folder(
            folder_path=str(out_dir),
            repo_id=repo_id,
            repo_type=REPO_TYPE,
            allow_patterns=[f.path_in_repo for f in files],
            ignore_patterns=[f"{STATE_DIR}/*"],
            delete_patterns=[f"{DATA_DIR}/*", REJECTS_FILE],
            commit_message=commit_message or f"pear-data: {rows} rows in {n_data} Parquet shards",
        )
    except Exception as exc:  # noqa: BLE001 - the network, the Hub or the token: all for the user to fix
        raise PushError(
            f"push to {repo_id} failed: {type(exc).__name__}: {exc}. The upload is one commit, so the repo holds "
            "either all of it or none of it. Check the network and the token (HF_TOKEN or `hf auth login`; "
            "a write token for that namespace), then run push again."
        ) from None
    result.commit_url = getattr(info, "commit_url", None) or (str(info) if info is not None else None)
    return result
