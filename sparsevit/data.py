"""Shard loader: a webdataset pipeline over a split of the shard index whose importance maps
follow every crop, flip and mix of the image they belong to, pooled to the model's patch grid.

Samples that cannot be decoded are skipped and reported with their key (`Augment`'s error
policy); everything about the shard format itself (index, members, the decoder) comes from
`curate.shard.format`.

Equal epochs on every rank without duplicates: shards are shuffled with a seed that all ranks
share, split `urls[rank::world]` (wds.split_by_node) and `[worker::workers]` (wds.split_by_worker),
and batched per worker. A worker's last, partial batch is not dropped: it travels to the main
process as loose samples (`Rest`), where `rebatch` joins the rests of all workers into full
batches, so a rank trains all of its samples but fewer than one batch. `plan_epoch` computes,
from the shard lengths in the index, how many full batches the poorest rank gets; every rank
stops there, so no rank waits on another in an all-reduce. What is left (less than a batch per
rank, plus what a richer rank holds beyond the poorest) is counted in `EpochPlan.unused`, and
which samples those are changes from epoch to epoch with the shuffle.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Any, Callable, Iterable, Iterator, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
import webdataset as wds
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.data.mixup import Mixup, cutmix_bbox_and_lam, mixup_target
from torchvision.transforms import functional as TF

from curate.common.runtime import die_with_parent
from curate.common.vit import mean_std
from curate.shard.format import FormatError, Split, decode_sample

@dataclass(frozen=True)
class EpochPlan:
    """Which shards each rank reads in one epoch and how many steps every rank takes."""
    urls: list[str]  # shuffled with the shared seed; wds.split_by_node takes urls[rank::world]
    steps: int  # full batches per rank, the same on every rank
    unused: int  # samples not trained on this epoch, over all ranks


def plan_epoch(split: Split, epoch: int, seed: int, world: int, workers: int, batch_size: int,
               shuffle: bool = True) -> EpochPlan:
    order = list(range(len(split.urls)))
    if shuffle:
        random.Random(seed * 100_003 + epoch).shuffle(order)  # same on every rank
    if len(order) < world * max(1, workers):
        raise ValueError(f"{len(order)} shards for {world} ranks x {max(1, workers)} loader workers: "
                         f"every worker needs a shard; write more (curate shard --shard-multiple)")
    lengths = [split.lengths[i] for i in order]
    steps = min(sum(lengths[r::world]) // batch_size for r in range(world))  # rests rebatched: see `rebatch`
    return EpochPlan([split.urls[i] for i in order], steps, split.num_samples - steps * batch_size * world)


def unused_reason(plan: EpochPlan, world: int, batch_size: int) -> str:
    """Why an epoch leaves `plan.unused` samples untrained, and what avoids it ("" for none)."""
    if not plan.unused:
        return ""
    if world == 1:
        return (f"they do not fill a last batch of {batch_size}; which ones changes with every epoch's shuffle "
                f"(a --batch-size that divides the sample count trains all)")
    return (f"every rank stops at the poorest rank's {plan.steps} batches of {batch_size} (fewer than a batch "
            "left per rank, and what a rank holds beyond the poorest; shards of equal length, from curate "
            "shard --shard-multiple, keep that small); which ones changes with every epoch's shuffle")


# --- augmentation that carries the map ----------------------------------------------------

@dataclass(frozen=True)
class Geometry:
    """Model input geometry: the map is pooled to (img_size / patch_size)^2 tokens."""
    img_size: int
    patch_size: int

    def __post_init__(self) -> None:
        if self.img_size % self.patch_size:
            raise ValueError(f"img_size {self.img_size} is not a multiple of patch_size {self.patch_size}")

    @property
    def grid(self) -> int:
        return self.img_size // self.patch_size


@dataclass(frozen=True)
class Normalize:
    """Pixels in 0..255 to the model's input scale, with the mean and std of its timm config
    (`of(model)`), as timm's own transforms do."""
    mean: tuple[float, ...] = IMAGENET_DEFAULT_MEAN
    std: tuple[float, ...] = IMAGENET_DEFAULT_STD

    @classmethod
    def of(cls, model: torch.nn.Module) -> "Normalize":
        return cls(*mean_std(model))

    @cached_property
    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """mean and std as (3, 1, 1) float tensors, made once per process."""
        return torch.tensor(self.mean).view(3, 1, 1), torch.tensor(self.std).view(3, 1, 1)

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        """(..., 3, H, W) uint8 or float in 0..255 -> normalised float, in place when float."""
        mean, std = self.tensors
        return pixels.float().div_(255).sub_(mean.to(pixels.device)).div_(std.to(pixels.device))


def to_tensor(img: Image.Image, normalize: Normalize = Normalize()) -> torch.Tensor:
    return normalize(torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1))  # (3, H, W)


def crop_map(importance: np.ndarray, box: tuple[float, float, float, float], image_hw: tuple[int, int],
             out: int, flip: bool) -> torch.Tensor:
    """Average the stored map over each output patch of a crop.

    importance: (gh, gw) cell averages over the whole image of size image_hw; box: (top, left,
    height, width) in image pixels. Each map cell is constant over its area, so an output patch
    gets the area-weighted mean of the cells it overlaps: exact for any map resolution, any
    crop and any patch grid. Returns (out, out) float32.
    """
    gh, gw = importance.shape
    h, w = image_hw
    top, left, bh, bw = box
    rows = _overlap(top * gh / h, bh * gh / h, gh, out)  # (out, gh)
    cols = _overlap(left * gw / w, bw * gw / w, gw, out)  # (out, gw)
    pooled = rows @ np.asarray(importance, dtype=np.float32) @ cols.T
    return torch.from_numpy(np.ascontiguousarray(pooled[:, ::-1] if flip else pooled))


def _overlap(start: float, length: float, cells: int, out: int) -> np.ndarray:
    """(out, cells): share of output bin i (of `out` equal bins over [start, start+length)) that
    falls in unit cell c; rows sum to 1 when the bins lie inside [0, cells]. NumPy, not torch:
    on arrays this small the per-op overhead is the cost, and this runs once per sample."""
    edges = start + length * np.arange(out + 1, dtype=np.float64) / out
    lo, hi = edges[:-1, None], edges[1:, None]  # (out, 1)
    c = np.arange(cells, dtype=np.float64)[None]  # (1, cells)
    inter = np.clip(np.minimum(hi, c + 1) - np.maximum(lo, c), 0, None)
    return (inter / (hi - lo)).astype(np.float32)


def crop_maps(maps: np.ndarray, boxes: np.ndarray, image_hw: np.ndarray, out: int, flips: np.ndarray
              ) -> torch.Tensor:
    """`crop_map` for a batch of maps of one shape: maps (B, gh, gw), boxes (B, 4) as (top, left,
    height, width), image_hw (B, 2), flips (B,) bool. The same arithmetic in a few array ops
    instead of B calls (float32 products in another order: equal to within rounding)."""
    _, gh, gw = maps.shape
    h, w = image_hw[:, 0:1].astype(np.float64), image_hw[:, 1:2].astype(np.float64)
    rows = _overlaps(boxes[:, 0:1] * gh / h, boxes[:, 2:3] * gh / h, gh, out)  # (B, out, gh)
    cols = _overlaps(boxes[:, 1:2] * gw / w, boxes[:, 3:4] * gw / w, gw, out)  # (B, out, gw)
    pooled = rows @ maps.astype(np.float32) @ cols.transpose(0, 2, 1)
    pooled[flips] = pooled[flips][:, :, ::-1]
    return torch.from_numpy(np.ascontiguousarray(pooled))


def _overlaps(start: np.ndarray, length: np.ndarray, cells: int, out: int) -> np.ndarray:
    """`_overlap` for a batch: start and length (B, 1) -> (B, out, cells)."""
    edges = start + length * np.arange(out + 1, dtype=np.float64)[None] / out  # (B, out + 1)
    lo, hi = edges[:, :-1, None], edges[:, 1:, None]
    c = np.arange(cells, dtype=np.float64)[None, None]
    inter = np.clip(np.minimum(hi, c + 1) - np.maximum(lo, c), 0, None)
    return (inter / (hi - lo)).astype(np.float32)


def random_resized_box(height: int, width: int, scale: tuple[float, float], ratio: tuple[float, float]
                       ) -> tuple[int, int, int, int]:
    """(top, left, h, w): torchvision's RandomResizedCrop.get_params drawn from Python's `random`
    (seeded per worker), which costs a fraction of its four tiny torch tensors per sample."""
    area = height * width
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target = area * random.uniform(scale[0], scale[1])
        aspect = math.exp(random.uniform(log_lo, log_hi))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return random.randint(0, height - h), random.randint(0, width - w), h, w
    in_ratio = width / height  # fallback: the largest centred box within the ratio range
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        w, h = int(round(height * max(ratio))), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


@dataclass(frozen=True)
class TrainTransform:
    """RandomResizedCrop + horizontal flip applied to image and map with the same box."""
    geometry: Geometry
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: float = 0.5
    normalize: Normalize = Normalize()

    def draw(self, height: int, width: int) -> tuple[tuple[int, int, int, int], bool]:
        """The random crop box (top, left, h, w) and flip for an image of this size: the only
        random draws, so a loader that knows the size from the header draws the same ones."""
        box = random_resized_box(height, width, self.scale, self.ratio)
        return box, random.random() < self.hflip

    def __call__(self, image: Image.Image, importance: np.ndarray | None
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
        (top, left, h, w), flip = self.draw(image.height, image.width)
        size = self.geometry.img_size
        img = TF.resized_crop(image, top, left, h, w, [size, size], antialias=True)
        if flip:
            img = TF.hflip(img)
        grid = None if importance is None else crop_map(
            importance, (top, left, h, w), (image.height, image.width), self.geometry.grid, flip)
        return to_tensor(img, self.normalize), grid


@dataclass(frozen=True)
class EvalTransform:
    """Resize the short side to img_size / crop_pct, centre crop: timm's eval transform."""
    geometry: Geometry
    crop_pct: float = 0.875
    normalize: Normalize = Normalize()

    def __call__(self, image: Image.Image, importance: np.ndarray | None
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
        size = self.geometry.img_size
        scale = math.floor(size / self.crop_pct) / min(image.width, image.height)
        h, w = size / scale, size / scale  # the centre crop, in original pixels
        top, left = (image.height - h) / 2, (image.width - w) / 2
        img = TF.center_crop(TF.resize(image, math.floor(size / self.crop_pct), antialias=True), [size, size])
        grid = None if importance is None else crop_map(
            importance, (top, left, h, w), (image.height, image.width), self.geometry.grid, False)
        return to_tensor(img, self.normalize), grid




# --- pipeline -----------------------------------------------------------------------------

@dataclass(frozen=True)
class Augment:
    """decode + transform, a module-level callable so it pickles into loader workers.

    Error policy: with `skip` (training's), a sample that cannot be decoded or transformed
    becomes {"key", "error"} and travels on to `collate`, which sets it aside in the batch's
    `skipped` list, so the loop can count it with its key; with `raise` the error stops the run."""
    transform: TrainTransform | EvalTransform
    need_maps: bool
    on_error: str = "skip"  # skip | raise

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any]:
        return self.guarded(self.apply, sample)

    def guarded(self, fn: Callable[[dict[str, Any]], dict[str, Any]], sample: dict[str, Any]) -> dict[str, Any]:
        """fn(sample) under the error policy: raise, or a {"key", "error"} record."""
        try:
            return fn(sample)
        except Exception as e:  # noqa: BLE001 - bad data of any kind: the policy decides
            if self.on_error == "raise":
                raise
            return {"key": str(sample.get("__key__")), "error": f"{type(e).__name__}: {e}"}

    def apply(self, sample: dict[str, Any]) -> dict[str, Any]:
        """decode + transform with no error policy: what `guarded` guards."""
        d = decode_sample(sample)
        if self.need_maps and d["importance"] is None:
            raise ValueError("no importance.npy, but token dropping by importance needs one")
        x, grid = self.transform(d["image"], d["importance"])
        return {"key": d["key"], "image": x, "label": d["label"], "importance": grid}


class Pending(NamedTuple):
    """A plain JPEG left for the training device to decode (`sparsevit.device_decode`)."""
    index: int  # its row in the batch
    jpeg: torch.Tensor  # the file's bytes, uint8
    box: tuple[int, int, int, int]  # the crop drawn in the worker: top, left, height, width
    flip: bool


@dataclass(frozen=True)
class Batch:
    """What the loader hands the training step: the decoded samples of one batch, in order.

    Samples that failed to decode are not rows: they are listed in `skipped` with their error.
    With device decoding, `image` holds only the rows listed in `ready` until
    `device_decode.finish_batch` decodes the `pending` ones."""
    keys: list[str]
    image: torch.Tensor | None  # (B, 3, S, S) normalised; None when no row is decoded yet
    label: torch.Tensor  # (B,) long
    importance: torch.Tensor | None  # (B, N) the maps pooled to the patch grid; None without maps
    skipped: list[tuple[str, str]]  # (key, error) of the samples that failed
    ready: list[int] = field(default_factory=list)  # rows of `image` while `pending` is not empty
    pending: list[Pending] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.keys)

    def pin_memory(self) -> "Batch":
        """Called by the DataLoader with pin_memory (CUDA): page-locked tensors copy faster."""
        def pin(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.pin_memory()
        return replace(self, image=pin(self.image), label=pin(self.label), importance=pin(self.importance))


@dataclass(frozen=True)
class Rest:
    """A worker's last, partial batch, as loose samples: `rebatch` joins it with the other
    workers' rests in the main process instead of training a small batch or dropping it."""
    samples: list[dict[str, Any]]


@dataclass(frozen=True)
class Collate:
    """`collate` for full batches; a shorter one (a worker's last) becomes a `Rest`."""
    batch_size: int

    def __call__(self, samples: list[dict[str, Any]]) -> Batch | Rest:
        return collate(samples) if len(samples) >= self.batch_size else Rest(samples)


def rebatch(batches: Iterable[Batch | Rest], batch_size: int) -> Iterator[Batch]:
    """Full batches as they come; the workers' rests joined into full batches as soon as they
    fill one. Fewer than `batch_size` samples are left over at the end (counted by `plan_epoch`)."""
    loose: list[dict[str, Any]] = []
    for batch in batches:
        if not isinstance(batch, Rest):
            yield batch
            continue
        loose += batch.samples
        while len(loose) >= batch_size:
            yield collate(loose[:batch_size])
            loose = loose[batch_size:]


def collate(samples: list[dict[str, Any]]) -> Batch:
    """The batch of the decoded samples (`Augment`'s output); those that failed go to `skipped`.
    Samples left for the device to decode carry "jpeg" instead of "image" and become `pending`."""
    good = [s for s in samples if "error" not in s]
    maps = [s["importance"] for s in good]
    ready = [i for i, s in enumerate(good) if "image" in s]
    pending = [Pending(i, s["jpeg"], s["box"], s["flip"]) for i, s in enumerate(good) if "jpeg" in s]
    return Batch(keys=[s["key"] for s in good],
                 image=torch.stack([good[i]["image"] for i in ready]) if ready else None,
                 label=torch.tensor([s["label"] for s in good], dtype=torch.long),
                 importance=torch.stack(maps).flatten(1) if good and all(m is not None for m in maps) else None,
                 skipped=[(s["key"], s["error"]) for s in samples if "error" in s],
                 ready=ready if pending else [], pending=pending)


def make_pipeline(plan: EpochPlan, augment: Callable[[dict[str, Any]], dict[str, Any]], batch_size: int,
                  shuffle_buffer: int, seed: int, epoch: int, partial: bool = False, split_nodes: bool = True
                  ) -> wds.DataPipeline:
    """Per rank and worker: its shards, samples shuffled in a buffer, decoded, batched.
    partial=False (training): a worker's last, short batch comes as a `Rest` for `rebatch`;
    partial=True (evaluation): as a small batch. split_nodes=False: the caller already chose
    this rank's shards (evaluation)."""
    stages: list[Any] = [wds.SimpleShardList(plan.urls), *([wds.split_by_node] if split_nodes else []),
                         wds.split_by_worker, wds.tarfile_to_samples()]
    if shuffle_buffer > 1:
        stages.append(wds.shuffle(shuffle_buffer, initial=shuffle_buffer,
                                  rng=random.Random(seed * 7919 + epoch)))
    collation = collate if partial else Collate(batch_size)
    stages += [wds.map(augment), wds.batched(batch_size, collation_fn=collation, partial=True)]
    return wds.DataPipeline(*stages)


def make_loader(pipeline: wds.DataPipeline, workers: int) -> torch.utils.data.DataLoader:
    """Batches are made in the workers (batch_size=None); worker seeds differ per epoch."""
    return torch.utils.data.DataLoader(pipeline, batch_size=None, num_workers=workers,
                                       worker_init_fn=_seed_worker if workers else None,
                                       persistent_workers=False, pin_memory=torch.cuda.is_available())


def _seed_worker(worker_id: int) -> None:
    die_with_parent()  # a killed run leaves no loader worker behind
    # torch seeds each worker from the base seed; python's random drives the crops.
    random.seed(torch.initial_seed() % 2**32)
    np.random.seed(torch.initial_seed() % 2**32)


def iterate(loader: torch.utils.data.DataLoader, steps: int, batch_size: int) -> Iterator[Batch]:
    """Exactly `steps` full batches, the workers' rests rebatched: the same count on every rank
    (see the module docstring). Fewer means the shards hold fewer samples than their index says."""
    it = rebatch(loader, batch_size)
    for step in range(steps):
        batch = next(it, None)
        if batch is None:
            raise FormatError(f"the loader ran out after {step} of {steps} batches: the shards hold fewer samples "
                              "than their index says (check them with `curate verify`)")
        yield batch


# --- mixup / cutmix on batches, maps included ----------------------------------------------

class MapMixup(Mixup):
    """timm's batch-mode Mixup/CutMix that mixes the token maps with the same weight and box.

    Mixup: map = lam * map + (1 - lam) * map[flipped batch]. CutMix: each patch takes the other
    image's map in proportion to how much of the patch the pasted box covers.
    """

    def mix(self, x: torch.Tensor, target: torch.Tensor, maps: torch.Tensor | None, grid: int
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        lam, use_cutmix = self._params_per_batch()
        if lam != 1.0:
            if use_cutmix:
                (yl, yh, xl, xh), lam = cutmix_bbox_and_lam(
                    x.shape, lam, ratio_minmax=self.cutmix_minmax, correct_lam=self.correct_lam)
                x[:, :, yl:yh, xl:xh] = x.flip(0)[:, :, yl:yh, xl:xh]
                if maps is not None:
                    maps = _cutmix_maps(maps, (yl, yh, xl, xh), x.shape[-1], grid)
            else:
                x.mul_(lam).add_(x.flip(0).mul(1.0 - lam))
                if maps is not None:
                    maps = lam * maps + (1.0 - lam) * maps.flip(0)
        return x, mixup_target(target, self.num_classes, lam, self.label_smoothing), maps


def _cutmix_maps(maps: torch.Tensor, box: tuple[int, int, int, int], size: int, grid: int) -> torch.Tensor:
    yl, yh, xl, xh = box
    pasted = torch.zeros(1, 1, size, size, device=maps.device)
    pasted[..., yl:yh, xl:xh] = 1.0
    frac = F.adaptive_avg_pool2d(pasted, grid).flatten()  # (grid*grid,) share of each patch pasted
    return maps * (1 - frac) + maps.flip(0) * frac
