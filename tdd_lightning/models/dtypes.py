"""The dtype names used in configs and on command lines (fp32 | bf16 | fp16): one table for every tool."""

from __future__ import annotations

import torch

from tdd_lightning.errors import ConfigError

DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def dtype_from_name(name: str, key: str = "dtype") -> torch.dtype:
    """``torch.float32`` for ``"fp32"`` etc.; a ConfigError naming ``key`` for anything else."""
    if name not in DTYPES:
        raise ConfigError(key, name, f"choose one of {', '.join(DTYPES)}")
    return DTYPES[name]
