"""Model families (``model.family``): SDXL, SD1.5 / SD2.x and FLUX, behind ``ModelFamily`` (base.py)."""

from __future__ import annotations

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


__all__ = ["DEFAULT_FAMILY", "FAMILIES", "LORA_TARGETS", "MissingConditionError", "ModelFamily", "get_family"]
