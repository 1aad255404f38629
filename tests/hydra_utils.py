"""Compose the real configs with Hydra's compose API, with the hydra node set like a real run."""

from __future__ import annotations

from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import open_dict

from tdd_lightning.training import resolvers

resolvers.register()
CONF = Path(__file__).resolve().parents[1] / "conf"


def compose_cfg(overrides: list[str], output_dir: Path | None = None):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=overrides, return_hydra_config=True)
    if output_dir is not None:
        with open_dict(cfg):
            cfg.hydra.runtime.output_dir = str(output_dir)
    HydraConfig.instance().set_config(cfg)
    return cfg


def group_options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def smoke_overrides(tiny_sdxl_dir, *extra: str, num_samples: int = 8) -> list[str]:
    """A 2-step smoke run of the tiny model (checkpoint at step 2, no grid, no LoRA export) + ``extra``."""
    return [
        "experiment=smoke", f"model.pretrained={tiny_sdxl_dir}", "model.build_if_missing=false",
        "data.batch_size=2", f"data.num_samples={num_samples}", "trainer.max_steps=2", "logger=csv",
        "callbacks.sample_grid.every_n_steps=100", "callbacks.model_checkpoint.every_n_train_steps=2",
        "~callbacks.lora_export", *extra,
    ]  # fmt: skip
