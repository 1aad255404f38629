"""Swappable pieces of the training step: target selection, guidance, loss (one Hydra group each)."""

from tdd_lightning.strategies.base import ConfigError
from tdd_lightning.strategies.guidance import (
    DecoupledGuidance,
    Guidance,
    GuidanceDraw,
    LCMRangeGuidance,
    NoGuidance,
)
from tdd_lightning.strategies.loss import DistillationLoss
from tdd_lightning.strategies.target_selection import (
    LCMSelection,
    PCMSelection,
    TargetSelection,
    TCDSelection,
    TDDSelection,
)

__all__ = [
    "ConfigError",
    "DecoupledGuidance",
    "DistillationLoss",
    "Guidance",
    "GuidanceDraw",
    "LCMRangeGuidance",
    "LCMSelection",
    "NoGuidance",
    "PCMSelection",
    "TCDSelection",
    "TDDSelection",
    "TargetSelection",
]
