"""Model loading (local folder or hub id), the tiny SDXL-shaped factory, and LoRA roles."""

from tdd_lightning.models.loading import ModelNotFoundError, SDXLComponents, load_sdxl_components

__all__ = ["ModelNotFoundError", "SDXLComponents", "load_sdxl_components"]
