"""Teacher grid, equidistant K-step schedules and the TDD target set M (ALGORITHM.md section 1)."""

from __future__ import annotations


def teacher_grid(num_steps: int, num_train_timesteps: int = 1000) -> list[int]:
    """g_j = (T/N) j - 1 for j = 1..N (ascending): 3, 7, ..., 999 for N = 250."""
    if num_steps <= 0 or num_train_timesteps % num_steps:
        raise ValueError(
            f"teacher grid size N={num_steps} must be positive and divide T={num_train_timesteps}"
        )
    k = num_train_timesteps // num_steps
    return [k * j - 1 for j in range(1, num_steps + 1)]


def k_step_schedule(num_inference_steps: int, num_steps: int, num_train_timesteps: int = 1000) -> list[int]:
    """The equidistant K-step schedule on the grid, descending from T-1.

    Reverse the grid and take indices floor(i N / K), i = 0..K-1. K=4, N=250: 999 751 499 251.
    """
    K, N = num_inference_steps, num_steps
    if not 1 <= K <= N:
        raise ValueError(f"K={K} steps must lie in [1, N={N}]")
    rev = teacher_grid(N, num_train_timesteps)[::-1]
    return [rev[(i * N) // K] for i in range(K)]


def target_set(k_min: int, k_max: int, num_steps: int, num_train_timesteps: int = 1000) -> list[int]:
    """M: the sorted union of the K-step schedules for K in [k_min, k_max], with T-1 dropped, 0 added."""
    if not 1 <= k_min <= k_max:
        raise ValueError(f"need 1 <= K_min <= K_max, got K_min={k_min}, K_max={k_max}")
    points = {0}
    for K in range(k_min, k_max + 1):
        points.update(k_step_schedule(K, num_steps, num_train_timesteps))
    points.discard(num_train_timesteps - 1)
    return sorted(points)
