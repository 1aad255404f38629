"""The distillation loss as a strategy, chosen by ``_target_`` (conf/loss/): reduced once, the mean over all
elements of an elementwise distance between the student's and the target's predictions."""

from __future__ import annotations

from typing import Any

import torch

from tdd_lightning.diffusion import l2_loss, pseudo_huber_loss
from tdd_lightning.strategies.base import check


class DistillationLoss:
    """Base class: subclasses define ``elementwise``; calling the loss averages it over every element."""

    name = "base"

    def elementwise(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def __call__(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.elementwise(pred, target).mean()

    def describe(self) -> dict[str, Any]:
        """What checkpoints record: the loss's name and its knobs."""
        return {"name": self.name, **vars(self)}


class PseudoHuberLoss(DistillationLoss):
    """Pseudo-Huber, the authors' loss: sqrt((pred - target)^2 + c^2) - c; ``c`` > 0 is the L2-to-L1 knee."""

    name = "huber"

    def __init__(self, c: float = 0.001):
        check(c > 0, "c", c, "must be > 0")
        self.c = c

    def elementwise(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return pseudo_huber_loss(pred, target, self.c)


class L2Loss(DistillationLoss):
    """Squared error (pred - target)^2."""

    name = "l2"

    def elementwise(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return l2_loss(pred, target)
