"""Pure tensor maths of diffusion and TDD (no Lightning, no Hydra): noise schedule, grids and inference
timestep schedules, DDIM jump, CFG, losses, the few-step sampler; the rectified-flow process. See
docs/ALGORITHM.md."""

from tdd_lightning.diffusion.flow import FlowSchedule, calculate_shift, renoise_coefficients
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
from tdd_lightning.diffusion.prediction import (
    ALL_PREDICTION_TYPES,
    FLOW_PREDICTION,
    PREDICTION_TYPES,
    check_prediction_type,
    to_eps_x0,
)
from tdd_lightning.diffusion.schedule import NoiseSchedule, alphas_cumprod_from_config, unhonoured_keys
from tdd_lightning.diffusion.timesteps import (
    SCHEDULES,
    nonequidistant_schedule,
    tdd_timesteps,
    trailing_timesteps,
)

__all__ = [
    "ALL_PREDICTION_TYPES",
    "FLOW_PREDICTION",
    "FlowSchedule",
    "LOSSES",
    "NoiseSchedule",
    "PREDICTION_TYPES",
    "SCHEDULES",
    "add_noise",
    "alphas_cumprod_from_config",
    "append_dims",
    "boundary_scalings",
    "calculate_shift",
    "cfg_combine",
    "check_prediction_type",
    "ddim_jump",
    "eps_to_x0",
    "k_step_schedule",
    "l2_loss",
    "lcm_consistency",
    "nonequidistant_schedule",
    "pseudo_huber_loss",
    "renoise_coefficients",
    "target_set",
    "tdd_timesteps",
    "teacher_grid",
    "to_eps_x0",
    "trailing_timesteps",
    "unhonoured_keys",
    "x0_to_eps",
]
