"""A learned token selector (HeatViT, HPCA 2023; SPViT, arXiv 2112.13890; DynamicViT's local +
global features): a small per-token MLP over head-split features that scores the patch tokens
entering a block, so a trained model drops its own tokens at inference without any stored map.

What is new here is the target: the proxy's stored importance map. During training the selector
is distilled towards the tokens the map would keep at the same k (binary cross-entropy on top-k
membership), so it learns the proxy's choice from the student's own features. The papers train it
with a Gumbel-softmax keep decision and a loss on the kept ratio; here k is fixed per batch (static
shapes, a real gather), so the ratio loss only calibrates the keep probabilities (their mean held
at k / n), which keeps the straight-through factor below away from saturation.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sparsevit import names

SELECT_BY = names.SELECT_BY


class TokenSelector(nn.Module):
    """Scores (B, N) logits for tokens (B, N, D): each head's slice of the features goes through
    a shared-per-head MLP with the head's mean over tokens as global context, and a softmax over
    heads (from the mean token) weights the heads' scores (HeatViT's head importance)."""

    def __init__(self, dim: int, heads: int, hidden: int | None = None) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"selector: dim {dim} is not divisible by {heads} heads")
        self.heads, head_dim = heads, dim // heads
        hidden = hidden or max(8, head_dim // 2)
        self.norm = nn.LayerNorm(dim)
        self.local = nn.Sequential(nn.Linear(head_dim, hidden), nn.GELU())
        self.score = nn.Sequential(nn.Linear(2 * hidden, hidden), nn.GELU(), nn.Linear(hidden, 1))
        self.head_weight = nn.Linear(dim, heads)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        x = self.norm(x)
        local = self.local(x.view(b, n, self.heads, d // self.heads))  # (B, N, H, h)
        glob = local.mean(1, keepdim=True).expand_as(local)
        per_head = self.score(torch.cat([local, glob], dim=-1)).squeeze(-1)  # (B, N, H)
        w = self.head_weight(x.mean(1)).softmax(-1)  # (B, H)
        return (per_head * w[:, None]).sum(-1)


def topk_membership(scores: torch.Tensor, k: int) -> torch.Tensor:
    """1.0 where a token is among the k highest of its row, else 0.0: (B, N)."""
    idx = scores.topk(k, dim=1).indices
    return torch.zeros_like(scores, dtype=torch.float32).scatter_(1, idx, 1.0)


def distill_loss(logits: torch.Tensor, maps: torch.Tensor, k: int) -> torch.Tensor:
    """The selector learns which k tokens the stored map keeps (a rank target: the maps' scale
    differs between proxies and images, their order is what the drop uses)."""
    return F.binary_cross_entropy_with_logits(logits.float(), topk_membership(maps, k))


def ratio_loss(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Mean keep probability held at k / n (the papers' ratio loss)."""
    return (torch.sigmoid(logits.float()).mean() - k / logits.shape[1]) ** 2


def gumbel(logits: torch.Tensor) -> torch.Tensor:
    """Logits plus Gumbel noise: top-k of it samples k tokens without replacement in proportion
    to exp(logit), so training explores the selector's near misses."""
    u = torch.rand_like(logits, dtype=torch.float32).clamp_(1e-6, 1 - 1e-6)
    return logits.float() - torch.log(-torch.log(u))


@torch.no_grad()
def agreement(logits: torch.Tensor, maps: torch.Tensor, k: int) -> dict[str, float]:
    """Sums over a batch: top-k overlap (share of the map's k tokens the selector also keeps) and
    Spearman rank correlation, per image; divide by the image count."""
    overlap = (topk_membership(logits, k) * topk_membership(maps, k)).sum(1) / k
    return {"overlap": float(overlap.sum()), "spearman": float(_spearman(logits.float(), maps.float()).sum())}


def _spearman(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-row Spearman correlation (ties broken by position, as argsort does)."""
    ra, rb = _ranks(a), _ranks(b)
    ra, rb = ra - ra.mean(1, keepdim=True), rb - rb.mean(1, keepdim=True)
    return (ra * rb).sum(1) / (ra.norm(dim=1) * rb.norm(dim=1)).clamp_min(1e-12)


def _ranks(x: torch.Tensor) -> torch.Tensor:
    return x.argsort(1).argsort(1).float()
