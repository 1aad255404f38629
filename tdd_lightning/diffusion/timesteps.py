"""Inference timestep schedules: TDD's non-equidistant K-step schedules, the scheduler's schedule rule,
and diffusers' trailing spacing (ALGORITHM.md sections 1 and 4). All descending, starting at T-1."""

from __future__ import annotations

import warnings

from tdd_lightning.diffusion.grids import k_step_schedule

SCHEDULES = ("auto", "nonequidistant", "equidistant")


def nonequidistant_schedule(
    num_inference_steps: int, k_min: int, k_max: int, num_steps: int, num_train_timesteps: int = 1000
) -> list[int]:
    """A K-step schedule for K_min <= K <= K_max: short jumps at high noise first, every point in M u {T-1}.

    Take the first p points of the K_max schedule, then the K_min schedule's points below the last of
    them, with the longest prefix p that gives exactly K points. Defaults (N=250, K 4..8):
    K=5: 999 875 751 499 251; K=6: 999 875 751 627 499 251; K=7: 999 875 751 627 499 375 251;
    K=K_min and K=K_max give their equidistant schedules.
    """
    K = num_inference_steps
    if not k_min <= K <= k_max:
        raise ValueError(f"non-equidistant schedules exist for K in [{k_min}, {k_max}] only, got K={K}")
    fine = k_step_schedule(k_max, num_steps, num_train_timesteps)
    coarse = k_step_schedule(k_min, num_steps, num_train_timesteps)
    if K in (k_min, k_max):
        return coarse if K == k_min else fine
    chosen = None
    for p in range(1, k_max + 1):
        points = fine[:p] + [t for t in coarse if t < fine[p - 1]]
        if len(points) == K:
            chosen = points
    # The length changes by at most one per p and runs from K_min to K_max, so every K is reached.
    assert chosen is not None, f"no non-equidistant schedule for K={K}"
    return chosen


def tdd_timesteps(
    num_inference_steps: int,
    k_min: int,
    k_max: int,
    num_steps: int,
    num_train_timesteps: int = 1000,
    schedule: str = "auto",
) -> list[int]:
    """The inference timesteps for K steps (descending, starting at T-1).

    ``equidistant``: the K-step schedule of the grid (ALGORITHM.md section 1) for any K.
    ``nonequidistant``: :func:`nonequidistant_schedule`; K outside [K_min, K_max] is an error.
    ``auto``: non-equidistant inside [K_min, K_max], equidistant outside. K outside the trained range
    warns (those points were not all trained as targets).
    """
    K = int(num_inference_steps)
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule={schedule!r} is not one of {SCHEDULES}")
    if not 1 <= K <= num_steps:
        raise ValueError(f"num_inference_steps={K} must lie in [1, num_teacher_steps={num_steps}]")
    inside = k_min <= K <= k_max
    if schedule == "nonequidistant" and not inside:
        raise ValueError(
            f"schedule='nonequidistant' needs K in [{k_min}, {k_max}], got K={K}; "
            "use schedule='auto' or 'equidistant' for other step counts"
        )
    if not inside:
        warnings.warn(
            f"TDDScheduler: {K} steps is outside the trained range [{k_min}, {k_max}]; using the "
            "equidistant grid schedule, whose jumps the model was not trained on",
            stacklevel=3,
        )
    if schedule == "equidistant" or not inside:
        return k_step_schedule(K, num_steps, num_train_timesteps)
    return nonequidistant_schedule(K, k_min, k_max, num_steps, num_train_timesteps)


def trailing_timesteps(num_steps: int, num_train_timesteps: int = 1000) -> list[int]:
    """diffusers' ``timestep_spacing="trailing"``: k=4 -> [999, 749, 499, 249]; always starts at T-1."""
    T = num_train_timesteps
    return [round(T - i * T / num_steps) - 1 for i in range(num_steps)]
