"""Learning-rate schedules as picklable callables (they live in checkpoints); optimizer factories."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch


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


def adamw8bit(**kwargs: Any) -> Callable[..., torch.optim.Optimizer]:
    """bitsandbytes' AdamW8bit as a factory over the LoRA parameters (``optimizer=adamw8bit``).

    Called when the config is built, so a missing bitsandbytes stops the run at start-up with one line
    instead of after the model has loaded; ``kwargs`` (lr, weight_decay, ...) go to AdamW8bit.
    """
    try:
        from bitsandbytes.optim import AdamW8bit
    except ImportError as e:
        reason = (str(e).splitlines() or [type(e).__name__])[0]
        raise ValueError(
            f"adamw8bit needs bitsandbytes, which could not be imported ({reason}): "
            "pip install bitsandbytes (CUDA machines), or use optimizer=adamw"
        ) from None
    return functools.partial(AdamW8bit, **kwargs)
