"""TDDFlowScheduler: what FluxPipeline calls, the trained schedules on the shifted sigmas, eta sampling."""

import math
import warnings

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from tdd_lightning.diffusion import FlowSchedule, nonequidistant_schedule, tdd_timesteps
from tdd_lightning.diffusion.sampling import tdd_sample
from tdd_lightning.scheduling_tdd_flow import TDDFlowScheduler
from tests.test_flow_maths import FLUX_DEV


def fake_v(x, i):
    return 0.4 * x + torch.sin(2 * x + 0.1 * i)


def run(sched, x, eta=None, generator=None):
    kw = {} if isinstance(sched, FlowMatchEulerDiscreteScheduler) else {"eta": eta, "generator": generator}
    for i, t in enumerate(sched.timesteps):
        x = sched.step(fake_v(x, i), t, x, **kw).prev_sample
    return x


def x_T(shape=(2, 64, 64), seed=0):  # packed: 8x8 latent of 16 channels -> 64 tokens of 64 features
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def test_pipeline_default_sigmas_mean_the_trained_k_step_schedule():
    sched = TDDFlowScheduler.from_config(FLUX_DEV)
    for K in range(1, 9):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # K < k_min warns (outside the trained range)
            sched.set_timesteps(sigmas=np.linspace(1.0, 1 / K, K), mu=0.8)
        indices = tdd_timesteps(K, 4, 8, 250)
        flow = FlowSchedule.from_config(FLUX_DEV)
        expected = flow.sigmas_at(torch.tensor(indices), 0.8).float()
        assert sched.num_inference_steps == K and sched.sigmas[-1] == 0
        torch.testing.assert_close(sched.sigmas[:-1], expected, rtol=0, atol=0)
        torch.testing.assert_close(sched.timesteps, expected * 1000, rtol=0, atol=0)
    sched.set_timesteps(6, mu=0.8)
    assert sched._indices.tolist() == nonequidistant_schedule(6, 4, 8, 250) == [999, 875, 751, 627, 499, 251]


def test_dynamic_shifting_needs_mu_and_a_static_shift_ignores_it():
    with pytest.raises(ValueError, match="mu"):
        TDDFlowScheduler.from_config(FLUX_DEV).set_timesteps(4)
    static = TDDFlowScheduler(shift=3.0)
    static.set_timesteps(4, mu=5.0)
    u = torch.tensor([1.0, 0.752, 0.5, 0.252], dtype=torch.float64)
    torch.testing.assert_close(static.sigmas[:-1], (3 * u / (1 + 2 * u)).float())


@pytest.mark.parametrize("config", [FLUX_DEV, {"shift": 3.0}], ids=["dynamic", "static"])
def test_eta_zero_equals_flow_match_euler_on_the_same_sigmas(config):
    """Custom sigmas and the trained schedule: with eta 0, every step equals FlowMatchEulerDiscreteScheduler's
    (whose last step, an Euler step to sigma 0, is TDD's x0_hat)."""
    sigmas = [1.0, 0.8, 0.45, 0.2, 0.05]
    for custom in (sigmas, None):
        ours, ref = TDDFlowScheduler.from_config(config), FlowMatchEulerDiscreteScheduler(**config)
        if custom is None:
            ours.set_timesteps(4, mu=0.9)
            custom = [(t + 1) / 1000 for t in ours._indices.tolist()]
        else:
            ours.set_timesteps(sigmas=custom, mu=0.9)
        ref.set_timesteps(sigmas=custom, mu=0.9)
        assert (ours.sigmas - ref.sigmas).abs().max() < 1e-6
        x = x_T()
        torch.testing.assert_close(run(ours, x, eta=0.0), run(ref, x), rtol=1e-5, atol=1e-5)


def test_eta_sampling_equals_the_module_sampler_with_the_same_noise():
    """The scheduler with eta 0.2 and a generator == tdd_sample on the FlowSchedule (the training maths) with
    the same generator, for the trained schedules and a non-equidistant one."""
    flow = FlowSchedule.from_config(FLUX_DEV)
    latent = torch.randn(2, 16, 16, 16, generator=torch.Generator().manual_seed(3))
    mu = flow.mu_for(latent)  # 64 tokens
    for K in (4, 5, 8):
        sched = TDDFlowScheduler.from_config(FLUX_DEV)
        sched.set_timesteps(K, mu=mu)
        calls = iter(range(100))
        ref = tdd_sample(
            lambda x, t, calls=calls: fake_v(x, next(calls)),
            latent,
            sched._indices.tolist(),
            flow,
            eta=0.2,
            generator=torch.Generator().manual_seed(5),
            prediction_type="flow",
        )
        out = run(sched, latent, eta=0.2, generator=torch.Generator().manual_seed(5))
        torch.testing.assert_close(out, ref, rtol=0, atol=0)
        assert (out - run(sched_at(K, mu), latent, eta=0.0)).abs().max() > 1e-3  # eta does something


def sched_at(K, mu):
    s = TDDFlowScheduler.from_config(FLUX_DEV)
    s.set_timesteps(K, mu=mu)
    return s


def test_the_re_noising_takes_the_configured_eta_and_the_set_generator():
    """FluxPipeline passes neither eta nor a generator: config.eta and set_generator's generator apply."""
    a, b = sched_at(4, 0.7), TDDFlowScheduler.from_config(FLUX_DEV, eta=0.1)
    b.set_timesteps(4, mu=0.7)
    b.set_generator(torch.Generator().manual_seed(1))
    x = x_T()
    torch.testing.assert_close(run(b, x), run(a, x, eta=0.1, generator=torch.Generator().manual_seed(1)))
    with pytest.warns(UserWarning, match="above the trained s_ratio"):
        run(sched_at(4, 0.7), x, eta=0.5)
    with pytest.raises(ValueError, match="eta"):
        TDDFlowScheduler(eta=1.5)


def test_scale_noise_and_the_img2img_begin_index_follow_flow_match_euler():
    ours, ref = sched_at(8, 0.9), FlowMatchEulerDiscreteScheduler(**FLUX_DEV)
    ref.set_timesteps(sigmas=[(t + 1) / 1000 for t in ours._indices.tolist()], mu=0.9)
    x0, noise = x_T(seed=1), x_T(seed=2)
    for s in (ours, ref):
        s.set_begin_index(3)
    t = ours.timesteps[3:4].repeat(2)
    torch.testing.assert_close(ours.scale_noise(x0, t, noise), ref.scale_noise(x0, t, noise))
    sigma = float(ours.sigmas[3])
    torch.testing.assert_close(ours.scale_noise(x0, t, noise), (1 - sigma) * x0 + sigma * noise)
    x = ours.scale_noise(x0, t, noise)
    for i, tt in enumerate(ours.timesteps[3:]):  # the steps from the begin index run to x0_hat
        x = ours.step(fake_v(x, i), tt, x, eta=0.0).prev_sample
    assert ours.step_index == 8 and torch.isfinite(x).all()


def test_custom_timesteps_are_grid_indices_and_bad_inputs_are_refused():
    s = TDDFlowScheduler(shift=3.0)
    with pytest.warns(UserWarning, match="not in the trained set"):
        s.set_timesteps(timesteps=[999, 600, 251])
    assert s._indices.tolist() == [999, 600, 251]
    with pytest.raises(ValueError, match="descending"):
        s.set_timesteps(timesteps=[251, 999])
    with pytest.raises(ValueError, match="descending in"):
        s.set_timesteps(sigmas=[0.5, 0.9])
    with pytest.raises(ValueError, match="disagrees"):
        s.set_timesteps(3, sigmas=[1.0, 0.7, 0.4, 0.1])


def test_config_round_trip_and_unhonoured_keys_warn_by_name(tmp_path):
    config = FlowMatchEulerDiscreteScheduler(**FLUX_DEV, use_karras_sigmas=True).config
    with pytest.warns(UserWarning, match="use_karras_sigmas=True"):
        s = TDDFlowScheduler.from_config(config, k_min=2, eta=0.1)
    assert s.config.use_dynamic_shifting and s.config.k_min == 2 and s.config.max_shift == 1.15
    s.save_pretrained(tmp_path)
    again = TDDFlowScheduler.from_pretrained(tmp_path)
    assert {k: v for k, v in again.config.items() if not k.startswith("_")} == {
        k: v for k, v in s.config.items() if not k.startswith("_")
    }
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the inert keys of a stock config stay silent
        TDDFlowScheduler.from_config(FlowMatchEulerDiscreteScheduler(**FLUX_DEV).config)
    assert len(s) == 1000 and s.order == 1 and math.isclose(s.init_noise_sigma, 1.0)
