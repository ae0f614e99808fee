"""Does `curate shard --max-side` change what the model learns? The demo's curated 70% shard set
written again at a max side above the demo's 64 px images (every image keeps its original bytes)
and at one below it (every image re-encoded smaller), and the demo's ViT trained on each with the
demo's recipe, against the shard set as `curate demo` wrote it:

    python bench/experiments/max_side_demo.py --out max-side --demo 0:demo-run --demo 1:demo-s1 [--sides 128,48]

Prints validation accuracy (last epoch, all tokens) per seed and the mean, and the train shards' MB.
"""
from __future__ import annotations

import json
import statistics
import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/, for common
import common  # noqa: E402

from curate.common.runfolder import RunFolder  # noqa: E402
from curate.demo.run import curated_config  # noqa: E402
from curate.demo.train import VARIANTS, DemoTrain, train_one  # noqa: E402
from curate.shard.job import run_shard  # noqa: E402


def main() -> None:
    ap = common.parser(__doc__)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--demo", type=common.seed_root, action="append", required=True, help="SEED:DEMO_OUT, repeatable")
    ap.add_argument("--sides", type=common.ints, default="128,48")
    args = ap.parse_args()
    curated = next(v for v in VARIANTS if v.name == "curated 70%")
    sides: list[int | None] = [None, *args.sides]
    acc: dict[int | None, list[float]] = {s: [] for s in sides}
    mb: dict[int | None, float] = {}
    with RunFolder.open(args.out, "max-side-demo", "overwrite") as folder:
        for seed, root in args.demo:
            written = json.loads((root / "shards" / "manifest.json").read_text())["config"]
            for side in sides:
                tag = "original" if side is None else f"max-side-{side}"
                shards = folder.claim_run(f"seed-{seed}/{tag}/shards")
                cfg = curated_config(root, root / "data", shards, seed, written["samples_per_shard"],
                                     written["name"], progress=False)
                run_shard(replace(cfg, max_side=side))
                mb[side] = sum(p.stat().st_size for p in shards.glob("train-*.tar")) / 1e6
                summary = train_one(shards, folder.claim_run(f"seed-{seed}/{tag}/train"), curated,
                                    DemoTrain(seed=seed))
                acc[side].append(summary["val_acc"])
                print(f"seed {seed} {tag}: val {summary['val_acc']:.2%} ({mb[side]:.1f} MB)", flush=True)
    print("\n" + common.header(f"seeds {[s for s, _ in args.demo]}", "curated 70%, the demo's ViT and recipe"))
    print("| shards | train MB | val acc per seed | mean |\n|---|---|---|---|")
    for side in sides:
        name = "original bytes" if side is None else f"--max-side {side}"
        print(f"| {name} | {mb[side]:.1f} | {' / '.join(f'{100 * a:.1f}' for a in acc[side])} | "
              f"{100 * statistics.fmean(acc[side]):.1f} |")


if __name__ == "__main__":
    main()
