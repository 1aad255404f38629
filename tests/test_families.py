"""Model families: SD1.5 beside SDXL behind one interface; eps / v / x0 prediction; zero-terminal SNR.

The tiny SD1.5 pipeline is built from configs, saved, and loaded by the real loader; the exported LoRA in
a stock StableDiffusionPipeline with TDDScheduler reproduces the module's sampler (eps, and v-prediction
with rescale_betas_zero_snr); the conversions match diffusers' DDIMScheduler; ``experiment=smoke
model=sd15_tiny`` trains, checkpoints, resumes exactly and exports.
"""

import csv
import functools
import os
import warnings

import lightning as L
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, StableDiffusionPipeline

from tdd_lightning.checkpoint_io import load_checkpoint
from tdd_lightning.data.synthetic import SyntheticDataModule
from tdd_lightning.diffusion import NoiseSchedule, alphas_cumprod_from_config, ddim_jump, to_eps_x0
from tdd_lightning.errors import ConfigError, UserError
from tdd_lightning.export import KOHYA_WEIGHT_NAME, export_lora, read_metadata
from tdd_lightning.models import get_family, load_sd15_components
from tdd_lightning.models.families import MissingConditionError
from tdd_lightning.models.families.sd15 import SD15, SD15Encoder
from tdd_lightning.models.tiny import TinySD15Config, build_tiny_sd15
from tdd_lightning.module import TDDModule
from tdd_lightning.pipelines import load_tdd_pipeline
from tdd_lightning.scheduling_tdd import TDDScheduler
from tdd_lightning.strategies import DecoupledGuidance, PseudoHuberLoss, TDDSelection
from tdd_lightning.training.run import train
from tests.hydra_utils import compose_cfg

PROMPTS = ["a red circle", "a blue square"]
V_ZERO_SNR = {
    "prediction_type": "v_prediction",
    "rescale_betas_zero_snr": True,
    "timestep_spacing": "trailing",
}


@pytest.fixture(scope="module")
def sd15_dir(tiny_sd15_dir):
    return tiny_sd15_dir


@pytest.fixture(scope="module")
def sd15_v_dir(tmp_path_factory):
    """A v-prediction tiny SD1.5 with a zero-terminal-SNR schedule (SD2.x-style community finetunes)."""
    return build_tiny_sd15(tmp_path_factory.mktemp("tiny-sd15-v"), TinySD15Config(scheduler=V_ZERO_SNR))


# ---- the maths: conversions and schedules against diffusers ----------------------------------------
# eps prediction is undefined at zero terminal SNR (refused: test_eps_prediction_with_zero_terminal_snr_...)
@pytest.mark.parametrize(
    "kind, zero_snr",
    [
        ("epsilon", False),
        ("v_prediction", False),
        ("sample", False),
        ("v_prediction", True),
        ("sample", True),
    ],
)
def test_conversions_match_diffusers_ddim(kind, zero_snr):
    """x0 and the DDIM step of every prediction type equal DDIMScheduler.step's (eta 0), at t = 999 too."""
    config = {
        "prediction_type": kind,
        "clip_sample": False,
        "set_alpha_to_one": False,
        "timestep_spacing": "trailing",
        "rescale_betas_zero_snr": zero_snr,
    }
    ddim = DDIMScheduler(**config)
    ddim.set_timesteps(4)  # trailing: 999 749 499 249
    schedule = NoiseSchedule(ddim.alphas_cumprod.double())
    g = torch.Generator().manual_seed(0)
    for t_i, t_prev in ((999, 749), (499, 249)):
        x = torch.randn(2, 4, 8, 8, generator=g)
        out = torch.randn(2, 4, 8, 8, generator=g)
        ref = ddim.step(out, t_i, x, eta=0.0)
        t = torch.full((2,), t_i)
        a_t, sigma_t = schedule.a_sigma(t, x)
        eps, x0 = to_eps_x0(out, x, a_t, sigma_t, kind)
        torch.testing.assert_close(x0, ref.pred_original_sample, rtol=1e-5, atol=1e-5)
        a_p, sigma_p = schedule.a_sigma(torch.full((2,), t_prev), x)
        torch.testing.assert_close(
            ddim_jump(x, eps, a_t, sigma_t, a_p, sigma_p, x0=x0), ref.prev_sample, rtol=1e-5, atol=1e-5
        )


def test_v_and_x0_round_trip_with_diffusers_velocity():
    """v of diffusers' get_velocity (v = a eps - sigma x0) and x0 itself give back the true (eps, x0)."""
    ddpm = DDPMScheduler(prediction_type="v_prediction")
    schedule = NoiseSchedule(ddpm.alphas_cumprod.double())
    g = torch.Generator().manual_seed(1)
    x0, noise = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    t = torch.tensor([999, 500, 3])
    x_t, v = ddpm.add_noise(x0, noise, t), ddpm.get_velocity(x0, noise, t)
    a_t, sigma_t = schedule.a_sigma(t, x0)
    for kind, out in (("v_prediction", v), ("sample", x0), ("epsilon", noise)):
        eps, x0_hat = to_eps_x0(out, x_t, a_t, sigma_t, kind)
        torch.testing.assert_close(eps, noise, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(x0_hat, x0, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "config",
    [
        {},
        {"rescale_betas_zero_snr": True},
        {"beta_schedule": "squaredcos_cap_v2"},
        {"beta_schedule": "linear", "beta_start": 1e-4, "beta_end": 0.02},
    ],
    ids=["scaled_linear", "zero_snr", "cosine", "linear"],
)
def test_training_and_tdd_scheduler_schedules_equal_the_base_scheduler(config):
    base = DDPMScheduler(
        **{
            "beta_start": 0.00085,
            "beta_end": 0.012,
            "beta_schedule": "scaled_linear",
            "prediction_type": "v_prediction",
            **config,
        }
    )
    ref = base.alphas_cumprod.double()
    assert (alphas_cumprod_from_config(base.config) - ref).abs().max() < 1e-6
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # DDPM's leading spacing: warned by name, tested below
        tdd = TDDScheduler.from_config(base.config)
    assert (tdd.alphas_cumprod.double() - ref).abs().max() < 1e-6
    if config.get("rescale_betas_zero_snr"):
        assert float(tdd.alphas_cumprod[-1]) == 0.0 and tdd.config.rescale_betas_zero_snr
        before = TDDScheduler(prediction_type="v_prediction").alphas_cumprod  # what from_config used to give
        assert (tdd.alphas_cumprod - before).abs().max() > 0.03


def test_eps_prediction_with_zero_terminal_snr_is_refused(sd15_dir):
    with pytest.raises(ValueError, match="zero-terminal-SNR"):
        TDDScheduler(rescale_betas_zero_snr=True)
    m = make_module(sd15_dir)
    config = {**DDPMScheduler().config, "rescale_betas_zero_snr": True, "prediction_type": "epsilon"}
    with pytest.raises(ConfigError, match="prediction_type.*zero-terminal-SNR"):
        m.attach(load_sd15_components(sd15_dir, load_vae=False, load_text_encoders=False).unet, config)


def test_scheduler_keys_tdd_cannot_honour_warn_by_name():
    config = {**DDIMScheduler(timestep_spacing="linspace").config, "use_karras_sigmas": True}
    with pytest.warns(UserWarning) as record:
        sched = TDDScheduler.from_config(config)
    messages = " | ".join(str(w.message) for w in record)
    assert "use_karras_sigmas=True" in messages and "timestep_spacing='linspace'" in messages
    assert sched.config.timestep_spacing == "trailing"
    with pytest.raises(ValueError, match="trailing"):
        TDDScheduler(timestep_spacing="leading")
    with pytest.raises(ValueError, match="beta_schedule='sigmoid'"):
        TDDScheduler(beta_schedule="sigmoid")


# ---- the SD1.5 family -------------------------------------------------------------------------------
def test_tiny_sd15_pipeline_from_configs_through_the_real_loader(sd15_dir):
    parts = get_family("sd15").load(sd15_dir)
    pipe = parts.to_pipeline()
    assert isinstance(pipe, StableDiffusionPipeline) and pipe.vae_scale_factor == 8
    assert parts.unet.config.addition_embed_type is None and parts.unet.config.cross_attention_dim == 32
    enc = SD15Encoder.from_pretrained(sd15_dir)
    with torch.no_grad():
        ref, _ = pipe.encode_prompt(PROMPTS, "cpu", 1, do_classifier_free_guidance=False)
    text = enc.encode_captions(PROMPTS)
    assert list(text) == ["prompt_embeds"] and SD15.text_shapes(sd15_dir) == {"prompt_embeds": (77, 32)}
    torch.testing.assert_close(text["prompt_embeds"], ref, rtol=0, atol=0)
    again = load_sd15_components(sd15_dir).unet.state_dict()
    assert all(torch.equal(v, again[k]) for k, v in parts.unet.state_dict().items())


def test_a_unet_of_another_family_is_refused_naming_the_right_one(tiny_sdxl_dir, sd15_dir):
    sdxl_unet = load_sd15_components(tiny_sdxl_dir, load_vae=False, load_text_encoders=False).unet
    with pytest.raises(UserError, match="model.family=sd15 expects.*'text_time': set model.family=sdxl"):
        make_module(tiny_sdxl_dir).attach(sdxl_unet, DDPMScheduler().config)
    sd15_unet = load_sd15_components(sd15_dir, load_vae=False, load_text_encoders=False).unet
    with pytest.raises(UserError, match="set model.family=sd15"):
        make_module(sd15_dir, family="sdxl").attach(sd15_unet, DDPMScheduler().config)


def test_sd15_ignores_geometry_and_names_what_a_batch_lacks():
    sizes = torch.tensor([[512.0, 768.0]])
    assert SD15.geometry(sizes, torch.zeros(1, 2), (512, 512)) == {}
    sdxl = get_family("sdxl")
    assert sdxl.geometry(sizes, torch.tensor([[3.0, 4.0]]), (512, 512))["time_ids"].tolist() == [
        [512, 768, 3, 4, 512, 512]
    ]
    with pytest.raises(MissingConditionError, match="model.family=sdxl needs.*another model family"):
        sdxl.condition_from_batch({"latents": torch.zeros(1), "prompt_embeds": torch.zeros(1)})


def make_kwargs(pretrained, family="sd15", ema_decay=0.5, lr=2e-2, uncond="zeros"):
    return dict(
        model={"family": family, "pretrained": str(pretrained), "lora": {"rank": 4, "alpha": 8}},
        target_selection=TDDSelection(),
        guidance=DecoupledGuidance(uncond=uncond),
        loss=PseudoHuberLoss(),
        optimizer=functools.partial(torch.optim.AdamW, lr=lr),
        ema_decay=ema_decay,
    )


def make_module(pretrained, **kwargs):
    return TDDModule(**make_kwargs(pretrained, **kwargs))


def quiet_trainer(root, steps):
    return L.Trainer(
        max_steps=steps,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(root),
    )


def fit(module, pretrained, root, steps=4):
    trainer = quiet_trainer(root, steps)
    losses = []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(float(outputs["loss"]))

    trainer.callbacks.append(Record())
    trainer.fit(module, datamodule=SyntheticDataModule(str(pretrained), family="sd15", batch_size=4))
    return trainer, losses


@pytest.fixture(scope="module", params=["eps", "v_zero_snr"])
def trained(request, sd15_dir, sd15_v_dir, tmp_path_factory):
    """A few real training steps of the SD1.5 family (eps, and v-prediction with zero terminal SNR)."""
    folder = sd15_dir if request.param == "eps" else sd15_v_dir
    root = tmp_path_factory.mktemp(f"sd15-{request.param}")
    module = make_module(folder)
    trainer, losses = fit(module, folder, root)
    ckpt = root / "tdd.ckpt"
    trainer.save_checkpoint(ckpt)
    files = export_lora(ckpt, root / "lora")
    module.eval()
    return {"module": module, "files": files, "root": root, "dir": folder, "losses": losses}


def test_training_steps_are_finite_and_follow_the_prediction_type(trained):
    m = trained["module"]
    assert len(trained["losses"]) == 4 and all(torch.isfinite(torch.tensor(trained["losses"])))
    v = trained["dir"].name.startswith("tiny-sd15-v")
    assert m.prediction_type == ("v_prediction" if v else "epsilon")
    assert (m.schedule.terminal_abar == 0.0) == v
    assert m.hparams["model"]["family"] == "sd15"


def scaled_error(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp(min=1.0)).item()


@pytest.mark.parametrize("role", ["student", "target"])
def test_round_trip_in_a_stock_sd_pipeline(trained, role):
    """Stock StableDiffusionPipeline + exported file at scale 1 + TDDScheduler == the module's sampler."""
    module, folder = trained["module"], trained["dir"]
    parts = load_sd15_components(folder)
    pipe = parts.to_pipeline(scheduler=TDDScheduler.from_config(parts.noise_scheduler.config))
    pipe.set_progress_bar_config(disable=True)
    assert (
        pipe.scheduler.alphas_cumprod.double() - parts.noise_scheduler.alphas_cumprod.double()
    ).abs().max() < 1e-6
    pipe.load_lora_weights(str(trained["files"][role, "diffusers"]))
    cond = SD15.condition(SD15Encoder.from_components(parts).encode_captions(PROMPTS), {})
    x_T = torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(7))

    def theirs(**kw):
        g = torch.Generator().manual_seed(0)
        return pipe(prompt=PROMPTS, output_type="latent", generator=g, latents=x_T.clone(), **kw).images

    def ours(r=role, **kw):
        return module.sample_latents(
            cond, generator=torch.Generator().manual_seed(0), latents=x_T.clone(), role=r, **kw
        )

    mine = ours(num_steps=4, eta=0.0)
    stock = theirs(num_inference_steps=4, eta=0.0, guidance_scale=1.0)
    assert torch.isfinite(mine).all() and scaled_error(stock, mine) < 1e-6
    torch.testing.assert_close(stock, mine, rtol=1e-5, atol=1e-5)
    other = "target" if role == "student" else "student"
    assert scaled_error(ours(other, num_steps=4), mine) > 1e-4  # the EMA target differs from the student
    assert (
        scaled_error(theirs(num_inference_steps=8, eta=0.2, guidance_scale=1.0), ours(num_steps=8, eta=0.2))
        < 1e-6
    )


def test_metadata_names_the_family_and_load_tdd_pipeline_picks_its_pipeline(trained):
    meta = read_metadata(trained["files"]["student", "diffusers"])
    assert meta["family"] == "sd15" and meta["pipeline"] == "StableDiffusionPipeline"
    kohya = read_metadata(trained["files"]["student", "kohya"])
    assert kohya["family"] == "sd15" and trained["files"]["student", "kohya"].name == KOHYA_WEIGHT_NAME
    from safetensors import safe_open

    with safe_open(str(trained["files"]["student", "kohya"]), framework="pt") as f:
        assert f.metadata()["ss_base_model_version"] == "sd_v1"
    pipe = load_tdd_pipeline(trained["dir"], trained["root"] / "lora")
    assert type(pipe).__name__ == "StableDiffusionPipeline" and isinstance(pipe.scheduler, TDDScheduler)
    assert pipe.scheduler.config.prediction_type == trained["module"].prediction_type


def test_export_command_line_for_the_sd15_family(trained, tmp_path, capsys):
    from tdd_lightning.export import main

    assert main([str(trained["root"] / "tdd.ckpt"), "--out", str(tmp_path), "--role", "target"]) == 0
    assert read_metadata(tmp_path / "target" / "pytorch_lora_weights.safetensors")["family"] == "sd15"


def test_cached_sd15_shards_hold_latents_and_one_prompt_tensor(sd15_dir, tmp_path):
    """data.encode with the SD1.5 encoder: latents + prompt_embeds only, named in meta.json; the cached
    datamodule reads exactly those, and the module trains on them."""
    import json

    from tdd_lightning.data.datamodule import ShardDataModule
    from tdd_lightning.data.encode import encode_shards
    from tdd_lightning.data.shards import ShardWriter
    from tests.test_data import noise_image, png

    for s in range(2):
        with ShardWriter(tmp_path / "raw" / f"r-{s:06d}.tar") as w:
            for i in range(3):
                w.write(
                    f"{s}_{i}", {"png": png(noise_image(80, 64, seed=10 * s + i)), "txt": b"a red circle"}
                )
    meta = encode_shards(
        str(tmp_path / "raw" / "r-*.tar"),
        tmp_path / "cache",
        SD15Encoder.from_pretrained(sd15_dir),
        resolution=64,
        num_workers=0,
        progress=False,
    )
    assert meta["family"] == "sd15" and meta["tensors"] == ["latents", "prompt_embeds"]
    assert json.loads((tmp_path / "cache" / "meta.json").read_text())["tensor_shapes"] == {
        "prompt_embeds": [77, 32]
    }
    dm = ShardDataModule(str(tmp_path / "cache" / "*.tar"), mode="cached", batch_size=3, num_workers=0)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert sorted(k for k, v in batch.items() if isinstance(v, torch.Tensor)) == ["latents", "prompt_embeds"]
    assert batch["latents"].shape == (3, 4, 8, 8) and list(dm.uncond) == ["prompt_embeds"]
    m = make_module(sd15_dir, uncond="empty_prompt")
    quiet_trainer(tmp_path, 1).fit(m, datamodule=dm)
    assert torch.equal(m.uncond_text["prompt_embeds"], dm.uncond["prompt_embeds"])
    # raw mode: the module's SD1.5 encoder turns pixels + captions (geometry ignored) into the same batch
    raw = ShardDataModule(str(tmp_path / "raw" / "r-*.tar"), batch_size=3, num_workers=0, resolution=64)
    kwargs = make_kwargs(sd15_dir, uncond="empty_prompt")
    kwargs["model"]["load_encoders"] = True
    m = TDDModule(**kwargs)
    trainer = quiet_trainer(tmp_path, 1)
    trainer.fit(m, datamodule=raw)
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    online = m.encoder(next(iter(raw.train_dataloader())))
    assert sorted(k for k, v in online.items() if isinstance(v, torch.Tensor)) == ["latents", "prompt_embeds"]


def _losses(out_dir):
    rows = csv.DictReader((out_dir / "csv" / "version_0" / "metrics.csv").open())
    return {int(r["step"]): float(r["train/loss"]) for r in rows if r.get("train/loss")}


def test_smoke_run_of_sd15_tiny_trains_checkpoints_resumes_exactly_and_exports(sd15_dir, tmp_path):
    os.environ["TDD_ROOT"] = str(tmp_path)
    common = [
        "experiment=smoke",
        "model=sd15_tiny",
        f"model.pretrained={sd15_dir}",
        "trainer.log_every_n_steps=1",
        "callbacks.model_checkpoint.every_n_train_steps=3",
        "data.num_samples=32",
        "data.batch_size=4",
    ]
    train(
        compose_cfg(
            [*common, "trainer.max_steps=6", "callbacks.sample_grid.every_n_steps=6"], tmp_path / "full"
        )
    )
    assert list((tmp_path / "full" / "samples").glob("*.png"))  # the grid callback through the family
    train(
        compose_cfg([*common, "trainer.max_steps=3", "callbacks.sample_grid.prompts=[]"], tmp_path / "part")
    )
    ckpt = tmp_path / "part" / "checkpoints" / "last.ckpt"
    assert load_checkpoint(ckpt)["hyper_parameters"]["model"]["family"] == "sd15"
    resumed = [*common, "trainer.max_steps=6", f"ckpt_path={ckpt}", "callbacks.sample_grid.prompts=[]"]
    assert train(compose_cfg(resumed, tmp_path / "resumed"))["global_step"] == 6
    full, again = _losses(tmp_path / "full"), _losses(tmp_path / "resumed")
    assert sorted(again) == [3, 4, 5]
    for step in again:
        assert again[step] == pytest.approx(full[step], rel=1e-5, abs=1e-7), step
    exported = sorted(
        (tmp_path / "full" / "checkpoints").glob("*_lora/student/pytorch_lora_weights.safetensors")
    )
    assert exported and read_metadata(exported[-1])["family"] == "sd15"
