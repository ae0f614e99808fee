"""One attention layer, forward + backward, by mode: dense SDPA vs Tri-Level top-k connections
vs gathering the top-k keys by importance (k = N/2), as ratios in one run.

    python bench/throughput/attention.py [--tokens 197] [--dim 192] [--heads 3] [--batch 64]
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
from timm.layers import Attention

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/, for common
import common  # noqa: E402

from sparsevit import attention  # noqa: E402


def once(attn: Attention, x: torch.Tensor, mode: str, scores: torch.Tensor, kw: dict[str, float]) -> float:
    xi = x.detach().requires_grad_()
    t0 = time.perf_counter()
    out, _ = attention.MODES[mode](attn, xi, 1, False, scores=scores, **kw)
    out.sum().backward()
    return time.perf_counter() - t0


def time_modes(attn: Attention, x: torch.Tensor, modes: dict[str, tuple[str, dict[str, float]]],
               repeats: int) -> dict[str, float]:
    """Median seconds of forward + backward per mode; modes interleaved so drift hits all alike."""
    scores = torch.rand(x.shape[0], x.shape[1] - 1)
    times: dict[str, list[float]] = {name: [] for name in modes}
    for i in range(repeats + 2):
        for name, (mode, kw) in modes.items():
            t = once(attn, x, mode, scores, kw)
            if i >= 2:  # first calls: allocator and kernel selection
                times[name].append(t)
    return {name: sorted(ts)[len(ts) // 2] for name, ts in times.items()}


def main() -> None:
    ap = common.parser(__doc__)
    common.int_options(ap, tokens=197, dim=192, heads=3, batch=64, repeats=20)
    args = ap.parse_args()
    torch.manual_seed(0)
    attn = Attention(args.dim, args.heads, qkv_bias=True).train()
    x = torch.randn(args.batch, args.tokens, args.dim)
    rows = time_modes(attn, x, {"dense": ("dense", {}), "topk connections rho 0.5": ("topk", {"rho": 0.5}),
                                "gather keys k = N/2": ("gather", {"key_keep": 0.5})}, args.repeats)
    print(common.header(f"N={args.tokens}", f"dim {args.dim}", f"{args.heads} heads", f"batch {args.batch}",
                        f"median of {args.repeats}"))
    print("| mode | ms fwd+bwd | speed vs dense |\n|---|---|---|")
    for name, t in rows.items():
        print(f"| {name} | {t * 1e3:.1f} | {rows['dense'] / t:.2f}x |")


if __name__ == "__main__":
    main()
