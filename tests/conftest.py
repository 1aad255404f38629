"""Shared fixtures: offline flags, and one tiny SDXL-shaped pipeline per test session."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# OpenMP threads that spin while waiting stall 2-thread torch 30-100x when other processes share the
# cores (measured here); passive waiting costs nothing when the machine is free.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def tiny_sdxl_dir(tmp_path_factory):
    """A tiny random SDXL pipeline written with save_pretrained (loaded back through the real loader)."""
    from tdd_lightning.models.tiny import build_tiny_sdxl

    return build_tiny_sdxl(tmp_path_factory.mktemp("tiny-sdxl"))


@pytest.fixture(scope="session")
def tiny_sd15_dir(tmp_path_factory):
    """A tiny random SD1.5-shaped pipeline (eps prediction) written with save_pretrained."""
    from tdd_lightning.models.tiny import build_tiny_sd15

    return build_tiny_sd15(tmp_path_factory.mktemp("tiny-sd15"))


@pytest.fixture(scope="session")
def tiny_flux_dev_dir(tmp_path_factory):
    """A tiny random FLUX.1-dev-shaped pipeline (guidance-distilled) written with save_pretrained."""
    from tdd_lightning.models.families.flux import build_tiny_flux_dev

    return build_tiny_flux_dev(tmp_path_factory.mktemp("tiny-flux-dev"))


@pytest.fixture(scope="session")
def tiny_components(tiny_sdxl_dir):
    from tdd_lightning.models import load_sdxl_components

    return load_sdxl_components(tiny_sdxl_dir)


@pytest.fixture(scope="session")
def synthetic_batch4(tiny_sdxl_dir):
    """One batch of 4 synthetic cached samples of the tiny SDXL pipeline."""
    from tdd_lightning.data.synthetic import SyntheticDataModule

    dm = SyntheticDataModule(str(tiny_sdxl_dir), num_samples=4, batch_size=4)
    dm.setup()
    return next(iter(dm.train_dataloader()))


@pytest.fixture(autouse=True)
def _restore_tdd_root():
    """Tests point TDD_ROOT at their tmp folders; put it back so later subprocesses see the repository."""
    before = os.environ.get("TDD_ROOT")
    yield
    if before is None:
        os.environ.pop("TDD_ROOT", None)
    else:
        os.environ["TDD_ROOT"] = before
