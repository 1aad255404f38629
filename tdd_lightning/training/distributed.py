"""Strategy factories that need Python objects Hydra cannot write in YAML (classes to wrap)."""

from __future__ import annotations

import importlib
from collections.abc import Sequence


def import_class(path: str) -> type:
    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def fsdp_strategy(wrap_classes: Sequence[str], sharding_strategy: str = "FULL_SHARD", **kwargs):
    """Lightning FSDPStrategy wrapping each listed module class; ``use_orig_params`` for frozen + LoRA."""
    from lightning.pytorch.strategies import FSDPStrategy

    policy = {import_class(c) for c in wrap_classes}
    return FSDPStrategy(
        auto_wrap_policy=policy, sharding_strategy=sharding_strategy, use_orig_params=True, **kwargs
    )
