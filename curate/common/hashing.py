"""Seeded per-key hashes: one number per (seed, key) that depends on nothing else.

Selection (random policy, CCS strata order), the shard order and dynamic example pruning all
draw "random" decisions this way, so a decision never depends on row order, on the number of
ranks or workers, or on a library's RNG version. blake2b, not Python's `hash` (salted per
process) nor polars' `hash` (not promised stable across versions).
"""
from __future__ import annotations

import hashlib
from typing import Sequence

import numpy as np


def key_digest(seed: int, key: str, tag: str = "") -> bytes:
    """8 bytes of blake2b over (seed, tag, key); `tag` separates independent draws of one seed."""
    text = f"{seed}\0{key}" if not tag else f"{seed}\0{tag}\0{key}"
    return hashlib.blake2b(text.encode(), digest_size=8).digest()


def unit(seed: int, key: str, tag: str = "") -> float:
    """A uniform number in [0, 1) for one key: the top 53 bits of its digest, exact in a float."""
    return (int.from_bytes(key_digest(seed, key, tag), "little") >> 11) / float(1 << 53)


def unit_hash(keys: Sequence[str], seed: int, tag: str = "") -> np.ndarray:
    """`unit` for every key, as float64 (N,)."""
    words = np.fromiter((int.from_bytes(key_digest(seed, k, tag), "little") for k in keys),
                        dtype=np.uint64, count=len(keys))
    return (words >> np.uint64(11)).astype(np.float64) / float(1 << 53)
