"""images/s of `curate score` vs the bare proxy forward on the same pre-decoded tensors, in one run.

`curate score` here is the whole scoring pass: read files, decode in DataLoader workers, forward
with importance capture, scores, Parquet parts. The baseline is `model(x)` in inference mode on
tensors decoded beforehand (normalised, batched the same way). Ratio = ours / bare; 1.0 means the
pipeline costs nothing beyond the model.

    python bench/throughput/score_throughput.py            # both settings below
    python bench/throughput/score_throughput.py --quick    # fewer images
"""
from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/, for common
import common  # noqa: E402

from curate.demo.data import DemoConfig, make_demo  # noqa: E402
from curate.ingest.decode import decode_image  # noqa: E402
from curate.ingest.sources import open_source, read_bytes  # noqa: E402
from curate.score.job import ScoreConfig, run_score  # noqa: E402
from curate.score.proxies import normalizer, resolve_recipe  # noqa: E402

# (name, proxy recipe, how the images are made)
SETTINGS = [("demo 64px JPEG, demo-vit@64", "demo-vit", "demo"),
            ("photo 500x375 JPEG ~108 KB, imagenet-vit@112", "imagenet-vit", "photo")]


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
        common.make_photos(src, n)
    items = open_source(src)
    recipe = resolve_recipe(proxy)
    ckpt = tmp / f"{kind}.pt"
    model = common.random_proxy(ckpt, max(it.label for it in items) + 1, proxy)
    images = torch.stack([decode_image(read_bytes(it), recipe.img_size).image for it in items])
    bare = bare_forward(model, images, batch)
    res = run_score(ScoreConfig(str(src), tmp / f"out-{kind}", proxy=proxy, checkpoint=ckpt, batch_size=batch,
                                workers=workers, progress=False))
    ours = len(items) / res.timing["score_s"]
    return {"setting": name, "images": len(items), "bare_img_s": bare, "score_img_s": ours, "ratio": ours / bare}


def main() -> None:
    ap = common.parser(__doc__)
    common.int_options(ap, images=2000, batch_size=256, workers=2)
    ap.add_argument("--quick", action="store_true", help="400 images")
    args = ap.parse_args()
    n = 400 if args.quick else args.images
    print(common.header(f"{args.workers} decode workers", f"batch {args.batch_size}"))
    print("| setting | images | bare forward img/s | curate score img/s | ratio |")
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for name, proxy, kind in SETTINGS:
            r = measure(name, proxy, kind, n, args.batch_size, args.workers, Path(tmp))
            print(f"| {r['setting']} | {r['images']} | {r['bare_img_s']:.0f} | {r['score_img_s']:.0f} | "
                  f"{r['ratio']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
