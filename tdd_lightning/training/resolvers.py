"""OmegaConf resolvers used by conf/ (registered by train.py before Hydra composes)."""

from __future__ import annotations

import re

from omegaconf import OmegaConf


def safe_dirname(text: str, max_len: int = 120) -> str:
    """A sweep job's folder name from its overrides: no path separators, quotes or spaces; bounded length."""
    name = re.sub(r"[/\\\s\[\]'\"{}:*?<>|]+", "_", text).strip("_")
    return name[:max_len] or "default"


def register() -> None:
    if not OmegaConf.has_resolver("safe_dirname"):
        OmegaConf.register_new_resolver("safe_dirname", safe_dirname)
