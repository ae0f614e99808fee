"""Token dropping by stored importance vs random dropping at the same keep ratio, on the demo
shards, over several seeds and the same budget (epochs, model, data). Accuracy is measured on
the demo's clean validation split with all tokens (how the trained model is used) and, where
the validation shards carry maps, with the same keep ratio.

    curate demo --out demo-run            # writes demo-run/shards
    python bench/experiments/drop_vs_random.py demo-run/shards [--keep 0.5] [--seeds 0,1,2] [--epochs 15]
"""
from __future__ import annotations

import statistics
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/, for common
import common  # noqa: E402

from curate.demo.train import DEMO_MODEL, DemoTrain, Variant, train_one  # noqa: E402


def main() -> None:
    ap = common.parser(__doc__)
    ap.add_argument("shards", type=Path)
    ap.add_argument("--keep", type=float, default=0.5)
    ap.add_argument("--seeds", type=common.ints, default="0,1,2")
    ap.add_argument("--epochs", type=int, default=DemoTrain.epochs)
    args = ap.parse_args()
    cfg = DemoTrain(epochs=args.epochs)
    seeds = args.seeds
    acc: dict[str, list[float]] = {"importance": [], "random": []}
    dropped: dict[str, list[float]] = {"importance": [], "random": []}
    with tempfile.TemporaryDirectory(dir=".") as tmp:
        for seed in seeds:
            for mode in acc:
                v = Variant(mode, str(args.shards), keep=args.keep, drop_by=mode)
                s = train_one(args.shards, Path(tmp) / f"{mode}-{seed}", v, replace(cfg, seed=seed))
                acc[mode].append(s["val_acc"])
                dropped[mode].append(s["val_acc_dropped"] if s["val_acc_dropped"] is not None else float("nan"))
                print(f"seed {seed} {mode:10s} val {s['val_acc']:.1%}, at keep {args.keep} {dropped[mode][-1]:.1%} "
                      f"({s['wall_s']:.0f}s)", flush=True)
    print(common.header(f"keep {args.keep}", f"{args.epochs} epochs", f"seeds {seeds}", f"model {DEMO_MODEL}"))
    for title, table in (("all tokens", acc), (f"keep {args.keep}, dropped as in training", dropped)):
        print(f"\nvalidation accuracy, {title}:")
        print("| drop by | " + " | ".join(f"seed {s}" for s in seeds) + " | mean |")
        print("|---|" + "---|" * (len(seeds) + 1))
        for mode, vals in table.items():
            print(f"| {mode} | " + " | ".join(f"{v:.1%}" for v in vals) + f" | {statistics.mean(vals):.1%} |")
        wins = sum(a > b for a, b in zip(table["importance"], table["random"]))
        print(f"importance beats random in {wins} of {len(seeds)} seeds")


if __name__ == "__main__":
    main()
