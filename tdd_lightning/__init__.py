"""tdd_lightning: Target-Driven Distillation of SDXL into a few-step LoRA (Lightning + Hydra)."""

__version__ = "0.1.0"
