"""The toy autoencoder: a small diffusers AutoencoderKL trained on shapes images (32x32x3 -> 4x8x8).

Loss (measured to work on this task; models/toy-teacher/README.md): L1 + L2 reconstruction of a
posterior sample plus a tiny KL weight, so the latent stays close to deterministic but bounded. The
scaling factor is 1 / std of the latent modes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tdd_lightning.progress import progress_bar
from tdd_lightning.toy.data import to_unit


@dataclass
class VAEConfig:
    block_out_channels: tuple[int, ...] = (32, 64, 64)  # 3 levels: downsampling factor 4
    latent_channels: int = 4
    norm_num_groups: int = 8
    steps: int = 3000  # optimiser steps
    batch_size: int = 64
    lr: float = 1.0e-3  # AdamW, cosine decay to 0 after warmup
    warmup: int = 100
    kl_weight: float = 1.0e-6
    crop: int = 16  # train on random crops of this side (fully convolutional; 4x cheaper than 32x32)
    seed: int = 0


def build_vae(cfg: VAEConfig):
    """A small AutoencoderKL (one layer per block, no mid-block attention) for 32x32 images."""
    from tdd_lightning.models.tiny import small_autoencoder

    return small_autoencoder(
        cfg.block_out_channels,
        cfg.latent_channels,
        cfg.norm_num_groups,
        sample_size=32,
        mid_block_attention=False,
    )


def cosine_lr(step: int, total: int, warmup: int) -> float:
    """Linear warmup then cosine decay to 0, as a multiplier of the base lr."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + torch.cos(torch.tensor(progress * torch.pi)).item())


def train_vae(vae, pixels: torch.Tensor, cfg: VAEConfig, progress: bool = True) -> dict:
    """Train ``vae`` in place on uint8 images [N, 3, H, W]; returns the last losses."""
    g = torch.Generator().manual_seed(cfg.seed)
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine_lr(s, cfg.steps, cfg.warmup))
    vae.train()
    bar = progress_bar(range(cfg.steps), desc="vae", enabled=progress, mininterval=5)
    stats = {}
    for _ in bar:
        idx = torch.randint(0, pixels.shape[0], (cfg.batch_size,), generator=g)
        top, left = torch.randint(0, pixels.shape[-1] - cfg.crop + 1, (2,), generator=g).tolist()
        x = to_unit(pixels[idx, :, top : top + cfg.crop, left : left + cfg.crop])
        dist = vae.encode(x).latent_dist
        z = dist.mean + dist.std * torch.randn(dist.mean.shape, generator=g)
        rec = vae.decode(z).sample
        l1, l2 = (rec - x).abs().mean(), (rec - x).pow(2).mean()
        kl = dist.kl().mean() / x[0].numel()
        loss = l1 + l2 + cfg.kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        stats = {"l1": l1.item(), "l2": l2.item(), "kl": kl.item()}
        bar.set_postfix(stats, refresh=False)
    vae.eval()
    return stats


@torch.no_grad()
def encode_modes(vae, pixels: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Unscaled latent modes of uint8 images [N, 3, H, W]."""
    out = [
        vae.encode(to_unit(pixels[i : i + batch_size])).latent_dist.mode()
        for i in range(0, len(pixels), batch_size)
    ]
    return torch.cat(out)


@torch.no_grad()
def psnr(vae, pixels: torch.Tensor, batch_size: int = 256) -> float:
    """Mean PSNR (dB, images in [0, 1]) of mode reconstructions."""
    vals = []
    for i in range(0, len(pixels), batch_size):
        x = to_unit(pixels[i : i + batch_size])
        rec = vae.decode(vae.encode(x).latent_dist.mode()).sample.clamp(-1, 1)
        mse = ((rec - x) / 2).pow(2).flatten(1).mean(1)
        vals.append(-10 * torch.log10(mse))
    return torch.cat(vals).mean().item()
