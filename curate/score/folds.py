"""K-fold proxies: every example scored by a proxy that never trained on it.

A proxy trained on the example it scores has partly memorised that example's label, wrong or not;
a proxy trained on the other K-1 folds has not. The out-of-sample class probabilities are what
confident learning needs to find label errors (cleanlab's own recipe is 5-fold cross-validation).

Here: which fold each input is in, and the fold proxies themselves (trained or, on resume, loaded).
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from curate.common.atomic import file_sha256
from curate.common.dist import Dist
from curate.common.hashing import unit_hash
from curate.common.runtime import load_weights, save_weights
from curate.ingest.sources import Item
from curate.score.proxies import ProxyModel, Recipe, create_model
from curate.score.proxy_training import TrainSetup, train_proxy


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


def fold_files(fold: int) -> tuple[str, str]:
    """(weights, training state) of the proxy trained without fold `fold`, relative to the run folder."""
    return f"proxy/fold-{fold}/model.pt", f"proxy/fold-{fold}/train-state.pt"


@dataclass(frozen=True)
class FoldTraining:
    """What training the K fold proxies takes from the run's settings."""

    k: int  # number of folds, >= 2
    epochs: int
    seed: int  # the run's; each fold trains from its own seed derived from it
    classes: int  # head size, the full proxy's
    workers: int
    out: Path  # the run folder: fold F's files are `fold_files(F)` in it
    name: str  # the proxy's name, in progress bars
    progress: bool


@dataclass(frozen=True)
class HeldOut:
    """The fold proxies: `proxies[f]` never trained on the items with `folds == f`."""

    folds: np.ndarray  # int16 (N,), fold per item
    proxies: list[ProxyModel]

    def logits(self, images: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """Each image's logits from the proxy that held it out (one forward per fold present)."""
        fold = torch.from_numpy(self.folds[idx.numpy()].astype(np.int64))
        out: torch.Tensor | None = None
        for f in fold.unique().tolist():
            rows = fold == f
            logits = self.proxies[f].score_batch(images[rows]).logits.float().cpu()
            out = torch.empty(len(images), logits.shape[1]) if out is None else out
            out[rows] = logits
        assert out is not None
        return out


def train_fold_proxies(plan: FoldTraining, recipe: Recipe, items: Sequence[Item], device: torch.device,
                       group: Dist) -> tuple[HeldOut, dict[str, Any]]:
    """Train (or, on resume, load) the K fold proxies; returns them and their manifest record.

    The folds are dealt out over the ranks, rank 0 last (it then trains the proxy on everything
    while the others wait); each fold is trained by one process exactly as a single process
    would train it, so the table does not depend on the number of ranks."""
    folds = assign_folds([it.key for it in items], [it.label for it in items], plan.k, plan.seed)
    histories: dict[int, list[dict[str, float]]] = {}

    def train_fold(f: int) -> None:
        model = _fold_model(plan, recipe, f)
        subset = [items[i] for i in np.flatnonzero(folds != f)]
        weights, state = (plan.out / name for name in fold_files(f))
        setup = TrainSetup(plan.epochs, recipe.batch_size, plan.workers, device, _fold_seed(plan.seed, f),
                           state, name=f"{plan.name} fold {f + 1}/{plan.k}")
        histories[f] = train_proxy(model, subset, recipe, setup, progress=plan.progress).history()
        save_weights(model.state_dict(), weights)

    group.deal(list(range(plan.k)), train_fold, first_rank=1)
    proxies = []
    for f in range(plan.k):
        model = _fold_model(plan, recipe, f)
        model.load_state_dict(load_weights(plan.out / fold_files(f)[0]))
        proxies.append(ProxyModel(model, "none", flip_tta=recipe.flip_tta).to(device))
    histories = {k: v for h in group.all_gather(histories) for k, v in h.items()}
    record = {"k": plan.k, "stratified_by": "label", "seed": plan.seed, "per_fold": [
        {"fold": f, "held_out": int((folds == f).sum()), "checkpoint": str(plan.out / fold_files(f)[0]),
         "checkpoint_sha256": file_sha256(plan.out / fold_files(f)[0]), "history": histories[f]}
        for f in range(plan.k)]}
    return HeldOut(folds, proxies), record


def _fold_seed(seed: int, fold: int) -> int:
    return seed * 1_000_003 + 7919 * (fold + 1)  # distinct from the full proxy's and the other folds'


def _fold_model(plan: FoldTraining, recipe: Recipe, fold: int) -> torch.nn.Module:
    torch.manual_seed(_fold_seed(plan.seed, fold))
    return create_model(recipe, plan.classes, False)
