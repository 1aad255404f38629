"""TDDScheduler: the diffusers contract, the trained schedules, eta sampling and early x0 clipping."""

import warnings

import pytest
import torch
from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

from tdd_lightning.diffusion import (
    NoiseSchedule,
    ddim_jump,
    eps_to_x0,
    k_step_schedule,
    nonequidistant_schedule,
    target_set,
)
from tdd_lightning.models.tiny import SDXL_SCHEDULER
from tdd_lightning.scheduling_tdd import TDDScheduler, TDDSchedulerOutput

EQUIDISTANT = {
    4: [999, 751, 499, 251],
    8: [999, 875, 751, 627, 499, 375, 251, 127],
}
NONEQUIDISTANT = {  # the reference lists, ALGORITHM.md section 4
    5: [999, 875, 751, 499, 251],
    6: [999, 875, 751, 627, 499, 251],
    7: [999, 875, 751, 627, 499, 375, 251],
}


def fake_eps(x: torch.Tensor, t: int) -> torch.Tensor:
    """A deterministic stand-in for the UNet's eps prediction."""
    return 0.5 * x + 0.3 * torch.sin(2.0 * x + t / 100.0)


def _x_T(seed=0, shape=(2, 4, 8, 8)):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def sample(sched: TDDScheduler, steps=4, eta=None, seed=None, x=None, eps_fn=fake_eps, timesteps=None):
    """Run the scheduler's loop with the fake model; returns (final latents, list of denoised)."""
    if timesteps is None:
        sched.set_timesteps(steps)
    else:
        sched.set_timesteps(timesteps=timesteps)
    x = _x_T() if x is None else x
    g = None if seed is None else torch.Generator().manual_seed(seed)
    denoised = []
    for t in sched.timesteps:
        out = sched.step(eps_fn(x, int(t)), t, x, eta=eta, generator=g)
        x = out.prev_sample
        denoised.append(out.denoised)
    return x, denoised


# ---- config round trips ----


def test_save_load_and_from_config_round_trips(tmp_path):
    sched = TDDScheduler(eta=0.1, schedule="equidistant", clip_sample=True, clip_steps=2, k_min=2)
    sched.save_pretrained(tmp_path)
    loaded = TDDScheduler.from_pretrained(tmp_path)

    def public(cfg):
        return {k: v for k, v in dict(cfg).items() if not k.startswith("_")}

    assert public(loaded.config) == public(sched.config)
    assert public(TDDScheduler.from_config(sched.config).config) == public(sched.config)
    assert loaded.config.eta == 0.1 and loaded.config.clip_steps == 2 and loaded.config.k_min == 2


def test_from_sdxl_euler_config_keeps_noise_schedule_and_ignores_unknown_keys():
    euler = EulerDiscreteScheduler(**SDXL_SCHEDULER)
    sched = TDDScheduler.from_config(euler.config)
    for key in ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "prediction_type"):
        assert sched.config[key] == euler.config[key]
    assert sched.config.num_teacher_steps == 250  # SDXL's steps_offset, timestep_spacing: kept, unused
    sched.set_timesteps(4)
    assert sched.timesteps.tolist() == EQUIDISTANT[4]
    torch.testing.assert_close(sched.alphas_cumprod, euler.alphas_cumprod)


def test_contract_basics():
    sched = TDDScheduler()
    assert sched.order == 1 and sched.init_noise_sigma == 1.0 and len(sched) == 1000
    x = _x_T()
    assert sched.scale_model_input(x, 999) is x
    sched.set_timesteps(4)
    assert sched.timesteps.dtype == torch.long and sched.num_inference_steps == 4
    assert sched.step_index is None and sched.begin_index is None
    out = sched.step(fake_eps(x, 999), sched.timesteps[0], x)
    assert isinstance(out, TDDSchedulerOutput) and sched.step_index == 1
    prev, denoised = sched.step(fake_eps(out.prev_sample, 751), 751, out.prev_sample, return_dict=False)
    assert prev.shape == denoised.shape == x.shape and sched.step_index == 2


def test_add_noise_is_the_forward_process():
    sched = TDDScheduler()
    x0, eps = _x_T(1), _x_T(2)
    t = torch.tensor([999, 127])
    abar = sched.alphas_cumprod[t].view(-1, 1, 1, 1)
    torch.testing.assert_close(sched.add_noise(x0, eps, t), abar.sqrt() * x0 + (1 - abar).sqrt() * eps)
    one = sched.add_noise(x0, eps, torch.tensor([499]))
    torch.testing.assert_close(one, sched.add_noise(x0, eps, torch.tensor([499, 499])))


# ---- schedules ----


@pytest.mark.parametrize("K", [4, 8])
def test_equidistant_schedules_equal_algorithm_md(K):
    for schedule in ("auto", "equidistant", "nonequidistant"):
        sched = TDDScheduler(schedule=schedule)
        sched.set_timesteps(K)
        assert sched.timesteps.tolist() == EQUIDISTANT[K]


@pytest.mark.parametrize("K", [5, 6, 7])
def test_nonequidistant_schedules_equal_reference(K):
    sched = TDDScheduler()  # schedule="auto"
    sched.set_timesteps(K)
    assert sched.timesteps.tolist() == NONEQUIDISTANT[K]
    equi = TDDScheduler(schedule="equidistant")
    equi.set_timesteps(K)
    assert equi.timesteps.tolist()[0] == 999 and equi.timesteps.tolist() != NONEQUIDISTANT[K]


@pytest.mark.parametrize("N,k_min,k_max", [(250, 4, 8), (50, 2, 8), (100, 3, 12), (250, 1, 10)])
def test_nonequidistant_rule_is_general(N, k_min, k_max):
    trained = set(target_set(k_min, k_max, N)) | {999}
    for K in range(k_min, k_max + 1):
        ts = nonequidistant_schedule(K, k_min, k_max, N)
        assert len(ts) == K and ts[0] == 999 and set(ts) <= trained
        assert all(a > b for a, b in zip(ts[:-1], ts[1:], strict=True))
        if K > k_min:  # the first jump is the K_max schedule's short one
            assert ts[:2] == k_step_schedule(k_max, N)[:2]


def test_k_outside_trained_range_warns_and_uses_grid():
    sched = TDDScheduler()
    with pytest.warns(UserWarning, match="outside the trained range"):
        sched.set_timesteps(2)
    assert sched.timesteps.tolist() == [999, 499]
    with pytest.warns(UserWarning, match="outside the trained range"):
        sched.set_timesteps(10)
    assert sched.timesteps.tolist()[:3] == [999, 899, 799]
    with pytest.raises(ValueError, match="nonequidistant"):
        TDDScheduler(schedule="nonequidistant").set_timesteps(3)
    with pytest.raises(ValueError, match="num_teacher_steps"):
        sched.set_timesteps(251)


def test_custom_timesteps_validated():
    sched = TDDScheduler()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sched.set_timesteps(timesteps=[999, 627, 251])
    assert sched.timesteps.tolist() == [999, 627, 251] and sched.num_inference_steps == 3
    x, _ = sample(sched, timesteps=[999, 627, 251], eta=0.0)
    assert torch.isfinite(x).all()
    for bad, msg in [([999, 999, 1], "descending"), ([500, 800], "descending"), ([1000, 10], r"\[0, 999\]"),
                     ([], "empty"), ([999.5], "integers")]:  # fmt: skip
        with pytest.raises(ValueError, match=msg):
            sched.set_timesteps(timesteps=bad)
    with pytest.warns(UserWarning, match="not in the trained set"):
        sched.set_timesteps(timesteps=[999, 500])
    with pytest.raises(ValueError, match="disagrees"):
        sched.set_timesteps(3, timesteps=[999, 499])


# ---- sampling ----


def test_eta_zero_is_ddim_on_the_schedule():
    """eta = 0 equals a hand-written loop of DDIM jumps on 999 751 499 251, ending at x0_hat."""
    sched = TDDScheduler()
    ours, _ = sample(sched, steps=4, eta=0.0)
    again, _ = sample(sched, steps=4, eta=0.0, seed=123)  # generator unused when eta = 0
    assert torch.equal(ours, again)

    ns = NoiseSchedule.from_config(SDXL_SCHEDULER)
    ts = EQUIDISTANT[4]
    x = _x_T()
    for i, t in enumerate(ts):
        eps = fake_eps(x, t)
        a_t, sigma_t = ns.a_sigma(torch.tensor([t]), x)
        if i == len(ts) - 1:
            x = eps_to_x0(x, eps, a_t, sigma_t)
        else:
            x = ddim_jump(x, eps, a_t, sigma_t, *ns.a_sigma(torch.tensor([ts[i + 1]]), x))
    torch.testing.assert_close(ours, x, rtol=0, atol=1e-6)


def test_config_eta_is_the_default_and_step_eta_overrides():
    a, _ = sample(TDDScheduler(eta=0.0), eta=None, seed=0)
    b, _ = sample(TDDScheduler(eta=0.2), eta=0.0, seed=0)
    c, _ = sample(TDDScheduler(eta=0.2), eta=None, seed=0)
    assert torch.equal(a, b) and not torch.allclose(a, c)


def test_eta_step_matches_the_renoising_formula():
    sched = TDDScheduler()
    sched.set_timesteps(4)
    x = _x_T()
    out = sched.step(fake_eps(x, 999), 999, x, eta=0.2, generator=torch.Generator().manual_seed(7))

    abar = sched._abar
    t, t_next, s = 999, 751, 600  # s = floor(0.8 * 751)
    eps = fake_eps(x, t)
    x0 = (x - (1 - abar[t]).sqrt().float() * eps) / abar[t].sqrt().float()
    x_s = abar[s].sqrt().float() * x0 + (1 - abar[s]).sqrt().float() * eps
    z = torch.randn(x.shape, generator=torch.Generator().manual_seed(7))
    ratio = (abar[t_next] / abar[s]).float()
    torch.testing.assert_close(out.prev_sample, ratio.sqrt() * x_s + (1 - ratio).sqrt() * z)
    torch.testing.assert_close(out.denoised, x0)


def test_eta_sampling_is_seeded():
    sched = TDDScheduler()
    a, _ = sample(sched, steps=6, eta=0.2, seed=1)
    b, _ = sample(sched, steps=6, eta=0.2, seed=1)
    c, _ = sample(sched, steps=6, eta=0.2, seed=2)
    assert torch.equal(a, b) and not torch.allclose(a, c)
    # one generator per sample, as pipelines pass them
    x = _x_T()
    sched.set_timesteps(4)
    gens = [torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)]
    out = sched.step(fake_eps(x, 999), 999, x, eta=0.2, generator=gens)
    sched.set_timesteps(4)
    first = sched.step(fake_eps(x[:1], 999), 999, x[:1], eta=0.2, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(out.prev_sample[:1], first.prev_sample)


def test_eta_above_trained_ratio_warns_once():
    sched = TDDScheduler()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sample(sched, steps=4, eta=0.3, seed=0)  # at the trained ratio: silent
    with pytest.warns(UserWarning, match="above the trained s_ratio") as record:
        sample(sched, steps=4, eta=0.5, seed=0)
    assert sum("s_ratio" in str(w.message) for w in record) == 1
    with pytest.raises(ValueError, match="eta"):
        sample(sched, steps=4, eta=1.5)


def test_last_step_returns_the_denoised_prediction():
    x, denoised = sample(TDDScheduler(), steps=4, eta=0.2, seed=0)
    assert torch.equal(x, denoised[-1])


def test_half_precision_in_and_out():
    sched = TDDScheduler()
    sched.set_timesteps(4)
    x = _x_T().half()
    out = sched.step(fake_eps(x.float(), 999).half(), 999, x, eta=0.2, generator=torch.Generator())
    assert out.prev_sample.dtype == out.denoised.dtype == torch.float16


def test_begin_index_for_img2img():
    sched = TDDScheduler()
    sched.set_timesteps(4)
    sched.set_begin_index(2)
    x = _x_T()
    sched.step(fake_eps(x, 499), 499, x, eta=0.0)
    assert sched.begin_index == 2 and sched.step_index == 3
    sched.set_timesteps(4)  # without a begin index the first timestep locates the index
    sched.step(fake_eps(x, 751), torch.tensor(751), x, eta=0.0)
    assert sched.step_index == 2


def _big(x, t):  # eps = 0 so that x0_hat = x / a_t, far outside [-1, 1]
    return torch.zeros_like(x)


@pytest.mark.parametrize("clip_steps,clipped", [(2, [True, True, False, False]), (None, [True] * 4)])
def test_clip_sample_only_in_first_clip_steps(clip_steps, clipped):
    sched = TDDScheduler(clip_sample=True, clip_sample_range=1.0, clip_steps=clip_steps)
    _, denoised = sample(sched, steps=4, eta=0.0, x=10 * _x_T(), eps_fn=_big)
    assert [bool(d.abs().max() <= 1.0) for d in denoised] == clipped
    _, plain = sample(TDDScheduler(), steps=4, eta=0.0, x=10 * _x_T(), eps_fn=_big)
    assert all(d.abs().max() > 1.0 for d in plain)


def test_dynamic_thresholding_only_in_first_clip_steps():
    sched = TDDScheduler(thresholding=True, sample_max_value=4.0, clip_steps=1)
    x = 10 * _x_T()
    _, denoised = sample(sched, steps=4, eta=0.0, x=x, eps_fn=_big)
    assert denoised[0].abs().max() <= 1.0 and all(d.abs().max() > 1.0 for d in denoised[1:])
    a_t = sched.alphas_cumprod[999].sqrt()
    x0 = x / a_t  # every sample's 99.5% quantile is far above 4, so s = 4
    torch.testing.assert_close(denoised[0], x0.clamp(-4, 4) / 4)


# ---- a stock diffusers pipeline ----


def test_stock_sdxl_pipeline_accepts_it(tiny_components):
    pipe = tiny_components.to_pipeline()
    assert isinstance(pipe, StableDiffusionXLPipeline)
    pipe.scheduler = TDDScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)

    def run(seed, eta):
        g = torch.Generator().manual_seed(seed)
        return pipe("a red circle", num_inference_steps=4, eta=eta, generator=g, output_type="pt").images

    a, b = run(0, 0.2), run(0, 0.2)
    assert a.shape == (1, 3, 64, 64) and torch.isfinite(a).all()
    assert torch.equal(a, b)
    assert pipe.scheduler.timesteps.tolist() == EQUIDISTANT[4]
    assert not torch.equal(a, run(0, 0.0))  # the pipeline's eta reaches step()


def test_stock_pipelines_custom_timesteps_and_img2img(tiny_components):
    from diffusers import StableDiffusionXLImg2ImgPipeline

    pipe = tiny_components.to_pipeline()
    pipe.scheduler = TDDScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)

    def run(p, **kw):
        g = torch.Generator().manual_seed(0)
        return p("a red circle", eta=0.2, generator=g, output_type="pt", **kw).images

    torch.testing.assert_close(run(pipe, timesteps=EQUIDISTANT[4]), run(pipe, num_inference_steps=4))

    img2img = StableDiffusionXLImg2ImgPipeline.from_pipe(pipe)
    image = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    out = run(img2img, image=image, strength=0.5, num_inference_steps=4)
    assert torch.isfinite(out).all() and img2img.scheduler.begin_index == 2
    assert img2img.scheduler.step_index == 4  # ran 499 -> 251 -> x0


@pytest.mark.parametrize("eta", [0.0, 0.2])
def test_tdd_sample_with_clip_x0_equals_the_clipping_scheduler(eta):
    """The toy sampler (tdd_sample with the scheduler's clip_x0) samples as the scheduler's own loop does,
    clipping included: the evaluation of a clipping ablation is the pipeline's sampling."""
    from tdd_lightning.diffusion.sampling import tdd_sample

    sched = TDDScheduler(clip_sample=True, clip_sample_range=1.5, clip_steps=2)
    x = 3 * _x_T()
    ref, denoised = sample(sched, steps=4, eta=eta, seed=5, x=x)
    assert denoised[0].abs().max() <= 1.5 < denoised[3].abs().max()  # clipping acted, and only early
    timesteps = [int(t) for t in sched.timesteps]
    ours = tdd_sample(
        lambda x_t, t: fake_eps(x_t, int(t[0])), x, timesteps, NoiseSchedule(sched.alphas_cumprod), eta=eta,
        generator=torch.Generator().manual_seed(5), clip_x0=sched.clip_x0,
    )  # fmt: skip
    torch.testing.assert_close(ours, ref)
    plain = tdd_sample(
        lambda x_t, t: fake_eps(x_t, int(t[0])), x, timesteps, NoiseSchedule(sched.alphas_cumprod), eta=eta,
        generator=torch.Generator().manual_seed(5),
    )  # fmt: skip
    assert (plain - ref).abs().max() > 1e-3  # without the hook: not the clipping scheduler's result
