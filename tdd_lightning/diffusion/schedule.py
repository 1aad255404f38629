"""The teacher's noise schedule: abar_t, a_t = sqrt(abar_t), sigma_t = sqrt(1 - abar_t)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from tdd_lightning.diffusion.ops import append_dims


def alphas_cumprod_from_config(config: Mapping[str, Any]) -> torch.Tensor:
    """abar_t for t = 0..T-1 from a diffusers scheduler config (float64).

    Supports the beta schedules SD/SDXL use: ``linear`` and ``scaled_linear``
    (SDXL: scaled_linear, beta 0.00085 -> 0.012, T = 1000; note abar_0 = 0.99915, not 1).
    """
    T = int(config.get("num_train_timesteps", 1000))
    beta_start = float(config.get("beta_start", 0.00085))
    beta_end = float(config.get("beta_end", 0.012))
    kind = config.get("beta_schedule", "scaled_linear")
    if config.get("trained_betas") is not None:
        betas = torch.as_tensor(config["trained_betas"], dtype=torch.float64)
    elif kind == "scaled_linear":
        betas = torch.linspace(beta_start**0.5, beta_end**0.5, T, dtype=torch.float64) ** 2
    elif kind == "linear":
        betas = torch.linspace(beta_start, beta_end, T, dtype=torch.float64)
    else:
        raise ValueError(f"beta_schedule={kind!r} is not supported (use 'linear' or 'scaled_linear')")
    return torch.cumprod(1.0 - betas, dim=0)


class NoiseSchedule(torch.nn.Module):
    """Lookup of a_t and sigma_t at integer timesteps, broadcast to a sample's shape.

    Kept as buffers so it follows the module to the right device; computed in float64 and
    returned in the caller's dtype.
    """

    def __init__(self, alphas_cumprod: torch.Tensor):
        super().__init__()
        abar = alphas_cumprod.to(torch.float64)
        self.register_buffer("alphas_cumprod", abar, persistent=False)
        self.register_buffer("a", abar.sqrt().float(), persistent=False)
        self.register_buffer("sigma", (1.0 - abar).sqrt().float(), persistent=False)

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> NoiseSchedule:
        return cls(alphas_cumprod_from_config(config))

    @property
    def num_train_timesteps(self) -> int:
        return int(self.alphas_cumprod.shape[0])

    def a_sigma(self, t: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(a_t, sigma_t) for integer timesteps t of shape [B], shaped [B, 1, ..., 1] like ``like``."""
        t = t.long().to(self.a.device)
        a = append_dims(self.a[t].to(like.device, like.dtype), like.ndim)
        sigma = append_dims(self.sigma[t].to(like.device, like.dtype), like.ndim)
        return a, sigma
