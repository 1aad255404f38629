"""The toy teacher: an SDXL-shaped UNet trained as an ordinary eps-prediction diffusion model.

Per step: x0 (VAE latents, scaled) from the data, t ~ U{0..T-1}, eps ~ N(0, I),
x_t = a_t x0 + sigma_t eps, loss = ||eps_theta(x_t, t, c) - eps||^2 (DDPM, Ho et al. 2020, eq. 14).
With probability ``p_uncond`` the text condition is replaced by zeros (the project's
``guidance.uncond=zeros`` convention), so classifier-free guidance works (Ho & Salimans 2022).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from tdd_lightning.diffusion import NoiseSchedule, append_dims
from tdd_lightning.models.families.sdxl import SDXL
from tdd_lightning.progress import progress_bar
from tdd_lightning.toy.vae import cosine_lr


@dataclass
class TeacherConfig:
    block_out_channels: tuple[int, ...] = (64, 96, 128)
    attention_head_dim: tuple[int, ...] = (4, 6, 8)  # heads per level (diffusers' naming)
    steps: int = 2000  # optimiser steps
    batch_size: int = 128
    lr: float = 6.0e-4  # AdamW, cosine decay to 0 after warmup
    warmup: int = 50
    weight_decay: float = 0.0
    p_uncond: float = 0.1  # caption dropout to the zeros condition (CFG)
    ema_decay: float = 0.995  # the shipped weights are the EMA
    seed: int = 0


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    for e, p in zip(ema.parameters(), model.parameters(), strict=True):
        e.lerp_(p, 1.0 - decay)


def train_teacher(
    unet,
    latents: torch.Tensor,
    caption_index: torch.Tensor,
    text: dict[str, torch.Tensor],
    geometry: dict[str, torch.Tensor],
    schedule: NoiseSchedule,
    cfg: TeacherConfig,
    progress: bool = True,
):
    """Train ``unet`` (an SDXL-family UNet) on scaled latents [N, C, h, w]; sample i has caption
    ``caption_index[i]`` whose text parts are ``text[k][j]``; ``geometry``: the other condition parts of
    one image ([1, ...], the same for all). Returns (EMA copy of the UNet, last loss)."""
    g = torch.Generator().manual_seed(cfg.seed)
    ema = copy.deepcopy(unet).requires_grad_(False)
    opt = torch.optim.AdamW(unet.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine_lr(s, cfg.steps, cfg.warmup))
    unet.train()
    T = schedule.num_train_timesteps
    bar = progress_bar(range(cfg.steps), desc="teacher", enabled=progress, mininterval=5)
    avg = None
    for step in bar:
        idx = torch.randint(0, latents.shape[0], (cfg.batch_size,), generator=g)
        x0, j = latents[idx], caption_index[idx]
        keep = (torch.rand(cfg.batch_size, generator=g) >= cfg.p_uncond).float()
        cond = {k: v[j] * append_dims(keep, v.ndim) for k, v in text.items()}
        cond.update({k: v.expand(cfg.batch_size, *v.shape[1:]) for k, v in geometry.items()})
        t = torch.randint(0, T, (cfg.batch_size,), generator=g)
        eps = torch.randn(x0.shape, generator=g)
        a_t, sigma_t = schedule.a_sigma(t, x0)
        loss = (SDXL.denoise(unet, a_t * x0 + sigma_t * eps, t, cond) - eps).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        ema_update(ema, unet, min(cfg.ema_decay, (1 + step) / (10 + step)))
        avg = loss.item() if avg is None else 0.98 * avg + 0.02 * loss.item()
        bar.set_postfix(loss=f"{avg:.4f}", refresh=False)
    unet.eval()
    return ema.eval(), avg
