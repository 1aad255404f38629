"""SDXL base 1.0's UNet architecture with random weights: throughput and memory at the real size, no download.

The values are SDXL base's published ``unet/config.json`` (2.57 B parameters), written out here. The
text widths it expects: prompt_embeds 768 + 1280 = 2048 (cross_attention_dim), pooled 1280, so
projection_class_embeddings_input_dim = 6 x 256 + 1280 = 2816.

    python -m tdd_lightning.models.sdxl_arch artifacts/sdxl-arch   # a folder for train.py (model=sdxl_arch)
    python -m tdd_lightning.bench --model sdxl_arch --device cuda --precision bf16

The folder holds the random UNet (bf16 safetensors, ~5 GB), the scheduler and the two text encoders'
configs (no encoder weights): enough for training from cached or synthetic data (load_encoders false).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from tdd_lightning.models.tiny import SDXL_SCHEDULER

SDXL_UNET_CONFIG = dict(
    sample_size=128,  # latent side: 1024 px
    in_channels=4,
    out_channels=4,
    center_input_sample=False,
    flip_sin_to_cos=True,
    freq_shift=0,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    mid_block_type="UNetMidBlock2DCrossAttn",
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    only_cross_attention=False,
    block_out_channels=(320, 640, 1280),
    layers_per_block=2,
    downsample_padding=1,
    mid_block_scale_factor=1,
    act_fn="silu",
    norm_num_groups=32,
    norm_eps=1e-5,
    cross_attention_dim=2048,
    transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(5, 10, 20),
    use_linear_projection=True,
    upcast_attention=None,
    resnet_time_scale_shift="default",
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
    conv_in_kernel=3,
    conv_out_kernel=3,
    time_embedding_type="positional",
)
SDXL_UNET_PARAMS = 2_567_463_684  # SDXL base 1.0's UNet
# the two text encoders' widths (CLIP ViT-L and OpenCLIP ViT-bigG): hidden sizes and encoder 2's projection
SDXL_TEXT = {
    "text_encoder": {"hidden_size": 768},
    "text_encoder_2": {"hidden_size": 1280, "projection_dim": 1280},
}


SAMPLE_SIZE, SCHEDULER = 128, SDXL_SCHEDULER  # the bench's defaults (bench/build.py)


def random_unet(
    config: dict,
    sample_size: int,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    seed: int = 0,
):
    """A UNet of a published ``config`` with random weights, built directly on ``device`` (``"meta"``:
    shapes only)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    with torch.device(device or "cpu"):
        unet = UNet2DConditionModel(**{**config, "sample_size": sample_size})
    if dtype is not None:
        unet = unet.to(dtype)
    return unet.requires_grad_(False).eval()


def sdxl_unet(sample_size: int = 128, device=None, dtype: torch.dtype | None = None, seed: int = 0):
    """SDXL base's UNet with random weights (``random_unet`` of ``SDXL_UNET_CONFIG``)."""
    return random_unet(SDXL_UNET_CONFIG, sample_size, device, dtype, seed)


unet = sdxl_unet  # the bench's name for this architecture's UNet


def write_arch_folder(out_dir: str | Path, unet_module, scheduler, text: dict[str, dict]) -> Path:
    """A diffusers-layout folder: the random UNet, the scheduler, the text encoders' configs (no weights)."""
    out_dir = Path(out_dir)
    unet_module.save_pretrained(out_dir / "unet")
    scheduler.save_pretrained(out_dir / "scheduler")
    for name, cfg in text.items():
        (out_dir / name).mkdir(parents=True, exist_ok=True)
        (out_dir / name / "config.json").write_text(json.dumps(cfg, indent=2))
    return out_dir


def arch_main(argv, name: str, build, sample_size: int) -> None:
    """The command line of ``python -m tdd_lightning.models.<name>_arch OUT [--sample-size S]``."""
    p = argparse.ArgumentParser(
        description=f"Write {name}'s UNet architecture with random weights (no download)."
    )
    p.add_argument("out_dir", help="folder to write (unet/, scheduler/, text_encoder*/config.json)")
    p.add_argument("--sample-size", type=int, default=sample_size, help="latent side (image side = 8x)")
    a = p.parse_args(argv)
    path = build(a.out_dir, a.sample_size)
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**30
    print(f"wrote {name}-architecture UNet (random weights) to {path} ({size:.1f} GiB)")


def text_shapes() -> dict[str, tuple[int, ...]]:
    """The SDXL family's text tensors at SDXL's widths: (77, 2048) and (1280,)."""
    from tdd_lightning.models.families.sdxl import SDXL

    return SDXL.text_shapes_of(SDXL_TEXT["text_encoder"], SDXL_TEXT["text_encoder_2"])


def text_dims() -> tuple[int, int]:
    """(prompt_embeds width, pooled width) = (2048, 1280)."""
    te1, te2 = SDXL_TEXT["text_encoder"], SDXL_TEXT["text_encoder_2"]
    return te1["hidden_size"] + te2["hidden_size"], te2["projection_dim"]


def build_sdxl_arch(out_dir: str | Path, sample_size: int = 128, dtype: torch.dtype = torch.bfloat16) -> Path:
    """Write a diffusers-layout folder: random SDXL UNet + scheduler + text-encoder configs (no weights)."""
    from diffusers import EulerDiscreteScheduler

    device = "cuda" if torch.cuda.is_available() else "cpu"
    text = {name: {**cfg, "projection_dim": 1280} for name, cfg in SDXL_TEXT.items()}
    unet_module = sdxl_unet(sample_size, device=device, dtype=dtype)
    return write_arch_folder(out_dir, unet_module, EulerDiscreteScheduler(**SDXL_SCHEDULER), text)


def main(argv: list[str] | None = None) -> None:
    arch_main(argv, "SDXL", build_sdxl_arch, 128)


if __name__ == "__main__":
    from tdd_lightning.errors import exit_on_user_error

    exit_on_user_error(main)
