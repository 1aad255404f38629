"""A tiny FLUX-shaped pipeline with random weights, built from configs and saved with save_pretrained.

The component layout of FLUX.1: a ``FluxTransformer2DModel`` (double-stream then single-stream blocks,
3-axis RoPE, 2x2-packed latents, so ``in_channels = 4 * latent channels``), a CLIP text encoder whose
pooled output is the ``pooled_projections`` input, a T5 encoder whose sequence output is the
``encoder_hidden_states``, an ``AutoencoderKL`` with both ``scaling_factor`` and ``shift_factor``
(latents are ``(z - shift) * scale``), and a ``FlowMatchEulerDiscreteScheduler`` with resolution-dependent
("dynamic") shifting. Both tokenizers are built offline (``tdd_lightning.models.tokenizer``).

``build_tiny_flux(out)`` writes a folder that ``diffusers.FluxPipeline.from_pretrained(out)`` loads and
samples; ``python -m tdd_lightning.models.flux_tiny OUT`` does the same from the shell. Sample with
``max_sequence_length=tokenizer_2.model_max_length`` (``TinyFluxConfig.text_length``): T5 runs without a
padding mask, so its output depends on the padded length.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path

import torch

from tdd_lightning.errors import check

# FLUX.1-dev's VAE latent statistics; the tiny random VAE carries them so the shift path is exercised
FLUX_VAE_SCALING, FLUX_VAE_SHIFT = 0.3611, 0.1159


def flux_scheduler_config(base_seq_len: int = 16, max_seq_len: int = 256) -> dict:
    """FLUX.1-dev's scheduler (dynamic shifting, exponential time shift, mu from 0.5 to 1.15), with the
    sequence-length range moved to tiny images: ``base_seq_len`` packed tokens (the toy's 32x32 px,
    8x8 latents, 16 tokens) get ``mu = 0.5`` (sigma' = e^0.5 s / (1 + (e^0.5 - 1) s)), ``max_seq_len``
    tokens get ``mu = 1.15``."""
    return dict(
        num_train_timesteps=1000,
        shift=1.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=base_seq_len,
        max_image_seq_len=max_seq_len,
        time_shift_type="exponential",
    )


@dataclass
class TinyFluxConfig:
    """Sizes of the tiny FLUX pipeline. ``axes_dims_rope`` (each even) sums to ``attention_head_dim``."""

    latent_channels: int = 4
    num_layers: int = 1  # double-stream (MMDiT) blocks
    num_single_layers: int = 2  # single-stream blocks
    attention_head_dim: int = 16
    num_attention_heads: int = 2
    axes_dims_rope: tuple[int, int, int] = (4, 6, 6)
    guidance_embeds: bool = False  # True: a FLUX.1-dev-style guidance-distilled transformer
    clip_hidden: int = 32  # pooled_projection_dim
    t5_hidden: int = 32  # joint_attention_dim
    text_layers: int = 2
    projection_dim: int = 32  # read by text_encoder_from_config; FLUX's CLIPTextModel has none
    text_length: int = 16  # T5 tokens: tokenizer_2.model_max_length, FluxPipeline's max_sequence_length
    vae_block_out_channels: tuple[int, ...] = (16, 32, 32)  # 3 levels: 32 px -> 8x8 latents -> 16 tokens
    vae_scaling_factor: float = FLUX_VAE_SCALING
    vae_shift_factor: float = FLUX_VAE_SHIFT
    image_size: int = 32  # the VAE's sample_size
    scheduler: dict = field(default_factory=flux_scheduler_config)
    words: list[str] = field(default_factory=list)  # extra single-token words for both tokenizers
    seed: int = 0

    def __post_init__(self):
        dims = tuple(self.axes_dims_rope)
        ok = sum(dims) == self.attention_head_dim and all(d % 2 == 0 for d in dims)
        allowed = f"even sizes summing to attention_head_dim {self.attention_head_dim}"
        check(ok, "axes_dims_rope", dims, allowed)


def transformer_from_config(cfg: TinyFluxConfig):
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel(
        patch_size=1,
        in_channels=4 * cfg.latent_channels,  # 2x2 patches of the latent, packed into channels
        num_layers=cfg.num_layers,
        num_single_layers=cfg.num_single_layers,
        attention_head_dim=cfg.attention_head_dim,
        num_attention_heads=cfg.num_attention_heads,
        joint_attention_dim=cfg.t5_hidden,
        pooled_projection_dim=cfg.clip_hidden,
        guidance_embeds=cfg.guidance_embeds,
        axes_dims_rope=tuple(cfg.axes_dims_rope),
    )


def t5_from_config(cfg: TinyFluxConfig, vocab_size: int):
    """A T5 v1.1-shaped encoder (gated GELU, relative position buckets) of width ``cfg.t5_hidden``."""
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        vocab_size=vocab_size,
        d_model=cfg.t5_hidden,
        d_kv=cfg.t5_hidden // 4,
        d_ff=2 * cfg.t5_hidden,
        num_layers=cfg.text_layers,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=32,
        dropout_rate=0.0,
        feed_forward_proj="gated-gelu",
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
        is_encoder_decoder=False,
        use_cache=False,
    )
    return T5EncoderModel(config)


def vae_from_config(cfg: TinyFluxConfig):
    """A random SDXL-layout VAE with FLUX's latent normalisation (``scaling_factor`` and ``shift_factor``)."""
    from tdd_lightning.models.tiny import small_autoencoder

    vae = small_autoencoder(cfg.vae_block_out_channels, cfg.latent_channels, 8, sample_size=cfg.image_size)
    vae.register_to_config(scaling_factor=cfg.vae_scaling_factor, shift_factor=cfg.vae_shift_factor)
    return vae


@dataclass
class TinyFluxParts:
    """The seven components of a FluxPipeline (the family module has its own container; this one only
    builds and saves)."""

    transformer: torch.nn.Module
    vae: torch.nn.Module
    text_encoder: torch.nn.Module
    text_encoder_2: torch.nn.Module
    tokenizer: object
    tokenizer_2: object
    scheduler: object

    def to_pipeline(self):
        from diffusers import FluxPipeline

        return FluxPipeline(
            scheduler=self.scheduler,
            vae=self.vae,
            text_encoder=self.text_encoder,
            tokenizer=self.tokenizer,
            text_encoder_2=self.text_encoder_2,
            tokenizer_2=self.tokenizer_2,
            transformer=self.transformer,
        )


def build_tiny_flux_parts(cfg: TinyFluxConfig | None = None, vae=None) -> TinyFluxParts:
    """The components with random weights (seeded, without touching the caller's RNG). ``vae``: use this
    (trained) autoencoder instead of a random one; its ``scaling_factor``/``shift_factor`` are kept."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from tdd_lightning.models.tiny import text_encoder_from_config
    from tdd_lightning.models.tokenizer import EOS, make_clip_tokenizer, make_t5_tokenizer

    cfg = cfg or TinyFluxConfig()
    if vae is not None:
        channels = vae.config.latent_channels
        check(channels == cfg.latent_channels, "vae.latent_channels", channels, f"{cfg.latent_channels}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        tokenizer = make_clip_tokenizer(cfg.words)  # model_max_length 77, as FLUX's CLIP-L
        tokenizer_2 = make_t5_tokenizer(cfg.words, model_max_length=cfg.text_length)
        eos_id = tokenizer.convert_tokens_to_ids(EOS)
        # built in this order (VAE, CLIP, T5, transformer): the seeded weights depend on it
        if vae is None:
            vae = vae_from_config(cfg)
        clip = text_encoder_from_config(cfg, cfg.clip_hidden, len(tokenizer), eos_id, projection=False)
        t5 = t5_from_config(cfg, len(tokenizer_2))
        transformer = transformer_from_config(cfg)
    scheduler = FlowMatchEulerDiscreteScheduler(**cfg.scheduler)
    return TinyFluxParts(transformer, vae, clip, t5, tokenizer, tokenizer_2, scheduler)


def build_tiny_flux(out_dir: str | Path, cfg: TinyFluxConfig | None = None, vae=None) -> Path:
    """Build the tiny FLUX pipeline (``build_tiny_flux_parts``) and ``save_pretrained`` it to ``out_dir``."""
    out_dir = Path(out_dir)
    build_tiny_flux_parts(cfg, vae).to_pipeline().save_pretrained(out_dir)
    return out_dir


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Write a tiny random FLUX-shaped diffusers pipeline folder.")
    p.add_argument("out_dir", help="folder to write (transformer/, vae/, text_encoder_2/, ...)")
    p.add_argument("--layers", type=int, default=1, help="double-stream blocks")
    p.add_argument("--single-layers", type=int, default=2, help="single-stream blocks")
    p.add_argument("--guidance-embeds", action="store_true", help="a guidance-distilled (FLUX.1-dev) layout")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    cfg = TinyFluxConfig(
        num_layers=a.layers, num_single_layers=a.single_layers, guidance_embeds=a.guidance_embeds, seed=a.seed
    )
    path = build_tiny_flux(a.out_dir, cfg)
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20
    print(f"wrote tiny flux pipeline to {path} ({size:.1f} MiB)")


if __name__ == "__main__":
    from tdd_lightning.errors import exit_on_user_error

    exit_on_user_error(main)
