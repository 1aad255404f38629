"""The toy flow teacher: a tiny FLUX transformer trained with the rectified-flow objective.

Per step: x0 (packed VAE latents, ``(z - shift) * scale``), eps ~ N(0, I), sigma in (0, 1),
x_sigma = (1 - sigma) x0 + sigma eps, target v = eps - x0 (so dx/dsigma = v along the straight path),
loss = ||v_theta(x_sigma, sigma, c) - v||^2 (Liu et al. 2022; Lipman et al. 2022).
sigma = shift_mu(u) with u ~ logit-normal(0, 1) (SD3's choice, Esser et al. 2024) and
shift_mu(u) = e^mu u / (1 + (e^mu - 1) u), the scheduler's own time shift at this image size (mu = 0.5
at 16 tokens), so training puts its weight where the sampler's sigmas are. The transformer's timestep
input is sigma itself (FluxPipeline feeds ``t / 1000`` with t = 1000 sigma). With probability
``p_uncond`` the caption is replaced by the encoded empty prompt "", so true CFG against ""
works (no guidance embedding: ``guidance_embeds=False``).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch

from tdd_lightning.progress import progress_bar
from tdd_lightning.toy.teacher import ema_update
from tdd_lightning.toy.vae import cosine_lr


@dataclass
class FlowTeacherConfig:
    steps: int = 3000  # optimiser steps
    batch_size: int = 128
    lr: float = 5.0e-4  # AdamW, cosine decay to 0 after warmup
    warmup: int = 100
    weight_decay: float = 0.0
    p_uncond: float = 0.1  # caption dropout to the encoded "" (CFG)
    ema_decay: float = 0.995  # the shipped weights are the EMA
    logit_mean: float = 0.0  # u ~ sigmoid(N(logit_mean, logit_std^2))
    logit_std: float = 1.0
    mu: float = 0.5  # the time shift applied to u (the scheduler's mu at the training size)
    seed: int = 0


def time_shift(mu: float, s: torch.Tensor) -> torch.Tensor:
    """FLUX's exponential time shift e^mu s / (1 + (e^mu - 1) s) (= 1 / (1 + e^-mu (1/s - 1)))."""
    return math.exp(mu) * s / (1 + (math.exp(mu) - 1) * s)


def sample_sigmas(n: int, cfg: FlowTeacherConfig, generator: torch.Generator) -> torch.Tensor:
    u = torch.sigmoid(cfg.logit_mean + cfg.logit_std * torch.randn(n, generator=generator))
    return time_shift(cfg.mu, u)


@dataclass
class FlowCondition:
    """The text condition of a set of captions (FluxPipeline.encode_prompt's outputs), and the ids."""

    prompt_embeds: torch.Tensor  # [M, L, D_t5]
    pooled: torch.Tensor  # [M, D_clip]
    text_ids: torch.Tensor  # [L, 3]
    img_ids: torch.Tensor  # [tokens, 3]

    def select(self, j: torch.Tensor) -> dict[str, torch.Tensor]:
        """Transformer keyword arguments for captions ``j`` (a batch)."""
        return {
            "encoder_hidden_states": self.prompt_embeds[j],
            "pooled_projections": self.pooled[j],
            "txt_ids": self.text_ids,
            "img_ids": self.img_ids,
        }


def velocity(transformer, x: torch.Tensor, sigma: torch.Tensor, cond: dict) -> torch.Tensor:
    """v_theta(x_sigma, sigma, c) on packed latents [B, tokens, 4C]; ``sigma`` [B] in [0, 1]."""
    return transformer(hidden_states=x, timestep=sigma.to(x.dtype), return_dict=False, **cond)[0]


def train_flow_teacher(
    transformer,
    latents: torch.Tensor,
    caption_index: torch.Tensor,
    text: FlowCondition,
    empty: int,
    cfg: FlowTeacherConfig,
    progress: bool = True,
    log_every: int = 0,
):
    """Train ``transformer`` on packed latents [N, tokens, 4C]; sample i has caption ``caption_index[i]``
    (a row of ``text``), ``empty`` is the row of "" (the dropped caption). Returns (EMA copy, last loss
    (a running average)). ``log_every``: print the running loss every so many steps (stdout)."""
    g = torch.Generator().manual_seed(cfg.seed)
    ema = copy.deepcopy(transformer).requires_grad_(False)
    opt = torch.optim.AdamW(transformer.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine_lr(s, cfg.steps, cfg.warmup))
    transformer.train()
    bar = progress_bar(range(cfg.steps), desc="flow teacher", enabled=progress, mininterval=5)
    avg = None
    for step in bar:
        idx = torch.randint(0, latents.shape[0], (cfg.batch_size,), generator=g)
        x0 = latents[idx]
        drop = torch.rand(cfg.batch_size, generator=g) < cfg.p_uncond
        j = torch.where(drop, empty, caption_index[idx])
        sigma = sample_sigmas(cfg.batch_size, cfg, g)
        eps = torch.randn(x0.shape, generator=g)
        s = sigma[:, None, None]
        x_t = (1 - s) * x0 + s * eps
        loss = (velocity(transformer, x_t, sigma, text.select(j)) - (eps - x0)).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        ema_update(ema, transformer, min(cfg.ema_decay, (1 + step) / (10 + step)))
        avg = loss.item() if avg is None else 0.98 * avg + 0.02 * loss.item()
        bar.set_postfix(loss=f"{avg:.4f}", refresh=False)
        if log_every and (step + 1) % log_every == 0:
            print(f"step {step + 1}/{cfg.steps} loss {avg:.4f} lr {sched.get_last_lr()[0]:.2e}", flush=True)
    transformer.eval()
    return ema.eval(), avg
