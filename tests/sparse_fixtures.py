"""Small shards written through curate's own writer, with objects at known places.

Each image is a grey 64x64 canvas with a coloured square (the class is the colour) at a random
place; its importance map (8x8) is the square's coverage of each patch, so a map that follows
augmentation must point at the square's pixels.
"""
from __future__ import annotations

import io
import random
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
from PIL import Image

from curate.shard import format as fmt
from curate.shard.plan import plan_shards
from curate.shard.writer import write_split

COLOURS = ((220, 40, 40), (40, 200, 60), (50, 80, 230), (230, 210, 40))
SIZE, GRID = 64, 8


def object_image(rng: random.Random, label: int, side: int = 24) -> tuple[bytes, np.ndarray, tuple[int, int, int]]:
    """(JPEG bytes, importance (8, 8), (top, left, side)) for one image of class `label`."""
    top, left = rng.randrange(0, SIZE - side), rng.randrange(0, SIZE - side)
    arr = np.full((SIZE, SIZE, 3), 128, np.uint8)
    arr += np.asarray([rng.randrange(-20, 20) for _ in range(3)], np.int8).astype(np.uint8)
    arr[top:top + side, left:left + side] = COLOURS[label]
    mask = np.zeros((SIZE, SIZE), np.float32)
    mask[top:top + side, left:left + side] = 1
    grid = mask.reshape(GRID, SIZE // GRID, GRID, SIZE // GRID).mean((1, 3))
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=95)
    return buf.getvalue(), grid / grid.sum(), (top, left, side)


CLASS_NAMES = ("red", "green", "blue", "yellow")


def write_shards(out: Path, per_class: int = 16, classes: int = 4, per_shard: int = 8, multiple: int = 4,
                 val_per_class: int = 4, seed: int = 0, maps_on_val: bool = True,
                 corrupt: Callable[[str], bool] = lambda key: False, train_samples: int | None = None) -> Path:
    """`curate shard`-style output (train + validation) in `out`; returns `out`. Keys for which
    `corrupt` is true get a JPEG cut after its first 100 bytes (it no longer decodes).
    `train_samples`: only the first N training keys (a count that is no multiple of anything)."""
    rng = random.Random(seed)
    splits, samples = {}, {}
    for split, n in (("train", per_class), ("validation", val_per_class)):
        data = {f"{split}-{c}-{i:04d}": (c, *object_image(rng, c)) for c in range(classes) for i in range(n)}
        if split == "train" and train_samples is not None:
            data = {k: data[k] for k in sorted(data)[:train_samples]}
        samples.update(data)
        plan = plan_shards(sorted(data), split, per_shard, multiple if split == "train" else 1, seed)

        def load(keys: Sequence[str], data=data, split=split) -> Iterator[fmt.SampleData]:
            for k in keys:
                label, img, grid, box = data[k]
                img = img[:100] if corrupt(k) else img
                imp = grid if split == "train" or maps_on_val else None
                yield fmt.SampleData(k, img, label, {"box": list(box)}, imp)

        splits[split] = write_split(out, plan, load, resume=False, progress=False)
    fmt.write_index(out, "toy", splits, {"train": True, "validation": maps_on_val}, classes,
                    names=list(CLASS_NAMES[:classes]))
    return out
