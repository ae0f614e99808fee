"""Class activation maps: which parts of the image a convolutional proxy's decision rests on.

Grad-CAM (Selvaraju et al. 2017) through the head alone: the gradient of the chosen class's logit
with respect to the last feature map, averaged over space, weights the map's channels. For a head
that is linear over globally pooled features (timm's ResNets: average pool -> fc; `airbench_net`:
max pool -> linear) the spatial mean of that gradient is the classifier's row of the class divided
by the map's area, so the result is exactly CAM (Zhou et al. 2016) up to a positive scale; for any
other head (a norm or an MLP after pooling) it is Grad-CAM. Only the head is differentiated: the
backbone runs once, without gradients.

Maps are resampled (bilinear) to the grid they are stored at and normalised to sum to 1, the
contract of the table's `importance` column, so they go into shards exactly as a ViT's maps do.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# Stored side for input side S: S / 4 (a 32-px image gets 8 x 8, the grid of a patch-4 student),
# at most 16 (the maps are re-pooled to any student grid when a crop is taken), never below the
# feature map's own side.
MAX_SIDE = 16


def map_side(img_size: int, feature_side: int) -> int:
    """The grid side a CAM is stored at for inputs of `img_size` and a last map of `feature_side`."""
    return max(feature_side, min(MAX_SIDE, img_size // 4))


def supports_cam(model: nn.Module, img_size: int) -> bool:
    """A last feature map with space in it (B, C, h, w) and a head that takes it: a CNN."""
    if not all(hasattr(model, name) for name in ("forward_features", "forward_head")):
        return False
    training = model.training
    try:
        with torch.no_grad():
            feats = model.eval().forward_features(torch.zeros(1, 3, img_size, img_size))
    except (RuntimeError, ValueError, AssertionError):
        return False
    finally:
        model.train(training)
    return isinstance(feats, torch.Tensor) and feats.ndim == 4


def class_activation_maps(model: nn.Module, feats: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(B, h, w) float32 >= 0: the evidence for class target[b] at each place of feats[b] (B, C, h, w)."""
    with torch.enable_grad():
        f = feats.detach().float().requires_grad_(True)
        logits = model.forward_head(f)
        chosen = logits.float().gather(1, target.view(-1, 1).to(logits.device)).sum()
        (grad,) = torch.autograd.grad(chosen, f)
    weights = grad.mean(dim=(2, 3), keepdim=True)
    return (weights * f.detach()).sum(1).clamp(min=0)


def to_stored_grid(maps: torch.Tensor, side: int) -> torch.Tensor:
    """(B, h, w) >= 0 -> float16 (B, side, side) summing to 1; a map with no evidence anywhere
    (all zero after the ReLU) becomes uniform rather than a map of zeros that sums to nothing."""
    up = maps if maps.shape[-1] == side and maps.shape[-2] == side else F.interpolate(
        maps[:, None].float(), size=(side, side), mode="bilinear", align_corners=False)[:, 0]
    up = up.clamp(min=0)
    total = up.sum(dim=(1, 2), keepdim=True)
    uniform = torch.full_like(up, 1 / (side * side))
    return torch.where(total > 0, up / total.clamp(min=1e-12), uniform).half()
