"""SDXLEncoder: the frozen VAE and the two CLIP text encoders that turn a raw batch into a cached one.

Text follows diffusers' ``StableDiffusionXLPipeline.encode_prompt`` (no clip skip): each tokenizer pads
to its ``model_max_length`` (77); ``prompt_embeds`` is the penultimate hidden state of text_encoder and
text_encoder_2 concatenated on the last dim, ``pooled_prompt_embeds`` the projected ``text_embeds`` of
text_encoder_2. An empty caption "" goes through the encoders like any other (the ``empty_prompt``
unconditional convention). Latents are ``vae.encode(x).latent_dist`` mode (or a sample) times
``vae.config.scaling_factor``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch

from tdd_lightning.models.conditioning import time_ids_from_geometry


class SDXLEncoder(torch.nn.Module):
    """Frozen VAE + text encoders + tokenizers; every method runs without gradients."""

    def __init__(self, vae, text_encoder, text_encoder_2, tokenizer, tokenizer_2):
        super().__init__()
        self.vae, self.text_encoder, self.text_encoder_2 = vae, text_encoder, text_encoder_2
        self.tokenizer, self.tokenizer_2 = tokenizer, tokenizer_2
        self.requires_grad_(False).eval()

    def train(self, mode: bool = True) -> SDXLEncoder:  # frozen: stays in eval mode
        return super().train(False)

    @classmethod
    def from_components(cls, components) -> SDXLEncoder:
        """From ``tdd_lightning.models.SDXLComponents`` loaded with the VAE and text encoders."""
        parts = (components.vae, components.text_encoder, components.text_encoder_2)
        if any(p is None for p in parts) or components.tokenizer is None or components.tokenizer_2 is None:
            raise ValueError("SDXLEncoder needs the VAE, both text encoders and both tokenizers loaded")
        return cls(*parts, components.tokenizer, components.tokenizer_2)

    @classmethod
    def from_pretrained(
        cls,
        pretrained: str | os.PathLike,
        *,
        dtype: torch.dtype = torch.float32,
        revision: str | None = None,
        variant: str | None = None,
    ) -> SDXLEncoder:
        """Load only the VAE, text encoders and tokenizers (not the UNet) from a folder or hub id.

        With ``dtype=float16`` a VAE whose config sets ``force_upcast`` (SDXL's) is kept in float32:
        the SDXL VAE overflows in fp16.
        """
        from diffusers import AutoencoderKL
        from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

        from tdd_lightning.models.loading import resolve_model_path

        root = resolve_model_path(pretrained, revision)
        kw = {"variant": variant} if variant else {}
        vae = AutoencoderKL.from_pretrained(root, subfolder="vae", torch_dtype=dtype, **kw)
        if dtype == torch.float16 and getattr(vae.config, "force_upcast", False):
            vae = vae.to(torch.float32)
        return cls(
            vae,
            CLIPTextModel.from_pretrained(root, subfolder="text_encoder", torch_dtype=dtype, **kw),
            CLIPTextModelWithProjection.from_pretrained(
                root, subfolder="text_encoder_2", torch_dtype=dtype, **kw
            ),
            CLIPTokenizer.from_pretrained(root, subfolder="tokenizer"),
            CLIPTokenizer.from_pretrained(root, subfolder="tokenizer_2"),
        )

    @property
    def device(self) -> torch.device:
        return next(self.vae.parameters()).device

    @torch.no_grad()
    def encode_text(self, captions: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """``prompt_embeds`` float32 [B, 77, D1 + D2] and ``pooled_prompt_embeds`` float32 [B, D2]."""
        captions = list(captions)
        hidden, pooled = [], None
        for tokenizer, encoder in (
            (self.tokenizer, self.text_encoder),
            (self.tokenizer_2, self.text_encoder_2),
        ):
            ids = tokenizer(
                captions,
                padding="max_length",
                max_length=tokenizer.model_max_length,
                truncation=True,
                return_tensors="pt",
            ).input_ids
            out = encoder(ids.to(encoder.device), output_hidden_states=True)
            hidden.append(out.hidden_states[-2].float())
            if encoder is self.text_encoder_2:
                pooled = out.text_embeds.float()
        return torch.cat(hidden, dim=-1), pooled

    @torch.no_grad()
    def encode_images(
        self, pixels: torch.Tensor, sample: bool = False, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Pixels [B, 3, H, W] in [-1, 1] -> latents float32 [B, C, H/f, W/f], scaled for the UNet.

        ``sample=False`` takes the mode of the latent distribution (deterministic).
        """
        dist = self.vae.encode(pixels.to(self.device, self.vae.dtype)).latent_dist
        latents = dist.sample(generator) if sample else dist.mode()
        return latents.float() * self.vae.config.scaling_factor

    @torch.no_grad()
    def forward(self, batch: dict, sample: bool = False, generator: torch.Generator | None = None) -> dict:
        """A raw batch (``pixels``, ``caption``, ``original_size``, ``crop_top_left``) -> a cached-format
        batch (the time ids built from the geometry and the pixels' size)."""
        prompt_embeds, pooled = self.encode_text(batch["caption"])
        pixels = batch["pixels"]
        time_ids = time_ids_from_geometry(batch["original_size"], batch["crop_top_left"], pixels.shape[-2:])
        out = {
            "latents": self.encode_images(pixels, sample, generator),
            "prompt_embeds": prompt_embeds,
            "pooled_prompt_embeds": pooled,
            "time_ids": time_ids.to(self.device),
            "caption": list(batch["caption"]),
        }
        if "key" in batch:
            out["key"] = batch["key"]
        return out
