"""Keep-ratio schedules, as functions of training progress in epochs (float).

Each maps (epoch, total epochs, target) to the fraction of patch tokens kept at that point. The
learning-rate schedule is curate.common.schedule.warmup_cosine, shared with proxy training.
"""
from __future__ import annotations

import math
from typing import Callable

from curate.common.registry import Registry
from sparsevit import names

KeepSchedule = Callable[[float, int, float], float]
KEEP_SCHEDULES: Registry[KeepSchedule] = Registry("keep schedule", names.KEEP_SCHEDULES)
register = KEEP_SCHEDULES.register


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
