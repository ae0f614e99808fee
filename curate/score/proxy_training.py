"""Train a proxy here for a few epochs and record its per-example training dynamics.

Scores from early training dynamics are the Tri-Level / EL2N way: per epoch, each example's
correctness, EL2N and margin are logged from the training forward pass itself (no extra pass).
State is saved after every epoch, so a killed job resumes at the last finished epoch and, with
per-epoch seeds, ends with the same weights as an uninterrupted run.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from timm.optim import param_groups_weight_decay
from torch import nn
from tqdm import tqdm

from curate.common.runtime import load_weights, save_weights
from curate.common.schedule import warmup_cosine
from curate.ingest.sources import Item
from curate.score import metrics
from curate.score.loader import DecodedItems, make_loader
from curate.score.proxies import Recipe, normalizer, to_model_input


@dataclass
class Dynamics:
    """Per-epoch logs, (E, N): what the trained proxy contributes beyond its final forward."""

    correct: torch.Tensor  # bool
    el2n: torch.Tensor  # float32, NaN where not seen
    margin: torch.Tensor  # float32, NaN where not seen
    loss: torch.Tensor  # float32, NaN where not seen

    @classmethod
    def empty(cls, epochs: int, n: int) -> "Dynamics":
        nan = torch.full((epochs, n), float("nan"))
        return cls(torch.zeros(epochs, n, dtype=torch.bool), nan, nan.clone(), nan.clone())

    def history(self) -> list[dict[str, float]]:
        """Per epoch: the training loss and accuracy over the examples seen (augmented, as trained,
        against the given labels). The proxy's health: near chance, every score is noise."""
        out = []
        for e in range(self.correct.shape[0]):
            seen = ~self.el2n[e].isnan()
            if seen.any():
                out.append({"epoch": e + 1, "loss": float(self.loss[e][seen].mean()),
                            "accuracy": float(self.correct[e][seen].float().mean())})
        return out

    def summary(self, skip: int = 0) -> dict[str, torch.Tensor]:
        """forgetting (N,) int, el2n_mean and margin_mean (N,) float over epochs[skip:].

        Skip the learning-rate warmup: a model near chance predicts one class for most inputs,
        so a mislabelled example can look "learned" once by luck and then "forgotten", which
        hides it among the clean ones (measured: docs/benchmarks.md, "Figures formerly quoted in
        code").
        """
        skip = skip if skip < self.correct.shape[0] else 0
        return {"forgetting": metrics.forgetting_counts(self.correct[skip:]).int(),
                "el2n_mean": self.el2n[skip:].nanmean(0), "margin_mean": self.margin[skip:].nanmean(0)}


@dataclass(frozen=True)
class TrainSetup:
    epochs: int
    batch_size: int
    workers: int
    device: torch.device
    seed: int
    state_path: Path  # resumable state, rewritten after each epoch
    name: str = "proxy"  # the proxy's name in progress bars


def dynamics_skip(recipe: Recipe) -> int:
    """Epochs left out of the training dynamics: those inside the learning-rate warmup."""
    return math.ceil(recipe.warmup_epochs)


def augment(images: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random horizontal flip and translation by up to 1/8 of the side (reflect padded)."""
    B, _, S, _ = images.shape  # (B, 3, S, S)
    pad = max(1, S // 8)
    padded = F.pad(images.float(), (pad, pad, pad, pad), mode="reflect")
    dx, dy = torch.randint(0, 2 * pad + 1, (2, B), generator=gen)
    flip = torch.rand(B, generator=gen) < 0.5
    out = torch.stack([padded[b, :, dy[b]:dy[b] + S, dx[b]:dx[b] + S] for b in range(B)])
    return torch.where(flip[:, None, None, None], out.flip(-1), out)


def train_proxy(model: nn.Module, items: Sequence[Item], recipe: Recipe, setup: TrainSetup,
                progress: bool = True) -> Dynamics:
    """Train `model` in place for setup.epochs and return the dynamics of every item."""
    n = len(items)
    labels = torch.tensor([it.label for it in items])
    steps_per_epoch = math.ceil(n / setup.batch_size)
    peak = recipe.lr * setup.batch_size / 128
    model.to(setup.device).train()  # before the optimizer, so its state lands on the same device
    opt = torch.optim.AdamW(param_groups_weight_decay(model, recipe.weight_decay), lr=peak)
    dyn, start = Dynamics.empty(setup.epochs, n), 0
    if setup.state_path.exists():
        start = _load_state(setup.state_path, model, opt, dyn)
    mean, std = (t.to(setup.device) for t in normalizer(model))
    dataset = DecodedItems(items, recipe.img_size)
    for epoch in range(start, setup.epochs):
        torch.manual_seed(setup.seed * 1_000_003 + epoch)  # dropout / drop-path, per epoch
        gen = torch.Generator().manual_seed(setup.seed * 1_000_003 + epoch)
        order = torch.randperm(n, generator=gen).tolist()
        batches = [order[i:i + setup.batch_size] for i in range(0, n, setup.batch_size)]
        loader = make_loader(dataset, batches, setup.workers)
        bar = tqdm(loader, desc=f"{setup.name} epoch {epoch + 1}/{setup.epochs}", unit="batch", leave=False,
                   disable=not progress)
        for step, (idx, images, metas) in enumerate(bar, start=epoch * steps_per_epoch):
            for group in opt.param_groups:
                group["lr"] = warmup_cosine(step, setup.epochs * steps_per_epoch,
                                            int(recipe.warmup_epochs * steps_per_epoch), peak)
            ok = torch.tensor([m.error == "" for m in metas]) & (labels[idx] >= 0)
            if not ok.any():
                continue
            idx, y = idx[ok], labels[idx[ok]]
            x = to_model_input(augment(images[ok], gen), mean, std)
            logits = model(x)
            loss = F.cross_entropy(logits, y.to(setup.device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            _record(dyn, epoch, idx, logits.detach().float().cpu(), y)
            bar.set_postfix(loss=f"{loss.item():.3f}")
        _save_state(setup.state_path, model, opt, dyn, epoch + 1)
    return dyn


def _record(dyn: Dynamics, epoch: int, idx: torch.Tensor, logits: torch.Tensor, y: torch.Tensor) -> None:
    s = metrics.example_scores(logits, y)
    dyn.correct[epoch, idx] = s["pred"] == y
    dyn.el2n[epoch, idx] = s["el2n"]
    dyn.margin[epoch, idx] = s["margin"]
    dyn.loss[epoch, idx] = s["loss"]


def _save_state(path: Path, model: nn.Module, opt: torch.optim.Optimizer, dyn: Dynamics, epoch: int) -> None:
    save_weights({"model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": epoch,
                  "correct": dyn.correct, "el2n": dyn.el2n, "margin": dyn.margin, "loss": dyn.loss}, path)


def _load_state(path: Path, model: nn.Module, opt: torch.optim.Optimizer, dyn: Dynamics) -> int:
    state = load_weights(path)
    if state["correct"].shape != dyn.correct.shape:
        raise ValueError(f"{path} was saved for a different run (epochs x items "
                         f"{tuple(state['correct'].shape)} != {tuple(dyn.correct.shape)}); use --overwrite")
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    dyn.correct.copy_(state["correct"]), dyn.el2n.copy_(state["el2n"]), dyn.margin.copy_(state["margin"])
    if "loss" in state:  # a state saved before the loss was kept resumes with the loss unknown (NaN)
        dyn.loss.copy_(state["loss"])
    return int(state["epoch"])


def health_warning(history: Sequence[dict[str, float]], classes: int, recipe_name: str) -> str:
    """A plain warning when the proxy ended its training near chance, or "". Its scores then rank
    nothing (measured: docs/benchmarks.md, "Figures formerly quoted in code")."""
    if not history or classes < 2:
        return ""
    chance = 1 / classes
    last = history[-1]["accuracy"]
    if last >= min(2 * chance, chance + 0.25):
        return ""
    return (f"the proxy {recipe_name} ended training at {last:.1%} accuracy, near chance ({chance:.1%} for "
            f"{classes} classes): its scores are close to noise. Train longer, or use a recipe that fits "
            "the images: `curate proxies` lists them (demo-cnn, a small CNN, for small images; demo-vit "
            "or imagenet-vit, ViTs sized for them, for importance maps)")
