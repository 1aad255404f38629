"""Learning-rate schedules as picklable callables (they live in checkpoints)."""

from __future__ import annotations


class ConstantWithWarmup:
    """LR multiplier: linear warm-up over ``warmup_steps`` optimizer steps, then constant 1."""

    def __init__(self, warmup_steps: int = 0):
        if warmup_steps < 0:
            raise ValueError(f"lr_scheduler.lr_lambda.warmup_steps={warmup_steps} must be >= 0")
        self.warmup_steps = warmup_steps

    def __call__(self, step: int) -> float:
        if self.warmup_steps == 0:
            return 1.0
        return min(1.0, (step + 1) / self.warmup_steps)
