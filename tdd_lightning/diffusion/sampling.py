"""Few-step sampling with a distilled model: DDIM jumps on a schedule, with eta (gamma) re-noising.

The reference the TDDScheduler (and TDDFlowScheduler) is tested against (ALGORITHM.md sections 4 and 8):
at step i predict x0_hat at t_i, jump to s_{i+1} = floor((1 - eta) t_{i+1}); if eta > 0 re-noise from
s_{i+1} to t_{i+1}. The last step returns x0_hat. Guidance, if any, is standard CFG:
eps_u + g (eps_c - eps_u).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from tdd_lightning.diffusion.flow import FlowSchedule
from tdd_lightning.diffusion.ops import ddim_jump, x0_to_eps
from tdd_lightning.diffusion.prediction import to_eps_x0
from tdd_lightning.diffusion.schedule import NoiseSchedule

EpsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
NoiseFn = Callable[[torch.Tensor, torch.Generator | None], torch.Tensor]
ClipFn = Callable[[int, torch.Tensor], torch.Tensor]  # (step index, x0_hat) -> x0_hat, maybe clipped


def tdd_sample(
    eps_fn: EpsFn,
    x_T: torch.Tensor,
    timesteps: Sequence[int],
    schedule: NoiseSchedule | FlowSchedule,
    eta: float = 0.0,
    generator: torch.Generator | None = None,
    prediction_type: str = "epsilon",
    randn: NoiseFn | None = None,
    clip_x0: ClipFn | None = None,
) -> torch.Tensor:
    """Run the K steps of ``timesteps`` (descending) from noise ``x_T``; returns x0_hat.

    ``eps_fn`` returns the model output, of ``prediction_type`` (converted once per step to eps, x0).
    ``schedule``: a ``NoiseSchedule`` or a ``FlowSchedule`` (the same interface). ``randn(x, generator)``
    draws the re-noising noise (None: ``gaussian_like``; a flow family draws it in its packed token layout,
    as its pipeline's scheduler sees the latents). ``clip_x0(i, x0_hat)`` clips x0_hat at step i (e.g.
    ``TDDScheduler.clip_x0``: only during its first ``clip_steps`` steps); a clipped x0_hat gives eps
    again from x_t, as the scheduler's step does."""
    x = x_T
    B = x.shape[0]
    for i, t_i in enumerate(timesteps):
        t = torch.full((B,), int(t_i), dtype=torch.long, device=x.device)
        a_t, sigma_t = schedule.a_sigma(t, x)
        eps, x0 = to_eps_x0(eps_fn(x, t), x, a_t, sigma_t, prediction_type)
        if clip_x0 is not None:
            clipped = clip_x0(i, x0)
            if clipped is not x0:
                x0, eps = clipped, x0_to_eps(x, clipped, a_t, sigma_t)
        if i == len(timesteps) - 1:
            return x0
        t_next = int(timesteps[i + 1])
        s_next = int((1.0 - eta) * t_next)
        s = torch.full_like(t, s_next)
        a_s, sigma_s = schedule.a_sigma(s, x)
        x = ddim_jump(x, eps, a_t, sigma_t, a_s, sigma_s, x0=x0)
        if eta > 0 and s_next < t_next:
            z = randn(x, generator) if randn is not None else gaussian_like(x, generator)
            x = schedule.renoise(x, t_next, s_next, z)
    return x


def gaussian_like(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Standard normal noise of x's shape, device and dtype (the re-noising draw)."""
    return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)


def guided(eps_fn_cond: EpsFn, eps_fn_uncond: EpsFn | None, guidance_scale: float) -> EpsFn:
    """Standard CFG on top of a distilled model (g = 1: the conditional prediction alone)."""
    if eps_fn_uncond is None or guidance_scale == 1.0:
        return eps_fn_cond

    def eps_fn(x, t):
        eps_c, eps_u = eps_fn_cond(x, t), eps_fn_uncond(x, t)
        return eps_u + guidance_scale * (eps_c - eps_u)

    return eps_fn
