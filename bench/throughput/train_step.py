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

import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/, for common
import common  # noqa: E402

from curate.shard import format as fmt  # noqa: E402
from sparsevit.model import SparseConfig  # noqa: E402
from sparsevit.train import TrainConfig, build, train_step  # noqa: E402

SETTINGS: dict[str, dict[str, Any]] = {
    "dense": {"keep": 1.0},
    "keep 0.7": {"keep": 0.7},
    "keep 0.5": {"keep": 0.5},
    "keep 0.5 random": {"keep": 0.5, "sparse": SparseConfig(drop_by="random")},
    "keep 0.7 + gather attention 0.5": {"keep": 0.7, "sparse": SparseConfig(attention="gather", key_keep=0.5)},
    "keep 0.7 + online drop 0.7 at blocks 3/6/9": {"keep": 0.7, "sparse": SparseConfig(online_blocks=(3, 6, 9)),
                                      "online_keep": 0.7},
}


def time_setting(base: TrainConfig, opts: dict[str, Any], split: fmt.Split, steps: int, warmup: int) -> float:
    cfg = TrainConfig(**{**base.__dict__, **opts})
    run = build(cfg, device=torch.device("cpu"), split=split)
    batches = common.endless(run, split)
    for _ in range(warmup):  # loader start-up, allocator, first-call costs
        train_step(run, next(batches), 1.0, 0, 0.01)
    t0 = time.perf_counter()
    for _ in range(steps):
        train_step(run, next(batches), 1.0, 0, 0.01)  # the wait for the next batch is inside the timing
    return steps * cfg.batch_size / (time.perf_counter() - t0)


def main() -> None:
    ap = common.parser(__doc__)
    ap.add_argument("--model", default="deit_tiny_patch16_224")
    common.int_options(ap, img_size=224, batch_size=64, images=512, steps=6, warmup=2, rounds=2, workers=2)
    ap.add_argument("--settings", type=common.words, default=",".join(SETTINGS),
                    help="comma-separated names from SETTINGS")
    args = ap.parse_args()
    random.seed(0)
    torch.manual_seed(0)
    names = args.settings
    with tempfile.TemporaryDirectory(dir=".") as tmp_name:
        tmp = Path(tmp_name)
        common.make_photos(tmp / "photos", args.images)
        split = fmt.read_split(common.write_bench_shards(tmp / "photos", tmp / "shards"), "train")
        base = TrainConfig(shards=tmp / "shards", out=tmp / "run", model=args.model, img_size=args.img_size,
                           num_classes=4, batch_size=args.batch_size, workers=args.workers,
                           shuffle_buffer=64, epochs=1, warmup_epochs=0.0, progress=False)
        best: dict[str, float] = {}
        for _ in range(args.rounds):
            for name in names:
                ips = time_setting(base, SETTINGS[name], split, args.steps, args.warmup)
                best[name] = max(best.get(name, 0.0), ips)
    print(common.header(f"{args.model} @{args.img_size}px", f"batch {args.batch_size}",
                        f"{args.workers} loader workers", "500x375 JPEGs",
                        f"best of {args.rounds} rounds x {args.steps} steps"))
    print("| setting | train img/s | ratio vs dense |\n|---|---|---|")
    for name in names:
        print(f"| {name} | {best[name]:.1f} | {best[name] / best['dense']:.2f}x |")


if __name__ == "__main__":
    main()
