"""Attention for timm's `Attention` weights, by mode. Pure functions of (module, tokens).

What each mode costs, honestly (N tokens, k keys kept per query):

- `dense`: scaled_dot_product_attention on N x N, as timm's fused path.
- `topk` (Tri-Level's connection sparsity): every query keeps its top ceil(rho * N) keys by
  head-averaged attention, prefix rows and columns always kept. It computes the full N x N
  scores and then masks them: it REGULARISES, it saves no compute (it costs a little more).
  At rho = 1 it equals dense attention.
- `gather` (compute-saving): all queries attend to the prefix tokens plus the top-k patch tokens
  by importance; K and V are gathered first, so QK^T and AV are N x (P + k). This saves the
  quadratic part only, which at 197 tokens is ~15% of DeiT-T's and ~8% of DeiT-S's FLOPs.

Every mode can also return the head-averaged CLS -> patch attention of its block (the signal
for online token drops), computed from the CLS query alone: O(N), so fused kernels stay usable.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from timm.layers import Attention

from curate.common.registry import Registry
from curate.common.vit import cls_attention, qkv_heads
from sparsevit import names

AttnOut = tuple[torch.Tensor, torch.Tensor | None]  # (output (B, N, D), CLS attention (B, N - P) | None)
MODES: Registry[Callable[..., AttnOut]] = Registry("attention mode", names.ATTENTION_MODES)


def project(attn: Attention, out: torch.Tensor) -> torch.Tensor:
    b, _, n, _ = out.shape
    out = attn.norm(out.transpose(1, 2).reshape(b, n, attn.attn_dim))  # (B, N, H*d)
    return attn.proj_drop(attn.proj(out))


def _dropout(attn: Attention) -> float:
    return attn.attn_drop.p if attn.training else 0.0


@MODES.register("dense")
def dense(attn: Attention, x: torch.Tensor, prefix: int, want_cls: bool, **_: object) -> AttnOut:
    q, k, v = qkv_heads(attn, x)
    out = F.scaled_dot_product_attention(q, k, v, dropout_p=_dropout(attn))
    return project(attn, out), cls_attention(q, k, prefix) if want_cls else None


@MODES.register("topk")
def topk_connections(attn: Attention, x: torch.Tensor, prefix: int, want_cls: bool, rho: float = 1.0,
                     **_: object) -> AttnOut:
    """Tri-Level attention sparsity: per query, top ceil(rho * N) keys by head-averaged attention."""
    q, k, v = qkv_heads(attn, x)
    logits = (q * attn.scale) @ k.transpose(-2, -1)  # (B, H, N, N)
    keep = connection_mask(logits.softmax(-1).mean(1), rho, prefix)  # (B, N, N)
    probs = logits.masked_fill(~keep[:, None], float("-inf")).softmax(-1)
    out = F.dropout(probs, _dropout(attn)) @ v
    cls = logits[:, :, 0].float().softmax(-1).mean(1)[:, prefix:] if want_cls else None
    return project(attn, out), cls


def connection_mask(avg: torch.Tensor, rho: float, prefix: int) -> torch.Tensor:
    """avg (B, N, N) head-averaged attention -> bool mask keeping each row's top ceil(rho*N), ties kept."""
    n = avg.shape[-1]
    kth = avg.topk(max(1, math.ceil(rho * n)), dim=-1).values[..., -1:]  # (B, N, 1)
    keep = avg >= kth
    keep[:, :prefix, :] = True  # CLS (and dist) attend everywhere
    keep[:, :, :prefix] = True  # and every query sees them
    return keep


@MODES.register("gather")
def gather_keys(attn: Attention, x: torch.Tensor, prefix: int, want_cls: bool,
                scores: torch.Tensor | None = None, key_keep: float = 0.5, **_: object) -> AttnOut:
    """All queries, prefix + top-k patch keys by `scores` (B, N - P): N x (P + k) attention."""
    if scores is None:
        raise ValueError("attention 'gather' needs per-token importance scores")
    q, k, v = qkv_heads(attn, x)
    n = x.shape[1] - prefix
    idx = scores.topk(max(1, round(key_keep * n)), dim=1).indices + prefix  # (B, k)
    idx = torch.cat([torch.arange(prefix, device=x.device).expand(len(x), -1), idx], 1)  # (B, P + k)
    index = idx[:, None, :, None].expand(-1, attn.num_heads, -1, attn.head_dim)
    out = F.scaled_dot_product_attention(q, k.gather(2, index), v.gather(2, index), dropout_p=_dropout(attn))
    return project(attn, out), cls_attention(q, k, prefix) if want_cls else None


def reference_attention(attn: Attention, x: torch.Tensor) -> torch.Tensor:
    """timm's own forward with the fused kernel off: the readable reference the modes must match."""
    fused = attn.fused_attn
    attn.fused_attn = False
    try:
        return attn(x)
    finally:
        attn.fused_attn = fused
