"""Label issues from frozen features on real photographs: a backbone trained on CIFAR-10 images
disjoint from the ones scored (the situation of a user with a pretrained model), `curate score
--probe` on a 10,000-image subset with its labels flipped by `bench/noise.py`, per noise kind and
rate:

    python bench/experiments/probe_label_issues.py --disjoint DJ      # 10,000 images the cells never score
    curate score DJ/train --out backbone --proxy airbench --train-epochs 10
    python bench/experiments/probe_label_issues.py --out probe-grid --backbone backbone/proxy/model.pt

`--method k1` / `--method k5` score the same cells with airbench trained here on the noisy labels
instead (in sample, or K-fold out of sample), for comparison.

Prints, per cell, the probes' held-out accuracy against the true labels, the AUROC of
`label_quality` for "the label was flipped", precision / recall / F1 of cleanlab's `label_issue`
and of "prediction != given label", and the probe's seconds.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import polars as pl
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/, for common
sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/experiments, for cifar_shards
import cifar_shards  # noqa: E402
import common  # noqa: E402

from curate.common.runfolder import RunFolder  # noqa: E402
from curate.score import metrics, table  # noqa: E402
from curate.score.job import ScoreConfig, run_score  # noqa: E402


def prf(flag: np.ndarray, truth: np.ndarray) -> str:
    tp = int((flag & truth).sum())
    p, r = tp / max(1, int(flag.sum())), tp / max(1, int(truth.sum()))
    return f"{p:.2f} / {r:.2f} / {2 * p * r / max(1e-9, p + r):.3f}"


def method_fields(args) -> dict:
    """The ScoreConfig fields of the --method: probes on the backbone's embeddings, or K proxies trained here."""
    if args.method == "probe":
        return {"checkpoint": args.backbone, "probe": True}
    if not (args.method.startswith("k") and args.method[1:].isdigit()):
        raise ValueError(f"--method is probe or kN (k1, k5), got {args.method!r}")
    return {"train_epochs": args.epochs, "folds": int(args.method[1:])}


def method_seconds(proxy: dict) -> str:
    """Seconds of what decided the label issues: the probes, or the proxies' training."""
    if "probe" in proxy:
        return f"{proxy['probe']['seconds']:.1f}"
    return "training"


def main() -> None:
    ap = common.parser(__doc__)
    ap.add_argument("--out", type=Path, default=None, help="the grid's folder (needed unless --disjoint)")
    ap.add_argument("--backbone", type=Path, default=None, help="an airbench checkpoint trained on other images")
    ap.add_argument("--disjoint", type=Path, default=None,
                    help="write 1,000 clean training images a class that the cells never score here, and stop")
    ap.add_argument("--method", default="probe",
                    help="probe (needs --backbone), or kN: N proxies trained here on the noisy labels (k1: in sample)")
    ap.add_argument("--epochs", type=int, default=10, help="training epochs of the kN proxies")
    ap.add_argument("--proxy", default="airbench")
    ap.add_argument("--kinds", default="uniform,pairs")
    ap.add_argument("--rates", default="0.1,0.2,0.4")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.disjoint is not None:
        print(f"{cifar_shards.disjoint(cifar_shards.TARBALL, args.disjoint, 1000, 1000, args.seed)} images "
              f"in {args.disjoint}/train")
        return
    if args.out is None:
        ap.error("give --out")
    if (args.method == "probe") != (args.backbone is not None):
        ap.error("--backbone goes with --method probe, and only with it")
    print(f"method: {args.method}")
    print("| noise | rate | probe accuracy vs true labels | AUROC label_quality | cleanlab P / R / F1 | "
          "pred != label P / R / F1 | probe s |\n|---|---|---|---|---|---|---|")
    with RunFolder.open(args.out, "probe-label-issues", "overwrite") as folder:
        for kind in args.kinds.split(","):
            for rate in (float(r) for r in args.rates.split(",")):
                cell = f"{kind}-{rate:g}"
                data = folder.root / cell / "data"
                claim = lambda names, c=cell: folder.claim_many(f"{c}/data/{n}" for n in names)  # noqa: E731
                truth = cifar_shards.prepare(cifar_shards.TARBALL, data, 1000, 200, rate, args.seed, claim, kind=kind)
                out = folder.claim_run(f"{cell}/scores")
                t0 = time.perf_counter()
                result = run_score(ScoreConfig(source=str(data / "train"), out=out, proxy=args.proxy, seed=args.seed,
                                               progress=False, overwrite=True, **method_fields(args)))
                t = (table.scan(out).collect().with_columns(path=pl.col("source").str.extract(r"(train/.*)$", 1))
                     .join(truth, on="path", how="inner"))
                flipped = t["flipped"].to_numpy()
                probs = np.stack(t["probs"].to_numpy())
                auroc = metrics.roc_auc(-torch.tensor(t["label_quality"].to_numpy()), torch.tensor(flipped))
                acc = float((probs.argmax(1) == t["true_label"].to_numpy()).mean())
                print(f"| {kind} | {rate:.0%} | {acc:.1%} | {auroc:.3f} | "
                      f"{prf(t['label_issue'].to_numpy(), flipped)} | "
                      f"{prf(probs.argmax(1) != t['given_label'].to_numpy(), flipped)} | "
                      f"{method_seconds(result.manifest['proxy'])} (all {time.perf_counter() - t0:.0f}) |",
                      flush=True)


if __name__ == "__main__":
    main()
