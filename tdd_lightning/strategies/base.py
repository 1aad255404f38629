"""Shared helpers for strategies: config checks (``tdd_lightning.errors``) and seeded uniform draws."""

from __future__ import annotations

import torch

from tdd_lightning.errors import ConfigError, check

__all__ = ["ConfigError", "check", "randint", "uniform"]


def uniform(n: int, generator: torch.Generator | None, device: torch.device | str = "cpu") -> torch.Tensor:
    """u ~ U[0, 1) of shape [n], drawn on the generator's device then moved (reproducible on CPU)."""
    gen_device = generator.device if generator is not None else "cpu"
    return torch.rand(n, generator=generator, device=gen_device, dtype=torch.float64).to(device)


def randint(high: int, n: int, generator: torch.Generator | None, device="cpu") -> torch.Tensor:
    """j ~ U{0..high-1} of shape [n]."""
    gen_device = generator.device if generator is not None else "cpu"
    return torch.randint(0, high, (n,), generator=generator, device=gen_device).to(device)
