"""Inference images/s of a model that picks its own tokens (`curate predict`'s path: the selector
keeps a fixed k, no maps) against the same weights with all tokens (timm's own forward), in the
same process, rounds interleaved so a slow moment hits every variant alike.

    python bench/throughput/predict_throughput.py [--checkpoint RUN] [--keeps 0.7,0.5] [--blocks 0] [--compile]
        [--device cuda] [--batch-size 256]

Without --checkpoint the demo's ViT (curate.demo.train.DEMO_MODEL) with a selector before
--blocks and random weights: speed does not depend on what the weights learned. Model only: the
batch is already a tensor on the device (the loader is measured by bench/throughput/loader_throughput.py).
"""
from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/, for common
import common  # noqa: E402

from curate.demo.train import DEMO_MODEL  # noqa: E402
from sparsevit.model import SparseConfig, SparseViT, create_sparse  # noqa: E402
from sparsevit.predict import Deployed, load_model  # noqa: E402


def images_per_s(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, iters: int) -> float:
    common.sync(x.device)
    t0 = time.perf_counter()
    for _ in range(iters):
        fn(x)
    common.sync(x.device)
    return iters * len(x) / (time.perf_counter() - t0)


def variants(core: SparseViT, keeps: list[float], compiled: bool) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    """'dense' (timm's forward, all tokens) and 'keep K' (the selector's k tokens)."""
    fns: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {"dense": core.vit}
    fns |= {f"keep {k}": Deployed(core, k).eval() for k in keeps}
    return {name: torch.compile(fn) if compiled else fn for name, fn in fns.items()}


@torch.inference_mode()
def measure(core: SparseViT, keeps: list[float], batch: int, device: torch.device, compiled: bool,
            rounds: int, iters: int, amp: bool) -> dict[str, float]:
    """Median images/s per variant over `rounds` interleaved rounds of `iters` batches."""
    size = core.vit.patch_embed.img_size[0]
    x = torch.randn(batch, 3, size, size, device=device)
    fns = variants(core.to(device).eval(), keeps, compiled)
    ctx = torch.autocast("cuda", dtype=torch.bfloat16) if amp and device.type == "cuda" else torch.autocast(
        "cpu", enabled=False)
    with ctx:
        for fn in fns.values():  # warm up (and compile) outside the timed rounds
            for _ in range(3):
                fn(x)
        runs: dict[str, list[float]] = {name: [] for name in fns}
        for _ in range(rounds):
            for name, fn in fns.items():
                runs[name].append(images_per_s(fn, x, iters))
    return {name: statistics.median(v) for name, v in runs.items()}


def demo_model(blocks: tuple[int, ...]) -> SparseViT:
    torch.manual_seed(0)
    return create_sparse(DEMO_MODEL["model"], SparseConfig(selector_blocks=blocks), 8, DEMO_MODEL["img_size"],
                         DEMO_MODEL["patch_size"], **DEMO_MODEL["model_kwargs"])


def main() -> None:
    ap = common.parser(__doc__)
    ap.add_argument("--checkpoint", type=Path, help="a `curate train` run with --selector-blocks")
    ap.add_argument("--blocks", type=common.ints, default="0",
                    help="without --checkpoint: selector blocks of the demo ViT")
    ap.add_argument("--keeps", type=common.floats, default="0.7,0.5")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--iters", type=int, default=5)
    args = ap.parse_args()
    device = torch.device(args.device)
    core = load_model(args.checkpoint).core if args.checkpoint else demo_model(tuple(args.blocks))
    res = measure(core, args.keeps, args.batch_size, device, args.compile, args.rounds, args.iters, amp=True)
    print(common.header(f"selector blocks {core.cfg.selector_blocks}", f"batch {args.batch_size}",
                        "compiled" if args.compile else "eager",
                        f"median of {args.rounds} rounds x {args.iters} batches", device=device))
    print("| tokens | images/s | vs dense |\n|---|---|---|")
    for k, v in res.items():
        print(f"| {k} | {v:,.0f} | {v / res['dense']:.2f}x |")


if __name__ == "__main__":
    main()
