"""Which importance maps should shards carry on real photographs? Token dropping at keep 0.7 by
CAM maps of the small-image CNN (`airbench`) against by the ViT proxy's CLS maps (`demo-vit`)
against random tokens, at equal epochs, over seeds, on CIFAR-10 from `../shared/data`:

    python bench/experiments/map_sources.py --out map-sources [--seeds 0,1] [--epochs 10] [--keep 0.7]

Both proxies are trained here on the same 10,000 training images (10% uniform flips, the proxies
issue's subset); the shards keep every image (random policy, keep 1.0), so the only difference
between the token-dropping runs is the map each image carries. The student is a depth-4 dim-64
ViT at 32 px with 4-px patches (64 tokens), trained by `curate train`; accuracy is on 2,000 clean
test images with all tokens. Cell by cell resumable: a finished run (its summary.json) is read,
not trained again; rerun the same command after a kill.
"""
from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/, for common
import common  # noqa: E402
import cifar_shards  # noqa: E402

from curate.common.runfolder import RunFolder  # noqa: E402
from curate.demo.train import DEMO_MODEL, Variant  # noqa: E402
from curate.score.job import ScoreConfig, run_score  # noqa: E402
from curate.score.proxies import RECIPES  # noqa: E402
from curate.select.policies import SelectConfig  # noqa: E402
from curate.shard.job import ShardConfig, run_shard  # noqa: E402
from sparsevit.train import TrainConfig, run_train  # noqa: E402

SOURCES = {"cam": "airbench", "cls": "demo-vit"}  # map source -> the proxy that draws it
STUDENT = DEMO_MODEL | {"img_size": 32, "patch_size": 4, "model_kwargs": {"depth": 4, "embed_dim": 64, "num_heads": 2}}
# run name -> (shard set, drop_by): random tokens read the CAM shards (their maps are unused)
RUNS = {"cam maps": ("shards-cam", "importance"), "demo-vit maps": ("shards-cls", "importance"),
        "random tokens": ("shards-cam", "random")}


def _prepared(folder: RunFolder, seed: int) -> Path:
    data = folder.root / "data"
    if not (data / "truth.parquet").is_file():
        cifar_shards.prepare(cifar_shards.TARBALL, data, 1000, 200, 0.1, seed,
                             claim=lambda names: folder.claim_many(f"data/{n}" for n in names))
    return data


def _shards(folder: RunFolder, data: Path, source: str, seed: int) -> Path:
    """Score with the source's proxy, then shard every image with its maps."""
    scores, shards = folder.root / f"scores-{source}", folder.root / f"shards-{source}"
    if not (scores / "manifest.json").is_file():
        t0 = time.perf_counter()
        proxy = SOURCES[source]
        run_score(ScoreConfig(source=str(data / "train"), out=folder.claim_run(f"scores-{source}"), proxy=proxy,
                              train_epochs=RECIPES[proxy].epochs, importance=source, seed=seed, overwrite=True,
                              progress=False))
        print(f"scores-{source} ({proxy}): {time.perf_counter() - t0:.0f}s", flush=True)
    if not (shards / "manifest.json").is_file():
        run_shard(ShardConfig(str(data / "train"), (scores,), folder.claim_run(f"shards-{source}"),
                              SelectConfig(keep=1.0, policy="random", drop_label_issues=False, seed=seed),
                              dedup=None, val=str(data / "val"),
                              samples_per_shard=500, shard_multiple=4, name=f"cifar10-{source}", overwrite=True,
                              progress=False))
    return shards


def _train(folder: RunFolder, name: str, seed: int, args) -> dict:
    """One student run, or its summary when a previous invocation finished it."""
    shard_set, drop_by = RUNS[name]
    run = folder.root / "train" / f"{name.replace(' ', '-')}-seed{seed}"
    if (run / "summary.json").is_file():
        return json.loads((run / "summary.json").read_text())
    v = Variant(name, shard_set, keep=args.keep, drop_by=drop_by)
    cfg = TrainConfig(shards=folder.root / shard_set, out=folder.claim_run(str(run.relative_to(folder.root))),
                      epochs=args.epochs, batch_size=64, lr=4e-3, warmup_epochs=1.0, workers=2, seed=seed,
                      overwrite=True, progress=False, **v.train_fields(STUDENT))
    return run_train(cfg)


def main() -> None:
    ap = common.parser(__doc__)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--seeds", type=common.ints, default="0,1")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--keep", type=float, default=0.7)
    ap.add_argument("--data-seed", type=int, default=0, help="the subset, its flips and the proxies' seed")
    args = ap.parse_args()
    if not cifar_shards.TARBALL.is_file():
        sys.exit(f"{cifar_shards.TARBALL} is not there: this benchmark needs the shared CIFAR-10 tarball")
    mode = "resume" if args.out.exists() else "fresh"
    with RunFolder.open(args.out, "map-sources", mode) as folder:
        data = _prepared(folder, args.data_seed)
        for source in SOURCES:
            _shards(folder, data, source, args.data_seed)
        acc: dict[str, list[float]] = {name: [] for name in RUNS}
        for seed in args.seeds:
            for name in RUNS:
                s = _train(folder, name, seed, args)
                acc[name].append(s["val_acc"])
                print(f"seed {seed} {name}: {s['val_acc']:.1%} ({s.get('wall_s', float('nan')):.0f}s)", flush=True)
    print("\n" + common.header(f"keep {args.keep}", f"{args.epochs} epochs", f"seeds {args.seeds}"))
    print("| tokens kept by | mean test accuracy | per seed |\n|---|---|---|")
    for name, values in acc.items():
        spread = f" ± {statistics.stdev(values):.1%}" if len(values) > 1 else ""
        print(f"| {name} | {statistics.mean(values):.1%}{spread} | {' / '.join(f'{v:.1%}' for v in values)} |")


if __name__ == "__main__":
    main()
