"""Random models are built only where that is safe (issue 14, item 3): never over a user's files, never at
a path spelled like a hub id, only under the project's folders or into an empty folder."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from tdd_lightning.errors import UserError
from tdd_lightning.models.loading import is_hub_id
from tdd_lightning.training.run import BUILT_MARKER, prepare_model

BUILDER = "tests.test_random_models.fake_builder"


def fake_builder(path):
    """Stands in for build_tiny_sdxl: writes what the loader checks for."""
    for sub in ("unet", "scheduler", "vae", "text_encoder"):
        (path / sub).mkdir(parents=True, exist_ok=True)
        (path / sub / "config.json").write_text("{}")


def cfg(pretrained):
    return OmegaConf.create({"pretrained": str(pretrained), "build_if_missing": True, "builder": BUILDER})


def test_a_partial_user_folder_is_never_overwritten(tmp_path):
    user = tmp_path / "sdxl-copy"
    (user / "vae").mkdir(parents=True)
    (user / "vae" / "diffusion_pytorch_model.safetensors").write_bytes(b"precious")
    with pytest.raises(
        UserError, match=r"holds files but no unet/: refusing to build a random model into it"
    ):
        prepare_model(cfg(user), owned=[str(tmp_path)])
    assert (user / "vae" / "diffusion_pytorch_model.safetensors").read_bytes() == b"precious"
    assert not (user / "unet").exists()


def test_a_hub_id_never_becomes_a_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match="is a hub id: random models are built only into local folders"):
        prepare_model(cfg("stabilityai/stable-diffusion-xl-base-1.0"), owned=[str(tmp_path)])
    assert not (tmp_path / "stabilityai").exists()
    assert is_hub_id("org/name") and not is_hub_id("/abs/org/name") and not is_hub_id("./org/name")


def test_a_missing_folder_outside_the_project_is_a_typo_not_a_build(tmp_path):
    with pytest.raises(UserError, match="does not exist; a random model is built only under the project"):
        prepare_model(cfg(tmp_path / "elsewhere" / "typo"), owned=[str(tmp_path / "artifacts")])
    assert not (tmp_path / "elsewhere").exists()


def test_builds_under_the_project_into_an_empty_folder_and_again_into_its_own(tmp_path):
    owned = tmp_path / "artifacts"
    prepare_model(cfg(owned / "tiny"), owned=[str(owned)])
    assert (owned / "tiny" / "unet").is_dir() and (owned / "tiny" / BUILT_MARKER).is_file()
    empty = tmp_path / "mine"
    empty.mkdir()
    prepare_model(cfg(empty), owned=[str(owned)])  # an empty folder the user made: fine
    assert (empty / "unet").is_dir()
    import shutil

    shutil.rmtree(owned / "tiny" / "unet")  # a half-built folder of ours is rebuilt
    prepare_model(cfg(owned / "tiny"), owned=[str(owned)])
    assert (owned / "tiny" / "unet").is_dir()
