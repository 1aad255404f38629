"""OmegaConf resolvers used by conf/ (registered by train.py before Hydra composes)."""

from __future__ import annotations

import re

from omegaconf import OmegaConf


def safe_dirname(text: str, max_len: int = 120) -> str:
    """One folder name from a config value (task_name, a sweep job's overrides): no path separators,
    quotes or spaces, no leading dots (so never ``.`` or ``..``); bounded length."""
    name = re.sub(r"[/\\\s\[\]'\"{}:*?<>|]+", "_", str(text)).strip("_")
    name = name.lstrip(".")
    return name[:max_len] or "default"


def cfg_scale(w: float | None) -> float:
    """The standard CFG scale 1 + w of a guidance weight w in the LCM form (None, no guidance: 1.0).

    ``${cfg_scale:${guidance.w}}``: the toy evaluation samples the teacher at the scale the student
    was distilled from.
    """
    return 1.0 + float(w or 0.0)


RESOLVERS = {"safe_dirname": safe_dirname, "cfg_scale": cfg_scale}


def register() -> None:
    for name, fn in RESOLVERS.items():
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)
