"""Attention arithmetic on timm's `Attention` weights, shared by the scoring proxy (importance
maps) and sparsevit (attention modes, online token drops). Pure torch, no state.

Shapes: B = batch, H = heads, N = tokens (prefix + patches), d = head dim.
"""
from __future__ import annotations

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import nn


def qkv_heads(attn: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Queries, keys (after timm's q/k norm) and values of a timm Attention for x (B, N, D)."""
    b, n, _ = x.shape
    qkv = attn.qkv(x).reshape(b, n, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)  # (B, H, N, d) each
    return attn.q_norm(q), attn.k_norm(k), v


def cls_attention(q: torch.Tensor, k: torch.Tensor, prefix: int) -> torch.Tensor:
    """Head-averaged softmax attention of the CLS query over all keys, restricted to the patch
    keys: (B, N - prefix). Only the CLS row is computed, O(N) not O(N^2), so a fused kernel can
    still run the block itself."""
    scale = q.shape[-1] ** -0.5
    logits = (q[:, :, :1] * scale) @ k.transpose(-2, -1)  # (B, H, 1, N)
    return logits.float().softmax(-1).mean(1)[:, 0, prefix:]


def mean_std(model: nn.Module) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The input normalisation a timm model was configured with (`pretrained_cfg`: ImageNet's
    for deit_*, 0.5 for the augreg vit_*), ImageNet's when the model names none."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return tuple(cfg.get("mean", IMAGENET_DEFAULT_MEAN)), tuple(cfg.get("std", IMAGENET_DEFAULT_STD))
