"""A coarse-to-fine teacher grid: the same strategy rebuilt on another N, switched by global step."""

from types import SimpleNamespace

import pytest
import torch

from tdd_lightning.errors import ConfigError
from tdd_lightning.strategies import PCMSelection, TCDSelection, TDDSelection
from tdd_lightning.training.callbacks import TeacherGridSchedule


def test_with_grid_keeps_every_other_argument():
    tdd = TDDSelection(250, k_min=5, window=130, s_ratio=0.15)  # positional and keyword arguments
    coarse = tdd.with_grid(50)
    assert (coarse.N, coarse.k, coarse.k_min, coarse.k_max, coarse.window, coarse.s_ratio) == (
        50,
        20,
        5,
        8,
        130,
        0.15,
    )
    assert torch.equal(coarse.M, TDDSelection(50, k_min=5, window=130, s_ratio=0.15).M)
    assert torch.equal(coarse.grid, torch.arange(19, 1000, 20))
    assert tdd.N == 250 and tdd.with_grid(50).with_grid(250).describe() == tdd.describe()
    pcm = PCMSelection(num_teacher_steps=100, num_phases=2).with_grid(50)
    assert (pcm.N, pcm.P) == (50, 2) and pcm.edges.tolist() == [0, 499]
    assert TCDSelection(50).with_grid(250).points.tolist()[:3] == [0, 3, 7]
    with pytest.raises(ConfigError, match="num_teacher_steps"):
        tdd.with_grid(300)  # the strategy's own check: N must divide T


class Module(SimpleNamespace):
    def log(self, *args, **kwargs):
        self.logged.append((args, kwargs))


def run(schedule, module, steps):
    schedule.on_fit_start(None, module)
    seen = []
    for step in steps:
        schedule.on_train_batch_start(SimpleNamespace(global_step=step), module, None, 0)
        seen.append(module.target_selection.N)
    schedule.on_train_end(None, module)
    return seen


def test_schedule_switches_by_global_step_and_ends_on_the_recorded_grid():
    final = TDDSelection(250, s_ratio=0.2)
    module = Module(target_selection=final, logged=[])
    schedule = TeacherGridSchedule([[300, 250], [0, 50], [100, 100]])  # any order
    assert run(schedule, module, [0, 99, 100, 299, 300, 600]) == [50, 50, 100, 100, 250, 250]
    assert module.target_selection is final  # evaluation and export see the configured strategy
    assert [a[1] for a, _ in module.logged] == [50.0, 50.0, 100.0, 100.0, 250.0, 250.0]
    # a resumed run (first batch at step 150) picks up the grid of its step
    module = Module(target_selection=final, logged=[])
    assert run(TeacherGridSchedule({0: 50, 100: 100, 300: 250}), module, [150, 350]) == [100, 250]
    assert module.target_selection.s_ratio == 0.2


@pytest.mark.parametrize(
    "grids, match",
    [([], "non-empty"), ([[0, 50, 1]], "pairs"), ([[10, 50]], "step 0"), ([[0, 0]], "> 0"), (None, "pairs")],
)
def test_bad_schedules_are_refused(grids, match):
    with pytest.raises(ConfigError, match=match):
        TeacherGridSchedule(grids)


def test_the_last_grid_must_be_the_recorded_one():
    module = Module(target_selection=TDDSelection(50), logged=[])
    with pytest.raises(ConfigError, match="num_teacher_steps=50"):
        TeacherGridSchedule([[0, 50], [300, 250]]).on_fit_start(None, module)
