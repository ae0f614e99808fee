"""The run folder: one set of rules for every command that writes an `--out` (score, shard,
train, demo), so that no run mixes with another and nothing of the user's is ever deleted.

- A fresh run needs an empty (or missing) folder. A non-empty one needs `--resume` (continue the
  same run: same command, same settings) or `--overwrite` (replace a previous run of the same
  command).
- The run records what it owns in `.curate-run.json`: the command, and every file it writes,
  claimed BEFORE the file is written, so a killed run still owns its half-written files.
  `--overwrite` deletes exactly those (and their `.NAME.tmp` leftovers), and refuses when the
  folder holds anything else: a user's file is never deleted, not even one that happens to be
  named like an output.
- `--out` may not be a source folder nor lie inside one.
- One lock per folder (`.curate-run.lock`, flock): a second run on the same folder is refused
  while the first holds it; the kernel releases it when the process dies, even by SIGKILL.
- Jobs check everything that can fail (device, model name, inputs) before they open the folder,
  so a failed start leaves nothing behind that blocks the corrected rerun.

A folder may own whole child run folders (`claim_run`): the demo's `scores-cnn/` is a
`curate score` run of its own, and the demo's overwrite goes through that folder's own record.
"""
from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path
from typing import Any, Collection, Iterable, Sequence

from curate.common.atomic import write_json

MARKER = ".curate-run.json"
LOCK = ".curate-run.lock"
MARKER_VERSION = 1
MODES = ("fresh", "resume", "overwrite")
CONFIG = "config.json"


# Lock descriptors this process holds. A forked child (a DataLoader or shard-writer worker)
# inherits them, and a flock lives until every copy is closed: were it kept, a worker that
# outlives a killed run for a moment would still hold the folder. Children close their copies.
_HELD_LOCKS: set[int] = set()


def _close_inherited_locks() -> None:
    for fd in _HELD_LOCKS:
        try:
            os.close(fd)  # not LOCK_UN: that would release the parent's lock too
        except OSError:
            pass
    _HELD_LOCKS.clear()


os.register_at_fork(after_in_child=_close_inherited_locks)


class RunFolderError(ValueError):
    """The folder cannot be used for this run; the message says why and what to do."""


def mode_of(resume: bool, overwrite: bool) -> str:
    if resume and overwrite:
        raise ValueError("--resume and --overwrite exclude each other")
    return "resume" if resume else "overwrite" if overwrite else "fresh"


class RunFolder:
    """An `--out` folder held by one run. Open with `RunFolder.open`; close (or use `with`)
    to release the lock."""

    def __init__(self, root: Path, command: str, owned: Iterable[str] = (), runs: Iterable[str] = ()):
        self.root, self.command = Path(root), command
        self.owned: set[str] = set(owned)  # relative paths of files this command wrote
        self.runs: set[str] = set(runs)  # child run folders, relative
        self._lock_fd: int | None = None

    # --- opening ----------------------------------------------------------------------------

    @classmethod
    def open(cls, root: Path, command: str, mode: str, config: dict[str, Any] | None = None,
             free: Collection[str] = (), sources: Sequence[Path] = ()) -> "RunFolder":
        """Take `root` for a run of `command` in `mode` (fresh | resume | overwrite).

        `config` is written to config.json (fresh, overwrite) or compared with it (resume, all
        keys but `free`, the settings that may change between a run and its resume). `sources`
        are folders the run reads: `root` may not be one of them nor lie inside one.
        """
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        root = Path(root)
        _check_not_a_source(root, sources)
        _check_usable(root, command, mode)  # before the lock: a refused run creates nothing
        root.mkdir(parents=True, exist_ok=True)
        folder = cls(root, command)
        folder._lock()
        try:
            state = _check_usable(root, command, mode)  # again, now that no other run can change it
            folder._start(state, mode, config, free)
        except BaseException:
            folder.close()
            raise
        return folder

    def _start(self, state: str, mode: str, config: dict[str, Any] | None, free: Collection[str]) -> None:
        if state == "ours" and mode == "resume":
            previous = _read_marker(self.root)
            self.owned, self.runs = set(previous["owned"]), set(previous["runs"])
            if config is not None:
                _check_same_config(self.root / CONFIG, config, free)
            return
        if state == "ours":  # overwrite
            remove_owned(self.root)
        self._write_marker()
        if config is not None:
            write_json(self.claim(CONFIG), config)

    def _lock(self) -> None:
        fd = os.open(self.root / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise RunFolderError(f"{self.root} is in use by another curate run (it holds {LOCK}); "
                                 "wait for it to finish or choose another --out") from None
        self._lock_fd = fd
        _HELD_LOCKS.add(fd)

    def close(self) -> None:
        if self._lock_fd is not None:
            _HELD_LOCKS.discard(self._lock_fd)
            os.close(self._lock_fd)  # closing the last descriptor releases the flock
            self._lock_fd = None

    def __enter__(self) -> "RunFolder":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- owning -----------------------------------------------------------------------------

    def claim(self, *names: str) -> Path:
        """Record files (relative paths) as this run's before writing them; returns the path of
        the first. Recording is one atomic rewrite of the marker, so claim many at once."""
        new = {_relative(n) for n in names} - self.owned
        if new:
            self.owned |= new
            self._write_marker()
        return self.root / names[0] if names else self.root

    def claim_many(self, names: Iterable[str]) -> None:
        names = list(names)
        if names:
            self.claim(*names)

    def claim_run(self, name: str) -> Path:
        """A child folder that is a run folder of its own (its marker says what it owns)."""
        name = _relative(name)
        if name not in self.runs:
            self.runs.add(name)
            self._write_marker()
        return self.root / name

    def _write_marker(self) -> None:
        write_json(self.root / MARKER, {"command": self.command, "marker_version": MARKER_VERSION,
                                        "owned": sorted(self.owned), "runs": sorted(self.runs)})


# --- the rules ------------------------------------------------------------------------------


def _check_not_a_source(root: Path, sources: Sequence[Path]) -> None:
    if root.exists() and not root.is_dir():
        raise RunFolderError(f"--out {root} is a file, not a folder")
    out = root.resolve()
    for source in sources:
        src = Path(source).resolve()
        if out == src or src in out.parents:
            raise RunFolderError(f"--out {root} is the input folder {source} or lies inside it: "
                                 "write outputs somewhere else, so the input stays as it was")


def _check_usable(root: Path, command: str, mode: str) -> str:
    """"empty" or "ours" (a previous run of `command` that `mode` may continue or replace);
    anything else is refused with a message that says what to do."""
    entries = _contents(root)
    if not entries:
        return "empty"
    marker = _read_marker(root)
    if marker is None:
        raise RunFolderError(f"{root} is not empty and holds no curate run (it holds {_names(entries)}): "
                             "choose an empty or new --out; curate never deletes files it did not write")
    if marker["command"] != command:
        raise RunFolderError(f"{root} holds a `curate {marker['command']}` run, not `curate {command}`: "
                             "choose another --out")
    if mode == "fresh":
        raise RunFolderError(f"{root} is not empty (a previous `curate {command}` run): pass --resume to "
                             "continue that run or --overwrite to replace its files")
    if mode == "overwrite":
        foreign = foreign_files(root)
        if foreign:
            raise RunFolderError(f"--overwrite refused: {root} holds {len(foreign)} file(s) the previous run "
                                 f"did not write, e.g. {_names(foreign)}; move them away or choose another "
                                 "--out (curate deletes only its own files)")
    return "ours"


def _contents(root: Path) -> list[Path]:
    """Files (and symlinks) anywhere under `root`, but its lock: a folder of empty folders is
    empty (nothing in it could be lost, and curate deletes no folder it did not fill)."""
    if not root.is_dir():
        return []
    found = []
    for folder, dirs, files in os.walk(root):
        found += [Path(folder) / f for f in files if Path(folder) / f != root / LOCK]
        found += [Path(folder) / d for d in dirs if os.path.islink(os.path.join(folder, d))]
        if found:
            break  # one is enough to say "not empty"
        dirs[:] = [d for d in dirs if not os.path.islink(os.path.join(folder, d))]
    return found


def _read_marker(root: Path) -> dict[str, Any] | None:
    path = root / MARKER
    if not path.is_file():
        return None
    try:
        marker = json.loads(path.read_text())
        if not isinstance(marker, dict) or not isinstance(marker.get("command"), str):
            raise ValueError("not a run record")
        marker.setdefault("owned", [])
        marker.setdefault("runs", [])
        return marker
    except (OSError, ValueError) as e:
        raise RunFolderError(f"{path} is damaged ({e}): curate cannot tell which files it owns; "
                             "choose another --out") from e


def check_output_file(path: Path, option: str, overwrite: bool, inputs: Sequence[Path] = ()) -> None:
    """The rules of an `--out` folder for a command that writes one file (`curate predict`),
    checked before any work: the file's folder exists, the path is not a folder, an existing file
    is replaced only with --overwrite, and never one of `inputs` (files, or folders whose every
    file is an input) nor anything inside an input folder, --overwrite or not."""
    path = Path(path)
    if not path.parent.is_dir():
        raise RunFolderError(f"{option} {path}: the folder {path.parent} does not exist; create it first")
    if path.is_dir():
        raise RunFolderError(f"{option} {path} is a folder; give a file name")
    real = os.path.realpath(path)
    for source in inputs:
        theirs = os.path.realpath(source)
        if real == theirs or (os.path.isdir(theirs) and real.startswith(theirs.rstrip(os.sep) + os.sep)):
            raise RunFolderError(f"{option} {path} is an input or inside an input folder ({source}): "
                                 "it is never written; choose a path outside the inputs")
    if (path.exists() or path.is_symlink()) and not overwrite:
        raise RunFolderError(f"{option} {path} exists; pass --overwrite to replace it")


def written_by(root: Path) -> str | None:
    """The command whose run folder `root` is ("score", "shard", "train", ...), or None: lets a
    reader given the wrong kind of folder say what it was given instead of what is missing."""
    marker = _read_marker(Path(root)) if Path(root).is_dir() else None
    return marker["command"] if marker is not None else None


def wrong_kind(root: Path, expected: str, hint: str) -> str:
    """"ROOT is the output of `curate X`, not of `curate EXPECTED`: HINT", or "" when `root` is
    not another command's run folder."""
    command = written_by(root)
    if command is None or command == expected:
        return ""
    return f"{root} is the output of `curate {command}`, not of `curate {expected}`: {hint}"


def _check_same_config(path: Path, config: dict[str, Any], free: Collection[str]) -> None:
    if not path.is_file():
        return  # killed before its config was written: nothing ran that could differ
    old = json.loads(path.read_text())
    new = json.loads(json.dumps(config, default=str))  # the form config.json has (tuples -> lists)
    diff = sorted(k for k in set(old) | set(new) if k not in free and old.get(k) != new.get(k))
    if diff:
        raise RunFolderError(f"cannot resume: settings differ from the run in {path.parent}: "
                             f"{', '.join(diff)}; use the same settings, or --overwrite to start over")


def owned_paths(root: Path) -> set[Path]:
    """Every path the run in `root` (and its child runs) owns, including its bookkeeping files
    and the temporary names of its outputs."""
    marker = _read_marker(root)
    if marker is None:
        return set()
    paths = {root / MARKER, root / LOCK, root / f".{MARKER}.tmp"}
    for name in marker["owned"]:
        path = root / name
        paths |= {path, path.with_name(f".{path.name}.tmp")}
    for name in marker["runs"]:
        paths |= owned_paths(root / name)
    return paths


def foreign_files(root: Path) -> list[Path]:
    """Files (and other non-folders) under `root` that no run record claims, sorted."""
    owned = owned_paths(root)
    found = []
    for folder, dirs, files in os.walk(root):
        dirs.sort()
        for name in sorted(files) + [d for d in dirs if os.path.islink(os.path.join(folder, d))]:
            path = Path(folder) / name
            if path not in owned:
                found.append(path)
        dirs[:] = [d for d in dirs if not os.path.islink(os.path.join(folder, d))]  # never walk out
    return sorted(found)


def remove_owned(root: Path) -> None:
    """Delete what the run in `root` owns (child runs included), then the folders that held
    only those files; keep the lock. Callers have checked that nothing foreign is there."""
    lock = root / LOCK
    owned = owned_paths(root)
    for path in owned:
        if path != lock and (path.is_file() or path.is_symlink()):
            path.unlink()
    parents = {parent for path in owned for parent in path.parents if root in parent.parents}
    for folder in sorted(parents, key=lambda p: len(p.parts), reverse=True):  # deepest first
        if folder.is_dir() and not folder.is_symlink() and not any(folder.iterdir()):
            folder.rmdir()


def _relative(name: str) -> str:
    path = Path(name)
    if path.is_absolute() or ".." in path.parts or not path.parts:
        raise ValueError(f"a run owns paths inside its folder, got {name!r}")
    return path.as_posix()


def _names(paths: Sequence[Path], shown: int = 3) -> str:
    text = ", ".join(p.name for p in paths[:shown])
    return text + (", ..." if len(paths) > shown else "")
