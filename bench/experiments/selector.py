"""The learned token selector on the demo: does a model that picks its own tokens (no maps at
test time) match one that is handed the proxy's maps?

For each seed and keep ratio, two runs of the demo's ViT and recipe on the curated 70% shards:
- `selector`: `curate train --keep K --selector-blocks B --select-by S`, then its final weights
  evaluated on the clean validation split with the tokens chosen three ways at the same keep:
  by its selector (no maps: how it ships), by the stored maps, and at random; plus all tokens,
  and the selector's agreement with the maps (top-k overlap, Spearman);
- `maps`: today's recipe, `curate train --keep K` (input drop by the maps, no selector),
  evaluated as trained (it needs the maps at test time) and with random tokens.

    curate demo --out demo-run; curate demo --seed 1 --out demo-s1; curate demo --seed 2 --out demo-s2
    python bench/experiments/selector.py --out sel-demo --data 0:demo-run --data 1:demo-s1 --data 2:demo-s2 \\
        [--keeps 0.7,0.5] [--blocks 0] [--select-by mix] [--resume]

Results go to OUT/results.json (one record per run, so --resume trains only what is missing) and
the table to stdout.
"""
from __future__ import annotations

import json
import statistics
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/, for common
import common  # noqa: E402

from curate.common.atomic import write_json  # noqa: E402
from curate.demo.train import DEMO_MODEL, DemoTrain, Variant, train_one  # noqa: E402
from curate.shard.format import Split, read_split  # noqa: E402
from sparsevit import selector  # noqa: E402
from sparsevit.model import SparseConfig  # noqa: E402
from sparsevit.train import TrainConfig, evaluate, restore  # noqa: E402


def train(shards: Path, out: Path, seed: int, keep: float, blocks: tuple[int, ...], select_by: str,
          epochs: int, lr_scale: float) -> None:
    """`curate train` with the demo's model and recipe (the demo's own train_one), plus the selector."""
    selector_opts = {"sparse": SparseConfig(selector_blocks=blocks), "select_by": select_by,
                     "selector_lr_scale": lr_scale} if blocks else {}
    train_one(shards, out, Variant("selector" if blocks else "maps", str(shards), keep=keep),
              replace(DemoTrain(epochs=epochs, seed=seed), extra=selector_opts))


def evaluated(run_dir: Path, val: Split, seed: int) -> dict[str, float]:
    """`curate train`'s own evaluation of the finished run (EMA weights when kept) on the clean
    validation split: all tokens, and at the run's keep with the tokens chosen by the maps, at
    random and (with a selector) by the selector alone; the selector's agreement with the maps."""
    torch.manual_seed(seed)  # the random ranking
    r = evaluate(restore(run_dir, device=torch.device("cpu")), val, random_tokens=True)
    named = {"all": r["val_acc"], "maps": r["val_acc_dropped"], "random": r["val_acc_random"],
             "selector": r["val_acc_selected"], "overlap": r["val_selector_overlap"],
             "spearman": r["val_selector_spearman"]}
    return {k: v for k, v in named.items() if v is not None}


def _mean_sd(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * statistics.mean(values):.1f} ± {100 * sd:.1f}"


def report(results: dict[str, Any], keeps: list[float], seeds: list[int]) -> list[str]:
    lines = ["| keep | model | tokens chosen by | " + " | ".join(f"seed {s}" for s in seeds) + " | mean ± sd |",
             "|---|---|---|" + "---|" * (len(seeds) + 1)]
    rows = [("selector", "selector", "selector (no maps)"), ("selector", "maps", "stored maps"),
            ("selector", "random", "random"), ("selector", "all", "all tokens"),
            ("maps", "maps", "stored maps (as trained)"), ("maps", "random", "random"), ("maps", "all", "all tokens")]
    for keep in keeps:
        for model, key, label in rows:
            vals = [results[f"{model}-keep{keep}-seed{s}"][key] for s in seeds
                    if f"{model}-keep{keep}-seed{s}" in results]
            if vals:
                lines.append(f"| {keep} | {model} | {label} | " + " | ".join(f"{100 * v:.1f}" for v in vals)
                             + f" | {_mean_sd(vals)} |")
    lines.append("")
    for keep in keeps:
        runs = [results[f"selector-keep{keep}-seed{s}"] for s in seeds if f"selector-keep{keep}-seed{s}" in results]
        if runs:
            lines.append(f"keep {keep}: selector vs maps top-k overlap {_mean_sd([r['overlap'] for r in runs])} %, "
                         f"Spearman {statistics.mean(r['spearman'] for r in runs):.3f} "
                         f"(chance: overlap {100 * keep:.0f} %, Spearman 0)")
    return lines


def main() -> None:
    ap = common.parser(__doc__)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--data", type=common.seed_root, action="append", required=True, help="SEED:DEMO_ROOT, repeatable")
    ap.add_argument("--keeps", type=common.floats, default="0.7,0.5")
    ap.add_argument("--blocks", type=common.ints, default="0", help="selector blocks, comma-separated")
    ap.add_argument("--select-by", default="mix", choices=selector.SELECT_BY)
    ap.add_argument("--epochs", type=int, default=DemoTrain.epochs)
    ap.add_argument("--lr-scale", type=float, default=TrainConfig.selector_lr_scale,
                    help="the selector's learning rate / the ViT's")
    ap.add_argument("--models", type=common.words, default="selector,maps")
    ap.add_argument("--resume", action="store_true", help="keep the runs already in OUT/results.json")
    args = ap.parse_args()
    keeps, blocks = args.keeps, tuple(args.blocks)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "results.json"
    results: dict[str, Any] = json.loads(path.read_text()) if args.resume and path.is_file() else {}
    for seed, root in args.data:
        shards = root / "shards"
        val = read_split(shards, "validation")
        if not val.has_maps:
            raise SystemExit(f"{shards}: the validation split has no importance maps (curate shard --val-scores)")
        for keep in keeps:
            for model in args.models:
                name = f"{model}-keep{keep}-seed{seed}"
                if name in results:
                    continue
                run = args.out / name
                train(shards, run, seed, keep, blocks if model == "selector" else (), args.select_by, args.epochs,
                      args.lr_scale)
                summary = json.loads((run / "summary.json").read_text())
                logged = {"wall_s": summary["wall_s"], "logged_val_acc_selected": summary["val_acc_selected"]}
                results[name] = evaluated(run, val, seed) | logged
                write_json(path, results)
                print(name, {k: round(v, 4) for k, v in results[name].items() if v is not None}, flush=True)
    print("\n" + common.header(f"selector blocks {blocks}", f"select-by {args.select_by}",
                               f"selector lr x{args.lr_scale}", f"{args.epochs} epochs",
                               f"demo ViT {DEMO_MODEL['model_kwargs']}"))
    print("\n".join(report(results, keeps, [s for s, _ in args.data])))


if __name__ == "__main__":
    main()
