"""Swappable pieces of the training step: target selection, guidance, loss, adversarial term (one Hydra group
each), and what a LoRA trained with them is sampled with (``inference``)."""

from tdd_lightning.strategies.adversarial import Adversarial, HingeAdversarial, NoAdversarial
from tdd_lightning.strategies.base import ConfigError
from tdd_lightning.strategies.guidance import (
    DecoupledGuidance,
    EmbeddedGuidance,
    Guidance,
    GuidanceDraw,
    LCMRangeGuidance,
    NoGuidance,
)
from tdd_lightning.strategies.inference import (
    RECOMMENDED,
    InferenceSchedule,
    inference_hparams,
    recorded_inference,
)
from tdd_lightning.strategies.loss import DistillationLoss, L2Loss, PseudoHuberLoss
from tdd_lightning.strategies.target_selection import (
    LCMSelection,
    PCMSelection,
    TargetSelection,
    TCDSelection,
    TDDSelection,
)

__all__ = [
    "RECOMMENDED",
    "Adversarial",
    "ConfigError",
    "DecoupledGuidance",
    "DistillationLoss",
    "EmbeddedGuidance",
    "Guidance",
    "GuidanceDraw",
    "HingeAdversarial",
    "InferenceSchedule",
    "L2Loss",
    "LCMRangeGuidance",
    "LCMSelection",
    "NoAdversarial",
    "NoGuidance",
    "PCMSelection",
    "PseudoHuberLoss",
    "TCDSelection",
    "TDDSelection",
    "TargetSelection",
    "inference_hparams",
    "recorded_inference",
]
