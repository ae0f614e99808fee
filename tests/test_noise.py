"""bench/noise.py: each kind flips exactly round(rate * n) labels, where it says it does, the same
way for the same seed; cifar_shards' history (a random.Random) is drawn as before."""
from __future__ import annotations

import importlib.util
import random

import numpy as np
import pytest

from .conftest import ROOT

CIFAR = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def _noise():
    spec = importlib.util.spec_from_file_location("bench_noise", ROOT / "bench" / "noise.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


noise = _noise()


def _labels(per_class: int = 100, classes: int = len(CIFAR)) -> np.ndarray:
    return np.repeat(np.arange(classes), per_class)


def _probs(labels: np.ndarray, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).dirichlet(np.ones(len(CIFAR)), size=len(labels))


def _flip(kind: str, labels: np.ndarray, rate: float, seed) -> np.ndarray:
    if kind == "uniform":
        return noise.uniform(labels, rate, seed, len(CIFAR))
    if kind == "pairs":
        return noise.pairs(labels, rate, seed, CIFAR)
    return noise.instance(labels, rate, seed, _probs(labels))


@pytest.mark.parametrize("kind", ["uniform", "pairs", "instance"])
@pytest.mark.parametrize("rate", [0.0, 0.1, 0.2, 0.4])
@pytest.mark.parametrize("per_class", [100, 7])
def test_exactly_round_rate_n_flip(kind: str, rate: float, per_class: int):
    labels = _labels(per_class)
    given = _flip(kind, labels, rate, 3)
    assert (given != labels).sum() == round(rate * len(labels))
    assert given.dtype == labels.dtype and labels.tolist() == _labels(per_class).tolist()  # input untouched


@pytest.mark.parametrize("kind", ["uniform", "pairs", "instance"])
def test_a_seed_gives_the_same_flips(kind: str):
    labels = _labels()
    assert np.array_equal(_flip(kind, labels, 0.2, 5), _flip(kind, labels, 0.2, 5))
    assert np.array_equal(_flip(kind, labels, 0.2, np.random.default_rng(5)),
                          _flip(kind, labels, 0.2, np.random.default_rng(5)))
    assert np.array_equal(_flip(kind, labels, 0.2, random.Random(5)), _flip(kind, labels, 0.2, random.Random(5)))
    if kind != "instance":  # instance's seed only breaks ties, and random probabilities have none
        assert not np.array_equal(_flip(kind, labels, 0.2, 5), _flip(kind, labels, 0.2, 6))


def test_uniform_goes_to_other_classes_all_of_them():
    labels = _labels(1000)
    given = noise.uniform(labels, 0.4, 0, len(CIFAR))
    moved = given != labels
    assert given.min() >= 0 and given.max() < len(CIFAR)
    assert set(zip(labels[moved].tolist(), given[moved].tolist())) == {
        (a, b) for a in range(len(CIFAR)) for b in range(len(CIFAR)) if a != b}


def test_uniform_with_a_random_random_draws_as_cifar_shards_did():
    """The loop cifar_shards ran before bench/noise.py, on a rng that had already drawn."""
    labels = np.random.default_rng(0).integers(0, len(CIFAR), 500)
    old = random.Random(7)
    old.random()
    flipped = set(old.sample(list(range(len(labels))), round(0.1 * len(labels))))
    expected = [old.choice([c for c in range(len(CIFAR)) if c != int(y)]) if i in flipped else int(y)
                for i, y in enumerate(labels)]
    new = random.Random(7)
    new.random()
    assert noise.uniform(labels, 0.1, new, len(CIFAR)).tolist() == expected
    assert new.random() == old.random()  # and it leaves the rng where the old loop did


def test_pairs_flip_only_within_pairs_and_the_paired_classes_carry_the_rate():
    labels = _labels(100)
    given = noise.pairs(labels, 0.4, 0, CIFAR)
    moved = given != labels
    pairs = {(a, b) for a, b in noise.PAIRS} | {(b, a) for a, b in noise.PAIRS}
    assert {(CIFAR[a], CIFAR[b]) for a, b in zip(labels[moved], given[moved])} == pairs
    unpaired = np.isin(labels, [CIFAR.index("frog"), CIFAR.index("ship")])
    assert not moved[unpaired].any()
    # 400 flips over the 8 paired classes of 100: each flips its share, 50
    assert np.bincount(labels[moved], minlength=len(CIFAR)).tolist() == [50, 50, 50, 50, 50, 50, 0, 50, 0, 50]


def test_pairs_refuse_a_rate_the_paired_classes_cannot_carry():
    labels = _labels(10)  # 80 of the 100 images are in a pair
    assert (noise.pairs(labels, 0.8, 0, CIFAR) != labels).sum() == 80
    with pytest.raises(ValueError, match="paired classes have only 80 images"):
        noise.pairs(labels, 0.81, 0, CIFAR)
    with pytest.raises(ValueError, match="paired classes have only 0 images"):
        noise.pairs(_labels(10, classes=3), 0.1, 0, ("a", "b", "c"))


def test_instance_flips_each_classes_hardest_to_its_most_likely_other_class():
    labels = _labels(20)
    probs = _probs(labels, 1)
    given = noise.instance(labels, 0.2, 0, probs)
    moved = given != labels
    true_p = probs[np.arange(len(labels)), labels]
    for c in range(len(CIFAR)):
        mine = labels == c
        assert moved[mine].sum() == 4  # balanced: 20% of each class
        assert true_p[mine & moved].max() < true_p[mine & ~moved].min()  # the hardest ones
    others = probs.copy()
    others[np.arange(len(labels)), labels] = -1
    assert np.array_equal(given[moved], others[moved].argmax(1))


def test_instance_balances_uneven_classes_to_the_exact_total():
    labels = np.repeat(np.arange(3), [50, 30, 17])
    probs = np.random.default_rng(2).dirichlet(np.ones(3), size=len(labels))
    given = noise.instance(labels, 0.3, 0, probs)
    assert (given != labels).sum() == round(0.3 * 97)
    assert np.bincount(labels[given != labels], minlength=3).tolist() == [15, 9, 5]


@pytest.mark.parametrize("kind", ["uniform", "pairs", "instance"])
@pytest.mark.parametrize("rate", [-0.1, 1.5, float("nan")])
def test_bad_rates_are_refused(kind: str, rate: float):
    with pytest.raises(ValueError, match="rate must be in"):
        _flip(kind, _labels(10), rate, 0)


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="labels must be in"):
        noise.uniform(np.array([0, 10]), 0.1, 0, len(CIFAR))
    with pytest.raises(ValueError, match="integer array"):
        noise.uniform(np.array([0.0, 1.0]), 0.1, 0, len(CIFAR))
    with pytest.raises(ValueError, match="probs must be"):
        noise.instance(_labels(10), 0.1, 0, np.ones((99, len(CIFAR))))
