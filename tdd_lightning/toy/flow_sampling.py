"""Sampling the toy flow teacher: K Euler steps on FluxPipeline's sigma schedule, true CFG against "".

The schedule is FluxPipeline's: sigmas linspace(1, 1/K, K), time-shifted with the scheduler's mu at
the image's token count, then 0 appended; one Euler step is x <- x + (sigma_next - sigma) v. So K-step
samples here equal ``FluxPipeline(..., num_inference_steps=K, true_cfg_scale=g, negative_prompt="")``
up to float rounding (tests/test_flow_teacher.py checks it), but batched and without the pipeline's
per-call text encoding.
"""

from __future__ import annotations

import math

import torch

from tdd_lightning.progress import progress_bar
from tdd_lightning.toy.data import to_uint8
from tdd_lightning.toy.flow_teacher import FlowCondition, time_shift, velocity


def pack(z: torch.Tensor) -> torch.Tensor:
    """Latents [B, C, h, w] -> FLUX tokens [B, h/2 * w/2, 4C] (2x2 patches; FluxPipeline._pack_latents)."""
    b, c, h, w = z.shape
    return z.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, h * w // 4, 4 * c)


def unpack(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """The inverse of :func:`pack`: [B, h/2 * w/2, 4C] -> [B, C, h, w]."""
    b, _, c4 = x.shape
    return x.view(b, h // 2, w // 2, c4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c4 // 4, h, w)


def image_ids(h: int, w: int) -> torch.Tensor:
    """RoPE ids [h/2 * w/2, 3] of the packed tokens: (0, row, column)."""
    rows, cols = torch.meshgrid(torch.arange(h // 2), torch.arange(w // 2), indexing="ij")
    return torch.stack([torch.zeros_like(rows), rows, cols], -1).reshape(-1, 3).float()


def scheduler_mu(scheduler_config, tokens: int) -> float:
    """FluxPipeline's ``calculate_shift``: mu linear in the token count between the config's two ends
    (0 when the scheduler does not shift dynamically: then ``shift`` is applied instead)."""
    c = scheduler_config
    if not c.get("use_dynamic_shifting", False):
        return math.log(c.get("shift", 1.0))
    lo, hi = c.get("base_image_seq_len", 256), c.get("max_image_seq_len", 4096)
    m = (c.get("max_shift", 1.15) - c.get("base_shift", 0.5)) / (hi - lo)
    return tokens * m + c.get("base_shift", 0.5) - m * lo


def euler_sigmas(steps: int, mu: float) -> torch.Tensor:
    """[steps + 1] descending sigmas from 1 to 0 (FluxPipeline's default K-step schedule)."""
    s = torch.linspace(1.0, 1.0 / steps, steps, dtype=torch.float64)
    return torch.cat([time_shift(mu, s), torch.zeros(1, dtype=torch.float64)]).float()


@torch.no_grad()
def encode_flow_prompts(pipe, captions: list[str], side: int, chunk: int = 512) -> FlowCondition:
    """The T5 and pooled CLIP embeddings of ``captions`` as FluxPipeline encodes them (``max_sequence_length``
    = ``tokenizer_2.model_max_length``), with the image ids of a ``side`` x ``side`` latent."""
    length = pipe.tokenizer_2.model_max_length
    embeds, pooled, text_ids = [], [], None
    for i in range(0, len(captions), chunk):
        e, p, text_ids = pipe.encode_prompt(
            captions[i : i + chunk], prompt_2=None, max_sequence_length=length, device=torch.device("cpu")
        )
        embeds.append(e.float())
        pooled.append(p.float())
    return FlowCondition(torch.cat(embeds), torch.cat(pooled), text_ids.float(), image_ids(side, side))


def decode(vae, x: torch.Tensor, side: int) -> torch.Tensor:
    """Packed normalised latents -> uint8 images: z = x / scale + shift, then the VAE decoder."""
    z = unpack(x, side, side) / vae.config.scaling_factor + vae.config.shift_factor
    return to_uint8(vae.decode(z.to(next(vae.parameters()).dtype)).sample.float()).cpu()


@torch.no_grad()
def euler_flow(
    transformer,
    text: FlowCondition,
    rows: torch.Tensor,
    empty: int,
    x: torch.Tensor,
    steps: int,
    guidance: float,
    mu: float,
    on_step=None,
) -> torch.Tensor:
    """``steps`` Euler steps from x (packed [B, tokens, 4C], sigma 1) to sigma 0 with captions ``rows`` of
    ``text``; CFG ``guidance`` against row ``empty`` (v_u + g (v_c - v_u), one batched forward
    [conditional | unconditional] per step; g = 1 runs the conditional alone)."""
    cond = text.select(rows)
    both = text.select(torch.cat([rows, torch.full_like(rows, empty)]))
    sigmas = euler_sigmas(steps, mu)
    x = x.float()
    for s, s_next in zip(sigmas[:-1], sigmas[1:], strict=True):
        sig = s.expand(len(x))
        if guidance == 1.0:
            v = velocity(transformer, x, sig, cond)
        else:
            v_c, v_u = velocity(transformer, torch.cat([x, x]), sig.repeat(2), both).chunk(2)
            v = v_u + guidance * (v_c - v_u)
        x = x + (s_next - s) * v
        if on_step is not None:
            on_step()
    return x


@torch.no_grad()
def sample_flow_images(
    transformer,
    vae,
    text: FlowCondition,
    rows: torch.Tensor,
    empty: int,
    x_T: torch.Tensor,
    steps: int,
    guidance: float,
    mu: float,
    side: int = 8,
    batch_size: int = 250,
    progress: bool = False,
) -> torch.Tensor:
    """uint8 images [N, 3, 4 side, 4 side]: :func:`euler_flow` from x_T in batches, then decoded."""
    out = []
    starts = range(0, len(x_T), batch_size)
    desc = f"flow {steps} st. g {guidance:g}"
    with progress_bar(total=len(starts) * steps, desc=desc, unit="step", enabled=progress) as bar:
        for i in starts:
            x = euler_flow(
                transformer, text, rows[i : i + batch_size], empty, x_T[i : i + batch_size], steps, guidance,
                mu, on_step=lambda: bar.update(1),
            )  # fmt: skip
            out.append(decode(vae, x, side))
    return torch.cat(out)
