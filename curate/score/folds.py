"""K-fold proxies: every example scored by a proxy that never trained on it.

A proxy trained on the example it scores has partly memorised that example's label, wrong or not;
a proxy trained on the other K-1 folds has not. The out-of-sample class probabilities are what
confident learning needs to find label errors (cleanlab's own recipe is 5-fold cross-validation).
"""
from __future__ import annotations

from collections import Counter
from typing import Sequence

import numpy as np

from curate.common.hashing import unit_hash


def assign_folds(keys: Sequence[str], labels: Sequence[int], k: int, seed: int) -> np.ndarray:
    """Fold index (int16, 0..k-1) per item, stratified by label and seeded.

    Within each class the items are ordered by a hash of (seed, key) and dealt out round-robin,
    starting at a class-dependent fold, so every fold gets floor or ceil of a class's share and the
    folds' sizes differ by at most one per class. A pure function of (keys, labels, k, seed):
    every rank and every resume computes the same folds.
    """
    if k < 2:
        raise ValueError(f"folds must be >= 2 to hold any example out, got {k}")
    labels_arr = np.asarray(labels, np.int64)
    u = unit_hash(list(keys), seed)
    folds = np.empty(len(labels_arr), np.int16)
    for offset, label in enumerate(np.unique(labels_arr)):
        rows = np.flatnonzero(labels_arr == label)
        rows = rows[np.argsort(u[rows], kind="stable")]
        folds[rows] = (np.arange(len(rows)) + offset) % k
    return folds


def check_folds(labels: Sequence[int], class_names: Sequence[str], k: int) -> None:
    """K folds need K inputs of every class: with fewer, some folds hold out nothing of that
    class (or nothing at all) and their proxies are trained for nothing. Labels < 0 (error rows)
    are not dealt into folds and do not count."""
    if k < 2:
        return
    counts = Counter(label for label in labels if label >= 0)
    names = dict(zip(labels, class_names))
    label, smallest = min(counts.items(), key=lambda lc: (lc[1], lc[0]))
    if smallest < k:
        fix = f"use --folds {smallest} or fewer" if smallest >= 2 else "folds need 2 inputs of every class"
        raise ValueError(f"--folds {k}: class {names.get(label) or label} has only {smallest} input(s), so some "
                         f"folds would hold out none of it; {fix}")
