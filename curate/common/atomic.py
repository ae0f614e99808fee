"""Files written so that a reader, a resume or a crash never finds half of one under its name.

Every artefact goes to `.NAME.tmp` beside its final path and is renamed when complete; the run
folder (curate.common.runfolder) treats those temporary names as belonging to their final name.
"""
from __future__ import annotations

import hashlib
import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator


def tmp_path(path: Path) -> Path:
    """`.NAME.tmp` in the same folder: os.replace is atomic only within one filesystem."""
    return path.with_name(f".{path.name}.tmp")


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield `.NAME.tmp` beside `path` to write to; rename it to `path` only if the body succeeds,
    so a reader (or a resume) never sees a half-written file under the final name."""
    tmp = tmp_path(path)
    try:
        yield tmp
    except BaseException:
        tmp.unlink(missing_ok=True)  # a SIGKILL still leaves it: the next write replaces it
        raise
    os.replace(tmp, path)


def write_bytes(path: Path, data: bytes) -> None:
    """`data` under `path`, whole or not at all."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def save_figure(fig: Any, path: Path, dpi: int = 90) -> Path:
    """A matplotlib figure as PNG under `path`, whole or not at all."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, format="png")
    return path


def write_json(path: Path, obj: Any) -> None:
    """JSON written atomically, keys sorted so the same content gives the same bytes."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def file_sha256(path: Path) -> str:
    """sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fsync_dir(folder: Path) -> None:
    """Make a rename inside `folder` durable."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def jsonable(obj: Any) -> Any:
    """`obj` in the form it has once written to JSON and read back (paths -> str, tuples ->
    lists): what a config compares equal to after a round trip through config.json."""
    return json.loads(json.dumps(obj, default=str))


def read_json_object(path: Path, missing: str) -> dict[str, Any]:
    """A JSON object from `path`. FileNotFoundError with `missing` (what the caller expected
    there) when it is not a file; ValueError naming the file when it is not a JSON object."""
    if not path.is_file():
        raise FileNotFoundError(f"{path.parent}: no {path.name}; {missing}")
    try:
        obj = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(obj, dict):
        raise ValueError(f"{path} is not a JSON object")
    return obj
