"""A new target-selection strategy is one class: defined here (not in tdd_lightning/strategies/), trained by
the Hydra app through its ``_target_``, exported, and sampled with the schedule it says it trained, with no
edit to export.py, pipelines.py or the callbacks."""

from __future__ import annotations

import os

import torch

from tdd_lightning.export import DIFFUSERS_WEIGHT_NAME, KOHYA_WEIGHT_NAME, main, read_metadata
from tdd_lightning.pipelines import recommended_call_kwargs, tdd_scheduler
from tdd_lightning.scheduling_tdd import TDDScheduler
from tdd_lightning.strategies import InferenceSchedule, TargetSelection
from tdd_lightning.strategies.base import check
from tdd_lightning.training.run import train
from tests.hydra_utils import compose_cfg

TARGET = f"{__name__}.FixedOffsetSelection"  # tests.test_new_strategy.FixedOffsetSelection


class FixedOffsetSelection(TargetSelection):
    """s = the grid point ``jump`` teacher steps below t (0 past the bottom): the jumps of the
    equidistant K-step schedule with K = N / jump, and nothing else (no gamma offset)."""

    name = "fixed_offset"

    def __init__(self, num_teacher_steps: int = 50, jump: int = 10, num_train_timesteps: int = 1000):
        super().__init__(num_teacher_steps, num_train_timesteps)
        check(jump >= 1 and num_teacher_steps % jump == 0, "jump", jump, "must divide num_teacher_steps")
        self.jump = jump

    def select(self, t_prime: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        # t = t' + k on the grid, s = t - jump k (t' is one teacher step below t)
        return (t_prime - (self.jump - 1) * self.k).clamp(min=0)

    def inference_schedule(self) -> InferenceSchedule:
        steps = self.N // self.jump
        return InferenceSchedule.trained(self.N, steps, steps, trained_s_ratio=0.0)

    def describe(self) -> dict:
        return super().describe() | {"jump": self.jump}


def test_the_class_alone():
    """Its schedule: K = 50 / 10 = 5 steps exactly, eta 0; each scheduler step is a jump it trains."""
    selection = FixedOffsetSelection()
    schedule = selection.inference_schedule()
    assert schedule.scheduler_config() == {
        "num_teacher_steps": 50,
        "k_min": 5,
        "k_max": 5,
        "trained_s_ratio": 0.0,
        "eta": 0.0,
    }
    scheduler = tdd_scheduler({}, {"scheduler_config": schedule.scheduler_config()})
    scheduler.set_timesteps(schedule.steps)
    ts = scheduler.timesteps
    assert ts.tolist() == [999, 799, 599, 399, 199]
    t_prime = (ts - selection.k).clamp(min=0)
    assert selection.select(t_prime).tolist() == [799, 599, 399, 199, 0]


def test_trained_through_hydra_exports_its_schedule(tiny_sdxl_dir, tmp_path):
    os.environ["TDD_ROOT"] = str(tmp_path)
    out = tmp_path / "run"
    cfg = compose_cfg(
        ["experiment=smoke", f"model.pretrained={tiny_sdxl_dir}", "model.build_if_missing=false",
         # the group replaced by the new class and its knobs, as on the command line
         "~target_selection", f"+target_selection._target_={TARGET}",
         "+target_selection.num_teacher_steps=50", "+target_selection.jump=10",
         "trainer.max_steps=2", "data.batch_size=2", "data.num_samples=8",
         "callbacks.model_checkpoint.every_n_train_steps=2", "callbacks.sample_grid.prompts=[]"],
        out,
    )  # fmt: skip
    metrics = train(cfg)
    assert metrics["global_step"] == 2 and metrics["train/loss"] > 0

    expected = FixedOffsetSelection(num_teacher_steps=50, jump=10)
    schedule = expected.inference_schedule()
    ckpt = out / "checkpoints" / "last.ckpt"
    assert main([str(ckpt), "--out", str(tmp_path / "lora")]) == 0
    files = [tmp_path / "lora" / role / name for role in ("student", "target")
             for name in (DIFFUSERS_WEIGHT_NAME, KOHYA_WEIGHT_NAME)]  # fmt: skip
    # the LoRAExport callback wrote the same metadata beside the checkpoint
    files.append(out / "checkpoints" / "last_lora" / "student" / DIFFUSERS_WEIGHT_NAME)
    for path in files:
        meta = read_metadata(path)
        assert meta["target_selection"] == expected.describe()
        assert meta["scheduler_config"] == schedule.scheduler_config()
        # decoupled guidance (the default group, captions dropped with p_empty 0.2): CFG 1.7 on top
        assert meta["recommended"] == {"num_inference_steps": 5, "eta": 0.0, "guidance_scale": 1.7}

    assert recommended_call_kwargs(meta) == meta["recommended"]
    scheduler = tdd_scheduler(TDDScheduler().config, meta)
    assert isinstance(scheduler, TDDScheduler)
    config = scheduler.config
    assert (config.num_teacher_steps, config.k_min, config.k_max) == (50, 5, 5)
    assert (config.trained_s_ratio, config.eta) == (0.0, 0.0)
    scheduler.set_timesteps(meta["recommended"]["num_inference_steps"])
    assert scheduler.timesteps.tolist() == [999, 799, 599, 399, 199]
