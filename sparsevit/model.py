"""Token dropping for any timm `VisionTransformer`: keep the top-k patch tokens by stored
importance after `_pos_embed` (prefix tokens always kept), optionally fuse the dropped ones into
a package token, optionally drop further at chosen blocks by online CLS attention (EViT /
Tri-Level), and run attention in one of `sparsevit.attention.MODES`.

With `selector_blocks`, the drop moves to those blocks and a learned `TokenSelector` sits before
each: in training the stored map (or the selector, or a mix) ranks the tokens and the selector is
distilled towards the map; at inference the selector alone decides, no maps needed.

The saving is real: dropped tokens are gathered away, so every later matmul is smaller. k is
fixed per batch (one keep ratio per step), so shapes stay static and fused SDPA stays on.

timm is followed, not copied: a call that sparsifies nothing (all tokens, dense attention, no
selector) is the model's own `forward`; the sparse path runs timm's modules in timm's order and
honours `set_grad_checkpointing`; options that would change the tokens behind sparsevit's back
(`patch_drop_rate`) or blocks it cannot re-run (other block or attention types) are refused.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import Any

import timm
import torch
from timm.layers import Attention
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn
from torch.utils.checkpoint import checkpoint

from curate.ingest.limits import MAX_IMAGE_SIDE, MIN_IMAGE_SIDE
from sparsevit import attention, names, selector
from sparsevit.selector import TokenSelector

DROP_BY = names.DROP_BY


def num_keep(n: int, ratio: float) -> int:
    """Tokens kept of n at a keep ratio, ceil(ratio * n) as in Tri-Level: at least 1, at most n."""
    return max(1, min(n, math.ceil(n * ratio - 1e-9)))


def top_tokens(scores: torch.Tensor, k: int) -> torch.Tensor:
    """scores (B, N) -> indices (B, k) of the k highest, in ascending token order."""
    return scores.topk(k, dim=1).indices.sort(dim=1).values


def gather_tokens(x: torch.Tensor, idx: torch.Tensor, prefix: int) -> torch.Tensor:
    """x (B, P + N, D), idx (B, k) patch-relative -> (B, P + k, D), prefix tokens first."""
    patches = x[:, prefix:].gather(1, idx[..., None].expand(-1, -1, x.shape[-1]))
    return torch.cat([x[:, :prefix], patches], dim=1)


def package_token(x: torch.Tensor, scores: torch.Tensor, idx: torch.Tensor, prefix: int) -> torch.Tensor:
    """Importance-weighted mean of the dropped patch tokens (SPViT/HeatViT/EViT fusion): (B, 1, D)."""
    dropped = torch.ones_like(scores).scatter_(1, idx, 0.0)  # (B, N) 1 where dropped
    w = scores.clamp_min(0) * dropped
    w = w / w.sum(1, keepdim=True).clamp_min(1e-12)
    return (w[..., None] * x[:, prefix:]).sum(1, keepdim=True)


def drop_tokens(x: torch.Tensor, scores: torch.Tensor, keep: float, prefix: int, package: bool
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep the top tokens by `scores` (B, N); returns tokens and the kept tokens' scores.

    With `package`, one extra token carrying the dropped tokens (weighted by score) is appended;
    its score is the mean of the dropped scores, so later drops can rank it like any token.
    """
    out, kept, _ = drop_ranked(x, scores, scores, scores, keep, prefix, package)
    return out, kept


def drop_ranked(x: torch.Tensor, rank: torch.Tensor, carry: torch.Tensor, weight: torch.Tensor, keep: float,
                prefix: int, package: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Keep the top tokens by `rank` (B, N); `carry` (B, N) follows the kept tokens (the map a
    later drop or loss needs), `weight` (>= 0) weighs the dropped ones into the package token.
    Returns tokens, the carried scores, and the kept indices (None: nothing dropped)."""
    n = rank.shape[1]
    k = num_keep(n, keep)
    if k == n:
        return x, carry, None
    idx = top_tokens(rank, k)
    out, kept = gather_tokens(x, idx, prefix), carry.gather(1, idx)
    if package:
        dropped_mean = (carry.sum(1, keepdim=True) - kept.sum(1, keepdim=True)) / (n - k)
        out = torch.cat([out, package_token(x, weight, idx, prefix)], dim=1)
        kept = torch.cat([kept, dropped_mean], dim=1)
    return out, kept, idx


@dataclass(frozen=True)
class SparseConfig:
    """How a ViT is sparsified. Ratios that change during training are forward() arguments."""
    drop_by: str = "importance"  # importance: stored maps | random: the control at the same k
    package: bool = False  # fuse dropped tokens into one package token
    online_blocks: tuple[int, ...] = ()  # drop again after these blocks by CLS attention (Tri-Level: 3, 6, 9)
    attention: str = "dense"  # dense | topk | gather (sparsevit.attention)
    rho: float = 1.0  # topk: fraction of keys each query keeps
    key_keep: float = 0.5  # gather: fraction of patch keys all queries attend to
    selector_blocks: tuple[int, ...] = ()  # a learned selector drops `keep` of the tokens entering each

    def __post_init__(self) -> None:
        object.__setattr__(self, "online_blocks", tuple(self.online_blocks))  # lists from JSON
        object.__setattr__(self, "selector_blocks", tuple(sorted(set(self.selector_blocks))))
        if self.selector_blocks and self.drop_by != "importance":
            raise ValueError("a token selector learns from the importance maps: use drop_by importance")
        if self.selector_blocks and self.online_blocks and max(self.selector_blocks) > min(self.online_blocks):
            raise ValueError(f"selector blocks {self.selector_blocks} must not come after online blocks "
                             f"{self.online_blocks}: the maps the selector learns from are not carried past a "
                             "CLS-attention drop")
        if self.drop_by not in DROP_BY:
            raise ValueError(f"drop_by must be one of {DROP_BY}, got {self.drop_by!r}")
        if self.attention not in attention.MODES:
            raise ValueError(f"attention must be one of {sorted(attention.MODES)}, got {self.attention!r}")
        if not (0 < self.rho <= 1 and 0 < self.key_keep <= 1):
            raise ValueError(f"rho and key_keep must be in (0, 1], got {self.rho}, {self.key_keep}")


class SparseViT(nn.Module):
    """Wraps a timm VisionTransformer; its weights stay under `.vit` with timm's names."""

    def __init__(self, vit: VisionTransformer, cfg: SparseConfig) -> None:
        super().__init__()
        _check_supported(vit, cfg)
        self.vit, self.cfg = vit, cfg
        self.prefix = vit.num_prefix_tokens
        self.num_patches = vit.patch_embed.num_patches
        self.attend = partial(attention.MODES[cfg.attention], rho=cfg.rho, key_keep=cfg.key_keep)
        if cfg.selector_blocks and max(cfg.selector_blocks) >= len(vit.blocks):
            raise ValueError(f"selector_blocks {cfg.selector_blocks} beyond depth {len(vit.blocks)}")
        self.selectors = nn.ModuleDict({str(b): TokenSelector(vit.embed_dim, vit.blocks[b].attn.num_heads)
                                        for b in cfg.selector_blocks})

    def forward(self, x: torch.Tensor, importance: torch.Tensor | None = None, keep: float = 1.0,
                online_keep: float = 1.0, selector_share: float = 0.0, with_losses: bool = False) -> Any:
        """x (B, 3, H, W); importance (B, N) aligned with the patch tokens; keep: input keep ratio
        (at each selector block when there are selectors). selector_share: the share of rows
        whose tokens the selector ranks (1: the selector alone, no maps needed); the rest are
        ranked by the maps. with_losses: also return the selectors' losses (training)."""
        losses: dict[str, torch.Tensor] = {}
        if self.is_dense(keep, online_keep):
            logits = self.vit(x)  # nothing to change: timm's own forward, all of its options included
        else:
            logits = self.vit.forward_head(self.forward_features(x, importance, keep, online_keep, selector_share,
                                                                 losses))
        return (logits, losses) if with_losses else logits

    def is_dense(self, keep: float, online_keep: float = 1.0) -> bool:
        """Whether a call with these ratios keeps every token and attends densely: then it is
        timm's forward, exactly."""
        online = online_keep < 1 and bool(self.cfg.online_blocks)
        return keep >= 1 and not online and not self.selectors and self.cfg.attention == "dense"

    def forward_features(self, x: torch.Tensor, importance: torch.Tensor | None, keep: float,
                         online_keep: float, selector_share: float = 0.0,
                         losses: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        vit = self.vit
        x = vit._pos_embed(vit.patch_embed(x))  # (B, P + N, D)
        scores = self.token_scores(x, importance, keep, selector_share)
        if not self.selectors:
            x, scores = drop_tokens(x, scores, keep, self.prefix, self.cfg.package)
        x = vit.norm_pre(x)
        for i, blk in enumerate(vit.blocks):
            if str(i) in self.selectors:
                x, scores = self.select(i, x, scores, keep, selector_share, importance is not None, losses)
            online = online_keep < 1 and i in self.cfg.online_blocks
            if vit.grad_checkpointing and self.training and not online:  # timm's set_grad_checkpointing
                x, cls = checkpoint(self.block, blk, x, scores, False, use_reentrant=False)
            else:
                x, cls = self.block(blk, x, scores, want_cls=online)
            if online:
                x, scores = drop_tokens(x, cls, online_keep, self.prefix, self.cfg.package)
        return vit.norm(x)

    def select(self, block: int, x: torch.Tensor, maps: torch.Tensor, keep: float, share: float, have_maps: bool,
               losses: dict[str, torch.Tensor] | None) -> tuple[torch.Tensor, torch.Tensor]:
        """The drop before `block`: ranked by the maps or by the selector (per row, `share` of
        them), the maps carried on for later selectors; in training the selector is distilled
        towards the maps' top k, and the kept tokens are scaled by 1 + p - p.detach() (equal to
        1 in value) so the task loss reaches the selector too (straight-through)."""
        logits = self.selectors[str(block)](x[:, self.prefix:])
        probs = torch.sigmoid(logits.float())
        k = num_keep(logits.shape[1], keep)
        if losses is not None and self.training:
            losses[f"distill{block}"] = selector.distill_loss(logits, maps, k)
            losses[f"ratio{block}"] = selector.ratio_loss(logits, k)
        rank, weight = maps, maps
        if share > 0:
            mine = selector.gumbel(logits) if self.training else logits.float()
            if share >= 1:  # no random draw: the deployed path stays deterministic and compiles
                rank, weight = mine, probs
            else:
                rows = torch.rand(len(x), 1, device=x.device) < share
                rank, weight = torch.where(rows, mine, maps), torch.where(rows, probs, maps)
        carry = maps if have_maps else probs  # with no maps, the selector's view ranks later keys
        out, kept, idx = drop_ranked(x, rank, carry, weight, keep, self.prefix, self.cfg.package)
        if idx is not None and self.training:
            p = probs.gather(1, idx)
            patches = out[:, self.prefix:self.prefix + k]
            patches = patches + patches * (p - p.detach())[..., None].to(patches.dtype)
            out = torch.cat([out[:, :self.prefix], patches, out[:, self.prefix + k:]], dim=1)
        return out, kept

    def selector_logits(self, x: torch.Tensor) -> torch.Tensor:
        """The first selector's scores for every patch token of x (B, 3, H, W): for comparing
        its ranking with the maps'. Runs the blocks before it with all tokens."""
        if not self.selectors:
            raise ValueError("this model has no token selector")
        vit, first = self.vit, self.cfg.selector_blocks[0]
        x = vit.norm_pre(vit._pos_embed(vit.patch_embed(x)))
        for blk in vit.blocks[:first]:
            x, _ = self.block(blk, x, x.new_zeros(x.shape[0], x.shape[1] - self.prefix), want_cls=False)
        return self.selectors[str(first)](x[:, self.prefix:])

    def token_scores(self, x: torch.Tensor, importance: torch.Tensor | None, keep: float,
                     selector_share: float = 0.0) -> torch.Tensor:
        """The ranking used to drop: stored importance, or uniform noise for the random control."""
        n = x.shape[1] - self.prefix
        if selector_share and not self.selectors:
            raise ValueError("selector_share > 0 needs a model with selector_blocks")
        if self.cfg.drop_by == "random" and keep < 1:
            return torch.rand(x.shape[0], n, device=x.device)
        if importance is None:
            selector_decides = self.selectors and selector_share >= 1
            if (keep < 1 and not selector_decides) or self.cfg.attention == "gather":
                raise ValueError("dropping tokens by importance needs the importance maps (B, N)")
            return torch.zeros(x.shape[0], n, device=x.device)
        if importance.shape != (x.shape[0], n):
            raise ValueError(f"importance must be (B, {n}) for this model's patch grid, got "
                             f"{tuple(importance.shape)}")
        return importance.to(device=x.device, dtype=torch.float32)

    def block(self, blk: Block, x: torch.Tensor, scores: torch.Tensor, want_cls: bool
              ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """timm's Block.forward with the attention mode swapped in (same weights, same order)."""
        a, cls = self.attend(blk.attn, blk.norm1(x), self.prefix, want_cls, scores=scores)
        x = x + blk.drop_path1(blk.ls1(a))
        x = x + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(x))))
        return x, cls

    def tokens_per_block(self, keep: float, online_keep: float = 1.0) -> list[int]:
        """Tokens (prefix included) entering each block: for the FLOPs estimate."""
        n, counts = self.num_patches, []
        if not self.cfg.selector_blocks:
            n = _after_drop(n, keep, self.cfg.package)
        for i in range(len(self.vit.blocks)):
            if i in self.cfg.selector_blocks:
                n = _after_drop(n, keep, self.cfg.package)
            counts.append(self.prefix + n)
            if online_keep < 1 and i in self.cfg.online_blocks:
                n = _after_drop(n, online_keep, self.cfg.package)
        return counts

    def train_gflops(self, keep: float, online_keep: float = 1.0) -> float:
        """Estimated GFLOPs per image for forward + backward (3x forward), blocks only."""
        d = self.vit.embed_dim
        mlp = self.vit.blocks[0].mlp.fc1.out_features
        macs = 0.0
        for n in self.tokens_per_block(keep, online_keep):
            keys = n if self.cfg.attention != "gather" else self.prefix + num_keep(n - self.prefix, self.cfg.key_keep)
            macs += n * (4 * d * d + 2 * d * mlp) + 2 * n * keys * d
        return 3 * 2 * macs / 1e9


def _after_drop(n: int, keep: float, package: bool) -> int:
    k = num_keep(n, keep)
    return k + int(package and k < n)


def _check_supported(vit: nn.Module, cfg: SparseConfig) -> None:
    if not isinstance(vit, VisionTransformer):
        raise ValueError(f"sparsevit wraps timm VisionTransformer models, got {type(vit).__name__}")
    bad = {type(b).__name__ for b in vit.blocks if type(b) is not Block}
    if bad:
        raise ValueError(f"unsupported block type(s) {sorted(bad)}: token dropping needs timm's Block")
    odd = {type(b.attn).__name__ for b in vit.blocks if type(b.attn) is not Attention}
    if odd:
        raise ValueError(f"unsupported attention type(s) {sorted(odd)}: the attention modes need timm's Attention")
    if any(getattr(b.attn, "gate", None) is not None for b in vit.blocks):
        raise ValueError("gated attention is not supported")
    if not isinstance(getattr(vit, "patch_drop", nn.Identity()), nn.Identity):
        # timm's PatchDropout drops random tokens after the position embedding: token dropping's
        # own random control does the same, and the two would compound unseen
        raise ValueError("patch_drop_rate is not supported: sparsevit drops the tokens itself; for random token "
                         "dropping use --keep K --drop-by random")
    if getattr(vit, "dynamic_img_size", False):
        raise ValueError("dynamic_img_size models are not supported: maps are pooled to one fixed grid")
    if cfg.online_blocks and max(cfg.online_blocks) >= len(vit.blocks):
        raise ValueError(f"online_blocks {cfg.online_blocks} beyond depth {len(vit.blocks)}")


def check_geometry(img_size: Any, patch_size: Any = None) -> None:
    """Refuse an input side or patch size no ViT can be built with, before timm allocates one."""
    def integer(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    if not integer(img_size) or not MIN_IMAGE_SIDE <= img_size <= MAX_IMAGE_SIDE:
        raise ValueError(f"img_size must be an integer from {MIN_IMAGE_SIDE} to {MAX_IMAGE_SIDE} pixels, "
                         f"got {img_size!r:.40}")
    if patch_size is not None and (not integer(patch_size) or not 1 <= patch_size <= img_size
                                   or img_size % patch_size):
        raise ValueError(f"patch_size must be an integer that divides img_size {img_size}, got {patch_size!r:.40}")


def create_sparse(name: str, cfg: SparseConfig, num_classes: int, img_size: int, patch_size: int | None = None,
           **kwargs: object) -> SparseViT:
    """timm.create_model(name, ...) wrapped; patch_size overrides the model's (maps are resampled)."""
    check_geometry(img_size, patch_size)
    if patch_size is not None:
        kwargs["patch_size"] = patch_size
    if not timm.is_model(name):
        raise ValueError(f"unknown timm model {name!r}")
    try:
        vit = timm.create_model(name, num_classes=num_classes, img_size=img_size, **kwargs)
    except TypeError as e:  # a model family without img_size/patch_size: not a ViT
        raise ValueError(f"sparsevit wraps timm VisionTransformer models (deit_*, vit_*); {name} is not one "
                         f"({e})") from e
    except AssertionError as e:  # timm checks its settings with asserts (embed_dim % num_heads, ...)
        raise ValueError(f"timm refuses {name} with {kwargs}: {e}") from e
    return SparseViT(vit, cfg)

