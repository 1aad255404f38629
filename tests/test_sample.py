"""sample.py: a stock SDXL pipeline + an exported LoRA + TDDScheduler writes PNGs and a labelled grid."""

import functools
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from PIL import Image

from tdd_lightning.errors import UserError
from tdd_lightning.export import export_lora
from tdd_lightning.module import TDDModule
from tdd_lightning.strategies import DecoupledGuidance, PseudoHuberLoss, TDDSelection

ROOT = Path(__file__).resolve().parents[1]


def load_sample_app():
    import tdd_lightning.sample as app

    return app


@pytest.fixture(scope="module")
def lora_dir(tiny_sdxl_dir, tmp_path_factory):
    """An export of a non-trivial LoRA (random lora_B) from a checkpoint dict, without training."""
    module = TDDModule(
        model={"pretrained": str(tiny_sdxl_dir), "lora": {"rank": 4, "alpha": 8}},
        target_selection=TDDSelection(),
        guidance=DecoupledGuidance(),
        loss=PseudoHuberLoss(),
        optimizer=functools.partial(torch.optim.AdamW, lr=1e-3),
    )
    module.configure_model()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in module.roles.student_params:
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    module.roles.copy_student_to_target()
    state = {k: v for k, v in module.state_dict().items() if "lora_" in k}
    out = tmp_path_factory.mktemp("sample-lora")
    export_lora({"state_dict": state, "hyper_parameters": dict(module.hparams)}, out, formats="diffusers")
    return out


def compose_sample(overrides):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("sample", overrides=overrides)


def test_sample_writes_pngs_and_a_labelled_grid(lora_dir, tmp_path):
    out = tmp_path / "samples"
    cfg = compose_sample(
        [f"lora={lora_dir / 'student'}", f"out_dir={out}", "steps=[2,4]", "eta=[0,0.2]", "batch=2", "cell=64"]
    )
    grid_path = load_sample_app().run(cfg)  # base: the model recorded in the LoRA's metadata

    assert grid_path == out / "grid.png"
    rows, columns, title_h = 2 * 2, 2 * 2, 18  # (prompts x batch) x (steps x eta)
    width, height = Image.open(grid_path).size
    assert height == title_h + 64 * rows and width >= 120 + 64 * columns  # a label column, then the cells
    pngs = sorted((out / "images").glob("*.png"))
    assert len(pngs) == rows * columns
    assert Image.open(pngs[0]).size == (64, 64)  # the tiny model's 8x8 latents
    record = json.loads((out / "samples.json").read_text())
    assert record["lora"].endswith("pytorch_lora_weights.safetensors") and len(record["images"]) == 16
    assert {(r["steps"], r["eta"], r["guidance_scale"]) for r in record["images"]} == {
        (k, e, 1.7) for k in (2, 4) for e in (0.0, 0.2)
    }


def test_same_seed_same_images_and_prompt_file(lora_dir, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n\na green triangle\n")
    app = load_sample_app()
    outs = []
    for name in ("a", "b"):
        cfg = compose_sample(
            [f"lora={lora_dir}", f"out_dir={tmp_path / name}", f"prompt_file={prompts}", "steps=4", "cell=32"]
        )
        app.run(cfg)
        outs.append(sorted((tmp_path / name / "images").glob("*.png")))
    assert [p.name for p in outs[0]] == ["p00_b0_k4_eta0.2_g1.7.png", "p01_b0_k4_eta0.2_g1.7.png"]
    assert all(a.read_bytes() == b.read_bytes() for a, b in zip(*outs, strict=True))


@pytest.mark.parametrize(
    "overrides, message",
    [
        ([], "lora: give an exported LoRA"),
        (["lora=/no/such/lora.safetensors"], "lora: LoRA /no/such/lora.safetensors does not exist"),
        (["lora=null", "base=/no/such/base"], "base: model folder /no/such/base does not exist"),
        (["lora=null"], "base: give the base model"),
    ],
    ids=["no-lora", "missing-lora", "missing-base", "no-base"],
)
def test_missing_inputs_are_user_errors(tmp_path, overrides, message):
    app = load_sample_app()
    with pytest.raises(UserError, match=re.escape(message)):
        app.run(compose_sample([*overrides, f"out_dir={tmp_path}"]))


def test_command_line_error_is_one_line(tmp_path):
    """`python sample.py` with a missing LoRA: exit code 1 and one line on stderr, no stack trace."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="offline", TDD_ROOT=str(tmp_path))
    result = subprocess.run(
        [sys.executable, str(ROOT / "sample.py"), "lora=/no/such/lora.safetensors"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=120,
    )
    assert result.returncode == 1
    assert result.stderr.strip() == (
        "error: lora: LoRA /no/such/lora.safetensors does not exist "
        "(give an exported .safetensors file or its folder)"
    )
    assert "Traceback" not in result.stdout


def test_one_setting_for_grids_and_toy_cells():
    from dataclasses import asdict

    from tdd_lightning.pipelines import Setting, settings_grid

    grid, varying = settings_grid([4, 8], 0.2, [1.0, 1.5])
    assert [(s.steps, s.eta, s.guidance, s.seed) for s in grid] == [
        (4, 0.2, 1.0, 0), (4, 0.2, 1.5, 0), (8, 0.2, 1.0, 0), (8, 0.2, 1.5, 0),
    ]  # fmt: skip
    assert varying == ["steps", "guidance"]
    assert grid[1].title(varying) == "4 steps, g 1.5" and grid[1].title() == "4 steps, eta 0.2, g 1.5"
    assert grid[1].slug() == "k4_eta0.2_g1.5"
    assert settings_grid(4, 0.0, 1.0)[1] == ["steps", "eta", "guidance"]  # nothing varies: all named
    # the toy evaluation's cells (and its teacher-cache keys) are the same dataclass and fields
    assert asdict(Setting(50, 0.0, 2.0, 3)) == {"steps": 50, "eta": 0.0, "guidance": 2.0, "seed": 3}
    assert Setting(4, 0.2, 1.0) == Setting(4, 0.2, 1.0, 0) != Setting(4, 0.2, 1.0, 1)


def test_an_sd15_lora_samples_in_the_sd_pipeline(tiny_sd15_dir, tmp_path):
    """The LoRA's tdd.family picks StableDiffusionPipeline; the base comes from its metadata."""
    module = TDDModule(
        model={"family": "sd15", "pretrained": str(tiny_sd15_dir), "lora": {"rank": 4}},
        target_selection=TDDSelection(),
        guidance=DecoupledGuidance(uncond="empty_prompt"),
        loss=PseudoHuberLoss(),
        optimizer=functools.partial(torch.optim.AdamW, lr=1e-3),
    )
    module.configure_model()
    state = {k: v for k, v in module.state_dict().items() if "lora_" in k}
    export_lora({"state_dict": state, "hyper_parameters": dict(module.hparams)}, tmp_path / "lora")
    out = tmp_path / "samples"
    cfg = compose_sample([f"lora={tmp_path / 'lora'}", f"out_dir={out}", "steps=2", "cell=64"])
    assert load_sample_app().run(cfg) == out / "grid.png"
    assert Image.open(sorted((out / "images").glob("*.png"))[0]).size == (64, 64)
    bad = compose_sample([f"lora={tmp_path / 'lora'}", f"out_dir={out}", "family=sd3"])
    with pytest.raises(UserError, match="family='sd3' is invalid"):
        load_sample_app().run(bad)
