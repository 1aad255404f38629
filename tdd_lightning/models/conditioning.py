"""The condition c as one small dict of named tensors, the unconditional condition u, the teacher's CFG batch.

What the dict holds is the model family's business (``models/families``): its text parts (replaced by u)
and any other parts (kept per sample, as the diffusers pipelines keep them for the negative). Everything
here works on any such dict; ``denoise(unet, x, t, cond)`` is the family's way to call its UNet.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from tdd_lightning.diffusion.ops import append_dims

Cond = dict[str, torch.Tensor]
Denoise = Callable[[torch.nn.Module, torch.Tensor, torch.Tensor, Cond], torch.Tensor]


def unconditional_like(
    cond: Cond, uncond_text: dict[str, torch.Tensor] | None, text_keys: Sequence[str]
) -> Cond:
    """u for every sample: the ``text_keys`` parts zeros (uncond_text None) or the encoded empty prompt,
    broadcast to the batch; the other parts of ``cond`` kept."""
    out = {k: v for k, v in cond.items() if k not in text_keys}
    for k in text_keys:
        if uncond_text is None:
            out[k] = torch.zeros_like(cond[k])
        else:
            out[k] = uncond_text[k].to(cond[k]).expand_as(cond[k])
    return {k: out[k] for k in cond}


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


def teacher_cfg_eps(
    denoise: Denoise,
    unet,
    x_t: torch.Tensor,
    t: torch.Tensor,
    cond: Cond,
    uncond: Cond,
    same: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out_c, out_u) from ONE batched forward: [all B conditional | unconditional of the rest].

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
    eps = denoise(unet, torch.cat([x_t, x_t[need]]), torch.cat([t, t[need]]), both)
    eps_c = eps[:B]
    eps_u = eps_c.clone()
    eps_u[need] = eps[B:]
    return eps_c, eps_u
