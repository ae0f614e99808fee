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
from typing import Callable, Sequence

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


def augment(images: torch.Tensor, gen: torch.Generator, translate: int = 0,
            flip: torch.Tensor | None = None) -> torch.Tensor:
    """Horizontal flip (at random, or where `flip` says) and translation by up to `translate`
    pixels (0: 1/8 of the side), reflect padded."""
    B, _, S, _ = images.shape  # (B, 3, S, S)
    pad = translate or max(1, S // 8)
    padded = F.pad(images.float(), (pad, pad, pad, pad), mode="reflect")
    dx, dy = torch.randint(0, 2 * pad + 1, (2, B), generator=gen)
    flip = torch.rand(B, generator=gen) < 0.5 if flip is None else flip
    out = torch.stack([padded[b, :, dy[b]:dy[b] + S, dx[b]:dx[b] + S] for b in range(B)])
    return torch.where(flip[:, None, None, None], out.flip(-1), out)


# airbench's choices that are not hyperparameters of a recipe: batch-norm shifts learn 64x faster
# (without more weight decay), the whitening layer's bias learns for 3 epochs, and lookahead
# averaging starts at epoch 3, every 5 steps, its decay rising as (step / total)^3 to 0.95^5.
BIAS_LR_SCALE = 64.0
WHITEN_BIAS_EPOCHS = 3
LOOKAHEAD_START, LOOKAHEAD_EVERY, LOOKAHEAD_BASE = 3, 5, 0.95 ** 5


@dataclass
class Stepper:
    """The optimizer and the learning rate of every group at each step."""

    opt: torch.optim.Optimizer
    lr_at: Callable[[int], list[float]]

    def set_lr(self, step: int) -> None:
        for group, lr in zip(self.opt.param_groups, self.lr_at(step)):
            group["lr"] = lr


def make_stepper(model: nn.Module, recipe: Recipe, batch_size: int, total: int, warmup: int) -> Stepper:
    """The recipe's optimizer over `model`'s trainable parameters, for `total` steps."""
    if recipe.optimizer == "adamw":
        peak = recipe.lr * batch_size / 128
        opt: torch.optim.Optimizer = torch.optim.AdamW(param_groups_weight_decay(model, recipe.weight_decay), lr=peak)
        return Stepper(opt, lambda step: [warmup_cosine(step, total, warmup, peak)] * len(opt.param_groups))
    if recipe.optimizer != "sgd":
        raise ValueError(f"recipe optimizer must be adamw or sgd, got {recipe.optimizer!r}")
    momentum = 0.85
    # Per-example step and decay independent of batch and momentum (airbench's decoupling): for a
    # mean loss over the batch, lr per step = lr * batch / (1024 * (1 + 1 / (1 - momentum))).
    per_kilo = 1024 * (1 + 1 / (1 - momentum))
    lr, decay = recipe.lr * batch_size / per_kilo, recipe.weight_decay * batch_size / per_kilo
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]  # batch-norm shifts: "*norm*"
    norm = [p for n, p in named if "norm" in n]
    other = [p for n, p in named if "norm" not in n]
    rates = [lr * BIAS_LR_SCALE, lr]
    opt = torch.optim.SGD([{"params": norm, "weight_decay": decay / rates[0]},
                           {"params": other, "weight_decay": decay / rates[1]}],
                          lr=lr, momentum=momentum, nesterov=True)
    return Stepper(opt, lambda step: [r * _triangle(step, total, warmup) for r in rates])


def _triangle(step: int, total: int, peak_at: int) -> float:
    """airbench's schedule: 0.2 -> 1 linearly until `peak_at`, then down to 0.07 at `total`."""
    if step < peak_at:
        return 0.2 + 0.8 * step / peak_at
    return 1 + (0.07 - 1) * (step - peak_at) / max(1, total - peak_at)


class Lookahead:
    """Weights pulled towards their running average every few steps (hlb-CIFAR10 / airbench): the
    average of the last epochs is what scores. At an epoch's end the weights ARE the average, so
    a resumed run starts it again from the weights it loads and continues exactly."""

    def __init__(self, model: nn.Module):
        self.average = {k: v.detach().clone() for k, v in model.state_dict().items()}

    def update(self, model: nn.Module, decay: float) -> None:
        for avg, now in zip(self.average.values(), model.state_dict().values()):
            if now.dtype.is_floating_point:
                avg.lerp_(now, 1 - decay)
                now.copy_(avg)


def _lookahead_step(look: Lookahead | None, model: nn.Module, epoch: int, step: int, total: int) -> Lookahead | None:
    if epoch < LOOKAHEAD_START or (step + 1) % LOOKAHEAD_EVERY:
        return look
    if look is None:
        return Lookahead(model)
    look.update(model, LOOKAHEAD_BASE * ((step + 1) / total) ** 3)
    return look


def _init_whitening(model: nn.Module, dataset: DecodedItems, recipe: Recipe, mean: torch.Tensor,
                    std: torch.Tensor, seed: int, workers: int) -> None:
    """airbench's first layer whitens the 2x2 patches of (up to) 5,000 training images."""
    n = len(dataset.items)
    pick = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:5000].sort().values.tolist()
    chunks = [pick[i:i + 500] for i in range(0, len(pick), 500)]
    images = [to_model_input(x[[m.error == "" for m in metas]], mean, std)
              for _, x, metas in make_loader(dataset, chunks, workers)]
    model.init_whitening(torch.cat(images).cpu())  # type: ignore[operator]


def train_proxy(model: nn.Module, items: Sequence[Item], recipe: Recipe, setup: TrainSetup,
                progress: bool = True) -> Dynamics:
    """Train `model` in place for setup.epochs and return the dynamics of every item."""
    n = len(items)
    labels = torch.tensor([it.label for it in items])
    steps_per_epoch = math.ceil(n / setup.batch_size)
    total = setup.epochs * steps_per_epoch
    mean, std = (t.to(setup.device) for t in normalizer(model))
    dataset = DecodedItems(items, recipe.img_size)
    model.to(setup.device).train()  # before the optimizer, so its state lands on the same device
    whitens = hasattr(model, "init_whitening")
    if whitens and not setup.state_path.exists():  # on resume the weights come from the state
        _init_whitening(model, dataset, recipe, mean, std, setup.seed, setup.workers)
    stepper = make_stepper(model, recipe, setup.batch_size, total, int(recipe.warmup_epochs * steps_per_epoch))
    dyn, start = Dynamics.empty(setup.epochs, n), 0
    if setup.state_path.exists():
        start = _load_state(setup.state_path, model, stepper.opt, dyn)
    look = Lookahead(model) if recipe.optimizer == "sgd" and start > LOOKAHEAD_START else None
    # airbench's alternating flip: a fixed random half mirrored on even epochs, the other half on odd
    mirrored = torch.rand(n, generator=torch.Generator().manual_seed(setup.seed)) < 0.5
    for epoch in range(start, setup.epochs):
        torch.manual_seed(setup.seed * 1_000_003 + epoch)  # dropout / drop-path, per epoch
        gen = torch.Generator().manual_seed(setup.seed * 1_000_003 + epoch)
        if whitens:
            model.whiten.bias.requires_grad_(epoch < WHITEN_BIAS_EPOCHS)  # type: ignore[union-attr]
        order = torch.randperm(n, generator=gen).tolist()
        batches = [order[i:i + setup.batch_size] for i in range(0, n, setup.batch_size)]
        loader = make_loader(dataset, batches, setup.workers)
        bar = tqdm(loader, desc=f"{setup.name} epoch {epoch + 1}/{setup.epochs}", unit="batch", leave=False,
                   disable=not progress)
        for step, (idx, images, metas) in enumerate(bar, start=epoch * steps_per_epoch):
            stepper.set_lr(step)
            ok = torch.tensor([m.error == "" for m in metas]) & (labels[idx] >= 0)
            if not ok.any():
                continue
            idx, y = idx[ok], labels[idx[ok]]
            flip = mirrored[idx] ^ bool(epoch % 2) if recipe.alternate_flip else None
            x = to_model_input(augment(images[ok], gen, recipe.translate, flip), mean, std)
            logits = model(x)
            loss = F.cross_entropy(logits, y.to(setup.device), label_smoothing=recipe.label_smoothing)
            stepper.opt.zero_grad(set_to_none=True)
            loss.backward()
            stepper.opt.step()
            if recipe.optimizer == "sgd":
                look = _lookahead_step(look, model, epoch, step, total)
            _record(dyn, epoch, idx, logits.detach().float().cpu(), y)
            bar.set_postfix(loss=f"{loss.item():.3f}")
        if look is not None:
            look.update(model, 1.0)  # the epoch ends on the average
        save_state(setup.state_path, model, stepper.opt, dyn, epoch + 1)
    return dyn


def _record(dyn: Dynamics, epoch: int, idx: torch.Tensor, logits: torch.Tensor, y: torch.Tensor) -> None:
    s = metrics.example_scores(logits, y)
    dyn.correct[epoch, idx] = s["pred"] == y
    dyn.el2n[epoch, idx] = s["el2n"]
    dyn.margin[epoch, idx] = s["margin"]
    dyn.loss[epoch, idx] = s["loss"]


def save_state(path: Path, model: nn.Module, opt: torch.optim.Optimizer, dyn: Dynamics, epoch: int) -> None:
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
