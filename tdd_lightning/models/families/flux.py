"""The FLUX family: a rectified-flow transformer on 2x2-packed latents, CLIP-L (pooled) + T5 text encoders.

c = {prompt_embeds [B, L, D_t5] (T5's last hidden state, L = tokenizer_2.model_max_length, 512 for
FLUX.1), pooled_prompt_embeds [B, D_clip] (CLIP-L's pooled output)}, and, for a guidance-distilled
transformer (FLUX.1-dev: ``guidance_embeds``), ``guidance`` [B], the embedded guidance value the training
step draws (``guidance=embedded``). No image geometry. The unconditional condition is the encoded "" (what
FluxPipeline's negative prompt is; zeros are allowed too).

Latents are the VAE's (z - shift_factor) * scaling_factor, [B, 16, H/8, W/8] for FLUX.1. ``denoise`` takes
them unpacked like every family and packs them into (H/2)(W/2) tokens of 4C features with the position
ids FluxPipeline builds (image ids (0, row, col), text ids zero), calls the transformer at timestep
sigma (the module passes sigma * T, divided by T here, as the pipeline does) and unpacks its velocity.
Noise schedule: ``FlowSchedule`` of the model's FlowMatchEulerDiscreteScheduler config (static or
dynamic shift, the same in training and at inference); prediction type ``flow`` (v = eps - x0).
Pipeline: ``FluxPipeline``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from tdd_lightning.diffusion import FLOW_PREDICTION, FlowSchedule
from tdd_lightning.diffusion.flow import flow_unhonoured_keys
from tdd_lightning.errors import UserError
from tdd_lightning.models.conditioning import Cond
from tdd_lightning.models.encoder import Encoder
from tdd_lightning.models.families.base import ModelFamily, select_sites
from tdd_lightning.models.features import FeatureSite
from tdd_lightning.models.loading import load_frozen_parts, resolve_model_path

PATCH = 2  # FLUX packs 2x2 latent patches into one token
REQUIRED = ("transformer", "scheduler")  # the subfolders a local FLUX folder must have

# LoRA targets (ALGORITHM.md section 8.5): every attention projection of the double-stream blocks, image and
# text side (to_q/k/v, to_out.0; add_q/k/v_proj, to_add_out: the context projections), both feed-forwards
# (ff, ff_context), and the single-stream blocks' q/k/v, proj_mlp and proj_out. Not the AdaLN modulation
# linears (norm*.linear: 18432-wide outputs, the bulk of FLUX's parameters), nor the embedders. As in peft
# for any list naming "proj_out", the final output projection (also "proj_out") gets an adapter too.
FLUX_LORA_TARGETS = (
    "to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
    "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2", "proj_mlp", "proj_out",
)  # fmt: skip


@dataclass
class FluxComponents:
    transformer: torch.nn.Module
    vae: torch.nn.Module | None
    text_encoder: torch.nn.Module | None
    text_encoder_2: torch.nn.Module | None
    tokenizer: object | None
    tokenizer_2: object | None
    noise_scheduler: object

    @property
    def unet(self) -> torch.nn.Module:
        """The denoiser, under the name the module and the other families use."""
        return self.transformer

    def to_pipeline(self, scheduler=None):
        """A stock ``FluxPipeline`` built from these parts."""
        from diffusers import FluxPipeline

        return FluxPipeline(
            scheduler=scheduler if scheduler is not None else self.noise_scheduler,
            vae=self.vae,
            text_encoder=self.text_encoder,
            tokenizer=self.tokenizer,
            text_encoder_2=self.text_encoder_2,
            tokenizer_2=self.tokenizer_2,
            transformer=self.transformer,
        )


def load_flux_components(
    pretrained: str | os.PathLike,
    *,
    revision: str | None = None,
    variant: str | None = None,
    dtype: torch.dtype = torch.float32,
    load_vae: bool = True,
    load_text_encoders: bool = True,
) -> FluxComponents:
    """Load the transformer, VAE, CLIP and T5 encoders and tokenizers, and the flow-match scheduler."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

    transformer, vae, (te1, te2), (tok1, tok2), scheduler = load_frozen_parts(
        resolve_model_path(pretrained, revision, required=REQUIRED),
        denoiser=(FluxTransformer2DModel, "transformer"),
        text_encoders=((CLIPTextModel, "text_encoder"), (T5EncoderModel, "text_encoder_2")),
        tokenizers=((CLIPTokenizer, "tokenizer"), (T5TokenizerFast, "tokenizer_2")),
        scheduler=(FlowMatchEulerDiscreteScheduler, "scheduler"),
        dtype=dtype, variant=variant, load_vae=load_vae, load_text_encoders=load_text_encoders,
    )  # fmt: skip
    return FluxComponents(transformer, vae, te1, te2, tok1, tok2, scheduler)


# ---- packing, as FluxPipeline._pack_latents / _unpack_latents / _prepare_latent_image_ids ------------------
def pack(x: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] -> [B, (H/2)(W/2), 4C]: each 2x2 patch one token, features (c, dy, dx)."""
    B, C, H, W = x.shape
    if H % PATCH or W % PATCH:
        raise ValueError(f"FLUX latents need an even height and width, got {H}x{W}")
    x = x.view(B, C, H // PATCH, PATCH, W // PATCH, PATCH).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(B, (H // PATCH) * (W // PATCH), C * PATCH * PATCH)


def unpack(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The inverse of ``pack`` for a latent of ``height`` x ``width``."""
    B, _, F = tokens.shape
    C = F // (PATCH * PATCH)
    x = tokens.view(B, height // PATCH, width // PATCH, C, PATCH, PATCH).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(B, C, height, width)


def image_ids(rows: int, cols: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """[rows * cols, 3] position ids (0, row, col) of the packed tokens."""
    ids = torch.zeros(rows, cols, 3)
    ids[..., 1] += torch.arange(rows)[:, None]
    ids[..., 2] += torch.arange(cols)[None, :]
    return ids.reshape(rows * cols, 3).to(device=device, dtype=dtype)


def transformer_velocity(model, x: torch.Tensor, t: torch.Tensor, cond: Cond, T: int = 1000) -> torch.Tensor:
    """The transformer's velocity for unpacked latents ``x`` [B, C, H, W] at model time ``t`` = sigma * T."""
    B, _, H, W = x.shape
    text = cond["prompt_embeds"]
    guidance = None
    if model.config.guidance_embeds:
        if "guidance" not in cond:
            raise UserError(
                "this FLUX transformer is guidance-distilled (guidance_embeds): it needs the embedded "
                "guidance value w (train with guidance=embedded; sample with a guidance value)"
            )
        guidance = cond["guidance"].to(torch.float32).reshape(B)
    out = model(
        hidden_states=pack(x),
        timestep=t.to(x.dtype).expand(B) / T,
        guidance=guidance,
        pooled_projections=cond["pooled_prompt_embeds"],
        encoder_hidden_states=text,
        txt_ids=torch.zeros(text.shape[1], 3, device=x.device, dtype=x.dtype),
        img_ids=image_ids(H // PATCH, W // PATCH, x.device, x.dtype),
        return_dict=False,
    )[0]
    return unpack(out, H, W)


class FluxEncoder(Encoder):
    """Frozen VAE (latents (z - shift_factor) * scaling_factor) + CLIP-L and T5 + their tokenizers.

    Text follows ``FluxPipeline.encode_prompt``: CLIP pads to 77 tokens and gives its pooled output; T5
    pads to ``max_sequence_length`` (the tokenizer's ``model_max_length``: 512 for FLUX.1) and gives its
    last hidden state. Both without an attention mask, as the pipeline runs them."""

    family = None  # set below (FLUX)

    def __init__(self, vae, text_encoder, text_encoder_2, tokenizer, tokenizer_2, max_sequence_length=None):
        super().__init__(vae)
        self.text_encoder, self.text_encoder_2 = text_encoder, text_encoder_2
        self.tokenizer, self.tokenizer_2 = tokenizer, tokenizer_2
        self.max_sequence_length = int(max_sequence_length or min(tokenizer_2.model_max_length, 512))
        self.freeze()

    @classmethod
    def from_components(cls, components) -> FluxEncoder:
        parts = (components.vae, components.text_encoder, components.text_encoder_2)
        if any(p is None for p in parts) or components.tokenizer is None or components.tokenizer_2 is None:
            raise ValueError("FluxEncoder needs the VAE, both text encoders and both tokenizers loaded")
        return cls(*parts, components.tokenizer, components.tokenizer_2)

    @classmethod
    def from_pretrained(cls, pretrained, *, dtype=torch.float32, revision=None, variant=None) -> FluxEncoder:
        """Load only the VAE, text encoders and tokenizers (not the transformer)."""
        from diffusers import AutoencoderKL
        from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

        root = resolve_model_path(pretrained, revision, required=REQUIRED)
        kw = {"torch_dtype": dtype, "variant": variant} if variant else {"torch_dtype": dtype}
        return cls(
            AutoencoderKL.from_pretrained(root, subfolder="vae", **kw),
            CLIPTextModel.from_pretrained(root, subfolder="text_encoder", **kw),
            T5EncoderModel.from_pretrained(root, subfolder="text_encoder_2", **kw),
            CLIPTokenizer.from_pretrained(root, subfolder="tokenizer"),
            T5TokenizerFast.from_pretrained(root, subfolder="tokenizer_2"),
        )

    @torch.no_grad()
    def encode_text(self, captions: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """``prompt_embeds`` float32 [B, L, D_t5] and ``pooled_prompt_embeds`` float32 [B, D_clip]."""
        captions = list(captions)
        clip_ids = self.tokenizer(
            captions, padding="max_length", max_length=self.tokenizer.model_max_length, truncation=True,
            return_tensors="pt",
        ).input_ids  # fmt: skip
        pooled = self.text_encoder(clip_ids.to(self.text_encoder.device), output_hidden_states=False)
        t5_ids = self.tokenizer_2(
            captions, padding="max_length", max_length=self.max_sequence_length, truncation=True,
            return_tensors="pt",
        ).input_ids  # fmt: skip
        hidden = self.text_encoder_2(t5_ids.to(self.text_encoder_2.device), output_hidden_states=False)[0]
        return hidden.float(), pooled.pooler_output.float()

    def encode_captions(self, captions: Sequence[str]) -> dict[str, torch.Tensor]:
        prompt_embeds, pooled = self.encode_text(captions)
        return {"prompt_embeds": prompt_embeds, "pooled_prompt_embeds": pooled}


def _read(root: Path, sub: str, name: str = "config.json") -> dict:
    path = root / sub / name
    return json.loads(path.read_text()) if path.is_file() else {}


class FluxFamily(ModelFamily):
    name = "flux"
    pipeline_class = "FluxPipeline"
    denoiser_subfolder = "transformer"
    lora_prefix = "transformer"
    scheduler_class = "TDDFlowScheduler"
    pipeline_uncond = "empty_prompt"
    text_keys = ("prompt_embeds", "pooled_prompt_embeds")
    cond_keys = ("prompt_embeds", "pooled_prompt_embeds")
    lora_targets = FLUX_LORA_TARGETS
    kohya_base_model = "flux1"
    modelspec_architecture = "flux-1-dev/lora"

    loader = staticmethod(load_flux_components)
    encoder_class = FluxEncoder
    tiny_builder = "build_tiny_flux"

    def build_tiny(self, out_dir, cfg=None) -> Path:
        from tdd_lightning.models.flux_tiny import build_tiny_flux

        return build_tiny_flux(out_dir, cfg)

    def check_unet(self, unet_config: Mapping) -> None:
        if "joint_attention_dim" not in unet_config or "pooled_projection_dim" not in unet_config:
            raise UserError(
                "model.family=flux expects a FluxTransformer2DModel (transformer/ with joint_attention_dim "
                "and pooled_projection_dim); this denoiser is not one: set model.family to its family"
            )

    def check_guidance(self, unet_config: Mapping, embedded: bool) -> None:
        """A guidance-distilled transformer needs ``guidance=embedded``; one without the embedding cannot
        take it (use ``decoupled``, true CFG, or ``none``)."""
        has = bool(unet_config.get("guidance_embeds", False))
        if has and not embedded:
            raise UserError(
                "this FLUX transformer is guidance-distilled (guidance_embeds=true, like FLUX.1-dev): its "
                "guidance is an input, not a second branch: use guidance=embedded"
            )
        if embedded and not has:
            raise UserError(
                "guidance=embedded needs a transformer with a guidance embedding (guidance_embeds=true); "
                "this one has none: use guidance=decoupled (true CFG, one batched forward) or guidance=none"
            )

    def noise_schedule(self, scheduler_config: Mapping) -> FlowSchedule:
        return FlowSchedule.from_config(scheduler_config, patch_size=PATCH)

    def unhonoured_scheduler_keys(self, scheduler_config: Mapping, known) -> list[str]:
        return flow_unhonoured_keys(scheduler_config)

    def prediction_type(self, scheduler_config: Mapping) -> str:
        return FLOW_PREDICTION

    def text_shapes(self, pretrained) -> dict[str, tuple[int, ...]]:
        """prompt_embeds (L, D_t5), pooled_prompt_embeds (D_clip,) from the folder's configs."""
        root = Path(pretrained)
        t5, clip = _read(root, "text_encoder_2"), _read(root, "text_encoder")
        length = _read(root, "tokenizer_2", "tokenizer_config.json").get("model_max_length", 512)
        return {
            "prompt_embeds": (min(int(length), 512), t5["d_model"]),
            "pooled_prompt_embeds": (clip["hidden_size"],),
        }

    def latent_shape_of(self, pretrained) -> tuple[int, int, int]:
        """(C, h, w) of the VAE's latents at its sample_size (16, 128, 128 for FLUX.1 at 1024 px)."""
        vae = _read(Path(pretrained), "vae")
        side = int(vae.get("sample_size", 1024)) // 2 ** (len(vae.get("block_out_channels", [0] * 4)) - 1)
        return int(vae.get("latent_channels", 16)), side, side

    def sample_shape(self, unet, pretrained=None) -> tuple[int, int, int]:
        channels = int(unet.config.in_channels) // (PATCH * PATCH)
        h = w = 128  # FLUX.1 at 1024 px, when the folder cannot be read
        if pretrained:
            try:
                _, h, w = self.latent_shape_of(resolve_model_path(pretrained, required=REQUIRED))
            except UserError:
                pass
        return channels, h, w

    def fsdp_blocks(self, unet) -> list[torch.nn.Module]:
        return [*unet.transformer_blocks, *unet.single_transformer_blocks]

    def denoise(self, unet, x, t, cond: Cond) -> torch.Tensor:
        return transformer_velocity(unet, x, t, cond)

    def kohya_state_dict(self, tensors, alpha: float) -> dict[str, torch.Tensor]:
        return flux_kohya_state_dict(tensors, alpha)

    def discriminator_sites(self, unet, names: Sequence[str] | None = None) -> list[FeatureSite]:
        """Token-pooled heads on the frozen transformer's image tokens (ALGORITHM.md 7).

        Every double-stream block (``transformer_blocks.<i>``) and single-stream block
        (``single_transformer_blocks.<j>``) is a site; each returns (text tokens, image tokens) and the head
        reads the image tokens [B, L, inner_dim], every sample of the batch (the authors' FLUX code zipped
        over the batch and scored one sample). ``names`` None: ``default_flux_sites`` (the double-stream
        blocks at a third, two thirds and the end, and the last single-stream block), so the heads stay a
        few at FLUX.1-dev's width 3072 (each head holds two 3072 x 3072 1x1 convolutions)."""
        width = unet.config.num_attention_heads * unet.config.attention_head_dim
        sites = [
            FeatureSite(f"{group}.{i}", block, width, "tokens", image_tokens)
            for group in ("transformer_blocks", "single_transformer_blocks")
            for i, block in enumerate(getattr(unet, group))
        ]
        if names is None:
            names = default_flux_sites(len(unet.transformer_blocks), len(unet.single_transformer_blocks))
        return select_sites(self, sites, names)

    def randn_like(self, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """Noise drawn in the packed token layout [B, (H/2)(W/2), 4C] (as FluxPipeline's scheduler sees the
        latents), returned unpacked: the module's sampler then draws what the pipeline's does."""
        B, C, H, W = x.shape
        shape = (B, (H // PATCH) * (W // PATCH), C * PATCH * PATCH)
        z = torch.randn(shape, generator=generator, device=x.device, dtype=x.dtype)
        return unpack(z, H, W)


def image_tokens(output) -> torch.Tensor:
    """A FLUX block's image tokens: blocks return (encoder_hidden_states, hidden_states)."""
    return output[1]


def default_flux_sites(num_double: int, num_single: int) -> list[str]:
    """The double-stream blocks at 1/3, 2/3 and the end (distinct), and the last single-stream block."""
    double = sorted({max(0, round(num_double * f) - 1) for f in (1 / 3, 2 / 3, 1.0)})
    names = [f"transformer_blocks.{i}" for i in double]
    return names + ([f"single_transformer_blocks.{num_single - 1}"] if num_single else [])


FLUX = FluxFamily()
FluxEncoder.family = FLUX


def build_tiny_flux_dev(out_dir: str | os.PathLike) -> Path:
    """The tiny FLUX pipeline with a guidance embedding (FLUX.1-dev's layout), for ``guidance=embedded``."""
    from tdd_lightning.models.flux_tiny import TinyFluxConfig, build_tiny_flux

    return build_tiny_flux(out_dir, TinyFluxConfig(guidance_embeds=True))


# ---- the kohya / ComfyUI layout of a FLUX LoRA: BFL's module names, q/k/v (single blocks: + MLP) fused
def _bfl_groups(modules: set[str]) -> dict[str, list[str]]:
    """BFL (ComfyUI / kohya) module name -> the diffusers modules it fuses, for the adapted ``modules``."""
    groups: dict[str, list[str]] = {}
    doubles = sorted({int(m.split(".")[1]) for m in modules if m.startswith("transformer_blocks.")})
    singles = sorted({int(m.split(".")[1]) for m in modules if m.startswith("single_transformer_blocks.")})
    for i in doubles:
        b, k = f"transformer_blocks.{i}", f"lora_unet_double_blocks_{i}"
        groups |= {
            f"{k}_img_attn_qkv": [f"{b}.attn.to_q", f"{b}.attn.to_k", f"{b}.attn.to_v"],
            f"{k}_img_attn_proj": [f"{b}.attn.to_out.0"],
            f"{k}_img_mlp_0": [f"{b}.ff.net.0.proj"],
            f"{k}_img_mlp_2": [f"{b}.ff.net.2"],
            f"{k}_txt_attn_qkv": [f"{b}.attn.add_q_proj", f"{b}.attn.add_k_proj", f"{b}.attn.add_v_proj"],
            f"{k}_txt_attn_proj": [f"{b}.attn.to_add_out"],
            f"{k}_txt_mlp_0": [f"{b}.ff_context.net.0.proj"],
            f"{k}_txt_mlp_2": [f"{b}.ff_context.net.2"],
        }
    for i in singles:
        b, k = f"single_transformer_blocks.{i}", f"lora_unet_single_blocks_{i}"
        groups[f"{k}_linear1"] = [f"{b}.attn.to_q", f"{b}.attn.to_k", f"{b}.attn.to_v", f"{b}.proj_mlp"]
        groups[f"{k}_linear2"] = [f"{b}.proj_out"]
    if "proj_out" in modules:
        groups["lora_unet_final_layer_linear"] = ["proj_out"]
    return groups


def flux_kohya_state_dict(tensors: Mapping[str, torch.Tensor], alpha: float) -> dict[str, torch.Tensor]:
    """peft state dict (``<module>.lora_A.weight``, the module's scale alpha / r) -> the BFL-named kohya file
    ComfyUI loads natively and diffusers' ``_convert_kohya_flux_lora_to_diffusers`` reads back.

    A fused BFL linear (img/txt ``attn_qkv``: q, k, v; single ``linear1``: q, k, v, proj_mlp) gets the stacked
    lora_down [n r, in] and the block-diagonal lora_up [sum out, n r] with alpha n * alpha: the same
    (alpha / r) B A per part, exactly (diffusers recognises the block-diagonal form and splits it back).
    The final layer's alpha is not read by diffusers: its scale is folded into lora_up (alpha = rank)."""
    modules = {k.rsplit(".lora_", 1)[0] for k in tensors}
    groups = _bfl_groups(modules)
    covered = {m for parts in groups.values() for m in parts}
    unknown = sorted(modules - covered)
    if unknown:
        raise UserError(
            f"the kohya FLUX layout has no name for the adapted module(s) {unknown[:3]}: export with "
            "--format diffusers (or train with the flux family's default target modules)"
        )
    out: dict[str, torch.Tensor] = {}
    for name, parts in groups.items():
        present = [m for m in parts if f"{m}.lora_A.weight" in tensors]
        if not present:
            continue
        if len(present) != len(parts):
            raise UserError(f"the kohya FLUX layout fuses {parts} into {name}: adapt all of them or none")
        downs = [tensors[f"{m}.lora_A.weight"] for m in parts]
        ups = [tensors[f"{m}.lora_B.weight"] for m in parts]
        rank = downs[0].shape[0]
        if name == "lora_unet_final_layer_linear":
            down, up, a = downs[0], ups[0] * (alpha / rank), float(rank)
        else:
            down, up, a = torch.cat(downs), torch.block_diag(*ups), alpha * len(parts)
        out[f"{name}.lora_down.weight"] = down.contiguous()
        out[f"{name}.lora_up.weight"] = up.contiguous()
        out[f"{name}.alpha"] = torch.tensor(float(a), dtype=down.dtype)
    return dict(sorted(out.items()))
