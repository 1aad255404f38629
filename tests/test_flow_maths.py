"""Rectified-flow maths on TDD's grid (ALGORITHM.md section 8) against FlowMatchEulerDiscreteScheduler.

x_t = (1 - sigma) x0 + sigma eps, v = eps - x0; the DDIM jump with a = 1 - sigma is the Euler step
x_s = x_t + (sigma_s - sigma_t) v; the re-noising keeps the marginal; the grid's indices map to sigma through
the same (static or dynamic) shift as diffusers' scheduler and the FLUX pipelines' calculate_shift.
"""

import math

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.pipelines.flux.pipeline_flux import calculate_shift as flux_calculate_shift

from tdd_lightning.diffusion import (
    FlowSchedule,
    add_noise,
    calculate_shift,
    check_prediction_type,
    ddim_jump,
    k_step_schedule,
    renoise_coefficients,
    target_set,
    to_eps_x0,
)
from tdd_lightning.diffusion.sampling import tdd_sample
from tdd_lightning.strategies import TDDSelection

FLUX_DEV = {  # the scheduler config of FLUX.1-dev
    "base_image_seq_len": 256,
    "base_shift": 0.5,
    "max_image_seq_len": 4096,
    "max_shift": 1.15,
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": True,
}


def _draw(*shape, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_velocity_conversion_recovers_eps_and_x0_exactly():
    x0, eps = _draw(3, 4, 8, 8), _draw(3, 4, 8, 8, seed=1)
    sigma = torch.tensor([1.0, 0.6, 0.003], dtype=torch.float64).view(3, 1, 1, 1)
    a = 1.0 - sigma
    x_t = add_noise(x0, eps, a, sigma)
    eps_hat, x0_hat = to_eps_x0(eps - x0, x_t, a, sigma, "flow")
    torch.testing.assert_close(eps_hat, eps, rtol=0, atol=1e-12)
    torch.testing.assert_close(x0_hat, x0, rtol=0, atol=1e-12)
    check_prediction_type("flow", 0.0)  # defined at sigma = 1 (a = 0)
    with pytest.raises(ValueError, match="flow"):
        to_eps_x0(x0, x_t, a, sigma, "velocity")


def test_ddim_jump_is_the_euler_step_along_the_velocity_and_the_identity_at_s_equal_t():
    x_t, v = _draw(2, 4, 8, 8), _draw(2, 4, 8, 8, seed=1)
    for sigma_t, sigma_s in ((1.0, 0.75), (0.6, 0.1), (0.3, 0.0), (0.5, 0.5)):
        st, ss = torch.tensor(sigma_t, dtype=torch.float64), torch.tensor(sigma_s, dtype=torch.float64)
        eps, x0 = to_eps_x0(v, x_t, 1 - st, st, "flow")
        jump = ddim_jump(x_t, eps, 1 - st, st, 1 - ss, ss, x0=x0)
        torch.testing.assert_close(jump, x_t + (ss - st) * v, rtol=0, atol=1e-12)
        if sigma_s == sigma_t:
            torch.testing.assert_close(jump, x_t, rtol=0, atol=1e-12)


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_static_shift_sigmas_equal_flow_match_eulers_training_sigmas(shift):
    """Index t has sigma = shift(u), u = (t + 1) / T: diffusers' training table read backwards."""
    theirs = FlowMatchEulerDiscreteScheduler(shift=shift).sigmas.double()  # sigma at 1000, 999, ..., 1
    ours = FlowSchedule(shift=shift).sigma_table(math.log(shift))
    assert (ours.flip(0) - theirs).abs().max() < 1e-6
    # grid point g_j = 4 j - 1 (N = 250) has u = j / 250 exactly
    assert FlowSchedule().sigma_table(0.0)[[3, 499, 999]].tolist() == [4 / 1000, 0.5, 1.0]


@pytest.mark.parametrize("side", [256, 512, 1024, 1536])
def test_dynamic_shift_from_the_latent_shape_equals_the_pipelines_mu(side):
    """mu from an unpacked latent (16 channels, side/8 px, 2x2 patches) = FluxPipeline's calculate_shift of
    its token count; the sigmas equal FlowMatchEulerDiscreteScheduler's set_timesteps(sigmas, mu)."""
    flow = FlowSchedule.from_config(FLUX_DEV)
    latent = torch.zeros(1, 16, side // 8, side // 8)
    tokens = (side // 16) ** 2
    mu = flux_calculate_shift(tokens, 256, 4096, 0.5, 1.15)
    assert flow.mu_for(latent) == pytest.approx(mu, abs=1e-12) == calculate_shift(tokens)
    ref = FlowMatchEulerDiscreteScheduler(**FLUX_DEV)
    indices = k_step_schedule(8, 250)
    u = [(t + 1) / 1000 for t in indices]
    ref.set_timesteps(sigmas=u, mu=mu)
    a, sigma = flow.a_sigma(torch.tensor(indices), latent.expand(8, -1, -1, -1))
    assert (sigma.flatten() - ref.sigmas[:-1]).abs().max() < 1e-6
    torch.testing.assert_close(a, 1 - sigma)
    assert flow.terminal_abar == 0.0 and float(sigma.flatten()[0]) == 1.0


def test_teacher_and_jumps_equal_flow_match_euler_steps_between_the_same_sigmas():
    """FlowMatchEulerDiscreteScheduler stepping through grid sigmas t -> t' (and the final Euler step to 0)
    equals the DDIM-jump / teacher step of the training maths, with a shift."""
    flow = FlowSchedule(shift=3.0)
    T = 1000
    path = [999, 995, 751, 499, 3]
    ref = FlowMatchEulerDiscreteScheduler(shift=3.0)
    ref.set_timesteps(sigmas=[(t + 1) / T for t in path])
    x = _draw(2, 4, 8, 8).float()
    for i, t in enumerate(path):
        v = torch.sin(x + i)
        theirs = ref.step(v, ref.timesteps[i], x).prev_sample
        tt = torch.full((2,), t)
        a_t, s_t = flow.a_sigma(tt, x)
        eps, x0 = to_eps_x0(v, x, a_t, s_t, "flow")
        if i + 1 < len(path):
            a_s, s_s = flow.a_sigma(torch.full((2,), path[i + 1]), x)
            ours = ddim_jump(x, eps, a_t, s_t, a_s, s_s, x0=x0)
        else:
            ours = x0  # the last step: x0_hat = x - sigma v, Euler to sigma = 0
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
        x = theirs


def test_renoising_keeps_the_marginal():
    """From x_s ~ (1 - sigma_s) x0 + sigma_s eps, the re-noised x_t has mean (1 - sigma_t) x0, std sigma_t."""
    flow = FlowSchedule(shift=3.0)
    x0 = torch.tensor([1.5, -0.7, 0.0, 3.0], dtype=torch.float64)
    n = 200_000
    g = torch.Generator().manual_seed(0)
    for t, s in ((751, 525), (499, 349), (127, 88), (999, 700)):
        (a_t, s_t), (a_s, s_s) = (flow.a_sigma(torch.tensor([k]), x0[None]) for k in (t, s))
        x_s = a_s * x0 + s_s * torch.randn(n, 4, generator=g, dtype=torch.float64)
        x_t = flow.renoise(x_s, t, s, torch.randn(n, 4, generator=g, dtype=torch.float64), mu=math.log(3.0))
        torch.testing.assert_close(x_t.mean(0), (a_t * x0).flatten(), rtol=0, atol=0.01)
        torch.testing.assert_close(x_t.std(0), s_t.flatten().expand(4), rtol=0.01, atol=0)
    # the VP special case: a^2 + sigma^2 = 1 gives scale^2 + std^2 = ... std^2 = 1 - a_t^2 / a_s^2
    a_t, a_s = torch.tensor(0.6, dtype=torch.float64), torch.tensor(0.8, dtype=torch.float64)
    scale, std = renoise_coefficients(a_t, (1 - a_t**2).sqrt(), a_s, (1 - a_s**2).sqrt())
    assert float(scale) == pytest.approx(0.75) and float(std**2) == pytest.approx(1 - 0.75**2)


def test_tdd_candidate_sets_are_built_on_the_flow_grids_indices():
    """The target set, the window and the s_ratio offset are index constructions; the flow schedule maps them
    to sigma monotonically, so s <= t' <= t in index means sigma_s <= sigma_t' <= sigma_t."""
    sel = TDDSelection()
    assert sel.candidates(900) == [627, 667, 715, 751, 799, 835, 859, 875]
    assert sel.candidates(250) == [0, 127, 143, 167, 199]
    flow = FlowSchedule.from_config(FLUX_DEV)
    mu = flow.mu_for(image_seq_len=4096)
    table = flow.sigma_table(mu)
    assert (table[1:] > table[:-1]).all()  # monotone: the index order is the sigma order
    M = torch.tensor(target_set(4, 8, 250))
    # M in sigma at 1024 px (mu = 1.15): u = (m + 1) / 1000 shifted
    torch.testing.assert_close(table[M], flow.sigmas_of_base((M.double() + 1) / 1000, mu))
    g = torch.Generator().manual_seed(0)
    t, t_prev = sel.sample_times(4096, g)
    s = sel.select(t_prev, g)
    assert (s <= t_prev).all() and (t_prev < t).all()
    assert (table[s] <= table[t_prev]).all() and (table[t_prev] < table[t]).all()


def test_tdd_sample_on_the_flow_schedule_is_euler_at_eta_zero():
    """tdd_sample with a FlowSchedule and eta 0 is FlowMatchEulerDiscreteScheduler on the K-step sigmas."""
    flow = FlowSchedule.from_config(FLUX_DEV)
    x_T = _draw(1, 16, 16, 16).float()
    steps = k_step_schedule(4, 250)
    mu = flow.mu_for(x_T)

    def model(x, t):
        return 0.5 * x + torch.cos(x * (1 + t.float().mean() / 1000))

    ours = tdd_sample(model, x_T, steps, flow, eta=0.0, prediction_type="flow")
    ref = FlowMatchEulerDiscreteScheduler(**FLUX_DEV)
    ref.set_timesteps(sigmas=[(t + 1) / 1000 for t in steps], mu=mu)
    x = x_T
    for i, t in enumerate(steps):
        x = ref.step(model(x, torch.tensor([t])), ref.timesteps[i], x).prev_sample
    torch.testing.assert_close(ours, x, rtol=1e-5, atol=1e-5)
