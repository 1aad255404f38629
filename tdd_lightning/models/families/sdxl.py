"""The SDXL family: two CLIP text encoders, pooled embeddings, the six micro-conditioning ids.

c = {prompt_embeds [B, 77, D1 + D2], pooled_prompt_embeds [B, D2], time_ids [B, 6]}. The unconditional
condition replaces the text parts only; each sample keeps its own micro-conditioning time ids (as the
SDXL pipeline does for its negative). time_ids = (original h, w, crop top, left, target h, w): the real
values from the preprocessing's geometry (Podell et al. 2023, sec. 2.2), not the resized size and (0, 0)
the authors' code records. Pipeline: ``StableDiffusionXLPipeline``.
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
class SDXLComponents:
    unet: torch.nn.Module
    vae: torch.nn.Module | None
    text_encoder: torch.nn.Module | None
    text_encoder_2: torch.nn.Module | None
    tokenizer: object | None
    tokenizer_2: object | None
    noise_scheduler: object

    def to_pipeline(self, scheduler=None):
        """A stock ``StableDiffusionXLPipeline`` built from these parts."""
        from diffusers import StableDiffusionXLPipeline

        return StableDiffusionXLPipeline(
            vae=self.vae,
            text_encoder=self.text_encoder,
            text_encoder_2=self.text_encoder_2,
            tokenizer=self.tokenizer,
            tokenizer_2=self.tokenizer_2,
            unet=self.unet,
            scheduler=scheduler if scheduler is not None else self.noise_scheduler,
        )


def load_sdxl_components(
    pretrained: str | os.PathLike,
    *,
    revision: str | None = None,
    variant: str | None = None,
    dtype: torch.dtype = torch.float32,
    load_vae: bool = True,
    load_text_encoders: bool = True,
) -> SDXLComponents:
    """Load UNet, VAE, both CLIP text encoders and tokenizers, and the noise scheduler.

    ``load_vae`` / ``load_text_encoders`` = False skip those parts (training from cached latents and
    embeddings never needs them).
    """
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    unet, vae, (te1, te2), (tok1, tok2), scheduler = load_frozen_parts(
        resolve_model_path(pretrained, revision),
        denoiser=(UNet2DConditionModel, "unet"),
        text_encoders=((CLIPTextModel, "text_encoder"), (CLIPTextModelWithProjection, "text_encoder_2")),
        tokenizers=((CLIPTokenizer, "tokenizer"), (CLIPTokenizer, "tokenizer_2")),
        scheduler=(DDPMScheduler, "scheduler"),
        dtype=dtype, variant=variant, load_vae=load_vae, load_text_encoders=load_text_encoders,
    )  # fmt: skip
    return SDXLComponents(unet, vae, te1, te2, tok1, tok2, scheduler)


def square_time_ids(size: int, batch: int, device: torch.device | str | None = None) -> torch.Tensor:
    """SDXL micro-conditioning of ``batch`` uncropped square images of side ``size`` px, float32 [batch, 6]:
    (original h, w, crop top, left, target h, w) = (size, size, 0, 0, size, size)."""
    row = torch.tensor([size, size, 0, 0, size, size], dtype=torch.float32, device=device)
    return row.repeat(batch, 1)


def unet_eps(unet, x: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
    """The output of an SDXL UNet for condition ``cond`` (eps for an eps-prediction model); a w-conditioned
    UNet (``models.w_conditioning``) also gets the embedding of ``cond["guidance"]``."""
    added = {"text_embeds": cond["pooled_prompt_embeds"], "time_ids": cond["time_ids"]}
    extra = {"timestep_cond": timestep_cond(unet, cond)} if "guidance" in cond else {}
    return unet(x, t, encoder_hidden_states=cond["prompt_embeds"], added_cond_kwargs=added, **extra).sample


class SDXLEncoder(Encoder):
    """Frozen VAE + the two text encoders + tokenizers.

    Text follows diffusers' ``StableDiffusionXLPipeline.encode_prompt`` (no clip skip): each tokenizer pads
    to its ``model_max_length`` (77); ``prompt_embeds`` is the penultimate hidden state of text_encoder
    and text_encoder_2 concatenated on the last dim, ``pooled_prompt_embeds`` the projected ``text_embeds``
    of text_encoder_2. An empty caption "" goes through the encoders like any other (``empty_prompt``).
    """

    family = None  # set below (SDXL)

    def __init__(self, vae, text_encoder, text_encoder_2, tokenizer, tokenizer_2):
        super().__init__(vae)
        self.text_encoder, self.text_encoder_2 = text_encoder, text_encoder_2
        self.tokenizer, self.tokenizer_2 = tokenizer, tokenizer_2
        self.freeze()

    @classmethod
    def from_components(cls, components) -> SDXLEncoder:
        """From ``SDXLComponents`` loaded with the VAE and text encoders."""
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
        from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

        root = resolve_model_path(pretrained, revision)
        kw = {"variant": variant} if variant else {}
        return cls(
            load_vae(root, dtype, kw),
            CLIPTextModel.from_pretrained(root, subfolder="text_encoder", torch_dtype=dtype, **kw),
            CLIPTextModelWithProjection.from_pretrained(
                root, subfolder="text_encoder_2", torch_dtype=dtype, **kw
            ),
            CLIPTokenizer.from_pretrained(root, subfolder="tokenizer"),
            CLIPTokenizer.from_pretrained(root, subfolder="tokenizer_2"),
        )

    @torch.no_grad()
    def encode_text(self, captions: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """``prompt_embeds`` float32 [B, 77, D1 + D2] and ``pooled_prompt_embeds`` float32 [B, D2]."""
        hidden, pooled = [], None
        for tokenizer, encoder in (
            (self.tokenizer, self.text_encoder),
            (self.tokenizer_2, self.text_encoder_2),
        ):
            out = encoder(tokenize(tokenizer, captions).to(encoder.device), output_hidden_states=True)
            hidden.append(out.hidden_states[-2].float())
            if encoder is self.text_encoder_2:
                pooled = out.text_embeds.float()
        return torch.cat(hidden, dim=-1), pooled

    def encode_captions(self, captions: Sequence[str]) -> dict[str, torch.Tensor]:
        prompt_embeds, pooled = self.encode_text(captions)
        return {"prompt_embeds": prompt_embeds, "pooled_prompt_embeds": pooled}


def load_vae(root, dtype: torch.dtype, kw: dict):
    """The VAE of ``root`` in ``dtype``; an fp16 VAE whose config sets ``force_upcast`` stays float32."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(root, subfolder="vae", torch_dtype=dtype, **kw)
    if dtype == torch.float16 and getattr(vae.config, "force_upcast", False):
        vae = vae.to(torch.float32)
    return vae


class SDXLFamily(ModelFamily):
    name = "sdxl"
    pipeline_class = "StableDiffusionXLPipeline"
    text_keys = ("prompt_embeds", "pooled_prompt_embeds")
    cond_keys = ("prompt_embeds", "pooled_prompt_embeds", "time_ids")
    addition_embed_type = "text_time"
    kohya_base_model = "sdxl_base_v1-0"
    modelspec_architecture = "stable-diffusion-xl-v1-base/lora"

    loader = staticmethod(load_sdxl_components)
    encoder_class = SDXLEncoder
    tiny_builder = "build_tiny_sdxl"

    def text_shapes(self, pretrained) -> dict[str, tuple[int, ...]]:
        """prompt_embeds (77, D1 + D2) and pooled_prompt_embeds (D2,) from the two encoders' configs."""
        root = Path(pretrained)
        te1 = json.loads((root / "text_encoder" / "config.json").read_text())
        te2 = json.loads((root / "text_encoder_2" / "config.json").read_text())
        return self.text_shapes_of(te1, te2)

    def text_shapes_of(self, te1: dict, te2: dict) -> dict[str, tuple[int, ...]]:
        """``text_shapes`` from the two text encoders' config dicts."""
        return {
            "prompt_embeds": (77, te1["hidden_size"] + te2["hidden_size"]),
            "pooled_prompt_embeds": (te2["projection_dim"],),
        }

    def geometry(self, original_size, crop_top_left, target_size) -> Cond:
        target = torch.tensor(list(target_size), dtype=torch.float32, device=original_size.device)
        target = target.expand(original_size.shape[0], 2)
        return {"time_ids": torch.cat([original_size.float(), crop_top_left.float(), target], dim=1)}

    def square_geometry(self, size, batch, device=None) -> Cond:
        return {"time_ids": square_time_ids(size, batch, device)}

    def denoise(self, unet, x, t, cond) -> torch.Tensor:
        return unet_eps(unet, x, t, cond)


SDXL = SDXLFamily()
SDXLEncoder.family = SDXL
