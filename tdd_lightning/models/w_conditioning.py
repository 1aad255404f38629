"""LCM-style w-conditioning of a UNet student: the teacher's guidance w as an input of the denoiser.

LCM's full model takes the CFG scale as an extra embedding added to the timestep embedding (diffusers'
``time_cond_proj_dim``: ``time_embedding.cond_proj``, a bias-free linear map of a sinusoidal embedding of
w). Here the base UNet gets that layer with a ZERO weight, so the frozen teacher (adapters off) is
exactly the original model whatever w it is given, and the layer gets the student's (and target's) LoRA
like every other target module: the student learns what w does. ``model.w_embedding_dim`` turns it on.

The embedding is diffusers' ``get_guidance_scale_embedding`` of w (the LCM form, guidance scale 1 + w);
a pipeline with such a UNet runs no CFG and embeds ``guidance_scale - 1``, and so does this project's
sampling (``toy.sampling.sample_images``, ``TDDModule.sample_latents``).
"""

from __future__ import annotations

import math

import torch

COND_PROJ = "cond_proj"  # the LoRA target name of time_embedding.cond_proj


def w_embedding_dim(unet) -> int | None:
    """The width of the UNet's w embedding (``time_cond_proj_dim``), None when it has none."""
    config = getattr(unet, "config", None)
    return getattr(config, "time_cond_proj_dim", None) if config is not None else None


def add_w_embedding(unet, dim: int) -> None:
    """Give ``unet`` a zero ``time_embedding.cond_proj`` of input width ``dim`` (in place)."""
    embedding = unet.time_embedding
    if getattr(embedding, "cond_proj", None) is not None:
        raise ValueError("model.w_embedding_dim: this UNet already has a w embedding (time_cond_proj_dim)")
    ref = embedding.linear_1.weight
    proj = torch.nn.Linear(
        dim, embedding.linear_1.in_features, bias=False, device=ref.device, dtype=ref.dtype
    )
    torch.nn.init.zeros_(proj.weight)
    proj.weight.requires_grad_(False)
    embedding.cond_proj = proj
    unet.register_to_config(time_cond_proj_dim=dim)


def w_embedding(w: torch.Tensor, dim: int) -> torch.Tensor:
    """[B, dim] float32: sin and cos of 1000 w at geometric frequencies (diffusers' guidance embedding)."""
    half = dim // 2
    freqs = torch.exp(
        torch.arange(half, dtype=torch.float32, device=w.device) * -(math.log(10000.0) / (half - 1))
    )
    angles = (1000.0 * w.float())[:, None] * freqs[None, :]
    emb = torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)
    return torch.nn.functional.pad(emb, (0, dim % 2))


def as_w_input(unet, cond: dict, guidance_scale: float, batch: int, device) -> tuple[dict, float]:
    """(condition, CFG scale) to sample ``unet`` at ``guidance_scale``: unchanged for a plain UNet; for a
    w-conditioned one, w = ``guidance_scale`` - 1 in ``cond["guidance"]`` and no CFG (scale 1), as diffusers'
    pipelines run such a UNet."""
    if w_embedding_dim(unet) is None:
        return cond, guidance_scale
    return {**cond, "guidance": torch.full((batch,), guidance_scale - 1.0, device=device)}, 1.0


def timestep_cond(unet, cond: dict) -> torch.Tensor | None:
    """The UNet's ``timestep_cond`` for ``cond``: the embedding of ``cond["guidance"]`` (w) when the UNet
    is w-conditioned and the condition carries a w, else None (the teacher's call)."""
    dim = w_embedding_dim(unet)
    w = cond.get("guidance")
    if dim is None or w is None:
        return None
    dtype = next(unet.parameters()).dtype
    return w_embedding(w, dim).to(dtype)
