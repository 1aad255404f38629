"""Model families (loading from a folder or hub id, tiny factories, conditions), and LoRA roles."""

from tdd_lightning.models.families import FAMILIES, get_family
from tdd_lightning.models.families.sd15 import SD15Components, load_sd15_components
from tdd_lightning.models.families.sdxl import SDXLComponents, load_sdxl_components
from tdd_lightning.models.loading import ModelNotFoundError

__all__ = [
    "FAMILIES",
    "ModelNotFoundError",
    "SD15Components",
    "SDXLComponents",
    "get_family",
    "load_sd15_components",
    "load_sdxl_components",
]
