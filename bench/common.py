"""What the scripts under bench/throughput, bench/experiments and bench/tools share. Each starts with

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/, for common
    import common

and importing this module puts the checkout's root first on sys.path: a script measures the code beside it
(curate, sparsevit, cli.py, tests) and `commit()` names that code, whatever copy of curate is installed.
"""
from __future__ import annotations

import argparse
import io
import itertools
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Iterator, Sequence

ROOT = Path(__file__).resolve().parents[1]
if sys.path[0] != str(ROOT):
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from curate.score.proxies import create_model, resolve_recipe  # noqa: E402
from curate.shard import format as fmt  # noqa: E402
from curate.shard.plan import plan_shards  # noqa: E402
from curate.shard.writer import write_split  # noqa: E402
from sparsevit.data import Batch  # noqa: E402
from sparsevit.train import Run, train_loader  # noqa: E402

# --- the command line ---------------------------------------------------------------------------------------------


def parser(doc: str | None) -> argparse.ArgumentParser:
    """An argument parser whose --help prints the script's docstring as written."""
    return argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)


def int_options(ap: argparse.ArgumentParser, **defaults: int) -> None:
    """An integer option `--a-name` for each keyword `a_name`, with the keyword's value as its default."""
    for name, default in defaults.items():
        ap.add_argument(f"--{name.replace('_', '-')}", type=int, default=default, help=f"default {default}")


def words(text: str) -> list[str]:
    """A comma-separated option: "a, b" -> ["a", "b"]."""
    return [w.strip() for w in text.split(",") if w.strip()]


def floats(text: str) -> list[float]:
    return [float(w) for w in words(text)]


def ints(text: str) -> list[int]:
    return [int(w) for w in words(text)]


def seed_root(text: str) -> tuple[int, Path]:
    """SEED:ROOT, e.g. `--data 1:demo-s1`: a demo (or the same layout) and the seed to train it with."""
    seed, _, root = text.partition(":")
    return int(seed), Path(root)


def cli(*args: object) -> list[str]:
    """The command line of `curate ARGS` from this checkout's cli.py, in a process of its own."""
    return [sys.executable, str(ROOT / "cli.py"), *map(str, args)]


# --- what a result is recorded with -------------------------------------------------------------------------------


def commit() -> str:
    """The checkout's commit (short), or "unknown" outside a git checkout (a copied tree)."""
    proc = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    return proc.stdout.strip() if proc.returncode == 0 else "unknown"


def machine(device: torch.device | None = None) -> str:
    """Where the figures come from: the GPU's name or the CPU architecture, cores, torch threads and version."""
    where = torch.cuda.get_device_name(device) if device is not None and device.type == "cuda" else platform.machine()
    return (f"{where}, {os.cpu_count()} CPU cores, {torch.get_num_threads()} torch threads, "
            f"torch {torch.__version__}")


def header(*settings: str, device: torch.device | None = None) -> str:
    """The `# ...` line every benchmark prints above its table: machine, commit, then the run's settings."""
    return "# " + ", ".join([machine(device), f"commit {commit()}", *settings])


# --- inputs -------------------------------------------------------------------------------------------------------


def random_proxy(path: Path, classes: int, proxy: str = "demo-vit", img_size: int | None = None) -> torch.nn.Module:
    """A proxy with seeded random weights, saved at `path` as the state dict `curate score --checkpoint`
    reads: speed and memory do not depend on what the weights learned."""
    torch.manual_seed(0)
    model = create_model(resolve_recipe(proxy, img_size), classes)
    torch.save(model.state_dict(), path)
    return model


def make_photos(root: Path, n: int, classes: int = 4) -> None:
    """Photo-sized JPEGs (500x375) in ImageFolder layout (`root/c{k}/img_{i}.JPEG`), textured so that a file
    weighs about what ImageNet's typical one does (140 GB / 1.28M images)."""
    rng = np.random.default_rng(0)
    for i in range(n):
        folder = root / f"c{i % classes}"
        folder.mkdir(parents=True, exist_ok=True)
        base = rng.uniform(0, 255, size=(6, 8, 3)).astype(np.uint8)
        img = Image.fromarray(base).resize((500, 375), Image.BICUBIC)
        noisy = np.asarray(img, np.float32) + rng.normal(0, 20, (375, 500, 3))  # texture -> file size
        buf = io.BytesIO()
        Image.fromarray(noisy.clip(0, 255).astype(np.uint8)).save(buf, "JPEG", quality=92)
        (folder / f"img_{i:05d}.JPEG").write_bytes(buf.getvalue())


def write_bench_shards(src: Path, out: Path, grid: int = 14, per_shard: int = 64, max_side: int | None = None,
                       quality: int = 90, workers: int = 2) -> Path:
    """`make_photos` output as `curate shard` writes it, each with a random importance map; with
    `max_side`, images shipped as `curate shard --max-side` ships them."""
    files = sorted(src.rglob("*.JPEG"))
    rng = np.random.default_rng(0)
    maps = {f.stem: rng.random((grid, grid)).astype(np.float32) for f in files}
    labels = {f.stem: int(f.parent.name[1:]) for f in files}
    paths = {f.stem: f for f in files}
    plan = plan_shards(sorted(paths), "train", per_shard, 4, 0)

    def load(keys: Sequence[str]) -> Iterator[fmt.SampleData]:
        for k in keys:
            data, meta = paths[k].read_bytes(), {}
            if max_side is not None:
                data, meta = fmt.reduce_image(k, data, max_side, quality)
            yield fmt.SampleData(k, data, labels[k], meta, maps[k])

    infos = {"train": write_split(out, plan, load, resume=False, progress=False, workers=workers)}
    fmt.write_index(out, "bench", infos, {"train": True}, num_classes=max(labels.values()) + 1)
    return out


# --- timing -------------------------------------------------------------------------------------------------------


def endless(run: Run, split: fmt.Split) -> Iterator[Batch]:
    """`curate train`'s own loader (sparsevit.train.train_loader) across epochs: the benchmark decides
    when to stop."""
    for epoch in itertools.count():
        yield from train_loader(run, split, epoch)[0]


def sync(device: torch.device) -> None:
    """Wait for the device's queued work, so that a clock read after it counts that work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
