"""Grids, K-step schedules and the target set M against ALGORITHM.md section 1 (hand-computed)."""

import pytest

from tdd_lightning.diffusion import k_step_schedule, target_set, teacher_grid


def test_teacher_grid_ends():
    g = teacher_grid(250)
    assert len(g) == 250 and g[:3] == [3, 7, 11] and g[-1] == 999
    assert teacher_grid(50)[:2] == [19, 39]


def test_k4_k8_schedules():
    assert k_step_schedule(4, 250) == [999, 751, 499, 251]
    assert k_step_schedule(8, 250) == [999, 875, 751, 627, 499, 375, 251, 127]


def test_k5_k6_k7_schedules():
    assert k_step_schedule(5, 250) == [999, 799, 599, 399, 199]
    assert k_step_schedule(6, 250) == [999, 835, 667, 499, 335, 167]
    assert k_step_schedule(7, 250) == [999, 859, 715, 571, 431, 287, 143]


def test_target_set_has_the_22_values():
    expected = [0, 127, 143, 167, 199, 251, 287, 335, 375, 399, 431, 499, 571, 599, 627, 667, 715, 751,
                799, 835, 859, 875]  # fmt: skip
    assert target_set(4, 8, 250) == expected


@pytest.mark.parametrize("bad", [dict(k_min=5, k_max=4), dict(k_min=0, k_max=4)])
def test_target_set_rejects_bad_range(bad):
    with pytest.raises(ValueError, match="K_min"):
        target_set(num_steps=250, **bad)


def test_grid_requires_divisor():
    with pytest.raises(ValueError, match="divide"):
        teacher_grid(300)
