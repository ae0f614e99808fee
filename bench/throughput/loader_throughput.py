"""images/s of the sparsevit shard loader (decode + RandomResizedCrop + flip + normalise, with the
importance map re-projected through the same crop and pooled to the patch grid) vs torchvision's
ImageFolder loader with the same transforms on the same JPEG files, as a ratio in one run; and
the same shards written with `curate shard --max-side` (images re-encoded with the longer side at
most that, so the loader decodes fewer pixels), as a ratio to the original bytes.

All use a DataLoader with the same batch size and worker count; rounds are interleaved and the
best kept.

    python bench/throughput/loader_throughput.py [--images 2000] [--workers 2] [--max-side 256]
"""
from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import torch
from torchvision import datasets, transforms

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/, for common
import common  # noqa: E402

from curate.shard.format import read_split  # noqa: E402
from sparsevit.train import TrainConfig, build, train_loader  # noqa: E402


def imagefolder_ips(root: Path, size: int, batch: int, workers: int) -> float:
    tf = transforms.Compose([transforms.RandomResizedCrop(size), transforms.RandomHorizontalFlip(),
                             transforms.ToTensor(),
                             transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
    loader = torch.utils.data.DataLoader(datasets.ImageFolder(str(root), tf), batch_size=batch, shuffle=True,
                                         num_workers=workers, drop_last=True)
    return _drain(loader)


def shards_ips(root: Path, size: int, patch: int, batch: int, workers: int) -> float:
    """`curate train`'s loader for one epoch (its model built first, outside the timing)."""
    split = read_split(root, "train")
    cfg = TrainConfig(shards=root, out=root / "unused-run", img_size=size, patch_size=patch, num_classes=4,
                      batch_size=batch, workers=workers, shuffle_buffer=256, progress=False)
    batches, _ = train_loader(build(cfg, device=torch.device("cpu"), split=split), split, 0)
    return _drain(batches)


def _drain(batches) -> float:
    """images/s over one epoch, worker start-up included (both loaders pay it)."""
    t0, n = time.perf_counter(), 0
    for b in batches:
        n += len(b[1]) if isinstance(b, (list, tuple)) else len(b)
    return n / (time.perf_counter() - t0)


def main() -> None:
    ap = common.parser(__doc__)
    common.int_options(ap, images=2000, size=224, patch=16, batch=64, workers=2, rounds=3, max_side=256)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(dir=".") as tmp_name:
        tmp = Path(tmp_name)
        common.make_photos(tmp / "photos", args.images)
        common.write_bench_shards(tmp / "photos", tmp / "shards", per_shard=250)
        common.write_bench_shards(tmp / "photos", tmp / "reduced", per_shard=250, max_side=args.max_side)
        mb = {name: sum(p.stat().st_size for p in (tmp / name).glob("*.tar")) / 1e6 for name in ("shards", "reduced")}
        runs = {"ImageFolder (torchvision)": lambda: imagefolder_ips(tmp / "photos", args.size, args.batch,
                                                                     args.workers),
                "shards + maps (sparsevit)": lambda: shards_ips(tmp / "shards", args.size, args.patch, args.batch,
                                                                args.workers),
                f"shards --max-side {args.max_side} + maps": lambda: shards_ips(tmp / "reduced", args.size,
                                                                               args.patch, args.batch, args.workers)}
        best = dict.fromkeys(runs, 0.0)
        for _ in range(args.rounds):
            for name, run in runs.items():
                best[name] = max(best[name], run())
    print(common.header(f"{args.images} JPEGs 500x375", f"{args.size}px", f"batch {args.batch}",
                        f"{args.workers} workers", f"best of {args.rounds}; shards {mb['shards']:.0f} MB",
                        f"--max-side {args.max_side} shards {mb['reduced']:.0f} MB"))
    print("| loader | img/s |\n|---|---|")
    for name, ips in best.items():
        print(f"| {name} | {ips:.0f} |")
    folder, shards, reduced = best.values()
    print(f"ratio shards/ImageFolder = {shards / folder:.2f}; --max-side {args.max_side}/original bytes = "
          f"{reduced / shards:.2f}")


if __name__ == "__main__":
    main()
