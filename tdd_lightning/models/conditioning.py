"""The SDXL condition c as one small dict, the unconditional condition u, and the teacher's CFG batch.

c = {prompt_embeds [B, 77, D], pooled_prompt_embeds [B, D2], time_ids [B, 6]}. The unconditional
condition replaces the text parts only; each sample keeps its own micro-conditioning time ids (as the
SDXL pipeline does for its negative).
"""

from __future__ import annotations

import torch

from tdd_lightning.diffusion.ops import append_dims

TEXT_KEYS = ("prompt_embeds", "pooled_prompt_embeds")
Cond = dict[str, torch.Tensor]


def square_time_ids(size: int, batch: int, device: torch.device | str | None = None) -> torch.Tensor:
    """SDXL micro-conditioning of ``batch`` uncropped square images of side ``size`` px, float32 [batch, 6]:
    (original h, w, crop top, left, target h, w) = (size, size, 0, 0, size, size)."""
    row = torch.tensor([size, size, 0, 0, size, size], dtype=torch.float32, device=device)
    return row.repeat(batch, 1)


def time_ids_from_geometry(
    original_size: torch.Tensor, crop_top_left: torch.Tensor, target_size: tuple[int, int] | torch.Tensor
) -> torch.Tensor:
    """SDXL's micro-conditioning from a batch's image geometry, float32 [B, 6]:
    (original h, w, crop top, left, target h, w). ``original_size`` and ``crop_top_left`` are [B, 2]
    (or [2]); ``target_size`` is (h, w), the size of the pixels (or [B, 2])."""
    original_size, crop_top_left = original_size.float(), crop_top_left.float()
    if original_size.ndim == 1:
        original_size, crop_top_left = original_size[None], crop_top_left[None]
    target = torch.as_tensor(target_size, dtype=torch.float32, device=original_size.device)
    target = target.expand(original_size.shape[0], 2)
    return torch.cat([original_size, crop_top_left.to(original_size.device), target], dim=1)


def condition_from_batch(batch: dict) -> Cond:
    return {k: batch[k] for k in (*TEXT_KEYS, "time_ids")}


def unconditional_like(cond: Cond, uncond_text: dict[str, torch.Tensor] | None) -> Cond:
    """u for every sample: zeros (uncond_text None) or the encoded empty prompt, broadcast to the batch."""
    out = {"time_ids": cond["time_ids"]}
    for k in TEXT_KEYS:
        if uncond_text is None:
            out[k] = torch.zeros_like(cond[k])
        else:
            out[k] = uncond_text[k].to(cond[k]).expand_as(cond[k])
    return out


def replace_where(mask: torch.Tensor, cond: Cond, other: Cond) -> Cond:
    """Per sample: ``other`` where mask is True, else ``cond`` (guidance dropout)."""
    out = {}
    for k, v in cond.items():
        out[k] = torch.where(append_dims(mask, v.ndim), other[k], v)
    return out


def select(cond: Cond, index: torch.Tensor) -> Cond:
    return {k: v[index] for k, v in cond.items()}


def concat(a: Cond, b: Cond) -> Cond:
    return {k: torch.cat([a[k], b[k]]) for k in a}


def unet_eps(unet, x: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
    """eps prediction of an SDXL UNet for condition ``cond``."""
    added = {"text_embeds": cond["pooled_prompt_embeds"], "time_ids": cond["time_ids"]}
    return unet(x, t, encoder_hidden_states=cond["prompt_embeds"], added_cond_kwargs=added).sample


def teacher_cfg_eps(
    unet, x_t: torch.Tensor, t: torch.Tensor, cond: Cond, uncond: Cond, same: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(eps_c, eps_u) from ONE batched forward: [all B conditional | unconditional of the rest].

    ``same`` marks samples whose condition already is u (dropped captions): their unconditional
    prediction equals the conditional one and is not computed twice. ``same=None``: all B computed.
    Batch order: conditional first, then the unconditional of the samples not in ``same``, in order.
    """
    B = x_t.shape[0]
    if same is None:
        need = torch.arange(B, device=x_t.device)
    else:  # a data-dependent size: free for a host mask, one device sync for a mask on the GPU
        need = (~same).nonzero().squeeze(1).to(x_t.device, non_blocking=True)
    both = concat(cond, select(uncond, need))
    eps = unet_eps(unet, torch.cat([x_t, x_t[need]]), torch.cat([t, t[need]]), both)
    eps_c = eps[:B]
    eps_u = eps_c.clone()
    eps_u[need] = eps[B:]
    return eps_c, eps_u
