"""Forward process, eps <-> x0, the DDIM jump, LCM boundary scalings and CFG (ALGORITHM.md 2-5).

Every function takes a and sigma already broadcast to the sample (see NoiseSchedule.a_sigma), so
the formulas read like the paper.
"""

from __future__ import annotations

import torch


def append_dims(x: torch.Tensor, ndim: int) -> torch.Tensor:
    """``x`` with trailing singleton dimensions up to ``ndim``: a per-sample [B] value -> [B, 1, ..., 1],
    so it broadcasts against a sample batch [B, C, H, W] (a view, no copy)."""
    if x.ndim > ndim:
        raise ValueError(f"cannot append dimensions to a {x.ndim}-d tensor to make it {ndim}-d")
    return x.view(*x.shape, *(1,) * (ndim - x.ndim))


def add_noise(x0: torch.Tensor, eps: torch.Tensor, a_t: torch.Tensor, sigma_t: torch.Tensor) -> torch.Tensor:
    """x_t = a_t x0 + sigma_t eps."""
    return a_t * x0 + sigma_t * eps


def eps_to_x0(x_t: torch.Tensor, eps: torch.Tensor, a_t: torch.Tensor, sigma_t: torch.Tensor) -> torch.Tensor:
    """x0_hat = (x_t - sigma_t eps) / a_t."""
    return (x_t - sigma_t * eps) / a_t


def x0_to_eps(x_t: torch.Tensor, x0: torch.Tensor, a_t: torch.Tensor, sigma_t: torch.Tensor) -> torch.Tensor:
    """eps = (x_t - a_t x0) / sigma_t."""
    return (x_t - a_t * x0) / sigma_t


def ddim_jump(
    x_t: torch.Tensor,
    eps: torch.Tensor,
    a_t: torch.Tensor,
    sigma_t: torch.Tensor,
    a_s: torch.Tensor,
    sigma_s: torch.Tensor,
    x0: torch.Tensor | None = None,
) -> torch.Tensor:
    """Deterministic DDIM (eta = 0) from t straight to any s: a_s x0_hat + sigma_s eps.

    ``x0``: x0_hat when the model gave it (``prediction.to_eps_x0``); None: (x_t - sigma_t eps) / a_t."""
    if x0 is None:
        x0 = eps_to_x0(x_t, eps, a_t, sigma_t)
    return a_s * x0 + sigma_s * eps


def boundary_scalings(
    t: torch.Tensor, sigma_data: float = 0.5, timestep_scaling: float = 10.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """LCM's c_skip(t), c_out(t) (Luo et al. 2023, after Song et al. 2023 eq. 8): c_skip(0)=1, c_out(0)=0."""
    scaled = t.double() * timestep_scaling
    c_skip = sigma_data**2 / (scaled**2 + sigma_data**2)
    c_out = scaled / (scaled**2 + sigma_data**2).sqrt()
    return c_skip.float(), c_out.float()


def lcm_consistency(
    x_t: torch.Tensor,
    eps: torch.Tensor,
    a_t: torch.Tensor,
    sigma_t: torch.Tensor,
    c_skip: torch.Tensor,
    c_out: torch.Tensor,
    x0: torch.Tensor | None = None,
) -> torch.Tensor:
    """LCM consistency function f(x_t, t) = c_skip(t) x_t + c_out(t) x0_hat (maps to time 0)."""
    if x0 is None:
        x0 = eps_to_x0(x_t, eps, a_t, sigma_t)
    return c_skip * x_t + c_out * x0


def cfg_combine(cond: torch.Tensor, uncond: torch.Tensor, w: torch.Tensor | float) -> torch.Tensor:
    """Classifier-free guidance in the LCM form: cond + w (cond - uncond). w = 0 gives cond.

    Equal to standard CFG uncond + g (cond - uncond) with g = 1 + w.
    """
    return cond + w * (cond - uncond)
