"""Tiny pipelines with random weights, built from configs and saved with save_pretrained.

``build_tiny_sdxl``: the component layout of SDXL base (UNet with the ``text_time`` added condition,
4-level VAE with scale factor 8, two CLIP text encoders, the second with a projection, two tokenizers).
``build_tiny_sd15``: SD1.5's (UNet without added conditions, one CLIP text encoder), with any noise
schedule (e.g. v-prediction with zero terminal SNR). The real loaders and every code path of each
family run on them. ``python -m tdd_lightning.models.tiny OUT [--family sd15]`` writes one.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

# SDXL base's training noise schedule (the loader reads it back from scheduler/scheduler_config.json)
SDXL_SCHEDULER = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    prediction_type="epsilon",
    steps_offset=1,
    timestep_spacing="leading",
)


@dataclass
class TinySDXLConfig:
    sample_size: int = 8  # latent side; the image side is 8x this
    block_out_channels: tuple[int, ...] = (32, 64)
    layers_per_block: int = 1
    attention_head_dim: tuple[int, ...] = (2, 4)
    transformer_layers_per_block: tuple[int, ...] = (1, 1)
    norm_num_groups: int = 8
    addition_time_embed_dim: int = 8
    text_hidden_size: tuple[int, int] = (32, 32)  # text_encoder, text_encoder_2
    text_layers: int = 3
    projection_dim: int = 32
    vae_block_out_channels: tuple[int, ...] = (16, 16, 32, 32)
    latent_channels: int = 4
    words: list[str] = field(default_factory=list)  # extra single-token words for the tokenizer
    seed: int = 0

    @classmethod
    def from_channels(cls, channels, sample_size: int = 8, seed: int = 0, **kwargs) -> TinySDXLConfig:
        """UNet block widths ``channels``, 16 channels per attention head, one transformer layer each."""
        channels = tuple(channels)
        return cls(
            sample_size=sample_size,
            block_out_channels=channels,
            attention_head_dim=tuple(max(1, c // 16) for c in channels),
            transformer_layers_per_block=(1,) * len(channels),
            seed=seed,
            **kwargs,
        )


def small_unet(cfg, down_block_types, up_block_types, **kwargs):
    """A UNet2DConditionModel of a tiny config's widths (size, channels, heads, groups) + ``kwargs``."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=cfg.sample_size,
        in_channels=cfg.latent_channels,
        out_channels=cfg.latent_channels,
        down_block_types=down_block_types,
        up_block_types=up_block_types,
        block_out_channels=cfg.block_out_channels,
        layers_per_block=cfg.layers_per_block,
        attention_head_dim=cfg.attention_head_dim,
        norm_num_groups=cfg.norm_num_groups,
        **kwargs,
    )


def unet_from_config(cfg: TinySDXLConfig):
    """SDXL's layout: attention in the lower levels, the ``text_time`` added condition."""
    n = len(cfg.block_out_channels)
    return small_unet(
        cfg,
        ("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (n - 1),
        ("CrossAttnUpBlock2D",) * (n - 1) + ("UpBlock2D",),
        transformer_layers_per_block=cfg.transformer_layers_per_block,
        cross_attention_dim=sum(cfg.text_hidden_size),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=cfg.addition_time_embed_dim,
        projection_class_embeddings_input_dim=6 * cfg.addition_time_embed_dim + cfg.projection_dim,
    )


def small_autoencoder(
    block_out_channels: Sequence[int],
    latent_channels: int,
    norm_num_groups: int,
    sample_size: int,
    mid_block_attention: bool = True,
):
    """An SDXL-layout AutoencoderKL with one layer per block (the tiny pipeline's and the toy teacher's)."""
    from diffusers import AutoencoderKL

    n = len(block_out_channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=tuple(block_out_channels),
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=norm_num_groups,
        mid_block_add_attention=mid_block_attention,
        sample_size=sample_size,
    )


def vae_from_config(cfg: TinySDXLConfig):
    n = len(cfg.vae_block_out_channels)
    return small_autoencoder(
        cfg.vae_block_out_channels, cfg.latent_channels, 8, sample_size=cfg.sample_size * 2 ** (n - 1)
    )


def text_encoder_from_config(
    cfg: TinySDXLConfig | TinySD15Config, hidden: int, vocab_size: int, eos_id: int, projection: bool
):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=cfg.text_layers,
        num_attention_heads=4,
        max_position_embeddings=77,
        projection_dim=cfg.projection_dim,
        hidden_act="gelu",
        bos_token_id=eos_id - 1,
        eos_token_id=eos_id,
        pad_token_id=eos_id,
    )
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config)


def build_tiny_sdxl(out_dir: str | Path, cfg: TinySDXLConfig | None = None) -> Path:
    """Build the tiny pipeline with random weights (seeded) and ``save_pretrained`` it to ``out_dir``."""
    cfg = cfg or TinySDXLConfig()
    out_dir = Path(out_dir)
    with torch.random.fork_rng(devices=[]):  # seeded weights without touching the caller's RNG
        torch.manual_seed(cfg.seed)
        return _build_and_save(out_dir, cfg)


def _build_and_save(out_dir: Path, cfg: TinySDXLConfig) -> Path:
    from diffusers import EulerDiscreteScheduler

    from tdd_lightning.models.families.sdxl import SDXLComponents
    from tdd_lightning.models.tokenizer import EOS, make_clip_tokenizer

    tokenizer = make_clip_tokenizer(cfg.words)
    eos_id = tokenizer.convert_tokens_to_ids(EOS)
    vocab = len(tokenizer)
    # built in this order (VAE, text encoders, UNet): the seeded weights depend on it
    vae = vae_from_config(cfg)
    te1 = text_encoder_from_config(cfg, cfg.text_hidden_size[0], vocab, eos_id, projection=False)
    te2 = text_encoder_from_config(cfg, cfg.text_hidden_size[1], vocab, eos_id, projection=True)
    unet = unet_from_config(cfg)
    parts = SDXLComponents(
        unet, vae, te1, te2, tokenizer, tokenizer, EulerDiscreteScheduler(**SDXL_SCHEDULER)
    )
    parts.to_pipeline().save_pretrained(out_dir)
    return out_dir


# SD1.5's published noise schedule (the same betas as SDXL); the tiny SD1.5 folder saves a DDIMScheduler
SD15_SCHEDULER = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    prediction_type="epsilon",
    steps_offset=1,
    clip_sample=False,
    set_alpha_to_one=False,
)


@dataclass
class TinySD15Config:
    """A tiny SD1.5-shaped pipeline: UNet without added conditions, one CLIP text encoder.

    ``scheduler``: keys over ``SD15_SCHEDULER``, e.g. ``{"prediction_type": "v_prediction",
    "rescale_betas_zero_snr": True, "timestep_spacing": "trailing"}`` for a zero-SNR v-model.
    """

    sample_size: int = 8
    block_out_channels: tuple[int, ...] = (32, 64)
    layers_per_block: int = 1
    attention_head_dim: tuple[int, ...] = (2, 4)
    norm_num_groups: int = 8
    text_hidden_size: int = 32
    text_layers: int = 3
    projection_dim: int = 32
    vae_block_out_channels: tuple[int, ...] = (16, 16, 32, 32)
    latent_channels: int = 4
    words: list[str] = field(default_factory=list)
    scheduler: dict = field(default_factory=dict)
    seed: int = 0


def sd15_unet_from_config(cfg: TinySD15Config):
    """SD1.5's layout: attention in the upper levels, no added condition."""
    n = len(cfg.block_out_channels)
    down = ("CrossAttnDownBlock2D",) * (n - 1) + ("DownBlock2D",)
    up = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (n - 1)
    return small_unet(cfg, down, up, cross_attention_dim=cfg.text_hidden_size)


def build_tiny_sd15(out_dir: str | Path, cfg: TinySD15Config | None = None) -> Path:
    """Build a tiny SD1.5-shaped pipeline with random weights (seeded) and ``save_pretrained`` it."""
    from diffusers import DDIMScheduler

    from tdd_lightning.models.families.sd15 import SD15Components
    from tdd_lightning.models.tokenizer import EOS, make_clip_tokenizer

    cfg = cfg or TinySD15Config()
    out_dir = Path(out_dir)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        tokenizer = make_clip_tokenizer(cfg.words)
        eos_id = tokenizer.convert_tokens_to_ids(EOS)
        vae = small_autoencoder(
            cfg.vae_block_out_channels,
            cfg.latent_channels,
            8,
            sample_size=cfg.sample_size * 2 ** (len(cfg.vae_block_out_channels) - 1),
        )
        te = text_encoder_from_config(cfg, cfg.text_hidden_size, len(tokenizer), eos_id, projection=False)
        unet = sd15_unet_from_config(cfg)
        scheduler = DDIMScheduler(**{**SD15_SCHEDULER, **cfg.scheduler})
        SD15Components(unet, vae, te, tokenizer, scheduler).to_pipeline().save_pretrained(out_dir)
    return out_dir


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        description="Write a tiny random SDXL- or SD1.5-shaped diffusers pipeline folder."
    )
    p.add_argument("out_dir", help="folder to write (diffusers layout: unet/, vae/, text_encoder/, ...)")
    p.add_argument("--sample-size", type=int, default=8, help="latent side (image side = 8x)")
    p.add_argument("--channels", type=int, nargs="+", default=[32, 64], help="UNet block_out_channels")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--family", choices=("sdxl", "sd15"), default="sdxl")
    a = p.parse_args(argv)
    if a.family == "sd15":
        heads = tuple(max(1, c // 16) for c in a.channels)
        cfg15 = TinySD15Config(a.sample_size, tuple(a.channels), attention_head_dim=heads, seed=a.seed)
        path = build_tiny_sd15(a.out_dir, cfg15)
    else:
        cfg = TinySDXLConfig.from_channels(a.channels, sample_size=a.sample_size, seed=a.seed)
        path = build_tiny_sdxl(a.out_dir, cfg)
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20
    print(f"wrote tiny {a.family} pipeline to {path} ({size:.1f} MiB)")


if __name__ == "__main__":
    from tdd_lightning.errors import exit_on_user_error

    exit_on_user_error(main)
