"""Perceptual hashes for near-duplicates: what tells a copy of a photograph (re-encoded, resized,
lightly cropped, mirrored) from another photograph that merely looks alike.

Per image, the `phash` column holds 4 views x (pHash + dHash), 256 bits each at hash size 16:
the image, its mirror, its centre 90% crop and that crop's mirror, so that a flipped or cropped
copy lands on one of its original's views. The hashes are imagehash's (`imagehash.phash`,
`imagehash.dhash`: a 64x64 grey image's low 16x16 DCT coefficients against their median; a
16x17 grey image's horizontal gradients), computed in torch on the whole decoded batch, so
scoring pays ~0.1 ms an image instead of imagehash's ~2-3 ms through PIL; tests/test_phash.py
checks the bits against imagehash's on the same grey pixels.

Two images' similarity is 1 - the smallest normalised Hamming distance between one's plain view
and any view of the other (pHash and dHash bits together: 512). Unrelated photographs sit near
0.5; copies near 1.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from curate.score.table import PHASH_BYTES

HASH_SIZE = 16  # imagehash's hash_size: 256 bits per hash
VIEWS = 4  # image, mirror, centre crop, mirrored centre crop
HASH_BYTES = 2 * HASH_SIZE ** 2 // 8  # pHash + dHash of one view: 64 bytes
CROP = 0.9  # centre crop share of each side: a copy cropped by a few pixels
_DCT_SIDE = 4 * HASH_SIZE  # imagehash's highfreq_factor 4: the DCT runs on 64x64


def _grey(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> float (B, 1, H, W), PIL's "L" weights (ITU-R 601-2 luma)."""
    w = torch.tensor([0.299, 0.587, 0.114], dtype=torch.float32).view(1, 3, 1, 1)
    return (images.float() * w).sum(1, keepdim=True)


def _resize(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    return F.interpolate(x, size=(h, w), mode="bilinear", antialias=True, align_corners=False)


def _dct_matrix(n: int) -> torch.Tensor:
    """DCT-II basis (unnormalised, as scipy.fftpack.dct): the median test ignores the scale."""
    k = torch.arange(n, dtype=torch.float64).view(-1, 1)
    i = torch.arange(n, dtype=torch.float64).view(1, -1)
    return (2 * torch.cos(math.pi * k * (2 * i + 1) / (2 * n))).float()


def phash_bits(grey64: torch.Tensor) -> torch.Tensor:
    """(B, 1, 64, 64) grey -> (B, 256) bool: low-frequency DCT coefficients above their median."""
    d = _dct_matrix(grey64.shape[-1])[:HASH_SIZE]  # only the low frequencies are kept: compute only them
    coeffs = (d @ grey64[:, 0] @ d.T).flatten(1)
    return coeffs > coeffs.median(dim=1, keepdim=True).values


def dhash_bits(grey: torch.Tensor) -> torch.Tensor:
    """(B, 1, 16, 17) grey -> (B, 256) bool: each pixel brighter than its left neighbour."""
    return (grey[:, 0, :, 1:] > grey[:, 0, :, :-1]).flatten(1)


def _view_bits(grey: torch.Tensor) -> torch.Tensor:
    """(B, 1, H, W) grey -> (B, 512) bool: pHash then dHash."""
    return torch.cat([phash_bits(_resize(grey, _DCT_SIDE, _DCT_SIDE)),
                      dhash_bits(_resize(grey, HASH_SIZE, HASH_SIZE + 1))], dim=1)


def views(grey: torch.Tensor) -> list[torch.Tensor]:
    """The 4 views of a grey batch, in the column's order."""
    h, w = grey.shape[-2:]
    ch, cw = max(1, round(h * CROP)), max(1, round(w * CROP))
    top, left = (h - ch) // 2, (w - cw) // 2
    crop = grey[..., top: top + ch, left: left + cw]
    return [grey, grey.flip(-1), crop, crop.flip(-1)]


def phashes(images: torch.Tensor) -> np.ndarray:
    """uint8 (B, 3, H, W) -> (B, PHASH_BYTES) uint8: the 4 views' hash bits, packed."""
    grey = _grey(images.cpu())
    bits = torch.cat([_view_bits(v) for v in views(grey)], dim=1).numpy()  # (B, 4 * 512)
    packed = np.packbits(bits, axis=1)
    assert packed.shape[1] == PHASH_BYTES  # the table's column width
    return packed


def similarity(a: np.ndarray, b: np.ndarray) -> float:
    """1 - the smallest normalised Hamming distance between b's plain view and any of a's views
    (and a's plain view and any of b's): two rows of the `phash` column."""
    va, vb = a.reshape(VIEWS, HASH_BYTES), b.reshape(VIEWS, HASH_BYTES)
    d = min(np.unpackbits(va ^ vb[0], axis=1).sum(1).min(), np.unpackbits(vb ^ va[0], axis=1).sum(1).min())
    return 1.0 - float(d) / (8 * HASH_BYTES)
