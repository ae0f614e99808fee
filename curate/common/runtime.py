"""Run-time facts and process hygiene: package versions, the device, safe weight loading, and
workers that do not outlive their run."""
from __future__ import annotations

import ctypes
import os
import pickle
import platform
import signal
import sys
from pathlib import Path
from typing import Any

import torch

from curate import __version__
from curate.common.atomic import atomic_path
from curate.common.dist import Dist


def versions() -> dict[str, str]:
    """Versions that can change a result, for every manifest."""
    import polars
    import pyarrow
    import timm

    return {"curate": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "timm": timm.__version__, "polars": polars.__version__, "pyarrow": pyarrow.__version__}


def resolve_device(name: str) -> torch.device:
    """"auto" -> cuda when available, else cpu; a named CUDA device must exist (checked before
    a job writes anything, so a wrong --device leaves no half-made run behind)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise ValueError(f"--device {name!r}: not a device name (auto, cpu, cuda, cuda:N)") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def rank_device(name: str, group: Dist) -> torch.device:
    """`resolve_device`, with plain "cuda" meaning this rank's own GPU when there are several ranks."""
    device = resolve_device(name)
    if group.enabled and device.type == "cuda" and device.index is None:
        return torch.device("cuda", group.local_rank)
    return device


def load_weights(path: Path, map_location: Any = "cpu") -> Any:
    """`torch.load(path, weights_only=True)`: tensors and plain containers only, never code. A file
    that holds other Python objects, or is not a torch file at all, is a ValueError naming it."""
    with open(path, "rb") as f:
        head = f.read(4)
    if head != b"PK\x03\x04" and head[:1] != b"\x80":  # torch.save writes a zip; before 1.6, a pickle
        raise ValueError(f"{path}: not a torch checkpoint (torch.save writes a zip archive; this file is neither "
                         "that nor a pickle)")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{path}: refused: not a weights-only checkpoint (it holds Python objects "
                         f"that loading would run): {first}") from e
    except OSError:
        raise  # the file itself: missing, unreadable (the message names it)
    except Exception as e:  # noqa: BLE001 - any other failure on foreign bytes (KeyError, EOFError, ...)
        raise ValueError(f"{path}: not a readable torch checkpoint ({type(e).__name__}: {e})") from e


def save_weights(obj: Any, path: Path) -> None:
    """torch.save, temp-then-rename (a full disk never leaves half a checkpoint under its name),
    through a file object: torch then names its zip folder "archive", not after the file, so the
    bytes (and the sha256 a manifest records) do not depend on the temporary name."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        torch.save(obj, f)


_PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """In a worker process (DataLoader, shard writer): ask Linux to kill it when its parent dies,
    so a run killed with SIGKILL leaves no worker behind that still reads, writes or holds files."""
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() == 1:  # the parent died before the request took effect
        os._exit(1)
