"""Sampling toy models: K-step DDIM/TDD jumps (eta re-noising), standard CFG, decode.

Family-neutral: the UNet toy teacher (SDXL family, eps-prediction, CFG against the zeros condition) and the
flow toy teacher (FLUX family, v = eps - x0 on a ``FlowSchedule``, CFG against the encoded "") go through
the same ``tdd_sample``; on a flow schedule at eta 0 its jumps are exactly Euler steps between the
schedule's sigmas (ALGORITHM.md section 8), so a teacher's "DDIM" cells are its Euler cells there."""

from __future__ import annotations

import hashlib

import torch

from tdd_lightning.diffusion import FlowSchedule, NoiseSchedule
from tdd_lightning.diffusion.sampling import tdd_sample
from tdd_lightning.diffusion.timesteps import trailing_timesteps as trailing_timesteps  # re-exported
from tdd_lightning.models.w_conditioning import as_w_input
from tdd_lightning.progress import progress_bar
from tdd_lightning.toy.data import to_uint8

IMAGE_SIZE = 32


@torch.no_grad()
def encode_prompts(components, captions: list[str], family=None) -> dict[str, torch.Tensor]:
    """The conditions of ``captions`` (float32) for ``family`` (None: SDXL, the UNet toy teacher's; its
    geometry parts are those of a 32x32 uncropped image; FLUX has none)."""
    from tdd_lightning.models.families.sdxl import SDXL

    family = family or SDXL
    text = family.encoder(components).encode_captions(captions)
    return family.condition(text, family.square_geometry(IMAGE_SIZE, len(captions)))


def initial_noise(n: int, seed: int, channels: int = 4, side: int = IMAGE_SIZE // 4) -> torch.Tensor:
    """x_T for n samples, a function of the seed only (so every sampler starts from the same noise)."""
    return torch.randn(n, channels, side, side, generator=torch.Generator().manual_seed(seed))


def renoise_seed(seed: int) -> int:
    """The seed of the eta re-noising draws of sampling seed ``seed``: a stream apart from x_T's.

    Seeding the re-noising generator with ``seed`` itself (as before 2026-12-02) made the first batch's
    first re-noising draw equal to its initial noise x_T (the same generator state, the same shape), so
    the eta > 0 cells of the first 250 prompts re-noised with x_T again: measured on the make-train
    student at 4 steps, eta 0.2, prompt accuracy 0.380 on those 250 prompts against 0.525 on the rest."""
    digest = hashlib.blake2b(f"{seed}/renoise".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


@torch.no_grad()
def sample_images(
    unet,
    vae,
    cond: dict[str, torch.Tensor],
    x_T: torch.Tensor,
    timesteps: list[int],
    guidance: float,
    schedule: NoiseSchedule | FlowSchedule,
    batch_size: int = 250,
    eta: float = 0.0,
    seed: int = 0,
    progress: bool = False,
    family=None,
    uncond_text: dict[str, torch.Tensor] | None = None,
    prediction_type: str | None = None,
    clip_x0=None,
) -> torch.Tensor:
    """uint8 images [N, 3, 32, 32]: ``tdd_sample`` on ``timesteps`` (schedule indices, descending; eta 0:
    DDIM, on a flow schedule Euler) with CFG ``guidance``, then decode (images on the CPU). The re-noising
    draws (eta > 0) come from ``renoise_seed(seed)`` in the family's noise layout, so a cell is reproducible.
    ``progress``: a bar over the denoiser steps (batches x steps) on stderr.

    ``family`` (None: SDXL) gives the denoiser call (``denoise`` at the schedule's model time) and the CFG
    forward; ``prediction_type`` is the denoiser's (None: the family's default, eps for SDXL). CFG is
    standard (out_u + g (out_c - out_u)) against ``uncond_text`` (None: the zeros condition; else the
    encoded "") from one batched forward [conditional | unconditional] per step
    (``ModelFamily.cfg_outputs``); g = 1 runs the conditional alone. ``clip_x0``: ``tdd_sample``'s x0 clipping
    (a student's ``TDDScheduler.clip_x0``; None: none). A w-conditioned UNet (``models.w_conditioning``)
    runs no CFG: ``guidance`` - 1 is its w input, as in diffusers' pipelines."""
    from tdd_lightning.models.encoder import decode_latents
    from tdd_lightning.models.families.sdxl import SDXL

    family = family or SDXL
    prediction_type = prediction_type or family.prediction_type({})
    out = []
    generator = torch.Generator(device=x_T.device).manual_seed(renoise_seed(seed))
    starts = range(0, len(x_T), batch_size)
    desc = f"sample {len(timesteps)} st. eta {eta:g} g {guidance:g}"
    with progress_bar(total=len(starts) * len(timesteps), desc=desc, unit="step", enabled=progress) as bar:
        for i in starts:
            c = {k: v[i : i + batch_size] for k, v in cond.items()}
            u = family.unconditional_like(c, uncond_text)
            c, g = as_w_input(unet, c, guidance, family.batch_size(c), x_T.device)  # w-conditioned: no CFG

            def out_fn(x, t, c=c, u=u, g=g):
                t_in = schedule.model_time(t, x)
                if g == 1.0:
                    res = family.denoise(unet, x, t_in, c)
                else:
                    res_c, res_u = family.cfg_outputs(unet, x, t_in, c, u, same=None)
                    res = res_u + g * (res_c - res_u)
                bar.update(1)
                return res

            x0 = tdd_sample(
                out_fn, x_T[i : i + batch_size], timesteps, schedule, eta=eta, generator=generator,
                prediction_type=prediction_type, randn=family.randn_like, clip_x0=clip_x0,
            )  # fmt: skip
            out.append(to_uint8(decode_latents(vae, x0).float()).cpu())
    return torch.cat(out)
