"""Learning-rate schedule: linear warm-up to the peak, then cosine decay to `min_lr`.

The schedule is a pure function of the optimizer step, so a resumed run needs nothing but the step
number to continue on the same curve.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class LRSchedule:
    """lr for optimizer step `step` (0-based: step 0 is the first `optimizer.step()`).

    Steps 0..warmup_steps-1 rise linearly to `peak_lr` (step 0 already gets peak/warmup, never 0, so no
    step is wasted); the remaining steps follow half a cosine from `peak_lr` down to `min_lr`, reached at
    the last step `total_steps - 1`. Steps past the end stay at `min_lr`.
    """

    peak_lr: float
    total_steps: int
    warmup_steps: int = 0
    min_lr: float = 0.0

    def __post_init__(self) -> None:
        if self.total_steps < 1:
            raise ValueError(f"total_steps must be at least 1, got {self.total_steps}")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be 0 or more, got {self.warmup_steps}")
        if not 0.0 <= self.min_lr <= self.peak_lr:
            raise ValueError(f"min_lr must lie in [0, peak_lr={self.peak_lr}], got {self.min_lr}")

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.peak_lr * (step + 1) / self.warmup_steps
        # the first decay step is at the peak, the last one (total_steps - 1) at min_lr
        num_decay_steps = max(1, self.total_steps - 1 - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / num_decay_steps)
        cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
        return self.min_lr + (self.peak_lr - self.min_lr) * cosine


def build_lr_schedule(train_cfg) -> LRSchedule:
    """The schedule of a config's `train` section (`lr`, `steps`, `warmup_steps`, `min_lr`)."""
    return LRSchedule(
        peak_lr=float(train_cfg.lr),
        total_steps=int(train_cfg.steps),
        warmup_steps=int(train_cfg.warmup_steps),
        min_lr=float(train_cfg.min_lr),
    )
