"""Do class activation maps find the object? The demo's data (its truth boxes), a CNN proxy scored
with `--importance cam` against the demo's ViT with its CLS attention, each trained here with its
recipe:

    python bench/experiments/cam_localisation.py --out cam-loc [--seed 0] [--proxies demo-cnn,airbench,demo-vit]

Prints, per proxy, the share of the top-25% patches that lie on the object box and that share over
chance (the box's area), the measure of `curate demo`'s report, and the training time.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/, for common
import common  # noqa: E402

from curate.common.runfolder import RunFolder  # noqa: E402
from curate.demo import evaluate  # noqa: E402
from curate.demo.data import DemoConfig, make_demo  # noqa: E402
from curate.score import table  # noqa: E402
from curate.score.job import ScoreConfig, run_score  # noqa: E402
from curate.score.proxies import RECIPES  # noqa: E402


def main() -> None:
    ap = common.parser(__doc__)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--proxies", default="demo-cnn,airbench,demo-vit")
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    with RunFolder.open(args.out, "cam-localisation", "overwrite") as folder:
        data = folder.root / "data"
        make_demo(DemoConfig(root=data, seed=args.seed),
                  claim=lambda names: folder.claim_many(f"data/{n}" for n in names))
        print("| proxy | maps | grid | on box (top 25%) | x chance | train s |\n|---|---|---|---|---|---|")
        for proxy in args.proxies.split(","):
            t0 = time.perf_counter()
            out = folder.claim_run(proxy)
            result = run_score(ScoreConfig(source=str(data / "train"), out=out, proxy=proxy, seed=args.seed,
                                           train_epochs=RECIPES[proxy].epochs, workers=args.workers,
                                           overwrite=True, progress=False))
            maps = result.manifest["proxy"]["importance"]
            loc = evaluate.localisation(evaluate.join_truth(table.scan(out).collect(), data))
            print(f"| {proxy} | {maps['method']} | {maps['grid']} | {loc['on_box']:.1%} | {loc['ratio']:.2f}x | "
                  f"{time.perf_counter() - t0:.0f} |", flush=True)


if __name__ == "__main__":
    main()
