"""The SD1.5 / SD2.x family: one CLIP text encoder, a UNet without added conditions.

c = {prompt_embeds [B, 77, D]} (D = 768 for SD1.5, 1024 for SD2.x): the last hidden state of the text
encoder, as ``StableDiffusionPipeline.encode_prompt`` gives it (no clip skip). Image geometry is not a
condition of these models (the preprocessing's crop is ignored). The unconditional condition is the
encoded "" in the authors' SD1.5 code (``guidance.uncond=empty_prompt``, what the pipeline's negative
is), or zeros. SD2.x 768 models are v-prediction; community finetunes may add zero terminal SNR
(``rescale_betas_zero_snr``): both come from the model's scheduler config. Pipeline:
``StableDiffusionPipeline`` (without the safety checker).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from tdd_lightning.models.conditioning import Cond
from tdd_lightning.models.encoder import Encoder, tokenize
from tdd_lightning.models.families.base import ModelFamily
from tdd_lightning.models.loading import load_frozen_parts, resolve_model_path
from tdd_lightning.models.w_conditioning import timestep_cond


@dataclass
class SD15Components:
    unet: torch.nn.Module
    vae: torch.nn.Module | None
    text_encoder: torch.nn.Module | None
    tokenizer: object | None
    noise_scheduler: object

    def to_pipeline(self, scheduler=None):
        """A stock ``StableDiffusionPipeline`` built from these parts (no safety checker)."""
        from diffusers import StableDiffusionPipeline

        return StableDiffusionPipeline(
            vae=self.vae,
            text_encoder=self.text_encoder,
            tokenizer=self.tokenizer,
            unet=self.unet,
            scheduler=scheduler if scheduler is not None else self.noise_scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )


def load_sd15_components(
    pretrained: str | os.PathLike,
    *,
    revision: str | None = None,
    variant: str | None = None,
    dtype: torch.dtype = torch.float32,
    load_vae: bool = True,
    load_text_encoders: bool = True,
) -> SD15Components:
    """Load UNet, VAE, the CLIP text encoder and tokenizer, and the noise scheduler (DDPM, same config)."""
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    unet, vae, (te,), (tok,), scheduler = load_frozen_parts(
        resolve_model_path(pretrained, revision),
        denoiser=(UNet2DConditionModel, "unet"),
        text_encoders=((CLIPTextModel, "text_encoder"),),
        tokenizers=((CLIPTokenizer, "tokenizer"),),
        scheduler=(DDPMScheduler, "scheduler"),
        dtype=dtype, variant=variant, load_vae=load_vae, load_text_encoders=load_text_encoders,
    )  # fmt: skip
    return SD15Components(unet, vae, te, tok, scheduler)


class SD15Encoder(Encoder):
    """Frozen VAE + the CLIP text encoder + tokenizer."""

    family = None  # set below (SD15)

    def __init__(self, vae, text_encoder, tokenizer):
        super().__init__(vae)
        self.text_encoder, self.tokenizer = text_encoder, tokenizer
        self.freeze()

    @classmethod
    def from_components(cls, components) -> SD15Encoder:
        if components.vae is None or components.text_encoder is None or components.tokenizer is None:
            raise ValueError("SD15Encoder needs the VAE, the text encoder and the tokenizer loaded")
        return cls(components.vae, components.text_encoder, components.tokenizer)

    @classmethod
    def from_pretrained(cls, pretrained, *, dtype=torch.float32, revision=None, variant=None) -> SD15Encoder:
        """Load only the VAE, text encoder and tokenizer (not the UNet) from a folder or hub id."""
        from transformers import CLIPTextModel, CLIPTokenizer

        from tdd_lightning.models.families.sdxl import load_vae

        root = resolve_model_path(pretrained, revision)
        kw = {"variant": variant} if variant else {}
        return cls(
            load_vae(root, dtype, kw),
            CLIPTextModel.from_pretrained(root, subfolder="text_encoder", torch_dtype=dtype, **kw),
            CLIPTokenizer.from_pretrained(root, subfolder="tokenizer"),
        )

    @torch.no_grad()
    def encode_text(self, captions: Sequence[str]) -> torch.Tensor:
        """``prompt_embeds`` float32 [B, 77, D]: the text encoder's last hidden state."""
        ids = tokenize(self.tokenizer, captions).to(self.text_encoder.device)
        return self.text_encoder(ids)[0].float()

    def encode_captions(self, captions: Sequence[str]) -> dict[str, torch.Tensor]:
        return {"prompt_embeds": self.encode_text(captions)}


class SD15Family(ModelFamily):
    name = "sd15"
    pipeline_uncond = "empty_prompt"
    pipeline_class = "StableDiffusionPipeline"
    text_keys = ("prompt_embeds",)
    cond_keys = ("prompt_embeds",)
    kohya_base_model = "sd_v1"
    modelspec_architecture = "stable-diffusion-v1/lora"

    loader = staticmethod(load_sd15_components)
    encoder_class = SD15Encoder
    tiny_builder = "build_tiny_sd15"

    def text_shapes(self, pretrained) -> dict[str, tuple[int, ...]]:
        te = json.loads((Path(pretrained) / "text_encoder" / "config.json").read_text())
        return {"prompt_embeds": (77, te["hidden_size"])}

    def denoise(self, unet, x, t, cond: Cond) -> torch.Tensor:
        extra = {"timestep_cond": timestep_cond(unet, cond)} if "guidance" in cond else {}
        return unet(x, t, encoder_hidden_states=cond["prompt_embeds"], **extra).sample


SD15 = SD15Family()
SD15Encoder.family = SD15
