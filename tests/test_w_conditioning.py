"""LCM-style w-conditioning: diffusers' embedding, a teacher the w cannot touch, a student that sees it."""

import functools

import pytest
import torch

from tdd_lightning.errors import ConfigError
from tdd_lightning.models.families.sdxl import unet_eps
from tdd_lightning.models.w_conditioning import w_embedding, w_embedding_dim
from tdd_lightning.module import TDDModule
from tdd_lightning.strategies import DecoupledGuidance, EmbeddedGuidance, PseudoHuberLoss, TDDSelection

DIM = 32


def make_module(tiny_sdxl_dir, guidance=None, dim=DIM):
    m = TDDModule(
        model={"pretrained": str(tiny_sdxl_dir), "lora": {"rank": 4}, "w_embedding_dim": dim},
        target_selection=TDDSelection(),
        guidance=guidance or DecoupledGuidance(p_empty=0.0, w_min=1.0, w_max=5.0),
        loss=PseudoHuberLoss(),
        optimizer=functools.partial(torch.optim.AdamW, lr=1e-3),
    )
    m.configure_model()
    return m


@pytest.fixture(scope="module")
def batch(synthetic_batch4):
    return synthetic_batch4


def cond_of(batch, w=None):
    c = {k: batch[k] for k in ("prompt_embeds", "pooled_prompt_embeds", "time_ids")}
    return c if w is None else {**c, "guidance": torch.full((batch["latents"].shape[0],), float(w))}


def test_embedding_is_diffusers_guidance_embedding():
    from diffusers import StableDiffusionXLPipeline

    w = torch.tensor([0.0, 0.5, 3.0, 7.5])
    for dim in (32, 33, 256):
        ref = StableDiffusionXLPipeline.get_guidance_scale_embedding(None, w, embedding_dim=dim)
        torch.testing.assert_close(w_embedding(w, dim), ref, rtol=0, atol=0)


def test_teacher_ignores_w_and_the_student_learns_it(tiny_sdxl_dir, batch):
    m = make_module(tiny_sdxl_dir)
    assert w_embedding_dim(m.unet) == DIM and m.unet.config.time_cond_proj_dim == DIM
    assert not m.unet.time_embedding.cond_proj.weight.requires_grad
    assert torch.count_nonzero(m.unet.time_embedding.cond_proj.weight) == 0
    names = [n for n, p in m.unet.named_parameters() if p.requires_grad and "cond_proj" in n]
    assert names and all("lora_" in n for n in names)  # only the student's LoRA on it trains
    x, t = batch["latents"], torch.tensor([999, 751, 499, 3])
    with torch.no_grad():
        for p in m.roles.student_params:  # a student whose w LoRA is not zero
            p.add_(0.1 * torch.randn_like(p))
        with m.roles.role("teacher") as unet:
            plain = unet_eps(unet, x, t, cond_of(batch))
            for w in (1.0, 4.0):  # bit-identical: the base layer is zero
                torch.testing.assert_close(unet_eps(unet, x, t, cond_of(batch, w)), plain, rtol=0, atol=0)
        low, high = unet_eps(m.unet, x, t, cond_of(batch, 1.0)), unet_eps(m.unet, x, t, cond_of(batch, 4.0))
    assert (low - high).abs().max() > 1e-3


def test_training_step_gives_w_to_the_lora_roles_only(tiny_sdxl_dir, batch):
    m = make_module(tiny_sdxl_dir)
    seen = []
    hook = m.unet.register_forward_pre_hook(
        lambda mod, args, kwargs: seen.append(kwargs.get("timestep_cond")), with_kwargs=True
    )
    out = m.distillation_loss(batch, torch.Generator().manual_seed(0))
    hook.remove()
    student, teacher, target = seen
    assert teacher is None  # the teacher's call (CFG batched) carries no w
    torch.testing.assert_close(student, w_embedding(out["w"], DIM))
    torch.testing.assert_close(target, student)
    assert out["w"].min() >= 1.0 and out["w"].max() <= 5.0 and out["w"].std() > 0
    out["loss"].backward()
    lora_b = [p for n, p in m.unet.named_parameters() if "cond_proj.lora_B" in n and p.requires_grad]
    assert lora_b and lora_b[0].grad.abs().max() > 0  # the w path gets a gradient from step one


def test_sampling_embeds_the_scale_and_runs_no_cfg(tiny_sdxl_dir, batch):
    m = make_module(tiny_sdxl_dir)
    calls = []
    hook = m.unet.register_forward_pre_hook(
        lambda mod, args, kwargs: calls.append((args[0].shape[0], kwargs.get("timestep_cond"))),
        with_kwargs=True,
    )
    m.sample_latents(
        cond_of(batch), num_steps=2, guidance_scale=4.0, generator=torch.Generator().manual_seed(0)
    )
    hook.remove()
    assert [b for b, _ in calls] == [4, 4]  # one conditional forward per step: no CFG batch of 2B
    torch.testing.assert_close(calls[0][1], w_embedding(torch.full((4,), 3.0), DIM))


def test_refused_where_it_cannot_apply(tiny_sdxl_dir):
    with pytest.raises(ConfigError, match="w_embedding_dim"):
        make_module(tiny_sdxl_dir, dim=2)
    with pytest.raises(Exception, match="w_embedding_dim|embedded"):
        make_module(tiny_sdxl_dir, guidance=EmbeddedGuidance())


def test_toy_sampler_embeds_the_scale_and_runs_no_cfg(tiny_sdxl_dir, batch):
    from tdd_lightning.models import load_sdxl_components
    from tdd_lightning.toy.sampling import sample_images

    m = make_module(tiny_sdxl_dir)
    vae = load_sdxl_components(tiny_sdxl_dir, load_text_encoders=False).vae
    calls = []
    record = lambda mod, args, kwargs: calls.append((args[0].shape[0], kwargs.get("timestep_cond")))  # noqa: E731
    hook = m.unet.register_forward_pre_hook(record, with_kwargs=True)
    x_T = torch.randn(batch["latents"].shape, generator=torch.Generator().manual_seed(0))
    images = sample_images(m.unet, vae, cond_of(batch), x_T, [999, 499], 2.5, m.schedule)
    hook.remove()
    assert images.shape[0] == 4 and [b for b, _ in calls] == [4, 4]
    torch.testing.assert_close(calls[1][1], w_embedding(torch.full((4,), 1.5), DIM))


def test_exported_lora_loads_into_a_stock_pipeline_that_embeds_the_scale(tiny_sdxl_dir, tmp_path):
    """Export after real steps; load_tdd_pipeline gives the stock UNet its zero w layer, and the stock SDXL
    pipeline at guidance_scale g (it then embeds g - 1 and runs no CFG) samples what the module does."""
    import lightning as L

    from tdd_lightning.data.synthetic import SyntheticDataModule
    from tdd_lightning.export import export_lora
    from tdd_lightning.pipelines import load_tdd_pipeline, lora_w_embedding_dim

    m = make_module(tiny_sdxl_dir)
    trainer = L.Trainer(
        max_steps=3, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=str(tmp_path),
    )  # fmt: skip
    trainer.fit(m, datamodule=SyntheticDataModule(pretrained=str(tiny_sdxl_dir), batch_size=4))
    trainer.save_checkpoint(tmp_path / "w.ckpt")
    files = export_lora(tmp_path / "w.ckpt", tmp_path / "lora", roles="student", formats="diffusers")
    assert lora_w_embedding_dim(files["student", "diffusers"]) == DIM
    pipe = load_tdd_pipeline(tiny_sdxl_dir, tmp_path / "lora")
    pipe.set_progress_bar_config(disable=True)
    assert w_embedding_dim(pipe.unet) == DIM
    prompts = ["a red circle", "a blue square"]
    with torch.no_grad():
        pe, _, pooled, _ = pipe.encode_prompt(prompts, device="cpu", do_classifier_free_guidance=False)
    side = pipe.default_sample_size * pipe.vae_scale_factor
    cond = {"prompt_embeds": pe, "pooled_prompt_embeds": pooled,
            "time_ids": torch.tensor([[side, side, 0, 0, side, side]] * 2, dtype=torch.float32)}  # fmt: skip
    x_T = torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(7))
    m.eval()
    for g in (2.0, 4.0):
        ours = m.sample_latents(cond, num_steps=4, guidance_scale=g, latents=x_T.clone())
        out = pipe(
            prompt=prompts, output_type="latent", latents=x_T.clone(), num_inference_steps=4, guidance_scale=g
        )
        theirs = out.images
        assert ((theirs - ours).abs().max() / ours.abs().max().clamp(min=1.0)) < 1e-5, g
    low = m.sample_latents(cond, num_steps=4, guidance_scale=2.0, latents=x_T.clone())
    assert (low - ours).abs().max() > 1e-4  # the scale is an input that matters
