"""The teacher's noise schedule: abar_t, a_t = sqrt(abar_t), sigma_t = sqrt(1 - abar_t)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import torch

from tdd_lightning.diffusion.ops import append_dims

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
# diffusers' timestep_spacing values; TDD's grid g_j = (T/N) j - 1 always ends at T-1: "trailing"
TIMESTEP_SPACINGS = ("linspace", "leading", "trailing")
# scheduler config keys that do not change TDD's training or sampling (other samplers' own knobs at
# the values that make them inert, or bookkeeping); any other key TDD does not read is reported by name
INERT_KEYS = {
    "steps_offset": None,  # only shifts 'leading' spacing, which TDD does not use
    "set_alpha_to_one": None,  # DDIM's final-step alpha: TDD's last step returns x0_hat
    "skip_prk_steps": None,
    "variance_type": None,  # DDPM's stochastic variance: TDD's jumps are deterministic DDIM
    "final_sigmas_type": None,
    "sigma_min": None,
    "sigma_max": None,
    "timestep_type": "discrete",
    "interpolation_type": "linear",
    "use_karras_sigmas": False,
    "use_exponential_sigmas": False,
    "use_beta_sigmas": False,
    "use_flow_sigmas": False,
}


def cosine_betas(T: int, max_beta: float = 0.999) -> torch.Tensor:
    """``squaredcos_cap_v2`` (Nichol & Dhariwal 2021): beta_t = min(1 - abar(t+1)/abar(t), max_beta) with
    abar(t) = cos^2(((t/T) + 0.008) / 1.008 * pi/2), as diffusers' ``betas_for_alpha_bar``."""

    def abar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    return torch.tensor(
        [min(1 - abar((i + 1) / T) / abar(i / T), max_beta) for i in range(T)], dtype=torch.float64
    )


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Lin et al. 2024, Algorithm 1: shift and scale sqrt(abar) so abar_{T-1} = 0 and abar_0 is kept."""
    root = torch.cumprod(1.0 - betas, dim=0).sqrt()
    first, last = root[0].clone(), root[-1].clone()
    root = (root - last) * (first / (first - last))
    abar = root**2
    alphas = torch.cat([abar[:1], abar[1:] / abar[:-1]])
    return 1.0 - alphas


def alphas_cumprod_from_config(config: Mapping[str, Any]) -> torch.Tensor:
    """abar_t for t = 0..T-1 from a diffusers scheduler config (float64).

    Beta schedules ``linear``, ``scaled_linear`` (SDXL and SD1.5: beta 0.00085 -> 0.012, T = 1000; note
    abar_0 = 0.99915, not 1), ``squaredcos_cap_v2`` (cosine) or ``trained_betas``; then
    ``rescale_betas_zero_snr`` (abar_{T-1} = 0) when set. Anything else is a ValueError naming the key.
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
    elif kind == "squaredcos_cap_v2":
        betas = cosine_betas(T)
    else:
        raise ValueError(f"beta_schedule={kind!r} is not supported (use one of {', '.join(BETA_SCHEDULES)})")
    if config.get("rescale_betas_zero_snr", False):
        betas = rescale_zero_terminal_snr(betas)
    return torch.cumprod(1.0 - betas, dim=0)


def unhonoured_keys(config: Mapping[str, Any], known: Iterable[str]) -> list[str]:
    """One message per key of a scheduler ``config`` that TDD cannot honour (neither in ``known``, the keys
    the caller reads, nor inert at its value), naming the key; ``timestep_spacing`` other than trailing."""
    known = set(known)
    out = []
    spacing = config.get("timestep_spacing", "trailing")
    if spacing != "trailing":
        out.append(
            f"timestep_spacing={spacing!r} is not used: TDD's timesteps are its training grid, which "
            "starts at T-1 like 'trailing'"
        )
    for key, value in config.items():
        if key.startswith("_") or key in known or key == "timestep_spacing":
            continue
        if key in INERT_KEYS and INERT_KEYS[key] in (None, value):
            continue
        out.append(f"{key}={value!r} is not honoured by TDD (ignored)")
    return out


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
    def terminal_abar(self) -> float:
        """abar_{T-1}: 0 for a zero-terminal-SNR schedule."""
        return float(self.alphas_cumprod[-1])

    @property
    def num_train_timesteps(self) -> int:
        return int(self.alphas_cumprod.shape[0])

    def a_sigma(self, t: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(a_t, sigma_t) for integer timesteps t of shape [B], shaped [B, 1, ..., 1] like ``like``."""
        t = t.long().to(self.a.device)
        a = append_dims(self.a[t].to(like.device, like.dtype), like.ndim)
        sigma = append_dims(self.sigma[t].to(like.device, like.dtype), like.ndim)
        return a, sigma

    def renoise(self, x: torch.Tensor, t: int, s: int, z: torch.Tensor) -> torch.Tensor:
        """x at s re-noised to the noisier t with noise z:
        sqrt(abar_t / abar_s) x + sqrt(1 - abar_t / abar_s) z (the ratio in float64, applied in x's dtype)."""
        ratio = (self.alphas_cumprod[t] / self.alphas_cumprod[s]).to(x.dtype)
        return ratio.sqrt() * x + (1 - ratio).sqrt() * z

    def model_time(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """The timestep the denoiser is given for t: the integer timestep itself (a UNet's)."""
        return t
