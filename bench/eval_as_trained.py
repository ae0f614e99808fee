"""Re-evaluate finished `curate train` runs with all tokens and with token keep K by importance.

A model trained with token keep 0.7 scores higher when evaluated the way it was trained; this
checks whether models trained with all tokens gain the same (then the dropped-token images are
just easier) or not (then it is the keep-0.7 model's train/test mismatch). Every run is
evaluated on its own shards' validation split, which must carry importance maps
(`curate shard --val-scores`, as the demo's shards do).

    curate demo --out demo-run
    python bench/eval_as_trained.py demo-run/train/* [--keep 0.7]
"""
from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

import torch

from curate.common import dist
from curate.shard.format import read_split
from sparsevit import train
from sparsevit.model import SparseConfig


def evaluate_run(run_dir: Path, keep: float) -> tuple[float, dict[str, float]]:
    """The keep the run trained with, and its final weights on its validation split with all
    tokens and at `keep`."""
    saved = json.loads((run_dir / "config.json").read_text())
    trained_keep = saved["keep"]
    saved.update(shards=Path(saved["shards"]), out=run_dir, sparse=SparseConfig(**saved["sparse"]),
                 resume=False, overwrite=False)
    cfg = replace(train.TrainConfig(**saved), keep=keep, sparse=SparseConfig(drop_by="importance"))
    val = train._validation(cfg.shards)
    if val is None or not val.has_maps:
        raise SystemExit(f"{cfg.shards}: no validation split with importance maps")
    with dist.session() as ctx:
        run = train._build(cfg, ctx, torch.device("cpu"), read_split(cfg.shards, "train"))
        state = torch.load(run_dir / train.CHECKPOINT, map_location="cpu", weights_only=True)
        run.core.vit.load_state_dict(state["model"])
        return trained_keep, train.evaluate(run, val)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", type=Path, nargs="+")
    ap.add_argument("--keep", type=float, default=0.7)
    args = ap.parse_args()
    print(f"| run | trained keep | all tokens | keep {args.keep} by importance | difference |")
    print("|---|---|---|---|---|")
    for run_dir in args.runs:
        trained_keep, r = evaluate_run(run_dir, args.keep)
        print(f"| {run_dir} | {trained_keep} | {r['val_acc']:.1%} | {r['val_acc_dropped']:.1%} | "
              f"{100 * (r['val_acc_dropped'] - r['val_acc']):+.1f}p |", flush=True)


if __name__ == "__main__":
    main()
