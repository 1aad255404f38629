"""Distillation losses, unreduced (reduction happens once, in the training step)."""

from __future__ import annotations

import torch


def pseudo_huber_loss(pred: torch.Tensor, target: torch.Tensor, c: float = 0.001) -> torch.Tensor:
    """Pseudo-Huber: sqrt((pred - target)^2 + c^2) - c, elementwise (Song & Dhariwal 2023)."""
    return torch.sqrt((pred.float() - target.float()) ** 2 + c**2) - c


def l2_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Squared error, elementwise."""
    return (pred.float() - target.float()) ** 2


LOSSES = {"huber": pseudo_huber_loss, "l2": l2_loss}
