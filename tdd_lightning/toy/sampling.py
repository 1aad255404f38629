"""Sampling toy models: K-step DDIM/TDD jumps (eta re-noising), CFG against the zeros condition, decode."""

from __future__ import annotations

import torch

from tdd_lightning.diffusion import NoiseSchedule
from tdd_lightning.diffusion.sampling import guided, tdd_sample
from tdd_lightning.diffusion.timesteps import trailing_timesteps as trailing_timesteps  # re-exported
from tdd_lightning.toy.data import to_uint8

IMAGE_SIZE = 32


@torch.no_grad()
def encode_prompts(components, captions: list[str]) -> dict[str, torch.Tensor]:
    """The conditions of ``captions`` (float32, time ids of a 32x32 uncropped image)."""
    from tdd_lightning.models.encoder import SDXLEncoder

    enc = SDXLEncoder(
        components.vae,
        components.text_encoder,
        components.text_encoder_2,
        components.tokenizer,
        components.tokenizer_2,
    )
    embeds, pooled = enc.encode_text(captions)
    time_ids = torch.tensor([[IMAGE_SIZE, IMAGE_SIZE, 0, 0, IMAGE_SIZE, IMAGE_SIZE]], dtype=torch.float32)
    return {
        "prompt_embeds": embeds,
        "pooled_prompt_embeds": pooled,
        "time_ids": time_ids.expand(len(captions), -1),
    }


def initial_noise(n: int, seed: int, channels: int = 4, side: int = IMAGE_SIZE // 4) -> torch.Tensor:
    """x_T for n samples, a function of the seed only (so every sampler starts from the same noise)."""
    return torch.randn(n, channels, side, side, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def sample_images(
    unet,
    vae,
    cond: dict[str, torch.Tensor],
    x_T: torch.Tensor,
    timesteps: list[int],
    guidance: float,
    schedule: NoiseSchedule,
    batch_size: int = 250,
    eta: float = 0.0,
    seed: int = 0,
) -> torch.Tensor:
    """uint8 images [N, 3, 32, 32]: ``tdd_sample`` on ``timesteps`` (eta 0: DDIM) with CFG ``guidance``,
    then decode (images on the CPU). The re-noising draws (eta > 0) come from ``seed``, so a cell is
    reproducible."""
    from tdd_lightning.models.conditioning import unet_eps

    out = []
    generator = torch.Generator(device=x_T.device).manual_seed(seed)
    for i in range(0, len(x_T), batch_size):
        c = {k: v[i : i + batch_size] for k, v in cond.items()}
        u = {k: (v if k == "time_ids" else torch.zeros_like(v)) for k, v in c.items()}
        both = {k: torch.cat([c[k], u[k]]) for k in c}

        def eps_batched(x, t, both=both):
            eps_c, eps_u = unet_eps(unet, torch.cat([x, x]), torch.cat([t, t]), both).chunk(2)
            return eps_u + guidance * (eps_c - eps_u)

        def eps_cond(x, t, c=c):
            return unet_eps(unet, x, t, c)

        eps_fn = guided(eps_cond, None, 1.0) if guidance == 1.0 else eps_batched
        x0 = tdd_sample(eps_fn, x_T[i : i + batch_size], timesteps, schedule, eta=eta, generator=generator)
        out.append(to_uint8(vae.decode(x0 / vae.config.scaling_factor).sample).cpu())
    return torch.cat(out)
