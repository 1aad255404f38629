"""The distillation loss as a strategy: pseudo-Huber or L2, reduced once (mean over all elements)."""

from __future__ import annotations

import torch

from tdd_lightning.diffusion import LOSSES
from tdd_lightning.strategies.base import check


class DistillationLoss:
    def __init__(self, kind: str = "huber", huber_c: float = 0.001):
        check(kind in LOSSES, "kind", kind, f"must be one of {sorted(LOSSES)}")
        check(huber_c > 0, "huber_c", huber_c, "must be > 0")
        self.kind, self.huber_c = kind, huber_c

    def elementwise(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if self.kind == "huber":
            return LOSSES["huber"](pred, target, self.huber_c)
        return LOSSES[self.kind](pred, target)

    def __call__(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.elementwise(pred, target).mean()
