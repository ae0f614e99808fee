"""Does a near-chance proxy beside a good one spoil the selection? `curate shard`'s selection
(keep 0.7, CCS by EL2N, label issues dropped) from a good proxy's table alone, from it and a
near-chance proxy's table voting equally (what `curate shard` did before proxies were weighed),
and weighed by held-out skill (what it does now), on CIFAR-10 photographs with flipped labels:

    python bench/experiments/probe_label_issues.py --out grid --backbone bb/proxy/model.pt \\
        --kinds uniform --rates 0.1                                    # the good table: grid/uniform-0.1
    python bench/experiments/proxy_weighing.py --cell grid/uniform-0.1 --out weighing

The near-chance proxy is `demo-vit` trained here for 1 epoch with 2 folds (so it records a
held-out accuracy), scored into OUT/weak on the cell's images. Prints, per selection, the share of
flipped and of clean labels removed, and whether the selection is the good table's own.
"""
from __future__ import annotations

import sys
from pathlib import Path

import polars as pl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/, for common
import common  # noqa: E402

from curate.common.runfolder import RunFolder  # noqa: E402
from curate.score import table  # noqa: E402
from curate.score.job import ScoreConfig, run_score  # noqa: E402
from curate.select.policies import SelectConfig, load_scores, select  # noqa: E402
from curate.select.weighing import describe, lead, weigh  # noqa: E402


def removed(sel: pl.DataFrame, truth: pl.DataFrame, good: Path) -> tuple[float, float]:
    """Shares of the flipped and of the clean training labels the selection did not keep."""
    paths = table.scan(good).select("key", path=pl.col("source").str.extract(r"(train/.*)$", 1)).collect()
    t = sel.join(paths, on="key").join(truth.select("path", "flipped"), on="path")
    flipped, clean = t.filter(pl.col("flipped")), t.filter(~pl.col("flipped"))
    return 1 - flipped["kept"].mean(), 1 - clean["kept"].mean()


def main() -> None:
    ap = common.parser(__doc__)
    ap.add_argument("--cell", type=Path, required=True, help="a probe_label_issues cell: data/ and scores/")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--keep", type=float, default=0.7)
    args = ap.parse_args()
    good, data = args.cell / "scores", args.cell / "data"
    truth = pl.read_parquet(data / "truth.parquet").filter(pl.col("split") == "train")
    with RunFolder.open(args.out, "proxy-weighing", "resume" if args.out.exists() else "fresh") as folder:
        weak = folder.root / "weak"
        if not (weak / "manifest.json").is_file():
            run_score(ScoreConfig(source=str(data / "train"), out=folder.claim_run("weak"), proxy="demo-vit",
                                  train_epochs=1, folds=2, progress=False, overwrite=True))
    dirs = (good, weak)
    votes = weigh(dirs, [table.read_manifest(d) for d in dirs])
    first = lead(votes)
    print("\n".join(describe(v, first, None) for v in votes))
    cfg = SelectConfig(keep=args.keep, by=("el2n",), policy="ccs", drop_label_issues=True)
    selections = {
        "good proxy alone": select(load_scores((good,), cfg.by), cfg),
        "good + near-chance, equal votes (before)": select(load_scores(dirs, cfg.by), cfg),
        "good + near-chance, weighed (now)": select(load_scores(dirs, cfg.by, [v.weight for v in votes], first), cfg),
    }
    alone = selections["good proxy alone"]["kept"].to_list()
    print("\n" + common.header(f"keep {args.keep}, ccs by el2n, --drop-label-issues", f"cell {args.cell}"))
    print("| selection | flipped labels removed | clean labels removed | same selection as the good proxy alone |\n"
          "|---|---|---|---|")
    for name, sel in selections.items():
        f, c = removed(sel, truth, good)
        print(f"| {name} | {f:.1%} | {c:.1%} | {'yes' if sel['kept'].to_list() == alone else 'no'} |")


if __name__ == "__main__":
    main()
