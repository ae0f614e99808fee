"""A small-image CNN in the airbench / hlb-CIFAR10 style, as a timm model (`airbench_net`).

The architecture follows airbench94 (github.com/KellerJordan/cifar10-airbench): a 2x2 patch
convolution initialised from the training images' patch covariance (whitening, frozen after the
first epochs), then three groups of conv -> max-pool -> batch norm -> GELU -> conv -> batch norm
-> GELU with identity (Dirac) initialised convolutions, a global max-pool and a bias-free linear
head. It learns CIFAR-10 at its own 32 px in a few epochs, where a ViT proxy of the same cost
learns a third of it. The model speaks timm's interface (`forward_features`, `forward_head`,
`get_classifier`, `pretrained_cfg`), so scoring, class activation maps and training take it like
any timm model.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F
from timm.models import register_model
from torch import nn

# CIFAR-10's channel statistics: the whitening layer takes care of the rest.
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)


class _BatchNorm(nn.BatchNorm2d):
    """Batch norm with a fixed unit scale (only the shift is learned), as in airbench."""

    def __init__(self, features: int, momentum: float = 0.6, eps: float = 1e-12):
        super().__init__(features, eps=eps, momentum=1 - momentum)
        self.weight.requires_grad = False


class _Conv(nn.Conv2d):
    def __init__(self, cin: int, cout: int):
        super().__init__(cin, cout, kernel_size=3, padding="same", bias=False)

    def reset_parameters(self) -> None:
        super().reset_parameters()
        w = self.weight.data
        torch.nn.init.dirac_(w[:w.size(1)])  # identity on the first cin outputs: a deep net starts shallow


class _ConvGroup(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv1, self.norm1 = _Conv(cin, cout), _BatchNorm(cout)
        self.conv2, self.norm2 = _Conv(cout, cout), _BatchNorm(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.gelu(self.norm1(F.max_pool2d(self.conv1(x), 2)))
        return F.gelu(self.norm2(self.conv2(x)))


class AirbenchNet(nn.Module):
    """whiten (2x2, 2*12 channels) -> 3 conv groups -> global max-pool -> linear / `scale`."""

    def __init__(self, num_classes: int = 10, widths: Sequence[int] = (64, 256, 256), in_chans: int = 3,
                 scale: float = 1 / 9, **_: Any):
        super().__init__()
        self.num_classes, self.num_features = num_classes, widths[-1]
        whiten_width = 2 * in_chans * 4
        self.whiten = nn.Conv2d(in_chans, whiten_width, kernel_size=2, padding=0, bias=True)
        self.whiten.weight.requires_grad_(False)  # set from the data (init_whitening), never trained
        chans = [whiten_width, *widths]
        self.groups = nn.Sequential(*(_ConvGroup(a, b) for a, b in zip(chans, chans[1:])))
        self.head = nn.Linear(widths[-1], num_classes, bias=False) if num_classes else nn.Identity()
        self.scale = scale
        self.pretrained_cfg = {"mean": CIFAR_MEAN, "std": CIFAR_STD, "input_size": (3, 32, 32),
                               "architecture": "airbench_net", "tag": ""}
        self.default_cfg = self.pretrained_cfg

    @torch.no_grad()
    def init_whitening(self, images: torch.Tensor, eps: float = 5e-4) -> None:
        """Set the first layer to whiten the 2x2 patches of `images` (B, 3, H, W, normalised):
        the eigenvectors of their covariance, scaled by 1/sqrt(eigenvalue), each with its negative."""
        c, h, w = images.shape[1], *self.whiten.kernel_size
        patches = images.unfold(2, h, 1).unfold(3, w, 1).transpose(1, 3).reshape(-1, c, h, w).float()
        flat = patches.flatten(1)
        cov = torch.cov(flat.T)
        eigenvalues, eigenvectors = torch.linalg.eigh(cov)
        filters = (eigenvectors.T / torch.sqrt(eigenvalues + eps)[:, None]).view(-1, c, h, w).flip(0)
        self.whiten.weight.copy_(torch.cat([filters, -filters]))
        self.whiten.bias.zero_()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, widths[-1], h, w): the last feature map, which class activation maps read."""
        return self.groups(F.gelu(self.whiten(x)))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        pooled = x.amax(dim=(2, 3))
        return pooled if pre_logits else self.head(pooled) * self.scale

    def get_classifier(self) -> nn.Module:
        return _Scaled(self.head, self.scale)

    def reset_classifier(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.head = nn.Linear(self.num_features, num_classes, bias=False) if num_classes else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


class _Scaled(nn.Module):
    """The head as scoring calls it on pooled features: linear, then the fixed output scale."""

    def __init__(self, head: nn.Module, scale: float):
        super().__init__()
        self.head, self.scale = head, scale

    @property
    def weight(self) -> torch.Tensor:
        return self.head.weight * self.scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x) * self.scale


@register_model
def airbench_net(pretrained: bool = False, **kwargs: Any) -> AirbenchNet:
    if pretrained:
        raise ValueError("airbench_net has no hub weights: train it here (--train-epochs) or give --checkpoint")
    return AirbenchNet(**kwargs)
