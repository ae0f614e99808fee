"""images/s of `curate score` vs the bare proxy forward on the same pre-decoded tensors, in one run.

`curate score` here is the whole scoring pass: read files, decode in DataLoader workers, forward
with importance capture, scores, Parquet parts. The baseline is `model(x)` in inference mode on
tensors decoded beforehand (normalised, batched the same way). Ratio = ours / bare; 1.0 means the
pipeline costs nothing beyond the model.

    python bench/throughput/score_throughput.py            # both settings below
    python bench/throughput/score_throughput.py --quick    # fewer images
"""
from __future__ import annotations

import argparse
import io
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from curate.ingest.decode import decode_image
from curate.demo.data import DemoConfig, make_demo
from curate.score.job import ScoreConfig, run_score
from curate.score.proxies import create_model, normalizer, resolve_recipe
from curate.ingest.sources import open_source, read_bytes

# (name, proxy recipe, how the images are made)
SETTINGS = [("demo 64px JPEG, demo-vit@64", "demo-vit", "demo"),
            ("photo 500x375 JPEG ~108 KB, imagenet-vit@112", "imagenet-vit", "photo")]


def make_photos(root: Path, n: int, classes: int = 4) -> None:
    """Photo-sized JPEGs (500x375) of ~108 KB on average, ImageNet's typical file (140 GB / 1.28M)."""
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


def bare_forward(model: torch.nn.Module, images: torch.Tensor, batch: int) -> float:
    """images/s of model(x) on pre-decoded uint8 images (normalisation included)."""
    mean, std = normalizer(model)
    model.eval()
    with torch.inference_mode():
        model((images[:batch].float() / 255 - mean) / std)  # warm-up
        t0 = time.perf_counter()
        for i in range(0, len(images), batch):
            model((images[i:i + batch].float() / 255 - mean) / std)
    return len(images) / (time.perf_counter() - t0)


def measure(name: str, proxy: str, kind: str, n: int, batch: int, workers: int, tmp: Path) -> dict:
    src = tmp / kind
    if kind == "demo":
        per_class = n // 8
        make_demo(DemoConfig(root=src, per_class=per_class, val_per_class=1))
        src = src / "train"
    else:
        make_photos(src, n)
    items = open_source(src)
    recipe = resolve_recipe(proxy)
    torch.manual_seed(0)
    model = create_model(recipe, max(it.label for it in items) + 1)
    ckpt = tmp / f"{kind}.pt"
    torch.save(model.state_dict(), ckpt)
    images = torch.stack([decode_image(read_bytes(it), recipe.img_size).image for it in items])
    bare = bare_forward(model, images, batch)
    res = run_score(ScoreConfig(str(src), tmp / f"out-{kind}", proxy=proxy, checkpoint=ckpt, batch_size=batch,
                                workers=workers, progress=False))
    ours = len(items) / res.timing["score_s"]
    return {"setting": name, "images": len(items), "bare_img_s": bare, "score_img_s": ours, "ratio": ours / bare}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="400 images")
    args = ap.parse_args()
    n = 400 if args.quick else args.images
    print(f"# {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
          f"torch {torch.__version__}, {args.workers} decode workers, batch {args.batch_size}")
    print("| setting | images | bare forward img/s | curate score img/s | ratio |")
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for name, proxy, kind in SETTINGS:
            r = measure(name, proxy, kind, n, args.batch_size, args.workers, Path(tmp))
            print(f"| {r['setting']} | {r['images']} | {r['bare_img_s']:.0f} | {r['score_img_s']:.0f} | "
                  f"{r['ratio']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
