"""Learning-rate schedules as plain functions of (fractional) epoch."""
from __future__ import annotations

import math

from kdflow.flow.spec import ScheduleSpec


def lr_factor(schedule: ScheduleSpec, epoch: float, epochs: int) -> float:
    """Multiplier of the base lr at `epoch` (epochs done, counting the current step: epoch + (step + 1) / steps)."""
    if schedule.warmup_epochs and epoch < schedule.warmup_epochs:
        return epoch / schedule.warmup_epochs
    if schedule.kind == "multistep":
        # decays at the epoch boundary, as the benchmark's per-epoch adjust_learning_rate: every step of the
        # 0-based epoch index e (epoch in (e, e + 1]) runs at gamma^(number of milestones <= e)
        index = max(math.ceil(epoch) - 1, 0)
        return schedule.gamma ** sum(index >= m for m in schedule.milestones)
    if schedule.kind == "cosine":
        span = max(epochs - schedule.warmup_epochs, 1)
        progress = min(max(epoch - schedule.warmup_epochs, 0.0) / span, 1.0)
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return 1.0
