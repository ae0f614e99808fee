"""Label issues found in sample (K = 1) against out of sample (K folds), on data whose flipped
labels are known (`truth.parquet` beside `train/`: the demo's, or `bench/experiments/cifar_shards.py`'s):

    python bench/experiments/label_issues.py --data demo-data --out li-demo             # makes the demo data if absent
    python bench/experiments/label_issues.py --data c10/data --out li-c10 --image-size 32

For each K it runs `curate score TRAIN --proxy demo-cnn --train-epochs E --folds K` in its own
process and reports, against the truth: ROC-AUC of `label_quality` (low = flipped), precision,
recall and F1 of `label_issue`, the AUC of EL2N (the in-sample score curation ranks by), and the
job's wall-clock; and the F1 that each of cleanlab's `filter_by` choices would give on the same
probabilities. `--measure-only` measures tables already in OUT (e.g. after `curate score --resume
--label-filter ...`). Writes OUT/label_issues.json and prints Markdown tables.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import polars as pl
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/, for common
import common  # noqa: E402

from curate.demo.data import TRUTH, DemoConfig, make_demo  # noqa: E402
from curate.demo.evaluate import join_truth, label_noise_auc  # noqa: E402
from curate.score import table  # noqa: E402
from curate.score.label_issues import FILTERS, find_issues  # noqa: E402
from curate.score.metrics import roc_auc  # noqa: E402


def _prf(issue: np.ndarray, flipped: np.ndarray) -> tuple[float, float, float]:
    tp = int((issue & flipped).sum())
    precision, recall = tp / max(int(issue.sum()), 1), tp / max(int(flipped.sum()), 1)
    return precision, recall, 2 * precision * recall / max(precision + recall, 1e-12)


def measure(scores: Path, data: Path) -> dict[str, float]:
    """The table's label columns against truth.parquet's `flipped`."""
    joined = join_truth(table.scan(scores).collect(), data).filter(pl.col("status") == "ok")
    flipped = joined["flipped"].to_numpy()
    issue = joined["label_issue"].to_numpy()
    precision, recall, f1 = _prf(issue, flipped)
    labels, probs = joined["label"].to_numpy(), np.stack(joined["probs"].to_numpy())
    return {
        "rows": joined.height, "flipped": int(flipped.sum()), "flagged": int(issue.sum()),
        "auroc_label_quality": roc_auc(-torch.tensor(joined["label_quality"].to_numpy()), torch.tensor(flipped)),
        "precision": precision, "recall": recall, "f1": f1,
        "held_out_accuracy": float((probs.argmax(1) == labels).mean()),
        "f1_by_filter": {f: _prf(find_issues(labels, probs, f).label_issue, flipped)[2] for f in FILTERS},
        "auroc_el2n": label_noise_auc(joined, "el2n"),
        "auroc_oos_el2n": label_noise_auc(joined, "oos_el2n") if joined["oos_el2n"].null_count() == 0 else None,
    }


def score(data: Path, out: Path, folds: int, args: argparse.Namespace) -> float:
    cmd = common.cli("score", data / "train", "--out", out, "--proxy", args.proxy, "--train-epochs", args.epochs,
                     "--folds", folds, "--seed", args.seed, "--workers", args.workers, "--overwrite", "--quiet",
                     *(["--image-size", args.image_size] if args.image_size else []))
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True)
    return time.perf_counter() - t0


def main() -> None:
    ap = common.parser(__doc__)
    ap.add_argument("--data", type=Path, required=True, help="dataset root with train/ and truth.parquet")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--folds", type=common.ints, default="1,5", help="K values, comma separated")
    ap.add_argument("--proxy", default="demo-cnn")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--image-size", type=int)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--measure-only", action="store_true", help="measure the tables already in OUT")
    args = ap.parse_args()
    if not (args.data / TRUTH).exists():
        make_demo(DemoConfig(root=args.data, seed=args.seed))
    args.out.mkdir(parents=True, exist_ok=True)
    commit = common.commit()
    results = []
    for k in args.folds:
        seconds = (table.read_manifest(args.out / f"k{k}")["timing"]["total_s"] if args.measure_only
                   else score(args.data, args.out / f"k{k}", k, args))
        results.append({"folds": k, "seconds": seconds, **measure(args.out / f"k{k}", args.data)})
        print(json.dumps(results[-1]), flush=True)
    (args.out / "label_issues.json").write_text(json.dumps({"commit": commit, "args": vars(args) | {
        "data": str(args.data), "out": str(args.out)}, "results": results}, indent=1))
    print("\n" + common.header(f"{args.data} ({results[0]['rows']} images, {results[0]['flipped']} flipped)",
                               f"{args.proxy} {args.epochs} epochs", f"seed {args.seed}") + "\n")
    print("| K | AUROC label_quality | flagged | precision | recall | F1 | agreement with given labels "
          "| AUROC el2n | wall-clock |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['folds']} | {r['auroc_label_quality']:.3f} | {r['flagged']} | {r['precision']:.3f} | "
              f"{r['recall']:.3f} | {r['f1']:.3f} | {r['held_out_accuracy']:.1%} | {r['auroc_el2n']:.3f} | "
              f"{r['seconds']:.0f} s ({r['seconds'] / results[0]['seconds']:.1f}x) |")
    print("\nF1 by cleanlab filter_by (" + " / ".join(f"K = {r['folds']}" for r in results) + "):")
    for f in FILTERS:
        print(f"- {f}: " + " / ".join(f"{r['f1_by_filter'][f]:.3f}" for r in results))


if __name__ == "__main__":
    main()
