"""The adversarial term as a strategy (``adversarial=none|hinge``; ALGORITHM.md section 7).

TDD_adv: a hinge GAN whose discriminator heads read the FROZEN teacher's features (the same base model with
its adapters off). Both the target ("real") and the student's prediction ("fake") are moved by the forward
process from their time s on to t_gan ~ U[s, min(s + T/K_min, T)), with independent noise; the heads score
the teacher's features of both. The generator term, weighted, is added to the consistency loss. It composes
with every target selection and guidance: ``loss=huber adversarial=hinge`` is TDD_adv,
``target_selection=pcm adversarial=hinge`` PCM's adversarial recipe.

This file owns the maths and the knobs; the heads and the feature hooks are ``models.discriminator`` and
``models.features``, the training step that uses them ``tdd_lightning.adversarial``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from tdd_lightning.errors import UserError
from tdd_lightning.strategies.base import check


def hinge_d_loss(real: Sequence[torch.Tensor], fake: Sequence[torch.Tensor]) -> torch.Tensor:
    """The discriminator's hinge loss: mean over heads h of E relu(1 - D_h(real)) + E relu(1 + D_h(fake)).

    Each head's logits are averaged over all their elements (samples and positions)."""
    terms = [torch.relu(1 - r).mean() + torch.relu(1 + f).mean() for r, f in zip(real, fake, strict=True)]
    return torch.stack(terms).mean()


def hinge_g_loss(fake: Sequence[torch.Tensor]) -> torch.Tensor:
    """The generator's hinge loss: mean over heads h of -E D_h(fake)."""
    return torch.stack([-f.mean() for f in fake]).mean()


def mean_logit(logits: Sequence[torch.Tensor]) -> torch.Tensor:
    """The mean logit over the heads (each head's mean): what ``train/d_real`` and ``train/d_fake`` log."""
    return torch.stack([x.mean() for x in logits]).mean()


class Adversarial:
    """Base class and ``adversarial=none``: no adversarial term (the plain, automatically optimised step)."""

    name = "none"
    enabled = False

    def check_trainer(self, accumulate_grad_batches: int, precision: str) -> None:
        """UserError for trainer settings the step cannot train with (none for the plain step)."""

    def describe(self) -> dict[str, Any]:
        return {"name": self.name}


class NoAdversarial(Adversarial):
    """``adversarial=none``."""


class HingeAdversarial(Adversarial):
    """Hinge GAN on the teacher's features (TDD_adv, PCM-adv, DMD2-style heads).

    Args:
        weight: the generator term's weight next to the consistency loss (the authors' 0.1).
        k_min: t_gan ~ U[s, min(s + T/k_min, T)); the authors' K_min = 4 (T/K_min = 250 timesteps).
        warmup_steps: optimizer steps of consistency-only training before the adversarial term starts
            (neither the heads nor the student see it before; the heads' optimizer does not step).
        features: names of the feature sites the heads sit on (None: the family's default, e.g. the UNet's
            down blocks and mid block); ``ModelFamily.discriminator_sites`` lists the names.
        lr, betas, weight_decay: the heads' Adam (the authors': 1e-5, (0, 0.999), 1e-3).
        norm_groups: GroupNorm groups of the heads (reduced to a divisor of each site's channels).
        truncate: stop the teacher's feature passes after the last hooked block (the rest of the network
            does not change the features); turned off under sharded strategies and torch.compile.
    """

    name = "hinge"
    enabled = True

    def __init__(
        self,
        weight: float = 0.1,
        k_min: int = 4,
        warmup_steps: int = 0,
        features: Sequence[str] | None = None,
        lr: float = 1e-5,
        betas: Sequence[float] = (0.0, 0.999),
        weight_decay: float = 1e-3,
        norm_groups: int = 32,
        truncate: bool = True,
    ):
        check(math.isfinite(weight) and weight >= 0, "weight", weight, "must be a number >= 0")
        check(isinstance(k_min, int) and k_min >= 1, "k_min", k_min, "must be an integer >= 1")
        check(isinstance(warmup_steps, int) and warmup_steps >= 0, "warmup_steps", warmup_steps,
              "must be an integer >= 0")  # fmt: skip
        check(
            features is None or len(features) > 0, "features", features, "null (the family's) or a name list"
        )
        check(lr > 0, "lr", lr, "must be > 0")
        betas = tuple(float(b) for b in betas)
        check(len(betas) == 2 and all(0 <= b < 1 for b in betas), "betas", betas, "two numbers in [0, 1)")
        check(weight_decay >= 0, "weight_decay", weight_decay, "must be >= 0")
        check(
            isinstance(norm_groups, int) and norm_groups >= 1, "norm_groups", norm_groups, "an integer >= 1"
        )
        self.weight, self.k_min, self.warmup_steps = float(weight), int(k_min), int(warmup_steps)
        self.features = None if features is None else [str(f) for f in features]
        self.lr, self.betas, self.weight_decay = float(lr), betas, float(weight_decay)
        self.norm_groups, self.truncate = int(norm_groups), bool(truncate)

    def active(self, step: int) -> bool:
        """Whether the adversarial term is on at optimizer step ``step`` (after the warm-up)."""
        return step >= self.warmup_steps

    def t_gan(self, s: torch.Tensor, u: torch.Tensor, num_train_timesteps: int) -> torch.Tensor:
        """t_gan = floor(s + u (min(s + T/k_min, T) - s)) for u ~ U[0, 1): an integer time in [s, hi)."""
        hi = (s + num_train_timesteps // self.k_min).clamp(max=num_train_timesteps)
        return (s.double() + u.double() * (hi - s).double()).floor().long()

    def check_trainer(self, accumulate_grad_batches: int, precision: str) -> None:
        """One manual update of the student and the heads per batch: no gradient accumulation, and no fp16
        gradient scaler (32-true and bf16 precisions)."""
        if accumulate_grad_batches != 1:
            raise UserError(
                f"adversarial=hinge updates the student and the heads once per batch: "
                f"trainer.accumulate_grad_batches={accumulate_grad_batches} is not supported; set it to 1 "
                "and raise data.batch_size (or the number of devices) for the same global batch"
            )
        if str(precision).startswith("16"):
            raise UserError(
                f"adversarial=hinge trains in trainer.precision 32-true, bf16-mixed or bf16-true, not "
                f"{precision} (fp16's gradient scaler is not shared by the step's two optimizers)"
            )

    def optimizer(self, params) -> torch.optim.Optimizer:
        """The heads' optimizer: torch's Adam (weight decay as an L2 term), as the authors'."""
        return torch.optim.Adam(params, lr=self.lr, betas=self.betas, weight_decay=self.weight_decay)

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            **{k: list(v) if isinstance(v, tuple) else v for k, v in vars(self).items()},
        }
