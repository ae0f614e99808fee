"""Label noise for benchmarks, of three kinds, each flipping exactly round(rate * n) of n labels, so
a rate is what it says:

    uniform   each flipped label goes to a uniformly drawn other class (the textbook noise)
    pairs     labels flip within the pairs people confuse (cat <-> dog, automobile <-> truck, ...)
    instance  the hardest images of each class go to the class a model finds most like them

Labels people give are rarely wrong uniformly: they follow look-alike classes and hard images (see
CIFAR-10N, Wei et al. 2022, CIFAR-10 relabelled by people), and such flips are harder to find than
uniform ones, since the wrong label is a plausible one. Pure numpy; a function takes the true
labels and returns the given ones.

A seed is an int, a numpy Generator, or a `random.Random`: the last draws exactly as
bench/experiments/cifar_shards.py drew before this module existed, so its default run, which
docs/benchmarks.md's figures come from, picks and flips the same images as it always did.
"""
from __future__ import annotations

import random
from typing import Sequence

import numpy as np

Seed = int | np.random.Generator | random.Random
KINDS = ("uniform", "pairs", "instance")
# CIFAR-10's classes that people confuse with each other, by name; a class in no pair keeps its labels.
PAIRS = (("cat", "dog"), ("automobile", "truck"), ("deer", "horse"), ("bird", "airplane"))


def _rng(seed: Seed) -> np.random.Generator | random.Random:
    return seed if isinstance(seed, (np.random.Generator, random.Random)) else np.random.default_rng(seed)


def _sample(rng: np.random.Generator | random.Random, n: int, k: int) -> np.ndarray:
    """k distinct positions in range(n), in drawn order (k = n: a permutation)."""
    if isinstance(rng, random.Random):
        return np.array(rng.sample(range(n), k), dtype=np.int64)
    return rng.choice(n, size=k, replace=False).astype(np.int64)


def _below(rng: np.random.Generator | random.Random, m: int, size: int) -> np.ndarray:
    """`size` integers drawn uniformly from range(m)."""
    if isinstance(rng, random.Random):
        # randrange(m) is choice(range(m)): the draw cifar_shards made per flipped label, in index order.
        return np.array([rng.randrange(m) for _ in range(size)], dtype=np.int64)
    return rng.integers(m, size=size).astype(np.int64)


def _count(labels: np.ndarray, rate: float, classes: int) -> int:
    """round(rate * n), after checking the labels and the rate."""
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be a 1-D integer array, got {labels.dtype} of shape {labels.shape}")
    if len(labels) and (labels.min() < 0 or labels.max() >= classes):
        raise ValueError(f"labels must be in [0, {classes}), got [{labels.min()}, {labels.max()}]")
    if not 0.0 <= rate <= 1.0:  # NaN fails this too
        raise ValueError(f"the noise rate must be in [0, 1], got {rate}")
    return int(round(rate * len(labels)))


def _shares(counts: np.ndarray, k: int) -> np.ndarray:
    """k split over classes in proportion to their counts, by largest remainder: exactly k in all,
    never more than a class has (k <= counts.sum())."""
    quota = k * counts / max(int(counts.sum()), 1)
    shares = np.floor(quota).astype(np.int64)
    rest = np.argsort(-(quota - shares), kind="stable")[:k - int(shares.sum())]  # ties: the lower class
    shares[rest] += 1
    return shares


def uniform(labels: np.ndarray, rate: float, seed: Seed, classes: int) -> np.ndarray:
    """Given labels: round(rate * n) labels drawn at random, each moved to a uniformly drawn one of
    the `classes` - 1 other classes."""
    if classes < 2:
        raise ValueError(f"uniform noise needs at least 2 classes, got {classes}")
    k, rng = _count(labels, rate, classes), _rng(seed)
    flipped = np.sort(_sample(rng, len(labels), k))
    other = _below(rng, classes - 1, k)
    given = labels.copy()
    given[flipped] = other + (other >= labels[flipped])  # skip the true class
    return given


def pairs(labels: np.ndarray, rate: float, seed: Seed, names: Sequence[str],
          confused: Sequence[tuple[str, str]] = PAIRS) -> np.ndarray:
    """Given labels: round(rate * n) labels moved to their class's partner in `confused` (class i
    is called names[i]; a pair applies when both its names are classes).

    The rate is of all n labels, and the paired classes carry it: classes in no pair (CIFAR-10's
    frog and ship) keep every label, so the paired ones flip more than `rate` of theirs. Each
    paired class flips its share (in proportion to its size), images drawn at random within it.
    A rate that needs more flips than the paired classes have images is refused.
    """
    k, rng = _count(labels, rate, len(names)), _rng(seed)
    partner = np.full(len(names), -1, dtype=np.int64)
    index = {name: i for i, name in enumerate(names)}
    for a, b in confused:
        if a in index and b in index:
            partner[index[a]], partner[index[b]] = index[b], index[a]
    paired = partner[labels] >= 0
    if k > paired.sum():
        raise ValueError(f"a pair-noise rate of {rate} flips {k} of {len(labels)} labels, but the paired classes "
                         f"have only {int(paired.sum())} images (at most {paired.sum() / max(len(labels), 1):.3f})")
    counts = np.bincount(labels[paired], minlength=len(names))
    given = labels.copy()
    for c, share in enumerate(_shares(counts, k)):
        members = np.flatnonzero(labels == c)
        given[members[_sample(rng, len(members), int(share))]] = partner[c]
    return given


def instance(labels: np.ndarray, rate: float, seed: Seed, probs: np.ndarray) -> np.ndarray:
    """Given labels: the round(rate * n) images a model finds least like their class, each moved
    to the other class it finds most likely. Balanced: each class flips its share (in proportion
    to its size), its images with the lowest true-class probability; the seed only breaks ties.

    `probs` (n, C) are per-image class probabilities that did not see the image's label in
    training: the out-of-sample `probs` of `curate score --folds K` on clean labels, or a model
    trained on other, clean data. In-sample probabilities have memorised the labels, so the
    "hardest" images would be whatever the model happened not to fit.
    """
    if probs.ndim != 2 or probs.shape[0] != len(labels) or probs.shape[1] < 2:
        raise ValueError(f"probs must be (n={len(labels)}, C >= 2), got shape {probs.shape}")
    k, rng = _count(labels, rate, probs.shape[1]), _rng(seed)
    rows = np.arange(len(labels))
    others = probs.astype(np.float64)  # a copy: the true class is masked out below
    others[rows, labels] = -np.inf
    order = _sample(rng, len(labels), len(labels))  # a random order, so equal probabilities tie at random
    order = order[np.argsort(probs[order, labels[order]], kind="stable")]  # hardest first
    given = labels.copy()
    for c, share in enumerate(_shares(np.bincount(labels, minlength=probs.shape[1]), k)):
        hardest = order[labels[order] == c][:share]
        given[hardest] = others[hardest].argmax(1)
    return given
