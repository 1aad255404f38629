"""Pure tensor maths of diffusion and TDD (no Lightning, no Hydra). See docs/ALGORITHM.md."""

from tdd_lightning.diffusion.grids import k_step_schedule, target_set, teacher_grid
from tdd_lightning.diffusion.losses import LOSSES, l2_loss, pseudo_huber_loss
from tdd_lightning.diffusion.ops import (
    add_noise,
    append_dims,
    boundary_scalings,
    cfg_combine,
    ddim_jump,
    eps_to_x0,
    lcm_consistency,
    x0_to_eps,
)
from tdd_lightning.diffusion.schedule import NoiseSchedule, alphas_cumprod_from_config

__all__ = [
    "LOSSES",
    "NoiseSchedule",
    "add_noise",
    "alphas_cumprod_from_config",
    "append_dims",
    "boundary_scalings",
    "cfg_combine",
    "ddim_jump",
    "eps_to_x0",
    "k_step_schedule",
    "l2_loss",
    "lcm_consistency",
    "pseudo_huber_loss",
    "target_set",
    "teacher_grid",
    "x0_to_eps",
]
