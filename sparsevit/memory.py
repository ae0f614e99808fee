"""The training split decoded once into memory, augmented in batches in the main process
(`curate train --loader memory`): for small images, where decoding a JPEG and cropping it one
sample at a time in loader workers costs as much as the model's step on it.

The split is decoded once per run (in the loader workers, which then exit), into one uint8
tensor; every epoch then draws its order from a seed shared by all ranks, takes this rank's share
(`order[rank::world]`), and makes each batch with a few tensor ops: the crop boxes and flips are
drawn by `TrainTransform.draw` (the same draws as the stream loader makes, from Python's `random`,
seeded per epoch, so a resumed run draws what the uninterrupted one drew), the crops resized by
`roi_align` (bilinear; over several source pixels per output pixel when shrinking), and the maps
re-projected through the same boxes by `data.crop_maps` (`crop_map` batched). The shards stay
what timm and webdataset read; only how `curate train` reads them changes.

Samples the example pruner sets out this epoch are left out before batching, so an epoch over
fewer examples takes fewer full steps (the stream loader reads them and drops their rows from the
batch). Samples that fail to decode are found once and listed with the first batch of every
epoch, as the stream loader lists them every epoch.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from torchvision.ops import roi_align

from curate.shard.format import FormatError, Split
from sparsevit import data

MAX_BYTES = 8 << 30  # decoded pixels held per process; a bigger split reads better as a stream


@dataclass(frozen=True)
class Raw:
    """The decoded image as an (H, W, 3) uint8 array and its map as stored: what memory keeps.
    NumPy, not torch: a tensor leaves a loader worker as a shared-memory file descriptor, and
    thousands of small ones exhaust the descriptors a process may receive."""

    def __call__(self, image: Image.Image, importance: np.ndarray | None) -> tuple[np.ndarray, Any]:
        return np.array(image, dtype=np.uint8), importance


@dataclass(frozen=True)
class Chunk:
    """Decoded samples on their way out of a loader worker, in a wrapper the DataLoader's
    default_convert leaves alone (it would turn every array into a tensor)."""
    samples: list[dict[str, Any]]


@dataclass(frozen=True)
class Decoded:
    """A split in memory: images top-left aligned in one padded uint8 tensor, by row."""
    keys: list[str]
    images: torch.Tensor  # (N, 3, H, W) uint8; row i's image is images[i, :, :h_i, :w_i]
    sizes: list[tuple[int, int]]  # (h, w) per row
    labels: torch.Tensor  # (N,) long
    # the stored maps by row: one (N, gh, gw) array when they share a shape, else a list; None without maps
    maps: np.ndarray | list[np.ndarray] | None
    skipped: list[tuple[str, str]]  # (key, error) of the samples that failed to decode

    def __len__(self) -> int:
        return len(self.keys)


def decode_split(split: Split, workers: int, max_bytes: int = MAX_BYTES) -> Decoded:
    """Every sample of the split, decoded by `workers` loader processes (all of them on every rank:
    each epoch's order spans the whole split). A split whose pixels exceed `max_bytes` is refused."""
    aug = data.Augment(Raw(), need_maps=split.has_maps)  # type: ignore[arg-type] - any (image, map) transform
    stages: list[Any] = [wds.SimpleShardList(split.urls), wds.split_by_worker, wds.tarfile_to_samples(),
                         wds.map(aug), wds.batched(256, collation_fn=Chunk, partial=True)]
    loader = data.make_loader(wds.DataPipeline(*stages), min(workers, len(split.urls)))
    good: list[dict[str, Any]] = []
    skipped: list[tuple[str, str]] = []
    held = 0
    for chunk in loader:
        good += [s for s in chunk.samples if "error" not in s]
        skipped += [(s["key"], s["error"]) for s in chunk.samples if "error" in s]
        held += sum(s["image"].nbytes for s in chunk.samples if "error" not in s)
        if held > max_bytes:  # before the whole split sits in memory
            raise ValueError(_too_big(f"more than {max_bytes / 2**30:.1f} GiB after {len(good)} images", max_bytes))
    if skipped and not good:
        example = skipped[0]
        raise FormatError(f"every training sample failed to decode ({len(skipped)}; e.g. {example[0]}: "
                          f"{example[1]}): check the shards with `curate verify`")
    good.sort(key=lambda s: s["key"])  # the same rows on every rank, whatever the workers' interleaving
    return _pack(good, skipped, split.has_maps, max_bytes)


def _too_big(what: str, max_bytes: int) -> str:
    return (f"--loader memory would hold {what} of decoded pixels; the limit is {max_bytes / 2**30:.1f} GiB: "
            "use --loader stream")


def _pack(good: list[dict[str, Any]], skipped: list[tuple[str, str]], has_maps: bool, max_bytes: int) -> Decoded:
    images = pad_images([s["image"] for s in good], max_bytes)
    maps = [s["importance"] for s in good] if has_maps else None
    if maps and len({m.shape for m in maps}) == 1:
        maps = np.stack(maps)  # one shape: make_batch re-projects them all in a few array ops
    return Decoded([s["key"] for s in good], images, [s["image"].shape[:2] for s in good],
                   torch.tensor([s["label"] for s in good], dtype=torch.long), maps, skipped)


def pad_images(arrays: list[np.ndarray], max_bytes: int = MAX_BYTES) -> torch.Tensor:
    """(H, W, 3) uint8 arrays -> one (N, 3, Hmax, Wmax) tensor, each image top-left, its last row and
    column repeated into the padding: roi_align's bilinear samples near an image's edge then read
    what interpolating the image alone would (its edge), not black."""
    h = max((a.shape[0] for a in arrays), default=1)
    w = max((a.shape[1] for a in arrays), default=1)
    if len(arrays) * 3 * h * w > max_bytes:
        raise ValueError(_too_big(f"{len(arrays) * 3 * h * w / 2**30:.1f} GiB ({len(arrays)} images padded to "
                                  f"{h}x{w})", max_bytes))
    images = torch.empty(len(arrays), 3, h, w, dtype=torch.uint8)
    for i, a in enumerate(arrays):
        ih, iw = a.shape[:2]
        images[i, :, :ih, :iw] = torch.from_numpy(a).permute(2, 0, 1)
        images[i, :, ih:, :iw] = images[i, :, ih - 1:ih, :iw]
        images[i, :, :, iw:] = images[i, :, :, iw - 1:iw]
    return images


def epoch_order(decoded: Decoded, seed: int, epoch: int, admits: Callable[[list[str]], torch.Tensor]) -> list[int]:
    """All ranks' rows of one epoch, shuffled with the seed every rank shares; rows `admits`
    refuses (the example pruner's weight 0) are left out."""
    order = list(range(len(decoded)))
    random.Random(seed * 100_003 + epoch).shuffle(order)
    keep = admits([decoded.keys[i] for i in order]) > 0
    return [i for i, k in zip(order, keep.tolist()) if k]


def epoch_plan(order: list[int], world: int, batch_size: int) -> data.EpochPlan:
    """Full steps of the poorest rank, as the stream loader plans them (the rows the pruner left
    out are not counted as unused: they were not meant to train)."""
    steps = min(len(order[r::world]) for r in range(world)) // batch_size
    return data.EpochPlan([], steps, len(order) - steps * batch_size * world)


def batches(decoded: Decoded, rows: list[int], steps: int, batch_size: int, transform: data.TrainTransform
            ) -> Iterator[data.Batch]:
    """`steps` full batches over this rank's `rows`; the decode failures ride on the first."""
    for s in range(steps):
        yield make_batch(decoded, rows[s * batch_size:(s + 1) * batch_size], transform,
                         decoded.skipped if s == 0 else [])


def make_batch(decoded: Decoded, rows: list[int], transform: data.TrainTransform,
               skipped: list[tuple[str, str]]) -> data.Batch:
    """The rows cropped, resized, flipped and normalised as `transform` does one image, in a few
    batched ops; each map re-projected through its image's box and flip."""
    draws = [transform.draw(*decoded.sizes[i]) for i in rows]
    size = transform.geometry.img_size
    boxes = torch.tensor([[j, left, top, left + w, top + h] for j, ((top, left, h, w), _) in enumerate(draws)],
                         dtype=torch.float32)
    # aligned=True: pixel i covers [i, i + 1), so a box of the whole image maps it exactly
    x = roi_align(decoded.images[rows].float(), boxes, output_size=size, spatial_scale=1.0, sampling_ratio=-1,
                  aligned=True)
    flips = torch.tensor([flip for _, flip in draws])
    x[flips] = x[flips].flip(-1)
    grid, maps = transform.geometry.grid, None
    if isinstance(decoded.maps, np.ndarray):
        maps = data.crop_maps(decoded.maps[rows], np.array([box for box, _ in draws]),
                              np.array([decoded.sizes[i] for i in rows]), grid, flips.numpy()).flatten(1)
    elif decoded.maps is not None:
        maps = torch.stack([data.crop_map(decoded.maps[i], box, decoded.sizes[i], grid, flip)
                            for i, (box, flip) in zip(rows, draws)]).flatten(1)
    return data.Batch(keys=[decoded.keys[i] for i in rows], image=transform.normalize(x),
                      label=decoded.labels[rows], importance=maps, skipped=list(skipped))
