"""Stable Diffusion 1.5's UNet with random weights: speed and memory of the SD1.5 family at the real size.

The values are SD1.5's published ``unet/config.json`` (859.5 M parameters), written out here; the text
width it expects is CLIP ViT-L's 768 (``cross_attention_dim``), no added conditions.

    python -m tdd_lightning.models.sd15_arch artifacts/sd15-arch   # a folder for train.py (model=sd15_arch)
    python -m tdd_lightning.bench --model sd15_arch --device cuda --precision bf16

The folder holds the random UNet (bf16 safetensors, ~1.7 GB), the scheduler and the text encoder's
config (no encoder weights): enough for training from cached or synthetic data (load_encoders false).
"""

from __future__ import annotations

from pathlib import Path

import torch

from tdd_lightning.models.sdxl_arch import arch_main, random_unet, write_arch_folder
from tdd_lightning.models.tiny import SD15_SCHEDULER

SD15_UNET_CONFIG = dict(
    sample_size=64,  # latent side: 512 px
    in_channels=4,
    out_channels=4,
    center_input_sample=False,
    flip_sin_to_cos=True,
    freq_shift=0,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
    downsample_padding=1,
    mid_block_scale_factor=1,
    act_fn="silu",
    norm_num_groups=32,
    norm_eps=1e-5,
    cross_attention_dim=768,
    attention_head_dim=8,
)
SD15_UNET_PARAMS = 859_520_964  # SD1.5's UNet
SD15_TEXT = {"text_encoder": {"hidden_size": 768}}  # CLIP ViT-L/14


SAMPLE_SIZE, SCHEDULER = 64, SD15_SCHEDULER  # the bench's defaults (bench/build.py)


def sd15_unet(sample_size: int = 64, device=None, dtype: torch.dtype | None = None, seed: int = 0):
    """SD1.5's UNet with random weights, built directly on ``device`` (``"meta"``: shapes only)."""
    return random_unet(SD15_UNET_CONFIG, sample_size, device, dtype, seed)


unet = sd15_unet  # the bench's name for this architecture's UNet


def text_shapes() -> dict[str, tuple[int, ...]]:
    """The SD1.5 family's text tensor: prompt_embeds (77, 768)."""
    return {"prompt_embeds": (77, SD15_TEXT["text_encoder"]["hidden_size"])}


def build_sd15_arch(out_dir: str | Path, sample_size: int = 64, dtype: torch.dtype = torch.bfloat16) -> Path:
    """Write a diffusers-layout folder: random SD1.5 UNet + scheduler + text-encoder config (no weights)."""
    from diffusers import DDIMScheduler

    device = "cuda" if torch.cuda.is_available() else "cpu"
    unet_module = sd15_unet(sample_size, device=device, dtype=dtype)
    return write_arch_folder(out_dir, unet_module, DDIMScheduler(**SD15_SCHEDULER), SD15_TEXT)


def main(argv: list[str] | None = None) -> None:
    arch_main(argv, "SD1.5", build_sd15_arch, 64)


if __name__ == "__main__":
    from tdd_lightning.errors import exit_on_user_error

    exit_on_user_error(main)
