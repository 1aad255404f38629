"""The trajectory defect check (toy/trajectory.py): exact errors for an oracle and a biased model."""

import pytest
import torch

from tdd_lightning.diffusion import NoiseSchedule, k_step_schedule, teacher_grid
from tdd_lightning.toy.trajectory import errors, next_point, table, teacher_trajectory

CONFIG = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
}


def oracle(schedule, C, scale=1.0):
    """The exact eps model of the per-sample point mass at C; ``scale`` != 1 predicts x0 = scale * C."""

    def fn(x, t):
        a, sigma = schedule.a_sigma(t, x)
        return (x - a * scale * C) / sigma

    return fn


def test_oracle_has_zero_error_and_a_biased_model_the_hand_computed_one():
    schedule = NoiseSchedule.from_config(CONFIG)
    g = torch.Generator().manual_seed(0)
    C = torch.randn(6, 4, 8, 8, generator=g)
    x_T = torch.randn(6, 4, 8, 8, generator=g)
    grid = teacher_grid(10)[::-1]
    fn = oracle(schedule, C)
    points, x0_star = teacher_trajectory(fn, x_T, grid, schedule, "epsilon", progress=False)
    assert list(points) == grid and torch.allclose(x0_star, C, atol=1e-4)
    k4 = k_step_schedule(4, 10)
    rows = errors(
        {"oracle": fn, "half": oracle(schedule, C, 0.5)}, points, x0_star, schedule, "epsilon", k4, False
    )
    expected_half = ((0.5 * C - C) ** 2).mean().item() / C.var().item()
    for r in rows:
        assert r["oracle/x0"] < 1e-8 and r["oracle/next"] < 1e-8
        assert r["half/x0"] == pytest.approx(expected_half, rel=1e-3)
        assert r["s_next"] == next_point(k4, r["t"])
    # the biased model's jump to the next point: x_s = a_s * 0.5 C + sigma_s * eps_hat vs the exact x_s*
    assert 0 < rows[0]["half/next"] < rows[0]["half/x0"]
    assert "| 999 | 799 |" in table(rows, ["oracle", "half"])


def test_next_point():
    assert next_point([999, 749, 499, 249], 999) == 749
    assert next_point([999, 749, 499, 249], 600) == 499
    assert next_point([999, 749, 499, 249], 249) == 0
