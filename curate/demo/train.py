"""The demo's last stage: train the same small ViT on full data, on `curate shard`'s default
selection ("clean": label issues and near-duplicates dropped) for full data's budget, and on random-70%,
curated-70% and curated-70% + token keep 0.7 shards for full data's epochs; compare accuracy and
wall-clock. Every variant reads shards written by `curate shard` and trains with `curate train`.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from curate.common.atomic import save_figure
from curate.common.runfolder import RunFolder
from curate.select.policies import SelectConfig
from curate.shard.job import ShardConfig, run_shard
from sparsevit.model import SparseConfig
from sparsevit.train import TrainConfig, run_train

# A plain ViT at the demo's 64 px: 8x8 patches of 8 px, small enough for minutes on 2 CPU cores.
DEMO_MODEL: dict[str, Any] = {"model": "vit_tiny_patch16_224", "img_size": 64, "patch_size": 8,
                              "model_kwargs": {"depth": 4, "embed_dim": 128, "num_heads": 4}}


@dataclass(frozen=True)
class Variant:
    """A training variant of the demo and of the equal-budget comparison (curate/demo/budget.py):
    a shard set and what `curate train` does differently on it."""

    name: str
    shards: str  # shard set under the demo's output (the dataset root)
    keep: float = 1.0  # input token keep ratio
    drop_by: str = "importance"
    token_scale: float = 1.0  # train and evaluate at a lower resolution with ~this share of the tokens
    example_pruning: str = "none"
    # trained for full data's budget in samples seen (more epochs over a smaller set), not for its epochs
    equal_budget: bool = False

    def train_fields(self, model: dict[str, Any]) -> dict[str, Any]:
        """The TrainConfig fields of the variant on `model` (DEMO_MODEL's keys)."""
        model = dict(model)
        if self.token_scale < 1:
            model["img_size"] = low_res_size(model["img_size"], model["patch_size"], self.token_scale)
        return {**model, "keep": self.keep, "sparse": SparseConfig(drop_by=self.drop_by),
                "example_pruning": self.example_pruning}


def low_res_size(img_size: int, patch: int, token_scale: float) -> int:
    """The image size whose patch grid holds the nearest whole square to `token_scale` of the
    full grid's tokens: 64 px / patch 8 at 0.7 -> 56 px (49 of 64 tokens); 224 / 16 -> 192."""
    side = max(1, round(math.sqrt(token_scale * (img_size // patch) ** 2)))
    return side * patch


# OUT/shards is what `curate shard` selects by default; "curated 70%" was its default until the
# equal-budget benchmark found it behind full data (docs/benchmarks.md, "The value where users prune")
VARIANTS = (Variant("full", "shards-full"), Variant("clean (default)", "shards", equal_budget=True),
            Variant("random 70%", "shards-random"), Variant("curated 70%", "shards-curated"),
            Variant("curated 70% + keep 0.7", "shards-curated", keep=0.7))


@dataclass(frozen=True)
class DemoTrain:
    epochs: int = 15
    batch_size: int = 64
    lr: float = 4e-3  # for a global batch of 512 (scaled: 5e-4 at batch 64)
    workers: int = 2
    seed: int = 0
    variants: tuple[Variant, ...] = VARIANTS
    extra: dict[str, Any] = field(default_factory=dict)  # TrainConfig overrides (tests: smaller)


def baseline_shards(folder: RunFolder, data: Path, scores: tuple[Path, ...], seed: int, per_shard: int,
                    progress: bool) -> None:
    """Full data and a random 70% subset, as shards of the same inputs with the same maps."""
    common = dict(val=str(data / "val"), val_scores=folder.root / "scores-val", samples_per_shard=per_shard,
                  shard_multiple=4, name="demo", overwrite=True, progress=progress)
    for name, keep in (("shards-full", 1.0), ("shards-random", 0.7)):
        run_shard(ShardConfig(str(data / "train"), scores, folder.claim_run(name),
                              SelectConfig(keep=keep, policy="random", drop_label_issues=False, seed=seed),
                              dedup=None, **common))


def train_variants(folder: RunFolder, cfg: DemoTrain, progress: bool) -> dict[str, Any]:
    """Train every variant into OUT/train/<slug>; returns accuracy, wall-clock and ratios to full,
    and (under "equal_budget") full data trained with a complete schedule in the cheapest run's time."""
    results = {}
    for v in cfg.variants:
        run = folder.claim_run(f"train/{slug(v.name)}")
        epochs = budget_epochs(folder.root, v, cfg.epochs) if v.equal_budget else cfg.epochs
        summary = train_one(folder.root / v.shards, run, v, replace(cfg, epochs=epochs),
                            warmup_epochs=epochs / cfg.epochs)
        results[v.name] = {**summary, "curve": _curve(run), "equal_budget": v.equal_budget,
                           "samples": train_samples(folder.root / v.shards)}
        if progress:
            print(f"  trained {v.name}: val {summary['val_acc']:.1%} in {summary['wall_s']:.0f}s", flush=True)
    compared = compare(results)
    compared["equal_budget"] = full_at_budget(folder, cfg, compared)
    if progress:
        eq = compared["equal_budget"]
        print(f"  trained full for {eq['epochs']} epochs (the cheapest run's budget): val {eq['val_acc']:.1%} "
              f"in {eq['wall_s']:.0f}s", flush=True)
    return compared


def full_at_budget(folder: RunFolder, cfg: DemoTrain, compared: dict[str, Any]) -> dict[str, Any]:
    """The strongest cheap baseline ("Budgeted Training", ICLR 2020): full data trained for as many
    whole epochs as fit in the cheapest run's wall-clock, its schedule (warmup, cosine) scaled to
    them, against that run's accuracy."""
    full, cheapest = compared["variants"]["full"], compared["budget"]
    epochs = fit_epochs(cheapest["wall_s"], full["wall_s"] / full["epochs"])
    full_v = next(v for v in cfg.variants if v.name == "full")
    run = folder.claim_run("train/full-equal-budget")
    summary = train_one(folder.root / full_v.shards, run, full_v, replace(cfg, epochs=epochs),
                        warmup_epochs=epochs / cfg.epochs)
    rival = compared["variants"][cheapest["variant"]]
    return {"variant": cheapest["variant"], "budget_s": cheapest["wall_s"], "epochs": epochs,
            "wall_s": summary["wall_s"], "val_acc": summary["val_acc"], "rival_val_acc": rival["val_acc"],
            "wall_ratio": summary["wall_s"] / full["wall_s"]}


def budget_epochs(root: Path, v: Variant, epochs: int) -> int:
    """Whole epochs over v's shards that see no more samples than `epochs` over full data's: an epoch
    costs what it trains (the step's cost is per sample)."""
    return fit_epochs(epochs * train_samples(root / "shards-full"), train_samples(root / v.shards))


def train_samples(shards: Path) -> int:
    """The training split's sample count, from the shard set's manifest."""
    return int(json.loads((shards / "manifest.json").read_text())["splits"]["train"]["num_samples"])


def fit_epochs(budget_s: float, epoch_s: float) -> int:
    """Whole epochs of `epoch_s` that fit in `budget_s` (at least one: a run must exist)."""
    return max(1, int(budget_s / epoch_s + 1e-9))


def train_one(shards: Path, run: Path, v: Variant, cfg: DemoTrain, warmup_epochs: float = 1.0) -> dict[str, Any]:
    """`curate train` with the demo's model and recipe; returns its summary."""
    tc = TrainConfig(shards=shards, out=run, epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr,
                     warmup_epochs=warmup_epochs, workers=cfg.workers, seed=cfg.seed, overwrite=True, progress=False,
                     **v.train_fields(DEMO_MODEL))
    return run_train(replace(tc, **cfg.extra))


def slug(name: str) -> str:
    """'curated 70% + keep 0.7' -> 'curated-70-keep-0.7': a folder name."""
    return re.sub(r"[^A-Za-z0-9.]+", "-", name).strip("-")


def epoch_records(run: Path) -> list[dict[str, Any]]:
    """The per-epoch records of a `curate train` run's metrics.jsonl."""
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in recs if r["kind"] == "epoch"]


def _curve(run: Path) -> list[tuple[float, float]]:
    """(training seconds so far, validation accuracy) after each epoch."""
    return [(r["wall"], r["val_acc"]) for r in epoch_records(run) if r.get("val_acc") is not None]


def compare(results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Ratios to the full-data run: wall-clock, time to reach full's final accuracy - 1 point, and
    accuracy at equal budget: where each run's curve stood when the cheapest run had finished."""
    full = results["full"]
    target = full["val_acc"] - 0.01
    cheapest = min(results, key=lambda name: results[name]["wall_s"])
    budget = results[cheapest]["wall_s"]
    for r in results.values():
        r["wall_ratio"] = r["wall_s"] / full["wall_s"]
        r["acc_minus_full"] = r["val_acc"] - full["val_acc"]
        hit = next((t for t, acc in r["curve"] if acc >= target), None)
        r["time_to_target_ratio"] = None if hit is None else hit / full["wall_s"]
        r["acc_at_budget"] = acc_at(r["curve"], budget)
    return {"target": target, "budget": {"variant": cheapest, "wall_s": budget}, "variants": results}


def acc_at(curve: list[tuple[float, float]], seconds: float) -> float | None:
    """The last accuracy measured within `seconds` of training (None if none was).

    The last, not the best: the best of a noisy curve flatters the run."""
    inside = [acc for t, acc in curve if t <= seconds * (1 + 1e-9)]
    return inside[-1] if inside else None


def report_lines(train: dict[str, Any]) -> list[str]:
    """The training table of the demo report."""
    budget = train["budget"]
    lines = ["", "  training (same ViT and recipe; accuracy on the clean validation split):",
             f"    {'variant':28s}{'epochs':>7s}{'val acc':>9s}{'vs full':>9s}{'as trained':>12s}{'wall s':>8s}"
             f"{'x full':>8s}{'to full-1pt':>13s}{'at budget':>11s}"]
    for name, r in train["variants"].items():
        ttt = "never" if r["time_to_target_ratio"] is None else f"{r['time_to_target_ratio']:.2f}x"
        dropped = "" if r.get("val_acc_dropped") is None else f"{r['val_acc_dropped']:.1%}"
        at = "-" if r["acc_at_budget"] is None else f"{r['acc_at_budget']:.1%}"
        lines.append(f"    {name:28s}{r['epochs']:7d}{r['val_acc']:9.1%}{r['acc_minus_full'] * 100:+8.1f}p{dropped:>12s}"
                     f"{r['wall_s']:8.0f}{r['wall_ratio']:7.2f}x{ttt:>13s}{at:>11s}")
    lines += ["    val acc: all tokens, dense attention. as trained: the same weights with the run's own token keep,",
              "    tokens chosen by the validation images' importance maps. to full-1pt: training time until the",
              "    run first reached full's final accuracy - 1 point, as a fraction of full's. at budget: the",
              f"    run's last accuracy within {budget['wall_s']:.0f}s, the time the cheapest run ({budget['variant']}) took."]
    full_epochs = train["variants"]["full"]["epochs"]
    lines += [f"    {name}: full data's budget in samples seen ({r['epochs']} epochs over its {r['samples']} images, "
              f"against {full_epochs} over full's); the others train full's {full_epochs} epochs"
              for name, r in train["variants"].items() if r.get("equal_budget")]
    eq = train.get("equal_budget")
    if eq:
        verdict = "ahead of" if eq["rival_val_acc"] > eq["val_acc"] else "not ahead of"
        lines += [f"  equal budget: full data trained for {eq['epochs']} epochs, a complete schedule in "
                  f"{eq['variant']}'s {eq['budget_s']:.0f}s, reaches {eq['val_acc']:.1%} ({eq['wall_s']:.0f}s, "
                  f"{eq['wall_ratio']:.2f}x full);",
                  f"    {eq['variant']} reaches {eq['rival_val_acc']:.1%}: {verdict} the cheap baseline "
                  f"({100 * (eq['rival_val_acc'] - eq['val_acc']):+.1f} points; one seed, see docs/benchmarks.md "
                  "for the spread)"]
    return lines


def plot(train: dict[str, Any], out: Path) -> Path:
    """time_to_accuracy.png: validation accuracy against training wall-clock (x full's), one line
    per variant, with full's final accuracy - 1 point and the equal-budget line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    full_s = train["variants"]["full"]["wall_s"]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for name, r in train["variants"].items():
        t, acc = zip(*r["curve"]) if r["curve"] else ((), ())
        ax.plot([x / full_s for x in t], [100 * a for a in acc], marker=".", label=name)
    ax.axhline(100 * train["target"], color="grey", linestyle="--", linewidth=1, label="full - 1 point")
    ax.axvline(train["budget"]["wall_s"] / full_s, color="grey", linestyle=":", linewidth=1, label="budget")
    ax.set_ylim(bottom=100 * train["target"] - 15)  # the first epochs would flatten the part that matters
    ax.set_xlabel("training wall-clock (x full data)")
    ax.set_ylabel("validation accuracy (%)")
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = out / "time_to_accuracy.png"
    save_figure(fig, path)
    plt.close(fig)
    return path
