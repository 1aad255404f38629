"""The lr schedules (conf/lr_scheduler/*.yaml): multipliers by hand, the group as composed, bad knobs."""

import math

import pytest
import torch

from tdd_lightning.training.optim import ConstantWithWarmup, WarmupDecay
from tests.hydra_utils import compose_cfg


def test_warmup_then_cosine_and_linear_by_hand():
    cos = WarmupDecay(total_steps=110, warmup_steps=10, final=0.1, shape="cosine")
    assert [cos(s) for s in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0])  # (step + 1) / 10
    assert cos(10) == pytest.approx(1.0)
    assert cos(60) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))  # half way: 0.55
    assert cos(110) == pytest.approx(0.1) and cos(500) == pytest.approx(0.1)  # held at final
    lin = WarmupDecay(total_steps=100, shape="linear")
    assert [lin(s) for s in (0, 25, 100)] == pytest.approx([1.0, 0.75, 0.0])
    assert ConstantWithWarmup(4)(1) == pytest.approx(0.5) and ConstantWithWarmup(0)(7) == 1.0


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"total_steps": 5, "warmup_steps": 5}, "must exceed"),
        ({"total_steps": 10, "final": 1.5}, "final"),
        ({"total_steps": 10, "shape": "step"}, "cosine or linear"),
    ],
)
def test_bad_schedule_knobs_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        WarmupDecay(**kwargs)


def test_cosine_group_ends_at_max_steps(tmp_path):
    from hydra.utils import instantiate

    cfg = compose_cfg(["lr_scheduler=cosine", "trainer.max_steps=40"], tmp_path)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2.0)
    sched = instantiate(cfg.lr_scheduler)(optimizer=opt)
    lrs = []
    for _ in range(40):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(2.0) and lrs[20] == pytest.approx(1.0) and opt.param_groups[0]["lr"] == 0.0
    assert compose_cfg(["~lr_scheduler"], tmp_path).get("lr_scheduler") is None
    constant = compose_cfg([], tmp_path).lr_scheduler.lr_lambda
    assert constant._target_.endswith("ConstantWithWarmup") and constant.warmup_steps == 0
