"""Learning-rate schedules as picklable callables (they live in checkpoints); optimizer factories."""

from __future__ import annotations

import functools
import math
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


class WarmupDecay(ConstantWithWarmup):
    """LR multiplier: linear warm-up over ``warmup_steps``, then a ``cosine`` or ``linear`` decay from 1 to
    ``final`` at ``total_steps`` (held at ``final`` after it). For a run of N steps set total_steps = N
    (``lr_scheduler=cosine`` does: ``${trainer.max_steps}``)."""

    def __init__(self, total_steps: int, warmup_steps: int = 0, final: float = 0.0, shape: str = "cosine"):
        super().__init__(warmup_steps)
        if total_steps <= warmup_steps:
            raise ValueError(
                f"lr_scheduler.lr_lambda.total_steps={total_steps} must exceed warmup_steps={warmup_steps}"
            )
        if not 0.0 <= final <= 1.0:
            raise ValueError(f"lr_scheduler.lr_lambda.final={final} must lie in [0, 1]")
        if shape not in ("cosine", "linear"):
            raise ValueError(f"lr_scheduler.lr_lambda.shape={shape!r} must be cosine or linear")
        self.total_steps, self.final, self.shape = total_steps, float(final), shape

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return super().__call__(step)
        progress = min(1.0, (step - self.warmup_steps) / (self.total_steps - self.warmup_steps))
        fall = 0.5 * (1.0 + math.cos(math.pi * progress)) if self.shape == "cosine" else 1.0 - progress
        return self.final + (1.0 - self.final) * fall


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


def adamw8bit_if_available(**kwargs: Any) -> Callable[..., torch.optim.Optimizer]:
    """bitsandbytes' AdamW8bit when it imports (CUDA machines), else torch's AdamW with the same kwargs
    (``optimizer=adamw8bit_auto``, the FLUX recipe's): a CPU or bitsandbytes-less run still starts, and
    says which one it got."""
    import logging

    try:
        factory = adamw8bit(**kwargs)
    except ValueError as e:
        logging.getLogger(__name__).warning("optimizer: %s; using torch.optim.AdamW", str(e).split(":")[0])
        return functools.partial(torch.optim.AdamW, **kwargs)
    logging.getLogger(__name__).info("optimizer: bitsandbytes AdamW8bit")
    return factory
