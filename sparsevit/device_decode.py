"""JPEG decoding on the training device (`curate train --decode gpu`): a loader that keeps up.

PIL decodes a few hundred ImageNet-sized JPEGs a second per core; a small ViT on one GPU trains
thousands, and token dropping raises what the loader must deliver. So the loader workers do only
what needs no pixels: read the bytes, take the size from the JPEG header, draw the crop box and
flip (the same draws, in the same order, as the CPU path's `TrainTransform`) and re-project the
importance map through them. The main process then decodes the whole batch at once with nvJPEG
(`torchvision.io.decode_jpeg(..., device="cuda")`) and crops, resizes (bilinear, antialiased, as
PIL does), flips and normalises on the device. The maps are therefore exactly the CPU path's;
the pixels agree within what two JPEG decoders and two resize kernels differ by.

Samples a plain JPEG decoder would not decode the way curate's one decoder does (PNG, WebP,
CMYK, EXIF-rotated: `curate.shard.format.plain_jpeg`) take the CPU path in the worker and
join the batch already decoded.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torchvision.io import ImageReadMode, decode_jpeg

from curate.shard.format import DEFAULT_MAX_PIXELS, plain_jpeg, sample_importance, sample_label
from sparsevit.data import Augment, Batch, Normalize, TrainTransform, crop_map


@dataclass(frozen=True)
class DeferredAugment:
    """`Augment` for training, leaving plain JPEGs to be decoded on the device: such a sample
    becomes {key, jpeg (uint8 bytes tensor), box, flip, label, importance (cropped map)}; any
    other goes through `augment` as before (same error policy)."""
    augment: Augment
    max_pixels: int = DEFAULT_MAX_PIXELS

    def __post_init__(self) -> None:
        if not isinstance(self.augment.transform, TrainTransform):
            raise ValueError("device decoding is for training batches (TrainTransform)")

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any]:
        return self.augment.guarded(self._defer, sample)

    def _defer(self, sample: dict[str, Any]) -> dict[str, Any]:
        size = plain_jpeg(sample, self.max_pixels)
        if size is None:
            return self.augment.apply(sample)
        width, height = size
        label, importance = sample_label(sample), sample_importance(sample)
        if self.augment.need_maps and importance is None:
            raise ValueError("no importance.npy, but token dropping by importance needs one")
        transform = self.augment.transform
        assert isinstance(transform, TrainTransform)
        box, flip = transform.draw(height, width)
        grid = None if importance is None else crop_map(importance, box, (height, width),
                                                        transform.geometry.grid, flip)
        jpeg = torch.frombuffer(bytearray(sample["jpg"]), dtype=torch.uint8)
        return {"key": sample["__key__"], "jpeg": jpeg, "box": box, "flip": flip, "label": label,
                "importance": grid}


def finish_batch(batch: Batch, img_size: int, device: torch.device, normalize: Normalize = Normalize()) -> Batch:
    """The batch with every image decoded, on `device`, in key order: the pending JPEGs decoded
    there in one call, cropped, resized, flipped and normalised; the ready ones copied in. A JPEG
    the device decoder refuses leaves the batch and is listed under `skipped`, as in the CPU path."""
    if not batch.pending:
        return batch
    decoded = _decode_all([p.jpeg for p in batch.pending], device)
    images = torch.empty(len(batch), 3, img_size, img_size, device=device)
    if batch.ready:
        images[batch.ready] = batch.image.to(device, non_blocking=True)
    failed: dict[int, str] = {}
    for p, image in zip(batch.pending, decoded):
        if isinstance(image, str):
            failed[p.index] = image
        else:
            images[p.index] = crop_resize(image, p.box, p.flip, img_size, normalize)
    done = replace(batch, image=images, ready=[], pending=[])
    if not failed:
        return done
    rows = [i for i in range(len(batch)) if i not in failed]
    keep = torch.tensor(rows, dtype=torch.long)
    maps = batch.importance
    return replace(done, keys=[batch.keys[i] for i in rows], image=images[keep.to(device)] if rows else None,
                   label=batch.label[keep], importance=None if maps is None else maps[keep],
                   skipped=batch.skipped + [(batch.keys[i], error) for i, error in failed.items()])


def _decode_all(jpegs: list[torch.Tensor], device: torch.device) -> list[torch.Tensor | str]:
    """uint8 (3, H, W) per JPEG, decoded in one call; one by one when the batch call fails, an
    error message in place of each JPEG that does not decode."""
    try:
        return list(decode_jpeg(jpegs, mode=ImageReadMode.RGB, device=device))
    except RuntimeError:
        pass
    out: list[torch.Tensor | str] = []
    for jpeg in jpegs:
        try:
            out.append(decode_jpeg(jpeg, mode=ImageReadMode.RGB, device=device))
        except RuntimeError as e:
            first_line = (str(e).splitlines() or [repr(e)])[0]
            out.append(f"DecodeError: {device.type} JPEG decoder: {first_line}")
    return out


def crop_resize(image: torch.Tensor, box: tuple[int, int, int, int], flip: bool, size: int,
                normalize: Normalize = Normalize()) -> torch.Tensor:
    """uint8 (3, H, W) -> the normalised float (3, size, size) crop, as `TrainTransform` makes it
    with PIL: bilinear with antialiasing, rounded to uint8 before normalising."""
    top, left, h, w = box
    crop = image[:, top:top + h, left:left + w].unsqueeze(0).float()
    out = F.interpolate(crop, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    out = out.round_().clamp_(0, 255).squeeze(0)
    if flip:
        out = out.flip(-1)
    return normalize(out)
