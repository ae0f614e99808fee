"""The learning-rate schedule every trainer here uses: linear warmup, then cosine decay."""
from __future__ import annotations

import math


def warmup_cosine(t: float, total: float, warmup: float, peak: float, floor: float = 0.0,
                  step: float = 1.0) -> float:
    """The learning rate of the step that covers [t, t + step), in any unit (steps or epochs).

    Warmup rises linearly and reaches `peak` at the END of its last step, so the first step
    already learns; then cosine from `peak` at t = warmup to `floor` at t = total.
    """
    if t < warmup:
        return peak * (t + step) / warmup
    progress = (t - warmup) / max(step, total - warmup)
    return floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
