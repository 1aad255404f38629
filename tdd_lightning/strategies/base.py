"""Shared helpers for strategies: config validation and seeded uniform draws."""

from __future__ import annotations

import torch


class ConfigError(ValueError):
    """A config value outside its allowed range; ``key`` names it (the caller adds the group prefix)."""

    def __init__(self, key: str, value, allowed: str):
        self.key, self.value, self.allowed = key, value, allowed
        super().__init__(f"{key}={value!r} is invalid: {allowed}")

    def with_prefix(self, prefix: str) -> ConfigError:
        return ConfigError(f"{prefix}.{self.key}", self.value, self.allowed)


def check(ok: bool, key: str, value, allowed: str) -> None:
    if not ok:
        raise ConfigError(key, value, allowed)


def uniform(n: int, generator: torch.Generator | None, device: torch.device | str = "cpu") -> torch.Tensor:
    """u ~ U[0, 1) of shape [n], drawn on the generator's device then moved (reproducible on CPU)."""
    gen_device = generator.device if generator is not None else "cpu"
    return torch.rand(n, generator=generator, device=gen_device, dtype=torch.float64).to(device)


def randint(high: int, n: int, generator: torch.Generator | None, device="cpu") -> torch.Tensor:
    """j ~ U{0..high-1} of shape [n]."""
    gen_device = generator.device if generator is not None else "cpu"
    return torch.randint(0, high, (n,), generator=generator, device=gen_device).to(device)
