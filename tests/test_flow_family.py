"""The FLUX family on the tiny FLUX pipeline: loading, the encoder against FluxPipeline's, training with
embedded guidance (FLUX.1-dev-like) and true CFG (schnell-like), and the exported LoRA in a stock
FluxPipeline / FluxImg2ImgPipeline with TDDFlowScheduler against the module's own sampler."""

import functools
import warnings

import lightning as L
import pytest
import torch
from diffusers import FluxImg2ImgPipeline, FluxPipeline

from tdd_lightning.data.synthetic import SyntheticDataModule
from tdd_lightning.diffusion import tdd_timesteps
from tdd_lightning.errors import UserError
from tdd_lightning.export import export_lora, read_metadata
from tdd_lightning.models import get_family
from tdd_lightning.models.encoder import decode_latents
from tdd_lightning.models.families.flux import FLUX, FluxEncoder, pack, unpack
from tdd_lightning.models.flux_tiny import build_tiny_flux
from tdd_lightning.module import TDDModule
from tdd_lightning.pipelines import load_tdd_pipeline, tdd_scheduler
from tdd_lightning.scheduling_tdd_flow import TDDFlowScheduler
from tdd_lightning.strategies import DecoupledGuidance, EmbeddedGuidance, PseudoHuberLoss, TDDSelection

PROMPTS = ["a red circle", "a blue square"]
TEXT_LENGTH = 16  # the tiny T5's model_max_length: FluxPipeline's max_sequence_length


@pytest.fixture(scope="module")
def dev_dir(tiny_flux_dev_dir):
    return tiny_flux_dev_dir


@pytest.fixture(scope="module")
def schnell_dir(tmp_path_factory):
    return build_tiny_flux(tmp_path_factory.mktemp("tiny-flux"))


def test_tiny_flux_through_the_real_loader_and_the_encoder_equals_flux_pipelines(dev_dir):
    parts = get_family("flux").load(dev_dir)
    pipe = parts.to_pipeline()
    assert isinstance(pipe, FluxPipeline) and parts.unet is parts.transformer
    enc = FluxEncoder.from_pretrained(dev_dir)
    text = enc.encode_captions(PROMPTS)
    with torch.no_grad():
        embeds, pooled, _ = pipe.encode_prompt(PROMPTS, None, max_sequence_length=TEXT_LENGTH)
    torch.testing.assert_close(text["prompt_embeds"], embeds, rtol=0, atol=0)
    torch.testing.assert_close(text["pooled_prompt_embeds"], pooled, rtol=0, atol=0)
    assert FLUX.text_shapes(dev_dir) == {"prompt_embeds": (16, 32), "pooled_prompt_embeds": (32,)}
    assert FLUX.latent_shape_of(dev_dir) == (4, 8, 8) and FLUX.sample_shape(parts.unet, dev_dir) == (4, 8, 8)
    # latents are (z - shift_factor) * scaling_factor, and decode_latents inverts that like the pipeline
    pixels = torch.rand(1, 3, 32, 32) * 2 - 1
    z = parts.vae.encode(pixels).latent_dist.mode()
    latents = enc.encode_images(pixels)
    cfg = parts.vae.config
    assert cfg.shift_factor and cfg.shift_factor != 0
    torch.testing.assert_close(latents, (z - cfg.shift_factor) * cfg.scaling_factor)
    with torch.no_grad():
        torch.testing.assert_close(decode_latents(parts.vae, latents), parts.vae.decode(z).sample)
    x = torch.randn(2, 4, 8, 6)
    assert pack(x).shape == (2, 12, 16) and torch.equal(unpack(pack(x), 8, 6), x)
    torch.testing.assert_close(pack(x), FluxPipeline._pack_latents(x, 2, 4, 8, 6), rtol=0, atol=0)


def test_guidance_strategy_must_fit_the_transformer(dev_dir, schnell_dir):
    dev = get_family("flux").load(dev_dir, load_vae=False, load_text_encoders=False)
    with pytest.raises(UserError, match="guidance-distilled.*use guidance=embedded"):
        make_module(dev_dir, DecoupledGuidance()).attach(dev.unet, dev.noise_scheduler.config)
    schnell = get_family("flux").load(schnell_dir, load_vae=False, load_text_encoders=False)
    with pytest.raises(UserError, match="guidance embedding.*this one has none"):
        make_module(schnell_dir, EmbeddedGuidance()).attach(schnell.unet, schnell.noise_scheduler.config)
    with pytest.raises(UserError, match="guidance=embedded needs a guidance-distilled"):
        get_family("sdxl").check_guidance({}, embedded=True)


def make_module(folder, guidance, lr=2e-2):
    return TDDModule(
        model={"family": "flux", "pretrained": str(folder), "lora": {"rank": 4, "alpha": 8}},
        target_selection=TDDSelection(),
        guidance=guidance,
        loss=PseudoHuberLoss(),
        optimizer=functools.partial(torch.optim.AdamW, lr=lr),
        ema_decay=0.5,
    )


GUIDANCES = {
    "embedded": lambda: EmbeddedGuidance(p_empty=0.25, w_min=0.0, w_max=3.0),
    "true_cfg": lambda: DecoupledGuidance(p_empty=0.25, w=2.0, uncond="empty_prompt"),
}


@pytest.fixture(scope="module", params=list(GUIDANCES))
def trained(request, dev_dir, schnell_dir, tmp_path_factory):
    """Four real training steps of the tiny FLUX (guidance-distilled with guidance=embedded, or true CFG)."""
    folder = dev_dir if request.param == "embedded" else schnell_dir
    root = tmp_path_factory.mktemp(f"flux-{request.param}")
    module = make_module(folder, GUIDANCES[request.param]())
    losses = []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(float(outputs["loss"]))

    trainer = L.Trainer(
        max_steps=4, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=str(root), callbacks=[Record()],
    )  # fmt: skip
    trainer.fit(module, datamodule=SyntheticDataModule(str(folder), family="flux", batch_size=4))
    trainer.save_checkpoint(root / "tdd.ckpt")
    files = export_lora(root / "tdd.ckpt", root / "lora")
    module.eval()
    return {"module": module, "files": files, "dir": folder, "losses": losses, "kind": request.param}


def test_training_steps_are_finite_and_record_the_flow_schedule(trained):
    m = trained["module"]
    assert len(trained["losses"]) == 4 and all(torch.isfinite(torch.tensor(trained["losses"])))
    assert m.prediction_type == "flow" and m.hparams["noise_schedule"]["type"] == "dynamic"
    meta = read_metadata(trained["files"]["student", "diffusers"])
    assert meta["family"] == "flux" and meta["pipeline"] == "FluxPipeline"
    assert (
        meta["scheduler"] == "TDDFlowScheduler"
        and meta["scheduler_module"] == "tdd_lightning.scheduling_tdd_flow"
    )
    assert meta["noise_schedule"] == m.hparams["noise_schedule"]
    from safetensors import safe_open

    with safe_open(str(trained["files"]["student", "kohya"]), framework="pt") as f:  # BFL names, q/k/v fused
        assert "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight" in set(f.keys())
    assert meta["guidance_strategy"] == {"embedded": "embedded", "true_cfg": "decoupled"}[trained["kind"]]
    if trained["kind"] == "embedded":
        assert (
            meta["recommended"]["guidance_scale"] == 1.5
        )  # the middle of U(0, 3): FluxPipeline's guidance_scale
        assert meta["guidance"]["w_min"] == 0.0 and meta["guidance"]["w_max"] == 3.0


def cond_of(parts, kind, w=1.5):
    cond = FLUX.condition(FluxEncoder.from_components(parts).encode_captions(PROMPTS), {})
    if kind == "embedded":
        cond["guidance"] = torch.full((len(PROMPTS),), w)
    return cond


def scaled_error(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp(min=1.0)).item()


MEASURED: dict[str, float] = {}


@pytest.mark.parametrize("role", ["student", "target"])
def test_exported_lora_in_a_stock_flux_pipeline_equals_the_modules_sampler(trained, role):
    """Stock FluxPipeline + load_lora_weights at scale 1 + TDDFlowScheduler == TDDModule.sample_latents, for
    1..8 steps, eta 0 and 0.2 (the re-noising generator set on the scheduler: FluxPipeline passes none)."""
    module, folder, kind = trained["module"], trained["dir"], trained["kind"]
    parts = FLUX.load(folder)
    pipe = parts.to_pipeline()
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(str(trained["files"][role, "diffusers"]))
    metadata = read_metadata(trained["files"][role, "diffusers"])
    cond = cond_of(parts, kind)
    x_T = torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(7))
    worst = 0.0
    for K in range(1, 9):
        for eta in (0.0, 0.2):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # K < 4: outside the trained range (warned)
                pipe.scheduler = tdd_scheduler(parts.noise_scheduler.config, metadata, eta=eta)
                pipe.scheduler.set_generator(torch.Generator().manual_seed(0))
                timesteps = tdd_timesteps(K, 4, 8, 250)
            extra = {"guidance_scale": 1.5} if kind == "embedded" else {}
            stock = pipe(
                prompt=PROMPTS, latents=pack(x_T), num_inference_steps=K, height=32, width=32,
                max_sequence_length=TEXT_LENGTH, output_type="latent", **extra,
            ).images  # fmt: skip
            assert pipe.scheduler._indices.tolist() == timesteps
            mine = module.sample_latents(
                cond, eta=eta, generator=torch.Generator().manual_seed(0), latents=x_T.clone(), role=role,
                timesteps=timesteps,
            )  # fmt: skip
            stock = unpack(stock, 8, 8)
            assert torch.isfinite(mine).all()
            worst = max(worst, scaled_error(stock, mine))
            torch.testing.assert_close(stock, mine, rtol=1e-5, atol=1e-5)
    MEASURED[f"{kind}/{role}"] = worst
    print(f"max scaled difference stock FluxPipeline vs module ({kind}, {role}): {worst:.2e}")
    assert worst < 1e-5
    other = "target" if role == "student" else "student"
    a = module.sample_latents(cond, num_steps=4, latents=x_T.clone(), role=other)
    b = module.sample_latents(cond, num_steps=4, latents=x_T.clone(), role=role)
    assert scaled_error(a, b) > 1e-5  # the EMA target differs from the student


def test_true_cfg_at_inference_equals_the_modules_cfg(trained):
    """A true-CFG student sampled with FluxPipeline's true_cfg_scale and the empty negative prompt == the
    module's standard CFG with u = the encoded "" (the convention it trained with)."""
    if trained["kind"] != "true_cfg":
        pytest.skip("true CFG is for a transformer without a guidance embedding")
    module, folder = trained["module"], trained["dir"]
    parts = FLUX.load(folder)
    pipe = parts.to_pipeline()
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(str(trained["files"]["student", "diffusers"]))
    pipe.scheduler = tdd_scheduler(
        parts.noise_scheduler.config, read_metadata(trained["files"]["student", "diffusers"]), eta=0.0
    )
    x_T = torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(3))
    stock = pipe(
        prompt=PROMPTS, negative_prompt=["", ""], true_cfg_scale=1.7, latents=pack(x_T),
        num_inference_steps=4, height=32, width=32, max_sequence_length=TEXT_LENGTH, output_type="latent",
    ).images  # fmt: skip
    enc = FluxEncoder.from_components(parts)
    module.uncond_text = {k: v[0] for k, v in enc.encode_captions([""]).items()}
    mine = module.sample_latents(
        cond_of(parts, "true_cfg"), num_steps=4, guidance_scale=1.7, latents=x_T.clone()
    )
    torch.testing.assert_close(unpack(stock, 8, 8), mine, rtol=1e-5, atol=1e-5)


def test_flux_img2img_and_load_tdd_pipeline(trained, tmp_path):
    """FluxImg2ImgPipeline with TDDFlowScheduler (scale_noise at the begin index) for 1..8 steps, eta 0 / 0.2;
    load_tdd_pipeline picks FluxPipeline and TDDFlowScheduler with the trained shift."""
    folder, kind = trained["dir"], trained["kind"]
    pipe = load_tdd_pipeline(folder, trained["files"]["student", "diffusers"].parent)
    assert type(pipe).__name__ == "FluxPipeline" and isinstance(pipe.scheduler, TDDFlowScheduler)
    assert pipe.scheduler.config.use_dynamic_shifting and pipe.scheduler.config.base_image_seq_len == 16
    img2img = FluxImg2ImgPipeline(**pipe.components)
    img2img.set_progress_bar_config(disable=True)
    image = torch.rand(1, 3, 32, 32)
    extra = {"guidance_scale": 1.5} if kind == "embedded" else {}
    for K in range(1, 9):
        for eta in (0.0, 0.2):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                img2img.scheduler = TDDFlowScheduler.from_config(pipe.scheduler.config, eta=eta)
            runs = [
                img2img(
                    prompt="a red circle",
                    image=image,
                    strength=0.75,
                    num_inference_steps=K,
                    height=32,
                    width=32,
                    max_sequence_length=TEXT_LENGTH,
                    output_type="pt",
                    generator=torch.Generator().manual_seed(1),
                    **extra,
                ).images  # fmt: skip
                for _ in range(2)
            ]
            assert runs[0].shape == (1, 3, 32, 32) and torch.isfinite(runs[0]).all()
            if eta == 0.0:
                torch.testing.assert_close(runs[0], runs[1], rtol=0, atol=0)
            begin = int(K - K * 0.75) if K > 1 else 0
            assert img2img.scheduler.begin_index == max(begin, 0)
