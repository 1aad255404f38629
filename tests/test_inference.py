"""What each strategy says a LoRA trained with it is sampled with, the recommended values named once, and
the fallback for checkpoints that do not record it."""

import pytest

from tdd_lightning.pipelines import recommended_call_kwargs
from tdd_lightning.scheduling_tdd import TDDScheduler
from tdd_lightning.strategies import (
    RECOMMENDED,
    DecoupledGuidance,
    InferenceSchedule,
    LCMRangeGuidance,
    LCMSelection,
    NoGuidance,
    PCMSelection,
    TCDSelection,
    TDDSelection,
    inference_hparams,
    recorded_inference,
)

# (strategy, scheduler config (N, k_min, k_max, trained_s_ratio, eta), recommended steps)
SCHEDULES = [
    (TDDSelection(), (250, 4, 8, 0.3, 0.2), 4),
    (TDDSelection(k_min=2, k_max=6, s_ratio=0.1), (250, 2, 6, 0.1, 0.1), 2),
    (TDDSelection(s_ratio=0.0), (250, 4, 8, 0.0, 0.0), 4),
    (LCMSelection(), (50, 4, 8, 0.0, 0.0), 4),
    (LCMSelection(num_teacher_steps=5), (5, 4, 5, 0.0, 0.0), 4),  # the default range capped at N
    (LCMSelection(num_teacher_steps=2), (2, 2, 2, 0.0, 0.0), 2),
    (TCDSelection(), (50, 4, 8, 1.0, 0.2), 4),
    (PCMSelection(), (250, 4, 4, 0.0, 0.0), 4),
    (PCMSelection(num_teacher_steps=50, num_phases=2), (50, 2, 2, 0.0, 0.0), 2),
]
GUIDANCES = [
    (DecoupledGuidance(), 1.7),
    (DecoupledGuidance(p_empty=0.0), 1.0),
    (LCMRangeGuidance(), 1.0),
    (LCMRangeGuidance(p_empty=0.1), 1.7),
    (NoGuidance(), 1.0),
]
KEYS = ("num_teacher_steps", "k_min", "k_max", "trained_s_ratio", "eta")


def test_recommended_values_are_named_once():
    assert (RECOMMENDED.steps, RECOMMENDED.eta, RECOMMENDED.guidance_scale) == (4, 0.2, 1.7)
    assert TDDScheduler().config.eta == RECOMMENDED.eta
    assert recommended_call_kwargs({}) == {"num_inference_steps": 4, "eta": 0.2, "guidance_scale": 1.0}


@pytest.mark.parametrize("selection, config, steps", SCHEDULES, ids=lambda v: getattr(v, "name", None))
def test_each_strategy_owns_its_schedule(selection, config, steps):
    schedule = selection.inference_schedule()
    assert schedule.scheduler_config() == dict(zip(KEYS, config, strict=True))
    assert list(schedule.scheduler_config()) == list(KEYS)  # the order the exported JSON has
    recommended = {"num_inference_steps": steps, "eta": config[4], "guidance_scale": 1.7}
    assert schedule.recommended(1.7) == recommended
    assert InferenceSchedule.from_dict(schedule.as_dict()) == schedule
    # a TDDScheduler accepts it
    scheduler = TDDScheduler(**schedule.scheduler_config())
    scheduler.set_timesteps(schedule.steps)
    assert len(scheduler.timesteps) == steps


@pytest.mark.parametrize("guidance, scale", GUIDANCES, ids=lambda v: getattr(v, "name", None))
def test_guidance_owns_its_recommended_scale(guidance, scale):
    assert guidance.recommended_guidance_scale() == scale


@pytest.mark.parametrize("selection, config, steps", SCHEDULES, ids=lambda v: getattr(v, "name", None))
@pytest.mark.parametrize("guidance, scale", GUIDANCES, ids=lambda v: getattr(v, "name", None))
def test_recorded_and_older_checkpoints_agree(selection, config, steps, guidance, scale):
    """What TDDModule records reads back as is; a checkpoint from before (strategy descriptions only)
    gives the same schedule and scale through the fallback."""
    old = {"target_selection": selection.describe(), "guidance": vars(guidance)}
    new = old | inference_hparams(selection, guidance)
    assert new["inference_schedule"] == selection.inference_schedule().as_dict()
    for hparams in (new, old):
        schedule, guidance_scale = recorded_inference(hparams)
        assert schedule == selection.inference_schedule() and guidance_scale == scale
