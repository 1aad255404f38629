"""LoRA export: the diffusers file reproduces the trained model in a stock SDXL pipeline with TDDScheduler;
the kohya file, the metadata, clear errors for broken checkpoints, atomic writes, the callback."""

import functools
import json
import re

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from tdd_lightning.checkpoint_io import load_checkpoint
from tdd_lightning.data.synthetic import SyntheticDataModule
from tdd_lightning.export import (
    DIFFUSERS_WEIGHT_NAME,
    KOHYA_WEIGHT_NAME,
    LORA_ADAPTER_METADATA_KEY,
    CheckpointError,
    export_lora,
    main,
    read_metadata,
)
from tdd_lightning.models import load_sdxl_components
from tdd_lightning.models.families.sdxl import unet_eps
from tdd_lightning.module import TDDModule
from tdd_lightning.pipelines import add_tdd_lora, load_tdd_pipeline, resolve_lora_file, tdd_scheduler
from tdd_lightning.scheduling_tdd import TDDScheduler
from tdd_lightning.strategies import DecoupledGuidance, PseudoHuberLoss, TDDSelection
from tdd_lightning.training.callbacks import LoRAExport

PROMPTS = ["a red circle", "a blue square"]
RANK = 4


def make_module(pretrained, alpha, ema_decay=0.5, lr=2e-2):
    return TDDModule(
        model={"pretrained": str(pretrained), "lora": {"rank": RANK, "alpha": alpha}},
        target_selection=TDDSelection(),
        guidance=DecoupledGuidance(),
        loss=PseudoHuberLoss(),
        optimizer=functools.partial(torch.optim.AdamW, lr=lr),
        ema_decay=ema_decay,
    )


def quiet_trainer(root, max_steps, callbacks=()):
    return L.Trainer(
        max_steps=max_steps,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks),
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(root),
        callbacks=list(callbacks),
    )


@pytest.fixture(scope="module", params=[8, 1], ids=["alpha8", "alpha1"])
def trained(request, tiny_sdxl_dir, tmp_path_factory):
    """A few real training steps (lr high enough that the LoRA matters), one checkpoint, one export.

    Rank 4 with alpha 8 (scale 2) and alpha 1 (scale 0.25): alpha != rank either way. EMA decay 0.5 makes
    the target differ from the student."""
    root = tmp_path_factory.mktemp(f"export-alpha{request.param}")
    module = make_module(tiny_sdxl_dir, alpha=request.param)
    trainer = quiet_trainer(root, max_steps=4)
    trainer.fit(module, datamodule=SyntheticDataModule(pretrained=str(tiny_sdxl_dir), batch_size=4))
    ckpt = root / "tdd.ckpt"
    trainer.save_checkpoint(ckpt)
    files = export_lora(ckpt, root / "lora")
    module.eval()
    return {"module": module, "ckpt": ckpt, "files": files, "alpha": request.param, "root": root}


def stock_pipeline(tiny_sdxl_dir):
    """A fresh stock StableDiffusionXLPipeline on the tiny model, with TDDScheduler from its config."""
    parts = load_sdxl_components(tiny_sdxl_dir)
    pipe = parts.to_pipeline(scheduler=TDDScheduler.from_config(parts.noise_scheduler.config))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def condition(pipe):
    """The module's condition for PROMPTS, encoded by the pipeline's own text encoders."""
    with torch.no_grad():
        pe, _, pooled, _ = pipe.encode_prompt(PROMPTS, device="cpu", do_classifier_free_guidance=False)
    side = pipe.default_sample_size * pipe.vae_scale_factor
    time_ids = torch.tensor([[side, side, 0, 0, side, side]] * len(PROMPTS), dtype=torch.float32)
    return {"prompt_embeds": pe, "pooled_prompt_embeds": pooled, "time_ids": time_ids}


def pipeline_latents(pipe, seed, latents=None, **kw):
    g = torch.Generator().manual_seed(seed)
    return pipe(prompt=PROMPTS, output_type="latent", generator=g, latents=latents, **kw).images


def module_latents(module, cond, seed, latents=None, **kw):
    return module.sample_latents(cond, generator=torch.Generator().manual_seed(seed), latents=latents, **kw)


def scaled_error(a, b):
    """max |a - b| over the latents' scale (the tiny random model's x0 reaches |x| ~ 50)."""
    return ((a - b).abs().max() / b.abs().max().clamp(min=1.0)).item()


# ---- the diffusers file ----------------------------------------------------------------------------
@pytest.mark.parametrize("role", ["student", "target"])
def test_diffusers_file_is_the_peft_state_dict(trained, role):
    from peft.utils import get_peft_model_state_dict

    ref = get_peft_model_state_dict(trained["module"].unet, adapter_name=role)
    path = trained["files"][role, "diffusers"]
    assert path.name == DIFFUSERS_WEIGHT_NAME
    exported = load_file(path)
    assert set(exported) == {f"unet.{k}" for k in ref}
    for k, v in ref.items():
        assert torch.equal(exported[f"unet.{k}"], v), k
    with safe_open(str(path), framework="pt") as f:
        adapter = json.loads(f.metadata()[LORA_ADAPTER_METADATA_KEY])
    trained_cfg = trained["module"].unet.peft_config[role]
    assert adapter["unet.r"] == trained_cfg.r == RANK
    assert adapter["unet.lora_alpha"] == trained_cfg.lora_alpha == trained["alpha"]
    assert set(adapter["unet.target_modules"]) == set(trained_cfg.target_modules)


@pytest.mark.parametrize("role", ["student", "target"])
def test_round_trip_in_a_stock_pipeline(trained, tiny_sdxl_dir, role):
    """Stock pipeline + exported file + TDDScheduler == the module's own sampler (eta 0, no CFG)."""
    module = trained["module"]
    pipe = stock_pipeline(tiny_sdxl_dir)
    cond = condition(pipe)
    x_T = torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(7))
    base = pipeline_latents(pipe, 0, x_T.clone(), num_inference_steps=4, eta=0.0, guidance_scale=1.0)

    pipe.load_lora_weights(str(trained["files"][role, "diffusers"]))  # scale 1.0, the default
    # one UNet call: the same eps up to float32 rounding (matmul kernels vary with memory alignment)
    t = torch.full((2,), 999)
    with torch.no_grad(), module.roles.role(role) as unet:
        torch.testing.assert_close(
            unet_eps(pipe.unet, x_T, t, cond), unet_eps(unet, x_T, t, cond), rtol=0, atol=1e-5
        )
    # the whole sampler: x0_hat reaches |x| ~ 50 on the random tiny model, so compare relative to that
    ours = module_latents(module, cond, 0, x_T.clone(), num_steps=4, eta=0.0, role=role)
    theirs = pipeline_latents(pipe, 0, x_T.clone(), num_inference_steps=4, eta=0.0, guidance_scale=1.0)
    assert scaled_error(theirs, ours) < 1e-6
    # elementwise too, with float32 rounding of values up to ~50 (2.2e-5 measured with diffusers 0.42.1)
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-4)
    # the LoRA matters: far from the base model, and the EMA target differs from the student
    assert scaled_error(base, ours) > 1e-2
    other = "target" if role == "student" else "student"
    assert scaled_error(module_latents(module, cond, 0, x_T.clone(), num_steps=4, role=other), ours) > 1e-4


def test_round_trip_eta_schedules_and_cfg(trained, tiny_sdxl_dir):
    """Through load_tdd_pipeline (what sample.py uses). Same seed, no given latents: eta > 0 draws the
    same noise; custom timesteps; CFG with u = zeros."""
    module = trained["module"]
    pipe = load_tdd_pipeline(tiny_sdxl_dir, trained["root"] / "lora")  # the folder: resolves to the student
    assert isinstance(pipe.scheduler, TDDScheduler) and not pipe.scheduler.config.clip_sample
    cond = condition(pipe)

    ours = module_latents(module, cond, 3, num_steps=8, eta=0.2)
    theirs = pipeline_latents(pipe, 3, num_inference_steps=8, eta=0.2, guidance_scale=1.0)
    assert scaled_error(theirs, ours) < 1e-6

    steps = [999, 875, 751, 627, 499, 251]  # the non-equidistant K = 6 schedule
    ours = module_latents(module, cond, 4, timesteps=steps, eta=0.1)
    theirs = pipeline_latents(pipe, 4, timesteps=steps, eta=0.1, guidance_scale=1.0)
    assert scaled_error(theirs, ours) < 1e-6

    # CFG: the pipeline batches [u, c] in one forward, the module runs two: equal up to float rounding
    ours = module_latents(module, cond, 5, num_steps=4, eta=0.0, guidance_scale=2.0)
    theirs = pipeline_latents(pipe, 5, num_inference_steps=4, eta=0.0, guidance_scale=2.0)
    assert scaled_error(theirs, ours) < 1e-5


def test_without_adapter_metadata_the_scale_is_wrong(trained, tiny_sdxl_dir, tmp_path):
    """The trap the metadata avoids (docs/export_and_sampling.md): dropped, diffusers assumes alpha = rank."""
    src = trained["files"]["student", "diffusers"]
    with safe_open(str(src), framework="pt") as f:
        meta = {k: v for k, v in f.metadata().items() if k != LORA_ADAPTER_METADATA_KEY}
    stripped = tmp_path / DIFFUSERS_WEIGHT_NAME
    save_file(load_file(src), stripped, metadata=meta)

    pipe = stock_pipeline(tiny_sdxl_dir)
    cond = condition(pipe)
    pipe.load_lora_weights(str(stripped))
    ours = module_latents(trained["module"], cond, 0, num_steps=4)
    theirs = pipeline_latents(pipe, 0, num_inference_steps=4, guidance_scale=1.0)
    assert scaled_error(theirs, ours) > 1e-3


# ---- the kohya file --------------------------------------------------------------------------------
def test_kohya_file(trained, tiny_sdxl_dir):
    diffusers = load_file(trained["files"]["student", "diffusers"])
    path = trained["files"]["student", "kohya"]
    assert path.name == KOHYA_WEIGHT_NAME
    kohya = load_file(path)
    modules = {k[len("unet.") : -len(".lora_A.weight")] for k in diffusers if k.endswith(".lora_A.weight")}
    assert len(kohya) == 3 * len(modules)
    for module in modules:
        name = "lora_unet_" + module.replace(".", "_")
        assert re.fullmatch(r"lora_unet_[A-Za-z0-9_]+", name)
        down, up = kohya[f"{name}.lora_down.weight"], kohya[f"{name}.lora_up.weight"]
        assert torch.equal(down, diffusers[f"unet.{module}.lora_A.weight"])
        assert torch.equal(up, diffusers[f"unet.{module}.lora_B.weight"])
        assert down.shape[0] == RANK and up.shape[1] == RANK
        assert kohya[f"{name}.alpha"].ndim == 0 and kohya[f"{name}.alpha"].item() == trained["alpha"]
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    assert meta["ss_network_dim"] == str(RANK) and float(meta["ss_network_alpha"]) == trained["alpha"]
    assert meta["ss_network_module"] == "networks.lora" and meta["tdd.scheduler"] == "TDDScheduler"

    # diffusers' own kohya converter reads it back to the same model (a cross-check of names and alpha)
    pipe = stock_pipeline(tiny_sdxl_dir)
    cond = condition(pipe)
    pipe.load_lora_weights(str(path))
    ours = module_latents(trained["module"], cond, 0, num_steps=4)
    theirs = pipeline_latents(pipe, 0, num_inference_steps=4, guidance_scale=1.0)
    assert scaled_error(theirs, ours) < 1e-6


# ---- metadata, command, errors, atomic writes ------------------------------------------------------
def test_metadata(trained):
    for (role, _fmt), path in trained["files"].items():
        meta = read_metadata(path)
        assert meta["role"] == role
        assert meta["lora.rank"] == RANK and meta["lora.alpha"] == trained["alpha"]
        assert "to_q" in meta["lora.target_modules"] and "time_emb_proj" in meta["lora.target_modules"]
        assert meta["scheduler"] == "TDDScheduler"
        assert meta["scheduler_config"] == {
            "num_teacher_steps": 250,
            "k_min": 4,
            "k_max": 8,
            "trained_s_ratio": 0.3,
            "eta": 0.2,
        }
        assert meta["recommended"] == {"num_inference_steps": 4, "eta": 0.2, "guidance_scale": 1.7}
        assert meta["target_selection"] == TDDSelection().describe()  # name tdd, N 250, K 4..8, W 260, ...
        assert meta["guidance"]["p_empty"] == 0.2 and meta["uncond"] == "zeros"
        assert meta["global_step"] == 4 and meta["ema_decay"] == 0.5
    scheduler = tdd_scheduler(TDDScheduler().config, meta, eta=0.1)
    assert (scheduler.config.k_min, scheduler.config.k_max, scheduler.config.eta) == (4, 8, 0.1)


def test_checkpoint_without_a_recorded_schedule_exports_the_same(trained, tmp_path):
    """Checkpoints written before TDDModule recorded the inference schedule: the same metadata, derived
    from the strategy descriptions they hold."""
    ckpt = load_checkpoint(trained["ckpt"])
    hp = ckpt["hyper_parameters"]
    assert hp["inference_schedule"]["k_min"] == 4 and hp["recommended_guidance_scale"] == 1.7
    del hp["inference_schedule"], hp["recommended_guidance_scale"]
    old = export_lora(ckpt, tmp_path, roles="student", formats="diffusers")["student", "diffusers"]
    assert read_metadata(old) == read_metadata(trained["files"]["student", "diffusers"])


def test_scheduler_from_a_pipeline_config_keeps_only_its_real_values(tiny_components, trained):
    """The tiny pipeline's scheduler is a DDPMScheduler whose clip_sample=True is only its class default
    (not in the saved file): TDDScheduler must not inherit it (it would clamp x0 to [-1, 1])."""
    config = tiny_components.noise_scheduler.config
    assert config.clip_sample and "clip_sample" in config._use_default_values
    scheduler = tdd_scheduler(config, read_metadata(trained["files"]["target", "kohya"]))
    assert not scheduler.config.clip_sample and scheduler.config.beta_schedule == "scaled_linear"
    assert scheduler.config.trained_s_ratio == 0.3


def test_add_tdd_lora_with_a_scale(trained, tiny_sdxl_dir):
    """lora_scale 0 gives back the base model; a LoRA trained with u = zeros keeps zero negatives."""
    pipe = stock_pipeline(tiny_sdxl_dir)
    base = pipeline_latents(pipe, 0, num_inference_steps=4, guidance_scale=1.0)
    meta = add_tdd_lora(pipe, trained["files"]["student", "diffusers"], scale=0.0)
    assert meta["role"] == "student" and pipe.config.force_zeros_for_empty_prompt
    torch.testing.assert_close(pipeline_latents(pipe, 0, num_inference_steps=4, guidance_scale=1.0), base)


def test_command_line(trained, tmp_path, capsys):
    assert main([str(trained["ckpt"]), "--out", str(tmp_path), "--role", "target", "--format", "kohya"]) == 0
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*.safetensors")) == [
        f"target/{KOHYA_WEIGHT_NAME}"
    ]
    assert "target" in capsys.readouterr().out
    # a folder of exports resolves to the student's diffusers file
    assert resolve_lora_file(trained["root"] / "lora") == trained["files"]["student", "diffusers"]


@pytest.mark.parametrize("damage", ["truncated", "empty", "missing", "garbage"])
def test_broken_checkpoint_gives_a_clear_error(trained, tmp_path, capsys, damage):
    data = trained["ckpt"].read_bytes()
    bad = tmp_path / "bad.ckpt"
    if damage == "truncated":
        bad.write_bytes(data[: len(data) // 2])
    elif damage == "empty":
        bad.write_bytes(b"")
    elif damage == "garbage":
        bad.write_bytes(b"not a checkpoint" * 100)
    with pytest.raises(CheckpointError, match="does not exist" if damage == "missing" else "bad.ckpt"):
        export_lora(bad, tmp_path / "out")
    assert main([str(bad), "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: checkpoint") and "\n" not in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_atomic_write_leaves_no_temp_file(trained, tmp_path, monkeypatch):
    out = tmp_path / "lora"
    export_lora(trained["ckpt"], out, roles="student", formats="diffusers")
    final = out / "student" / DIFFUSERS_WEIGHT_NAME
    before = final.read_bytes()
    assert [p.name for p in (out / "student").iterdir()] == [DIFFUSERS_WEIGHT_NAME]

    import safetensors.torch

    def failing_save(tensors, filename, metadata=None):  # dies half-way through the write
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", failing_save)
    with pytest.raises(OSError, match="disk full"):
        export_lora(trained["ckpt"], out, roles="student", formats="diffusers")
    assert [p.name for p in (out / "student").iterdir()] == [DIFFUSERS_WEIGHT_NAME]
    assert final.read_bytes() == before


# ---- the callback ----------------------------------------------------------------------------------
def test_callback_exports_beside_each_checkpoint(tiny_sdxl_dir, tmp_path):
    ckpt_dir = tmp_path / "checkpoints"
    checkpoint = ModelCheckpoint(
        dirpath=ckpt_dir,
        filename="step_{step:03.0f}",
        auto_insert_metric_name=False,
        every_n_train_steps=2,
        save_top_k=1,
        monitor="step",
        mode="max",
        save_last=True,
    )
    export = LoRAExport()
    trainer = quiet_trainer(tmp_path, max_steps=4, callbacks=[checkpoint, export])
    trainer.fit(make_module(tiny_sdxl_dir, alpha=8), SyntheticDataModule(str(tiny_sdxl_dir), batch_size=4))

    ckpts = sorted(p.name for p in ckpt_dir.glob("*.ckpt"))
    assert ckpts == ["last.ckpt", "step_004.ckpt"]  # step_002 was rotated out by save_top_k=1 ...
    assert not (ckpt_dir / "step_002_lora").exists()  # ... and its LoRA folder with it
    assert (ckpt_dir / "step_002_lora") in export.exported
    for name in ckpts:
        folder = ckpt_dir / name.replace(".ckpt", "_lora")
        files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
        assert files == [
            f"{r}/{f}" for r in ("student", "target") for f in (KOHYA_WEIGHT_NAME, DIFFUSERS_WEIGHT_NAME)
        ]
        # what the command exports from the saved file, tensor for tensor
        again = export_lora(ckpt_dir / name, tmp_path / "again" / name, roles="target", formats="diffusers")
        a, b = load_file(folder / "target" / DIFFUSERS_WEIGHT_NAME), load_file(again["target", "diffusers"])
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert trainer.strategy.checkpoint_io is not export._wrapped  # the strategy's IO is restored
