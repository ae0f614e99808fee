"""`curate demo`: generate the demo data, score, shard and train on it, report against the truth."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import polars as pl

from curate.common.atomic import write_bytes, write_json
from curate.common.runfolder import RunFolder
from curate.demo import evaluate
from curate.demo.data import DemoConfig, make_demo
from curate.demo.train import DemoTrain, baseline_shards, report_lines, train_variants
from curate.demo.train import plot as plot_training
from curate.score import inspect, table
from curate.score.job import ScoreConfig, run_score
from curate.score.proxies import RECIPES
from curate.select.embeddings import DEDUP_THRESHOLD
from curate.select.policies import SelectConfig
from curate.shard.job import ShardConfig, ShardResult, run_shard
from curate.shard.verify import verify

COMMAND = "demo"

# Two proxies, each for what it learns fastest on CPU: the CNN ranks examples (EL2N, forgetting),
# the plain ViT provides CLS-attention importance maps. `curate shard` joins tables by key.
PROXIES = {"scores-cnn": "demo-cnn", "scores-vit": "demo-vit"}
AUC_COLUMNS = ("el2n", "loss", "margin", "forgetting", "el2n_mean", "margin_mean")


def run_demo(out: Path, seed: int = 0, workers: int = 2, progress: bool = True,
             per_class: int = 250, epochs: int | None = None, train: DemoTrain | None = None) -> str:
    """Generate, score, shard and train under `out`, and report. A previous demo run in `out`
    is replaced (only its own files: anything else in `out` makes the demo refuse).

    per_class, epochs (proxy training; default: each recipe's) and train (the ViT trained on the
    shards; default: DemoTrain()) exist to run the same path small in tests.
    """
    with RunFolder.open(out, COMMAND, "overwrite") as folder:
        return _run(folder, seed, workers, progress, per_class, epochs, train)


def _run(folder: RunFolder, seed: int, workers: int, progress: bool, per_class: int, epochs: int | None,
         train: DemoTrain | None) -> str:
    out = folder.root
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    data = out / "data"
    make_demo(DemoConfig(root=data, seed=seed, per_class=per_class, val_per_class=max(2, per_class // 2)),
              claim=lambda names: folder.claim_many(f"data/{n}" for n in names))
    timings["generate_s"] = time.perf_counter() - t0
    metrics: dict[str, Any] = {"proxies": {}}
    for name, proxy in PROXIES.items():
        t1 = time.perf_counter()
        # The demo's shards carry the ViT's CLS maps (the recipe its figures measure); the CNN's class
        # activation maps are compared with them in docs/benchmarks.md, not mixed in here.
        run_score(ScoreConfig(source=str(data / "train"), out=folder.claim_run(name), proxy=proxy,
                              train_epochs=epochs or RECIPES[proxy].epochs, seed=seed, workers=workers,
                              importance="auto" if name == "scores-vit" else "none",
                              overwrite=True, progress=progress))
        timings[f"{name}_s"] = time.perf_counter() - t1
        metrics["proxies"][proxy] = proxy_metrics(out / name, data)
    t1 = time.perf_counter()
    score_validation(folder, data, workers)
    shard = shard_default(folder, data, seed, max(1, per_class // 2), "demo", progress)
    timings["shard_s"] = time.perf_counter() - t1
    shard_curated(folder, data, seed, max(1, per_class // 2), "demo", progress, run="shards-curated")
    metrics["shard"] = shard_metrics(shard, out / "scores-cnn", data)
    t1 = time.perf_counter()
    train = train or DemoTrain(seed=seed, workers=workers)
    baseline_shards(folder, data, tuple(out / f for f in PROXIES), seed, max(1, per_class // 2), progress)
    metrics["train"] = train_variants(folder, train, progress)
    timings["train_s"] = time.perf_counter() - t1
    _plots(folder, metrics)
    text = render_report(metrics, timings, out)
    folder.claim(REPORT_TEXT, REPORT_JSON)
    write_bytes(out / REPORT_TEXT, (text + "\n").encode())
    write_json(out / REPORT_JSON, {"metrics": metrics, "timing": timings})
    return text


REPORT_TEXT, REPORT_JSON = "report.txt", "report.json"
PLOTS = ("plots/score_histograms.png", "plots/importance_overlay.png", "plots/time_to_accuracy.png")


def _plots(folder: RunFolder, metrics: dict[str, Any]) -> None:
    folder.claim(*PLOTS)
    plots = folder.root / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    inspect.plot_histograms(folder.root / "scores-cnn", plots)
    inspect.plot_importance(folder.root / "scores-vit", plots)
    plot_training(metrics["train"], plots)


def shard_default(folder: RunFolder, data: Path, seed: int, per_shard: int, name: str,
                  progress: bool) -> ShardResult:
    """OUT/shards: `curate shard`'s defaults over both proxies' tables (label issues and near-duplicates
    dropped, nothing else), with the validation split and its maps, and OUT/shards/report.html."""
    root = folder.root
    return run_shard(ShardConfig(str(data / "train"), tuple(root / f for f in PROXIES), folder.claim_run("shards"),
                                 SelectConfig(seed=seed), report=True, **split_options(root, data, per_shard, name,
                                                                                       progress)))


def shard_curated(folder: RunFolder, data: Path, seed: int, per_shard: int, name: str, progress: bool,
                  run: str = "shards") -> ShardResult:
    """OUT/<run>: CCS 70% by EL2N over both proxies' tables after near-duplicate removal, label
    issues kept (`curate shard`'s defaults until issue 25), with the validation split and its maps."""
    return run_shard(curated_config(folder.root, data, folder.claim_run(run), seed, per_shard, name, progress))


def curated_config(root: Path, data: Path, out: Path, seed: int, per_shard: int, name: str,
                   progress: bool) -> ShardConfig:
    """The curated shard set's settings, from the score tables under `root`."""
    return ShardConfig(str(data / "train"), tuple(root / f for f in PROXIES), out,
                       SelectConfig(keep=0.7, by=("el2n",), policy="ccs", drop_label_issues=False, seed=seed),
                       dedup=DEDUP_THRESHOLD,
                       dedup_on="thumbnail",  # the demo's figures (planted copies of drawn shapes) are on thumbnails
                       **split_options(root, data, per_shard, name, progress))


def split_options(root: Path, data: Path, per_shard: int, name: str, progress: bool) -> dict[str, Any]:
    """What every demo shard set shares: the validation split with its maps, the shard sizes, the name."""
    return dict(val=str(data / "val"), val_scores=root / "scores-val", samples_per_shard=per_shard,
                shard_multiple=4, name=name, overwrite=True, progress=progress)


def score_validation(folder: RunFolder, data: Path, workers: int) -> None:
    """Importance maps for the validation images from the trained ViT proxy, so that evaluation
    can also drop tokens by importance (val_acc_dropped)."""
    run_score(ScoreConfig(source=str(data / "val"), out=folder.claim_run("scores-val"), proxy=PROXIES["scores-vit"],
                          checkpoint=folder.root / "scores-vit" / "proxy" / "model.pt", workers=workers,
                          overwrite=True, progress=False))


def proxy_metrics(scores: Path, data: Path) -> dict[str, Any]:
    """One proxy's table against the truth: accuracy, label-noise AUCs, localisation."""
    joined = evaluate.join_truth(table.scan(scores).collect(), data)
    ok = joined.filter(pl.col("status") == "ok")
    has_maps = ok["importance"].is_not_null().any()
    return {
        "images": len(joined),
        "errors": len(joined) - len(ok),
        "flipped": int(joined["flipped"].sum()),
        "accuracy_vs_true_label": float((ok["pred"] == ok["true_label"]).mean()),
        "label_noise_auc": {c: evaluate.label_noise_auc(joined, c) for c in AUC_COLUMNS},
        "localisation": evaluate.localisation(joined.filter(~pl.col("flipped"))) if has_maps else None,
    }


def shard_metrics(result: ShardResult, scores: Path, data: Path) -> dict[str, Any]:
    """What the selection removed, duplicate detection, and whether the shards read back."""
    sel = result.selection
    sources = table.scan(scores).select("key", "source").collect()
    joined = evaluate.join_truth(sel.join(sources, on="key"), data)
    flipped = joined.filter(pl.col("flipped"))
    assert result.manifest is not None
    train = result.manifest["splits"]["train"]
    return {
        "inputs": len(sel), "kept": int(sel["kept"].sum()),
        "reasons": dict(sel.group_by("reason").len().iter_rows()),
        "flipped_removed": float((~flipped["kept"]).mean()),
        "clean_removed": float((~joined.filter(~pl.col("flipped"))["kept"]).mean()),
        "duplicates": evaluate.duplicate_detection(joined.filter(pl.col("reason") != "error")),
        "dedup": {"on": result.manifest["config"]["dedup_on"], "threshold": result.manifest["config"]["dedup"]},
        "shards": len(train["shards"]), "train_samples": train["num_samples"],
        "megabytes": sum(e["bytes"] for e in train["shards"]) / 1e6,
        "verify_faults": len(verify(result.out)),
    }


def render_report(all_metrics: dict[str, Any], t: dict[str, float], out: Path) -> str:
    metrics = all_metrics["proxies"]
    first = next(iter(metrics.values()))
    names = list(metrics)
    lines = [
        "curate demo report",
        f"  data: {first['images']} training images, {first['flipped']} labels flipped on purpose, "
        f"{first['errors']} decode errors (generated in {t['generate_s']:.1f}s)",
        "",
        f"  {'':34s}" + "".join(f"{n:>12s}" for n in names),
        f"  {'training time (s)':34s}" + "".join(f"{t[f + '_s']:12.1f}" for f in PROXIES),
        f"  {'accuracy vs the true labels':34s}"
        + "".join(f"{metrics[n]['accuracy_vs_true_label']:12.1%}" for n in names),
        "  ROC-AUC for 'label was flipped' (1.0 = every flipped label ranked first):",
        *[f"    {c:32s}" + "".join(f"{metrics[n]['label_noise_auc'][c]:12.3f}" for n in names)
          for c in AUC_COLUMNS],
    ]
    for name in names:
        loc = metrics[name]["localisation"]
        if loc:
            lines += ["", f"  importance ({name}): {loc['on_box']:.1%} of the top-25% patches lie on the "
                      f"object box, which covers {loc['area']:.1%} of the image: {loc['ratio']:.2f}x chance "
                      f"({loc['images']} clean images)"]
    sh = all_metrics["shard"]
    dup = sh["duplicates"]
    lines += [
        "",
        f"  shard (curate shard's defaults: label issues and near-duplicates dropped, nothing else): kept "
        f"{sh['kept']} of {sh['inputs']} ({', '.join(f'{k} {v}' for k, v in sorted(sh['reasons'].items()))})",
        f"    flipped labels removed {sh['flipped_removed']:.1%} vs clean images removed {sh['clean_removed']:.1%}",
        f"    near-duplicates ({sh['dedup']['on']} similarity >= {sh['dedup']['threshold']}): {dup['found']:.1%} of "
        f"{dup['groups']} planted "
        f"groups found, {dup['merged']:.2%} of {dup['singles']} other images merged",
        f"    {sh['train_samples']} samples in {sh['shards']} shards ({sh['megabytes']:.1f} MB) + validation; "
        f"curate verify: {'ok' if sh['verify_faults'] == 0 else str(sh['verify_faults']) + ' faults'}; "
        f"timm: --dataset wds/demo --data-dir {out / 'shards'}",
        f"  time: shard {t['shard_s']:.1f}s",
    ]
    lines += report_lines(all_metrics["train"])
    lines += [f"  time: baseline shards + training {t['train_s']:.0f}s"]
    lines += ["", f"  outputs: {out}/scores-*/ (polars.scan_parquet('{out}/scores-cnn/*.parquet')), "
              f"{out}/plots/, {out}/report.json",
              f"  what was pruned and why, with the images: {out}/shards/report.html (open it in a browser)"]
    return "\n".join(lines)
