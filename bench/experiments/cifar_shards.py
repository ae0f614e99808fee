"""Real photographs for the equal-budget benchmark: CIFAR-10 from `../shared/data/cifar10.tar.gz`
(40,000 training and 10,000 test JPEGs, ImageFolder; see the README beside it) made into the
same shard sets `curate demo` makes, with the same proxies trained here and the same selection:

    python bench/experiments/cifar_shards.py --out c10 [--train-per-class 1000] [--test-per-class 200] [--flip 0.1]
    python bench/experiments/budget.py --out budget-c10 --data 0:c10 --data 1:c10

A seeded share (`--flip`) of the training labels is flipped to another class, so curation has
something to remove; `data/truth.parquet` records the true labels (the demo's truth format, the
box being the whole image). Prints the label-noise AUC of each proxy and what the selection removed.
The default test suite never reads ../shared; this script says so and stops when it is not there.
"""
from __future__ import annotations

import random
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Callable

import polars as pl
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/, for common
import common  # noqa: E402

from curate.common.atomic import atomic_path, write_bytes  # noqa: E402
from curate.common.runfolder import RunFolder  # noqa: E402
from curate.demo import evaluate  # noqa: E402
from curate.demo.data import TRUTH  # noqa: E402
from curate.demo.run import PROXIES, score_validation, shard_curated  # noqa: E402
from curate.demo.train import baseline_shards  # noqa: E402
from curate.score import table  # noqa: E402
from curate.score.job import ScoreConfig, run_score  # noqa: E402
from curate.score.proxies import RECIPES  # noqa: E402

TARBALL = common.ROOT.parent / "shared" / "data" / "cifar10.tar.gz"


def _files(root: Path) -> dict[str, list[Path]]:
    """Class name -> its files, in file-name order (a stable order whatever the tar's)."""
    return {d.name: sorted(d.iterdir(), key=lambda p: p.name) for d in sorted(root.iterdir()) if d.is_dir()}


def prepare(tarball: Path, data: Path, train_per_class: int, test_per_class: int, flip: float, seed: int,
            claim: Callable[[list[str]], None]) -> pl.DataFrame:
    """Subsample CIFAR-10 into data/train and data/val, flip exactly round(flip * n) of the n
    training labels (each to a uniformly drawn other class), and write truth.parquet."""
    rng = random.Random(seed)
    with tempfile.TemporaryDirectory() as tmp:
        with tarfile.open(tarball) as tar:
            tar.extractall(tmp, filter="data")
        src = Path(tmp) / "cifar10"
        picked: list[tuple[str, int, Path]] = []  # (split, true label, file)
        classes = sorted(_files(src / "train"))
        for split, source, per_class in (("train", "train", train_per_class), ("val", "test", test_per_class)):
            files = _files(src / source)
            for label, name in enumerate(classes):
                chosen = rng.sample(files[name], min(per_class, len(files[name])))
                picked += [(split, label, p) for p in sorted(chosen, key=lambda p: p.name)]
        train_rows = [i for i, (split, _, _) in enumerate(picked) if split == "train"]
        flipped = set(rng.sample(train_rows, round(flip * len(train_rows))))
        rows, sources = [], []
        for i, (split, label, path) in enumerate(picked):
            given = rng.choice([c for c in range(len(classes)) if c != label]) if i in flipped else label
            with Image.open(path) as im:
                w, h = im.size
            rows.append(dict(path=f"{split}/{classes[given]}/{classes[label]}-{path.stem}.jpg", split=split,
                             class_name=classes[given], true_class=classes[label], given_label=given,
                             true_label=label, flipped=i in flipped, dup_group=-1, x0=0, y0=0, x1=w, y1=h))
            sources.append(path)
        claim([r["path"] for r in rows] + [TRUTH])
        for r, path in zip(rows, sources):
            (data / r["path"]).parent.mkdir(parents=True, exist_ok=True)
            write_bytes(data / r["path"], path.read_bytes())
    truth = pl.DataFrame(rows).with_columns(pl.col("dup_group").cast(pl.Int64))
    with atomic_path(data / TRUTH) as tmp_path:
        truth.write_parquet(tmp_path)
    return truth


def main() -> None:
    ap = common.parser(__doc__)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--tar", type=Path, default=TARBALL)
    ap.add_argument("--train-per-class", type=int, default=1000)
    ap.add_argument("--test-per-class", type=int, default=200)
    ap.add_argument("--flip", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--proxy-epochs", type=int, default=None, help="default: each recipe's")
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    if not args.tar.is_file():
        sys.exit(f"{args.tar} is not there: this benchmark needs the shared CIFAR-10 tarball")
    per_shard = max(1, args.train_per_class // 2)
    with RunFolder.open(args.out, "cifar-shards", "overwrite") as folder:
        t0 = time.perf_counter()
        data = folder.root / "data"
        truth = prepare(args.tar, data, args.train_per_class, args.test_per_class, args.flip, args.seed,
                        claim=lambda names: folder.claim_many(f"data/{n}" for n in names))
        print(f"data: {truth.filter(pl.col('split') == 'train').height} train "
              f"({int(truth['flipped'].sum())} flipped), {truth.filter(pl.col('split') == 'val').height} val "
              f"in {time.perf_counter() - t0:.0f}s", flush=True)
        for name, proxy in PROXIES.items():
            t1 = time.perf_counter()
            run_score(ScoreConfig(source=str(data / "train"), out=folder.claim_run(name), proxy=proxy,
                                  train_epochs=args.proxy_epochs or RECIPES[proxy].epochs, seed=args.seed,
                                  workers=args.workers, overwrite=True, progress=False))
            joined = evaluate.join_truth(table.scan(folder.root / name).collect(), data)
            ok = joined.filter(pl.col("status") == "ok")
            print(f"{proxy}: {time.perf_counter() - t1:.0f}s, accuracy vs true labels "
                  f"{(ok['pred'] == ok['true_label']).mean():.1%}, label-noise AUC el2n "
                  f"{evaluate.label_noise_auc(joined, 'el2n'):.3f}, forgetting "
                  f"{evaluate.label_noise_auc(joined, 'forgetting'):.3f}", flush=True)
        score_validation(folder, data, args.workers)
        scores = tuple(folder.root / f for f in PROXIES)
        shard = shard_curated(folder, data, args.seed, per_shard, "cifar10", progress=False)
        sel = shard.selection.join(table.scan(scores[0]).select("key", "source").collect(), on="key")
        sel = evaluate.join_truth(sel, data)
        removed = sel.group_by("flipped").agg((~pl.col("kept")).mean().alias("removed")).sort("flipped")
        print(f"curated 70%: kept {int(sel['kept'].sum())} of {len(sel)}; removed "
              + ", ".join(f"{'flipped' if f else 'clean'} {r:.1%}" for f, r in removed.iter_rows()), flush=True)
        baseline_shards(folder, data, scores, args.seed, per_shard, progress=False)
        print(f"shards-full, shards-random, shards under {folder.root} in {time.perf_counter() - t0:.0f}s")


if __name__ == "__main__":
    main()
