"""Model families (``model.family``): SDXL, SD1.5 / SD2.x and FLUX, behind ``ModelFamily`` (base.py)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from tdd_lightning.errors import ConfigError
from tdd_lightning.models.families.base import LORA_TARGETS, MissingConditionError, ModelFamily
from tdd_lightning.models.families.flux import FLUX
from tdd_lightning.models.families.sd15 import SD15
from tdd_lightning.models.families.sdxl import SDXL

FAMILIES: dict[str, ModelFamily] = {"sdxl": SDXL, "sd15": SD15, "flux": FLUX}
DEFAULT_FAMILY = "sdxl"  # what checkpoints and LoRA files without a recorded family were


def get_family(name: str | None) -> ModelFamily:
    """The family called ``name`` (None: the default, SDXL); a ConfigError naming ``model.family`` else."""
    name = DEFAULT_FAMILY if name is None else name
    if name not in FAMILIES:
        raise ConfigError("model.family", name, f"choose one of {', '.join(FAMILIES)}")
    return FAMILIES[name]


def family_of_folder(folder: str | os.PathLike) -> str | None:
    """The family whose stock pipeline a local diffusers folder's ``model_index.json`` names (SD2.x's
    StableDiffusionPipeline is ``sd15``); None when the folder has no index or names another pipeline."""
    index = Path(folder, "model_index.json")
    if not index.is_file():
        return None
    name = json.loads(index.read_text()).get("_class_name", "")
    return next((k for k, f in FAMILIES.items() if f.pipeline_class == name), None)


__all__ = [
    "DEFAULT_FAMILY",
    "FAMILIES",
    "LORA_TARGETS",
    "MissingConditionError",
    "ModelFamily",
    "family_of_folder",
    "get_family",
]
