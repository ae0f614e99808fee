"""Training images/s of a timm ViT from curated shards: dense vs token dropping (and sparse
attention), loader included, as ratios measured in one run.

Every setting runs the real `curate train` step (sparsevit.train.train_step) fed by the real
shard loader (decode + RandomResizedCrop + flip, with the importance map re-projected through
the same crop and pooled to the patch grid) in its own worker processes. Settings are run in
interleaved rounds and the best round of each is kept, so drift on a shared machine hits all
settings alike. Ratio = setting img/s / dense img/s.

    python bench/throughput/train_step.py [--model deit_tiny_patch16_224] [--img-size 224] [--batch-size 64]
"""
from __future__ import annotations

import argparse
import itertools
import platform
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from score_throughput import make_photos  # noqa: E402  (ImageNet-sized JPEGs)

from curate.shard import format as fmt  # noqa: E402
from curate.shard.plan import plan_shards  # noqa: E402
from curate.shard.writer import write_split  # noqa: E402
from sparsevit.data import Batch  # noqa: E402
from sparsevit.model import SparseConfig  # noqa: E402
from sparsevit.train import Run, TrainConfig, build, train_loader, train_step  # noqa: E402

SETTINGS: dict[str, dict[str, Any]] = {
    "dense": {"keep": 1.0},
    "keep 0.7": {"keep": 0.7},
    "keep 0.5": {"keep": 0.5},
    "keep 0.5 random": {"keep": 0.5, "sparse": SparseConfig(drop_by="random")},
    "keep 0.7 + gather attention 0.5": {"keep": 0.7, "sparse": SparseConfig(attention="gather", key_keep=0.5)},
    "keep 0.7 + online drop 0.7 at blocks 3/6/9": {"keep": 0.7, "sparse": SparseConfig(online_blocks=(3, 6, 9)),
                                      "online_keep": 0.7},
}


def write_bench_shards(src: Path, out: Path, grid: int = 14, per_shard: int = 64, max_side: int | None = None,
                       quality: int = 90, workers: int = 2) -> Path:
    """The photos as `curate shard` output, each with a smooth random importance map; with
    `max_side`, images shipped as `curate shard --max-side` ships them."""
    files = sorted(src.rglob("*.JPEG"))
    rng = np.random.default_rng(0)
    maps = {f.stem: rng.random((grid, grid)).astype(np.float32) for f in files}
    labels = {f.stem: int(f.parent.name[1:]) for f in files}
    paths = {f.stem: f for f in files}
    plan = plan_shards(sorted(paths), "train", "bench", per_shard, 4, 0)

    def load(keys: Sequence[str]) -> Iterator[fmt.SampleData]:
        for k in keys:
            data, meta = paths[k].read_bytes(), {}
            if max_side is not None:
                data, meta = fmt.reduce_image(k, data, max_side, quality)
            yield fmt.SampleData(k, data, labels[k], meta, maps[k])

    infos = {"train": write_split(out, plan, load, resume=False, progress=False, workers=workers)}
    fmt.write_index(out, "bench", infos, {"train": True}, num_classes=max(labels.values()) + 1)
    return out


def endless(run: Run, split: fmt.Split) -> Iterator[Batch]:
    """`curate train`'s loader across epochs: the benchmark decides when to stop."""
    for epoch in itertools.count():
        yield from train_loader(run, split, epoch)[0]


def time_setting(base: TrainConfig, opts: dict[str, Any], split: fmt.Split, steps: int, warmup: int) -> float:
    cfg = TrainConfig(**{**base.__dict__, **opts})
    run = build(cfg, device=torch.device("cpu"), split=split)
    batches = endless(run, split)
    for _ in range(warmup):  # loader start-up, allocator, first-call costs
        train_step(run, next(batches), 1.0, 0, 0.01)
    t0 = time.perf_counter()
    for _ in range(steps):
        train_step(run, next(batches), 1.0, 0, 0.01)  # the wait for the next batch is inside the timing
    return steps * cfg.batch_size / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="deit_tiny_patch16_224")
    ap.add_argument("--img-size", type=int, default=224)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--images", type=int, default=512)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--settings", default=",".join(SETTINGS), help="comma-separated names from SETTINGS")
    args = ap.parse_args()
    random.seed(0)
    torch.manual_seed(0)
    names = [n.strip() for n in args.settings.split(",")]
    with tempfile.TemporaryDirectory(dir=".") as tmp_name:
        tmp = Path(tmp_name)
        make_photos(tmp / "photos", args.images)
        split = fmt.read_split(write_bench_shards(tmp / "photos", tmp / "shards"), "train")
        base = TrainConfig(shards=tmp / "shards", out=tmp / "run", model=args.model, img_size=args.img_size,
                           num_classes=4, batch_size=args.batch_size, workers=args.workers,
                           shuffle_buffer=64, epochs=1, warmup_epochs=0.0, progress=False)
        best: dict[str, float] = {}
        for _ in range(args.rounds):
            for name in names:
                ips = time_setting(base, SETTINGS[name], split, args.steps, args.warmup)
                best[name] = max(best.get(name, 0.0), ips)
    print(f"# {platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}, "
          f"{args.model} @{args.img_size}px, batch {args.batch_size}, {args.workers} loader workers, "
          f"500x375 JPEGs, best of {args.rounds} rounds x {args.steps} steps")
    print("| setting | train img/s | ratio vs dense |\n|---|---|---|")
    for name in names:
        print(f"| {name} | {best[name]:.1f} | {best[name] / best['dense']:.2f}x |")


if __name__ == "__main__":
    main()
