"""Where a training epoch's time goes on small images, and what an epoch over fewer examples or
fewer tokens costs against a full one, as ratios in one run.

On CIFAR-10 from `../shared/data` (10,000 training images at 32 px, 2,000 test images), with the
CIFAR student of the benchmarks (a depth-4 dim-64 ViT, 4-px patches: 64 tokens), batch 64:

- loader alone: one epoch of `curate train`'s batches, drained without a model;
- model alone: the same number of optimizer steps over batches made once, beforehand;
- epoch: `sparsevit.train.train_epoch`, what `curate train` runs (loader and model together);
- eval: one pass over the 2,000 test images.

Each for full data and a random 70% of it, at keep 1.0 and keep 0.7 (by the shards' maps), for
every `--loaders` value (`stream`: webdataset decoding in loader workers; `memory`: the split
decoded once into memory, augmented in batches in the main process). Rounds are interleaved and
the best of each cell kept; keep the cores quiet while it runs.

    python bench/throughput/epoch_cost.py --work epoch-cost [--rounds 3] [--loaders stream,memory]

The shards are made once in `--work` (maps from a random-weights ViT proxy: their cost, not
their content, matters here) and reused by later runs.
"""
from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/, for common
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))  # for cifar_shards
import common  # noqa: E402
import cifar_shards  # noqa: E402

from curate.common.runfolder import RunFolder  # noqa: E402
from curate.score.job import ScoreConfig, run_score  # noqa: E402
from curate.select.policies import SelectConfig  # noqa: E402
from curate.shard.format import read_split  # noqa: E402
from curate.shard.job import ShardConfig, run_shard  # noqa: E402
from map_sources import STUDENT  # noqa: E402
from sparsevit.train import TrainConfig, build, evaluate, train_epoch, train_loader, train_step  # noqa: E402
from sparsevit.train import validation_split  # noqa: E402

SUBSETS = {"full": 1.0, "random 70%": 0.7}  # shard set -> share of the training images kept


def prepare(folder: RunFolder, workers: int) -> dict[str, Path]:
    """The CIFAR subset, its scores (random-weights demo-vit: CLS maps) and one shard set per subset."""
    work = folder.root
    data = work / "data"
    if not (data / "truth.parquet").is_file():
        cifar_shards.prepare(cifar_shards.TARBALL, data, 1000, 200, 0.0, 0,
                             claim=lambda names: folder.claim_many(f"data/{n}" for n in names))
    scores = work / "scores"
    if not (scores / "manifest.json").is_file():
        common.random_proxy(work / "proxy.pt", 10, "demo-vit", 32)
        run_score(ScoreConfig(source=str(data / "train"), out=folder.claim_run("scores"), proxy="demo-vit",
                              checkpoint=work / "proxy.pt", image_size=32, importance="cls", workers=workers,
                              overwrite=True, progress=False))
    shards = {}
    for name, keep in SUBSETS.items():
        out = work / f"shards-{name.split()[-1].rstrip('%')}"
        if not (out / "manifest.json").is_file():
            run_shard(ShardConfig(str(data / "train"), (scores,), folder.claim_run(out.name),
                                  SelectConfig(keep=keep, policy="random", drop_label_issues=False, seed=0),
                                  dedup=None, val=str(data / "val"),
                                  samples_per_shard=500, shard_multiple=4, name=f"cifar10-{out.name}",
                                  overwrite=True, progress=False))
        shards[name] = out
    return shards


def make_run(root: Path, out: Path, loader: str, keep: float, workers: int):
    out.mkdir(parents=True, exist_ok=True)  # train_epoch appends its step records there
    cfg = TrainConfig(shards=root, out=out, epochs=10, batch_size=64, lr=4e-3, workers=workers, loader=loader,
                      keep=keep, progress=False, log_every=10**9, **STUDENT)
    return build(cfg, device=torch.device("cpu"))


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def drain(run, split, epoch: int) -> None:
    for _ in train_loader(run, split, epoch)[0]:
        pass


def model_steps(run, cached: list) -> None:
    for i, b in enumerate(cached):
        train_step(run, b, i / len(cached), 0, 1 / len(cached))


def measure(shards: dict[str, Path], work: Path, args) -> dict[str, float]:
    """One round: every cell once; seconds by cell name."""
    t: dict[str, float] = {}
    for name, root in shards.items():
        split, val = read_split(root, "train"), validation_split(root)
        for loader in args.loaders:
            run = make_run(root, work / f"{loader}-{name}", loader, 1.0, args.workers)
            if loader == "memory":
                t[f"decode once|{name}|{loader}"] = timed(lambda: train_loader(run, split, 0))
            t[f"loader alone|{name}|{loader}"] = timed(lambda: drain(run, split, 1))
        for keep in (1.0, 0.7):
            run = make_run(root, work / f"model-{name}-{keep}", "memory", keep, args.workers)
            cached = list(train_loader(run, split, 0)[0])
            t[f"model alone|{name}|keep {keep}"] = timed(lambda: model_steps(run, cached))
            t[f"eval|{name}|keep {keep}"] = timed(lambda: evaluate(run, val))
            for loader in args.loaders:
                run = make_run(root, work / f"{loader}-{name}-{keep}", loader, keep, args.workers)
                if loader == "memory":
                    train_loader(run, split, 0)  # decode once, outside the epoch's time (counted above)
                t[f"epoch|{name}|{loader}, keep {keep}"] = timed(lambda: train_epoch(run, split, 1))
                print(f"  {name} {loader} keep {keep}: {t[f'epoch|{name}|{loader}, keep {keep}']:.1f}s", flush=True)
    return t


def report(best: dict[str, float], loaders: list[str]) -> None:
    print("| what | " + " | ".join(SUBSETS) + " |\n|---|" + "---|" * len(SUBSETS))
    for row in dict.fromkeys(k.split("|")[0] + "|" + k.split("|")[2] for k in best):
        what, cell = row.split("|")
        vals = [best.get(f"{what}|{name}|{cell}") for name in SUBSETS]
        print(f"| {what}, {cell} | " + " | ".join("-" if v is None else f"{v:.2f} s" for v in vals) + " |")
    print()
    for loader in loaders:
        e = {(n, k): best[f"epoch|{n}|{loader}, keep {k}"] for n in SUBSETS for k in (1.0, 0.7)}
        print(f"{loader}: epoch random 70% / full (keep 1.0) = {e['random 70%', 1.0] / e['full', 1.0]:.2f}; "
              f"keep 0.7 / keep 1.0 (full) = {e['full', 0.7] / e['full', 1.0]:.2f}; "
              f"random 70% at keep 0.7 / full at keep 1.0 = {e['random 70%', 0.7] / e['full', 1.0]:.2f}")
    if len(loaders) > 1:
        for k in (1.0, 0.7):
            r = best[f"epoch|full|memory, keep {k}"] / best[f"epoch|full|stream, keep {k}"]
            print(f"memory / stream epoch, full data, keep {k}: {r:.2f}")


def main() -> None:
    ap = common.parser(__doc__)
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--loaders", type=common.words, default=["stream", "memory"])
    common.int_options(ap, rounds=3, workers=2)
    args = ap.parse_args()
    mode = "resume" if args.work.exists() else "fresh"
    with RunFolder.open(args.work, "epoch-cost", mode) as folder:
        shards = prepare(folder, args.workers)
        print(common.header(f"rounds {args.rounds}", f"workers {args.workers}", "torch threads 2",
                            f"student {STUDENT}"))
        best: dict[str, float] = {}
        with tempfile.TemporaryDirectory() as runs:  # the timed runs' metrics.jsonl: nothing to keep
            for r in range(args.rounds):
                print(f"round {r + 1}/{args.rounds}", flush=True)
                for k, v in measure(shards, Path(runs), args).items():
                    best[k] = min(v, best.get(k, v))
        report(best, args.loaders)


if __name__ == "__main__":
    torch.set_num_threads(2)
    main()
