"""The diffusion maths against hand-computed values and diffusers' reference schedulers."""

import math

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from tdd_lightning.diffusion import (
    NoiseSchedule,
    add_noise,
    alphas_cumprod_from_config,
    boundary_scalings,
    cfg_combine,
    ddim_jump,
    eps_to_x0,
    l2_loss,
    lcm_consistency,
    pseudo_huber_loss,
    x0_to_eps,
)
from tdd_lightning.models.tiny import SDXL_SCHEDULER


@pytest.fixture(scope="module")
def schedule():
    return NoiseSchedule.from_config(SDXL_SCHEDULER)


def _g(seed=0):
    return torch.Generator().manual_seed(seed)


def test_alphas_cumprod_match_diffusers_and_hand_value():
    ours = alphas_cumprod_from_config(SDXL_SCHEDULER)
    ref = DDPMScheduler(**{k: v for k, v in SDXL_SCHEDULER.items() if k != "timestep_spacing"}).alphas_cumprod
    torch.testing.assert_close(ours.float(), ref, rtol=1e-6, atol=1e-7)
    assert ours[0].item() == pytest.approx(1 - 0.00085)  # abar_0 = 0.99915, not 1


def test_add_noise_matches_diffusers(schedule):
    x0, eps = torch.randn(3, 4, 8, 8, generator=_g(1)), torch.randn(3, 4, 8, 8, generator=_g(2))
    t = torch.tensor([0, 499, 999])
    a, s = schedule.a_sigma(t, x0)
    ddpm = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    ref = ddpm.add_noise(x0, eps, t)
    torch.testing.assert_close(add_noise(x0, eps, a, s), ref, rtol=1e-5, atol=1e-5)


def test_eps_x0_round_trip(schedule):
    x_t, eps = torch.randn(2, 4, 8, 8, generator=_g(3)), torch.randn(2, 4, 8, 8, generator=_g(4))
    a, s = schedule.a_sigma(torch.tensor([250, 750]), x_t)
    torch.testing.assert_close(x0_to_eps(x_t, eps_to_x0(x_t, eps, a, s), a, s), eps, rtol=1e-4, atol=1e-4)


def test_ddim_jump_to_same_time_is_identity(schedule):
    x_t, eps = torch.randn(4, 4, 8, 8, generator=_g(5)), torch.randn(4, 4, 8, 8, generator=_g(6))
    t = torch.tensor([3, 251, 751, 999])
    a, s = schedule.a_sigma(t, x_t)
    torch.testing.assert_close(ddim_jump(x_t, eps, a, s, a, s), x_t, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("t", [999, 749, 500, 250])
def test_ddim_jump_matches_diffusers_ddim_step(schedule, t):
    ref = DDIMScheduler(**{k: v for k, v in SDXL_SCHEDULER.items() if k != "steps_offset"},
                        set_alpha_to_one=False, clip_sample=False)  # fmt: skip
    ref.set_timesteps(4)  # one step moves T // 4 = 250 timesteps
    s = t - 250
    x_t, eps = torch.randn(2, 4, 8, 8, generator=_g(t)), torch.randn(2, 4, 8, 8, generator=_g(t + 1))
    expected = ref.step(eps, t, x_t, eta=0.0).prev_sample
    a_t, s_t = schedule.a_sigma(torch.tensor([t, t]), x_t)
    a_s, s_s = schedule.a_sigma(torch.tensor([max(s, 0)] * 2), x_t)
    torch.testing.assert_close(ddim_jump(x_t, eps, a_t, s_t, a_s, s_s), expected, rtol=1e-5, atol=1e-5)


def test_boundary_scalings_hand_values():
    c_skip, c_out = boundary_scalings(torch.tensor([0, 1, 999]))
    assert c_skip[0].item() == pytest.approx(1.0) and c_out[0].item() == pytest.approx(0.0)
    # t = 1: (t*10)^2 = 100, sigma_data^2 = 0.25
    assert c_skip[1].item() == pytest.approx(0.25 / 100.25)
    assert c_out[1].item() == pytest.approx(10 / math.sqrt(100.25))
    assert c_skip[2].item() < 1e-6 and c_out[2].item() == pytest.approx(1.0, abs=1e-6)


def test_lcm_consistency_is_identity_at_zero(schedule):
    x, eps = torch.randn(2, 4, 4, 4, generator=_g(7)), torch.randn(2, 4, 4, 4, generator=_g(8))
    a, s = schedule.a_sigma(torch.tensor([0, 0]), x)
    c_skip, c_out = boundary_scalings(torch.tensor([0, 0]))
    view = (-1, 1, 1, 1)
    out = lcm_consistency(x, eps, a, s, c_skip.view(view), c_out.view(view))
    torch.testing.assert_close(out, x)


def test_cfg_combine():
    cond, uncond = torch.randn(2, 4, generator=_g(9)), torch.randn(2, 4, generator=_g(10))
    torch.testing.assert_close(cfg_combine(cond, uncond, 0.0), cond)
    # w = 3.5 equals standard CFG with scale 4.5
    torch.testing.assert_close(cfg_combine(cond, uncond, 3.5), uncond + 4.5 * (cond - uncond))
    w = torch.tensor([0.0, 1.0]).view(2, 1)
    torch.testing.assert_close(cfg_combine(cond, uncond, w)[0], cond[0])


def test_losses_keep_shape_and_values():
    pred, target = torch.zeros(2, 3, 4, 4), torch.full((2, 3, 4, 4), 0.5)
    h, l2 = pseudo_huber_loss(pred, target, c=0.001), l2_loss(pred, target)
    assert h.shape == pred.shape and l2.shape == pred.shape
    assert h[0, 0, 0, 0].item() == pytest.approx(math.sqrt(0.25 + 1e-6) - 0.001)
    assert l2[0, 0, 0, 0].item() == pytest.approx(0.25)
    assert pseudo_huber_loss(pred, pred).abs().max().item() == 0.0


def test_append_dims_broadcasts_a_per_sample_value():
    from tdd_lightning.diffusion import append_dims

    w = torch.tensor([2.0, 3.0])
    out = append_dims(w, 4)
    assert out.shape == (2, 1, 1, 1) and out.data_ptr() == w.data_ptr()  # a view
    x = torch.ones(2, 3, 2, 2)
    assert torch.equal((out * x)[0], torch.full((3, 2, 2), 2.0))
    assert torch.equal((out * x)[1], torch.full((3, 2, 2), 3.0))
    assert append_dims(torch.tensor(5.0), 2).shape == (1, 1)
    assert append_dims(torch.zeros(4, 77), 3).shape == (4, 77, 1)
    assert append_dims(w, 1).shape == (2,)
    with pytest.raises(ValueError, match="2-d"):
        append_dims(torch.zeros(2, 3), 1)


def test_a_sigma_is_broadcast_like_the_sample():
    schedule = NoiseSchedule(torch.tensor([0.64, 0.25, 0.09]))
    a, sigma = schedule.a_sigma(torch.tensor([0, 2]), torch.zeros(2, 4, 8, 8))
    assert a.shape == sigma.shape == (2, 1, 1, 1)
    torch.testing.assert_close(a.flatten(), torch.tensor([0.8, 0.3]))
    torch.testing.assert_close(sigma.flatten(), torch.tensor([0.6, 0.9539392]))
