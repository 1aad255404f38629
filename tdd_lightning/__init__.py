"""tdd_lightning: Target-Driven Distillation (SDXL, SD1.5, SD2.x) into few-step LoRAs (Lightning + Hydra)."""

__version__ = "0.1.0"
