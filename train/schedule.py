"""Linear warmup then cosine decay, as a multiplier of each group's base learning rate."""

from __future__ import annotations

import math

import torch
from torch.optim.lr_scheduler import LambdaLR

from cxrlite.train.spec import StageSpec


def lr_multiplier(update: int, *, max_steps: int, warmup_steps: int, min_lr_ratio: float) -> float:
    """Multiplier of the base rate used by the `update`-th optimizer update (1-based).

    Warmup rises linearly to 1 at update `warmup_steps` (update 1 already moves, unlike a
    warmup that starts at 0 and wastes a step); cosine then falls to exactly `min_lr_ratio`
    at update `max_steps`. Updates past `max_steps` stay at the minimum.
    """
    update = min(max(update, 1), max_steps)
    if update <= warmup_steps:
        return update / warmup_steps
    decay_steps = max_steps - warmup_steps
    progress = (update - warmup_steps) / decay_steps
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_lr_scheduler(optimizer: torch.optim.Optimizer, spec: StageSpec) -> LambdaLR:
    """A LambdaLR whose `last_epoch` counts the updates done so far.

    LambdaLR evaluates its lambda at `last_epoch` (0 before any update) and sets the rate
    for the next update, hence the +1 to map it to the 1-based update number.
    """

    def multiplier(updates_done: int) -> float:
        return lr_multiplier(
            updates_done + 1,
            max_steps=spec.max_steps,
            warmup_steps=spec.warmup_steps,
            min_lr_ratio=spec.min_lr_ratio,
        )

    return LambdaLR(optimizer, multiplier)
