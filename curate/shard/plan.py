"""The shard plan: which key goes to which shard, in which order. Pure data, no I/O."""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from curate.common.hashing import key_digest
from curate.ingest.sources import MAX_KEY_LEN
from curate.shard.format import KEY, SPLIT, shard_filename


@dataclass(frozen=True)
class ShardPlan:
    """Which key goes to which shard, in which order (pure data)."""

    split: str  # "train" | "validation" (timm's default split names)
    shards: list[list[str]]  # keys per shard, in write order

    @property
    def num_samples(self) -> int:
        return sum(len(keys) for keys in self.shards)

    @property
    def filenames(self) -> list[str]:
        return [shard_filename(self.split, i) for i in range(len(self.shards))]


def plan_shards(
    keys: Sequence[str],
    split: str,
    samples_per_shard: int,
    shard_multiple: int = 1,
    seed: int = 0,
) -> ShardPlan:
    """Shuffle the keys deterministically and cut them into balanced shards.

    The order is the keys sorted by blake2b(seed, key), ties by key: a seeded permutation that
    depends neither on the input order nor on numpy's RNG version. The shard count is
    ceil(N / samples_per_shard) rounded UP to a multiple of `shard_multiple` (ranks x loader
    workers: every reader needs whole shards), capped at the largest multiple <= N so no shard
    is empty. Sizes differ by at most one (the first N % n shards get one more): strictly
    equal counts would need dropping or duplicating samples. With timm's `with_epoch` each
    worker then over- or under-runs by at most its number of shards per epoch, instead of by
    whole shard-size differences.
    """
    _check_plan_args(keys, split, samples_per_shard, shard_multiple)
    order = sorted(keys, key=lambda k: (key_digest(seed, k), k))
    sizes = _balanced_sizes(len(order), _num_shards(len(order), samples_per_shard, shard_multiple))
    starts = np.cumsum([0, *sizes]).tolist()
    return ShardPlan(split, [order[a:b] for a, b in zip(starts[:-1], starts[1:])])


def _check_plan_args(
    keys: Sequence[str], split: str, samples_per_shard: int, shard_multiple: int
) -> None:
    if samples_per_shard < 1 or shard_multiple < 1:
        raise ValueError(f"need samples_per_shard >= 1 and shard_multiple >= 1, "
                         f"got {samples_per_shard}, {shard_multiple}")
    # timm parses any split containing "tar" as a shard pattern (`_parse_split_info`).
    if not SPLIT.fullmatch(split) or "tar" in split:
        raise ValueError(f"split name {split!r} must match {SPLIT.pattern} without 'tar' "
                         "(e.g. train, validation)")
    bad = [k for k in keys if not KEY.fullmatch(k)]
    if bad:
        raise ValueError(f"{len(bad)} keys are not [A-Za-z0-9_-]{{1,{MAX_KEY_LEN}}} "
                         f"(webdataset cuts keys at the first dot): {bad[:5]}")
    dupes = sorted(k for k, c in Counter(keys).items() if c > 1)
    if dupes:
        raise ValueError(f"{len(dupes)} keys are listed more than once: {dupes[:5]}")
    if len(keys) < shard_multiple:
        raise ValueError(f"{len(keys)} keys cannot fill {shard_multiple} shards "
                         f"(shard_multiple = ranks x workers): some reader would get none")


def _num_shards(n_keys: int, samples_per_shard: int, multiple: int) -> int:
    n = math.ceil(math.ceil(n_keys / samples_per_shard) / multiple) * multiple
    return min(n, n_keys // multiple * multiple)  # still a multiple, and no shard empty


def _balanced_sizes(n_keys: int, n_shards: int) -> list[int]:
    base, extra = divmod(n_keys, n_shards)
    return [base + (i < extra) for i in range(n_shards)]
