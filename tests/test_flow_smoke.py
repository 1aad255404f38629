"""``experiment=smoke model=flux_tiny`` (true CFG) and ``model=flux_tiny_dev guidance=embedded``: train,
sample grids through the family (VAE shift factor), checkpoint, resume exactly and export."""

import os

import pytest

from tdd_lightning.checkpoint_io import load_checkpoint
from tdd_lightning.export import read_metadata
from tdd_lightning.models.families.flux import build_tiny_flux_dev
from tdd_lightning.models.flux_tiny import build_tiny_flux
from tdd_lightning.training.run import train
from tests.hydra_utils import compose_cfg
from tests.test_families import _losses


@pytest.mark.parametrize("variant", ["flux_tiny", pytest.param("flux_tiny_dev", marks=pytest.mark.slow)])
def test_smoke_run_of_flux_tiny_trains_checkpoints_resumes_exactly_and_exports(variant, tmp_path):
    os.environ["TDD_ROOT"] = str(tmp_path)
    folder = (build_tiny_flux if variant == "flux_tiny" else build_tiny_flux_dev)(tmp_path / "model")
    common = [
        "experiment=smoke",
        f"model={variant}",
        f"model.pretrained={folder}",
        "trainer.log_every_n_steps=1",
        "callbacks.model_checkpoint.every_n_train_steps=3",
        "data.num_samples=32",
        "data.batch_size=4",
    ]
    if variant == "flux_tiny_dev":
        common += ["guidance=embedded", "guidance.w_min=0.0", "guidance.w_max=3.0", "guidance.p_empty=0.2"]
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
    hp = load_checkpoint(ckpt)["hyper_parameters"]
    assert hp["model"]["family"] == "flux" and hp["noise_schedule"]["type"] == "dynamic"
    resumed = [*common, "trainer.max_steps=6", f"ckpt_path={ckpt}", "callbacks.sample_grid.prompts=[]"]
    assert train(compose_cfg(resumed, tmp_path / "resumed"))["global_step"] == 6
    full, again = _losses(tmp_path / "full"), _losses(tmp_path / "resumed")
    assert sorted(again) == [3, 4, 5]
    for step in again:
        assert again[step] == pytest.approx(full[step], rel=1e-5, abs=1e-7), step
    exported = sorted(
        (tmp_path / "full" / "checkpoints").glob("*_lora/student/pytorch_lora_weights.safetensors")
    )
    meta = read_metadata(exported[-1])
    assert meta["family"] == "flux" and meta["scheduler"] == "TDDFlowScheduler"
    assert meta["guidance_strategy"] == ("embedded" if variant == "flux_tiny_dev" else "decoupled")
