"""The frozen encoder of a model family: VAE latents for pixels, the family's text parts for captions.

``Encoder`` holds the VAE and the family; each family's subclass adds its text encoders and
``encode_captions``. ``forward`` turns a raw batch (``pixels``, ``caption``, ``original_size``,
``crop_top_left``) into a cached-format one: ``latents`` plus the family's condition tensors. Latents are
``vae.encode(x).latent_dist`` mode (or a sample) minus ``vae.config.shift_factor`` (FLUX's VAE; none for
SD's), times ``vae.config.scaling_factor``; ``decode_latents`` inverts that.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


class Encoder(torch.nn.Module):
    """Frozen VAE (+ the subclass's text encoders); every method runs without gradients."""

    family = None  # the ModelFamily instance; set by the subclass

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def freeze(self) -> None:
        self.requires_grad_(False).eval()

    def train(self, mode: bool = True):  # frozen: stays in eval mode
        return super().train(False)

    @property
    def device(self) -> torch.device:
        return next(self.vae.parameters()).device

    def encode_captions(self, captions: Sequence[str]) -> dict[str, torch.Tensor]:
        """The text parts of the family's condition, float32, one row per caption."""
        raise NotImplementedError

    @torch.no_grad()
    def encode_images(
        self, pixels: torch.Tensor, sample: bool = False, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Pixels [B, 3, H, W] in [-1, 1] -> latents float32 [B, C, H/f, W/f], scaled for the UNet.

        ``sample=False`` takes the mode of the latent distribution (deterministic).
        """
        dist = self.vae.encode(pixels.to(self.device, self.vae.dtype)).latent_dist
        latents = dist.sample(generator) if sample else dist.mode()
        return (latents.float() - shift_factor(self.vae)) * self.vae.config.scaling_factor

    @torch.no_grad()
    def forward(self, batch: dict, sample: bool = False, generator: torch.Generator | None = None) -> dict:
        """A raw batch (``pixels``, ``caption``, ``original_size``, ``crop_top_left``) -> a cached-format
        batch."""
        pixels = batch["pixels"]
        text = self.encode_captions(batch["caption"])
        geometry = self.family.geometry(
            batch["original_size"].float(), batch["crop_top_left"].float(), tuple(pixels.shape[-2:])
        )
        out = {"latents": self.encode_images(pixels, sample, generator)}
        out.update(self.family.condition(text, geometry))
        out["caption"] = list(batch["caption"])
        if "key" in batch:
            out["key"] = batch["key"]
        return out


def shift_factor(vae) -> float:
    """The VAE's latent offset (FLUX: 0.1159; 0 for a VAE without one, SD's)."""
    return float(getattr(vae.config, "shift_factor", None) or 0.0)


def decode_latents(vae, latents: torch.Tensor) -> torch.Tensor:
    """Model latents -> pixels in about [-1, 1]: decode(latents / scaling_factor + shift_factor)."""
    z = latents.to(vae.dtype) / vae.config.scaling_factor + shift_factor(vae)
    return vae.decode(z).sample


def tokenize(tokenizer, captions: Sequence[str]) -> torch.Tensor:
    """Token ids padded to the tokenizer's ``model_max_length`` (77), as the diffusers pipelines do."""
    return tokenizer(
        list(captions),
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids
