"""Real photographs for the equal-budget benchmark: CIFAR-10 from `../shared/data/cifar10.tar.gz`
(40,000 training and 10,000 test JPEGs, ImageFolder; see the README beside it) made into the
same shard sets `curate demo` makes, with the same proxies trained here and the same selection:

    python bench/experiments/cifar_shards.py --out c10 [--train-per-class 1000] [--test-per-class 200] [--flip 0.1]
        [--noise uniform|pairs|instance [--probs SCORES_FOLDER | PROBS.npy]] [--backbone MODEL.pt]
    python bench/experiments/budget.py --out budget-c10 --data 0:c10 --data 1:c10

A seeded share (`--flip`, exactly round(flip * n) of the n training labels) is flipped to another
class, so curation has something to remove, in one of bench/noise.py's kinds (`--noise`):
uniform (to any other class; the default, and the same flips as before --noise existed), pairs
(cat <-> dog, automobile <-> truck, deer <-> horse, bird <-> airplane; frog and ship keep theirs)
or instance (each class's hardest images to the class a model finds most likely). `instance` needs
`--probs`, class probabilities that did not see the labels, either
  - a `curate score --folds K` folder over clean CIFAR-10 training images, e.g. the extracted
    tarball's cifar10/train or the data/train of an earlier run at --flip 0: its `probs` are matched
    to the images picked here by the original image (`source`'s <class>/<index>.jpg, or the
    <true class>-<index>.jpg this script names files), and every picked image must be in it; or
  - an .npy (n_train, 10) array, row i for the i-th training row of truth.parquet (class by class,
    in file-name order; the same seed and --train-per-class pick the same images).
With `--backbone` (an airbench checkpoint trained on other CIFAR-10 images: probe_label_issues.py
--disjoint, then `curate score DJ/train --proxy airbench`: the situation of a user with a pretrained
model) nothing is trained here: one `curate score --checkpoint --probe` table decides, with its
out-of-sample label issues, and the shard sets are those of the issue-25 benchmark (BACKBONE_SETS):
full, random 70%, curated 70% (70% by CCS on EL2N, `curate shard`'s defaults until issue 25), clean
(label issues and near-duplicates dropped, nothing else: the defaults since) and clean + 70% of the
inputs by CCS on EL2N. No maps: random
tokens beat every map source on CIFAR-10 (docs/benchmarks.md, "Proxies for real photographs").
`data/truth.parquet` records the true labels and the noise kind (the demo's truth format, the box
being the whole image, plus `noise`). Prints the label-noise AUC of each proxy and what the
selection removed.
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

import numpy as np
import polars as pl
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/, for common
import common  # noqa: E402
import noise  # noqa: E402

from curate.common.atomic import atomic_path, write_bytes  # noqa: E402
from curate.common.runfolder import RunFolder  # noqa: E402
from curate.demo import evaluate  # noqa: E402
from curate.demo.data import TRUTH  # noqa: E402
from curate.demo.run import PROXIES, score_validation, shard_curated  # noqa: E402
from curate.demo.train import baseline_shards  # noqa: E402
from curate.score import table  # noqa: E402
from curate.score.job import ScoreConfig, run_score  # noqa: E402
from curate.score.proxies import RECIPES  # noqa: E402
from curate.select.policies import SelectConfig  # noqa: E402
from curate.shard.job import ShardConfig, run_shard  # noqa: E402

TARBALL = common.ROOT.parent / "shared" / "data" / "cifar10.tar.gz"
PHASH_DEDUP = 0.75  # `curate shard --dedup-on phash`'s threshold (docs/benchmarks.md, "Near-duplicates")
# --backbone's shard sets: folder -> (the selection, near-duplicate threshold); a float keep is a share of the
# candidates left after the drops, an int a count (clean + 70%: 70% of all inputs, as many as random 70% keeps)
BACKBONE_SETS: dict[str, Callable[[int, int], tuple[SelectConfig, float | None]]] = {
    "shards-full": lambda n, seed: (SelectConfig(keep=1.0, policy="random", drop_label_issues=False, seed=seed),
                                    None),
    "shards-random": lambda n, seed: (SelectConfig(keep=0.7, policy="random", drop_label_issues=False, seed=seed),
                                      None),
    # "curated 70%": 70% by CCS on EL2N, label issues kept (curate shard's defaults until issue 25)
    "shards": lambda n, seed: (SelectConfig(keep=0.7, drop_label_issues=False, seed=seed), None),
    "shards-clean": lambda n, seed: (SelectConfig(keep=1.0, drop_label_issues=True, seed=seed), PHASH_DEDUP),
    "shards-clean-70": lambda n, seed: (SelectConfig(keep=round(0.7 * n), drop_label_issues=True, seed=seed),
                                        PHASH_DEDUP),
}


def class_files(root: Path) -> dict[str, list[Path]]:
    """Class name -> its files, in file-name order (a stable order whatever the tar's)."""
    return {d.name: sorted(d.iterdir(), key=lambda p: p.name) for d in sorted(root.iterdir()) if d.is_dir()}


def image_id(source: str) -> str:
    """The CIFAR-10 image a file is, as <true class>-<index>: from the tarball's <class>/<index>.jpg
    or from the <true class>-<index>.jpg that prepare() writes (class names have no "-")."""
    path = Path(source)
    return path.stem if "-" in path.stem else f"{path.parent.name}-{path.stem}"


def read_probs(path: Path, images: list[str]) -> np.ndarray:
    """(len(images), C) class probabilities for the named images (see the module's docstring)."""
    if path.suffix == ".npy":
        probs = np.load(path)
        if probs.ndim != 2 or len(probs) != len(images):
            raise ValueError(f"{path} holds shape {probs.shape}; --probs needs ({len(images)}, classes)")
        return probs
    scored = table.scan(path).filter(pl.col("probs").is_not_null()).select("source", "probs").collect()
    by_image = dict(zip(map(image_id, scored["source"]), scored["probs"].to_list()))
    missing = [name for name in images if name not in by_image]
    if missing:
        raise ValueError(f"{path} has no probs for {len(missing)} of the {len(images)} training images, "
                         f"e.g. {missing[:3]}: score clean images that include them")
    return np.array([by_image[name] for name in images], dtype=np.float64)


def noisy(kind: str, labels: np.ndarray, flip: float, rng: random.Random, classes: list[str],
          probs: Callable[[], np.ndarray]) -> np.ndarray:
    """The given labels: `flip` of `labels` flipped the bench/noise.py way `kind` names."""
    if kind == "uniform":
        return noise.uniform(labels, flip, rng, len(classes))
    if kind == "pairs":
        return noise.pairs(labels, flip, rng, classes)
    if kind == "instance":
        return noise.instance(labels, flip, rng, probs())
    raise ValueError(f"unknown noise kind {kind!r}; one of {noise.KINDS}")


def prepare(tarball: Path, data: Path, train_per_class: int, test_per_class: int, flip: float, seed: int,
            claim: Callable[[list[str]], None], kind: str = "uniform", probs: Path | None = None) -> pl.DataFrame:
    """Subsample CIFAR-10 into data/train and data/val, flip exactly round(flip * n) of the n
    training labels (bench/noise.py's `kind`; `probs` for instance), and write truth.parquet.

    One random.Random(seed) picks the images and then the flips, so the default (uniform) run
    makes the same data set as before there were noise kinds."""
    if kind == "instance" and probs is None:
        raise ValueError("instance noise needs probs: a curate score folder or an .npy")
    rng = random.Random(seed)
    with tempfile.TemporaryDirectory() as tmp:
        with tarfile.open(tarball) as tar:
            tar.extractall(tmp, filter="data")
        src = Path(tmp) / "cifar10"
        picked: list[tuple[str, int, Path]] = []  # (split, true label, file)
        classes = sorted(class_files(src / "train"))
        for split, source, per_class in (("train", "train", train_per_class), ("val", "test", test_per_class)):
            files = class_files(src / source)
            for label, name in enumerate(classes):
                chosen = rng.sample(files[name], min(per_class, len(files[name])))
                picked += [(split, label, p) for p in sorted(chosen, key=lambda p: p.name)]
        train = [(label, path) for split, label, path in picked if split == "train"]  # picked lists train first
        labels = np.array([label for label, _ in train], dtype=np.int64)
        images = [image_id(str(path)) for _, path in train]
        given = noisy(kind, labels, flip, rng, classes, lambda: read_probs(probs, images)).tolist()
        given += [label for split, label, _ in picked if split != "train"]
        rows, sources = [], []
        for (split, label, path), g in zip(picked, given):
            with Image.open(path) as im:
                w, h = im.size
            rows.append(dict(path=f"{split}/{classes[g]}/{classes[label]}-{path.stem}.jpg", split=split,
                             class_name=classes[g], true_class=classes[label], given_label=g, true_label=label,
                             flipped=g != label, noise=kind, dup_group=-1, x0=0, y0=0, x1=w, y1=h))
            sources.append(path)
        claim([r["path"] for r in rows] + [TRUTH])
        for r, path in zip(rows, sources):
            (data / r["path"]).parent.mkdir(parents=True, exist_ok=True)
            write_bytes(data / r["path"], path.read_bytes())
    truth = pl.DataFrame(rows).with_columns(pl.col("dup_group").cast(pl.Int64))
    with atomic_path(data / TRUTH) as tmp_path:
        truth.write_parquet(tmp_path)
    return truth


def disjoint(tarball: Path, data: Path, per_class: int, scored_per_class: int, seed: int) -> int:
    """Write data/train/<class>/<index>.jpg: `per_class` clean training images per class that
    prepare(tarball, ..., scored_per_class, ..., seed) does not pick, for a `--probe` backbone that
    never saw the scored images. Returns how many it wrote; refuses an existing `data`."""
    if data.exists():
        raise ValueError(f"{data} exists; give a new folder")
    with tempfile.TemporaryDirectory() as tmp:
        with tarfile.open(tarball) as tar:
            tar.extractall(tmp, filter="data")
        files = class_files(Path(tmp) / "cifar10" / "train")
        rng, other = random.Random(seed), random.Random(f"disjoint-{seed}")
        written = 0
        for name in sorted(files):  # prepare()'s own draws, in its order: its first are the training picks
            picked = set(rng.sample(files[name], min(scored_per_class, len(files[name]))))
            rest = [p for p in files[name] if p not in picked]
            for path in other.sample(rest, min(per_class, len(rest))):
                (data / "train" / name).mkdir(parents=True, exist_ok=True)
                write_bytes(data / "train" / name / path.name, path.read_bytes())
                written += 1
    return written


def backbone_sets(folder: RunFolder, data: Path, backbone: Path, seed: int, per_shard: int,
                  workers: int) -> None:
    """Score data/train with the frozen backbone and its K-fold probes (out-of-sample label issues),
    then write BACKBONE_SETS under the run folder, each with the unpruned validation split."""
    t0 = time.perf_counter()
    scores = folder.claim_run("scores-probe")
    result = run_score(ScoreConfig(source=str(data / "train"), out=scores, proxy="airbench", checkpoint=backbone,
                                   probe=True, seed=seed, workers=workers, overwrite=True, progress=False))
    joined = evaluate.join_truth(table.scan(scores).collect(), data)
    flagged = joined.filter(pl.col("label_issue"))
    print(f"probe: {time.perf_counter() - t0:.0f}s, held-out agreement with the given labels "
          f"{result.manifest['proxy']['probe']['held_out_accuracy']:.1%}; label issues {flagged.height}, "
          f"{int(flagged['flipped'].sum())} of them flipped (of {int(joined['flipped'].sum())})", flush=True)
    n = joined.height
    for name, selection in BACKBONE_SETS.items():
        select, dedup = selection(n, seed)
        shard = run_shard(ShardConfig(str(data / "train"), (scores,), folder.claim_run(name), select, dedup=dedup,
                                      val=str(data / "val"), samples_per_shard=per_shard, shard_multiple=4,
                                      name="cifar10", overwrite=True, progress=False))
        sel = evaluate.join_truth(shard.selection, data)  # the selection names each key's source
        kept = sel.filter(pl.col("kept"))
        print(f"{name}: kept {kept.height} of {n}, flipped among them {int(kept['flipped'].sum())} "
              f"(of {int(sel['flipped'].sum())})", flush=True)


def main() -> None:
    ap = common.parser(__doc__)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--tar", type=Path, default=TARBALL)
    ap.add_argument("--train-per-class", type=int, default=1000)
    ap.add_argument("--test-per-class", type=int, default=200)
    ap.add_argument("--flip", type=float, default=0.1, help="share of training labels flipped: 0.1, 0.2, 0.4, ...")
    ap.add_argument("--noise", choices=noise.KINDS, default="uniform", help="how labels are flipped (bench/noise.py)")
    ap.add_argument("--probs", type=Path, default=None,
                    help="for --noise instance: a curate score folder or an .npy (see above)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--proxy-epochs", type=int, default=None, help="default: each recipe's")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--backbone", type=Path, default=None,
                    help="an airbench checkpoint trained on other images: probe it, train no proxy (see above)")
    args = ap.parse_args()
    if not args.tar.is_file():
        sys.exit(f"{args.tar} is not there: this benchmark needs the shared CIFAR-10 tarball")
    if (args.noise == "instance") != (args.probs is not None):
        ap.error("--probs goes with --noise instance, and only with it")
    per_shard = max(1, args.train_per_class // 2)
    with RunFolder.open(args.out, "cifar-shards", "overwrite") as folder:
        t0 = time.perf_counter()
        data = folder.root / "data"
        truth = prepare(args.tar, data, args.train_per_class, args.test_per_class, args.flip, args.seed,
                        claim=lambda names: folder.claim_many(f"data/{n}" for n in names), kind=args.noise,
                        probs=args.probs)
        print(f"data: {truth.filter(pl.col('split') == 'train').height} train ({int(truth['flipped'].sum())} "
              f"flipped, {args.noise}), {truth.filter(pl.col('split') == 'val').height} val "
              f"in {time.perf_counter() - t0:.0f}s", flush=True)
        if args.backbone is not None:
            backbone_sets(folder, data, args.backbone, args.seed, per_shard, args.workers)
            print(f"{', '.join(BACKBONE_SETS)} under {folder.root} in {time.perf_counter() - t0:.0f}s")
            return
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
