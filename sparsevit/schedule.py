"""Keep-ratio and learning-rate schedules, as functions of training progress in epochs (float).

Keep-ratio schedules come from a small registry; each maps (epoch, total epochs, target) to the
fraction of patch tokens kept at that point.
"""
from __future__ import annotations

import math
from typing import Callable

KeepSchedule = Callable[[float, int, float], float]
KEEP_SCHEDULES: dict[str, KeepSchedule] = {}


def register(name: str) -> Callable[[KeepSchedule], KeepSchedule]:
    def add(fn: KeepSchedule) -> KeepSchedule:
        KEEP_SCHEDULES[name] = fn
        return fn
    return add


@register("constant")
def constant(epoch: float, total: int, target: float) -> float:
    return target


@register("trilevel")
def trilevel(epoch: float, total: int, target: float) -> float:
    """Tri-Level/EViT: all tokens for 10 of 300 epochs, then cosine to the target over 100 of 300,
    both scaled to this run's length."""
    warm, ramp = total * 10 / 300, total * 100 / 300
    if epoch < warm:
        return 1.0
    t = min(1.0, (epoch - warm) / ramp)
    return target + (1 - target) * 0.5 * (1 + math.cos(math.pi * t))


@register("toe")
def toe(epoch: float, total: int, target: float) -> float:
    """Token expansion (ToE): the target keep for the first third, halfway to 1 for the second,
    all tokens for the last third (ToE's DeiT recipe: 0.5 -> 0.75 -> 1.0 at epochs 0/100/200)."""
    stage = min(2, int(3 * epoch / total))
    return (target, (target + 1) / 2, 1.0)[stage]


def lr_at(epoch: float, total: int, base: float, warmup: float, min_lr: float) -> float:
    """Linear warmup for `warmup` epochs, then cosine to min_lr at the end."""
    if epoch < warmup:
        return base * (epoch + 1e-3) / warmup
    t = (epoch - warmup) / max(1e-9, total - warmup)
    return min_lr + (base - min_lr) * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))
