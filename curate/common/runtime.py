"""Run-time facts jobs record or decide once: package versions and the device to use."""
from __future__ import annotations

import platform

import torch

from curate import __version__
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
