"""Learning-rate schedules, as a pure function of the step inside a stage (nothing to checkpoint)."""

from __future__ import annotations

import math


def learning_rate(
    step: int,
    total_steps: int,
    lr: float,
    warmup_steps: int,
    schedule: str = "cosine",
    min_lr_ratio: float = 0.1,
) -> float:
    """The LR for the ``step``-th optimiser step (0-based) of a stage of ``total_steps`` steps.

    Linear warmup from lr/warmup_steps to lr over ``warmup_steps`` steps, then constant or a cosine
    decay that reaches ``lr * min_lr_ratio`` at the last step.
    """
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return lr
    decay_steps = max(total_steps - warmup_steps - 1, 1)
    progress = min((step - warmup_steps) / decay_steps, 1.0)
    min_lr = lr * min_lr_ratio
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * progress))
