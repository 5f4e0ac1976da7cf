"""The output directory: its names, and what a directory is (docs/design.md 2.3 and 6, "Ownership").

    OUT/data/part-00000.parquet ...   output rows; row order = input order across parts
    OUT/rejects.parquet               only if any rejects; sorted by row_index
    OUT/manifest.json                 sorted keys, indent 2, no timestamps
    OUT/README.md                     the dataset card (pear_data.card)
    OUT/.pear/                        resume state and the lock; never uploaded

Every manifest.json and progress.json pear-data writes carries `tool` = {"name": "pear-data", "version",
"format": OUTPUT_FORMAT}; progress.json also has its own `format` (PROGRESS_FORMAT). A directory is a pear-data
output only when one of them says so (or it holds nothing but an interrupted start, `inspect_output`);
`--overwrite` deletes only the names in `OWN_NAMES`. `check_output_apart` refuses an output that is, contains or
lies inside an input.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import OutputError, UsageError

DATA_DIR = "data"

STATE_DIR = ".pear"

PROGRESS_FILE = "progress.json"

MANIFEST_FILE = "manifest.json"

CARD_FILE = "README.md"

REJECTS_FILE = "rejects.parquet"

LOCK_FILE = "lock"

TOOL_NAME = "pear-data"

PROGRESS_FORMAT = "pear-data/progress/1"

OUTPUT_FORMAT = "pear-data/output/1"  # the layout of docs/design.md section 2; bump on an incompatible change

DATA_NAME = re.compile(r"^part-(\d{5,})\.parquet$")

REJECTS_NAME = re.compile(r"^rejects-(\d{5,})\.parquet$")

DATA_FILE = re.compile(r"^data/part-\d{5,}\.parquet$")  # a shard record's data_file


# Every name this module writes, per folder (temps included): what --overwrite may delete.
OWN_NAMES = {
    "": re.compile(r"^\.?(rejects\.parquet|manifest\.json|README\.md)(\.tmp)?$"),
    DATA_DIR: re.compile(r"^\.?part-\d{5,}\.parquet(\.tmp)?$"),
    STATE_DIR: re.compile(
        r"^(\.?progress\.json(\.tmp)?|lock|\.?rejects-\d{5,}\.parquet(\.tmp)?|shard-\d{5,}(-\d+)?\.parquet\.tmp)$"
    ),
}


def tool_record() -> dict:
    """The `tool` entry of every manifest.json and progress.json: who wrote the output, in which format."""
    from .. import __version__

    return {"name": TOOL_NAME, "version": __version__, "format": OUTPUT_FORMAT}


@dataclass
class OutputState:
    """What `inspect_output` found in OUT.

    kind:   "absent" (no OUT), "empty", "unused" (pear-data started there but committed nothing:
            nothing to keep), "ours" (a pear-data output: its manifest or its resume state says so),
            "foreign" (anything else: never written to)
    reason: for "foreign", why it is not recognized
    """

    kind: str
    reason: str = ""
    entries: list[str] = field(default_factory=list)
    progress: dict | None = None  # .pear/progress.json, when it is ours
    manifest: bool = False  # manifest.json is ours


def load_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        return None


def is_own_tool(value: Any) -> bool:
    tool = value.get("tool") if isinstance(value, dict) else None
    return (isinstance(tool, dict) and tool.get("name") == TOOL_NAME
            and isinstance(tool.get("format"), str) and tool["format"].startswith(f"{TOOL_NAME}/output/"))


def names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


def stray_files(out_dir: str | Path) -> list[str]:
    """Files in OUT/data/ and OUT/.pear/ that pear-data does not write (an overwrite would lose them)."""
    out_dir = Path(out_dir)
    strays = []
    for folder in (DATA_DIR, STATE_DIR):
        for name in names(out_dir / folder):
            if not (OWN_NAMES[folder].match(name) and (out_dir / folder / name).is_file()):
                strays.append(f"{folder}/{name}")
    return strays


def inspect_output(out_dir: str | Path) -> OutputState:
    """Classify OUT without changing anything (see OutputState)."""
    out_dir = Path(out_dir)
    if not out_dir.exists():
        return OutputState("absent")
    entries = names(out_dir)
    if not entries:
        return OutputState("empty")
    progress_path = out_dir / STATE_DIR / PROGRESS_FILE
    progress = load_json(progress_path) if progress_path.is_file() else None
    if not (isinstance(progress, dict) and str(progress.get("format", "")).startswith(f"{TOOL_NAME}/progress/")):
        progress = None
    manifest_path = out_dir / MANIFEST_FILE
    manifest = is_own_tool(load_json(manifest_path)) if manifest_path.is_file() else False
    state = OutputState("ours", entries=entries, progress=progress, manifest=manifest)
    if progress is None and not manifest:
        # An interrupted start: the lock (and an empty data/), nothing else.
        started = (set(entries) <= {STATE_DIR, DATA_DIR} and not names(out_dir / DATA_DIR)
                   and set(names(out_dir / STATE_DIR)) <= {LOCK_FILE, f".{PROGRESS_FILE}.tmp"}
                   and (out_dir / STATE_DIR).is_dir())
        if started:
            state.kind = "unused"
            return state
        state.kind = "foreign"
        if manifest_path.is_file():
            state.reason = (f"its {MANIFEST_FILE} was not written by pear-data: no tool record of format "
                            f"{TOOL_NAME}/output/N")
        elif progress_path.is_file():
            state.reason = f"its {STATE_DIR}/{PROGRESS_FILE} is unreadable or not pear-data's"
        else:
            state.reason = f"no pear-data {MANIFEST_FILE} or {STATE_DIR}/{PROGRESS_FILE}"
        return state
    if (progress is not None and not progress.get("shards") and not progress.get("finished")
            and not manifest_path.exists() and not stray_files(out_dir)):
        state.kind = "unused"  # started, stopped before its first shard (a model that did not load, ...)
    return state


def check_output_apart(inputs: list[str | Path], out_dir: str | Path, what: str = "the input") -> None:
    """UsageError when OUT is an input, lies inside one, or contains one (symlinks resolved).

    Writing there would replace or mix with what is being read: `--overwrite` would delete the input
    before it is read. Called before anything is written.
    """
    out = check_out_path(out_dir)
    for item in inputs:
        src = Path(item).resolve()
        if out == src or src in out.parents or out in src.parents:
            relation = ("is" if out == src else "lies inside" if src in out.parents else "contains")
            raise UsageError(
                f"--out {out_dir} {relation} {what} {item}: pear-data never writes where it reads "
                "(--overwrite would delete the input before reading it). Choose an --out outside the input."
            )


def check_out_path(out_dir: str | Path) -> Path:
    """--out with its symbolic links resolved; OutputError naming the link when one on the way leads nowhere.

    A link that goes round a loop (which `Path.resolve` reports as a RuntimeError, or ELOOP), or that points
    to a path that does not exist (which `mkdir` would report as "File exists"), cannot hold an output.
    """
    out = Path(out_dir)
    try:
        resolved = out.resolve()
    except (RuntimeError, OSError) as exc:
        raise OutputError(f"--out {out_dir}: the path goes round a loop of symbolic links ({exc}); fix or remove "
                          "the link, or choose another --out") from None
    for link in (out, *out.parents):
        if link.is_symlink() and not link.exists():
            raise OutputError(f"--out {out_dir}: {link} is a symbolic link to {os.readlink(link)}, which does not "
                              "exist; create the directory it points to, remove the link, or choose another --out")
    return resolved
