"""Equal-budget comparison on shard sets made by `curate demo` (or the same layout built from
other data: `shards-full`, `shards-random`, `shards` under one root). Every variant trains for
budgets given as shares of full data's complete schedule, each with a schedule fitted to the
budget; the table gives mean ± sd over seeds of the last epoch's accuracy (all tokens), the
epochs that fit and the wall-clock actually used.

    curate demo --out demo-run; curate demo --seed 1 --out demo-s1; curate demo --seed 2 --out demo-s2
    python bench/experiments/budget.py --out budget-demo --data 0:demo-run --data 1:demo-s1 --data 2:demo-s2 \\
        [--budgets 0.35,0.5,0.7,1.0] [--variants full,"random 70%",...] [--resume] [--report-only]
        [--epoch-seconds-from OTHER/results.json] [--ratio planned]
    python bench/experiments/budget.py --out merged --merge PART/results.json [PART/results.json ...] [--ratio planned]

A run split over processes or machines (one --out per part, every part planned with the same
--epoch-seconds-from) is reported as one with --merge: the parts' cells together, one table and plot.
A variant added after the calibration gets a part of its own: --epoch-seconds-from the old calibration and
--variants without full (whose cells the other parts hold); it is calibrated there beside full and planned
by that ratio, so its budgets are the same compute as the others'.

A seed may name the same root as another (training seeds on one dataset): --data 0:c10 --data 1:c10.
The student defaults to the demo's ViT (curate.demo.train.DEMO_MODEL); --img-size, --patch-size,
--depth, --dim and --heads change it (CIFAR-10: --img-size 32 --patch-size 4, the same 8x8 grid).
The shard sets of the clean variants (`shards-clean`, `shards-clean-70`) come from
bench/experiments/cifar_shards.py --backbone.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/, for common
import common  # noqa: E402

from curate.demo.budget import BUDGET_VARIANTS, BudgetConfig, run_budget, table_lines, write_merged  # noqa: E402
from curate.demo.train import DEMO_MODEL  # noqa: E402
from sparsevit.names import LOADERS  # noqa: E402


def _model(args: argparse.Namespace) -> dict:
    return DEMO_MODEL | {"img_size": args.img_size, "patch_size": args.patch_size,
                         "model_kwargs": {"depth": args.depth, "embed_dim": args.dim, "num_heads": args.heads}}


def _extra(args) -> dict:
    """TrainConfig settings beyond the model; only those given, so older runs' configs still match."""
    extra = {"loader": args.loader} if args.loader != "stream" else {}
    return extra | ({"crop_scale": tuple(args.crop_scale)} if args.crop_scale else {})


def _calibration_of(results: Path | None) -> dict[str, float] | None:
    return None if results is None else json.loads(results.read_text())["epoch_seconds"]


def main() -> None:
    ap = common.parser(__doc__)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--data", type=common.seed_root, action="append", help="SEED:ROOT, repeatable")
    ap.add_argument("--budgets", type=common.floats, default="0.35,0.5,0.7,1.0")
    ap.add_argument("--variants", type=common.words, default=",".join(v.name for v in BUDGET_VARIANTS),
                    help="comma-separated names; the first must be 'full'")
    ap.add_argument("--img-size", type=int, default=DEMO_MODEL["img_size"])
    ap.add_argument("--patch-size", type=int, default=DEMO_MODEL["patch_size"])
    ap.add_argument("--depth", type=int, default=DEMO_MODEL["model_kwargs"]["depth"])
    ap.add_argument("--dim", type=int, default=DEMO_MODEL["model_kwargs"]["embed_dim"])
    ap.add_argument("--heads", type=int, default=DEMO_MODEL["model_kwargs"]["num_heads"])
    ap.add_argument("--ref-epochs", type=int, default=15, help="full data's complete schedule")
    ap.add_argument("--loader", choices=LOADERS, default="stream",
                    help="memory on small images: an epoch costs what it trains (docs/benchmarks.md)")
    ap.add_argument("--crop-scale", type=common.floats, default=None, help="LO,HI: RandomResizedCrop's area range")
    ap.add_argument("--epoch-seconds-from", type=Path, default=None,
                    help="another run's results.json: plan with its calibration (runs split over processes "
                         "or machines; a variant it lacks is calibrated here beside full and planned by that "
                         "ratio); without it, --budgets '' only calibrates")
    ap.add_argument("--ratio", choices=("wall", "planned"), default="wall",
                    help="the table's wall-clock: as run, or epochs x calibrated epoch (runs that shared the cores)")
    ap.add_argument("--in-process", action="store_true", help="train every run in this process")
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--report-only", action="store_true", help="train nothing: report the cells already trained")
    ap.add_argument("--merge", type=Path, nargs="+", default=None, metavar="RESULTS",
                    help="train nothing: report the parts' results.json (one calibration) as one run in --out")
    args = ap.parse_args()
    if args.merge:
        report(write_merged(args.out, args.merge, args.ratio), "merged: " + ", ".join(map(str, args.merge)), args.ratio)
        return
    if not args.data:
        ap.error("--data SEED:ROOT is required (or --merge)")
    by_name = {v.name: v for v in BUDGET_VARIANTS}
    names = args.variants
    unknown = [n for n in names if n not in by_name]
    if unknown:
        ap.error(f"unknown variants {unknown}; known: {list(by_name)}")
    cfg = BudgetConfig(out=args.out, datasets=tuple(args.data), budgets=tuple(args.budgets),
                       variants=tuple(by_name[n] for n in names), model=_model(args),
                       ref_epochs=args.ref_epochs, warmup_share=1 / args.ref_epochs, extra=_extra(args),
                       epoch_seconds=_calibration_of(args.epoch_seconds_from),
                       fresh_process=not args.in_process, resume=args.resume, report_only=args.report_only,
                       ratio=args.ratio)
    report(run_budget(cfg), f"seeds {[s for s, _ in cfg.datasets]}", args.ratio)


def report(results: dict, what: str, ratio: str) -> None:
    ref = results["reference"]
    epoch_s = {k: round(v, 2) for k, v in results["epoch_seconds"].items()}
    print("\n" + common.header(f"reference: {ref['variant']} for {ref['epochs']} epochs = {ref['seconds']:.0f}s",
                               what, f"epoch seconds {epoch_s}"))
    print("\n".join(table_lines(results, ratio)))
    if results["missing"]:
        print(f"not trained ({len(results['missing'])} cells): "
              + "; ".join(f"{b:g}x {v} seed {s}" for b, v, s in results["missing"]))


if __name__ == "__main__":
    main()
