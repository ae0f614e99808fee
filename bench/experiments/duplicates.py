"""Near-duplicates on real photographs: 4,000 CIFAR-10 training photos (400 a class, from
`../shared/data/cifar10.tar.gz`) and 120 planted copies of 120 of them, 20 of each kind: JPEG
quality 50, resized to 24 px and back, 2 px cropped off the top and left (a shift; resized back),
2 px cropped off every side (centred; resized back), mirror image, brightened by 30%.
Each descriptor is computed by the function `curate score` uses (`rows.thumbnails`,
`phash.phashes`) on the 32-px images the scorer sees, and grouped the way `curate shard --dedup`
groups it:

    python bench/experiments/duplicates.py [--thresholds 0.70,0.75,0.80]

Prints, per descriptor and threshold, the share of copies grouped with their original (recall,
per kind) and the share of the other 3,880 photos (none of them copied) merged into any group.
"""
from __future__ import annotations

import io
import random
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np
import torch
from PIL import Image, ImageEnhance, ImageOps

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/, for common
import common  # noqa: E402
import cifar_shards  # noqa: E402

from curate.score.phash import phashes  # noqa: E402
from curate.score.rows import thumbnails  # noqa: E402
from curate.select.embeddings import DEDUP_THRESHOLD, duplicate_groups, phash_links, star_groups  # noqa: E402

KINDS = ("jpeg q50", "resized", "2-px shift crop", "2-px centred crop", "mirror", "brightened")


def _jpeg(im: Image.Image, quality: int) -> Image.Image:
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=quality)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def copy_of(im: Image.Image, kind: str) -> Image.Image:
    """A planted copy, re-encoded as a JPEG (quality 90 unless the kind is the encoding)."""
    w, h = im.size
    made = {"jpeg q50": lambda: im, "resized": lambda: im.resize((24, 24), Image.BICUBIC).resize((w, h), Image.BICUBIC),
            "2-px shift crop": lambda: im.crop((2, 2, w, h)).resize((w, h), Image.BICUBIC),
            "2-px centred crop": lambda: im.crop((2, 2, w - 2, h - 2)).resize((w, h), Image.BICUBIC),
            "mirror": lambda: ImageOps.mirror(im), "brightened": lambda: ImageEnhance.Brightness(im).enhance(1.3)}
    return _jpeg(made[kind](), 50 if kind == "jpeg q50" else 90)


def photos(per_class: int, seed: int) -> list[Image.Image]:
    with tempfile.TemporaryDirectory() as tmp:
        with tarfile.open(cifar_shards.TARBALL) as tar:
            tar.extractall(tmp, filter="data")
        files = cifar_shards.class_files(Path(tmp) / "cifar10" / "train")
        rng = random.Random(seed)
        return [Image.open(p).convert("RGB") for name in sorted(files) for p in rng.sample(files[name], per_class)]


def as_batch(images: list[Image.Image]) -> torch.Tensor:
    return torch.from_numpy(np.stack([np.asarray(im) for im in images])).permute(0, 3, 1, 2).contiguous()


def report(name: str, groups: np.ndarray, n: int, copied: np.ndarray, kinds: list[str]) -> str:
    """Recall of the copies (row n + i copies row copied[i]) and the share of uncopied photos merged."""
    found = [(groups[n + i] >= 0) and groups[n + i] == groups[c] for i, c in enumerate(copied)]
    per_kind = " / ".join(f"{sum(f for f, k in zip(found, kinds) if k == kind)}" for kind in KINDS)
    others = np.setdiff1d(np.arange(n), copied)
    merged = float((groups[others] >= 0).mean())
    return f"| {name} | {np.mean(found):.0%} | {per_kind} | {merged:.2%} |"


def main() -> None:
    ap = common.parser(__doc__)
    ap.add_argument("--thresholds", type=common.floats, default="0.70,0.75,0.80")
    ap.add_argument("--per-class", type=int, default=400)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if not cifar_shards.TARBALL.is_file():
        sys.exit(f"{cifar_shards.TARBALL} is not there: this benchmark needs the shared CIFAR-10 tarball")
    base = photos(args.per_class, args.seed)
    rng = random.Random(args.seed)
    copied = np.array(sorted(rng.sample(range(len(base)), 20 * len(KINDS))))
    kinds = [KINDS[i % len(KINDS)] for i in range(len(copied))]
    images = as_batch(base + [copy_of(base[c], k) for c, k in zip(copied, kinds)])
    t0 = time.perf_counter()
    thumbs = thumbnails(images).astype(np.float32)
    t_thumb = time.perf_counter() - t0
    t0 = time.perf_counter()
    hashes = phashes(images)
    t_hash = time.perf_counter() - t0
    thumbs -= thumbs.mean(axis=1, keepdims=True)  # as load_embeddings centres and normalises them
    faiss.normalize_L2(thumbs)
    print(common.header(f"{len(base)} CIFAR-10 photos + {len(copied)} planted copies",
                        f"descriptors of {len(images)} images: thumbnails {t_thumb:.2f}s, phash {t_hash:.2f}s"))
    print(f"| descriptor | copies found | per kind ({' / '.join(KINDS)}, of 20) | other photos merged |\n"
          "|---|---|---|---|")
    n = len(base)
    print(report(f"thumbnail cosine > {DEDUP_THRESHOLD}, connected components",
                 duplicate_groups(thumbs, DEDUP_THRESHOLD), n, copied, kinds))
    for t in args.thresholds:
        a, b = phash_links(hashes, t)
        print(report(f"phash >= {t:g}, star groups", star_groups(len(hashes), a, b), n, copied, kinds))


if __name__ == "__main__":
    main()
