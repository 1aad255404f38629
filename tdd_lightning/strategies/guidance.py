"""Guidance: which samples lose their caption, and the teacher's CFG scale w (ALGORITHM.md 2.2, 2.6, 3).

Every strategy is called the same way, ``draw(batch_size, generator)`` -> GuidanceDraw(drop, w), and
names ONE unconditional convention (``zeros`` or ``empty_prompt``) used everywhere: for dropped
captions, in the teacher's unconditional branch, and as the negative at inference.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from tdd_lightning.strategies.base import check, uniform
from tdd_lightning.strategies.inference import guidance_scale_for

UNCOND_CONVENTIONS = ("zeros", "empty_prompt")


def finite(value) -> bool:
    """A real number that is neither inf nor nan (a CFG scale of inf makes every target inf or nan)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass
class GuidanceDraw:
    drop: torch.Tensor  # bool [B]: condition replaced by the unconditional one
    w: torch.Tensor  # float [B]: teacher CFG scale in the LCM form (w = 0: no guidance); embedded: the value


class Guidance:
    """Base class: validates the shared knobs."""

    name = "base"
    embedded = False  # True: w is the denoiser's guidance input (EmbeddedGuidance), not a CFG scale

    def __init__(self, p_empty: float = 0.0, uncond: str = "zeros"):
        check(finite(p_empty) and 0.0 <= p_empty <= 1.0, "p_empty", p_empty, "must lie in [0, 1]")
        check(uncond in UNCOND_CONVENTIONS, "uncond", uncond, f"must be one of {UNCOND_CONVENTIONS}")
        self.p_empty, self.uncond = p_empty, uncond

    @property
    def uses_cfg(self) -> bool:
        """Whether the teacher ever needs an unconditional branch."""
        return True

    def recommended_guidance_scale(self) -> float:
        """The CFG scale to sample a LoRA trained with this guidance at: a normal CFG on top when
        captions were dropped in training (the student learned the unconditional branch), else none."""
        return guidance_scale_for(self.p_empty)

    def sample_w(self, n: int, generator: torch.Generator | None) -> torch.Tensor:
        raise NotImplementedError

    def draw(self, batch_size: int, generator: torch.Generator | None = None, device="cpu") -> GuidanceDraw:
        drop = uniform(batch_size, generator, device) < self.p_empty
        return GuidanceDraw(drop=drop, w=self.sample_w(batch_size, generator).to(device))


class DecoupledGuidance(Guidance):
    """TDD's decoupled guidance: captions dropped with p_empty; w fixed, or uniform in [w_min, w_max]."""

    name = "decoupled"

    def __init__(
        self,
        p_empty: float = 0.2,
        w: float | None = 3.5,
        w_min: float | None = None,
        w_max: float | None = None,
        uncond: str = "zeros",
    ):
        super().__init__(p_empty, uncond)
        if w_min is not None or w_max is not None:
            both = w_min is not None and w_max is not None
            check(both, "w_min", (w_min, w_max), "set both w_min and w_max")
            for key, value in (("w_min", w_min), ("w_max", w_max)):
                check(finite(value), key, value, "must be a finite number (not inf or nan)")
            check(0.0 <= w_min <= w_max, "w_min", (w_min, w_max), "need 0 <= w_min <= w_max")
            self.w_min, self.w_max = float(w_min), float(w_max)
        else:
            ok = w is not None and finite(w) and w >= 0.0
            check(ok, "w", w, "must be a finite number >= 0 (LCM form: standard CFG scale = 1 + w)")
            self.w_min = self.w_max = float(w)

    def sample_w(self, n, generator):
        return self.w_min + (self.w_max - self.w_min) * uniform(n, generator).float()


class LCMRangeGuidance(DecoupledGuidance):
    """LCM's recipe: w ~ U[w_min, w_max] per sample (default [3, 15]); no caption dropout by default."""

    name = "lcm_range"

    def __init__(self, p_empty: float = 0.0, w_min: float = 3.0, w_max: float = 15.0, uncond: str = "zeros"):
        super().__init__(p_empty=p_empty, w=None, w_min=w_min, w_max=w_max, uncond=uncond)


class EmbeddedGuidance(DecoupledGuidance):
    """Guidance-distilled teachers (FLUX.1-dev): no unconditional branch; w is the transformer's guidance
    input (ALGORITHM.md section 8.4). The teacher runs once with guidance w, and the student and target get
    the same w as their own guidance input, so w stays a knob at inference (the pipeline's guidance_scale):
    the flow analogue of decoupled guidance. w fixed, or w ~ U[w_min, w_max] per sample; caption dropout
    p_empty replaces the condition by u (the encoded "") for all three, as for decoupled guidance."""

    name = "embedded"
    embedded = True

    def __init__(
        self,
        p_empty: float = 0.0,
        w: float | None = 3.5,
        w_min: float | None = None,
        w_max: float | None = None,
        uncond: str = "empty_prompt",
    ):
        super().__init__(p_empty=p_empty, w=w, w_min=w_min, w_max=w_max, uncond=uncond)

    @property
    def uses_cfg(self) -> bool:
        return False

    def recommended_guidance_scale(self) -> float:
        """The guidance value to sample with: the trained w, or the middle of its range."""
        return (self.w_min + self.w_max) / 2


class NoGuidance(Guidance):
    """No CFG in the teacher (w = 0) and no caption dropout: the teacher runs the conditional branch only."""

    name = "none"

    def __init__(self, uncond: str = "zeros"):
        super().__init__(0.0, uncond)

    @property
    def uses_cfg(self) -> bool:
        return False

    def sample_w(self, n, generator):
        return torch.zeros(n)
