"""Stable Diffusion 1.5's UNet with random weights: speed and memory of the SD1.5 family at the real size.

The values are SD1.5's published ``unet/config.json`` (859.5 M parameters), written out here; the text
width it expects is CLIP ViT-L's 768 (``cross_attention_dim``), no added conditions.

    python -m tdd_lightning.models.sd15_arch artifacts/sd15-arch   # a folder for train.py (model=sd15_arch)
    python -m tdd_lightning.bench --model sd15_arch --device cuda --precision bf16

The folder holds the random UNet (bf16 safetensors, ~1.7 GB), the scheduler and the text encoder's
config (no encoder weights): enough for training from cached or synthetic data (load_encoders false).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

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


def sd15_unet(
    sample_size: int = 64,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    seed: int = 0,
):
    """SD1.5's UNet with random weights, built directly on ``device`` (``"meta"``: shapes only)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    with torch.device(device or "cpu"):
        unet = UNet2DConditionModel(**{**SD15_UNET_CONFIG, "sample_size": sample_size})
    if dtype is not None:
        unet = unet.to(dtype)
    return unet.requires_grad_(False).eval()


def text_shapes() -> dict[str, tuple[int, ...]]:
    """The SD1.5 family's text tensor: prompt_embeds (77, 768)."""
    return {"prompt_embeds": (77, SD15_TEXT["text_encoder"]["hidden_size"])}


def build_sd15_arch(out_dir: str | Path, sample_size: int = 64, dtype: torch.dtype = torch.bfloat16) -> Path:
    """Write a diffusers-layout folder: random SD1.5 UNet + scheduler + text-encoder config (no weights)."""
    from diffusers import DDIMScheduler

    out_dir = Path(out_dir)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    sd15_unet(sample_size, device=device, dtype=dtype).save_pretrained(out_dir / "unet")
    DDIMScheduler(**SD15_SCHEDULER).save_pretrained(out_dir / "scheduler")
    for name, cfg in SD15_TEXT.items():
        (out_dir / name).mkdir(parents=True, exist_ok=True)
        (out_dir / name / "config.json").write_text(json.dumps(cfg, indent=2))
    return out_dir


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        description="Write SD1.5's UNet architecture with random weights (no download)."
    )
    p.add_argument("out_dir", help="folder to write (unet/, scheduler/, text_encoder/config.json)")
    p.add_argument("--sample-size", type=int, default=64, help="latent side (image side = 8x)")
    a = p.parse_args(argv)
    path = build_sd15_arch(a.out_dir, a.sample_size)
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**30
    print(f"wrote SD1.5-architecture UNet (random weights) to {path} ({size:.1f} GiB)")


if __name__ == "__main__":
    from tdd_lightning.errors import exit_on_user_error

    exit_on_user_error(main)
