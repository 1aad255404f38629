"""What a LoRA trained with a strategy is sampled with (ALGORITHM.md section 4).

- ``RECOMMENDED``: the recommended sampler values, named once (export, pipelines and the scheduler read them);
- ``InferenceSchedule``: the scheduler settings a target-selection strategy trained (its
  ``inference_schedule()``), which TDDModule records in its hyper-parameters and the export writes;
- ``inference_hparams`` / ``recorded_inference``: what TDDModule records in a checkpoint and what the
  export reads back, with the one fallback for checkpoints written before the module recorded it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the strategies import this module
    from tdd_lightning.strategies.guidance import Guidance
    from tdd_lightning.strategies.target_selection import TargetSelection

# the hyper-parameter keys TDDModule records them under
SCHEDULE_KEY = "inference_schedule"
GUIDANCE_SCALE_KEY = "recommended_guidance_scale"


@dataclass(frozen=True)
class RecommendedSampling:
    """The sampler settings recommended for a few-step TDD LoRA."""

    steps: int = 4
    eta: float = 0.2  # gamma sampling; capped at the trained s_ratio (InferenceSchedule.trained)
    # standard CFG on top: meaningful when captions were dropped in training (the student learned the
    # unconditional branch), else none
    guidance_scale: float = 1.7
    guidance_scale_without_dropout: float = 1.0


RECOMMENDED = RecommendedSampling()


def guidance_scale_for(p_empty: float) -> float:
    """The recommended CFG scale for a LoRA trained with caption dropout ``p_empty``."""
    return RECOMMENDED.guidance_scale if p_empty > 0 else RECOMMENDED.guidance_scale_without_dropout


# the step counts assumed for a strategy that trains no step range of its own (capped at its grid size N)
DEFAULT_STEP_RANGE = (RECOMMENDED.steps, 8)


@dataclass(frozen=True)
class InferenceSchedule:
    """The TDDScheduler settings a LoRA trained with a target-selection strategy should carry.

    num_teacher_steps: N, the training grid (3, 7, ..., 999 for N = 250);
    k_min, k_max: the trained step counts (the scheduler's non-equidistant range);
    trained_s_ratio: the longest eta jump the model learned (TDD's s_ratio; 0: none);
    eta, steps: the recommended eta and step count.
    """

    num_teacher_steps: int
    k_min: int
    k_max: int
    trained_s_ratio: float
    eta: float
    steps: int

    @classmethod
    def trained(
        cls, num_teacher_steps: int, k_min: int, k_max: int, trained_s_ratio: float
    ) -> InferenceSchedule:
        """The schedule with the recommended eta (within the trained s_ratio) and k_min steps."""
        s_ratio = float(trained_s_ratio)
        eta = min(RECOMMENDED.eta, s_ratio)
        return cls(int(num_teacher_steps), int(k_min), int(k_max), s_ratio, eta, int(k_min))

    @classmethod
    def default_range(cls, num_teacher_steps: int, trained_s_ratio: float) -> InferenceSchedule:
        """A strategy without a step range of its own: DEFAULT_STEP_RANGE capped at N."""
        k_min, k_max = (min(k, num_teacher_steps) for k in DEFAULT_STEP_RANGE)
        return cls.trained(num_teacher_steps, k_min, k_max, trained_s_ratio)

    def scheduler_config(self) -> dict[str, Any]:
        """TDDScheduler config keys (the exported ``tdd.scheduler_config``)."""
        return {
            "num_teacher_steps": self.num_teacher_steps,
            "k_min": self.k_min,
            "k_max": self.k_max,
            "trained_s_ratio": self.trained_s_ratio,
            "eta": self.eta,
        }

    def recommended(self, guidance_scale: float) -> dict[str, Any]:
        """The pipeline call's settings (the exported ``tdd.recommended``)."""
        return {"num_inference_steps": self.steps, "eta": self.eta, "guidance_scale": guidance_scale}

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> InferenceSchedule:
        return cls(**{f.name: values[f.name] for f in fields(cls)})


def inference_hparams(target_selection: TargetSelection, guidance: Guidance) -> dict[str, Any]:
    """The hyper-parameters TDDModule records for the export: the strategies' inference schedule and
    recommended guidance scale (read back by :func:`recorded_inference`)."""
    return {
        SCHEDULE_KEY: target_selection.inference_schedule().as_dict(),
        GUIDANCE_SCALE_KEY: guidance.recommended_guidance_scale(),
    }


def recorded_inference(hparams: Mapping[str, Any]) -> tuple[InferenceSchedule, float]:
    """The inference schedule and recommended guidance scale a checkpoint's hyper-parameters record.

    Checkpoints written before TDDModule recorded them get what the export derived then from the
    strategy descriptions (``target_selection``: ``describe()``; ``guidance``: its fields).
    """
    if SCHEDULE_KEY in hparams:
        schedule = InferenceSchedule.from_dict(hparams[SCHEDULE_KEY])
    else:
        selection = hparams.get("target_selection") or {}
        N = int(selection.get("N", 250))
        # the eta the model learned: TDD's s_ratio; TCD trains every earlier s; LCM / PCM none
        s_ratio = float(selection.get("s_ratio", 1.0 if selection.get("name") == "tcd" else 0.0))
        if "K" in selection:  # TDD's trained range
            k_min, k_max = (int(k) for k in selection["K"])
            schedule = InferenceSchedule.trained(N, k_min, k_max, s_ratio)
        elif "phases" in selection:  # PCM trains exactly the P-step schedule
            schedule = InferenceSchedule.trained(N, selection["phases"], selection["phases"], s_ratio)
        else:
            schedule = InferenceSchedule.default_range(N, s_ratio)
    if GUIDANCE_SCALE_KEY in hparams:
        guidance_scale = float(hparams[GUIDANCE_SCALE_KEY])
    else:
        guidance_scale = guidance_scale_for(float((hparams.get("guidance") or {}).get("p_empty", 0.0)))
    return schedule, guidance_scale
