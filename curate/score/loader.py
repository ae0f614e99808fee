"""Read and decode items in DataLoader workers; batches are explicit index lists.

Explicit batches keep the batch composition of every input identical between a clean run and
a resumed one, so per-example results match bit for bit.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch.utils.data import DataLoader, Dataset

from curate.common.runtime import die_with_parent
from curate.ingest.decode import DEFAULT_MAX_PIXELS, content_hash, decode_image
from curate.ingest.sources import Item, read_bytes


@dataclass(frozen=True)
class Meta:
    """What is known of an input after reading and decoding it."""

    error: str  # "" when the image decoded
    width: int
    height: int
    num_bytes: int
    content_hash: str


class DecodedItems(Dataset):
    """Map-style dataset: index -> (index, uint8 image (3, S, S) or zeros, Meta). Never raises."""

    def __init__(self, items: Sequence[Item], size: int, max_pixels: int = DEFAULT_MAX_PIXELS):
        self.items, self.size, self.max_pixels = items, size, max_pixels

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor, Meta]:
        if self.items[i].problem:  # known before reading (no label, a refused path, a cut tar)
            return i, self._blank(), Meta(self.items[i].problem, 0, 0, 0, "")
        try:
            data = read_bytes(self.items[i])
        except OSError as e:  # vanished or unreadable file: a row, not a crash
            return i, self._blank(), Meta(f"read failed: {e}", 0, 0, 0, "")
        dec = decode_image(data, self.size, self.max_pixels)
        image = dec.image if dec.image is not None else self._blank()
        return i, image, Meta(dec.error, dec.width, dec.height, len(data), content_hash(data))

    def _blank(self) -> torch.Tensor:
        return torch.zeros(3, self.size, self.size, dtype=torch.uint8)


def collate(batch: list[tuple[int, torch.Tensor, Meta]]) -> tuple[torch.Tensor, torch.Tensor, list[Meta]]:
    index = torch.tensor([b[0] for b in batch])
    images = torch.stack([b[1] for b in batch])  # (B, 3, S, S) uint8
    return index, images, [b[2] for b in batch]


def chunk_batches(start: int, stop: int, batch_size: int) -> list[list[int]]:
    """Consecutive batches of [start, stop); the last one may be short."""
    return [list(range(i, min(i + batch_size, stop))) for i in range(start, stop, batch_size)]


def make_loader(dataset: Dataset, batches: Sequence[Sequence[int]], workers: int,
                pin_memory: bool = False) -> DataLoader:
    kwargs: dict[str, Any] = {}
    if workers > 0:  # keep a few batches in flight per worker so the model never waits
        kwargs.update(prefetch_factor=4, persistent_workers=False)
    return DataLoader(dataset, batch_sampler=batches, num_workers=workers, collate_fn=collate,
                      pin_memory=pin_memory, worker_init_fn=_worker_init if workers > 0 else None, **kwargs)


def _worker_init(_: int) -> None:
    die_with_parent()  # a killed job leaves no decode worker behind
