"""Equal-budget comparison: every variant trained for the same wall-clock, each with a complete
schedule fitted to that budget (warmup and cosine decay end inside it), against full data
trained for the same budget, the strongest cheap baseline ("Budgeted Training", ICLR 2020).

A dataset root holds the shard sets the variants read: `shards-full` (every input),
`shards-random` (a random 70%) and `shards` (the curated 70%), as `curate demo` writes them. Each
variant's epoch time is measured once per dataset (the median epoch of a short calibration run);
a budget of f means f times full data's complete schedule (`ref_epochs` epochs), and each variant
then trains for as many whole epochs as fit. What every cell reports is measured: accuracy after
the last epoch and the training wall-clock it actually took.
"""
from __future__ import annotations

import json
import multiprocessing
import statistics
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

from curate.common.atomic import atomic_path, save_figure, write_json
from curate.common.runfolder import RunFolder, mode_of
from curate.demo.train import DEMO_MODEL, Variant, epoch_records, fit_epochs, slug
from sparsevit.train import TrainConfig, run_train


BUDGET_VARIANTS = (
    Variant("full", "shards-full"),
    Variant("random 70%", "shards-random"),
    Variant("curated 70%", "shards"),
    Variant("curated 70% + keep 0.7", "shards", keep=0.7),
    Variant("curated 70% + keep 0.7 random", "shards", keep=0.7, drop_by="random"),
    Variant("full at low res (~0.7 tokens)", "shards-full", token_scale=0.7),
    Variant("curated 70% + keep 0.5", "shards", keep=0.5),
    Variant("full + InfoBatch", "shards-full", example_pruning="infobatch"),
    Variant("fresh random 70% (RS2)", "shards-full", example_pruning="rs2"),  # an epoch costs 0.7 with --loader memory
    # label issues and near-duplicates dropped, nothing else (bench/experiments/cifar_shards.py --backbone)
    Variant("clean", "shards-clean"),
    Variant("clean + 70% by CCS", "shards-clean-70"),
    Variant("clean + keep 0.7 random", "shards-clean", keep=0.7, drop_by="random"),
    # per-batch selection by the stored scores: the 70% of each batch with the highest EL2N
    Variant("clean + top 70% of each batch", "shards-clean", example_pruning="top-score"),
)

REFERENCE = BUDGET_VARIANTS[0]  # full data


@dataclass(frozen=True)
class BudgetConfig:
    out: Path
    datasets: tuple[tuple[int, Path], ...]  # (seed, dataset root); a seed may reuse a root
    budgets: tuple[float, ...] = (0.35, 0.5, 0.7, 1.0)  # fractions of full data's complete schedule
    variants: tuple[Variant, ...] = BUDGET_VARIANTS
    model: dict[str, Any] = field(default_factory=lambda: dict(DEMO_MODEL))
    ref_epochs: int = 15  # full data's complete schedule
    warmup_share: float = 1 / 15  # warmup as a share of every schedule (the demo: 1 of 15 epochs)
    calibration_epochs: int = 3  # the median epoch is kept: one disturbed epoch does not move it
    # variant -> epoch seconds measured by another run (its results.json): no calibration here, so runs split
    # over processes or sessions plan the same epochs
    epoch_seconds: dict[str, float] | None = None
    batch_size: int = 64
    lr: float = 4e-3
    workers: int = 2
    extra: dict[str, Any] = field(default_factory=dict)  # TrainConfig overrides (tests: smaller)
    fresh_process: bool = True  # every run in its own process: one run's allocator, threads and
    # worker pools cannot slow the next (in one process epochs drifted: docs/benchmarks.md, "Figures formerly
    # quoted in code")
    resume: bool = False  # keep the cells already trained (more seeds or budgets may be added)
    report_only: bool = False  # train nothing: table and plot from the cells already trained
    # the compute table.md and budget.png show: "wall" (actually used) or "planned" (epochs x calibrated epoch:
    # what the budget bought, when other work shared the cores)
    ratio: str = "wall"
    overwrite: bool = False
    progress: bool = True


def train_config(cfg: BudgetConfig, v: Variant, root: Path, out: Path, seed: int, epochs: int) -> TrainConfig:
    """The variant's `curate train` settings for a complete schedule of `epochs`."""
    tc = TrainConfig(shards=root / v.shards, out=out, epochs=epochs, batch_size=cfg.batch_size, lr=cfg.lr,
                     warmup_epochs=cfg.warmup_share * epochs, workers=cfg.workers, seed=seed, eval_every=epochs,
                     overwrite=True, progress=False, **v.train_fields(cfg.model))
    return replace(tc, **cfg.extra)


def run_budget(cfg: BudgetConfig) -> dict[str, Any]:
    """Calibrate, then train every (budget, variant, seed) cell; resumable cell by cell. With
    `report_only`, train nothing and report the cells already trained (the rest as `missing`).
    Returns (and writes to OUT/results.json) the cells and the per-budget summary."""
    free = ("progress", "budgets", "variants", "datasets", "resume", "overwrite", "report_only", "fresh_process",
            "ratio")
    ref = reference(cfg)
    mode = "resume" if cfg.report_only else mode_of(cfg.resume, cfg.overwrite)
    with RunFolder.open(cfg.out, "budget", mode, config=_config_json(cfg),
                        free=free, sources=[root for _, root in cfg.datasets]) as folder:
        epoch_s = {v.name: _epoch_seconds(folder, cfg, v) for v in dict.fromkeys((ref, *cfg.variants))}
        full_s = cfg.ref_epochs * epoch_s[ref.name]
        cells = [_cell(folder, cfg, v, seed, root, f, f * full_s, epoch_s[v.name])
                 for f in cfg.budgets for v in cfg.variants for seed, root in cfg.datasets]
        missing = [(c["budget"], c["variant"], c["seed"]) for c in cells if not c["trained"]]
        cells = [c for c in cells if c["trained"]]
        results = {"reference": {"variant": ref.name, "epochs": cfg.ref_epochs, "seconds": full_s},
                   "epoch_seconds": epoch_s, "cells": cells, "missing": missing, "summary": summarise(cells, full_s)}
        _write_outputs(folder, results, cfg.ratio)
        return results


def merge_results(parts: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One run's results from runs split over processes or machines, each planned with one
    calibration (`--epoch-seconds-from`): their cells together and summarised as one. Refuses parts
    planned with other epoch seconds or another reference (their budgets would not be the same
    compute) and a cell trained twice (which one would count?)."""
    if not parts:
        raise ValueError("nothing to merge")
    reference, epoch_s = parts[0]["reference"], dict(parts[0]["epoch_seconds"])
    cells: dict[tuple[float, str, int], dict[str, Any]] = {}
    for i, part in enumerate(parts):
        if part["reference"] != reference:
            raise ValueError(f"part {i} has another reference ({part['reference']} vs {reference}): "
                             "plan every part with the same --epoch-seconds-from and --ref-epochs")
        for name, seconds in part["epoch_seconds"].items():
            if epoch_s.setdefault(name, seconds) != seconds:
                raise ValueError(f"part {i} planned {name!r} with {seconds} s an epoch, another part with "
                                 f"{epoch_s[name]} s: plan every part with the same --epoch-seconds-from")
        for c in part["cells"]:
            key = (c["budget"], c["variant"], c["seed"])
            if key in cells:
                raise ValueError(f"{key[0]:g}x {key[1]} seed {key[2]} was trained in two parts: merge one of them")
            cells[key] = c
    missing = sorted({tuple(m) for p in parts for m in p["missing"]} - set(cells))
    merged = list(cells.values())
    return {"reference": reference, "epoch_seconds": epoch_s, "cells": merged, "missing": missing,
            "summary": summarise(merged, reference["seconds"])}


def write_merged(out: Path, parts: Sequence[Path], ratio: str = "wall") -> dict[str, Any]:
    """`merge_results` of the parts' results.json, written to `out` as a run writes its own
    (results.json, table.md, budget.png); a merge is cheap, so a previous merge there is replaced."""
    results = merge_results([json.loads(p.read_text()) for p in parts])
    with RunFolder.open(out, "budget-merge", mode_of(False, True), config={"parts": [str(p) for p in parts]},
                        sources=[p.parent for p in parts]) as folder:
        _write_outputs(folder, results, ratio)
    return results


def _write_outputs(folder: RunFolder, results: dict[str, Any], ratio: str) -> None:
    """results.json, table.md and budget.png: what a run and a merge leave in their folder."""
    write_json(folder.claim("results.json"), results)
    with atomic_path(folder.claim("table.md")) as tmp:
        tmp.write_text("\n".join(table_lines(results, ratio)) + "\n")
    plot(results, folder.claim("budget.png"), ratio)


def _config_json(cfg: BudgetConfig) -> dict[str, Any]:
    d = asdict(cfg)
    d["out"] = str(cfg.out)
    d["datasets"] = [[seed, str(root)] for seed, root in cfg.datasets]
    return json.loads(json.dumps(d, default=str))


def _train(cfg: BudgetConfig, tc: TrainConfig) -> None:
    """`run_train(tc)`, in a fresh spawned process when `cfg.fresh_process`."""
    if not cfg.fresh_process:
        run_train(tc)
        return
    proc = multiprocessing.get_context("spawn").Process(target=run_train, args=(tc,))
    proc.start()
    proc.join()
    if proc.exitcode != 0:
        raise RuntimeError(f"training {tc.out} failed in its process (exit code {proc.exitcode})")


def reference(cfg: BudgetConfig) -> Variant:
    """Full data, the variant budgets are shares of: the first variant, or, for a part that adds
    variants to a run planned by given epoch seconds, one that trains no cells of its own."""
    if cfg.variants and cfg.variants[0].name == REFERENCE.name:
        return cfg.variants[0]
    if cfg.epoch_seconds is not None and REFERENCE.name in cfg.epoch_seconds:
        return REFERENCE
    raise ValueError(f"the first variant must be {REFERENCE.name!r}: budgets are shares of its complete schedule "
                     "(a part planned by --epoch-seconds-from that has it may leave it out)")


def _epoch_seconds(folder: RunFolder, cfg: BudgetConfig, v: Variant) -> float:
    """The variant's epoch seconds: calibrated here, or given (`cfg.epoch_seconds`). A variant the
    given ones lack is calibrated here beside the reference and planned by its ratio to it, so
    that a variant added later fits the given plan: the machine's speed drifts between two
    calibrations (full data: 2.72 s and 3.16 s an epoch hours apart), a ratio in one run does not."""
    if cfg.epoch_seconds is None:
        return _calibrate(folder, cfg, v)
    ref = reference(cfg)
    if ref.name not in cfg.epoch_seconds:
        raise ValueError(f"the given epoch seconds have no {ref.name!r}, the reference every variant is planned "
                         "by: calibrate (run without them) first")
    if v.name in cfg.epoch_seconds:
        return cfg.epoch_seconds[v.name]
    return cfg.epoch_seconds[ref.name] * _calibrate(folder, cfg, v) / _calibrate(folder, cfg, ref)


def _calibrate(folder: RunFolder, cfg: BudgetConfig, v: Variant) -> float:
    """Median epoch seconds of a short run of the variant on the first dataset (reused if done).
    The median, not the mean: on a shared machine one epoch slowed by another process would
    otherwise shorten every schedule planned from it."""
    run = folder.root / "calibration" / slug(v.name)
    if not (run / "summary.json").is_file():
        if cfg.report_only:
            raise ValueError(f"{run} has not been calibrated: run without --report-only first")
        seed, root = cfg.datasets[0]
        _train(cfg, train_config(cfg, v, root, folder.claim_run(f"calibration/{slug(v.name)}"), seed,
                                 cfg.calibration_epochs))
    return statistics.median(r["seconds"] for r in epoch_records(run))  # loader in, evaluation out


def _cell(folder: RunFolder, cfg: BudgetConfig, v: Variant, seed: int, root: Path, fraction: float,
          budget_s: float, epoch_s: float) -> dict[str, Any]:
    """One trained cell: the variant on one dataset and seed, for `fit_epochs` epochs."""
    epochs = fit_epochs(budget_s, epoch_s)
    name = f"runs/{fraction:g}/{slug(v.name)}/seed-{seed}"
    run = folder.root / name
    done = run / "summary.json"
    if not (done.is_file() and json.loads((run / "config.json").read_text())["epochs"] == epochs):
        if cfg.report_only:
            return {"budget": fraction, "variant": v.name, "seed": seed, "trained": False}
        _train(cfg, train_config(cfg, v, root, folder.claim_run(name), seed, epochs))
    summary = json.loads(done.read_text())
    cell = {"trained": True, "budget": fraction, "budget_s": budget_s, "variant": v.name, "seed": seed,
            "epochs": epochs, "planned_s": epochs * epoch_s, "wall_s": summary["wall_s"], "val_acc": summary["val_acc"],
            "val_acc_dropped": summary["val_acc_dropped"]}
    if cfg.progress:
        print(f"  budget {fraction:g}x ({budget_s:.0f}s) {v.name:30s} seed {seed}: {epochs:2d} epochs, "
              f"{summary['wall_s']:.0f}s, val {summary['val_acc']:.1%}", flush=True)
    return cell


def summarise(cells: Sequence[dict[str, Any]], full_s: float, reference: str = "full") -> list[dict[str, Any]]:
    """Mean and spread over seeds for every (budget, variant); wall-clock as a share of `full_s`,
    full data's complete schedule; and the paired comparison with `reference` at the same budget
    and seed: the mean difference in accuracy and in how many seeds the variant is ahead."""
    groups: dict[tuple[float, str], list[dict[str, Any]]] = {}
    for c in cells:
        groups.setdefault((c["budget"], c["variant"]), []).append(c)
    ref = {(c["budget"], c["seed"]): c["val_acc"] for c in cells if c["variant"] == reference}
    rows = []
    for (fraction, variant), cs in groups.items():
        acc = [c["val_acc"] for c in cs]
        dropped = [c["val_acc_dropped"] for c in cs if c["val_acc_dropped"] is not None]
        diffs = [c["val_acc"] - ref[fraction, c["seed"]] for c in cs if (fraction, c["seed"]) in ref]
        rows.append({"budget": fraction, "variant": variant, "seeds": len(cs), "epochs": cs[0]["epochs"],
                     "acc_mean": statistics.fmean(acc), "acc_sd": statistics.stdev(acc) if len(acc) > 1 else 0.0,
                     "acc_as_trained_mean": statistics.fmean(dropped) if dropped else None,
                     "wall_ratio_mean": statistics.fmean(c["wall_s"] / full_s for c in cs),
                     "planned_ratio_mean": statistics.fmean(c["planned_s"] / full_s for c in cs),
                     "paired": len(diffs), "paired_wins": sum(d > 0 for d in diffs),
                     "paired_diff_mean": statistics.fmean(diffs) if diffs else None})
    return rows


def table_lines(results: dict[str, Any], ratio: str = "wall") -> list[str]:
    """Markdown: one row per variant, one column per budget; each cell mean ± sd of accuracy,
    epochs, the wall-clock as a share of full data's complete schedule (ratio "wall": as the runs
    took it; "planned": epochs x the calibrated epoch, for runs that shared the cores), and (rows
    other than the reference) the mean paired difference from full data and the seeds it wins."""
    rows = results["summary"]
    budgets = sorted({r["budget"] for r in rows})
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    at = {(r["budget"], r["variant"]): r for r in rows}
    lines = ["| variant | " + " | ".join(f"budget {b:g}x" for b in budgets) + " |",
             "|---|" + "---|" * len(budgets)]
    for v in variants:
        cells = []
        for b in budgets:
            r = at.get((b, v))
            if r is None:
                cells.append("")
                continue
            trained = "" if r["acc_as_trained_mean"] is None else f"; as trained {100 * r['acc_as_trained_mean']:.1f}"
            paired = "" if v == variants[0] or not r["paired"] else \
                f"; {100 * r['paired_diff_mean']:+.1f} vs full, wins {r['paired_wins']}/{r['paired']}"
            cells.append(f"{100 * r['acc_mean']:.1f} ± {100 * r['acc_sd']:.1f} ({r['epochs']} ep, "
                         f"{r[f'{ratio}_ratio_mean']:.2f}x{trained}{paired})")
        lines.append(f"| {v} | " + " | ".join(cells) + " |")
    return lines


def plot(results: dict[str, Any], path: Path, ratio: str = "wall") -> None:
    """Accuracy against the compute used (share of full's complete schedule: the wall-clock actually
    used, or with ratio="planned" the epochs x the variant's calibrated epoch), one line per variant,
    error bars = sd over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.2, 4.6))
    variants = list(dict.fromkeys(r["variant"] for r in results["summary"]))
    for v in variants:
        rows = sorted((r for r in results["summary"] if r["variant"] == v), key=lambda r: r["budget"])
        ax.errorbar([r[f"{ratio}_ratio_mean"] for r in rows], [100 * r["acc_mean"] for r in rows],
                    yerr=[100 * r["acc_sd"] for r in rows], marker="o", markersize=3, capsize=3, label=v)
    ax.set_xlabel({"wall": "training wall-clock used", "planned": "compute planned: epochs x calibrated epoch"}[ratio]
                  + " (x full data's complete schedule)")
    ax.set_ylabel("validation accuracy, last epoch, all tokens (%)")
    ax.legend(fontsize=7, loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)
